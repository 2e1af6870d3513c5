"""What every measurement shares: it must observe the run and change nothing.

:func:`observation` puts a model in the measuring state — train-mode normalisation with batch statistics,
no running-statistics updates, full fp32 (no TF32), cuDNN's deterministic algorithms — and on exit restores
every module's mode and flags, the global flags, every buffer, and the global random-number state (CPU and
the model's CUDA device). Inside, :meth:`Observation.replay` rewinds the random state and any buffer (or
renormalised embedding weight) a pass may change before each forward pass, so that every pass of one
measurement sees the same random draws (dropout masks, or anything else drawn from torch's global
generator), the same module state (a spectral norm's power-iteration vectors, say) and the same inputs.

The parameters' tensors are never written by the measurements; the ICS probe's simulated optimiser step
points the parameters at copies and sets ``.grad``, and puts both back itself, with the parameters' version
counters (:func:`simulate_optimizer_step`): a graph built before measuring still backwards.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from typing import Iterator, Sequence

import torch
import torch.optim.optimizer as optimizer_module  # the global step hooks (the package hides the name)
from torch import nn


class FreeState:
    """The tensors a forward pass may change in place (through ``.data`` too, which version counters do not
    see) or by reassignment: the buffers of modules without the ``track_running_stats`` switch, and the
    weight of an embedding with ``max_norm``, which it renormalises. Saved on entry, put back where they
    differ. Compared, not copied blindly: writing an unchanged tensor would bump its version counter and
    break a graph the caller built before measuring. The paper's networks have none."""

    def __init__(self, modules: Sequence[nn.Module]):
        self._saved = [(store, name, store[name], store[name].detach().clone())
                       for m in modules for store, name in free_state(m)]

    def changed(self) -> bool:
        return any(store.get(name) is not t or not torch.equal(t, saved) for store, name, t, saved in self._saved)

    @torch.no_grad()
    def restore(self) -> None:
        for store, name, t, saved in self._saved:
            if store.get(name) is not t:
                store[name] = t
            if not torch.equal(t, saved):
                t.copy_(saved)


class KeptInputs:
    """The batch's inputs as the measurement found them. A model that writes into its input in place
    (dropout with ``inplace=True`` as its first module) would give each pass another input and hand the
    caller back another batch; the inputs are put back before each pass and on exit. Watched through their
    version counter (in-place ops bump it; NaN inputs compare unequal to themselves), copied once. Inference
    tensors have no version counter, and cannot be written outside inference mode anyway: left alone."""

    def __init__(self, inputs):
        self._inputs = inputs if torch.is_tensor(inputs) and not inputs.is_inference() else None
        if self._inputs is not None:
            self._version, self._saved = inputs._version, inputs.detach().clone()

    def changed(self) -> bool:
        return self._inputs is not None and self._inputs._version != self._version

    @torch.no_grad()
    def restore(self) -> None:
        if self.changed():
            self._inputs.copy_(self._saved)
            self._version = self._inputs._version


def has_switch(module: nn.Module) -> bool:
    """Whether ``module`` has the ``track_running_stats`` switch (BN, Lp), which, once off, leaves its
    buffers alone. Instance norm has the attribute but not the switch: it hands its running statistics to
    ``F.instance_norm``, which updates them, whatever the flag says. (Found with ``vars``: a failed
    ``hasattr`` costs microseconds, which adds up for small models; a switch defined some other way only
    sends its module down the save-and-restore path.)"""
    return "track_running_stats" in vars(module) and not isinstance(module, nn.modules.instancenorm._InstanceNorm)


def free_state(module: nn.Module) -> list[tuple[dict, str]]:
    """Where ``module`` keeps tensors of its own that a forward pass may change, as (its ``_buffers`` or
    ``_parameters``, name): every buffer, without the switch; an embedding's weight, with ``max_norm``."""
    places = ([] if not module._buffers or has_switch(module)
              else [(module._buffers, name) for name, b in module._buffers.items() if b is not None])
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.max_norm is not None:
        places.append((module._parameters, "weight"))
    return places


RandomState = tuple[torch.Tensor, list[torch.Tensor]]


