"""probe_landscape against the closed form on a quadratic, and both probes as pure observations."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from bnopt.norms import set_noise_step
from bnopt.probes import ics_gradients, measure_ics, probe_landscape, random_state
from bnopt.probes.landscape import batching_pays_on, vmap_pays
from bnopt.probes.loop import ICSProbe, LandscapeProbe
from conftest import assert_same, snapshot
from test_ics import HiddenChain, assert_bit_for_bit, brute_force_ics, small_problem


class Quadratic(nn.Module):
    """L(w) = 0.5 w^T A w, whatever the batch: gradient A w, Hessian A."""

    def __init__(self, a: torch.Tensor, w: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)
        self.w = nn.Parameter(w.clone())

    def forward(self, inputs):
        return 0.5 * self.w @ self.a @ self.w


def loss_is_output(out, targets):
    return out


def quadratic(seed=0, n=6):
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    eigenvalues = torch.linspace(0.5, 8.0, n, dtype=torch.float64)
    a = q @ torch.diag(eigenvalues) @ q.T
    w = torch.randn(n, generator=gen, dtype=torch.float64)
    return a, w, q, eigenvalues


ETAS = [0.01, 0.05, 0.1, 0.3]
BATCH = (torch.zeros(1), torch.zeros(1))


@pytest.mark.parametrize("batched", [False, True])
def test_quadratic_along_the_gradient_matches_the_closed_form(batched):
    a, w, _, _ = quadratic()
    g = a @ w
    result = probe_landscape(Quadratic(a, w), loss_is_output, BATCH, ETAS, batched=batched)
    for k, eta in enumerate(ETAS):
        moved = w - eta * g
        assert result["loss"][k] == pytest.approx(float(0.5 * moved @ a @ moved), rel=1e-12)
        # grad L(w - eta g) = g - eta A g, so the gradient moves by eta ||A g||
        assert result["grad_diff"][k] == pytest.approx(float(eta * (a @ g).norm()), rel=1e-10)
    assert result["beta"] == pytest.approx(float((a @ g).norm() / g.norm()), rel=1e-10)
    assert result["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-12)
    assert result["eta"] == ETAS


class SummedWeights(nn.Module):
    """L = c (a + b + sum(v)) with c the sum of the inputs: linear in the weights, so the gradient is c
    everywhere and moves by nothing. Autograd hands a and b one shared gradient tensor and v a broadcast
    view of it, so a probe that wrote into the gradients it gets back would see them change under it."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
        self.v = nn.Parameter(torch.ones(4, dtype=torch.float64))

    def forward(self, inputs):
        return inputs.sum() * (self.a + self.b + self.v.sum())


@pytest.mark.parametrize("batched", [False, True])
def test_gradients_that_autograd_shares_or_broadcasts(batched):
    c, n_weights, start = 1.5, 6, 7.0  # start = a + b + sum(v)
    result = probe_landscape(SummedWeights(), loss_is_output, (torch.full((3,), 0.5, dtype=torch.float64), None),
                             ETAS, batched=batched)
    assert result["grad_diff"] == [0.0] * len(ETAS)
    assert result["beta"] == 0.0
    assert result["grad_norm"] == pytest.approx(c * n_weights ** 0.5, rel=1e-12)
    for loss, eta in zip(result["loss"], ETAS):
        assert loss == pytest.approx(c * (start - eta * c * n_weights), rel=1e-12)  # every weight moves by eta c


class Quartic(nn.Module):
    """L(w) = w^4 / 4 for one weight: gradient w^3, so the ratios beta maximises differ between step sizes."""

    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w], dtype=torch.float64))

    def forward(self, x):
        return self.w.pow(4).sum() / 4


@pytest.mark.parametrize("batched", [False, True])
def test_beta_is_the_largest_ratio_over_the_step_sizes(batched):
    """At w = 1 (g = 1): grad L(1 - eta) = (1 - eta)^3, so the ratio |g - grad L(1 - eta)| / eta is 2.71 at
    eta = 0.1 and 1.75 at eta = 0.5; beta is the larger, wherever it sits in the list."""
    for etas in ([0.1, 0.5], [0.5, 0.1]):
        land = probe_landscape(Quartic(1.0), loss_is_output, BATCH, etas, batched=batched)
        assert land["loss"] == pytest.approx([(1 - eta) ** 4 / 4 for eta in etas], rel=1e-12)
        assert land["grad_diff"] == pytest.approx([1 - (1 - eta) ** 3 for eta in etas], rel=1e-12)
        assert land["beta"] == pytest.approx(2.71, rel=1e-12)


def test_beta_is_the_rayleigh_quotient_when_the_gradient_is_an_eigenvector():
    """In general beta = ||A g|| / ||g||; along an eigenvector it is the Rayleigh quotient g^T A g / g^T g."""
    a, _, q, eigenvalues = quadratic()
    w = q[:, 2] * 3.0
    g = a @ w
    result = probe_landscape(Quadratic(a, w), loss_is_output, BATCH, ETAS)
    assert result["beta"] == pytest.approx(float(g @ a @ g / (g @ g)), rel=1e-10)
    assert result["beta"] == pytest.approx(float(eigenvalues[2]), rel=1e-10)


