"""Objects built from a (checked) config: device, norm factory, model, optimiser and schedule."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from bnopt import models
from bnopt.config import ConfigError
from bnopt.data import TensorData
from bnopt.norms import NoiseSpec, NormFactory, norm_factory


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device", name, "CUDA is not available on this machine: use device=cpu or auto")
        if (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError("device", name, f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def build_norm(cfg: DictConfig, seed: int) -> NormFactory:
    noise = NoiseSpec(**cfg.noise) if cfg.get("noise") else None
    return norm_factory(cfg.kind, p=cfg.get("p"), eps=cfg.get("eps", 1e-5), momentum=cfg.get("momentum", 0.1),
                        noise=noise, seed=seed, norm_of=cfg.get("norm_of", "raw"))


def build_model(cfg: DictConfig, data: TensorData) -> models.ChainModel:
    """The network of ``cfg.model`` with ``cfg.norm``, shaped by the data: input channels and image size
    for VGG, input features for the MLP, dimension for the DLN."""
    m, shape = cfg.model, data.input_shape
    norm = build_norm(cfg.norm, cfg.seed)
    if m.name == "vgg":
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ConfigError("model.name", "vgg", f"VGG needs square images, the data has shape {shape}")
        return models.vgg(norm, depth=m.depth, in_channels=shape[0], image_size=shape[1],
                          num_classes=data.num_classes, width=m.width, bias=m.bias)
    if m.name == "mlp":
        return models.mlp(norm, in_features=math.prod(shape), hidden=list(m.hidden),
                          num_classes=data.num_classes, init_std=m.init_std)
    if shape != tuple(data.train_y.shape[1:]):
        raise ConfigError("model.name", "dln", f"the DLN is square: inputs {shape} and targets "
                          f"{tuple(data.train_y.shape[1:])} must have the same size")
    return models.dln(norm, dim=shape[0], depth=m.depth, norm_after_last=m.norm_after_last)


def build_optimizer(cfg: DictConfig, model: torch.nn.Module, steps: int):
    """Plain SGD (momentum and weight decay as fields) and its learning-rate schedule (None: constant)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    if cfg.schedule == "cosine":
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    elif cfg.schedule == "multistep":
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(cfg.milestones), gamma=cfg.gamma)
    else:
        schedule = None
    return optimizer, schedule