def random_state(model: nn.Module) -> RandomState:
    """torch's global random state now, for the CPU and ``model``'s CUDA devices: what a measurement's
    passes start from (``rng_state=``). Take it just before the training forward pass whose ``.grad`` a
    measurement reads (``use_grad_fields=True``), so that a model drawing from the global generator
    (dropout) draws the same masks in the measurement's passes as in that pass."""
    return _position(_cuda_devices(model))


def _position(devices: list[int]) -> RandomState:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


class Observation:
    def __init__(self, devices: list[int], free: FreeState, inputs: KeptInputs, start: RandomState | None):
        self._devices = devices
        self._free, self._inputs = free, inputs
        self._start = self.position() if start is None else start
        if len(self._start[1]) != len(devices):
            raise ValueError(f"rng_state holds the random state of {len(self._start[1])} CUDA devices, the "
                             f"model is on {len(devices)}: take it with bnopt.probes.random_state(model)")

    def position(self) -> RandomState:
        """The global random state now (CPU and the model's CUDA devices)."""
        return _position(self._devices)

    def rewind(self, position: RandomState) -> None:
        """Set the global random state back to ``position``."""
        cpu, cuda = position
        torch.set_rng_state(cpu)
        for device, state in zip(self._devices, cuda):
            torch.cuda.set_rng_state(state, device)

    def replay(self) -> None:
        """Rewind the global random state, the free state and the inputs to where the measurement started."""
        self.rewind(self._start)
        self._free.restore()
        self._inputs.restore()

    def drawn_since_start(self) -> bool:
        """Whether the global generator has moved from where every pass starts. Asked after the pass behind the
        measurement's gradient (its own pass, or the training pass ``rng_state`` was taken before, when it
        reads ``.grad``), it tells whether the model draws random numbers (dropout)."""
        (cpu, cuda), (start_cpu, start_cuda) = self.position(), self._start
        return not torch.equal(cpu, start_cpu) or any(not torch.equal(a, b) for a, b in zip(cuda, start_cuda))

    def free_state_changed(self) -> bool:
        """Whether a pass since the last :meth:`replay` changed a tensor of :class:`FreeState`, or the inputs."""
        return self._free.changed() or self._inputs.changed()


def _cuda_devices(model: nn.Module) -> list[int]:
    if not torch.cuda.is_initialized():  # no tensor can be on a GPU yet; skips walking every tensor
        return []
    return sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.is_cuda})


@contextlib.contextmanager
def observation(model: nn.Module, batch, *, rng_state: RandomState | None = None) -> Iterator[Observation]:
    """The measuring state for the block, on ``batch``; every pass replays from ``rng_state`` (default: the
    state now)."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(f"batch must be a pair (inputs, targets), which the probes pass on as "
                         f"loss_fn(model(inputs), targets); got a {type(batch).__name__}"
                         + (f" of {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    if torch.is_inference_mode_enabled():
        # enable_grad cannot lift inference mode, and autograd's own error ("element 0 of tensors does not
        # require grad") would not say why.
        raise RuntimeError("the probes differentiate the loss, which torch.inference_mode() forbids; "
                           "call them outside it (torch.no_grad() is fine)")
    modules = list(model.modules())
    # Only modules not already training are switched (and back): setting a module attribute goes through
    # Module.__setattr__, microseconds each, and between backward and step every module is training anyway.
    in_eval = [m for m in modules if not m.training]
    # Modules with the switch (BN, Lp) leave their buffers alone once it is off; any other module's
    # buffers are saved and put back, whatever it does with them (and so is what an embedding renormalises).
    tracking = {m: m.track_running_stats for m in modules if has_switch(m)}
    free, inputs = FreeState(modules), KeptInputs(batch[0])
    devices = _cuda_devices(model)
    cudnn = torch.backends.cudnn
    with torch.random.fork_rng(devices=devices), float32_settings_restored():
        try:
            # Measurements in full fp32, whatever the training run allows (TF32 on a GPU; bf16 matmuls on a
            # CPU with AMX under "medium" precision), and with cuDNN's deterministic algorithms: some of the
            # others sum with atomics, so that two passes at the same weights could differ in the last bits,
            # and G' with nothing moved would not be G.
            torch.set_float32_matmul_precision("highest")
            cudnn.allow_tf32, cudnn.deterministic = False, True
            for m in in_eval:
                m.training = True
            for m in tracking:
                m.track_running_stats = False
            with torch.enable_grad():
                yield Observation(devices, free, inputs, rng_state)
        finally:
            for m in in_eval:
                m.training = False
            for m, flag in tracking.items():
                m.track_running_stats = flag
            free.restore()
            inputs.restore()


@contextlib.contextmanager
def float32_settings_restored() -> Iterator[None]:
    """torch's float32 matmul precision and cuDNN's TF32 and determinism flags, put back on exit. The
    precision goes back through ``set_float32_matmul_precision``: restoring it through the legacy
    ``allow_tf32`` flag would leave newer torch unable to report it ("mix of the legacy and new APIs"),
    and would not restore the CPU's bf16 setting. A precision that is already unreadable for that reason
    goes back through the legacy flag, as it came."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    try:
        precision = torch.get_float32_matmul_precision()
    except RuntimeError:
        precision = None
    flags = matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic
    try:
        yield
    finally:
        if precision is None:
            matmul.allow_tf32 = flags[0]
        else:
            torch.set_float32_matmul_precision(precision)
        cudnn.allow_tf32, cudnn.deterministic = flags[1:]


