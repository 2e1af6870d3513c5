"""Probes attached to the training loop (Hydra group ``probes/``).

The loop calls, at every step where ``probe.due(step)``:
    ``before_forward(step)``        before the training forward pass (the activation probe arms its hooks);
    ``after_backward(step, batch)`` between ``loss.backward()`` and ``optimizer.step()``, where ``.grad``
                                    holds this batch's gradient (ICS and landscape measure here).
Layers are addressed by semantic index, 1-based, as the paper numbers them (layer #k = k-th weight layer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from bnopt.models import ChainModel
from bnopt.probes.activations import ActivationRecorder
from bnopt.probes.ics import measure_ics
from bnopt.probes.landscape import probe_landscape
from bnopt.probes.observation import RandomState, random_state
from bnopt.seeding import derived_seed

Log = Callable[..., None]


class Probe:
    name = "probe"

    def __init__(self, every: int):
        self.every = every

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def before_forward(self, step: int) -> None:
        pass

    def after_backward(self, step: int, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        pass

    def save(self, run_dir: Path) -> None:
        """Persist what the probe keeps between measurements (called with every checkpoint)."""

    def restore(self, run_dir: Path, step: int) -> None:
        """Take back what was saved, as of a checkpoint at ``step``."""

    def close(self) -> None:
        pass


class GradientProbe(Probe):
    """A probe that measures the step's gradient: its passes replay the random state the training pass
    started from, so that anything drawn from torch's generator (dropout) draws what it drew.

    ``reuse_training_gradient``: read the gradient at W(t) from the ``.grad`` that pass left, rather than
    compute it again. Only where that pass computed as the probe's own passes do (on a CPU in full fp32,
    eager): the gradients it is compared with are computed in full fp32, eagerly and with cuDNN's
    deterministic algorithms, and a gradient from TF32 products (relative error ~1e-3), a compiled graph or
    cuDNN's default algorithms would put the difference of two numerics into ``ics/l2`` and
    ``landscape/grad_diff`` (at the DLN's smallest step size, of the size of the measurement itself)."""

    def __init__(self, model: nn.Module, every: int, reuse_training_gradient: bool = True):
        super().__init__(every)
        self.model = model
        self.reuse_training_gradient = reuse_training_gradient
        self.forward_state: RandomState | None = None

    def before_forward(self, step):
        self.forward_state = random_state(self.model)


class ICSProbe(GradientProbe):
    """``ics/l2`` and ``ics/cos`` of layers #k on the step's batch, before the optimiser step."""

    name = "ics"

    def __init__(self, model: ChainModel, loss_fn, optimizer, log: Log, layers: Sequence[int], every: int,
                 reuse_training_gradient: bool = True):
        super().__init__(model, every, reuse_training_gradient)
        self.loss_fn, self.optimizer, self.log = loss_fn, optimizer, log
        self.layers = list(layers)

    def after_backward(self, step, batch):
        results = measure_ics(self.model, self.loss_fn, batch, self.optimizer, self.model.layer_params(),
                              which=[k - 1 for k in self.layers], use_grad_fields=self.reuse_training_gradient,
                              rng_state=self.forward_state)
        for r in results:
            self.log(step, "ics/l2", r["l2"], layer=r["layer"] + 1)
            self.log(step, "ics/cos", r["cos"], layer=r["layer"] + 1)


class LandscapeProbe(GradientProbe):
    """``landscape/loss`` and ``landscape/grad_diff`` per eta, ``landscape/beta``, ``landscape/grad_norm``.
    ``direction="random"`` moves along a Gaussian direction of the gradient's norm, drawn from the run
    seed and the step (not from the global random stream)."""

    name = "landscape"

    def __init__(self, model: nn.Module, loss_fn, log: Log, etas: Sequence[float], every: int,
                 direction: str, seed: int, batched: bool | str = "auto", reuse_training_gradient: bool = True):
        super().__init__(model, every, reuse_training_gradient)
        if direction not in ("gradient", "random"):
            raise ValueError(f"landscape direction must be 'gradient' or 'random'; got {direction!r}")
        self.loss_fn, self.log = loss_fn, log
        self.etas, self.direction, self.seed, self.batched = list(etas), direction, seed, batched

    def random_direction(self, step: int) -> list[torch.Tensor]:
        """The step's Gaussian direction, before the measurement scales it to its gradient's length (which
        is not the ``.grad`` of a training pass that computed otherwise, in TF32 or compiled)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        gen = torch.Generator().manual_seed(derived_seed(self.seed, "landscape-direction", step))
        return [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]

    def after_backward(self, step, batch):
        direction = self.random_direction(step) if self.direction == "random" else None
        result = probe_landscape(self.model, self.loss_fn, batch, self.etas, direction,
                                 use_grad_fields=self.reuse_training_gradient, batched=self.batched,
                                 rng_state=self.forward_state, scale_to_gradient=True)
        for eta, loss, diff in zip(result["eta"], result["loss"], result["grad_diff"]):
            self.log(step, "landscape/loss", loss, eta=eta)
            self.log(step, "landscape/grad_diff", diff, eta=eta)
        self.log(step, "landscape/beta", result["beta"])
        self.log(step, "landscape/grad_norm", result["grad_norm"])


class ActivationProbe(Probe):
    """``act/q*``, ``act/mean``, ``act/var`` of one random unit per layer #k, from the training forward
    pass; histograms in ``activations.npz`` (arrays ``step``, ``layer``, ``unit``, ``counts``, ``edges``, ``nonfinite``)."""

    name = "activations"
    FILE = "activations.npz"

    def __init__(self, model: ChainModel, log: Log, layers: Sequence[int], every: int, seed: int,
                 quantiles: Sequence[float], bins: int):
        super().__init__(every)
        self.recorder = ActivationRecorder(model, layers, seed, quantiles, bins, log)

    def before_forward(self, step):
        self.recorder.arm(step)

    def save(self, run_dir):
        self.recorder.save(run_dir / self.FILE)

    def restore(self, run_dir, step):
        self.recorder.load(run_dir / self.FILE, before_step=step)

    @staticmethod
    def histograms_before(settings: dict, step: int) -> int:
        """How many histograms a run with these settings (``probes.activations``) recorded before ``step``:
        one per layer at each step the probe is due."""
        return len(range(0, step, settings["every"])) * len(set(settings["layers"]))

    def close(self):
        self.recorder.remove()


PROBES = {cls.name: cls for cls in (ICSProbe, LandscapeProbe, ActivationProbe)}


def build_probes(settings: dict | None, *, model: ChainModel, loss_fn, optimizer, log: Log, seed: int,
                 reuse_training_gradient: bool = True) -> list[Probe]:
    """The probes selected in ``settings`` (the resolved ``probes`` config: name -> settings);
    ``reuse_training_gradient``: see :class:`GradientProbe`."""
    probes: list[Probe] = []
    reuse = reuse_training_gradient
    for name, pc in (settings or {}).items():
        if name == "ics":
            probes.append(ICSProbe(model, loss_fn, optimizer, log, pc["layers"], pc["every"], reuse))
        elif name == "landscape":
            probes.append(LandscapeProbe(model, loss_fn, log, pc["etas"], pc["every"], pc["direction"], seed,
                                         pc["batched"], reuse))
        elif name == "activations":
            probes.append(ActivationProbe(model, log, pc["layers"], pc["every"], seed, pc["quantiles"], pc["bins"]))
        else:
            raise ValueError(f"unknown probe {name!r}; known: {sorted(PROBES)}")
    return probes
