"""Objects built from a config (`bnopt.build`): the device a name resolves to, the model's, norm's and
optimiser's settings reaching the objects, the learning-rate schedules, and data a model cannot take."""

import math

import pytest
import torch

from bnopt.build import build_model, build_optimizer, resolve_device
from bnopt.config import ConfigError
from bnopt.data import TensorData, sum_squared_loss
from bnopt.norms import LpNorm, NoisyNorm, NoiseSpec
from conftest import REPO, compose_config
from test_models import convs


def images(n, c, h, w, num_classes=10):
    return TensorData("images", torch.zeros(n, c, h, w), torch.zeros(n, dtype=torch.long), None, None, num_classes,
                      torch.nn.functional.cross_entropy)


def regression(n, inputs, targets):
    return TensorData("regression", torch.zeros(n, inputs), torch.zeros(n, targets), None, None, None,
                      sum_squared_loss(0.5))


def test_device_names_resolve_to_the_machines_devices_or_fail_naming_the_key(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="device='cuda' .* CUDA is not available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="device='cuda:2' .* 2 CUDA device"):
        resolve_device("cuda:2")


def test_the_norms_settings_reach_every_norm_layer():
    data = images(4, 1, 28, 28)
    cfg = compose_config("model=mlp", "data=mnist", "norm=lp2", "norm.eps=0.01", "norm.momentum=0.3")
    norms = [m for m in build_model(cfg, data).modules() if isinstance(m, LpNorm)]
    assert len(norms) == 3 and all((n.p, n.eps, n.momentum, n.norm_of) == (2.0, 0.01, 0.3, "raw") for n in norms)
    cfg = compose_config("model=mlp", "data=mnist", "norm=lpinf", "norm.norm_of=centred")
    assert {m.norm_of for m in build_model(cfg, data).modules() if isinstance(m, LpNorm)} == {"centred"}
    cfg = compose_config("model=mlp", "data=mnist", "norm=noisy_batchnorm", "norm.momentum=0.3",
                         "norm.noise.n_sigma=2", "seed=7")
    noisy = [m for m in build_model(cfg, data).modules() if isinstance(m, NoisyNorm)]
    assert [n.layer_key for n in noisy] == [0, 1, 2] and all(n.seed == 7 for n in noisy)
    assert all(n.spec == NoiseSpec(n_sigma=2.0) and n.inner.momentum == 0.3 for n in noisy)
    cfg = compose_config("model=mlp", "data=mnist", "norm=noisy_none", "norm.noise.train_only=false")
    noisy = [m for m in build_model(cfg, data).modules() if isinstance(m, NoisyNorm)]
    assert len(noisy) == 3 and all(n.spec == NoiseSpec(train_only=False) for n in noisy)


def test_the_models_settings_and_the_datas_shape_reach_the_network():
    cfg = compose_config("model=vgg", "data=cifar10", "model.depth=11", "model.width=0.0625", "model.bias=false")
    net = build_model(cfg, images(2, 1, 28, 28, num_classes=7))
    assert [c.out_channels for c in convs(net)] == [4, 8, 16, 16, 32, 32, 32, 32] and convs(net)[0].in_channels == 1
    assert all(c.bias is None for c in convs(net)) and net.layer(9).weight.out_features == 7
    cfg = compose_config("model=mlp", "data=mnist", "model.hidden=[20,30]", "model.init_std=fan_in")
    net = build_model(cfg, images(2, 1, 28, 28))
    assert [net.layer(k).weight.in_features for k in (1, 2, 3)] == [784, 20, 30]
    assert net.layer(1).weight.weight.std().item() == pytest.approx(1 / 28, rel=0.1)
    cfg = compose_config("+experiment=dln_bn", "model.depth=4")
    net = build_model(cfg, regression(8, 6, 6))
    assert net.num_layers == 4 and net.layer(4).weight.in_features == 6 and net.layer(4).norm is None
    net = build_model(compose_config("+experiment=dln_bn", "model.norm_after_last=true"), regression(8, 6, 6))
    assert isinstance(net.layer(25).norm, torch.nn.modules.batchnorm._BatchNorm)


def learning_rates(optimizer, schedule, steps):
    """The learning rate of each of ``steps`` steps, as the loop steps the schedule."""
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: moves nothing
        schedule.step()
    return rates


def test_the_optimiser_is_sgd_with_the_configs_settings_and_schedule():
    model = torch.nn.Linear(2, 2)
    cfg = compose_config("optim.lr=0.2", "optim.momentum=0.9", "optim.nesterov=true", "optim.weight_decay=0.001",
                         "optim.schedule=cosine")
    optimizer, schedule = build_optimizer(cfg.optim, model, steps=8)
    assert type(optimizer) is torch.optim.SGD
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, True, 0.001)
    rates = learning_rates(optimizer, schedule, 9)  # cosine annealing to zero over the run's 8 steps
    assert rates == pytest.approx([0.1 * (1 + math.cos(math.pi * t / 8)) for t in range(9)], abs=1e-12)

    cfg = compose_config("optim.lr=0.2", "optim.schedule=multistep", "optim.milestones=[2,4]", "optim.gamma=0.5")
    optimizer, schedule = build_optimizer(cfg.optim, model, steps=8)
    assert learning_rates(optimizer, schedule, 6) == pytest.approx([0.2, 0.2, 0.1, 0.1, 0.05, 0.05])
    assert build_optimizer(compose_config("optim.lr=0.2").optim, model, steps=8)[1] is None  # constant


def test_data_a_model_cannot_take_is_refused_naming_the_model():
    with pytest.raises(ConfigError, match="VGG needs square images, the data has shape \\(3, 32, 16\\)"):
        build_model(compose_config("model=vgg", "data=cifar10"), images(4, 3, 32, 16))
    with pytest.raises(ConfigError, match="the DLN is square: inputs \\(10,\\) and targets \\(5,\\)"):
        build_model(compose_config("+experiment=dln_bn"), regression(8, 10, 5))


def test_the_package_is_this_checkout_s_alone():
    """bnopt was a namespace package (no __init__.py), which merges every bnopt directory on sys.path: a clone
    tested beside an editable install of another checkout ran modules of both."""
    import bnopt

    assert bnopt.__file__ == str(REPO / "src" / "bnopt" / "__init__.py")
    assert list(bnopt.__path__) == [str(REPO / "src" / "bnopt")]
