"""measure_ics against independent answers: G and G' written out by hand for a linear network, brute
force with copied models for the paper's networks, and the lr-0 prefix that must give zero shift."""

import copy
import math
import random

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import bnopt.probes.ics
from bnopt.memory import peak_tensor_bytes
from bnopt.models import Block, ChainModel, dln, mlp, vgg
from bnopt.norms import NoiseSpec, norm_factory, set_noise_step
from bnopt.probes import ics_gradients, measure_ics
from bnopt.probes.ics import _distances_and_cosines
from conftest import assert_same, snapshot

# --- a 3-layer linear network, by hand ----------------------------------------------------------------
# out = ((X W1^T) W2^T + b2) W3^T,   L = 0.5 * sum (out - Y)^2


def hand_gradients(w: dict, x: torch.Tensor, y: torch.Tensor) -> dict:
    h1 = x @ w["W1"].T
    h2 = h1 @ w["W2"].T + w["b2"]
    r = h2 @ w["W3"].T - y  # dL/d out
    d2 = r @ w["W3"]        # dL/d h2
    d1 = d2 @ w["W2"]       # dL/d h1
    return {"W1": d1.T @ x, "W2": d2.T @ h1, "b2": d2.sum(0), "W3": r.T @ h2}


LAYERS = [["W1"], ["W2", "b2"], ["W3"]]


def hand_ics(w: dict, x, y, updated: dict) -> list[dict]:
    g = hand_gradients(w, x, y)
    out = []
    for i, names in enumerate(LAYERS):
        shifted_w = dict(w)
        for earlier in LAYERS[:i]:
            for name in earlier:
                shifted_w[name] = updated[name]
        g2 = hand_gradients(shifted_w, x, y)
        a = torch.cat([g[n].flatten() for n in names])
        b = torch.cat([g2[n].flatten() for n in names])
        out.append({"layer": i, "l2": float((a - b).norm()), "cos": float(a @ b / (a.norm() * b.norm()))})
    return out


class ThreeLinear(nn.Module):
    """A plain module (not a ChainModel), so measure_ics takes its general path."""

    def __init__(self, w: dict):
        super().__init__()
        self.W1, self.W2, self.b2, self.W3 = (nn.Parameter(w[n].clone()) for n in ("W1", "W2", "b2", "W3"))

    def forward(self, x):
        return ((x @ self.W1.T) @ self.W2.T + self.b2) @ self.W3.T

    def layers(self):
        return [[self.W1], [self.W2, self.b2], [self.W3]]


def three_linear_chain(w: dict) -> ChainModel:
    """The same network as a ChainModel, so measure_ics takes its shared-prefix path."""
    blocks = [Block(nn.Linear(4, 5, bias=False)), Block(nn.Linear(5, 3)), Block(nn.Linear(3, 2, bias=False))]
    model = ChainModel(blocks).double()
    with torch.no_grad():
        model.blocks[0].weight.weight.copy_(w["W1"])
        model.blocks[1].weight.weight.copy_(w["W2"])
        model.blocks[1].weight.bias.copy_(w["b2"])
        model.blocks[2].weight.weight.copy_(w["W3"])
    return model


def sum_squares(out, target):
    return 0.5 * (out - target).pow(2).sum()


@pytest.fixture
def linear_problem():
    gen = torch.Generator().manual_seed(0)
    w = {"W1": torch.randn(5, 4, generator=gen, dtype=torch.float64) * 0.7,
         "W2": torch.randn(3, 5, generator=gen, dtype=torch.float64) * 0.7,
         "b2": torch.randn(3, generator=gen, dtype=torch.float64),
         "W3": torch.randn(2, 3, generator=gen, dtype=torch.float64) * 0.7}
    batches = [(torch.randn(16, 4, generator=gen, dtype=torch.float64),
                torch.randn(16, 2, generator=gen, dtype=torch.float64)) for _ in range(2)]
    return w, batches


def hand_sgd(lr, momentum, weight_decay):
    """Two steps of torch's SGD by hand: the first on batch 0 (fills the momentum buffer), the second
    (the one the ICS anticipates) on batch 1. Returns the weights after step 1 and after step 2."""

    def run(w, batches):
        buf, after = {}, []
        for x, y in batches:
            g = hand_gradients(w, x, y)
            new = {}
            for n in w:
                d = g[n] + weight_decay * w[n]
                buf[n] = d if n not in buf else momentum * buf[n] + d
                new[n] = w[n] - lr * buf[n]
            after.append(new)
            w = new
        return after

    return run


def hand_adam(lr, betas, eps):
    def run(w, batches):
        m, v, after = {}, {}, []
        for t, (x, y) in enumerate(batches, start=1):
            g = hand_gradients(w, x, y)
            new = {}
            for n in w:
                m[n] = betas[0] * m.get(n, 0) + (1 - betas[0]) * g[n]
                v[n] = betas[1] * v.get(n, 0) + (1 - betas[1]) * g[n] ** 2
                m_hat, v_hat = m[n] / (1 - betas[0] ** t), v[n] / (1 - betas[1] ** t)
                new[n] = w[n] - lr * m_hat / (v_hat.sqrt() + eps)
            after.append(new)
            w = new
        return after

    return run