@pytest.mark.parametrize("batched", [False, True])
def test_quadratic_along_a_given_direction(batched):
    a, w, _, _ = quadratic(seed=1)
    d = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    g = a @ w
    result = probe_landscape(Quadratic(a, w), loss_is_output, BATCH, ETAS, direction=[d], batched=batched)
    for k, eta in enumerate(ETAS):
        moved = w - eta * d
        assert result["loss"][k] == pytest.approx(float(0.5 * moved @ a @ moved), rel=1e-12)
        assert result["grad_diff"][k] == pytest.approx(float(eta * (a @ d).norm()), rel=1e-10)
    assert result["beta"] == pytest.approx(float((a @ d).norm() / d.norm()), rel=1e-10)
    assert result["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-12)


@pytest.mark.parametrize("batched", [False, True])
def test_a_direction_scaled_to_the_gradient_moves_by_the_gradients_length(batched):
    """``scale_to_gradient=True``: the quadratic's closed form along d ||g|| / ||d||, whatever d's length."""
    a, w, _, _ = quadratic(seed=1)
    d = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    g = a @ w
    at_length = d * g.norm() / d.norm()
    result = probe_landscape(Quadratic(a, w), loss_is_output, BATCH, ETAS, direction=[7 * d], batched=batched,
                             scale_to_gradient=True)
    for k, eta in enumerate(ETAS):
        moved = w - eta * at_length
        assert result["loss"][k] == pytest.approx(float(0.5 * moved @ a @ moved), rel=1e-12)
        assert result["grad_diff"][k] == pytest.approx(float(eta * (a @ at_length).norm()), rel=1e-10)
    assert result["beta"] == pytest.approx(float((a @ d).norm() / d.norm()), rel=1e-10)  # beta: d's, not its length's
    assert result["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-12)


@pytest.mark.parametrize("batched", [False, True])
def test_at_a_stationary_point_nothing_moves_and_beta_is_undefined(batched):
    """At w = 0 the quadratic's gradient is 0: every eta evaluates w itself (loss 0, gradient unchanged) and
    beta, a ratio over ||eta g|| = 0, is NaN, not a ZeroDivisionError that would end the training run.
    The same along a zero direction from anywhere."""
    a, w, _, _ = quadratic()
    at_minimum = probe_landscape(Quadratic(a, torch.zeros_like(w)), loss_is_output, BATCH, ETAS, batched=batched)
    assert at_minimum["loss"] == at_minimum["grad_diff"] == [0.0] * len(ETAS) and at_minimum["grad_norm"] == 0.0
    assert math.isnan(at_minimum["beta"])
    standing = probe_landscape(Quadratic(a, w), loss_is_output, BATCH, ETAS, direction=[torch.zeros_like(w)],
                               batched=batched)
    assert standing["loss"] == [pytest.approx(float(0.5 * w @ a @ w), rel=1e-12)] * len(ETAS)
    # (batched, the gradient at w is vmap's, which rounds apart from the one computed unbatched)
    assert standing["grad_diff"] == pytest.approx([0.0] * len(ETAS), abs=1e-12) and math.isnan(standing["beta"])


class CancellingExponentials(nn.Module):
    """L(w) = 0.5 w^2 + (e^w - e^w): gradient w, until e^w overflows float32 (w > 88.7) and both are NaN."""

    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, inputs):
        return 0.5 * self.w ** 2 + (self.w.exp() - self.w.exp())


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("etas", [[0.5, 100.0], [100.0, 0.5]])
def test_an_evaluation_that_overflows_makes_beta_undefined_in_any_order(batched, etas):
    """At w = -1 (g = -1), eta = 0.5 lands on w = -0.5 (grad_diff 0.5, ratio 1); eta = 100 on w = 99, where
    the gradient is NaN. Python's max skipped the NaN when it came second: beta was 1.0 for one order."""
    result = probe_landscape(CancellingExponentials(-1.0), loss_is_output, BATCH, etas, batched=batched)
    by_eta = dict(zip(result["eta"], result["grad_diff"]))
    assert by_eta[0.5] == 0.5 and math.isnan(by_eta[100.0])
    assert math.isnan(result["beta"])
    assert probe_landscape(CancellingExponentials(-1.0), loss_is_output, BATCH, [0.5], batched=batched)["beta"] == 1.0


@pytest.mark.parametrize("batched", [False, True])
def test_norms_of_float32_gradients_beyond_the_square_root_of_float32s_range_are_finite(batched):
    """L = 0.5 w^T A w with A = 1e20 I and w = 1 in float32: every gradient entry (1e20, and 9e19 at the
    step) fits float32, but their squares do not. The norms, squared in float32, read inf and beta NaN."""
    model = Quadratic(1e20 * torch.eye(4), torch.ones(4))
    result = probe_landscape(model, loss_is_output, BATCH, [1e-21], batched=batched)
    assert result["grad_norm"] == pytest.approx(2e20, rel=1e-6)
    assert result["grad_diff"] == [pytest.approx(2e19, rel=1e-5)]
    assert result["beta"] == pytest.approx(1e20, rel=1e-5)  # the Rayleigh quotient of A


def test_bad_arguments_are_refused():
    a, w, _, _ = quadratic()
    for etas in ([0.1, -1.0], [0.0], [float("nan")], [float("inf")]):
        with pytest.raises(ValueError, match="positive"):
            probe_landscape(Quadratic(a, w), loss_is_output, BATCH, etas)
    with pytest.raises(ValueError, match="random state of 1 CUDA devices"):  # a CUDA model's state, on the CPU
        probe_landscape(Quadratic(a, w), loss_is_output, BATCH, [0.1],
                        rng_state=(torch.get_rng_state(), [torch.get_rng_state()]))
    with pytest.raises(ValueError, match="one tensor per trainable parameter"):
        probe_landscape(Quadratic(a, w), loss_is_output, BATCH, [0.1], direction=[torch.zeros(3)])
    with pytest.raises(ValueError, match="one tensor per trainable parameter"):  # a state dict's keys are names
        probe_landscape(Quadratic(a, w), loss_is_output, BATCH, [0.1], direction={"w": torch.zeros_like(w)})
    for length in (0.0, math.inf, math.nan):  # no length to change (it would give NaN everywhere, silently)
        with pytest.raises(ValueError, match=rf"direction has length {length}: scale_to_gradient=True needs"):
            probe_landscape(Quadratic(a, w), loss_is_output, BATCH, [0.1], direction=[torch.full_like(w, length)],
                            scale_to_gradient=True)
    for loss_fn, got in ((lambda out, targets: out.item(), "a float"), (lambda out, targets: out.repeat(3),
                                                                       r"a tensor of shape \(3,\)")):
        with pytest.raises(TypeError, match=f"must return the loss as a one-element tensor.*; got {got}$"):
            probe_landscape(Quadratic(a, w), loss_fn, BATCH, [0.1])
    frozen = Quadratic(a, w).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        probe_landscape(frozen, loss_is_output, BATCH, [0.1])
    for batch, what in (({"x": BATCH[0], "y": BATCH[1]}, "dict"), ((*BATCH, BATCH[1]), "tuple of 3")):
        with pytest.raises(ValueError, match=rf"batch must be a pair \(inputs, targets\).*got a {what}"):
            probe_landscape(Quadratic(a, w), loss_is_output, batch, [0.1])


@pytest.mark.parametrize("kind, norm, noise", [("mlp", "batchnorm", False), ("dln", "batchnorm", False),
                                               ("mlp", "lp", False), ("mlp", "batchnorm", True)])
def test_batched_and_looped_evaluations_agree(kind, norm, noise):
    """Noisy layers included: their draws, from their own generator, are the same at every eta."""
    model, loss_fn, batch = small_problem(kind, norm, noise=noise)
    etas = [1e-4, 1e-3] if kind == "dln" else [0.05, 0.2]
    looped = probe_landscape(model, loss_fn, batch, etas, batched=False)
    batched = probe_landscape(model, loss_fn, batch, etas, batched=True)
    for key in ("loss", "grad_diff"):
        np.testing.assert_allclose(batched[key], looped[key], rtol=1e-4)
    assert batched["beta"] == pytest.approx(looped["beta"], rel=1e-4)


# --- purity ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("eval_mode", [False, True])
@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-3),
    lambda ps: torch.optim.Adam(ps, lr=1e-3, weight_decay=1e-3),
], ids=["sgd", "adam"])
def test_probes_change_nothing_and_repeat_exactly(noise, eval_mode, make_optimizer):
    model, loss_fn, batch = small_problem("vgg", "batchnorm", noise=noise)
    set_noise_step(model, 2)
    optimizer = make_optimizer(model.parameters())
    for _ in range(2):  # running statistics, momentum buffers and .grad all hold something
        optimizer.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        optimizer.step()
    if eval_mode:
        model.eval()
    torch.manual_seed(11)
    before = snapshot(model, optimizer)
    ics = measure_ics(model, loss_fn, batch, optimizer, model.layer_params())
    land = probe_landscape(model, loss_fn, batch, [0.05, 0.1, 0.2, 0.4])
    land_random = probe_landscape(model, loss_fn, batch, [0.1], direction=[torch.ones_like(p) for p in model.parameters()])
    assert_same(before, snapshot(model, optimizer))
    assert measure_ics(model, loss_fn, batch, optimizer, model.layer_params()) == ics
    assert probe_landscape(model, loss_fn, batch, [0.05, 0.1, 0.2, 0.4]) == land
    assert probe_landscape(model, loss_fn, batch, [0.1], direction=[torch.ones_like(p) for p in model.parameters()]) == land_random
    assert all(np.isfinite(r["l2"]) and r["l2"] >= 0 for r in ics)


