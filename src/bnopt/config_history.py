"""How stored configs compare: the keys that are no part of a run's identity, and config keys added after
runs had been written without them.

A run directory records its resolved config. When a key is added later, the runs written before it lack
it; :func:`with_keys_added_later` reads them with the value that computes what they computed, wherever a
run's config is compared or grouped (the identity checks of a resumed or finished run, the sweep index, the
figures). Kept free of torch: the index script imports it.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

# Keys that label or place a run without changing what it computes: a checkpoint written under another name,
# thread count, device or data location is the same run (two figures' sweeps reach one run under different
# names; a requeued job may land on another GPU, or on a node that keeps the data elsewhere, without internet).
NOT_IDENTITY = ("name", "threads", "device", "data.root", "data.download", "data.search_paths")


def _at(config: dict, dotted: str) -> Any:
    """The value at ``dotted`` in a plain config, or None where any part of the path is missing."""
    for part in dotted.split("."):
        if not isinstance(config, dict):
            return None
        config = config.get(part)
    return config


# Each key added on 2026-11-30 (the protocol's [default]s as config values): the value that computes what
# runs written before it computed, which is the protocol's, and which configs have the key.
KEYS_ADDED_LATER: dict[str, tuple[Any, Callable[[dict], bool]]] = {
    "data.normalise": ("per_channel", lambda c: _at(c, "data.name") not in (None, "gaussian_regression")),
    "data.x_std": (1.0, lambda c: _at(c, "data.name") == "gaussian_regression"),
    "data.a_std": (1.0, lambda c: _at(c, "data.name") == "gaussian_regression"),
    "model.norm_after_last": (False, lambda c: _at(c, "model.name") == "dln"),
    "norm.norm_of": ("raw", lambda c: _at(c, "norm.kind") == "lp"),
    "norm.noise.train_only": (True, lambda c: isinstance(_at(c, "norm.noise"), dict)),
}


def with_keys_added_later(config: dict) -> dict:
    """A copy of a plain run config with every key of :data:`KEYS_ADDED_LATER` that applies to it set, where
    absent, to the value that computes what runs written before the key computed. Such a run is then read as
    the run it is: the committed results are neither retrained nor refused, and group with runs written since."""
    config = copy.deepcopy(config)
    for key, (value, applies) in KEYS_ADDED_LATER.items():
        if applies(config):
            *parents, leaf = key.split(".")
            _at(config, ".".join(parents)).setdefault(leaf, value)
    return config