OPTIMIZERS = [
    ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.05), hand_sgd(0.05, 0.0, 0.0)),
    ("sgd+momentum+wd", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01),
     hand_sgd(0.05, 0.9, 0.01)),
    ("adam", lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.95), eps=1e-8), hand_adam(0.01, (0.8, 0.95), 1e-8)),
]


@pytest.mark.parametrize("name, make_optimizer, by_hand", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
@pytest.mark.parametrize("structure", ["plain module", "chain model"])
def test_ics_matches_hand_computed_gradients(linear_problem, name, make_optimizer, by_hand, structure):
    w, batches = linear_problem
    if structure == "plain module":
        model = ThreeLinear(w)
        layers = model.layers()
    else:
        model = three_linear_chain(w)
        layers = model.layer_params()
    optimizer = make_optimizer(model.parameters())
    x0, y0 = batches[0]
    optimizer.zero_grad()
    sum_squares(model(x0), y0).backward()
    optimizer.step()  # a real first step, so that momentum / Adam state is part of the update
    after_first, after_second = by_hand(w, batches)
    x1, y1 = batches[1]
    expected = hand_ics(after_first, x1, y1, after_second)
    measured = measure_ics(model, sum_squares, (x1, y1), optimizer, layers)
    assert [m["layer"] for m in measured] == [0, 1, 2]
    for m, e in zip(measured, expected):
        assert m["l2"] == pytest.approx(e["l2"], rel=1e-9, abs=1e-12)
        assert m["cos"] == pytest.approx(e["cos"], rel=1e-9)
    assert measured[0]["l2"] == 0.0  # no layers before the first: G' = G
    assert measured[2]["l2"] > 1e-3  # and the shift is real further up


def test_which_selects_layers_and_bad_arguments_are_refused(linear_problem):
    w, (batch, _) = linear_problem
    model = ThreeLinear(w)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    assert [r["layer"] for r in measure_ics(model, sum_squares, batch, optimizer, model.layers(), which=[2, 1])] == [1, 2]
    assert measure_ics(model, sum_squares, batch, optimizer, model.layers(), which=[]) == []
    with pytest.raises(IndexError, match="3 layers"):
        measure_ics(model, sum_squares, batch, optimizer, model.layers(), which=[3])
    numpy_and_torch_ints = measure_ics(model, sum_squares, batch, optimizer, model.layers(),
                                       which=iter([np.int64(2), torch.tensor(1)]))
    assert [r["layer"] for r in numpy_and_torch_ints] == [1, 2] and all(type(r["layer"]) is int
                                                                        for r in numpy_and_torch_ints)
    for not_indices in (1, [True], [1.0], [torch.tensor(1.0)], "12"):  # True was measured as layer `True`
        with pytest.raises(TypeError, match=r"`which` is a list of layer indices \(0-based ints\)"):
            measure_ics(model, sum_squares, batch, optimizer, model.layers(), which=not_indices)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)  # torch: "no attribute 'param_groups'"
    with pytest.raises(TypeError, match=r"the torch.optim.Optimizer that trains the model; got a StepLR \(it holds "
                                        r"one: pass its .optimizer\)$"):
        measure_ics(model, sum_squares, batch, scheduler, model.layers())
    with pytest.raises(TypeError, match=r"the torch.optim.Optimizer that trains the model; got a dict$"):
        measure_ics(model, sum_squares, batch, optimizer.state_dict(), model.layers())
    for loss_fn, got in ((lambda out, target: sum_squares(out, target).item(), "a float"),  # torch: "not iterable"
                         (lambda out, target: 0.5 * (out - target).pow(2), r"a tensor of shape \(\d+, \d+\)")):
        with pytest.raises(TypeError, match=f"must return the loss as a one-element tensor.*; got {got}$"):
            measure_ics(model, loss_fn, batch, optimizer, model.layers())
    with pytest.raises(ValueError, match="`layers` is empty"):
        measure_ics(model, sum_squares, batch, optimizer, [])
    with pytest.raises(ValueError, match=r"layers \[1\] \(0-based\) hold no parameters"):
        measure_ics(model, sum_squares, batch, optimizer, [[model.W1], [], [model.W2, model.b2, model.W3]])
    with pytest.raises(ValueError, match=r"a parameter appears in layers 0 and 2"):
        measure_ics(model, sum_squares, batch, optimizer, [[model.W1], [model.W2, model.b2], [model.W3, model.W1]])
    with pytest.raises(ValueError, match=r"a parameter appears twice in layer 1"):
        measure_ics(model, sum_squares, batch, optimizer, [[model.W1], [model.W2, model.b2, model.W2], [model.W3]])
    copy_of_model = copy.deepcopy(model)
    with pytest.raises(ValueError, match=r"layers \[1, 2\] .*not the model's"):
        measure_ics(model, sum_squares, batch, optimizer, [[model.W1], *copy_of_model.layers()[1:]])
    with pytest.raises(ValueError, match="the optimiser holds none of the parameters"):
        measure_ics(model, sum_squares, batch, torch.optim.SGD(copy_of_model.parameters(), lr=0.05), model.layers())
    grouped = measure_ics(model, sum_squares, batch, optimizer, model.layers())
    assert measure_ics(model, sum_squares, batch, optimizer, [nn.ParameterList(layer) for layer in model.layers()]) \
        == grouped  # a ParameterList is a group
    for flat in (list(model.parameters()), [model.W1, model.W2], [nn.Linear(2, 2)]):  # not grouped by layer
        with pytest.raises(TypeError, match="a list of lists of parameters, one list per layer"):
            measure_ics(model, sum_squares, batch, optimizer, flat)
    model.W2.requires_grad_(False)
    with pytest.raises(ValueError, match=r"layers \[1\] .*requires_grad=False"):
        measure_ics(model, sum_squares, batch, optimizer, model.layers())