def test_probes_use_batch_statistics_whatever_the_models_mode():
    model, loss_fn, batch = small_problem("mlp", "batchnorm")
    for _ in range(3):
        model(batch[0])  # running statistics drift away from the batch's
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_mode = measure_ics(model, loss_fn, batch, optimizer, model.layer_params())
    land_train = probe_landscape(model, loss_fn, batch, [0.1])
    model.eval()
    assert measure_ics(model, loss_fn, batch, optimizer, model.layer_params()) == train_mode
    assert probe_landscape(model, loss_fn, batch, [0.1]) == land_train
    assert not model.training


def numerics_flags() -> tuple[bool, bool, bool]:
    """The global flags that decide a pass's arithmetic on a GPU: TF32 matmuls, TF32 convolutions, and
    cuDNN's deterministic algorithms."""
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic


class RecordsNumericsFlags(torch.nn.Linear):
    """A layer that notes the numerics flags at each forward pass."""

    seen: set

    def forward(self, x):
        self.seen.add(numerics_flags())
        return super().forward(x)


def test_probes_measure_in_full_fp32_with_deterministic_cudnn_and_put_the_flags_back():
    """A training run may allow TF32 and cuDNN's atomics-based algorithms; a measurement must not: two passes
    at the same weights would differ in their last bits (or, with TF32, in their fourth digit)."""
    layer = RecordsNumericsFlags(4, 3)
    layer.seen = set()
    model = torch.nn.Sequential(layer, torch.nn.ReLU(), torch.nn.Linear(3, 1))
    batch = (torch.randn(8, 4), torch.randn(8, 1))
    loss_fn = torch.nn.functional.mse_loss
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = numerics_flags()
    # Set and put back by hand: the matmul flag lives behind the module's __getattr__, which pytest 9.2's
    # monkeypatch takes for an absent attribute and deletes on undo (an AttributeError there).
    try:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic = True, True, False
        measure_ics(model, loss_fn, batch, optimizer, [list(model[0].parameters()), list(model[2].parameters())])
        probe_landscape(model, loss_fn, batch, [0.1], batched=False)
        assert layer.seen == {(False, False, True)}
        assert numerics_flags() == (True, True, False)
    finally:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.deterministic = saved


def test_probes_measure_in_full_fp32_under_a_lower_matmul_precision_and_put_it_back():
    """Under ``set_float32_matmul_precision("medium")`` a CPU with AMX multiplies float32 in bf16 (and a GPU
    in TF32): the probes measure as under "highest", and leave "medium" set and readable (newer torch
    cannot report a precision set through the legacy flag after the new API)."""
    model, loss_fn, batch = small_problem("mlp", "batchnorm")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    exact = (measure_ics(model, loss_fn, batch, optimizer, model.layer_params()),
             probe_landscape(model, loss_fn, batch, [0.1, 0.2]))
    try:
        torch.set_float32_matmul_precision("medium")
        lowered = (measure_ics(model, loss_fn, batch, optimizer, model.layer_params()),
                   probe_landscape(model, loss_fn, batch, [0.1, 0.2]))
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision("highest")
    assert lowered == exact


