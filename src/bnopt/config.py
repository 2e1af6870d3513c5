"""Checks of a composed config, before anything is trained.

Every problem raises :class:`ConfigError` naming the key, the value and what is allowed; ``train.py``
prints that one line and exits non-zero. :func:`check_config` needs only the config;
:func:`check_against_run` runs once the data set and model exist (batch size vs data set size, probe
layers vs the model's layers).
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Callable, Iterable, Sequence

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bnopt.data import INPUT_NORMALISATIONS
from bnopt.models import VGG_LAYOUTS
from bnopt.norms import LP_NORM_OF, NORM_KINDS

MODELS = ("vgg", "mlp", "dln")
# What each norm/*.yaml's name stands for: (kind, p, noise on), so that an override of one of its settings
# cannot go on under a name that says otherwise.
NAMED_NORMS = {
    "none": ("none", None, False), "noisy_none": ("none", None, True),
    "batchnorm": ("batchnorm", None, False), "noisy_batchnorm": ("batchnorm", None, True),
    "lp1": ("lp", 1.0, False), "lp2": ("lp", 2.0, False), "lpinf": ("lp", math.inf, False),
}
DATASETS = ("cifar10", "mnist", "fashion_mnist", "gaussian_regression")
OPTIMIZERS = ("sgd",)
SCHEDULES = ("constant", "cosine", "multistep")
# The config groups of which a run takes one config; probes/ alone composes a list (probes=[ics,landscape]).
ONE_CONFIG_GROUPS = ("experiment", "model", "data", "norm", "optim", "scale")
PROBE_KEYS = {
    "ics": {"every", "layers"},
    "landscape": {"every", "etas", "direction", "batched"},
    "activations": {"every", "layers", "quantiles", "bins"},
}


class ConfigError(ValueError):
    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={_show(value)} is not allowed: {allowed}")


def _show(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        try:  # the values, not the interpolations they come from (${scale.${model.name}.probe_every})
            return str(OmegaConf.to_container(value, resolve=True))
        except OmegaConfBaseException:
            return str(OmegaConf.to_container(value))
    return repr(value) if isinstance(value, str) else str(value)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def positive_int(v: Any) -> bool:
    return _is_int(v) and v > 0


def non_negative_int(v: Any) -> bool:
    return _is_int(v) and v >= 0


def seed_value(v: Any) -> bool:
    """What every generator a run seeds takes (torch's and numpy's take less than 2**64; the loaders add to it)."""
    return non_negative_int(v) and v < 2**63


def positive_number(v: Any) -> bool:
    return _is_number(v) and 0 < v < math.inf


def non_negative_number(v: Any) -> bool:
    return _is_number(v) and 0 <= v < math.inf


def optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def list_of(check: Callable[[Any], bool], non_empty: bool = True) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, (list, ListConfig)) and (len(v) > 0 or not non_empty) and all(map(check, v))


def one_of(*choices: Any) -> Callable[[Any], bool]:
    """One of ``choices``; a boolean choice only as a boolean (Python's ``1 == True`` would let 1 and 0.0 pass
    for true and false, and the object built from the value then fails, or takes it, further on)."""
    return lambda v: any(v == c and isinstance(v, bool) == isinstance(c, bool) for c in choices)


def _get(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(key, "<unresolvable>", f"could not be resolved ({err.__class__.__name__}: "
                                                 f"{str(err).splitlines()[0]})") from None


def require(cfg: DictConfig, key: str, check: Callable[[Any], bool], allowed: str) -> Any:
    value = _get(cfg, key)
    if not check(value):
        raise ConfigError(key, value, allowed)
    return value


def check_threads(cfg: DictConfig) -> int | None:
    """``threads``, checked; the command line reads it before anything else, to limit the job's threads."""
    return require(cfg, "threads", optional(positive_int), "null (torch's default) or a positive integer")