class GlobalNormClippedSGD(torch.optim.Optimizer):
    """SGD whose step scales every gradient by min(1, max_norm / the norm of all of them): each parameter's
    update depends on the others' gradients."""

    def __init__(self, params, lr, max_norm):
        super().__init__(params, dict(lr=lr, max_norm=max_norm))

    @torch.no_grad()
    def step(self):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        total = float(torch.stack([g.norm() for g in grads]).norm())
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.sub_(group["lr"] * min(1.0, group["max_norm"] / total) * p.grad)


@pytest.mark.parametrize("chain", [True, False])
@pytest.mark.parametrize("use_grad_fields", [False, True])
def test_parameters_left_out_of_layers_take_part_in_the_simulated_step_and_stay_where_they_are(use_grad_fields,
                                                                                                chain):
    """A middle layer and the head are not measured, but their gradients count in the optimiser's global
    norm: the simulated step hid them (.grad None), so W(t+1) of the measured layers was not the real
    step's (l2 0.0068 against 0.0045). They stay at W(t) for G', the middle one too, which lies in the
    shared prefix (a first version of the fix moved it there). Through the shared prefix and the general
    path."""
    torch.manual_seed(0)
    sequential = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(),
                               nn.Linear(6, 3)).double()
    model = sequential if chain else HiddenChain(sequential)
    batch = (torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,)))
    optimizer = GlobalNormClippedSGD(sequential.parameters(), lr=1.0, max_norm=0.1)
    layers_of = lambda m: [list(m[0].parameters()), list(m[4].parameters())]  # noqa: E731
    if use_grad_fields:
        nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    (g, g_shifted), = brute_force_ics(sequential, nn.functional.cross_entropy, batch, optimizer,
                                      layers_of=layers_of)[1:]
    expected = torch.cat([(a - b).reshape(-1) for a, b in zip(g, g_shifted)]).norm().item()
    measured = measure_ics(model, nn.functional.cross_entropy, batch, optimizer, layers_of(sequential),
                           use_grad_fields=use_grad_fields)
    assert measured[1]["l2"] == pytest.approx(expected, rel=1e-12) and expected > 1e-3


def test_an_optimiser_that_needs_a_closure_is_refused_before_anything_runs(linear_problem):
    w, (batch, _) = linear_problem
    model = ThreeLinear(w)
    optimizer = torch.optim.LBFGS(model.parameters())
    with pytest.raises(ValueError, match=r"LBFGS.step\(\) needs a closure"):
        measure_ics(model, lambda *_: pytest.fail("a loss was evaluated"), batch, optimizer, model.layers())


class HeadRegisteredFirst(nn.Module):
    """A model whose children, in the order ``children()`` gives them, are not the order its forward runs."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 3)
        self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh())

    def forward(self, x):
        return self.head(self.body(x))


def test_layers_out_of_forward_order_are_refused(linear_problem):
    """Listed out of the order in which the forward pass meets them, each layer's "shift" was measured as
    the shift from the steps of layers after it: plausible numbers of another quantity than ICS. A chain
    shows the order by its stages; any model, by the autograd graph of the pass that computes G (modules or
    plain tensor ops). Interleaved layers (one whose parameters lie around another's) are not out of order:
    they take the general path, as before; nor is a weight that both an early and a late stage use, listed
    before or after the layers between."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    batch = (torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    linears = [list(model[k].parameters()) for k in (0, 2, 4)]
    for measured in (model, HiddenChain(model)):  # the chain's stages, and the graph
        for order, early, late in (((2, 1, 0), 1, 0), ((1, 0, 2), 1, 0), ((0, 2, 1), 2, 1)):
            with pytest.raises(ValueError, match=rf"not in forward order: layer {early} \(0-based\) runs entirely "
                                                 rf"before layer {late}, listed ahead of it"):
                measure_ics(measured, nn.functional.cross_entropy, batch, optimizer, [linears[k] for k in order])
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    with pytest.raises(ValueError, match="not in forward order: layer 1 .* before layer 0"):  # no graph: the stages
        measure_ics(model, nn.functional.cross_entropy, batch, optimizer, linears[::-1], use_grad_fields=True)
    interleaved = [[model[0].weight, model[4].weight], linears[1]]
    assert measure_ics(model, nn.functional.cross_entropy, batch, optimizer, interleaved) == measure_ics(
        HiddenChain(model), nn.functional.cross_entropy, batch, optimizer, interleaved)
    shared = nn.Linear(6, 6).double()  # used first and last: it runs before nothing, listed either way
    sandwich = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), shared, nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), shared,
                             nn.Linear(6, 3)).double()
    inner, outer = list(sandwich[4].parameters()), list(shared.parameters())
    for listed in ([inner, outer], [outer, inner]):
        assert len(measure_ics(sandwich, nn.functional.cross_entropy, batch,
                               torch.optim.SGD(sandwich.parameters(), lr=0.5), listed)) == 2
    custom = HeadRegisteredFirst()
    by_registration = [list(child.parameters()) for child in custom.children()]
    with pytest.raises(ValueError, match="not in forward order: layer 1 .* before layer 0"):
        measure_ics(custom, nn.functional.cross_entropy, (batch[0].float(), batch[1]),
                    torch.optim.SGD(custom.parameters(), lr=0.5), by_registration)
    w, (linear_batch, _) = linear_problem
    plain = ThreeLinear(w)  # parameters used by tensor ops in the model's own forward
    with pytest.raises(ValueError, match="not in forward order: layer 2 .* before layer 1"):
        measure_ics(plain, sum_squares, linear_batch, torch.optim.SGD(plain.parameters(), lr=0.1),
                    [[plain.W1], [plain.W3], [plain.W2, plain.b2]])