def test_the_simulated_step_runs_no_step_hooks_and_leaves_the_schedulers_record():
    """Step hooks may keep state (an average of the weights): the optimiser's and the global ones do not
    run inside measure_ics, and run again at the real step."""
    model, loss_fn, batch = small_problem("mlp", "batchnorm")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)  # wraps step() to note that it was called
    calls = []
    handles = [optimizer.register_step_pre_hook(lambda *_: calls.append("pre")),
               optimizer.register_step_post_hook(lambda *_: calls.append("post")),
               register_optimizer_step_pre_hook(lambda *_: calls.append("global pre")),
               register_optimizer_step_post_hook(lambda *_: calls.append("global post"))]
    try:
        called = vars(optimizer).get("_opt_called", "absent")
        measure_ics(model, loss_fn, batch, optimizer, model.layer_params())
        assert calls == [] and vars(optimizer).get("_opt_called", "absent") == called
        loss_fn(model(batch[0]), batch[1]).backward()
        optimizer.step()
        assert sorted(calls) == ["global post", "global pre", "post", "pre"]
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("eval_mode", [False, True])
def test_instance_norms_running_statistics_are_left_alone(eval_mode):
    """Instance norm updates its running statistics whatever ``track_running_stats`` says: they are put
    back, and ICS is still the brute force's bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
                          nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).double()
    layers_of = lambda m: [list(m[k].parameters()) for k in (0, 1, 4)]  # noqa: E731
    batch = (torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (5,)))
    loss_fn = nn.functional.cross_entropy
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn(model(batch[0]), batch[1]).backward()
    optimizer.step()  # running statistics and momentum buffers hold something
    model.train(not eval_mode)
    before = snapshot(model, optimizer)
    fast = ics_gradients(model, loss_fn, batch, optimizer, layers_of(model))
    probe_landscape(model, loss_fn, batch, [0.1, 0.2])
    assert_same(before, snapshot(model, optimizer))
    assert_bit_for_bit(fast, brute_force_ics(model, loss_fn, batch, optimizer, layers_of=layers_of))


def test_a_parameter_without_gradient_stays_where_the_real_step_leaves_it():
    """A parameter the loss reaches only through ``.detach()`` has no gradient, and the real step skips it
    (momentum and all); the simulated step must too, or G' would come from weights the step never gives."""

    class DetachedScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(8, dtype=torch.float64))

        def forward(self, x):
            return x * self.scale.detach()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), DetachedScale(), nn.Tanh(), nn.Linear(8, 3)).double()
    layers = [list(model[0].parameters()) + [model[1].scale], list(model[3].parameters())]
    batch = (torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,)))
    loss_fn = nn.functional.cross_entropy
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model[1].scale.grad = torch.ones(8, dtype=torch.float64)
    optimizer.step()  # a momentum buffer for the scale
    # By hand: the real step after backward, on copies.
    real_model, real_optimizer = copy.deepcopy((model, optimizer))
    real_optimizer.zero_grad(set_to_none=True)
    loss_fn(real_model(batch[0]), batch[1]).backward()
    real_optimizer.step()
    shifted = copy.deepcopy(model)
    shifted[0].load_state_dict(real_model[0].state_dict())
    shifted[1].load_state_dict(real_model[1].state_dict())
    expected = torch.autograd.grad(loss_fn(shifted(batch[0]), batch[1]), list(shifted[3].parameters()))
    for use_grad_fields in (False, True):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(batch[0]), batch[1]).backward()
        (_, g_shifted), = ics_gradients(model, loss_fn, batch, optimizer, layers, which=[1],
                                        use_grad_fields=use_grad_fields).values()
        assert all(torch.equal(a, b) for a, b in zip(g_shifted, expected, strict=True))


def test_probes_differentiate_under_no_grad_and_refuse_inference_mode():
    """An evaluation loop's torch.no_grad() must not change the answer; inference mode, which nothing can
    lift, is refused with the reason rather than autograd's "does not require grad"."""
    model, loss_fn, batch = small_problem("mlp", "batchnorm")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ics = measure_ics(model, loss_fn, batch, optimizer, model.layer_params())
    land = probe_landscape(model, loss_fn, batch, [0.1])
    with torch.no_grad():
        assert measure_ics(model, loss_fn, batch, optimizer, model.layer_params()) == ics
        assert probe_landscape(model, loss_fn, batch, [0.1]) == land
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=r"torch.inference_mode\(\) forbids"):
            measure_ics(model, loss_fn, batch, optimizer, model.layer_params())
        with pytest.raises(RuntimeError, match=r"torch.inference_mode\(\) forbids"):
            probe_landscape(model, loss_fn, batch, [0.1])


class DropoutChain(nn.Sequential):
    """Linear, dropout, ReLU, linear: a model drawing from torch's global generator, with its layers."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(nn.Linear(8, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 3))

    def layer_params(self) -> list[list[nn.Parameter]]:
        return [list(self[0].parameters()), list(self[3].parameters())]


def test_every_forward_pass_of_a_measurement_sees_the_same_random_draws():
    """A model drawing from torch's global generator (dropout) still gets l2 = 0 when the prefix does not
    move: the probe rewinds the random state before each pass."""
    model = DropoutChain()
    loss_fn = nn.functional.cross_entropy
    batch = (torch.randn(20, 8), torch.randint(0, 3, (20,)))
    layers = model.layer_params()
    optimizer = torch.optim.SGD([{"params": layers[0], "lr": 0.0}, {"params": layers[1], "lr": 0.1}])
    (result,) = measure_ics(model, loss_fn, batch, optimizer, layers, which=[1])
    assert result["l2"] == 0.0
    land = probe_landscape(model, loss_fn, batch, [1e-12])
    assert land["grad_diff"][0] < 1e-6 * land["grad_norm"]  # same dropout mask at w and at w - tiny step


def test_probes_reading_grad_fields_replay_the_random_state_of_the_training_pass():
    """``.grad`` comes from the training pass's dropout masks: with the random state taken before that pass,
    G' with nothing moved is G, and a tiny step changes the gradient by almost nothing — through the
    library and the loop's probes, which take that state in ``before_forward``."""
    model = DropoutChain()
    loss_fn = nn.functional.cross_entropy
    batch = (torch.randn(20, 8), torch.randint(0, 3, (20,)))
    optimizer = torch.optim.SGD([{"params": model.layer_params()[0], "lr": 0.0},
                                 {"params": model.layer_params()[1], "lr": 0.1}])
    rows = []
    ics = ICSProbe(model, loss_fn, optimizer, lambda step, name, value, **key: rows.append((name, value)), [2], 1)
    landscape = LandscapeProbe(model, loss_fn, lambda step, name, value, **key: rows.append((name, value)),
                               [1e-12], 1, "gradient", seed=0, batched=False)
    torch.manual_seed(5)
    state = random_state(model)
    for probe in (ics, landscape):
        probe.before_forward(0)
    loss_fn(model(batch[0]), batch[1]).backward()  # the training pass: its dropout masks are behind .grad
    (result,) = measure_ics(model, loss_fn, batch, optimizer, model.layer_params(), which=[1],
                            use_grad_fields=True, rng_state=state)
    land = probe_landscape(model, loss_fn, batch, [1e-12], use_grad_fields=True, rng_state=state)
    assert result["l2"] == 0.0
    assert land["grad_diff"][0] < 1e-6 * land["grad_norm"]
    for probe in (ics, landscape):
        probe.after_backward(0, batch)
    logged = dict(rows)
    assert logged["ics/l2"] == 0.0
    assert logged["landscape/grad_diff"] < 1e-6 * logged["landscape/grad_norm"]


