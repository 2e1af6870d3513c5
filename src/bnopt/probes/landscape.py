"""The loss landscape along the gradient (protocol 5.2; Figs. 4, 9, 10, 11, 12 of Santurkar et al.).

At weights w with batch gradient g and a direction d (g unless given), for each step size eta_k:
    loss[k]      = L(w - eta_k d)
    grad_diff[k] = ||g - grad L(w - eta_k d)||_2                 ("gradient predictiveness")
    beta         = max_k grad_diff[k] / ||eta_k d||_2             ("effective beta-smoothness")
all on the same batch, with train-mode normalisation on batch statistics.

The E evaluations run one after another, or batched with ``torch.func.vmap`` (``batched=True``). Which
is faster depends on the model and device (measured by ``scripts/benchmark.py``, ratios in the README):
on a CPU with two threads the batched form pays for the deep linear network, is about even for the MLP
(either way round between torch versions) and loses for VGG; on one thread, as the recipes' jobs run, it
loses for all three. On a GPU (an H200) it pays for the MLP and the DLN and loses for VGG. So
``batched="auto"`` picks it for the repo's own conv-free chains (:class:`~bnopt.models.ChainModel`) on
CUDA, and on CPU with more than one thread, taking ``loss_fn`` to read the parameters only through the
model's output (as the repo's losses do); any other model takes the loop, which is exact for any model.
``vmap`` sees the parameters only inside the model's forward (``functional_call``), so a ``loss_fn`` that
reads them (a weight penalty), hooks on parameters, or weights reached outside the module tree (a Python
list) would give other numbers, and ``torch.func`` cannot run every model (an ``autograd.Function``
without ``setup_context``, control flow on values). ``batched=True`` is the caller's word that the model
is fit for it; a model it cannot be (one that draws from torch's global generator, whose draws under
``vmap`` can differ from a plain pass's; a module registered under two names, which ``functional_call``
left broken; hooks on parameters) is refused. The two agree to float rounding, not bit for bit.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from bnopt.models import is_plain_chain
from bnopt.probes.observation import (
    RandomState, current_gradient, dense, free_state, loss_at, observation, parameters_at, per_tensor_norms,
    zeros_where_missing,
)


def probe_landscape(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor],
    etas: Sequence[float],
    direction: Sequence[torch.Tensor] | None = None,
    *,
    use_grad_fields: bool = False,
    batched: bool | str = "auto",
    rng_state: RandomState | None = None,
    scale_to_gradient: bool = False,
) -> dict:
    """Loss, gradient predictiveness and effective beta along ``-direction`` (default: the gradient).

    ``direction`` is one tensor per parameter with ``requires_grad``, in ``model.parameters()`` order;
    with ``scale_to_gradient=True`` it is taken at the length of g, the gradient this call measures (a
    random direction of the gradient's norm).
    With ``use_grad_fields=True`` the gradient g is read from ``.grad`` (as left by ``loss.backward()`` on
    this batch) instead of being computed; ``rng_state`` as for :func:`bnopt.probes.measure_ics`. A pure
    observation, like :func:`bnopt.probes.measure_ics`.

    Returns ``{"eta": [...], "loss": [...], "grad_diff": [...], "beta": float, "grad_norm": float}``.
    """
    etas = [float(e) for e in etas]
    if not etas or any(not 0 < e < math.inf for e in etas):
        raise ValueError(f"etas must be a non-empty list of positive, finite step sizes; got {etas}")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True: there is no gradient to probe along")
    if direction is not None:
        direction = list(direction)  # a dict gives its keys: refused below, as not tensors
        shapes_match = len(direction) == len(params) and all(
            torch.is_tensor(d) and d.shape == p.shape for d, p in zip(direction, params))
        if not shapes_match:
            raise ValueError("direction must hold one tensor per trainable parameter, shaped like it, "
                             "in model.parameters() order")
        # In the parameters' dtype: a direction built with numpy comes as float64.
        direction = [d.detach().to(dtype=p.dtype, device=p.device) for d, p in zip(direction, params)]
    with observation(model, batch, rng_state=rng_state) as obs:
        # Dense: the step sizes' gradients are compared with it (and a sparse optimiser is not stepped here).
        g = [dense(t) for t in zeros_where_missing(current_gradient(model, loss_fn, batch, obs, params,
                                                                    use_grad_fields), params)]
        draws = obs.drawn_since_start()
        if batched == "auto":
            batched = vmap_pays(model) and _unbatchable(model, params, draws) is None
        elif batched:
            reason = _unbatchable(model, params, draws)
            if reason:
                raise ValueError(f"batched=True, but {reason}: use batched=False, or 'auto'")
        if direction is not None and scale_to_gradient:
            direction = _scaled_to(direction, g)
        d = g if direction is None else direction
        evaluate = _evaluate_batched if batched else _evaluate_loop
        losses, diff_norms = evaluate(model, loss_fn, batch, obs, named, g, d, etas)
    grad_diff = _combined_norms(diff_norms)
    norms = _combined_norms(torch.stack([per_tensor_norms(v) for v in ([g] if direction is None else [g, d])]))
    grad_norm, d_norm = norms[0], norms[-1]
    beta = _effective_beta(grad_diff, etas, d_norm)
    return {"eta": etas, "loss": losses, "grad_diff": grad_diff, "beta": beta, "grad_norm": grad_norm}


def _scaled_to(direction: list[torch.Tensor], g: list[torch.Tensor]) -> list[torch.Tensor]:
    """``direction`` at the length of ``g``, both lengths summed in float64."""
    g_norm = torch.sqrt(sum(t.double().pow(2).sum() for t in g))
    d_norm = torch.sqrt(sum(t.double().pow(2).sum() for t in direction))
    if not 0 < d_norm < math.inf:  # a zero direction has no length to change: every number would be NaN
        raise ValueError(f"direction has length {float(d_norm)}: scale_to_gradient=True needs a nonzero, finite "
                         "direction to take at the gradient's length")
    return [t * (g_norm / d_norm).to(t.dtype) for t in direction]


def _unbatchable(model: nn.Module, params: list[nn.Parameter], draws: bool) -> str | None:
    """Why vmap would measure ``model`` wrongly, or break it; None if nothing seen says so."""
    if draws:
        return ("the model draws from torch's global generator (dropout), and under vmap its draws can differ "
                "from those behind the gradient (attention's dropout does)")
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if module._parameters and names.setdefault(id(module), name) != name:
            return (f"one module is registered under two names ({names[id(module)] or 'the model itself'} and "
                    f"{name}), whose parameters vmap's functional_call cannot move (it left the model broken)")
    if any(p._backward_hooks for p in params):
        return "a parameter has a hook (Tensor.register_hook), which vmap's passes do not run"
    return None


def _effective_beta(grad_diff: list[float], etas: list[float], d_norm: float) -> float:
    """max_k grad_diff[k] / (eta_k ||d||); NaN when any term is undefined (a pass that overflowed, or a
    zero or overflowed direction), which Python's ``max`` would skip or not depending on its position."""
    if not 0 < d_norm < math.inf:
        return math.nan
    ratios = [diff / (eta * d_norm) for diff, eta in zip(grad_diff, etas)]
    return math.nan if any(math.isnan(r) for r in ratios) else max(ratios)


def _combined_norms(rows: torch.Tensor) -> list[float]:
    """The norm of each vector whose per-tensor norms (float64) make one row. No concatenation and a
    handful of ops: a small model's probe is dominated by per-op costs. (The difference of two float32
    gradients is exact or within half an ulp of itself, far below the gradients' own rounding, so it is
    taken in their dtype; only its squares need float64.)"""
    return rows.norm(dim=1).tolist()


def vmap_pays(model: nn.Module) -> bool:
    """The measured rule (``scripts/benchmark.py``): batch the evaluations of the repo's own chains (a
    :class:`~bnopt.models.ChainModel` that keeps its forward: what was measured, and whose parameters vmap
    sees whole) without convolutions where that was faster, unless a module keeps tensors a pass may change
    (:func:`free_state`: a spectral norm's power iteration, an embedding's ``max_norm``): ``vmap`` may
    fail on such writes, and the loop puts them back between passes; nor where gradients come back sparse
    (an embedding with ``sparse=True``), which ``vmap`` cannot batch. (Noisy layers batch: their draws come from their own
    generator, the same at every eta. Whether the model draws from the global one,
    :func:`probe_landscape` sees from its passes.)"""
    if not is_plain_chain(model):
        return False
    devices = {p.device.type for p in model.parameters()}
    return (batching_pays_on(devices, torch.get_num_threads())
            and not any(isinstance(m, nn.Conv2d) or free_state(m) or vars(m).get("sparse") is True
                        for m in model.modules()))


def batching_pays_on(devices: set[str], threads: int) -> bool:
    """Whether batching paid for convolution-free networks on these devices: on CUDA (an H200: 1.2-2.4x
    for the MLP and the DLN, whose many small kernels it merges), and on a CPU with more than one thread
    (on one, the batched kernels have nothing to spread over and only add overhead). Other devices were
    not measured, so they take the loop."""
    return devices == {"cuda"} or (devices <= {"cpu"} and threads > 1)


def _evaluate_loop(model, loss_fn, batch, obs, named, g, d, etas):
    """Losses at w - eta_k d and the per-tensor norms of grad L(w - eta_k d) - g, one row per eta."""
    params = [p for _, p in named]
    values = [p.detach() for p in params]
    # One set of weights for every eta, refilled in place: for the small MLP, fresh tensors per eta
    # measured slower (each is a new 400 KB allocation, interleaved with the passes' own).
    moved = [torch.empty_like(v) for v in values]
    losses, diff_norms = [], []
    with parameters_at(dict(zip(params, moved))):
        for eta in etas:
            torch._foreach_copy_(moved, values)
            torch._foreach_add_(moved, d, alpha=-eta)  # w - eta * d
            loss = loss_at(model, loss_fn, batch, obs)
            grad = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
            # Not in place: autograd may hand back a broadcast view (a parameter used through .sum()).
            diff_norms.append(per_tensor_norms(torch._foreach_sub([dense(t) for t in grad], g)))
            losses.append(float(loss.detach()))
    return losses, torch.stack(diff_norms)


def _evaluate_batched(model, loss_fn, batch, obs, named, g, d, etas):
    """As :func:`_evaluate_loop`, the E evaluations batched by ``vmap``."""
    inputs, targets = batch
    names = [name for name, _ in named]
    # Each parameter moves by the step sizes in its own dtype (rounded from Python's floats), made once per
    # dtype and device, on the device: a copy per parameter from the host would wait for the GPU each time.
    eta = {(dtype, device): torch.tensor(etas, dtype=dtype, device=device)
           for dtype, device in {(p.dtype, p.device) for _, p in named}}
    stacked = {name: p.detach()[None] - eta[p.dtype, p.device].view(-1, *([1] * p.dim())) * dp[None]
               for (name, p), dp in zip(named, d)}

    def loss_of(params: dict) -> torch.Tensor:
        return loss_fn(torch.func.functional_call(model, params, (inputs,), strict=False), targets)

    obs.replay()
    try:
        grads, losses = torch.func.vmap(torch.func.grad_and_value(loss_of), randomness="same")(stacked)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:  # torch.func's own words name the op, not the way out
        raise RuntimeError(f"the batched landscape evaluation (torch.func.vmap) failed on this model ({err}); "
                           "batched=False runs any model") from err
    diff_norms = torch.stack([torch.linalg.vector_norm((grads[name] - gp).reshape(len(etas), -1), dim=1,
                                                    dtype=torch.float64) for name, gp in zip(names, g)], dim=1)
    return [float(v) for v in losses], diff_norms
