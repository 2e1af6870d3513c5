"""What every measurement shares: it must observe the run and change nothing.

:func:`observation` puts a model in the measuring state — train-mode normalisation with batch statistics,
no running-statistics updates, full fp32 (no TF32), cuDNN's deterministic algorithms — and on exit restores
every module's mode and flags, the global flags, every buffer, and the global random-number state (CPU and
the model's CUDA device). Inside,
:meth:`Observation.replay` rewinds the random state and any buffer a pass may change before each forward pass,
so that every pass of one measurement sees the same random draws (dropout masks, or anything else drawn
from torch's global generator) and the same module state (a spectral norm's power-iteration vectors, say).

The parameters' tensors are never written by the measurements; the ICS probe's simulated optimiser step
points the parameters at copies and sets ``.grad``, and puts both back itself, with the parameters' version
counters (:func:`simulate_optimizer_step`): a graph built before measuring still backwards.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Sequence

import torch
from torch import nn


class FreeBuffers:
    """The buffers of modules without the ``track_running_stats`` switch, which a forward pass may change
    in place (through ``.data`` too, which version counters do not see) or by reassignment: saved on
    entry, put back where they differ. Compared, not copied blindly: writing an unchanged buffer would bump
    its version counter and break a graph the caller built before measuring. The paper's networks have none."""

    def __init__(self, modules: Sequence[nn.Module]):
        self._saved = [(m, name, b, b.detach().clone())
                       for m in modules if has_free_buffers(m) for name, b in m._buffers.items() if b is not None]

    def changed(self) -> bool:
        return any(m._buffers.get(name) is not b or not torch.equal(b, saved) for m, name, b, saved in self._saved)

    @torch.no_grad()
    def restore(self) -> None:
        for m, name, b, saved in self._saved:
            if m._buffers.get(name) is not b:
                m._buffers[name] = b
            if not torch.equal(b, saved):
                b.copy_(saved)


def has_switch(module: nn.Module) -> bool:
    """Whether ``module`` has the ``track_running_stats`` switch (BN, Lp), which, once off, leaves its
    buffers alone. (Found with ``vars``: a failed ``hasattr`` costs microseconds, which adds up for small
    models; a switch defined some other way only sends its module down the save-and-restore path.)"""
    return "track_running_stats" in vars(module)


def has_free_buffers(module: nn.Module) -> bool:
    """Whether ``module`` has buffers of its own that a forward pass may change: any, without the switch."""
    return bool(module._buffers) and not has_switch(module)


class Observation:
    def __init__(self, devices: list[int], buffers: FreeBuffers):
        self._devices = devices
        self._buffers = buffers
        self._start = self.position()

    def position(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The global random state now (CPU and the model's CUDA devices)."""
        return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in self._devices]

    def rewind(self, position: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
        """Set the global random state back to ``position``."""
        cpu, cuda = position
        torch.set_rng_state(cpu)
        for device, state in zip(self._devices, cuda):
            torch.cuda.set_rng_state(state, device)

    def replay(self) -> None:
        """Rewind the global random state and the free buffers to where the measurement started."""
        self.rewind(self._start)
        self._buffers.restore()

    def buffers_changed(self) -> bool:
        """Whether a pass since the last :meth:`replay` changed a buffer."""
        return self._buffers.changed()


def _cuda_devices(model: nn.Module) -> list[int]:
    if not torch.cuda.is_initialized():  # no tensor can be on a GPU yet; skips walking every tensor
        return []
    return sorted({t.device.index or 0 for t in [*model.parameters(), *model.buffers()] if t.is_cuda})


@contextlib.contextmanager
def observation(model: nn.Module) -> Iterator[Observation]:
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
    # buffers are saved and put back, whatever it does with them.
    tracking = {m: m.track_running_stats for m in modules if has_switch(m)}
    buffers = FreeBuffers(modules)
    devices = _cuda_devices(model)
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    flags = (matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic)
    with torch.random.fork_rng(devices=devices):
        try:
            # Measurements in full fp32, whatever the training run allows, and with cuDNN's deterministic
            # algorithms: some of the others sum with atomics, so that two passes at the same weights could
            # differ in the last bits, and G' with nothing moved would not be G.
            matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic = False, False, True
            for m in in_eval:
                m.training = True
            for m in tracking:
                m.track_running_stats = False
            with torch.enable_grad():
                yield Observation(devices, buffers)
        finally:
            matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic = flags
            for m in in_eval:
                m.training = False
            for m, flag in tracking.items():
                m.track_running_stats = flag
            buffers.restore()


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
    return loss_fn(model(inputs), targets)


def current_gradient(model, loss_fn, batch, obs: Observation, params: Sequence[nn.Parameter],
                     use_grad_fields: bool) -> list[torch.Tensor]:
    """The gradient of the loss on ``batch`` at the current weights w.r.t. ``params``: computed here, or
    read from the ``.grad`` fields left by the caller's ``loss.backward()`` on the same batch."""
    if use_grad_fields:
        missing = [i for i, p in enumerate(params) if p.grad is None]
        if missing:
            raise ValueError(f"use_grad_fields=True but {len(missing)} parameters have no .grad; "
                             "call loss.backward() on this batch first, or let the probe compute it")
        return [p.grad.detach() for p in params]
    return list(torch.autograd.grad(loss_at(model, loss_fn, batch, obs), params, allow_unused=True,
                                    materialize_grads=True))


def _snapshot(value):
    return value.detach().clone() if torch.is_tensor(value) else copy.deepcopy(value)


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Every parameter the optimiser steps, group by group."""
    return [p for group in optimizer.param_groups for p in group["params"]]


@torch.no_grad()
def simulate_optimizer_step(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter],
                            grads: Sequence[torch.Tensor]) -> dict[nn.Parameter, torch.Tensor]:
    """The values ``optimizer.step()`` would give ``params`` from gradients ``grads``: the real step runs
    (momentum, weight decay, Adam's moments, any torch optimiser that steps without a closure) on copies
    of the parameters, then ``.grad`` fields, optimiser state and hyper-parameters are put back exactly.
    The parameters' own tensors are never written."""
    owned = optimizer_parameters(optimizer)
    saved_versions = [p._version for p in owned]
    saved_data = [p.data for p in owned]
    saved_grads = [p.grad for p in owned]
    saved_state = {p: {k: _snapshot(v) for k, v in s.items()} for p, s in optimizer.state.items()}
    saved_groups = [{k: _snapshot(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    given = dict(zip(params, grads))
    try:
        for p in owned:
            p.data = p.data.clone()  # what the step writes into
            # A copy: some optimisers modify .grad in place; parameters without a gradient do not move.
            p.grad = given[p].detach().clone() if p in given else None
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
            current = optimizer.state[p]
            for k in set(current) - set(state):
                del current[k]
            for k, v in state.items():
                if torch.is_tensor(v) and torch.is_tensor(current.get(k)) and current[k].shape == v.shape:
                    current[k].copy_(v)  # keep the tensor objects the optimiser holds
                else:
                    current[k] = v
        for group, saved in zip(optimizer.param_groups, saved_groups):
            group.update(saved)


def per_tensor_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The norm of each tensor, stacked into one vector (one foreach op, not one per tensor)."""
    return torch.stack(torch._foreach_norm(list(tensors)))