@pytest.mark.parametrize("reuse", [True, False])
def test_loop_probes_compute_the_gradient_themselves_where_training_computed_it_otherwise(reuse):
    """A training pass in other numerics (TF32 products on a GPU, a compiled graph) leaves a ``.grad`` a
    little off the probes' own full-fp32 gradient; stood in for here by 1e-3 of noise on it. Read back, it
    shows as a shift with nothing moved; computed by the probe (as the loop has it in those runs), none."""
    model = DropoutChain()
    loss_fn = nn.functional.cross_entropy
    batch = (torch.randn(20, 8), torch.randint(0, 3, (20,)))
    optimizer = torch.optim.SGD([{"params": model.layer_params()[0], "lr": 0.0},
                                 {"params": model.layer_params()[1], "lr": 0.1}])
    rows = {}
    log = lambda step, name, value, **key: rows.__setitem__(name, value)  # noqa: E731
    probes = [ICSProbe(model, loss_fn, optimizer, log, [2], 1, reuse_training_gradient=reuse),
              LandscapeProbe(model, loss_fn, log, [1e-12], 1, "gradient", seed=0, batched=False,
                             reuse_training_gradient=reuse)]
    torch.manual_seed(5)
    for probe in probes:
        probe.before_forward(0)
    loss_fn(model(batch[0]), batch[1]).backward()
    for p in model.parameters():
        p.grad += 1e-3 * p.grad.abs().max() * torch.randn_like(p)
    grads = [p.grad.clone() for p in model.parameters()]
    for probe in probes:
        probe.after_backward(0, batch)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    if reuse:
        assert rows["ics/l2"] > 0 and rows["landscape/grad_diff"] > 1e-4 * rows["landscape/grad_norm"]
    else:
        assert rows["ics/l2"] == 0.0 and rows["landscape/grad_diff"] < 1e-6 * rows["landscape/grad_norm"]


class CountingScale(nn.Module):
    """Scales by 1 + calls / 10, where ``calls`` counts its forward passes: module state that a pass changes,
    in place, through ``.data`` (unseen by version counters) or by reassigning the buffer."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        if self.how == "in place":
            self.calls.add_(1)
        elif self.how == "through .data":
            self.calls.data.add_(1)
        else:
            self.calls = self.calls + 1
        return x * (1 + self.calls / 10)


def stateful_model(kind: str) -> nn.Sequential:
    torch.manual_seed(0)
    if kind == "spectral norm":  # power iteration: its vectors are buffers updated by every training pass
        middle = nn.utils.parametrizations.spectral_norm(nn.Linear(8, 8))
    else:
        middle = CountingScale(kind.removeprefix("counter "))
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), middle, nn.Tanh(), nn.Linear(8, 3)).double()


def test_auto_batches_convolution_free_models_on_cuda_and_cpu_with_threads_unless_a_pass_may_change_buffers():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert vmap_pays(small_problem("mlp", "batchnorm", noise=True)[0])  # noise drawn alike at every eta
        assert vmap_pays(small_problem("dln", "batchnorm")[0])
        assert not vmap_pays(small_problem("vgg", "batchnorm")[0])
        assert not vmap_pays(stateful_model("spectral norm"))
        # on a device nobody measured, the loop (the meta device stands in for one)
        assert not vmap_pays(small_problem("dln", "batchnorm")[0].to("meta"))
        torch.set_num_threads(1)  # as the recipes' jobs run, where vmap measured slower for every model
        assert not vmap_pays(small_problem("dln", "batchnorm")[0])
    finally:
        torch.set_num_threads(threads)


def test_batching_pays_on_cuda_at_any_thread_count_and_on_cpu_with_more_than_one_thread():
    # the device rule alone, since CI has no GPU to put a model on
    assert batching_pays_on({"cuda"}, 1) and batching_pays_on({"cpu"}, 2)
    assert not batching_pays_on({"cpu"}, 1)
    assert not batching_pays_on({"mps"}, 8) and not batching_pays_on({"cpu", "cuda"}, 8)


@pytest.mark.parametrize("kind", ["counter in place", "counter through .data", "counter reassigned", "spectral norm"])
def test_every_pass_starts_from_the_same_module_state(kind):
    """Buffers that a forward pass changes are put back before every pass and on exit, the same objects
    holding the same values: ICS equals the brute force on fresh copies bit for bit, and a step size's
    landscape values do not depend on which step sizes were evaluated before it."""
    model = stateful_model(kind)
    layers_of = lambda m: [list(m[k].parameters()) for k in (0, 2, 4) if list(m[k].parameters())]  # noqa: E731
    batch = (torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,)))
    loss_fn = nn.functional.cross_entropy
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn(model(batch[0]), batch[1]).backward()
    optimizer.step()  # momentum buffers exist
    buffers = {name: (b, b.clone()) for name, b in model.named_buffers()}
    fast = ics_gradients(model, loss_fn, batch, optimizer, layers_of(model))
    naive = brute_force_ics(model, loss_fn, batch, optimizer, layers_of=layers_of)
    assert_bit_for_bit(fast, naive)
    both = probe_landscape(model, loss_fn, batch, [0.1, 0.2])
    alone = probe_landscape(model, loss_fn, batch, [0.2])
    assert (both["loss"][1], both["grad_diff"][1]) == (alone["loss"][0], alone["grad_diff"][0])
    if kind == "counter reassigned":  # the one vmap can run: its batched passes start from that state too
        batched = probe_landscape(model, loss_fn, batch, [0.1, 0.2], batched=True)
        np.testing.assert_allclose(batched["loss"], both["loss"], rtol=1e-12)
        np.testing.assert_allclose(batched["grad_diff"], both["grad_diff"], rtol=1e-9)
    assert {name: b for name, b in model.named_buffers()}.keys() == buffers.keys()
    for name, b in model.named_buffers():
        assert b is buffers[name][0] and torch.equal(b, buffers[name][1]), name


def test_a_graph_built_before_the_landscape_probe_still_backpropagates():
    """The quadratic's forward saves its constant buffer A for backward; the probe must not write it."""
    a, w, _, _ = quadratic()
    model = Quadratic(a, w)
    loss = model(BATCH[0])
    probe_landscape(model, loss_is_output, BATCH, ETAS, batched=False)
    probe_landscape(model, loss_is_output, BATCH, ETAS, batched=True)
    loss.backward()
    torch.testing.assert_close(model.w.grad, a @ w, rtol=1e-12, atol=0)