def test_a_gradient_that_overflows_gives_an_undefined_cosine_not_minus_one():
    """float32, out = W2 W1 x, L = out_0 - out_1: the loss is 6e28, but G of W2 is h_0 - h_1 = 6e38, past
    float32's range, so G and G' hold inf: ||G - G'|| and cos(G, G') are NaN (min/max clipping made -1)."""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(2))
        model[1].weight.copy_(torch.tensor([[1e-10, 0.0]]))
    x = torch.tensor([[3e38, 0.0], [-3e38, 0.0]])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-30)  # W1[0, 0] moves from 1 to 0.94
    layers = [[model[0].weight], [model[1].weight]]
    first, second = measure_ics(model, lambda out, y: out[0].sum() - out[1].sum(), (x, None), optimizer, layers)
    assert (first["l2"], first["cos"]) == (0.0, 1.0)  # G' = G for the first layer, finite
    assert math.isnan(second["l2"]) and math.isnan(second["cos"])


def test_cosine_of_a_gradient_with_itself_is_exactly_one():
    """Layer 0 has G' = G. The float64 ratio dot / (norm * norm) misses 1 by an ulp or two, either way, for
    more than half of vectors (the norms round apart from the dot product); it must come out as 1.0 exactly."""
    for seed in range(20):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
        batch = (torch.randn(12, 5), torch.randn(12, 2))
        layers = [list(model[0].parameters()), list(model[2].parameters())]
        (first,) = measure_ics(model, sum_squares, batch, torch.optim.SGD(model.parameters(), lr=0.1), layers,
                               which=[0])
        assert (first["l2"], first["cos"]) == (0.0, 1.0), seed


def test_cosines_of_parallel_gradients_stay_within_minus_one_and_one():
    """G' = 2G and G' = -G: the ratio rounds past +-1 for about a third of vectors; a cosine cannot."""
    for seed in range(20):
        g = list(torch.randn(2, 9, generator=torch.Generator().manual_seed(seed)))
        (_, doubled), (_, opposite) = _distances_and_cosines([(g, [2 * t for t in g]), (g, [-t for t in g])])
        assert 1 - 1e-15 < doubled <= 1.0 and -1.0 <= opposite < -1 + 1e-15, seed


def test_distances_take_float64_copies_of_a_group_of_layers_at_a_time(monkeypatch):
    """The float64 copies behind the distances were taken of every measured layer's gradients at once: for
    VGG-16 at full width the probe's largest use of memory (3.2 times a step's at batch 32, against 1.04
    grouped). Grouped, they are one group's at a time, and no layer's numbers change."""
    generator = torch.Generator().manual_seed(0)
    layer = 64 * 64
    pairs = [([torch.randn(64, 64, generator=generator)], [torch.randn(64, 64, generator=generator)])
             for _ in range(4)]

    def measured() -> tuple[int, list]:
        out = []
        return peak_tensor_bytes(lambda: out.append(_distances_and_cosines(pairs))), out[0]

    monkeypatch.setattr(bnopt.probes.ics, "DISTANCE_CHUNK_ENTRIES", 4 * layer)
    all_at_once, expected = measured()
    monkeypatch.setattr(bnopt.probes.ics, "DISTANCE_CHUNK_ENTRIES", layer)
    one_layer_at_a_time, grouped = measured()
    # at a group's peak: G and G' concatenated in float64 (8 bytes an entry each) and their difference (8)
    assert 24 * layer <= one_layer_at_a_time < 25 * layer and all_at_once >= 4 * 24 * layer
    assert grouped == expected
    for (l2, cos), ([g], [g_shifted]) in zip(grouped, pairs):
        g, g_shifted = g.double(), g_shifted.double()
        cos_by_hand = (g * g_shifted).sum() / (g.norm() * g_shifted.norm())
        assert (l2, cos) == pytest.approx((float((g - g_shifted).norm()), float(cos_by_hand)), rel=1e-12)


# --- the paper's networks -------------------------------------------------------------------------------


