"""Internal covariate shift in the gradient sense, Definition 2.1 of Santurkar et al. (protocol 5.1).

For layer i, on one batch:
    G  = gradient of the loss w.r.t. layer i's parameters at the current weights W(t);
    G' = the same gradient after layers 0..i-1 have been moved to W(t+1), the values the optimiser's real
         step() gives them from the current gradient, while layers i.. keep W(t).
Reported: ||G - G'||_2 and cos(G, G').

Two ways to compute G', bit-for-bit equal (tested):
  - any model: one forward pass per layer with the prefix replaced (``functional_call``), and a
    backward that stops at layer i (``autograd.grad`` w.r.t. layer i's parameters only);
  - a :class:`~bnopt.models.ChainModel` whose ``layers`` are its blocks: one forward of the updated
    network stores every block's input (layer i's updated prefix is layer i-1's plus one block), then
    for each layer only the old-weight suffix from layer i runs forward and back.
Layer 0 has no prefix, so G' = G there by definition and nothing is recomputed.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from bnopt.models import ChainModel
from bnopt.probes.observation import (
    current_gradient, flat_cosine, flat_distance, loss_at, observation, simulate_optimizer_step,
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
) -> list[dict]:
    """ICS (Definition 2.1) of each layer in ``which`` (0-based indices into ``layers``; default all).

    ``layers`` is the model's parameters grouped by layer, in forward order. ``loss_fn(model(inputs),
    targets)`` is the scalar training loss. The optimiser is stepped for real to obtain W(t+1), then put
    back. With ``use_grad_fields=True`` the current gradient is read from ``.grad`` (as left by
    ``loss.backward()`` on this batch, between backward and step) instead of being computed.

    A pure observation: parameters, buffers, ``.grad``, optimiser state and the global random state are
    unchanged afterwards; normalisation uses batch statistics without updating running statistics; every
    forward pass sees the same random draws. Returns ``[{"layer": i, "l2": float, "cos": float}, ...]``.
    """
    layers = [list(layer) for layer in layers]
    which = list(range(len(layers))) if which is None else sorted(set(which))
    for i in which:
        if not 0 <= i < len(layers):
            raise IndexError(f"layer index {i} out of range: `layers` has {len(layers)} layers (0-based)")
    params = [p for layer in layers for p in layer]
    with observation(model) as obs:
        grads = current_gradient(model, loss_fn, batch, obs, params, use_grad_fields)
        updated = simulate_optimizer_step(optimizer, params, grads)
        by_param = dict(zip(params, grads))
        if _is_chain_of(model, layers):
            shifted = _shifted_gradients_chain(model, loss_fn, batch, layers, which, updated)
        else:
            shifted = _shifted_gradients_any(model, loss_fn, batch, obs, layers, which, updated)
        results = []
        for i in which:
            g = [by_param[p] for p in layers[i]]
            g_shifted = shifted.get(i, g)  # layer 0: G' = G
            results.append({"layer": i, "l2": flat_distance(g, g_shifted), "cos": flat_cosine(g, g_shifted)})
    return results


def _is_chain_of(model: nn.Module, layers: list[list[nn.Parameter]]) -> bool:
    """Whether ``model`` is a plain ChainModel and ``layers`` are exactly its blocks' parameters."""
    if not isinstance(model, ChainModel) or type(model).forward is not ChainModel.forward:
        return False
    blocks = model.layer_params()
    return len(blocks) == len(layers) and all(
        len(a) == len(b) and all(x is y for x, y in zip(a, b)) for a, b in zip(blocks, layers)
    )


def _shifted_gradients_any(model, loss_fn, batch, obs, layers, which, updated) -> dict[int, list]:
    names = {p: name for name, p in model.named_parameters()}
    shifted = {}
    for i in which:
        if i == 0:
            continue
        prefix = {names[p]: updated[p] for layer in layers[:i] for p in layer}
        loss = loss_at(model, loss_fn, batch, obs, prefix)
        shifted[i] = list(torch.autograd.grad(loss, layers[i], allow_unused=True, materialize_grads=True))
    return shifted


def _shifted_gradients_chain(model: ChainModel, loss_fn, batch, layers, which, updated) -> dict[int, list]:
    inputs, targets = batch
    needed = [i for i in which if i > 0]
    if not needed:
        return {}
    # One forward of the updated network stores the input of every layer that is measured.
    block_inputs = {}
    h = inputs
    with torch.no_grad():
        for k in range(max(needed)):
            block = model.blocks[k]
            new_values = {name: updated[p] for name, p in block.named_parameters()}
            h = torch.func.functional_call(block, new_values, (h,))
            if k + 1 in needed:
                block_inputs[k + 1] = h
    shifted = {}
    for i in needed:
        h = block_inputs.pop(i)  # free each stored input once its suffix has run
        for block in model.blocks[i:]:
            h = block(h)
        shifted[i] = list(torch.autograd.grad(loss_fn(h, targets), layers[i], allow_unused=True,
                                              materialize_grads=True))
    return shifted