def test_grad_fields_give_the_same_answer_as_computing_the_gradient():
    model, loss_fn, batch = small_problem("vgg", "batchnorm", noise=True)
    set_noise_step(model, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer.zero_grad()
    loss_fn(model(batch[0]), batch[1]).backward()  # a training step's backward, running statistics and all
    computed = measure_ics(model, loss_fn, batch, optimizer, model.layer_params())
    from_grads = measure_ics(model, loss_fn, batch, optimizer, model.layer_params(), use_grad_fields=True)
    assert computed == from_grads
    assert probe_landscape(model, loss_fn, batch, [0.1, 0.2]) == probe_landscape(
        model, loss_fn, batch, [0.1, 0.2], use_grad_fields=True)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="no parameter has a .grad"):
        probe_landscape(model, loss_fn, batch, [0.1], use_grad_fields=True)


def test_the_loops_random_direction_is_drawn_per_seed_and_step():
    """``probes.landscape.direction=random``: a Gaussian direction, a function of (seed, step) alone (global
    random state untouched), so each measured step gets its own and a rerun the same."""
    model, loss_fn, batch = small_problem("mlp", "batchnorm")

    def direction(seed, step):
        return LandscapeProbe(model, loss_fn, lambda *a, **k: None, [0.1], 1, "random", seed).random_direction(step)

    rng = torch.get_rng_state()
    first = direction(3, 100)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(first, direction(3, 100)))
    for other in (direction(3, 200), direction(4, 100)):
        assert not any(torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("reuse", [True, False])
def test_the_loops_random_direction_has_the_length_of_the_gradient_it_is_compared_with(reuse):
    """Scaled to ||g|| of the measurement's own gradient: where the probe computes g afresh (the training
    pass ran in TF32 or compiled), not to the ``.grad`` that pass left, here twice the gradient."""
    model, loss_fn, batch = small_problem("mlp", "batchnorm")
    loss_fn(model(batch[0]), batch[1]).backward()
    g = [p.grad.clone() for p in model.parameters()]
    if not reuse:
        for p in model.parameters():
            p.grad.mul_(2)
    rows = {}
    probe = LandscapeProbe(model, loss_fn, lambda step, name, value, eta=None: rows.setdefault((name, eta), value),
                           [0.05, 0.2], 1, "random", 3, reuse_training_gradient=reuse)
    probe.after_backward(7, batch)
    d = probe.random_direction(7)
    scale = math.sqrt(sum(float(t.double().pow(2).sum()) for t in g) / sum(float(t.double().pow(2).sum()) for t in d))
    model.zero_grad(set_to_none=True)
    expected = probe_landscape(model, loss_fn, batch, [0.05, 0.2], direction=[t * scale for t in d])
    for eta, loss, diff in zip(expected["eta"], expected["loss"], expected["grad_diff"]):
        assert rows["landscape/loss", eta] == pytest.approx(loss, rel=1e-6)
        assert rows["landscape/grad_diff", eta] == pytest.approx(diff, rel=1e-5)
    assert rows["landscape/grad_norm", None] == pytest.approx(expected["grad_norm"], rel=1e-6)


def test_the_loops_landscape_rows_are_the_probes_results():
    model, loss_fn, batch = small_problem("mlp", "batchnorm")
    loss_fn(model(batch[0]), batch[1]).backward()
    rows = []
    probe = LandscapeProbe(model, loss_fn, lambda step, name, value, eta=None: rows.append((step, name, value, eta)),
                           [0.05, 0.2], 1, "gradient", 0)
    probe.after_backward(7, batch)
    expected = probe_landscape(model, loss_fn, batch, [0.05, 0.2])
    assert rows == [(7, name, pytest.approx(value, rel=1e-9), eta)
                    for eta, loss, diff in zip(expected["eta"], expected["loss"], expected["grad_diff"])
                    for name, value in (("landscape/loss", loss), ("landscape/grad_diff", diff))] + [
        (7, "landscape/beta", pytest.approx(expected["beta"], rel=1e-9), None),
        (7, "landscape/grad_norm", pytest.approx(expected["grad_norm"], rel=1e-9), None)]


class AttentionWithDropout(nn.Module):
    """Token embeddings, self-attention with dropout on its weights, dropout, a linear read-out: a model
    whose draws from torch's global generator come out differently under vmap (the attention's)."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__()
        self.embed = nn.Embedding(10, 16)
        self.attend = nn.MultiheadAttention(16, 2, dropout=0.1, batch_first=True)
        self.drop = nn.Dropout(0.5)
        self.read_out = nn.Linear(16, 3)

    def forward(self, tokens):
        h = self.embed(tokens)
        return self.read_out(self.drop(self.attend(h, h, h, need_weights=False)[0]).mean(1))


def test_a_model_drawing_random_numbers_is_not_batched(monkeypatch):
    """Where batching would pay, ``auto`` still takes the loop for a model that draws from the global
    generator, whether the probe computes g or reads it from .grad, and ``batched=True`` is refused: vmap
    drew other attention-dropout masks than the pass behind g (a 1e-6 step then showed a gradient
    difference of 0.26 against 4e-7)."""
    monkeypatch.setattr("bnopt.probes.landscape.batching_pays_on", lambda devices, threads: True)
    model, loss_fn = AttentionWithDropout(), nn.functional.cross_entropy
    batch = (torch.randint(0, 10, (8, 5)), torch.randint(0, 3, (8,)))
    etas = [1e-6, 1e-2]
    looped = probe_landscape(model, loss_fn, batch, etas, batched=False)
    assert probe_landscape(model, loss_fn, batch, etas) == looped
    state = random_state(model)
    loss_fn(model(batch[0]), batch[1]).backward()
    from_grad = dict(use_grad_fields=True, rng_state=state)
    looped_from_grad = probe_landscape(model, loss_fn, batch, etas, batched=False, **from_grad)
    assert probe_landscape(model, loss_fn, batch, etas, **from_grad) == looped_from_grad
    assert looped_from_grad["grad_diff"][0] < 1e-5 * looped_from_grad["grad_norm"]  # the training pass's masks
    with pytest.raises(ValueError, match="draws from torch's global generator"):
        probe_landscape(model, loss_fn, batch, etas, batched=True)


def penalised_mlp():
    """A model the repo does not know, whose loss reads its parameters outside its forward (a weight
    penalty): where vmap runs, the penalty saw the unmoved weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()

    def loss_fn(out, targets):
        return F.cross_entropy(out, targets) + 0.1 * sum(p.pow(2).sum() for p in model.parameters())
    return model, loss_fn, (torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,)))


