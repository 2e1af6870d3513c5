"""Internal covariate shift in the gradient sense, Definition 2.1 of Santurkar et al. (protocol 5.1).

For layer i, on one batch:
    G  = gradient of the loss w.r.t. layer i's parameters at the current weights W(t);
    G' = the same gradient after layers 0..i-1 have been moved to W(t+1), the values the optimiser's real
         step() gives them from the current gradient, while layers i.. keep W(t).
Reported: ||G - G'||_2 and cos(G, G').

Two ways to compute G', bit-for-bit equal (tested):
  - any model: one forward pass per layer with the prefix moved to W(t+1), and a
    backward that stops at layer i (``autograd.grad`` w.r.t. layer i's parameters only);
  - a chain — a :class:`~bnopt.models.ChainModel` or an ``nn.Sequential`` (nested ones flattened), with
    neither ``forward`` overridden nor hooks on the containers — whose ``layers`` each lie in consecutive
    stages, in forward order: the forward of the updated prefix is shared (layer i's prefix is layer
    i-1's plus the stages in between, run once), and for each layer only the old-weight suffix from the
    stage where layer i begins runs forward and back. Each suffix starts from the random state a full pass
    has at that stage, so dropout draws the same masks as in the first way.
Layer 0 has no prefix, so G' = G there by definition and nothing is recomputed.
"""

from __future__ import annotations

import inspect
import math
import operator
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from bnopt.models import is_plain_chain
from bnopt.probes.observation import (
    RandomState, current_gradient, dense, loss_at, observation, optimizer_parameters, parameters_at,
    per_tensor_norms, simulate_optimizer_step, zeros_where_missing,
)


def measure_ics(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    layers: Sequence[Sequence[nn.Parameter]],
    which: Iterable[int] | None = None,
    *,
    use_grad_fields: bool = False,
    rng_state: RandomState | None = None,
) -> list[dict]:
    """ICS (Definition 2.1) of each layer in ``which`` (0-based indices into ``layers``; default all; in
    ascending order, each once).

    ``layers`` is the model's parameters grouped by layer, in forward order (refused out of it, where the
    autograd graph of G or a chain's stages show the order). ``loss_fn(model(inputs),
    targets)`` is the scalar training loss. The optimiser is stepped for real to obtain W(t+1), then put
    back (its step hooks do not run). With ``use_grad_fields=True`` the current gradient is read from
    ``.grad`` (as left by ``loss.backward()`` on this batch, between backward and step) instead of being
    computed. Every forward pass starts from the global random state ``rng_state`` (default: the state at
    the call); with ``use_grad_fields=True`` and a model that draws from torch's generator (dropout), give
    :func:`bnopt.probes.random_state` as it was before the forward pass behind ``.grad``.

    A pure observation: parameters, buffers, ``.grad``, optimiser state and the global random state are
    unchanged afterwards; normalisation uses batch statistics without updating running statistics; every
    forward pass sees the same random draws. Returns ``[{"layer": i, "l2": float, "cos": float}, ...]``.
    """
    pairs = ics_gradients(model, loss_fn, batch, optimizer, layers, which, use_grad_fields=use_grad_fields,
                          rng_state=rng_state)
    summaries = _distances_and_cosines(list(pairs.values()))
    return [{"layer": i, "l2": l2, "cos": cos} for i, (l2, cos) in zip(pairs, summaries)]


