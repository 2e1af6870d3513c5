"""The activation probe records exactly the input to the non-linearity of its unit, from the training pass."""

import numpy as np
import pytest
import torch

from bnopt.models import mlp, vgg
from bnopt.norms import NoiseSpec, norm_factory
from bnopt.probes import ActivationRecorder


class Rows:
    def __init__(self):
        self.rows = []

    def __call__(self, step, name, value, layer=None, eta=None):
        self.rows.append((step, name, value, layer))

    def value(self, name, layer, step=None):
        (v,) = [r[2] for r in self.rows if r[1] == name and r[3] == layer and (step is None or r[0] == step)]
        return v


def test_mlp_unit_statistics_are_those_of_the_sigmoid_input():
    torch.manual_seed(0)
    model = mlp(norm_factory("batchnorm"), in_features=20, hidden=[12, 12, 12])
    rows = Rows()
    recorder = ActivationRecorder(model, [2, 3], seed=4, quantiles=[0.15, 0.5, 0.85], bins=10, log=rows)
    x = torch.randn(60, 20)
    recorder.arm(step=7)
    model(x)
    # the same quantities computed by hand from the blocks
    h1 = model.blocks[0](x)
    pre2 = model.blocks[1].norm(model.blocks[1].weight(h1))
    pre3 = model.blocks[2].norm(model.blocks[2].weight(model.blocks[1].activation(pre2)))
    for layer, pre in ((2, pre2), (3, pre3)):
        values = pre[:, recorder.units[layer]].detach().double()
        for q in (0.15, 0.5, 0.85):
            assert rows.value(f"act/q{q * 100:g}", layer) == pytest.approx(float(torch.quantile(values, q)))
        assert rows.value("act/mean", layer) == pytest.approx(float(values.mean()))
        assert rows.value("act/var", layer) == pytest.approx(float(values.var(unbiased=False)))
    assert {r[0] for r in rows.rows} == {7}
    assert [r["layer"] for r in recorder.records] == [2, 3]
    assert all(r["counts"].sum() == 60 and len(r["edges"]) == 11 for r in recorder.records)


def test_only_the_first_pass_of_an_armed_step_is_recorded():
    model = mlp(norm_factory("none"), in_features=5, hidden=[4])
    rows = Rows()
    recorder = ActivationRecorder(model, [1], seed=0, quantiles=[0.5], bins=5, log=rows)
    model(torch.randn(8, 5))  # not armed: nothing
    recorder.arm(3)
    model(torch.randn(8, 5))
    model(torch.randn(8, 5))  # a measurement pass of another probe: ignored
    assert len(recorder.records) == 1 and len(rows.rows) == 3
    recorder.remove()
    recorder.arm(4)
    model(torch.randn(8, 5))
    assert len(recorder.records) == 1


def test_conv_units_pool_batch_and_positions_and_noise_is_included():
    torch.manual_seed(1)
    model = vgg(norm_factory("batchnorm", noise=NoiseSpec(n_mu=5.0), seed=0), depth=11, width=0.125, image_size=16)
    rows = Rows()
    recorder = ActivationRecorder(model, [1], seed=0, quantiles=[0.5], bins=20, log=rows)
    recorder.arm(0)
    x = torch.randn(6, 3, 16, 16)
    model(x)
    assert recorder.records[0]["counts"].sum() == 6 * 16 * 16
    block = model.layer(1)
    unit = recorder.units[1]
    expected = block.norm(block.weight(x))[:, unit].detach().double()
    assert rows.value("act/mean", 1) == pytest.approx(float(expected.mean()))
    # BN alone would centre the unit at beta = 0; the noise (mu up to 5) moves it
    plain = block.norm.inner(block.weight(x))[:, unit].detach().double()
    assert abs(float(plain.mean())) < 1e-5 and abs(rows.value("act/mean", 1) - float(plain.mean())) > 1e-3


def test_unit_depends_on_seed_and_layer_only():
    model = mlp(norm_factory("none"), in_features=5, hidden=[50, 50, 50])
    both = ActivationRecorder(model, [1, 3], seed=0, quantiles=[0.5], bins=5, log=Rows())
    alone = ActivationRecorder(model, [3], seed=0, quantiles=[0.5], bins=5, log=Rows())
    assert both.units[3] == alone.units[3]
    units_by_seed = {ActivationRecorder(model, [3], seed=s, quantiles=[0.5], bins=5, log=Rows()).units[3] for s in range(10)}
    assert len(units_by_seed) > 3
    # drawn per layer: with one draw shared by all layers, #1, #2 and #3 would watch the same unit index
    for s in range(5):
        recorder = ActivationRecorder(model, [1, 2, 3], seed=s, quantiles=[0.5], bins=5, log=Rows())
        assert len(set(recorder.units.values())) > 1