def test_auto_batches_only_the_repos_own_chains(monkeypatch):
    """``auto`` batched any convolution-free model where batching pays (on a CPU with two threads, this
    machine's default), and vmap sees the parameters only inside ``model.forward``: a penalty in the loss
    gave other losses and gradients (1.461 against 1.446). Checked against the values by hand."""
    monkeypatch.setattr("bnopt.probes.landscape.batching_pays_on", lambda devices, threads: True)
    model, loss_fn, batch = penalised_mlp()
    assert not vmap_pays(model) and vmap_pays(small_problem("mlp", "batchnorm")[0])
    etas = [0.1, 0.5]
    params = list(model.parameters())
    w = [p.detach().clone() for p in params]
    g = torch.autograd.grad(loss_fn(model(batch[0]), batch[1]), params)
    losses, diffs = [], []
    for eta in etas:
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for p, w0, g0 in zip(moved.parameters(), w, g):
                p.copy_(w0 - eta * g0)
        moved_loss = F.cross_entropy(moved(batch[0]), batch[1]) + 0.1 * sum(p.pow(2).sum() for p in moved.parameters())
        grad = torch.autograd.grad(moved_loss, list(moved.parameters()))
        losses.append(moved_loss.item())
        diffs.append(torch.cat([(a - b).reshape(-1) for a, b in zip(grad, g)]).norm().item())
    land = probe_landscape(model, loss_fn, batch, etas)
    np.testing.assert_allclose(land["loss"], losses, rtol=1e-14)
    np.testing.assert_allclose(land["grad_diff"], diffs, rtol=1e-10)


class ClampedIdentity(torch.autograd.Function):
    """An autograd.Function without ``setup_context``, which torch.func cannot run."""

    @staticmethod
    def forward(ctx, x):
        return x.clamp(-1, 1)

    @staticmethod
    def backward(ctx, grad):
        return grad


class Clamp(nn.Module):
    def forward(self, x):
        return ClampedIdentity.apply(x)


