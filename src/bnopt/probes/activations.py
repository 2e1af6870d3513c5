"""Activation distributions (protocol 5.3; Figs. 1c, 2, 7, 8, 14 and Ioffe & Szegedy Fig. 1b/c).

For each chosen layer #k, one unit is picked at random (fixed by the run seed and k), and at measurement
steps its input to the non-linearity — the output of the layer's norm module, noise included for noisy
BN, or of the weight layer where the block has no norm — is summarised over the batch (and the spatial
positions of a conv layer): quantiles, mean, variance, and a histogram. Forward hooks collect it during
the training forward pass itself, so it costs no extra pass; each hook records the first pass of an armed
step only, so measurement passes of other probes are never mistaken for training. Values that are NaN or
inf (a run about to diverge: the hooks see the forward pass before its loss is checked) enter the
statistics as they are and are counted beside the histogram, which spans the finite ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from bnopt.durable import write_durably
from bnopt.models import ChainModel
from bnopt.seeding import derived_seed

Log = Callable[..., None]


def quantile_name(q: float) -> str:
    """Metric name of a quantile: 0.15 -> "act/q15", 0.5 -> "act/q50"."""
    return f"act/q{q * 100:g}"


def unit_of(layer: int, num_units: int, seed: int) -> int:
    """The randomly chosen unit of layer #``layer``: a function of (seed, layer) only."""
    gen = torch.Generator().manual_seed(derived_seed(seed, "activation-unit", layer))
    return int(torch.randint(num_units, (1,), generator=gen))


def histogram_steps(path: Path) -> np.ndarray:
    """The step of each histogram in ``path`` (an ``activations.npz``); none if there is no such file."""
    if not path.exists():
        return np.zeros(0, dtype=np.int64)
    with np.load(path) as saved:
        return saved["step"]


class ActivationRecorder:
    """Hooks that record one unit per layer at armed steps; histograms kept for ``activations.npz``."""

    def __init__(self, model: ChainModel, layers: Sequence[int], seed: int, quantiles: Sequence[float],
                 bins: int, log: Log):
        self.quantiles = list(quantiles)
        self.bins = bins
        self.log = log
        self.step = 0
        self.armed: set[int] = set()
        self.units: dict[int, int] = {}
        self.records: list[dict] = []  # one per (step, layer): the histogram and the non-finite count
        self._hooks = []
        for k in layers:
            block = model.layer(k)
            num_units = getattr(block.weight, "out_channels", None) or block.weight.out_features
            self.units[k] = unit_of(k, num_units, seed)
            observed = block.norm if block.norm is not None else block.weight
            self._hooks.append(observed.register_forward_hook(self._hook(k)))

    def arm(self, step: int) -> None:
        """Record the next forward pass of every layer, as step ``step``."""
        self.step = step
        self.armed = set(self.units)

    def _hook(self, layer: int):
        def record(module, inputs, output):
            if layer not in self.armed:
                return
            self.armed.discard(layer)
            self._summarise(layer, output.detach()[:, self.units[layer]])

        return record

    def _summarise(self, layer: int, unit_values: torch.Tensor) -> None:
        values = unit_values.flatten().to("cpu", torch.float64)
        qs = torch.quantile(values, torch.tensor(self.quantiles, dtype=torch.float64))
        for q, value in zip(self.quantiles, qs.tolist()):
            self.log(self.step, quantile_name(q), value, layer=layer)
        self.log(self.step, "act/mean", float(values.mean()), layer=layer)
        self.log(self.step, "act/var", float(values.var(unbiased=False)), layer=layer)
        # The histogram spans the finite values (NumPy cannot bin an infinite range) and the rest are
        # counted: a run on its way to diverging must not crash here before its loss is checked.
        finite = values[torch.isfinite(values)].numpy()
        if finite.size:
            counts, edges = histogram(finite, self.bins)
        else:
            counts, edges = np.zeros(self.bins, dtype=np.int64), np.full(self.bins + 1, np.nan)
        self.records.append({"step": self.step, "layer": layer, "counts": counts, "edges": edges,
                             "nonfinite": values.numel() - finite.size})

    def save(self, path: Path) -> None:
        """Write all histograms so far to ``path`` (npz), atomically."""
        arrays = dict(
            step=np.array([r["step"] for r in self.records], dtype=np.int64),
            layer=np.array([r["layer"] for r in self.records], dtype=np.int64),
            unit=np.array([self.units[r["layer"]] for r in self.records], dtype=np.int64),
            counts=np.array([r["counts"] for r in self.records], dtype=np.int64).reshape(-1, self.bins),
            edges=np.array([r["edges"] for r in self.records], dtype=np.float64).reshape(-1, self.bins + 1),
            nonfinite=np.array([r["nonfinite"] for r in self.records], dtype=np.int64),
        )
        tmp = path.with_name(path.stem + ".tmp.npz")  # numpy adds ".npz" to a name that does not end with it
        write_durably(path, lambda file: np.savez_compressed(file, **arrays), tmp=tmp)

    def load(self, path: Path, before_step: int) -> None:
        """Take back the histograms of an interrupted run, those of steps before ``before_step``."""
        if not path.exists():
            return
        with np.load(path) as saved:
            # files written before non-finite values were counted have no such array: they had none
            nonfinite = saved["nonfinite"] if "nonfinite" in saved.files else np.zeros(len(saved["step"]), np.int64)
            self.records = [
                {"step": int(s), "layer": int(k), "counts": c, "edges": e, "nonfinite": int(n)}
                for s, k, c, e, n in zip(saved["step"], saved["layer"], saved["counts"], saved["edges"], nonfinite)
                if s < before_step
            ]

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def histogram(values: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.histogram(values, bins)``, also where the values span too few float64 numbers for ``bins``
    distinct edges: a constant unit far from 0 (the bias behind a dead ReLU layer of a diverging network,
    7.9e19, where NumPy's ±0.5 widening of a zero range rounds away), on which NumPy raises (a ValueError
    from 1.25, an IndexError before). Those get ``bins`` cells two float spacings wide (or wider, to span
    the values), centred on them."""
    try:
        edges = np.histogram_bin_edges(values, bins=bins)
    except ValueError:
        edges = None
    if edges is not None and (np.diff(edges) > 0).all():
        return np.histogram(values, bins=bins)
    low, high = values.min(), values.max()
    step = max(2 * np.spacing(max(abs(low), abs(high))), (high - low) / bins)
    return np.histogram(values, bins=(low + high) / 2 + step * (np.arange(bins + 1) - bins / 2))