def test_histograms_saved_atomically_and_taken_back_up_to_a_step(tmp_path):
    model = mlp(norm_factory("none"), in_features=5, hidden=[4, 4])
    recorder = ActivationRecorder(model, [1, 2], seed=0, quantiles=[0.5], bins=6, log=Rows())
    for step in (0, 10, 20):
        recorder.arm(step)
        model(torch.randn(8, 5))
    path = tmp_path / "activations.npz"
    recorder.save(path)
    with np.load(path) as saved:
        assert saved["step"].tolist() == [0, 0, 10, 10, 20, 20]
        assert saved["layer"].tolist() == [1, 2] * 3
        assert saved["counts"].shape == (6, 6) and saved["edges"].shape == (6, 7)
        assert set(saved["unit"].tolist()) <= set(recorder.units.values())
    assert not list(tmp_path.glob("*.tmp*"))
    resumed = ActivationRecorder(model, [1, 2], seed=0, quantiles=[0.5], bins=6, log=Rows())
    resumed.load(path, before_step=20)
    assert [r["step"] for r in resumed.records] == [0, 0, 10, 10]


def test_non_finite_values_are_counted_and_the_histogram_spans_the_finite_ones(tmp_path):
    """A run on its way to diverging: inputs with inf make the unit's values inf or NaN in those rows."""
    torch.manual_seed(0)
    model = mlp(norm_factory("none"), in_features=3, hidden=[4])
    rows = Rows()
    recorder = ActivationRecorder(model, [1], seed=0, quantiles=[0.5], bins=5, log=rows)
    x = torch.randn(10, 3)
    x[[2, 7]] = float("inf")
    recorder.arm(0)
    model(x)  # raised in np.histogram before
    values = model.layer(1).weight(x)[:, recorder.units[1]].detach().double()
    finite = values[torch.isfinite(values)].numpy()
    assert len(finite) == 8
    record = recorder.records[0]
    assert record["nonfinite"] == 2 and record["counts"].sum() == 8
    expected_counts, expected_edges = np.histogram(finite, bins=5)
    assert (record["counts"] == expected_counts).all() and np.array_equal(record["edges"], expected_edges)
    assert not np.isfinite(rows.value("act/mean", 1))  # the metrics say what happened; nothing is dropped

    recorder.arm(1)
    model(torch.full((6, 3), float("nan")))
    record = recorder.records[1]
    assert record["nonfinite"] == 6 and record["counts"].sum() == 0 and np.isnan(record["edges"]).all()

    path = tmp_path / "activations.npz"
    recorder.save(path)
    with np.load(path) as saved:
        assert saved["nonfinite"].tolist() == [2, 6]
    resumed = ActivationRecorder(model, [1], seed=0, quantiles=[0.5], bins=5, log=Rows())
    resumed.load(path, before_step=2)
    assert [r["nonfinite"] for r in resumed.records] == [2, 6]


@pytest.mark.parametrize("bias", [7.886e19, 1.0, 0.0])
def test_a_constant_unit_far_from_zero_is_binned_around_its_value(bias):
    """A dead ReLU layer leaves the next unit at its bias; in a diverging network that is 7.9e19, where
    NumPy's ±0.5 widening of a zero range rounds away and np.histogram raised: the run ended failed, not
    diverged. Cells a few float spacings wide now hold the values; near 0 NumPy's own histogram stands."""
    model = mlp(norm_factory("none"), in_features=3, hidden=[4])
    recorder = ActivationRecorder(model, [1], seed=0, quantiles=[0.5], bins=5, log=Rows())
    with torch.no_grad():
        model.layer(1).weight.weight[recorder.units[1]] = 0
        model.layer(1).weight.bias[recorder.units[1]] = bias
    recorder.arm(0)
    model(torch.randn(10, 3))
    (record,) = recorder.records
    value = float(torch.tensor(bias, dtype=torch.float32))  # as the float32 model holds it
    assert record["counts"].sum() == 10 and record["nonfinite"] == 0
    assert (np.diff(record["edges"]) > 0).all() and record["edges"][0] <= value <= record["edges"][-1]
    if abs(bias) < 1e6:
        expected_counts, expected_edges = np.histogram(np.full(10, value), bins=5)
        assert (record["counts"] == expected_counts).all() and np.array_equal(record["edges"], expected_edges)


def test_histograms_written_before_non_finite_counts_load_with_none(tmp_path):
    path = tmp_path / "activations.npz"
    np.savez_compressed(path, step=np.array([0, 10]), layer=np.array([1, 1]), unit=np.array([0, 0]),
                        counts=np.ones((2, 5), dtype=np.int64), edges=np.tile(np.linspace(0, 1, 6), (2, 1)))
    recorder = ActivationRecorder(mlp(norm_factory("none"), in_features=3, hidden=[4]), [1], seed=0,
                                  quantiles=[0.5], bins=5, log=Rows())
    recorder.load(path, before_step=20)
    assert [r["nonfinite"] for r in recorder.records] == [0, 0]
    recorder.save(path)
    with np.load(path) as saved:
        assert saved["nonfinite"].tolist() == [0, 0]