def test_batched_is_refused_where_vmap_would_break_the_model_or_miss_a_hook_and_auto_takes_the_loop(monkeypatch):
    """A module registered under two names: vmap's functional_call left the model's weight a tensor escaped
    from vmap (no longer the optimiser's parameter; the next forward raised). A hook on a parameter, which
    vmap's passes do not run, changed the gradient differences. Either way ``auto`` takes the loop, also
    for the repo's own chains; a model torch.func cannot run says how to measure it."""
    monkeypatch.setattr("bnopt.probes.landscape.batching_pays_on", lambda devices, threads: True)
    torch.manual_seed(0)
    shared = nn.Linear(6, 6)
    twice = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(6, 3)).double()
    chain, _, chain_batch = small_problem("dln", "batchnorm")
    chain.blocks[2] = chain.blocks[1]  # the same block at two depths
    hooked, loss_fn, batch = penalised_mlp()
    hooked[0].weight.register_hook(lambda grad: grad.clamp(-0.05, 0.05))
    hooked_chain, chain_loss, hooked_chain_batch = small_problem("mlp", "batchnorm")
    next(hooked_chain.parameters()).register_hook(lambda grad: grad.clamp(-0.05, 0.05))
    dln_loss = lambda out, targets: 0.5 * (out - targets).pow(2).sum()  # noqa: E731
    x = torch.randn(8, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    for model, loss, data, why in ((twice, F.cross_entropy, (x, y), "registered under two names \\(2 and 4\\)"),
                                   (chain, dln_loss, chain_batch, "registered under two names"),
                                   (hooked, loss_fn, batch, "a parameter has a hook"),
                                   (hooked_chain, chain_loss, hooked_chain_batch, "a parameter has a hook")):
        weights = list(model.parameters())
        with pytest.raises(ValueError, match=f"batched=True, but .*{why}"):
            probe_landscape(model, loss, data, [0.1, 0.2], batched=True)
        assert probe_landscape(model, loss, data, [0.1, 0.2]) == probe_landscape(model, loss, data, [0.1, 0.2],
                                                                                  batched=False)
        assert all(p is q for p, q in zip(model.parameters(), weights))
    with pytest.raises(RuntimeError, match=r"the batched landscape evaluation \(torch.func.vmap\) failed on this "
                                           "model .*batched=False runs any model"):
        probe_landscape(nn.Sequential(nn.Linear(5, 6), Clamp(), nn.Linear(6, 3)), F.cross_entropy,
                        (torch.randn(8, 5), y), [0.1], batched=True)


def test_each_parameter_moves_by_the_step_sizes_in_its_own_dtype():
    """Batched, the step sizes came in the first parameter's dtype: a float64 parameter after float32 ones
    moved by float32-rounded etas (a relative error of 1e-8 in this loss, which magnifies the move)."""

    class MixedPrecision(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(5, 3)  # float32, first in parameters() order
            self.scaling = nn.ParameterDict({"scale": nn.Parameter(torch.tensor(1.3, dtype=torch.float64))})

        def forward(self, x):
            return self.linear(x).double() * ((self.scaling["scale"] - 1.3) * 1e4 + 1)

    torch.manual_seed(0)
    model = MixedPrecision()
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    along_scale = [torch.zeros(3, 5), torch.zeros(3), torch.tensor(1.0, dtype=torch.float64)]
    exact = F.cross_entropy(model.linear(x).double() * ((torch.tensor(1.3, dtype=torch.float64) - 0.1 - 1.3) * 1e4 + 1),
                            y).item()
    for batched in (False, True):
        land = probe_landscape(model, F.cross_entropy, (x, y), [0.1], direction=along_scale, batched=batched)
        assert land["loss"][0] == pytest.approx(exact, rel=1e-13)


@pytest.mark.parametrize("chain", [True, False])
def test_a_model_writing_into_its_input_sees_the_same_input_in_every_pass(chain):
    """Dropout with inplace=True as the first module scaled the batch at every pass: with nothing moved ICS
    showed a shift (l2 0.09), equal step sizes gave different losses, and the caller's batch came back
    changed. Through the shared prefix (a Sequential) and the general path (the Sequential hidden)."""
    torch.manual_seed(0)
    sequential = nn.Sequential(nn.Dropout(0.5, inplace=True), nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    model = sequential if chain else HiddenChain(sequential)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    batch_before = x.clone()
    layers = [list(sequential[1].parameters()), list(sequential[3].parameters())]
    rows = measure_ics(model, F.cross_entropy, (x, y), torch.optim.SGD(sequential.parameters(), lr=0.0), layers)
    assert [(r["l2"], r["cos"]) for r in rows] == [(0.0, 1.0), (0.0, 1.0)]
    land = probe_landscape(model, F.cross_entropy, (x, y), [0.1, 0.1, 0.1], batched=False)
    assert land["loss"][0] == land["loss"][1] == land["loss"][2]
    assert torch.equal(x, batch_before)


def test_inputs_made_under_inference_mode_are_measured():
    """They have no version counter to watch (reading it raised), and cannot be written in place anyway."""
    model, loss_fn, batch = penalised_mlp()
    with torch.inference_mode():
        frozen_inputs = batch[0] + 0
    shifted = nn.Sequential(Shift(), model)  # the first op does not save its input for backward
    assert probe_landscape(shifted, loss_fn, (frozen_inputs, batch[1]), [0.1]) == \
        probe_landscape(shifted, loss_fn, (batch[0], batch[1]), [0.1])


class Shift(nn.Module):
    def forward(self, x):
        return x + 1


@pytest.mark.parametrize("batched", [True, False])
def test_a_direction_in_another_dtype_is_taken_in_the_parameters_dtype(batched):
    """A direction built with numpy comes as float64; the float32 model moves along it as along its float32
    rounding (batched, it used to fail on the mixed dtypes)."""
    model, loss_fn, batch = small_problem("mlp", "batchnorm")
    rng = np.random.default_rng(0)
    direction = [torch.from_numpy(rng.standard_normal(tuple(p.shape))) for p in model.parameters()]
    given = probe_landscape(model, loss_fn, batch, [0.05, 0.2], direction, batched=batched)
    rounded = probe_landscape(model, loss_fn, batch, [0.05, 0.2], [d.float() for d in direction], batched=batched)
    assert given == rounded


class BagOfWords(nn.Module):
    """Token embeddings averaged, then two linear layers: ``sparse`` embeddings give sparse gradients, and
    ``max_norm`` renormalises the rows a forward pass looks up, in place."""

    def __init__(self, sparse: bool = False, max_norm: float | None = None):
        torch.manual_seed(0)
        super().__init__()
        self.embed = nn.Embedding(10, 8, sparse=sparse, max_norm=max_norm)
        self.hidden = nn.Linear(8, 8)
        self.read_out = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.read_out(torch.relu(self.hidden(self.embed(tokens).mean(1))))

    def layer_params(self) -> list[list[nn.Parameter]]:
        return [list(self.embed.parameters()), list(self.hidden.parameters()), list(self.read_out.parameters())]


BAG_BATCH = (torch.randint(0, 10, (16, 5), generator=torch.Generator().manual_seed(1)),
             torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2)))


def test_sparse_gradients_are_measured_as_their_dense_values(monkeypatch):
    """ICS and the landscape of an embedding with sparse gradients equal those of the same model with dense
    ones (to the rounding of the sparse step's other order of sums); ``auto`` does not batch them, which
    vmap cannot."""
    monkeypatch.setattr("bnopt.probes.landscape.batching_pays_on", lambda devices, threads: True)
    loss_fn = nn.functional.cross_entropy
    results = []
    for sparse in (True, False):
        model = BagOfWords(sparse=sparse)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        results.append((measure_ics(model, loss_fn, BAG_BATCH, optimizer, model.layer_params()),
                        probe_landscape(model, loss_fn, BAG_BATCH, [0.1, 0.5])))
    (ics_sparse, land_sparse), (ics_dense, land_dense) = results
    assert ics_sparse[2]["l2"] > 0
    for a, b in zip(ics_sparse, ics_dense, strict=True):
        assert (a["l2"], a["cos"]) == pytest.approx((b["l2"], b["cos"]), rel=1e-5, abs=1e-9)
    for key in ("loss", "grad_diff"):
        np.testing.assert_allclose(land_sparse[key], land_dense[key], rtol=1e-5)


def test_an_embedding_renormalising_its_weight_is_left_as_it_was():
    """``max_norm`` rescales, in place, the rows a forward pass looks up: a probe's own passes must not
    leave the model so (a fresh model's rows here have norms up to about 4, against a max_norm of 1)."""
    model = BagOfWords(max_norm=1.0)
    loss_fn = nn.functional.cross_entropy
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    before = snapshot(model, optimizer)
    land = probe_landscape(model, loss_fn, BAG_BATCH, [0.1, 0.5], batched=False)
    measure_ics(model, loss_fn, BAG_BATCH, optimizer, model.layer_params())
    assert_same(before, snapshot(model, optimizer))
    renormalised = copy.deepcopy(model)
    renormalised(BAG_BATCH[0])  # what every pass of the probe sees: the looked-up rows rescaled
    assert probe_landscape(renormalised, loss_fn, BAG_BATCH, [0.1, 0.5], batched=False) == land


def test_the_in_loop_probe_takes_its_configured_batched_setting():
    """``probes.landscape.batched=true`` reaches probe_landscape: on a model with dropout (which draws from the
    global generator) it is refused, where ``auto`` would quietly take the loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    batch = (torch.randn(16, 4), torch.randint(0, 2, (16,)))

    def probe(batched):
        landscape = LandscapeProbe(model, F.cross_entropy, lambda *a, **k: None, [0.1], 1, "gradient", 0, batched)
        landscape.before_forward(0)
        model.zero_grad()
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        landscape.after_backward(0, batch)

    probe("auto")
    with pytest.raises(ValueError, match="batched=True"):
        probe(True)
