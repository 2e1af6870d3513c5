"""Each normalisation variant against its definition (protocol section 4), on hand-made tensors."""

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from bnopt.norms import (BatchNorm, LpNorm, NoiseSpec, NoisyNorm, NoNorm, draws_left_eager, norm_factory, normalises,
                         set_noise_step)
from bnopt.seeding import derived_seed


def per_unit(a: torch.Tensor) -> torch.Tensor:
    """(N, C) or (N, C, H, W) -> (C, samples per unit): the values each unit is normalised over."""
    return a.transpose(0, 1).reshape(a.shape[1], -1)


def broadcast(stat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return stat.view(1, -1, *([1] * (like.dim() - 2)))


SHAPES = [(16, 3), (8, 3, 5, 4)]


@pytest.mark.parametrize("shape", SHAPES)
def test_batchnorm_train_and_eval_follow_the_definition(shape):
    torch.manual_seed(0)
    a = torch.randn(shape, dtype=torch.float64) * 3 + 2
    bn = BatchNorm(3, eps=1e-5, momentum=0.1).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, -1.0]))
        bn.bias.copy_(torch.tensor([0.0, 0.5, 1.0]))
    values = per_unit(a)
    mean, var = values.mean(1), values.var(1, unbiased=False)
    expected = (a - broadcast(mean, a)) / torch.sqrt(broadcast(var, a) + 1e-5)
    expected = expected * broadcast(bn.weight.detach(), a) + broadcast(bn.bias.detach(), a)
    torch.testing.assert_close(bn(a), expected)
    assert bn.running_mean.shape == (3,)
    torch.testing.assert_close(bn.running_mean, 0.1 * mean)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * values.var(1, unbiased=True))
    bn.eval()
    eval_expected = (a - broadcast(bn.running_mean, a)) / torch.sqrt(broadcast(bn.running_var, a) + 1e-5)
    eval_expected = eval_expected * broadcast(bn.weight.detach(), a) + broadcast(bn.bias.detach(), a)
    torch.testing.assert_close(bn(a), eval_expected)


def test_batchnorm_rejects_other_ranks():
    with pytest.raises(ValueError, match="expects"):
        BatchNorm(3)(torch.randn(2, 3, 4))


def lp_by_hand(a: torch.Tensor, p: float, eps: float, centred: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    values = per_unit(a)
    mean = values.mean(1)
    measured = values - mean[:, None] if centred else values
    norm = measured.abs().max(1).values if p == math.inf else measured.abs().pow(p).mean(1).pow(1 / p)
    out = (a - broadcast(mean, a)) / (broadcast(norm, a) + eps)
    return out, mean, norm


@pytest.mark.parametrize("norm_of", ["raw", "centred"])
@pytest.mark.parametrize("p", [1, 2, math.inf])
@pytest.mark.parametrize("shape", SHAPES)
def test_lp_norm_follows_the_definition(p, shape, norm_of):
    """The paper's formula (``raw``: N of the activations before centring), and N of the centred ones."""
    torch.manual_seed(1)
    a = torch.randn(shape, dtype=torch.float64) * 2 + 1
    layer = LpNorm(3, p=p, eps=1e-3, momentum=0.2, norm_of=norm_of).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.5, 1.0, -2.0]))
        layer.bias.copy_(torch.tensor([0.1, 0.0, 3.0]))
    expected, mean, norm = lp_by_hand(a, p, 1e-3, centred=norm_of == "centred")
    expected = expected * broadcast(layer.weight.detach(), a) + broadcast(layer.bias.detach(), a)
    torch.testing.assert_close(layer(a), expected)
    # running statistics: exponential moving average from (0, 1) with momentum 0.2
    torch.testing.assert_close(layer.running_mean, 0.2 * mean)
    torch.testing.assert_close(layer.running_norm, 0.8 + 0.2 * norm)
    assert int(layer.num_batches_tracked) == 1
    layer.eval()
    b = torch.randn(shape, dtype=torch.float64)
    eval_expected = (b - broadcast(layer.running_mean, b)) / (broadcast(layer.running_norm, b) + 1e-3)
    eval_expected = eval_expected * broadcast(layer.weight.detach(), b) + broadcast(layer.bias.detach(), b)
    torch.testing.assert_close(layer(b), eval_expected)
    assert int(layer.num_batches_tracked) == 1