class HiddenChain(nn.Module):
    """Hides a chain's structure (a ChainModel's, a Sequential's), so that measure_ics takes its general path."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def small_problem(kind: str, norm: str, noise: bool = False, seed: int = 0):
    """(model, loss_fn, batch) for a small instance of each of the paper's networks."""
    torch.manual_seed(seed)
    make = norm_factory(norm, p=1 if norm == "lp" else None, noise=NoiseSpec() if noise else None, seed=seed)
    if kind == "vgg":
        model = vgg(make, depth=11, width=0.0625, in_channels=3, image_size=16)
        batch = (torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,)))
        return model, nn.functional.cross_entropy, batch
    if kind == "mlp":
        model = mlp(make, in_features=20, hidden=[16, 16, 16])
        return model, nn.functional.cross_entropy, (torch.randn(40, 20), torch.randint(0, 10, (40,)))
    model = dln(make, dim=6, depth=8)
    return model, sum_squares, (torch.randn(50, 6), torch.randn(50, 6))


def brute_force_ics(model, loss_fn, batch, optimizer, step=0, layers_of=ChainModel.layer_params) -> list[tuple[list, list]]:
    """(G, G') of every layer by one full forward and backward per layer on deep copies: the naive scheme,
    sharing no code with the library. G' for layer i comes from a copy whose layers before i hold the
    copied optimiser's stepped values. ``layers_of(m)`` groups a copy's parameters; every pass starts from
    the random state of the call, as the measurement's passes do (dropout masks)."""
    x, y = batch
    rng = torch.get_rng_state()

    def gradients(m):
        m.train()
        for module in m.modules():
            if hasattr(module, "track_running_stats"):
                module.track_running_stats = False
        set_noise_step(m, step)
        m.zero_grad()
        torch.set_rng_state(rng)
        loss_fn(m(x), y).backward()
        return [[p.grad.clone() for p in layer] for layer in layers_of(m)]

    base = copy.deepcopy(model)
    g = gradients(base)
    stepped_model = copy.deepcopy(model)
    stepped_opt = copy.deepcopy(optimizer)
    stepped_opt.param_groups = [dict(group, params=list(stepped_model.parameters())) for group in optimizer.param_groups]
    stepped_opt.state = {sp: copy.deepcopy(optimizer.state[p]) for p, sp in zip(model.parameters(),
                                                                                 stepped_model.parameters())
                         if p in optimizer.state}
    for p, base_p in zip(stepped_model.parameters(), base.parameters()):
        p.grad = base_p.grad.clone()
    stepped_opt.step()
    torch.set_rng_state(rng)
    out = []
    stepped_layers = layers_of(stepped_model)
    for i in range(len(stepped_layers)):
        shifted = copy.deepcopy(model)
        with torch.no_grad():
            for layer, stepped in zip(layers_of(shifted)[:i], stepped_layers):
                for p, new in zip(layer, stepped):
                    p.copy_(new)
        out.append((g[i], gradients(shifted)[i]))
    torch.set_rng_state(rng)
    return out


def assert_bit_for_bit(fast: dict, naive: list) -> None:
    """ics_gradients' (G, G') of every layer equal the brute force's, tensor by tensor, bit for bit."""
    assert len(fast) == len(naive)
    for (g, g_shifted), (g_naive, g_shifted_naive) in zip(fast.values(), naive):
        assert all(torch.equal(x, y) for x, y in zip(g, g_naive, strict=True))
        assert all(torch.equal(x, y) for x, y in zip(g_shifted, g_shifted_naive, strict=True))


def l2_and_cos(g, g_shifted) -> tuple[float, float]:
    a = torch.cat([t.flatten() for t in g]).double()
    b = torch.cat([t.flatten() for t in g_shifted]).double()
    return float((a - b).norm()), float(a @ b / (a.norm() * b.norm()))


CASES = [("vgg", "batchnorm", False), ("vgg", "none", False), ("vgg", "batchnorm", True), ("mlp", "batchnorm", False),
         ("mlp", "lp", False), ("dln", "batchnorm", False), ("dln", "none", False), ("dln", "none", True)]


@pytest.mark.parametrize("kind, norm, noise", CASES)
def test_ics_is_bit_for_bit_the_naive_scheme(kind, norm, noise):
    model, loss_fn, batch = small_problem(kind, norm, noise)
    set_noise_step(model, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3 if kind == "dln" else 0.1, momentum=0.9)
    optimizer.zero_grad()
    loss_fn(model(batch[0]), batch[1]).backward()
    optimizer.step()  # momentum buffers exist
    fast = ics_gradients(model, loss_fn, batch, optimizer, model.layer_params())
    naive = brute_force_ics(model, loss_fn, batch, optimizer, step=3)
    assert list(fast) == list(range(model.num_layers))
    assert_bit_for_bit(fast, naive)
    measured = measure_ics(model, loss_fn, batch, optimizer, model.layer_params())
    for m, pair in zip(measured, naive, strict=True):
        l2, cos = l2_and_cos(*pair)
        assert m["l2"] == pytest.approx(l2, rel=1e-12)
        assert m["cos"] == pytest.approx(min(cos, 1.0), rel=1e-12)


@pytest.mark.parametrize("kind, norm, noise", [("vgg", "batchnorm", True), ("dln", "none", True), ("mlp", "batchnorm", False)])
def test_shared_prefix_and_general_paths_agree_bit_for_bit(kind, norm, noise):
    model, loss_fn, batch = small_problem(kind, norm, noise)

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3 if kind == "dln" else 0.1)
    chain = measure_ics(model, loss_fn, batch, optimizer, model.layer_params())
    general = measure_ics(HiddenChain(model), loss_fn, batch, optimizer, model.layer_params())
    assert chain == general


