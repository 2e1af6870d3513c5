"""Normalisation variants of protocol section 4, behind one factory signature.

A model never names a normalisation layer: it calls ``norm(num_features)`` once per weight layer, in
forward order, and gets a module that accepts ``(N, C)`` (linear) and ``(N, C, H, W)`` (conv) inputs.
Statistics are per unit: per feature over the batch, or per channel over batch, height and width.

Variants: ``none`` (identity), ``batchnorm`` (torch's), ``lp`` with p in {1, 2, inf} (Section 3.3 of
Santurkar et al.), each optionally followed by the noise of Algorithm 1 (Appendix A) — "noisy BatchNorm"
is ``batchnorm`` + noise, and noise on ``none`` is the paper's noisy unnormalised network.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from bnopt.seeding import derived_seed

NormFactory = Callable[[int], nn.Module]

NORM_KINDS = ("none", "batchnorm", "lp")
LP_ORDERS = (1.0, 2.0, math.inf)


class NoNorm(nn.Identity):
    """The unnormalised network: identity, with the constructor signature of the other variants."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features


class BatchNorm(nn.modules.batchnorm._BatchNorm):
    """torch's BatchNorm (``F.batch_norm``, learned gamma/beta, running statistics for evaluation),
    one class for linear and conv activations so that models need not know which one they feed."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() not in (2, 4):
            raise ValueError(f"BatchNorm expects (N, C) or (N, C, H, W) input, got shape {tuple(input.shape)}")


def _unit_view(stat: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-unit statistic of shape (C,) to broadcast against (N, C) or (N, C, H, W)."""
    return stat.view(1, -1, *([1] * (ndim - 2)))


def _reduce_dims(ndim: int) -> list[int]:
    """Every dimension except the unit dimension 1."""
    return [0, *range(2, ndim)]


LP_NORM_OF = ("raw", "centred")


class LpNorm(nn.Module):
    """Lp normalisation (Section 3.3): subtract the per-unit mean as BN does, then divide by the
    per-unit average Lp norm of the activations *before* the mean was subtracted,

        N_j = (mean_i |a_ij|^p)^(1/p)  for p = 1, 2,     N_j = max_i |a_ij|  for p = inf,
        out = gamma_j * (a_ij - mu_j) / (N_j + eps) + beta_j.

    ``norm_of="centred"`` takes N_j of ``a_ij - mu_j`` instead (for p = 2 the batch's standard deviation,
    so the layer is BN with eps outside the root): the paper's formula is ``"raw"``.

    Running estimates of mu and N (exponential moving average with ``momentum``, as BN) replace the batch
    statistics in eval mode. ``track_running_stats`` has BN's meaning, so code that switches it off on
    BatchNorm (the probes) does the same here.
    """

    def __init__(self, num_features: int, p: float, eps: float = 1e-5, momentum: float = 0.1,
                 norm_of: str = "raw"):
        super().__init__()
        if float(p) not in LP_ORDERS:
            raise ValueError(f"p must be one of 1, 2, inf; got {p!r}")
        if norm_of not in LP_NORM_OF:
            raise ValueError(f"norm_of must be one of {LP_NORM_OF}; got {norm_of!r}")
        self.num_features = num_features
        self.p = float(p)
        self.norm_of = norm_of
        self.eps = eps
        self.momentum = momentum
        self.track_running_stats = True
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_norm", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def batch_statistics(self, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-unit mean and average Lp norm of a batch."""
        dims = _reduce_dims(a.dim())
        count = a.numel() // a.shape[1]
        mean = a.mean(dims)
        measured = a if self.norm_of == "raw" else a - _unit_view(mean, a.dim())
        # ||a||_p / count^(1/p) is (mean |a|^p)^(1/p); for p = inf the divisor is count^0 = 1.
        norm = torch.linalg.vector_norm(measured, ord=self.p, dim=dims) / count ** (1.0 / self.p)
        return mean, norm

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if a.dim() not in (2, 4):
            raise ValueError(f"LpNorm expects (N, C) or (N, C, H, W) input, got shape {tuple(a.shape)}")
        if self.training:
            mean, norm = self.batch_statistics(a)
            if self.track_running_stats:
                with torch.no_grad():
                    self.running_mean.lerp_(mean, self.momentum)
                    self.running_norm.lerp_(norm, self.momentum)
                    self.num_batches_tracked += 1
        else:
            mean, norm = self.running_mean, self.running_norm
        out = (a - _unit_view(mean, a.dim())) / (_unit_view(norm, a.dim()) + self.eps)
        return out * _unit_view(self.weight, a.dim()) + _unit_view(self.bias, a.dim())

    def extra_repr(self) -> str:
        return f"{self.num_features}, p={self.p}, norm_of={self.norm_of}, eps={self.eps}, momentum={self.momentum}"


@dataclass(frozen=True)
class NoiseSpec:
    """Constants of Algorithm 1 (Appendix A); the paper's values are the defaults. ``train_only``: noise in
    training mode only (the protocol's default), or in evaluation too."""

    n_mu: float = 0.5
    n_sigma: float = 1.25
    r_mu: float = 0.1
    r_sigma: float = 0.1
    train_only: bool = True

    def __post_init__(self) -> None:
        if not (self.n_mu >= 0 and self.n_sigma >= 1 and self.r_mu >= 0 and self.r_sigma >= 0):
            raise ValueError(f"noise constants need n_mu >= 0, n_sigma >= 1, r_mu >= 0, r_sigma >= 0; got {self}")
        if not isinstance(self.train_only, bool):
            raise ValueError(f"train_only must be true or false; got {self.train_only!r}")


