"""The three networks (protocol sections 1-3) and their semantic layer numbering."""

import math

import pytest
import torch
from torch import nn

from bnopt.models import VGG_LAYOUTS, ChainModel, dln, mlp, vgg
from bnopt.norms import BatchNorm, LpNorm, NoNorm, NoiseSpec, NoisyNorm, norm_factory

VARIANTS = [norm_factory("none"), norm_factory("batchnorm"), norm_factory("lp", p=1),
            norm_factory("batchnorm", noise=NoiseSpec())]


def convs(model: ChainModel) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("depth", sorted(VGG_LAYOUTS))
def test_vgg_layer_k_is_the_kth_conv_with_or_without_norm(depth):
    n_convs = sum(1 for entry in VGG_LAYOUTS[depth] if entry != "M")
    for make in VARIANTS:
        model = vgg(make, depth=depth, width=0.125)
        assert model.num_layers == n_convs + 1  # convs, then the linear classifier
        for k, conv in enumerate(convs(model), start=1):
            assert model.layer(k).weight is conv
        assert isinstance(model.layer(n_convs + 1).weight, nn.Linear)


def test_vgg16_follows_the_protocol_layout():
    model = vgg(norm_factory("batchnorm"), depth=16)
    widths = [c.out_channels for c in convs(model)]
    assert widths == [e for e in VGG_LAYOUTS[16] if e != "M"]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs(model))
    assert model.layer(14).weight.in_features == 512 and model.layer(14).weight.out_features == 10
    # conv -> norm -> ReLU in every conv block, pooling after the blocks followed by "M"
    pooled = [k for k in range(1, 14) if model.layer(k).pool is not None]
    assert pooled == [2, 4, 7, 10, 13]
    for k in range(1, 14):
        block = model.layer(k)
        assert isinstance(block.norm, BatchNorm) and isinstance(block.activation, nn.ReLU)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg_takes_channels_and_size_from_the_data_and_scales_width():
    model = vgg(norm_factory("batchnorm"), depth=16, in_channels=1, image_size=28, width=0.125)
    assert convs(model)[0].in_channels == 1
    assert [c.out_channels for c in convs(model)][:4] == [8, 8, 16, 16]
    assert model(torch.randn(4, 1, 28, 28)).shape == (4, 10)
    # channels rounded to the nearest integer (256 * 0.3 = 76.8), and conv biases only if asked for
    narrow = vgg(norm_factory("batchnorm"), depth=11, width=0.3, bias=False)
    assert [c.out_channels for c in convs(narrow)] == [19, 38, 77, 77, 154, 154, 154, 154]
    assert all(c.bias is None for c in convs(narrow)) and narrow.layer(9).weight.bias is not None
    with pytest.raises(ValueError, match="depth"):
        vgg(norm_factory("none"), depth=12)


def test_vgg_init_is_glorot_with_zero_bias():
    torch.manual_seed(0)
    model = vgg(norm_factory("none"), depth=11)
    for conv in convs(model):
        fan_in, fan_out = conv.in_channels * 9, conv.out_channels * 9
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert conv.weight.abs().max() <= bound
        assert conv.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))


def test_layer_params_group_weight_bias_and_norm_parameters():
    model = vgg(norm_factory("batchnorm"), depth=11, width=0.125)
    layers = model.layer_params()
    block = model.layer(3)
    assert layers[2] == [block.weight.weight, block.weight.bias, block.norm.weight, block.norm.bias]
    assert sum(len(group) for group in layers) == len(list(model.parameters()))
    for k in (0, 10):  # numbered from 1, as the paper does: layer(0) is not the last layer
        with pytest.raises(IndexError, match="layers #1..#9"):
            model.layer(k)


def test_mlp_is_784_100_100_100_10_sigmoid_with_bias_only_where_no_norm_follows():
    plain = mlp(norm_factory("none"))
    normed = mlp(norm_factory("batchnorm"))
    for model in (plain, normed):
        shapes = [tuple(model.layer(k).weight.weight.shape) for k in range(1, 5)]
        assert shapes == [(100, 784), (100, 100), (100, 100), (10, 100)]
        assert all(isinstance(model.layer(k).activation, nn.Sigmoid) for k in range(1, 4))
        assert model.layer(4).norm is None and model.layer(4).activation is None
        assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    assert all(plain.layer(k).weight.bias is not None for k in range(1, 5))
    assert all(normed.layer(k).weight.bias is None for k in range(1, 4))
    assert normed.layer(4).weight.bias is not None  # the classifier is not followed by a norm
    logistic = mlp(norm_factory("none"), hidden=[])  # no hidden layer: the classifier takes the image
    assert logistic.num_layers == 1 and logistic(torch.randn(5, 1, 28, 28)).shape == (5, 10)


def test_mlp_init_is_a_small_gaussian():
    torch.manual_seed(0)
    model = mlp(norm_factory("none"), init_std=0.1)
    assert model.layer(1).weight.weight.std().item() == pytest.approx(0.1, rel=0.05)
    fan_in = mlp(norm_factory("none"), init_std="fan_in")
    assert fan_in.layer(1).weight.weight.std().item() == pytest.approx(1 / 28, rel=0.05)
    biases = [m.bias for m in (*model.modules(), *mlp(norm_factory("batchnorm")).modules())
              if isinstance(m, nn.Linear) and m.bias is not None]
    assert len(biases) == 5 and all(torch.equal(b, torch.zeros_like(b)) for b in biases)


def test_dln_is_a_product_of_25_square_bias_free_matrices():
    torch.manual_seed(0)
    model = dln(norm_factory("none"))
    assert model.num_layers == 25
    weights = [model.layer(k).weight.weight for k in range(1, 26)]
    assert all(w.shape == (10, 10) for w in weights)
    assert all(model.layer(k).weight.bias is None for k in range(1, 26))
    x = torch.randn(7, 10, dtype=torch.float64)
    product = torch.eye(10, dtype=torch.float64)
    for w in weights:
        product = w.double() @ product
    torch.testing.assert_close(model.double()(x), x @ product.T)


@pytest.mark.parametrize("make, kind", [(norm_factory("batchnorm"), BatchNorm), (norm_factory("lp", p=2), LpNorm),
                                        (norm_factory("none", noise=NoiseSpec()), NoisyNorm)])
def test_dln_has_a_norm_after_every_layer_but_the_last(make, kind):
    model = dln(make)
    assert all(isinstance(model.layer(k).norm, kind) for k in range(1, 25))
    assert model.layer(25).norm is None
    plain = dln(norm_factory("none"))
    assert all(isinstance(plain.layer(k).norm, NoNorm) for k in range(1, 25))
    every = dln(make, norm_after_last=True)
    assert all(isinstance(every.layer(k).norm, kind) for k in range(1, 26))