@pytest.mark.parametrize("hidden", [False, True], ids=["chain", "general"])
def test_a_graph_built_before_measuring_still_backwards_to_the_same_gradients(hidden):
    """Measuring between a caller's forward and backward: the simulated step's in-place writes must not
    leave the parameters looking modified to autograd (it would refuse to backward), nor change the result."""
    model, loss_fn, batch = small_problem("mlp", "batchnorm")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn(model(batch[0]), batch[1]).backward()
    optimizer.step()  # Adam's moments exist
    expected = torch.autograd.grad(loss_fn(model(batch[0]), batch[1]), list(model.parameters()))
    loss = loss_fn(model(batch[0]), batch[1])
    measure_ics(HiddenChain(model) if hidden else model, loss_fn, batch, optimizer, model.layer_params())
    assert all(torch.equal(g, e) for g, e in zip(torch.autograd.grad(loss, list(model.parameters())), expected))


@pytest.mark.parametrize("kind, norm, noise", [("vgg", "batchnorm", True), ("dln", "none", True), ("dln", "batchnorm", False)])
def test_layers_before_i_without_update_give_no_shift(kind, norm, noise):
    """lr 0 for layers before i: G' = G exactly, noise included. This holds only if every pass sees the
    noise of (layer, step), whatever order the layers run in."""
    model, loss_fn, batch = small_problem(kind, norm, noise)
    layers = model.layer_params()
    i = model.num_layers - 2
    optimizer = torch.optim.SGD([{"params": [p for layer in layers[:i] for p in layer], "lr": 0.0},
                                 {"params": [p for layer in layers[i:] for p in layer], "lr": 0.1}])
    set_noise_step(model, 5)
    (result,) = measure_ics(model, loss_fn, batch, optimizer, layers, which=[i])
    assert result["l2"] == 0.0
    assert result["cos"] == 1.0
    optimizer.param_groups[0]["lr"] = 0.1
    (moved,) = measure_ics(model, loss_fn, batch, optimizer, layers, which=[i])
    assert moved["l2"] > 0  # and the same layer does shift once the prefix moves


class OldStyleSGD(torch.optim.Optimizer):
    """What hand-written optimisers do and torch's own avoid: weight decay added into ``.grad`` in place
    (torch's SGD did, before 1.5), a step counter kept in the parameter group (as schedule-free optimisers
    keep theirs), a state entry and a group entry that appear only from the second step (timm's Lamb adds
    its step count to the group at the first), and state tensors updated in place."""

    def __init__(self, params, lr: float, weight_decay: float):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "steps_taken": 0})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            group["steps_taken"] += 1
            if group["steps_taken"] >= 2:
                group["warmed_up"] = True
            for p in group["params"]:
                d_p = p.grad.add_(p, alpha=group["weight_decay"])
                state = self.state[p]
                state.setdefault("grad_sum", torch.zeros_like(p)).add_(d_p)
                if group["steps_taken"] >= 2:
                    state.setdefault("largest", torch.zeros_like(p)).copy_(torch.maximum(state["largest"], d_p.abs()))
                p.add_(d_p + 0.1 * state["grad_sum"], alpha=-group["lr"])


@pytest.mark.parametrize("use_grad_fields", [True, False], ids=["grad fields", "computing G"])
def test_an_optimiser_that_writes_into_grad_and_its_groups_is_simulated_and_put_back(use_grad_fields):
    """W(t+1) is this optimiser's real step (bit for bit the naive scheme's), yet afterwards .grad (which the
    step wrote into), the group's counter and keys (the step added one), the state's keys (the step added
    one) and the state's tensor objects (the optimiser and anything holding them keep using those) are as
    they were."""
    model, loss_fn, batch = small_problem("mlp", "batchnorm")
    optimizer = OldStyleSGD(model.parameters(), lr=0.1, weight_decay=0.01)
    loss_fn(model(batch[0]), batch[1]).backward()
    optimizer.step()  # steps_taken 1: the next step adds "largest" to the state
    optimizer.zero_grad()
    loss_fn(model(batch[0]), batch[1]).backward()
    before = snapshot(model, optimizer)
    held = {p: dict(optimizer.state[p]) for p in model.parameters()}
    fast = ics_gradients(model, loss_fn, batch, optimizer, model.layer_params(), use_grad_fields=use_grad_fields)
    assert_same(before, snapshot(model, optimizer))
    assert all(optimizer.state[p][k] is v for p, state in held.items() for k, v in state.items())
    assert "warmed_up" not in optimizer.param_groups[0]
    assert_bit_for_bit(fast, brute_force_ics(model, loss_fn, batch, optimizer))


def test_a_tensor_learning_rate_goes_back_as_the_same_tensor():
    """A user who keeps the learning rate as a tensor and changes it in place (a schedule of their own)
    must still reach the optimiser after a measurement."""
    model, loss_fn, batch = small_problem("mlp", "batchnorm")
    lr = torch.tensor(0.01)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    measure_ics(model, loss_fn, batch, optimizer, model.layer_params())
    assert optimizer.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.01)


class ResidualChain(ChainModel):
    """A ChainModel whose forward adds each block's input to its output: not the composition of its blocks."""

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x