class NoisyNorm(nn.Module):
    """A normalisation layer followed by the time-varying, non-zero-mean, non-unit-variance noise of
    Algorithm 1 (Santurkar et al., Appendix A). In training mode, at every step, for every unit j:

        mu_j ~ U(-n_mu, n_mu),  sigma_j ~ U(1, n_sigma)                      (once per step and unit)
        m_ij ~ U(mu_j - r_mu, mu_j + r_mu),  s_ij ~ N(sigma_j, r_sigma^2)     (per element)
        out_ij = s_ij * a_ij + m_ij,   a = output of the wrapped layer (BN after gamma/beta).

    The draws are a function of (seed, layer_key, step) alone, not of a global random stream: every
    forward pass at the same step — the training pass and any number of measurement passes, in any order
    of layers — sees the same noise. The training loop sets ``step`` (``set_noise_step``). Eval mode
    adds no noise, unless ``spec.train_only`` is false: then each evaluation pass draws its own noise, a
    function of (seed, layer_key, step, how many evaluation passes this layer has run at this step), so
    the batches of one evaluation get independent noise and a resumed run evaluates with the same draws.
    """

    def __init__(self, inner: nn.Module, spec: NoiseSpec, seed: int, layer_key: int):
        super().__init__()
        self.inner = inner
        self.spec = spec
        self.seed = seed
        self.layer_key = layer_key
        self.step = 0
        self._eval_passes = (0, 0)  # (step, evaluation passes run at that step)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        if self.training:
            key = derived_seed(self.seed, "noise", self.layer_key, self.step)
        else:
            step, passes = self._eval_passes
            passes = passes if step == self.step else 0
            self._eval_passes = (self.step, passes + 1)
            key = derived_seed(self.seed, "eval noise", self.layer_key, self.step, passes)
        return self._generators[device].manual_seed(key)

    def draw(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The multiplicative and additive noise (s, m) for an activation of ``shape``: this step's in
        training mode, the next evaluation pass's in eval mode."""
        spec, gen = self.spec, self._generator(device)
        units = shape[1]
        kw = dict(generator=gen, device=device, dtype=dtype)
        mu = _unit_view(torch.rand(units, **kw) * (2 * spec.n_mu) - spec.n_mu, len(shape))
        sigma = _unit_view(torch.rand(units, **kw) * (spec.n_sigma - 1) + 1, len(shape))
        m = mu + (torch.rand(shape, **kw) * 2 - 1) * spec.r_mu
        s = sigma + torch.randn(shape, **kw) * spec.r_sigma
        return s, m

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        a = self.inner(a)
        if not self.training and self.spec.train_only:
            return a
        s, m = self.draw(a.shape, a.device, a.dtype)
        return s * a + m

    def extra_repr(self) -> str:
        return f"layer_key={self.layer_key}, {self.spec}"


def normalises(layer: nn.Module) -> bool:
    """Whether a layer made by a norm factory normalises (so a bias before it is redundant)."""
    if isinstance(layer, NoisyNorm):
        layer = layer.inner
    return not isinstance(layer, NoNorm)


def set_noise_step(model: nn.Module, step: int) -> None:
    """Key the noise of every NoisyNorm in ``model`` to training step ``step``."""
    for module in model.modules():
        if isinstance(module, NoisyNorm):
            module.step = step


def draws_left_eager(model: nn.Module) -> nn.Module:
    """``model``, made ready for ``torch.compile``: its noisy layers' draws are left to eager mode. A
    generator cannot be traced, and the step that the draws depend on would recompile the graph at every
    step, until Dynamo's limit drops the whole model back to eager. Done only for a model to be compiled, not
    as a decorator: ``torch.compiler.disable`` imports Dynamo, about 1.5 s at every start-up."""
    for module in model.modules():
        if isinstance(module, NoisyNorm):
            # A method of the module, so that a deep copy of the model draws from the copy's own state.
            module.draw = types.MethodType(torch.compiler.disable(NoisyNorm.draw), module)
    return model


def norm_factory(
    kind: str,
    *,
    p: float | None = None,
    eps: float = 1e-5,
    momentum: float = 0.1,
    noise: NoiseSpec | None = None,
    seed: int = 0,
    norm_of: str = "raw",
) -> NormFactory:
    """Return ``norm(num_features) -> nn.Module`` for one variant.

    With ``noise``, each layer is wrapped in :class:`NoisyNorm`, keyed by the order in which the model
    asks for its layers (its forward order), so the k-th norm layer draws the same noise in every run
    with the same seed.
    """
    if kind not in NORM_KINDS:
        raise ValueError(f"unknown norm kind {kind!r}; expected one of {NORM_KINDS}")
    if kind == "lp" and (p is None or float(p) not in LP_ORDERS):
        raise ValueError(f"lp normalisation needs p in {{1, 2, inf}}; got {p!r}")
    if kind == "lp" and norm_of not in LP_NORM_OF:
        raise ValueError(f"lp normalisation needs norm_of in {LP_NORM_OF}; got {norm_of!r}")
    layers_made = 0

    def make(num_features: int) -> nn.Module:
        nonlocal layers_made
        if kind == "none":
            layer: nn.Module = NoNorm(num_features)
        elif kind == "batchnorm":
            layer = BatchNorm(num_features, eps=eps, momentum=momentum)
        else:
            layer = LpNorm(num_features, p=p, eps=eps, momentum=momentum, norm_of=norm_of)
        if noise is not None:
            layer = NoisyNorm(layer, noise, seed=seed, layer_key=layers_made)
        layers_made += 1
        return layer

    return make