@contextlib.contextmanager
def parameters_at(values: dict[nn.Parameter, torch.Tensor]) -> Iterator[None]:
    """Point parameters at other values for the duration of the block, and back on exit.

    No copy is made: each parameter's ``.data`` is swapped, so the model computes exactly as it would
    with those values loaded, gradients w.r.t. the parameters are gradients at those values, and the
    original tensors (which the optimiser holds) are untouched. Much cheaper than ``functional_call``
    for small models, where re-parametrising every parameter dominates a forward pass.
    """
    saved = [(p, p.data) for p in values]
    try:
        for p, value in values.items():
            p.data = value
        yield
    finally:
        for p, data in saved:
            p.data = data


def loss_at(model: nn.Module, loss_fn, batch, obs: Observation) -> torch.Tensor:
    """The training loss on ``batch`` (with the random state rewound, as for every pass)."""
    inputs, targets = batch
    obs.replay()
    loss = loss_fn(model(inputs), targets)
    if not (torch.is_tensor(loss) and loss.numel() == 1):  # torch's own words (a float "is not iterable") hide it
        got = f"a tensor of shape {tuple(loss.shape)}" if torch.is_tensor(loss) else f"a {type(loss).__name__}"
        raise TypeError("loss_fn(model(inputs), targets) must return the loss as a one-element tensor, which the "
                        f"probes differentiate; got {got}")
    return loss


def current_gradient(model, loss_fn, batch, obs: Observation, params: Sequence[nn.Parameter],
                     use_grad_fields: bool, inspect_loss=None) -> list[torch.Tensor | None]:
    """The gradient of the loss on ``batch`` at the current weights w.r.t. ``params``: computed here, or
    read from the ``.grad`` fields left by the caller's ``loss.backward()`` on the same batch. None for a
    parameter the loss does not reach, as ``backward`` leaves it, so that the simulated ``step()`` skips it
    as the real one does (:func:`zeros_where_missing` gives the gradient's value). ``inspect_loss`` sees the
    loss, and its graph, before the backward (where the gradient is computed here)."""
    if use_grad_fields:
        grads = [None if p.grad is None else p.grad.detach() for p in params]
        if all(g is None for g in grads):
            raise ValueError("use_grad_fields=True but no parameter has a .grad; "
                             "call loss.backward() on this batch first, or let the probe compute it")
        return grads
    loss = loss_at(model, loss_fn, batch, obs)
    if inspect_loss is not None:
        inspect_loss(loss)
    return list(torch.autograd.grad(loss, params, allow_unused=True))


def zeros_where_missing(grads: Sequence[torch.Tensor | None], params: Sequence[nn.Parameter]) -> list[torch.Tensor]:
    """The gradient's value: zero for a parameter the loss does not reach."""
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def dense(t: torch.Tensor) -> torch.Tensor:
    """A gradient with its values laid out in full (an embedding with ``sparse=True`` gives sparse ones, which
    older torch cannot take a norm of)."""
    return t if t.layout == torch.strided else t.to_dense()


def _saved(entries: dict) -> dict:
    """Each entry's object and a copy of what it holds now, for :func:`_put_back`."""
    return {k: (v, v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v)) for k, v in entries.items()}