def test_a_chain_model_with_its_own_forward_is_bit_for_bit_the_naive_scheme():
    model, loss_fn, batch = small_problem("dln", "batchnorm")
    model = ResidualChain(list(model.blocks))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn(model(batch[0]), batch[1]).backward()
    optimizer.step()  # momentum buffers exist
    assert_bit_for_bit(ics_gradients(model, loss_fn, batch, optimizer, model.layer_params()),
                       brute_force_ics(model, loss_fn, batch, optimizer))


# --- models the repo has never seen: nn.Sequential ---------------------------------------------------------


def small_sequential(seed: int = 0) -> nn.Sequential:
    """Conv/BN/ReLU with dropout before and after layer boundaries, and a nested Sequential."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.3),
        nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout2d(0.2)),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(8, 10),
    )


def sequential_layers(m: nn.Sequential) -> list[list[nn.Parameter]]:
    """A conv and its BN form one layer; the nested block is one layer."""
    return [[*m[0].parameters(), *m[1].parameters()], list(m[4].parameters()), list(m[6].parameters()),
            list(m[11].parameters())]


def interleaved_layers(m: nn.Sequential) -> list[list[nn.Parameter]]:
    """The first layer holds the head too: "before layer i" is then not a prefix of the network's stages."""
    first, *middle, head = sequential_layers(m)
    return [first + head, *middle]


def double_the_output(module, inputs, output):
    return 2 * output


class TripledSequential(nn.Sequential):
    """A Sequential whose own forward is not just the composition of its stages."""

    def forward(self, x):
        return 3 * super().forward(x)


@pytest.mark.parametrize("variant", ["plain", "interleaved layers", "hooked container",
                                     "subclass with its own forward"])