def test_lp_norm_without_tracking_leaves_running_statistics_alone():
    layer = LpNorm(3, p=1)
    layer.track_running_stats = False
    layer(torch.randn(10, 3) + 5)
    assert torch.equal(layer.running_mean, torch.zeros(3)) and torch.equal(layer.running_norm, torch.ones(3))


def test_lp2_relates_to_batchnorm_as_the_formulas_say():
    """N_2^2 = var + mean^2, so L2 normalisation divides by sqrt(var + mean^2): it equals BN (up to eps,
    here negligible) when the batch mean is zero, and otherwise scales BN's output by sqrt(var / (var + mean^2))."""
    torch.manual_seed(2)
    a = torch.randn(64, 4, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)
    a = a + torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=torch.float64)
    values = per_unit(a)
    mean, var = values.mean(1), values.var(1, unbiased=False)
    eps = 1e-12  # torch's BN refuses eps = 0
    lp2, bn = LpNorm(4, p=2, eps=eps).double(), BatchNorm(4, eps=eps).double()
    _, norm = lp2.batch_statistics(a)
    torch.testing.assert_close(norm.pow(2), var + mean.pow(2))
    torch.testing.assert_close(lp2(a), bn(a) * broadcast(torch.sqrt(var / (var + mean.pow(2))), a))
    centred = a - mean
    torch.testing.assert_close(LpNorm(4, p=2, eps=eps).double()(centred), BatchNorm(4, eps=eps).double()(centred))
    # N of the centred activations is the standard deviation: BN, whatever the mean
    torch.testing.assert_close(LpNorm(4, p=2, eps=eps, norm_of="centred").double()(a), bn(a))


def test_lp_norm_rejects_other_orders_and_statistics():
    with pytest.raises(ValueError, match="p must be"):
        LpNorm(3, p=3)
    with pytest.raises(ValueError, match="p in"):
        norm_factory("lp", p=0.5)
    with pytest.raises(ValueError, match="norm_of must be"):
        LpNorm(3, p=2, norm_of="centered")
    with pytest.raises(ValueError, match="norm_of in"):
        norm_factory("lp", p=2, norm_of="centered")