def ics_gradients(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    layers: Sequence[Sequence[nn.Parameter]],
    which: Iterable[int] | None = None,
    *,
    use_grad_fields: bool = False,
    rng_state: RandomState | None = None,
) -> dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """``{i: (G, G')}`` for each layer in ``which``: the gradients behind :func:`measure_ics` (same
    arguments, same guarantees), one tensor per parameter of the layer."""
    def not_a_group(x) -> bool:  # a ParameterList is a group; a parameter or another module is not
        return isinstance(x, torch.Tensor) or (isinstance(x, nn.Module) and not isinstance(x, nn.ParameterList))
    grouped = not not_a_group(layers)
    layers = list(layers) if grouped else []
    if not grouped or any(not_a_group(layer) for layer in layers):
        raise TypeError("`layers` is a list of lists of parameters, one list per layer (e.g. "
                        "[list(block.parameters()) for block in blocks]), not parameters or modules")
    layers = [list(layer) for layer in layers]
    if not layers:
        raise ValueError("`layers` is empty: give the model's parameters grouped by layer, in forward order")
    empty = [i for i, layer in enumerate(layers) if not layer]
    if empty:
        raise ValueError(f"layers {empty} (0-based) hold no parameters: each layer is a list of its parameters")
    which = list(range(len(layers))) if which is None else _layer_indices(which)
    for i in which:
        if not 0 <= i < len(layers):
            raise IndexError(f"layer index {i} out of range: `layers` has {len(layers)} layers (0-based)")
    frozen = [i for i, layer in enumerate(layers) if any(not p.requires_grad for p in layer)]
    if frozen:
        raise ValueError(f"layers {frozen} (0-based) hold parameters with requires_grad=False: ICS is a gradient "
                         "w.r.t. every parameter in `layers`; leave frozen parameters out")
    # Both mistakes below would otherwise give plausible numbers: zero gradients (l2 0, cos NaN) for
    # parameters the loss never sees, and no shift at all (l2 0, cos 1) when nothing moves.
    own = set(model.parameters())
    foreign = [i for i, layer in enumerate(layers) if any(p not in own for p in layer)]
    if foreign:
        raise ValueError(f"layers {foreign} (0-based) hold parameters that are not the model's "
                         "(from a copy of it, or another model?)")
    params = [p for layer in layers for p in layer]
    if not isinstance(optimizer, torch.optim.Optimizer):  # its step is simulated through Optimizer's internals
        held = " (it holds one: pass its .optimizer)" if isinstance(getattr(optimizer, "optimizer", None),
                                                                   torch.optim.Optimizer) else ""
        raise TypeError("optimizer is the torch.optim.Optimizer that trains the model; got a "
                        f"{type(optimizer).__name__}{held}")
    stepped = dict.fromkeys(optimizer_parameters(optimizer))  # a set in the optimiser's order
    if not any(p in stepped for p in params):
        raise ValueError("the optimiser holds none of the parameters in `layers` (is it another model's, or "
                         "a copy's?): no layer would move, and every layer would show no shift")
    layer_of: dict[nn.Parameter, int] = {}
    for i, layer in enumerate(layers):
        for p in layer:
            if p in layer_of:
                where = f"twice in layer {i}" if layer_of[p] == i else f"in layers {layer_of[p]} and {i}"
                raise ValueError(f"a parameter appears {where} (0-based): each parameter belongs to one layer "
                                 "(one listed in two would be both moved with the prefix and held at W(t))")
            layer_of[p] = i
    closure = inspect.signature(optimizer.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise ValueError(f"{type(optimizer).__name__}.step() needs a closure: it evaluates the loss itself, "
                         "several times per step, so there is no single update from the current gradient for "
                         "ICS (Definition 2.1) to take; use an optimiser that steps from .grad alone")
    # The model's other parameters that the optimiser steps take part in the simulated step with their
    # gradients, as in the real one: a step that couples parameters (clipping by the global norm) moves the
    # listed ones by what the others' gradients say. Their own W(t+1) is dropped: they stay at W(t).
    listed = set(params)
    unlisted = [p for p in stepped if p not in listed and p in own and p.requires_grad]
    with observation(model, batch, rng_state=rng_state) as obs:
        grads = current_gradient(model, loss_fn, batch, obs, params + unlisted, use_grad_fields,
                                 inspect_loss=lambda loss: _refuse_out_of_order(_uses(loss, layers)))
        updated = simulate_optimizer_step(optimizer, params + unlisted, grads)
        updated = {p: updated[p] for p in params}
        grads = grads[:len(params)]
        by_param = dict(zip(params, zeros_where_missing(grads, params)))
        stages = _stages(model)
        starts = _layer_starts(stages, layers) if stages is not None else None
        if starts is not None:
            shifted = _shifted_gradients_chain(stages, starts, loss_fn, batch, obs, layers, which, updated)
        if starts is None or obs.free_state_changed():
            # A module that changes its state as it runs (a spectral norm's power iteration, an embedding
            # renormalising its weight) needs every pass to start from the same state, which only the
            # general path's full passes give.
            shifted = _shifted_gradients_any(model, loss_fn, batch, obs, layers, which, updated)
    pairs = {}
    for i in which:
        g = [by_param[p] for p in layers[i]]
        pairs[i] = (g, shifted.get(i, g))  # layer 0: G' = G
    return pairs


# Layers whose gradients together hold at most this many entries share one pass of float64 copies (G, G'
# and their difference, 24 bytes an entry): of a model's every layer at once, they were the probe's largest
# use of memory (3.2 times a step's for VGG-16 at batch 32, against 1.04 in groups).
DISTANCE_CHUNK_ENTRIES = 1 << 20


def _distances_and_cosines(pairs: list[tuple[list[torch.Tensor], list[torch.Tensor]]]) -> list[tuple[float, float]]:
    """(||G - G'||_2, cos(G, G')) for each pair, in float64, with a few ops per group of layers rather than a
    dozen per layer: for the 25 tiny layers of the deep linear network those cost a sizeable part of a step.
    Each layer's numbers are its own, so how the layers are grouped changes none of them."""
    sizes = [sum(t.numel() for t in g) for g, _ in pairs]
    out, first, entries = [], 0, 0
    for i, size in enumerate(sizes):
        if i > first and entries + size > DISTANCE_CHUNK_ENTRIES:
            out += _distances_and_cosines_together(pairs[first:i], sizes[first:i])
            first, entries = i, 0
        entries += size
    return out + _distances_and_cosines_together(pairs[first:], sizes[first:])


def _distances_and_cosines_together(pairs: list[tuple[list[torch.Tensor], list[torch.Tensor]]],
                                    sizes: list[int]) -> list[tuple[float, float]]:
    if not pairs:
        return []
    a = torch.cat([dense(t).reshape(-1) for g, _ in pairs for t in g]).double()
    b = torch.cat([dense(t).reshape(-1) for _, g_shifted in pairs for t in g_shifted]).double()
    a_parts, b_parts = a.split(sizes), b.split(sizes)
    l2, norm_a, norm_b = (per_tensor_norms(v) for v in ((a - b).split(sizes), a_parts, b_parts))
    dots = torch.stack([x @ y for x, y in zip(a_parts, b_parts)])
    out = []
    for l2_i, dot, na, nb in torch.stack([l2, dots, norm_a, norm_b], dim=1).tolist():
        cos = dot / (na * nb) if na > 0 and nb > 0 else float("nan")
        if l2_i == 0 and math.isfinite(cos):
            cos = 1.0  # G' = G: the ratio, whose norms round apart from the dot product, can miss 1 by ulps
        elif math.isfinite(cos):
            cos = min(1.0, max(-1.0, cos))  # rounding can overshoot by an ulp
        else:  # a gradient that overflowed (inf / inf): undefined, and min/max would turn NaN into -1
            cos = float("nan")
        out.append((l2_i, cos))
    return out


def _stages(model: nn.Module) -> list[nn.Module] | None:
    """The modules whose composition is ``model``'s forward, nested chains flattened; None unless
    ``model`` is a plain ChainModel or nn.Sequential. A container with hooks is not plain: calling its
    stages one by one would skip them."""
    if model._forward_hooks or model._forward_pre_hooks or model._backward_hooks or model._backward_pre_hooks:
        return None
    if is_plain_chain(model):
        children = list(model.blocks)
    elif isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward:
        children = list(model)
    else:
        return None
    stages = []
    for child in children:
        stages.extend(_stages(child) or [child])
    return stages


def _layer_starts(stages: list[nn.Module], layers: list[list[nn.Parameter]]) -> list[int] | None:
    """The stage where each layer begins, if every layer's parameters lie in stages after the previous
    layer's (so that the stages before layer i hold no parameter of a later layer); None otherwise, or if a
    parameter is shared between stages or used by none. Layers out of forward order are refused."""
    stage_of: dict[nn.Parameter, int] = {}
    for k, stage in enumerate(stages):
        for p in stage.parameters():
            if stage_of.setdefault(p, k) != k:
                return None
    spans = []
    for layer in layers:
        found = [stage_of.get(p) for p in layer]
        if None in found:
            return None
        spans.append((min(found), max(found)))
    _refuse_out_of_order(spans)
    if any(start <= previous_end for (start, _), (_, previous_end) in zip(spans[1:], spans)):
        return None  # interleaved layers: the general path's full passes
    return [start for start, _ in spans]


def _refuse_out_of_order(spans: Sequence[tuple[int, int] | None]) -> None:
    """Refuse ``layers`` out of forward order, given where the forward pass first and last uses each layer's
    parameters (None where unknown): a layer that runs entirely before one listed ahead of it. Measured as
    listed, each layer's "shift" would be that from the steps of layers after it: plausible numbers of
    another quantity than ICS."""
    latest_start, latest = -1, None  # the layer listed so far that starts furthest down the forward pass
    for i, span in enumerate(spans):
        if span is None:
            continue
        start, end = span
        if end < latest_start:
            raise ValueError(f"`layers` is not in forward order: layer {i} (0-based) runs entirely before layer "
                             f"{latest}, listed ahead of it; list the layers in the order the forward pass meets them")
        if start > latest_start:
            latest_start, latest = start, i


def _uses(loss: torch.Tensor, layers: Sequence[Sequence[nn.Parameter]]) -> list[tuple[int, int] | None]:
    """For each layer, where the forward pass behind ``loss`` first and last used its parameters, read from
    the autograd graph: each op's node is numbered in the order the pass created it, whatever module or
    function ran it. None for a layer none of whose parameters the graph reaches. (All uses, not the first
    alone: a weight shared by the first and the last block runs before nothing.)"""
    wanted = {p for layer in layers for p in layer}
    span: dict[nn.Parameter, tuple[int, int]] = {}
    seen, pending = set(), [loss.grad_fn]
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for used, _ in node.next_functions:
            p = getattr(used, "variable", None)  # an AccumulateGrad node: ``node``'s op used parameter p
            if p is None:
                pending.append(used)
            elif p in wanted:
                at = node._sequence_nr()
                first, last = span.get(p, (at, at))
                span[p] = (min(first, at), max(last, at))
    spans = []
    for layer in layers:
        found = [span[p] for p in layer if p in span]
        spans.append((min(f for f, _ in found), max(last for _, last in found)) if found else None)
    return spans


def _layer_indices(which) -> list[int]:
    """``which`` as sorted, distinct ints; numpy's and torch's integers count, True does not (it would be
    measured, and reported, as layer ``True``)."""
    try:
        items = list(which)
        indices = sorted({operator.index(i) for i in items})
    except TypeError:  # not iterable, or an item that is not an integer
        items = None
    if items is None or any(isinstance(i, bool) for i in items):
        raise TypeError(f"`which` is a list of layer indices (0-based ints), e.g. [0, 2]; got {which!r}")
    return indices


def _shifted_gradients_any(model, loss_fn, batch, obs, layers, which, updated) -> dict[int, list]:
    shifted = {}
    for i in which:
        if i == 0:
            continue
        with parameters_at({p: updated[p] for layer in layers[:i] for p in layer}):
            loss = loss_at(model, loss_fn, batch, obs)
            shifted[i] = list(torch.autograd.grad(loss, layers[i], allow_unused=True, materialize_grads=True))
    return shifted


def _shifted_gradients_chain(stages, starts, loss_fn, batch, obs, layers, which, updated) -> dict[int, list]:
    inputs, targets = batch
    shifted = {}
    obs.replay()
    h, done = inputs, 0  # the output of stages[:done], every listed parameter in them moved to W(t+1)
    for i in which:
        if i == 0:
            continue
        with torch.no_grad():
            for stage in stages[done:starts[i]]:
                with parameters_at({p: updated[p] for p in stage.parameters() if p in updated}):
                    h = stage(h)
        done = starts[i]
        at_start, version = obs.position(), h._version
        out = h
        for stage in stages[starts[i]:]:  # the old-weight suffix, from where layer i begins
            out = stage(out)
        shifted[i] = list(torch.autograd.grad(loss_fn(out, targets), layers[i], allow_unused=True,
                                              materialize_grads=True))
        if h._version == version:
            obs.rewind(at_start)  # the prefix goes on from here
        else:  # a stage wrote into its input in place: the next prefix starts again from the inputs
            obs.replay()
            h, done = inputs, 0
    return shifted