def _put_back(entries: dict, saved: dict, keep: str | None = None) -> None:
    """Make ``entries`` (an optimiser's state for one parameter, or a parameter group) what it was when
    :func:`_saved` saw it: keys added since are dropped (an optimiser counting its steps in the group, say),
    and tensors go back as the same objects, refilled, since the optimiser or the user may hold them (a
    tensor learning rate). Other values go back as their copies. ``keep`` names a key left alone."""
    for k in set(entries) - set(saved) - {keep}:
        del entries[k]
    for k, (value, copied) in saved.items():
        if torch.is_tensor(value) and value.shape == copied.shape and value.dtype == copied.dtype:
            value.copy_(copied)
            entries[k] = value
        else:
            entries[k] = copied


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Every parameter the optimiser steps, group by group."""
    return [p for group in optimizer.param_groups for p in group["params"]]


@contextlib.contextmanager
def step_hooks_suspended(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """No step hooks run in the block, the optimiser's own or the global ones, and a learning-rate
    scheduler's record that ``step()`` was called is put back: hooks may keep state of their own (an
    average of the weights, a step count) that a simulated step must not touch and cannot put back."""
    saved = (optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks,
             optimizer_module._global_optimizer_pre_hooks, optimizer_module._global_optimizer_post_hooks)
    called = vars(optimizer).get("_opt_called", None)
    optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks = OrderedDict(), OrderedDict()
    optimizer_module._global_optimizer_pre_hooks = OrderedDict()
    optimizer_module._global_optimizer_post_hooks = OrderedDict()
    try:
        yield
    finally:
        (optimizer._optimizer_step_pre_hooks, optimizer._optimizer_step_post_hooks,
         optimizer_module._global_optimizer_pre_hooks, optimizer_module._global_optimizer_post_hooks) = saved
        if called is None:
            vars(optimizer).pop("_opt_called", None)
        else:
            optimizer._opt_called = called


@torch.no_grad()
def simulate_optimizer_step(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter],
                            grads: Sequence[torch.Tensor | None]) -> dict[nn.Parameter, torch.Tensor]:
    """The values ``optimizer.step()`` would give ``params`` from gradients ``grads`` (None: no gradient,
    the parameter is skipped): the real step runs (momentum, weight decay, Adam's moments, any torch
    optimiser that steps without a closure) on copies of the parameters, then ``.grad`` fields, optimiser
    state and hyper-parameters are put back exactly. The parameters' own tensors are never written. Step
    hooks do not run (:func:`step_hooks_suspended`): W(t+1) is what ``step()`` itself computes."""
    owned = optimizer_parameters(optimizer)
    saved_versions = [p._version for p in owned]
    saved_data = [p.data for p in owned]
    saved_grads = [p.grad for p in owned]
    saved_state = {p: _saved(s) for p, s in optimizer.state.items()}
    saved_groups = [_saved({k: v for k, v in g.items() if k != "params"}) for g in optimizer.param_groups]
    given = dict(zip(params, grads))
    try:
        for p in owned:
            p.data = p.data.clone()  # what the step writes into
            # A copy: some optimisers modify .grad in place; parameters without a gradient do not move.
            p.grad = None if given.get(p) is None else given[p].detach().clone()
        with step_hooks_suspended(optimizer):
            optimizer.step()
        return {p: p.detach() for p in params}
    finally:
        for p, data, grad in zip(owned, saved_data, saved_grads):
            p.data = data
            p.grad = grad
        # The step's in-place ops went into the copies but counted on the parameters' version counters, which
        # would make a graph the caller built before measuring refuse to backward. The values those versions
        # stand for were never written, so the counters go back too.
        torch._C._autograd._unsafe_set_version_counter(tuple(owned), tuple(saved_versions))
        for p in list(optimizer.state):
            if p not in saved_state:
                del optimizer.state[p]
        for p, state in saved_state.items():
            _put_back(optimizer.state[p], state)
        for group, saved in zip(optimizer.param_groups, saved_groups):
            _put_back(group, saved, keep="params")


def per_tensor_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The norm of each tensor, in float64, stacked into one vector (one foreach op, not one per tensor).
    Float64 because a float32 gradient's squares overflow long before its entries do: a norm above about
    1.8e19 would read inf."""
    return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=torch.float64))