def noise_of(layer: NoisyNorm, shape, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, m) as seen through the layer itself: out(0) = m, out(1) - out(0) = s (same step, same noise)."""
    layer.step = step
    zeros = torch.zeros(shape, dtype=torch.float64)
    m = layer(zeros)
    s = layer(zeros + 1) - m
    return s, m


def test_noise_moments_over_many_draws_match_algorithm_1():
    spec = NoiseSpec(n_mu=0.5, n_sigma=1.25, r_mu=0.1, r_sigma=0.2)  # r's differ, so a swap of them shows
    layer = NoisyNorm(NoNorm(4), spec, seed=3, layer_key=0)
    mus, sigmas = [], []
    for step in range(400):
        s, m = noise_of(layer, (256, 4), step)
        mu_j, sigma_j = m.mean(0), s.mean(0)  # per-unit centres, up to the per-element spread
        mus.append(mu_j)
        sigmas.append(sigma_j)
        # per element: m_ij in [mu_j - r_mu, mu_j + r_mu] around the unit's centre
        assert (m - mu_j).abs().max() <= 0.1 + 0.02
    mus, sigmas = torch.stack(mus), torch.stack(sigmas)
    # mu_j ~ U(-0.5, 0.5): mean 0, variance 1/12; sigma_j ~ U(1, 1.25): mean 1.125, variance 0.0625/12
    assert mus.abs().max() <= 0.5 + 0.02
    assert abs(mus.mean()) < 0.03 and abs(mus.var() - 1 / 12) < 0.01
    assert sigmas.min() >= 1 - 0.05 and sigmas.max() <= 1.25 + 0.05  # up to the elements' spread (0.2 / 16)
    assert abs(sigmas.mean() - 1.125) < 0.01 and abs(sigmas.var() - 0.0625 / 12) < 0.001
    # per element: m_ij - mu_j ~ U(-0.1, 0.1) (variance 0.01/3) and s_ij - sigma_j ~ N(0, 0.2^2)
    s, m = noise_of(layer, (20000, 4), 999)
    within_m, within_s = m - m.mean(0), s - s.mean(0)
    assert abs(within_m.var() - 0.01 / 3) < 2e-4
    assert abs(within_s.var() - 0.04) < 1.6e-3
    assert abs(((within_s / 0.2) ** 4).mean() - 3) < 0.15  # Gaussian kurtosis, not uniform's 1.8


def test_noise_is_per_unit_and_per_element_on_conv_activations():
    layer = NoisyNorm(NoNorm(3), NoiseSpec(), seed=0, layer_key=0)
    s, m = noise_of(layer, (64, 3, 6, 6), 0)
    unit_centres = m.mean(dim=(0, 2, 3))
    assert len(set(unit_centres.tolist())) == 3  # one mu per channel
    assert (m - broadcast(unit_centres, m)).abs().max() <= 0.1 + 0.02  # elements spread around it
    assert s.std(dim=(0, 2, 3)).min() > 0.05  # s varies per element


def test_noise_is_a_function_of_seed_layer_and_step_only():
    spec = NoiseSpec()
    a = NoisyNorm(NoNorm(4), spec, seed=7, layer_key=2)
    b = NoisyNorm(NoNorm(4), spec, seed=7, layer_key=2)
    torch.manual_seed(0)
    first = noise_of(a, (8, 4), 5)
    torch.manual_seed(123)  # the global random state plays no part
    assert all(torch.equal(x, y) for x, y in zip(first, noise_of(b, (8, 4), 5)))
    assert not torch.equal(first[1], noise_of(a, (8, 4), 6)[1])
    other_layer = NoisyNorm(NoNorm(4), spec, seed=7, layer_key=3)
    assert not torch.equal(first[1], noise_of(other_layer, (8, 4), 5)[1])
    other_seed = NoisyNorm(NoNorm(4), spec, seed=8, layer_key=2)
    assert not torch.equal(first[1], noise_of(other_seed, (8, 4), 5)[1])
    # and the same in every process: a resumed or re-run job must draw what the first one drew (Python's own
    # hash of a string changes from process to process)
    code = "from bnopt.seeding import derived_seed; print(derived_seed(7, 'noise', 2, 5))"
    for hash_seed in ("1", "2"):
        other = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": hash_seed},
                               capture_output=True, text=True, check=True)
        assert int(other.stdout) == derived_seed(7, "noise", 2, 5)


def test_the_noise_of_seed_0_is_pinned():
    """Golden values: the committed noisy-BN runs were made with these draws (seed 0, layer 2, step 5).
    Changing how the noise is keyed or drawn changes them; do it on purpose, with the runs regenerated."""
    noisy = NoisyNorm(torch.nn.Identity(), NoiseSpec(), seed=0, layer_key=2)
    noisy.step = 5
    s, m = noisy.draw(torch.Size([2, 3]), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(s, torch.tensor([[0.968089, 1.109240, 1.353625], [1.169868, 1.236844, 1.280937]]),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(m, torch.tensor([[0.044769, 0.341607, 0.297306], [0.069154, 0.432185, 0.361492]]),
                               rtol=0, atol=1e-6)


def test_noisy_batchnorm_is_batchnorm_then_noise_and_eval_has_no_noise():
    torch.manual_seed(4)
    a = torch.randn(32, 3, dtype=torch.float64) * 2 + 1
    noisy = norm_factory("batchnorm", noise=NoiseSpec(), seed=1)(3).double()
    reference = BatchNorm(3).double()
    s, m = noise_of(NoisyNorm(NoNorm(3), NoiseSpec(), seed=1, layer_key=0), (32, 3), step=4)
    noisy.step = 4
    torch.testing.assert_close(noisy(a), s * reference(a) + m)
    noisy.eval()
    reference.eval()
    torch.testing.assert_close(noisy(a), reference(a))


def test_noise_in_evaluation_is_drawn_afresh_for_each_pass_and_again_after_a_step():
    """``train_only=False``: eval mode adds noise too. Each evaluation pass at a step (one per test batch)
    gets its own draws, keyed to the step and the pass, not the training pass's; a layer that reaches the
    same step again (a resumed run) draws them again."""
    spec = NoiseSpec(train_only=False)

    def additive_noise(layer: NoisyNorm, step: int) -> torch.Tensor:
        layer.step = step
        return layer(torch.zeros(8, 4, dtype=torch.float64))  # s * 0 + m

    layer = NoisyNorm(NoNorm(4), spec, seed=7, layer_key=2).eval()
    passes_at_5 = [additive_noise(layer, 5) for _ in range(3)]
    assert all(not torch.equal(a, b) for i, a in enumerate(passes_at_5) for b in passes_at_5[i + 1:])
    assert not torch.equal(additive_noise(NoisyNorm(NoNorm(4), spec, seed=7, layer_key=2), 5), passes_at_5[0])
    additive_noise(layer, 6)
    again_at_5 = [additive_noise(layer, 5) for _ in range(3)]
    resumed = NoisyNorm(NoNorm(4), spec, seed=7, layer_key=2).eval()
    assert all(map(torch.equal, again_at_5, passes_at_5))
    assert all(map(torch.equal, [additive_noise(resumed, 5) for _ in range(3)], passes_at_5))
    # Algorithm 1's draws, as in training: within n_mu + r_mu of zero, and s > 0 scales the input
    assert passes_at_5[0].abs().max() <= 0.5 + 0.1
    layer.step = 7
    assert (layer(torch.ones(1000, 4, dtype=torch.float64)) - layer(torch.zeros(1000, 4, dtype=torch.float64))).mean() > 0.5
    with pytest.raises(ValueError, match="train_only"):
        NoiseSpec(train_only="no")


def test_factory_makes_each_variant_with_one_signature():
    for kind, p, expected in [("none", None, NoNorm), ("batchnorm", None, BatchNorm), ("lp", 1, LpNorm)]:
        make = norm_factory(kind, p=p)
        for shape in SHAPES:
            layer = make(3)
            assert isinstance(layer, expected)
            assert layer(torch.randn(shape)).shape == shape
    assert not normalises(norm_factory("none")(3))
    assert not normalises(norm_factory("none", noise=NoiseSpec())(3))
    assert normalises(norm_factory("batchnorm", noise=NoiseSpec())(3))
    with pytest.raises(ValueError, match="unknown norm"):
        norm_factory("groupnorm")


def test_factory_keys_noise_by_layer_order_and_set_noise_step_reaches_every_layer():
    make = norm_factory("batchnorm", noise=NoiseSpec(), seed=0)
    layers = torch.nn.Sequential(make(3), make(3), make(3))
    assert [layer.layer_key for layer in layers] == [0, 1, 2]
    set_noise_step(layers, 17)
    assert all(layer.step == 17 for layer in layers)


def test_noise_constants_are_checked():
    with pytest.raises(ValueError):
        NoiseSpec(n_sigma=0.5)
    with pytest.raises(ValueError):
        NoiseSpec(r_mu=-1)


def test_noisy_norm_compiles_once_and_draws_as_in_eager_mode():
    """The noise depends on the step: traced, it recompiled the graph at every step, until Dynamo's limit
    (8) dropped the model back to eager mode for good. Its draws now stay outside the graph (of a deep copy
    too, drawing from the copy's own state)."""
    from torch._dynamo.utils import counters

    original = nn.Sequential(nn.Linear(6, 5), NoisyNorm(BatchNorm(5), NoiseSpec(), seed=0, layer_key=1), nn.Tanh())
    eager = copy.deepcopy(original)
    model = copy.deepcopy(draws_left_eager(original))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(16, 6)
    frames = []
    for step in range(12):
        set_noise_step(model, step)
        set_noise_step(eager, step)
        torch.testing.assert_close(compiled(x), eager(x), rtol=0, atol=0)
        frames.append(counters["frames"]["total"])  # the frames Dynamo has (re)compiled so far
    assert frames[-1] == frames[1], frames  # none after the first steps
    torch._dynamo.reset()


def test_the_entry_point_starts_without_importing_dynamo():
    """Importing Dynamo (what ``torch.compiler.disable`` does when it runs) adds about 1.5 s to every command
    and every worker of a parallel sweep; only a run with train.compile=true needs it."""
    code = "import sys, bnopt.cli, bnopt.figures; print('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