def check_config(cfg: DictConfig) -> None:
    """Every check that needs only the config."""
    require(cfg, "name", lambda v: isinstance(v, str) and v != "" and "/" not in v,
            "a non-empty label without '/' (it names the run directory)")
    require(cfg, "seed", seed_value, "an integer from 0 to 2**63 - 1")
    require(cfg, "device", lambda v: isinstance(v, str) and (v in ("auto", "cpu", "cuda") or
                                                             (v.startswith("cuda:") and v[5:].isdigit())),
            "auto, cpu, cuda or cuda:<index>")
    check_threads(cfg)

    model = require(cfg, "model.name", one_of(*MODELS), f"one of {', '.join(MODELS)}")
    if model == "vgg":
        require(cfg, "model.depth", one_of(*VGG_LAYOUTS), f"one of {sorted(VGG_LAYOUTS)}")
        require(cfg, "model.width", positive_number, "a positive channel multiplier, e.g. 1 or 0.125")
        require(cfg, "model.bias", one_of(True, False), "true or false")
    elif model == "mlp":
        require(cfg, "model.hidden", list_of(positive_int, non_empty=False), "a list of positive layer widths")
        require(cfg, "model.init_std", lambda v: v == "fan_in" or positive_number(v),
                "a positive standard deviation or 'fan_in'")
    else:
        require(cfg, "model.depth", positive_int, "a positive integer number of layers")
        require(cfg, "model.norm_after_last", one_of(True, False), "true or false")

    data = require(cfg, "data.name", one_of(*DATASETS), f"one of {', '.join(DATASETS)}")
    if data == "gaussian_regression":
        require(cfg, "data.n_samples", positive_int, "a positive integer")
        require(cfg, "data.dim", positive_int, "a positive integer")
        require(cfg, "data.x_std", positive_number, "a positive standard deviation (protocol: 1)")
        require(cfg, "data.a_std", positive_number, "a positive standard deviation (protocol: 1)")
        require(cfg, "data.loss_scale", positive_number, "a positive number (0.5: TensorFlow's l2_loss)")
        require(cfg, "data.seed", optional(seed_value), "null (the run seed) or an integer from 0 to 2**63 - 1")
        if model != "dln":
            raise ConfigError("model.name", model, "gaussian_regression data trains the deep linear network "
                              "(model=dln)")
        require(cfg, "data.augment", lambda v: v in (None, False), "only for image data sets: "
                "gaussian_regression has no images to crop or flip")
    else:
        require(cfg, "data.root", lambda v: isinstance(v, str) and v != "", "a directory path")
        require(cfg, "data.download", one_of(True, False), "true or false")
        require(cfg, "data.augment", one_of(True, False), "true or false")
        require(cfg, "data.normalise", one_of(*INPUT_NORMALISATIONS), f"one of {', '.join(INPUT_NORMALISATIONS)}")
        require(cfg, "data.max_train_samples", optional(positive_int), "null (all) or a positive integer")
        require(cfg, "data.max_test_samples", optional(positive_int), "null (all) or a positive integer")
        require(cfg, "data.num_classes", positive_int, "a positive integer number of classes")
        require(cfg, "data.search_paths", optional(list_of(lambda v: isinstance(v, str), non_empty=False)),
                "a list of directories")
        if model == "dln":
            raise ConfigError("data.name", data, "the deep linear network trains on gaussian_regression data")

    kind = require(cfg, "norm.kind", one_of(*NORM_KINDS), f"one of {', '.join(NORM_KINDS)}")
    if kind != "none":
        require(cfg, "norm.eps", positive_number, "a positive number")
        # 0 would leave the running statistics at their start (mean 0, variance 1) for every evaluation
        require(cfg, "norm.momentum", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
    if kind == "lp":
        require(cfg, "norm.p", lambda v: _is_number(v) and float(v) in (1.0, 2.0, math.inf), "1, 2 or inf")
        require(cfg, "norm.norm_of", one_of(*LP_NORM_OF), f"one of {', '.join(LP_NORM_OF)} (Section 3.3: raw)")
    norm_name = _get(cfg, "norm.name")
    noisy, p = _get(cfg, "norm.noise") is not None, float(_get(cfg, "norm.p")) if kind == "lp" else None
    if norm_name in NAMED_NORMS and NAMED_NORMS[norm_name] != (kind, p, noisy):
        named_kind, named_p, named_noise = NAMED_NORMS[norm_name]
        raise ConfigError("norm.name", norm_name, f"it names kind={named_kind}"
                          + (f", p={named_p:g}" if named_p else "") + f", noise {'on' if named_noise else 'off'} "
                          "(the figures and the report go by it); give these settings another norm.name")
    if _get(cfg, "norm.noise") is not None:
        require(cfg, "norm.noise.n_mu", non_negative_number, "a non-negative number (paper: 0.5)")
        require(cfg, "norm.noise.n_sigma", lambda v: _is_number(v) and 1 <= v < math.inf,
                "a number >= 1 (paper: 1.25)")
        require(cfg, "norm.noise.r_mu", non_negative_number, "a non-negative number (paper: 0.1)")
        require(cfg, "norm.noise.r_sigma", non_negative_number, "a non-negative number (paper: 0.1)")
        require(cfg, "norm.noise.train_only", one_of(True, False), "true or false")

    require(cfg, "optim.name", one_of(*OPTIMIZERS), f"one of {', '.join(OPTIMIZERS)}")
    require(cfg, "optim.lr", positive_number, "a positive learning rate")
    require(cfg, "optim.momentum", lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")
    require(cfg, "optim.weight_decay", non_negative_number, "a non-negative number")
    if require(cfg, "optim.nesterov", one_of(True, False), "true or false"):
        require(cfg, "optim.momentum", positive_number, "positive when optim.nesterov=true")
    schedule = require(cfg, "optim.schedule", one_of(*SCHEDULES), f"one of {', '.join(SCHEDULES)}")
    if schedule == "multistep":
        require(cfg, "optim.milestones", list_of(positive_int), "a non-empty list of positive steps")
        require(cfg, "optim.gamma", positive_number, "a positive factor")
    elif _get(cfg, "optim.milestones"):  # a forgotten optim.schedule=multistep would train at a constant lr
        raise ConfigError("optim.milestones", _get(cfg, "optim.milestones"),
                          f"empty with optim.schedule={schedule}: milestones take effect with optim.schedule=multistep")

    require(cfg, "train.steps", non_negative_int, "a non-negative integer number of steps")
    require(cfg, "train.batch_size", positive_int, "a positive integer")
    if kind != "none" and model != "vgg":
        require(cfg, "train.batch_size", lambda v: v >= 2, f"at least 2 with norm.kind={kind} on model={model}: "
                "one sample's batch statistics normalise every unit to 0 (a conv net has its spatial positions)")
    for key in ("log_every", "eval_every", "checkpoint_every", "eval_batch_size"):
        require(cfg, f"train.{key}", positive_int, "a positive integer")
    for key in ("channels_last", "compile", "tf32"):
        require(cfg, f"train.{key}", one_of(True, False), "true or false")
    if _get(cfg, "train.channels_last") and model != "vgg":
        raise ConfigError("train.channels_last", True, "only for conv networks (model=vgg)")

    probes = _get(cfg, "probes") or {}
    for name in probes:
        if name not in PROBE_KEYS:
            raise ConfigError(f"probes.{name}", probes[name], f"unknown probe; known: {', '.join(PROBE_KEYS)}")
        missing, unknown = PROBE_KEYS[name] - set(probes[name]), set(probes[name]) - PROBE_KEYS[name]
        if missing:
            raise ConfigError(f"probes.{name}", probes[name], f"needs {', '.join(sorted(missing))}: select it "
                              f"with probes=[{name},...] rather than setting single keys")
        if unknown:
            raise ConfigError(f"probes.{name}", probes[name], f"unknown key {', '.join(sorted(unknown))}; known: "
                              f"{', '.join(sorted(PROBE_KEYS[name]))}")
        require(cfg, f"probes.{name}.every", positive_int, "a positive integer number of steps")
    if "ics" in probes:
        require(cfg, "probes.ics.layers", list_of(positive_int), "a non-empty list of layer numbers (1-based)")
    if "landscape" in probes:
        require(cfg, "probes.landscape.etas", list_of(positive_number), "a non-empty list of positive step sizes")
        require(cfg, "probes.landscape.direction", one_of("gradient", "random"), "gradient or random")
        require(cfg, "probes.landscape.batched", one_of("auto", True, False), "auto, true or false")
    if "activations" in probes:
        if _get(cfg, "train.compile"):
            raise ConfigError("train.compile", True, "not with the activations probe, whose hooks need the "
                              "eager forward pass: drop one of them")
        require(cfg, "probes.activations.layers", list_of(positive_int), "a non-empty list of layer numbers (1-based)")
        require(cfg, "probes.activations.quantiles", list_of(lambda q: _is_number(q) and 0 <= q <= 1),
                "a non-empty list of quantiles in [0, 1]")
        require(cfg, "probes.activations.bins", positive_int, "a positive integer number of histogram bins")


def check_added_keys(cfg: DictConfig, overrides: Sequence[str], groups: Iterable[str],
                     compose: Callable[[list[str]], DictConfig]) -> None:
    """Refuse a setting that a command line's ``+key=value`` added: Hydra adds only keys the config lacks,
    and nothing reads a key the configs do not have, so the value would be ignored (``+optim.lrr=0.1``: the
    fix Hydra suggests when ``optim.lrr=0.1`` is refused). ``++key=value`` sets a key the config has and adds
    one it lacks: refused where the config that ``compose`` (overrides -> config) gives without it lacks it.
    So is ``+norm@model.norm=batchnorm`` (what Hydra suggests for ``norm@model.norm=...``): it puts a group's
    config where nothing reads it, and the run keeps its own norm. A ``+`` that adds a config group
    (``+experiment=...``) or a Hydra setting is fine; added probe settings have their own check."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    groups = {group.split("@")[0] for group in groups}  # Hydra names one placed with a package "norm@model.norm"
    checked = [o for o in parsed if o.key_or_group.split(".")[0] not in ("hydra", "probes")]
    added = [o for o in checked if o.is_add() and o.key_or_group not in groups]
    set_or_added = [o for o in checked if o.is_force_add() and o.key_or_group not in groups]
    placed = [o for o in checked if o.is_add() and o.key_or_group in groups and o.package not in (None, "", "_global_")]
    if set_or_added or placed:
        without = compose([text for text, o in zip(overrides, parsed) if o not in set_or_added + placed])
        added += [o for o in set_or_added if not _has_key(without, o.key_or_group)]
        for override in placed:
            group, package = override.key_or_group, override.package
            unread = [k for k in _leaf_keys(cfg) if f"{k}.".startswith(f"{package}.") and not _has_key(without, k)]
            if unread:
                name = override.get_value_element_as_str()
                raise ConfigError(f"{group}@{package}", name, f"it puts {group} config {name} at {package}, where "
                                  f"nothing reads its settings ({', '.join(unread)}); {group}={name} chooses "
                                  f"the run's {group}")
    for override in added:
        key = override.key_or_group
        known = [k for k in _leaf_keys(cfg) if k != key and not k.startswith(f"{key}.")]
        others = [k for k in known if not key.startswith(f"{k}.")]  # not norm.noise for norm.noise.n_mu
        last = {k: k.split(".")[-1] for k in others}
        close = difflib.get_close_matches(key, others, n=1, cutoff=0.8) or [  # optim.lrr; or lr for optim.lr
            k for k in others if last[k] in difflib.get_close_matches(key.split(".")[-1], last.values(), cutoff=0.8)]
        section = key.split(".")[0] if "." in key else None
        if close:
            hint = f"did you mean {' or '.join(close)}?"
        elif section in cfg and isinstance(cfg[section], DictConfig):
            hint = f"the settings of {section}: {', '.join(k for k in known if k.startswith(f'{section}.'))}"
        else:
            hint = f"the top-level settings: {', '.join(k for k in cfg.keys() if k != key)}"
        try:
            value = _get(cfg, key)
        except ConfigError:
            value = override.get_value_element_as_str()
        plus = "++" if override.is_force_add() else "+"
        raise ConfigError(key, value, f"no such setting (a '{plus}' adds a key that nothing reads, so it would be "
                          f"ignored); {hint}")


def _has_key(cfg: DictConfig, key: str) -> bool:
    """Whether ``key`` (dotted) is in ``cfg``, with a value or ``???``."""
    parent, _, last = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_resolution_failure=False) if parent else cfg
    if isinstance(node, DictConfig):
        return last in node.keys()
    return isinstance(node, ListConfig) and last.isdigit() and int(last) < len(node)


def check_one_config_per_group(overrides: Sequence[str]) -> None:
    """Refuse a list of configs for a group that takes one (``norm=[batchnorm,none]``): Hydra merges them,
    the later's settings over the earlier's, into one run of neither (the none norm with BatchNorm's eps,
    an MLP with VGG's depth), where a sweep over them was meant."""
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key, value = override.key_or_group, override.value()
        if key in ONE_CONFIG_GROUPS and not override.is_sweep_override() and isinstance(value, list) and len(value) > 1:
            raise ConfigError(key, override.get_value_element_as_str(),
                              f"one config per run (a list merges them into one run of neither); for a run of "
                              f"each, a sweep: -m {'+' if override.is_add() else ''}{key}={','.join(map(str, value))}")


def _leaf_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in cfg.keys():
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none():
            keys += _leaf_keys(node, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def check_against_run(cfg: DictConfig, num_layers: int, train_size: int) -> None:
    """The checks that need the built model and the loaded data set."""
    require(cfg, "train.batch_size", lambda v: v <= train_size,
            f"at most the training set size ({train_size} samples)")
    for name in ("ics", "activations"):
        key = f"probes.{name}.layers"
        if name in (_get(cfg, "probes") or {}):
            require(cfg, key, lambda layers: all(1 <= k <= num_layers for k in layers),
                    f"layer numbers between 1 and {num_layers} (this model's weight layers)")
