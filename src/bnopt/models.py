"""The three networks of the protocol (sections 1-3), each a chain of blocks, one block per weight layer.

Block k (1-based, as the paper numbers layers) holds the k-th conv/linear weight layer and everything up
to the next weight layer: ``[flatten] -> weight -> norm -> activation -> [pool]``. So "layer #k" means the
same thing with or without normalisation, and the parameters of layer #k (weight, bias, gamma, beta) are
exactly those of ``model.blocks[k - 1]``. Every model takes a ``norm`` factory (``bnopt.norms``) and never
names a normalisation layer itself.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from bnopt.norms import NormFactory, normalises

# Conv widths, "M" for 2x2 max-pooling (the CIFAR VGG layouts of kuangliu/pytorch-cifar).
VGG_LAYOUTS: dict[int, list[int | str]] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class Block(nn.Module):
    """One weight layer and what follows it: ``[flatten] -> weight -> norm -> activation -> [pool]``.

    ``norm``'s output is the input to the non-linearity, which the activation probe records. Absent
    parts are None rather than identity modules: the 25-layer DLN's forward is dominated by call
    overhead, and the ICS probe runs ~K^2/2 block forwards.
    """

    def __init__(
        self,
        weight: nn.Module,
        norm: nn.Module | None = None,
        activation: nn.Module | None = None,
        pool: nn.Module | None = None,
        flatten_input: bool = False,
    ):
        super().__init__()
        self.flatten_input = flatten_input
        self.weight = weight
        self.norm = norm
        self.activation = activation
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flatten_input:
            x = x.flatten(1)
        x = self.weight(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        if self.pool is not None:
            x = self.pool(x)
        return x


class ChainModel(nn.Module):
    """A network that is the composition of its blocks: ``forward(x) = blocks[-1](... blocks[0](x))``.

    The ICS probe uses this structure to share the forward pass of the updated prefix across layers.
    """

    def __init__(self, blocks: Sequence[Block]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def layer(self, k: int) -> Block:
        """Layer #k, 1-based: the block of the k-th weight layer."""
        if not 1 <= k <= len(self.blocks):
            raise IndexError(f"layer #{k} does not exist: this model has layers #1..#{len(self.blocks)}")
        return self.blocks[k - 1]

    def layer_params(self) -> list[list[nn.Parameter]]:
        """The parameters grouped by layer, in forward order (index i is layer #i+1)."""
        return [list(block.parameters()) for block in self.blocks]


def is_plain_chain(model: nn.Module) -> bool:
    """Whether ``model`` is a ChainModel whose forward is still the composition of its blocks (a subclass may
    have its own): what the probes may take apart block by block."""
    return isinstance(model, ChainModel) and type(model).forward is ChainModel.forward


def glorot_(module: nn.Module) -> None:
    """Glorot (Xavier) uniform weights and zero biases for every conv/linear layer."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def vgg(
    norm: NormFactory,
    depth: int = 16,
    in_channels: int = 3,
    image_size: int = 32,
    num_classes: int = 10,
    width: float = 1.0,
    bias: bool = True,
) -> ChainModel:
    """CIFAR VGG (protocol section 1): conv3x3 -> norm -> ReLU per conv, max-pooling per "M", then one
    linear classifier. ``width`` scales every conv's channels (at least 1). Pooling uses ceil mode, which
    is the usual floor for 32x32 inputs and keeps 28x28 inputs (MNIST-format data) at least 1x1."""
    if depth not in VGG_LAYOUTS:
        raise ValueError(f"VGG depth must be one of {sorted(VGG_LAYOUTS)}; got {depth}")
    layout = VGG_LAYOUTS[depth]
    blocks: list[Block] = []
    channels, size = in_channels, image_size
    for i, entry in enumerate(layout):
        if entry == "M":
            continue
        out = max(1, round(entry * width))
        pool_next = i + 1 < len(layout) and layout[i + 1] == "M"
        blocks.append(
            Block(
                nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=bias),
                norm(out),
                nn.ReLU(),
                pool=nn.MaxPool2d(2, ceil_mode=True) if pool_next else None,
            )
        )
        channels = out
        if pool_next:
            size = math.ceil(size / 2)
    blocks.append(Block(nn.Linear(channels * size * size, num_classes), flatten_input=True))
    model = ChainModel(blocks)
    glorot_(model)
    return model


def mlp(
    norm: NormFactory,
    in_features: int = 784,
    hidden: Sequence[int] = (100, 100, 100),
    num_classes: int = 10,
    init_std: float | str = 0.1,
) -> ChainModel:
    """The MLP of Ioffe & Szegedy's Fig. 1 (protocol section 3): linear -> norm -> sigmoid per hidden
    layer, then a linear classifier. A linear layer followed by a norm layer has no bias (the norm's beta
    replaces it). Weights ~ N(0, init_std^2), or std 1/sqrt(fan_in) with ``init_std="fan_in"``."""
    blocks = []
    width = in_features
    for i, units in enumerate(hidden):
        norm_layer = norm(units)
        linear = nn.Linear(width, units, bias=not normalises(norm_layer))
        blocks.append(Block(linear, norm_layer, nn.Sigmoid(), flatten_input=i == 0))
        width = units
    blocks.append(Block(nn.Linear(width, num_classes), flatten_input=not hidden))
    model = ChainModel(blocks)
    for block in model.blocks:
        linear = block.weight
        std = 1.0 / math.sqrt(linear.in_features) if init_std == "fan_in" else float(init_std)
        nn.init.normal_(linear.weight, std=std)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
    return model


def dln(norm: NormFactory, dim: int = 10, depth: int = 25, norm_after_last: bool = False) -> ChainModel:
    """The deep linear network of protocol section 2: ``depth`` square, bias-free ``dim x dim`` layers,
    Glorot init, no non-linearity, a norm layer after every weight layer except the last (after the last
    too with ``norm_after_last``)."""
    blocks = [Block(nn.Linear(dim, dim, bias=False), norm(dim)) for _ in range(depth - 1)]
    blocks.append(Block(nn.Linear(dim, dim, bias=False), norm(dim) if norm_after_last else None))
    model = ChainModel(blocks)
    glorot_(model)
    return model
