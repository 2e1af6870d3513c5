"""Config keys added after runs had been written without them.

A run directory records its resolved config. When a key is added later, the runs written before it lack
it; :func:`with_keys_added_later` reads them with the value that computes what they computed, wherever a
run's config is compared or grouped (the identity checks of a resumed or finished run, the sweep index, the
figures). Kept free of torch: the index script imports it.
"""

from __future__ import annotations

import copy


def with_keys_added_later(config: dict) -> dict:
    """A copy of a plain run config with every key added to the configs after runs were first written
    (2026-11-30: the protocol's [default]s as config values) set, where absent, to the value that computes
    what those runs computed. A run written before a key existed is then read as the run it is: the
    committed results are neither retrained nor refused, and group with runs written since."""
    config = copy.deepcopy(config)
    data, model, norm = (config.get(group) if isinstance(config.get(group), dict) else {}
                         for group in ("data", "model", "norm"))
    if data.get("name") == "gaussian_regression":
        data.setdefault("x_std", 1.0)
        data.setdefault("a_std", 1.0)
    elif "name" in data:
        data.setdefault("normalise", "per_channel")
    if model.get("name") == "dln":
        model.setdefault("norm_after_last", False)
    if norm.get("kind") == "lp":
        norm.setdefault("norm_of", "raw")
    if isinstance(norm.get("noise"), dict):
        norm["noise"].setdefault("train_only", True)
    return config