def test_sequential_models_are_bit_for_bit_the_naive_scheme(variant):
    """An nn.Sequential takes the shared-prefix path, which must give the naive scheme's G and G' exactly:
    the dropout masks differ between draws, so this holds only if every suffix starts from the random
    state a full pass has there. Interleaved layers, or a hook on the container (which calling the stages
    one by one would skip), or a subclass with its own forward, must send it down the general path and
    still be exact."""
    model = small_sequential()
    if variant == "subclass with its own forward":
        model = TripledSequential(*model)
    layers_of = interleaved_layers if variant == "interleaved layers" else sequential_layers
    if variant == "hooked container":
        model.register_forward_hook(double_the_output)
    loss_fn = nn.functional.cross_entropy
    batch = (torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn(model(batch[0]), batch[1]).backward()
    optimizer.step()  # momentum buffers exist
    fast = ics_gradients(model, loss_fn, batch, optimizer, layers_of(model))
    naive = brute_force_ics(model, loss_fn, batch, optimizer, layers_of=layers_of)
    assert_bit_for_bit(fast, naive)
    assert any(not torch.equal(a, b) for g, g_shifted in fast.values() for a, b in zip(g, g_shifted))


# --- random nn.Sequential models: architectures and optimisers no test above spells out -----------------


def random_sequential(seed: int) -> tuple[nn.Sequential, list[list[int]], torch.Tensor]:
    """An MLP or a small conv net of random blocks — weight layer, maybe BN or LayerNorm, ReLU (in place or
    not) or a smooth activation, maybe pooling and dropout, some blocks nested — sometimes with a linear
    layer used twice (a shared parameter: the general path). Returns the model, its parameter-holding
    modules (positions among the flattened modules) grouped into consecutive layers at random, and an input."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    conv = rng.random() < 0.4
    width = 4 if conv else 6

    def block():
        if conv:
            parts = [nn.Conv2d(width, width, 3, padding=1, bias=rng.random() < 0.5)]
            parts += [nn.BatchNorm2d(width)] if rng.random() < 0.5 else []
            parts += [rng.choice([nn.ReLU(inplace=True), nn.ReLU(), nn.GELU()])]
            parts += [rng.choice([nn.MaxPool2d(3, 1, 1), nn.AvgPool2d(3, 1, 1), nn.Dropout2d(0.3), nn.Identity()])]
        else:
            parts = [nn.Linear(width, width, bias=rng.random() < 0.7)]
            parts += [rng.choice([nn.BatchNorm1d(width), nn.LayerNorm(width), nn.Identity()])]
            parts += [rng.choice([nn.ReLU(inplace=True), nn.ReLU(), nn.Tanh()])]
            parts += [nn.Dropout(0.3)] if rng.random() < 0.4 else []
        return [nn.Sequential(*parts)] if rng.random() < 0.3 else parts

    stem = nn.Conv2d(3, width, 3, padding=1) if conv else nn.Linear(4, width)
    body = [m for _ in range(rng.randint(2, 4)) for m in block()]
    linears = [m for m in body if isinstance(m, nn.Linear)]
    if linears and rng.random() < 0.3:
        body += [linears[0], nn.Tanh()]  # the same weights twice
    head = [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * width, 3)] if conv else [nn.Linear(width, 3)]
    model = nn.Sequential(stem, *body, *head)
    holders, seen = [], set()
    for k, m in enumerate(flat_modules(model)):
        if any(True for _ in m.parameters(recurse=False)) and id(m) not in seen:
            seen.add(id(m))
            holders.append(k)
    groups, current = [], []
    for k in holders:
        current.append(k)
        if k == holders[-1] or rng.random() < 0.6:
            groups.append(current)
            current = []
    inputs = torch.randn(8, 3, 6, 6) if conv else torch.randn(16, 4)
    return model, groups, inputs


def flat_modules(model: nn.Module) -> list[nn.Module]:
    return [leaf for child in model for leaf in flat_modules(child)] if isinstance(model, nn.Sequential) else [model]


OPTIMIZERS = [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
    lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5),
    lambda ps: torch.optim.Adagrad(ps, lr=0.1),
]


@pytest.mark.parametrize("seed", range(15))
def test_random_sequential_models_are_bit_for_bit_the_naive_scheme_and_left_untouched(seed):
    model, groups, inputs = random_sequential(seed)

    def layers_of(m):
        modules = flat_modules(m)
        return [[p for k in group for p in modules[k].parameters(recurse=False)] for group in groups]

    optimizer = OPTIMIZERS[seed % len(OPTIMIZERS)](model.parameters())
    batch = (inputs, torch.randint(0, 3, (len(inputs),)))
    loss_fn = nn.functional.cross_entropy
    loss_fn(model(batch[0]), batch[1]).backward()
    optimizer.step()  # optimiser state exists
    before = snapshot(model, optimizer)
    fast = ics_gradients(model, loss_fn, batch, optimizer, layers_of(model))
    assert_same(before, snapshot(model, optimizer))
    assert_bit_for_bit(fast, brute_force_ics(model, loss_fn, batch, optimizer, layers_of=layers_of))


class AddInPlace(nn.Module):
    """A layer that writes into its input, as in-place modules do."""

    def __init__(self, features: int):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(features, dtype=torch.float64))

    def forward(self, x):
        return x.add_(self.bias)


def test_a_stage_writing_into_its_input_does_not_corrupt_the_shared_prefix():
    """Layer 1 adds its bias to the prefix output in place; the prefix of layer 2 must not build on that."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), AddInPlace(5), nn.Tanh(), nn.Linear(5, 3)).double()
    layers_of = lambda m: [list(m[0].parameters()), list(m[1].parameters()), list(m[3].parameters())]  # noqa: E731
    batch = (torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fast = ics_gradients(model, sum_squares, batch, optimizer, layers_of(model))
    naive = brute_force_ics(model, sum_squares, batch, optimizer, layers_of=layers_of)
    assert_bit_for_bit(fast, naive)


class TwoLinears(nn.Module):
    """One stage of a Sequential that holds two layers."""

    def __init__(self, width: int):
        super().__init__()
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_a_stage_holding_two_layers_moves_the_first_for_the_second():
    """Layer 2's G' needs layer 1 (in the same stage) at its stepped value: the stage cannot be the prefix's
    boundary for both."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), TwoLinears(5), nn.Tanh(), nn.Linear(5, 3)).double()
    layers_of = lambda m: [list(m[0].parameters()), list(m[2].a.parameters()), list(m[2].b.parameters()),  # noqa: E731
                           list(m[4].parameters())]
    batch = (torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fast = ics_gradients(model, sum_squares, batch, optimizer, layers_of(model))
    naive = brute_force_ics(model, sum_squares, batch, optimizer, layers_of=layers_of)
    assert_bit_for_bit(fast, naive)


def test_work_of_each_scheme_in_closed_form():
    """The shared-prefix scheme does exactly its work: a K-layer linear chain (no norm), counted in matrix
    products of one layer on the batch (forward, input gradient or weight gradient: 2 n d^2 FLOPs each).
    Shared prefix: the moved prefix once (K-1), then for layer i the suffix forward (K-i) and a backward
    that stops at layer i (its weight gradient and the K-1-i input gradients after it): K^2 - 1 in all.
    The general path runs the whole net forward per layer: 3K(K-1)/2. Computing G adds one step (3K-1).
    Results are equal either way, so only this count shows which scheme ran and that backwards stop."""
    depth, dim, n = 6, 4, 8
    torch.manual_seed(0)
    model = dln(norm_factory("none"), dim=dim, depth=depth)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    batch = (torch.randn(n, dim), torch.randn(n, dim))
    sum_squares(model(batch[0]), batch[1]).backward()

    def products(measured_model, layers=model.layer_params(), **kwargs) -> float:
        with FlopCounterMode(display=False) as counter:
            measure_ics(measured_model, sum_squares, batch, optimizer, layers, **kwargs)
        return counter.get_total_flops() / (2 * n * dim * dim)

    step = 3 * depth - 1
    assert products(model, use_grad_fields=True) == depth**2 - 1
    assert products(model) == depth**2 - 1 + step
    assert products(HiddenChain(model), use_grad_fields=True) == 3 * depth * (depth - 1) / 2
    assert products(model, which=[3], use_grad_fields=True) == 3 + 2 * (depth - 3)  # prefix, suffix, backward
    # The same chain as an nn.Sequential (partly nested) takes the same path. With the first layer holding
    # the last linear too it takes the general one: for index i (linear i), the whole net forward and a
    # backward to linear i (its weight gradient and the K-1-i input gradients after it).
    linears = [block.weight for block in model.blocks]
    sequential = nn.Sequential(*linears[:2], nn.Sequential(*linears[2:]))
    assert products(sequential, use_grad_fields=True) == depth**2 - 1
    first, *middle, last = model.layer_params()
    assert products(sequential, layers=[first + last, *middle], use_grad_fields=True) == sum(
        depth + depth - i for i in range(1, depth - 1))
