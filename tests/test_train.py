"""End-to-end runs at scale=smoke: the results contract, repeatability, probes as observations,
divergence as a result, the experiments' overrides, and the real loaders through the whole loop."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from bnopt.build import build_model
from bnopt.data import BatchStream, load_data
from bnopt.norms import BatchNorm, NoisyNorm
from bnopt.probes import measure_ics
from bnopt.results import read_run
from bnopt.rundir import MetricsWriter, RunDirectory, git_commit
from bnopt.seeding import seed_everything
from bnopt.train import AnotherConfigError, cpu_model, device_name, identity_differences
from conftest import REPO, ascii_locale_env, compose_config, read_rows, run_cli, train_run


def test_dln_run_writes_the_results_contract(tmp_path):
    summary = train_run(tmp_path, "+experiment=dln_bn", "scale=smoke")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "checkpoint.pt", "config.yaml", "metrics.csv",
                                                          "summary.json"]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[0] == "step,name,value,layer,eta"
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    train_loss = metrics[metrics.name == "train/loss"]
    assert train_loss.step.tolist() == [0, 5, 10, 15, 20, 25]
    assert train_loss.layer.isna().all() and train_loss.eta.isna().all()
    assert train_loss.value.iloc[-1] < train_loss.value.iloc[0]  # the loss falls
    assert "train/acc" not in set(metrics.name) and "test/loss" not in set(metrics.name)  # regression: loss only
    ics = metrics[metrics.name == "ics/l2"]
    assert ics.step.unique().tolist() == [0, 10, 20] and sorted(ics.layer.unique()) == [9, 17]
    cos = metrics[metrics.name == "ics/cos"]
    assert cos[["step", "layer"]].values.tolist() == ics[["step", "layer"]].values.tolist()
    land = metrics[metrics.name == "landscape/loss"]
    assert sorted(land.eta.unique()) == pytest.approx([1e-8, 1e-7, 1e-6, 1e-5, 3e-5])
    assert set(metrics[metrics.name.str.startswith("landscape/b")].name) == {"landscape/beta"}

    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["status"] == summary["status"] == "completed" and on_disk["steps"] == 30
    for key in ("final", "wall_time_s", "steps_per_s", "device", "torch", "git_commit"):
        assert key in on_disk
    assert on_disk["device_name"] == device_name(torch.device("cpu"))  # which CPU kind the numbers are of
    assert on_disk["job"] is None  # trained through the library: no launcher named it (the CLI's: test_cli)
    assert on_disk["final"]["train/loss"] == train_loss.value.iloc[-1]
    assert on_disk["metrics_rows"] == len(metrics) > 0  # what the figures and the report check the file against
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["optim"]["lr"] == 1e-6 and config["train"]["batch_size"] == 1000 and "${" not in (tmp_path / "config.yaml").read_text()
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["step"] == 30 and "model" in checkpoint and "optimizer" in checkpoint


def test_a_cpu_is_named_by_its_model_and_the_instruction_set_of_torchs_kernels(tmp_path, monkeypatch):
    """Runs of one seed on two CPUs whose kernels use other instruction sets differ in the last bits (the
    committed DLN runs and the same command on an AVX2 machine, from step 0), so a summary names both."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6338\n\n"
                       "processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Gold 6338\n")
    assert cpu_model(cpuinfo) == "Intel(R) Xeon(R) Gold 6338"
    monkeypatch.setattr("platform.processor", lambda: "")
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nmodel name\t:\n")  # ARM's cpuinfo: no model name
    assert cpu_model(cpuinfo) == cpu_model(tmp_path / "absent") == "aarch64"  # or no /proc at all (macOS)
    monkeypatch.setattr("bnopt.train.cpu_model", lambda: "Intel(R) Xeon(R) Gold 6338")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert device_name(torch.device("cpu")) == "Intel(R) Xeon(R) Gold 6338 (AVX512)"


def test_a_finished_run_without_its_checkpoint_is_neither_rerun_nor_overwritten(tmp_path):
    """The committed results are kept without checkpoints (and a user may delete them to save space): the
    summary says the run finished, its config.yaml whose run it is."""
    args = ("+experiment=dln_bn", "scale=smoke", "probes=none")
    train_run(tmp_path, *args)
    (tmp_path / "checkpoint.pt").unlink()
    finished = {name: (tmp_path / name).read_bytes() for name in ("metrics.csv", "summary.json", "config.yaml")}
    assert train_run(tmp_path, *args, "name=another_label")["status"] == "completed"  # not re-run
    with pytest.raises(AnotherConfigError, match=r"config.yaml belongs to a run with another config \(optim.lr: "
                                                 r"1e-06 -> 2e-06\); refusing to overwrite its results"):
        train_run(tmp_path, *args, "optim.lr=2e-6")
    assert {name: (tmp_path / name).read_bytes() for name in finished} == finished
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_finished_run_whose_record_was_cut_short_is_named_when_its_command_runs_again(tmp_path, caplog):
    """The figures and the report skip a finished run whose metrics.csv lost rows (a copy cut short at a
    line's end); its command, run again, finds it finished and must say so rather than just 'already completed',
    with its checkpoint and without (as the committed results are kept)."""
    args = ("+experiment=dln_bn", "scale=smoke", "probes=none")
    train_run(tmp_path, *args)
    with caplog.at_level("WARNING", logger="bnopt"):
        train_run(tmp_path, *args)
    assert not caplog.records  # a whole record: nothing to say
    lines = (tmp_path / "metrics.csv").read_text().splitlines(keepends=True)
    (tmp_path / "metrics.csv").write_text("".join(lines[:-2]))
    cut = {name: (tmp_path / name).read_bytes() for name in ("metrics.csv", "summary.json")}
    for checkpoint_kept in (True, False):
        if not checkpoint_kept:
            (tmp_path / "checkpoint.pt").unlink()
        caplog.clear()
        with caplog.at_level("WARNING", logger="bnopt"):
            assert train_run(tmp_path, *args)["status"] == "completed"  # not trained again
        assert [r.getMessage() for r in caplog.records] == [
            f"{tmp_path / 'metrics.csv'} holds {len(lines) - 3} rows where the run, completed, wrote "
            f"{len(lines) - 1}: part of its record is lost (a copy cut short?), and the figures and the report "
            f"skip it. Move the run away and run this command again"], checkpoint_kept
        assert {name: (tmp_path / name).read_bytes() for name in cut} == cut


def test_where_the_data_lives_is_not_part_of_a_runs_identity():
    """A requeued job on a node that keeps the data elsewhere (``BNOPT_DATA``), without internet
    (``data.download=false``), resumes its run; what the data are stays part of it."""
    run = OmegaConf.to_container(compose_config("model=mlp", "data=fashion_mnist"), resolve=True)
    moved = OmegaConf.to_container(compose_config("model=mlp", "data=fashion_mnist", "data.root=/scratch/data",
                                                  "data.download=false", "data.search_paths=[]"), resolve=True)
    assert identity_differences(run, moved) == []
    other = OmegaConf.to_container(compose_config("model=mlp", "data=fashion_mnist", "data.normalise=none"),
                                   resolve=True)
    assert identity_differences(run, other) == ["data.normalise: 'per_channel' -> 'none'"]


def test_a_runs_config_with_a_non_ascii_value_is_written_and_read_back_whatever_the_locale(tmp_path):
    """config.yaml is written in UTF-8, the encoding it is read back in (a resumed run compares it with its
    own): under a locale whose encoding is not UTF-8 it was written in that one, so a run named in Latin-1's
    letters could not resume (a UnicodeDecodeError), and under an ASCII one it could not start."""
    script = ("import sys; from omegaconf import OmegaConf; from bnopt.rundir import RunDirectory; "
              "run = RunDirectory(sys.argv[1]); run.write_config(OmegaConf.create({'name': 'r\\u00e9seau'})); "
              "assert run.read_config() == {'name': 'r\\u00e9seau'}")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            env=ascii_locale_env())
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "config.yaml").read_text(encoding="utf-8") == "name: réseau\n"


def test_train_log_is_utf8_and_logs_a_non_ascii_run_directory_whatever_the_locale(tmp_path):
    """Hydra's own file handler opens train.log in the locale's encoding: under an ASCII one, each line that
    named a run directory outside ASCII became a "--- Logging error ---" traceback instead of the line."""
    run_dir = tmp_path / "r\u00e9seau"
    result = run_cli("model=dln", "data=gaussian_regression", "norm=none", "scale=smoke", f"hydra.run.dir='{run_dir}'",
                     env=ascii_locale_env())
    assert result.returncode == 0, result.stderr
    assert "Logging error" not in result.stdout + result.stderr
    log = (run_dir / "train.log").read_text(encoding="utf-8")
    assert "training from step 0 of 30" in log and "completed at step 30" in log


def test_a_run_written_before_the_protocols_defaults_became_config_keys_is_still_that_run(tmp_path):
    """The committed results' config.yaml files have no data.x_std, data.a_std nor model.norm_after_last:
    such a run is read as the run with the values that compute what it computed, so a recipe neither
    retrains it nor refuses it, and a figure groups it with runs written since; another value is another run."""
    args = ("+experiment=dln_bn", "scale=smoke", "probes=none")
    train_run(tmp_path, *args)
    (tmp_path / "checkpoint.pt").unlink()
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del config["data"]["x_std"], config["data"]["a_std"], config["model"]["norm_after_last"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    finished = {name: (tmp_path / name).read_bytes() for name in ("metrics.csv", "summary.json", "config.yaml")}
    assert train_run(tmp_path, *args)["status"] == "completed"
    with pytest.raises(AnotherConfigError, match=r"\(data.x_std: 1.0 -> 2.0\)"):
        train_run(tmp_path, *args, "data.x_std=2.0")
    assert {name: (tmp_path / name).read_bytes() for name in finished} == finished  # neither re-run nor overwritten
    run = read_run(tmp_path)
    assert (run.get("data.x_std"), run.get("data.a_std"), run.get("model.norm_after_last")) == (1.0, 1.0, False)


def committed_runs_one_per_sweep_and_norm() -> list[Path]:
    chosen = {}
    for config in sorted((REPO / "results").glob("*-*/*/*/config.yaml")):
        norm = yaml.safe_load(config.read_text())["norm"]["name"]
        chosen.setdefault((config.parent.parent, norm), config.parent)
    return list(chosen.values())


@pytest.mark.parametrize("run_dir", committed_runs_one_per_sweep_and_norm(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_committed_run_is_the_run_its_command_composes_today(run_dir):
    """A config key added since the results were made must read, where absent, as the value that computes
    what they computed (``with_keys_added_later``); otherwise every recipe would retrain them, or refuse."""
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    committed = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert identity_differences(committed, OmegaConf.to_container(compose_config(*overrides), resolve=True)) == []


@pytest.mark.parametrize("finished_before", [False, True], ids=["trains", "already completed"])
def test_a_run_leaves_the_process_thread_count_and_float32_settings_as_it_found_them(tmp_path, finished_before):
    """They are the process's: a notebook (or this test suite) that trains another run after one with
    threads=1 must not train, and compare, it on one thread; and a matmul precision set there stays set,
    and readable (newer torch cannot report one restored through the legacy TF32 flag)."""
    cudnn = torch.backends.cudnn
    args = ("+experiment=dln_bn", "scale=smoke", "probes=none", "train.tf32=true")
    if finished_before:
        train_run(tmp_path, *args)
    saved = torch.get_num_threads(), torch.get_float32_matmul_precision(), cudnn.allow_tf32
    try:
        torch.set_num_threads(2)
        torch.set_float32_matmul_precision("medium")
        cudnn.allow_tf32 = False
        summary = train_run(tmp_path, *args, "threads=1")
        assert summary["status"] == "completed" and (summary["threads"] == 1 or finished_before)
        assert (torch.get_num_threads(), torch.get_float32_matmul_precision(), cudnn.allow_tf32) == (2, "medium", False)
    finally:
        torch.set_num_threads(saved[0])
        torch.set_float32_matmul_precision(saved[1])
        cudnn.allow_tf32 = saved[2]


@pytest.mark.parametrize("tf32", [False, True])
def test_the_loop_probes_read_the_training_gradient_only_where_it_is_computed_as_theirs(tmp_path, monkeypatch, tf32):
    """On a CPU in full fp32 (eager) the training pass's .grad is the probes' own gradient, bit for bit, and
    saves them a pass; under TF32 (or compiled: tests/test_sweeps.py) the probes compute it themselves."""
    import bnopt.train

    built = []

    def build_probes(*args, **kwargs):
        built.append(kwargs["reuse_training_gradient"])
        return real_build_probes(*args, **kwargs)

    real_build_probes = bnopt.train.build_probes
    monkeypatch.setattr(bnopt.train, "build_probes", build_probes)
    summary = train_run(tmp_path, "+experiment=dln_bn", "scale=smoke", "train.steps=2", f"train.tf32={tf32}")
    assert summary["status"] == "completed" and built == [not tf32]


def test_an_empty_probe_list_is_no_probes(tmp_path):
    summary = train_run(tmp_path, "+experiment=dln_bn", "scale=smoke", "probes=[]")
    assert summary["status"] == "completed"
    assert set(pd.read_csv(tmp_path / "metrics.csv").name) == {"train/loss"}


@pytest.mark.parametrize("tf32", [False, True])
def test_the_float32_settings_stay_the_run_s_through_its_probes(tmp_path, monkeypatch, tf32):
    """The probes measure in full fp32 and put the run's settings back: for a TF32 run set through the
    legacy flag, putting back its precision ("high") also switched the CPU's matmuls to TF32 from the first
    probe on, a change of numerics mid-run."""
    import bnopt.train

    seen = []

    def noting_the_settings(real):
        def call(*args):
            mkldnn_matmul = getattr(torch.backends.mkldnn, "matmul", None)  # torch >= 2.9
            seen.append((torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
                         torch.backends.cudnn.allow_tf32, getattr(mkldnn_matmul, "fp32_precision", None)))
            return real(*args)
        return call

    # evaluate: at step 0 before the first probe, log_train: after each
    for name in ("evaluate", "log_train"):
        monkeypatch.setattr(bnopt.train, name, noting_the_settings(getattr(bnopt.train, name)))
    train_run(tmp_path, "+experiment=dln_bn", "scale=smoke", "probes=[ics]", "probes.ics.every=5",
              "train.log_every=5", "train.eval_every=1000", f"train.tf32={tf32}")
    assert len(seen) == 8 and len(set(seen)) == 1, seen
    assert seen[0][:3] == (("high", True, True) if tf32 else ("highest", False, False))


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(tmp_path, cifar_root):
    args = ("+experiment=noisy_bn", "scale=smoke", f"data.root={cifar_root}", "data.download=false")
    train_run(tmp_path / "a", *args)
    train_run(tmp_path / "b", *args)
    train_run(tmp_path / "c", *args, "seed=1")
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()
    assert read_rows(tmp_path / "a") != read_rows(tmp_path / "c")


ALL_PROBES = "probes=[ics,landscape,activations]"


@pytest.mark.parametrize("args", [
    ("model=vgg", "data=cifar10", "norm=noisy_batchnorm", "model.paper.ics_layers=[1,5,14]",
     "model.paper.activation_layers=[2,9,13]"),
    ("model=vgg", "data=cifar10", "norm=batchnorm", "optim.momentum=0.9", "optim.weight_decay=5e-4", "data.augment=true"),
    ("model=mlp", "data=mnist", "norm=lpinf"),
    ("+experiment=dln_bn", "model.paper.ics_layers=[1,9,17,25]"),
], ids=["vgg-noisy-bn", "vgg-bn-momentum-augment", "mlp-linf", "dln-bn"])
def test_probes_leave_the_training_trajectory_unchanged(tmp_path, cifar_root, mnist_root, args):
    root = mnist_root if "data=mnist" in args else cifar_root
    common = ("scale=smoke",) if "dln" in args[0] else ("scale=smoke", f"data.root={root}", "data.download=false")
    train_run(tmp_path / "off", *args, *common, "probes=none")
    train_run(tmp_path / "on", *args, *common, ALL_PROBES)
    measured = pd.read_csv(tmp_path / "on/metrics.csv")
    assert {"ics/l2", "ics/cos", "landscape/loss", "landscape/beta", "act/q50", "act/var"} <= set(measured.name)
    assert read_rows(tmp_path / "on") == read_rows(tmp_path / "off")
    off = torch.load(tmp_path / "off/checkpoint.pt", weights_only=True)
    on = torch.load(tmp_path / "on/checkpoint.pt", weights_only=True)
    assert all(torch.equal(off["model"][k], on["model"][k]) for k in off["model"])  # running statistics too
    # and the global random streams, which a model with dropout would train on: no probe draws from them
    assert torch.equal(off["rng"]["torch"], on["rng"]["torch"])
    assert torch.equal(off["rng"]["numpy"][1], on["rng"]["numpy"][1]) and off["rng"]["python"] == on["rng"]["python"]
    assert (tmp_path / "on/activations.npz").exists()


def test_probes_measure_their_steps_weights_and_batch_before_the_update(tmp_path):
    """The rows of step t describe W(t) on batch t, measured between backward and step: the landscape's
    losses are L(W(t) - eta g(t)) computed by hand, and ICS is that of W(t), along the same SGD on the same
    batches outside the loop. (A probe run after the update would measure W(t+1).)"""
    overrides = ("+experiment=dln_bn", "scale=smoke", "probes=[ics,landscape]", "scale.dln.probe_every=1",
                 "train.steps=3", "model.paper.ics_layers=[2,5]")
    train_run(tmp_path, *overrides)
    logged = pd.read_csv(tmp_path / "metrics.csv")
    cfg = compose_config(*overrides)
    seed_everything(cfg.seed)
    data = load_data(cfg.data, cfg.seed)
    model = build_model(cfg, data).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
    batches = BatchStream(data.train_x, data.train_y, cfg.train.batch_size, cfg.seed)
    etas = list(cfg.probes.landscape.etas)
    for step in range(cfg.train.steps):
        x, y = batches.next()
        optimizer.zero_grad(set_to_none=True)
        data.loss_fn(model(x), y).backward()  # the training forward (statistics move) and backward
        # G as the loop takes it, from .grad: ||G - G'|| cancels most digits, so G must be the same bits
        ics = measure_ics(model, data.loss_fn, (x, y), optimizer, model.layer_params(), which=[1, 4],
                          use_grad_fields=True)
        losses = []
        for eta in etas:
            moved = copy.deepcopy(model)
            with torch.no_grad():
                for p, at_w in zip(moved.parameters(), model.parameters()):
                    p.sub_(eta * at_w.grad)
                losses.append(float(data.loss_fn(moved(x), y)))
        at_step = logged[logged.step == step]
        assert at_step[at_step.name == "landscape/loss"].value.tolist() == pytest.approx(losses, rel=1e-5)
        assert at_step[at_step.name == "ics/l2"].value.tolist() == pytest.approx([r["l2"] for r in ics], rel=1e-9)
        optimizer.step()


def test_experiment_overrides_keep_the_experiments_other_settings(tmp_path, cifar_root):
    cfg = compose_config("+experiment=noisy_bn", "norm=batchnorm", "optim.lr=0.5")
    assert cfg.norm.name == "batchnorm" and cfg.norm.noise is None and cfg.optim.lr == 0.5
    assert cfg.model.name == "vgg" and cfg.model.depth == 16 and cfg.data.name == "cifar10"
    assert cfg.train.batch_size == 128 and cfg.train.steps == 15000 and cfg.name == "noisy_bn"
    assert list(cfg.probes) == ["activations"] and list(cfg.probes.activations.layers) == [2, 9, 13]
    assert compose_config("+experiment=noisy_bn").norm.noise.n_sigma == 1.25
    # and the run really is BN at lr 0.5
    train_run(tmp_path, "+experiment=noisy_bn", "norm=batchnorm", "optim.lr=0.5", "scale=smoke",
              f"data.root={cifar_root}", "data.download=false")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["norm"]["name"] == "batchnorm" and saved["optim"]["lr"] == 0.5


@pytest.mark.parametrize("experiment, model, norm, probes", [
    ("vgg_bn", "vgg", "batchnorm", set()), ("noisy_bn", "vgg", "noisy_batchnorm", {"activations"}),
    ("lp_vgg", "vgg", "lp1", {"landscape", "activations"}), ("dln_bn", "dln", "batchnorm", {"ics", "landscape"}),
    ("lp_dln", "dln", "lp1", {"landscape"}), ("mnist_bn", "mlp", "batchnorm", {"activations"}),
])
def test_each_starting_experiment_composes_its_paper_settings(experiment, model, norm, probes):
    cfg = compose_config(f"+experiment={experiment}")
    assert (cfg.name, cfg.model.name, cfg.norm.name, set(cfg.probes)) == (experiment, model, norm, probes)
    expected = {"vgg": (0.1, 128, 15000), "dln": (1e-6, 1000, 10000), "mlp": (0.5, 60, 50000)}[model]
    assert (cfg.optim.lr, cfg.train.batch_size, cfg.train.steps) == expected
    assert cfg.optim.momentum == 0 and cfg.optim.weight_decay == 0 and cfg.optim.schedule == "constant"
    assert dict(compose_config(f"+experiment={experiment}", "probes=none").probes or {}) == {}


def test_scale_presets_shrink_only_what_they_must():
    paper, cpu = compose_config("+experiment=vgg_bn"), compose_config("+experiment=vgg_bn", "scale=cpu")
    assert (paper.model.width, cpu.model.width) == (1.0, 0.125) and cpu.train.steps < paper.train.steps
    for experiment in ("dln_bn", "mnist_bn"):
        a, b = compose_config(f"+experiment={experiment}"), compose_config(f"+experiment={experiment}", "scale=cpu")
        assert a.train == b.train and a.model == b.model
    assert compose_config("+experiment=vgg_bn", "scale=cpu", "train.steps=7").train.steps == 7


def test_divergence_is_a_result(tmp_path):
    summary = train_run(tmp_path, "+experiment=dln_bn", "norm=none", "probes=none", "optim.lr=1.0", "scale=smoke")
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == summary["steps"] < 30
    assert read_rows(tmp_path)[0].startswith("0,train/loss,")
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["status"] == "diverged"


def test_a_run_diverging_under_every_probe_is_still_a_result(tmp_path):
    """At lr 1 the DLN's step-1 forward overflows: the activation probe sees NaN before the loss is checked
    (np.histogram raised, so the run ended "failed"), and at step 0 ICS's moved prefix already overflows."""
    summary = train_run(tmp_path, "+experiment=dln_bn", "norm=none", ALL_PROBES, "scale.dln.probe_every=1",
                        "optim.lr=1.0", "scale=smoke")
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == 1
    metrics = pd.read_csv(tmp_path / "metrics.csv")
    cos = metrics[metrics.name == "ics/cos"]
    assert cos.step.tolist() == [0, 0] and cos.value.isna().all()  # undefined, not clipped to -1
    with np.load(tmp_path / "activations.npz") as saved:
        last = saved["step"] == 1
        assert last.sum() == 3 and (saved["nonfinite"][last] + saved["counts"][last].sum(axis=1) == 1000).all()
        assert saved["nonfinite"][last].max() == 1000


def test_unnormalised_vgg_at_lr_half_diverges_or_is_stuck_but_does_not_crash(tmp_path, cifar_root):
    summary = train_run(tmp_path, "+experiment=vgg_bn", "norm=none", "optim.lr=0.5", "scale=smoke",
                        f"data.root={cifar_root}", "data.download=false")
    assert summary["status"] in ("completed", "diverged")


def test_evaluation_is_the_whole_test_sets_mean_loss_and_accuracy_in_eval_mode():
    """In batches that do not divide the test set, the logged values are the whole set's, with the running
    statistics, and the model goes back to training mode."""
    from bnopt.data import TensorData
    from bnopt.train import evaluate

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)).double()
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2)
    x, y = torch.randn(103, 6, dtype=torch.float64), torch.randint(0, 3, (103,))
    data = TensorData("t", x, y, x, y, 3, torch.nn.functional.cross_entropy)
    logged = {}
    evaluate(model, data, 10, 0, lambda step, name, value: logged.update({name: value}))
    assert model.training
    with torch.no_grad():
        out = model.eval()(x)
    assert logged["test/loss"] == pytest.approx(torch.nn.functional.cross_entropy(out, y).item(), rel=1e-12)
    assert logged["test/acc"] == (out.argmax(1) == y).double().mean().item()


def test_a_runs_crops_pad_with_black(tmp_path, mnist_root, monkeypatch):
    """The loop hands the batches the value a black pixel loads as (per-channel normalised: below 0)."""
    import bnopt.train

    handed = {}

    class Recorded(BatchStream):
        def __init__(self, *args, **kwargs):
            handed.update(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(bnopt.train, "BatchStream", Recorded)
    args = ("model=mlp", "data=mnist", f"data.root={mnist_root}", "data.download=false", "data.augment=true",
            "scale=smoke", "train.steps=2", "probes=none")
    train_run(tmp_path, *args)
    black = load_data(compose_config(*args).data, seed=0).black
    assert handed["augment"] is True and torch.equal(handed["pad_value"], black) and (black < 0).all()


def test_models_are_built_with_the_chosen_norm(tmp_path, mnist_root):
    from bnopt.build import build_model
    from bnopt.data import load_data

    cfg = compose_config("+experiment=noisy_bn", "data=fashion_mnist", f"data.root={mnist_root}", "scale=smoke")
    model = build_model(cfg, load_data(cfg.data, 0))
    assert all(isinstance(model.layer(k).norm, NoisyNorm) for k in range(1, 14))
    assert model.layer(1).weight.in_channels == 1  # Fashion-MNIST is 1x28x28
    cfg = compose_config("+experiment=noisy_bn", "norm=batchnorm", "data=fashion_mnist", f"data.root={mnist_root}")
    model = build_model(cfg, load_data(cfg.data, 0))
    assert all(type(model.layer(k).norm) is BatchNorm for k in range(1, 14))


def test_noise_in_evaluation_changes_the_test_rows_and_nothing_the_training_computes(tmp_path, mnist_root):
    """``norm.noise.train_only=false`` evaluates the noisy network with noise: test/* move, train/* do not
    (evaluation draws from streams of its own), the same run twice evaluates alike, and a run's final
    evaluation is the one a longer run makes at that step (its noise keyed to that step)."""
    args = ("model=mlp", "data=mnist", "norm=noisy_batchnorm", "scale=smoke", f"data.root={mnist_root}",
            "data.download=false")
    train_run(tmp_path / "train_only", *args)
    train_run(tmp_path / "a", *args, "norm.noise.train_only=false")
    train_run(tmp_path / "b", *args, "norm.noise.train_only=false")
    train_run(tmp_path / "shorter", *args, "norm.noise.train_only=false", "train.steps=20")
    assert read_rows(tmp_path / "a", ("train/",)) == read_rows(tmp_path / "train_only", ("train/",))
    with_noise, without = read_rows(tmp_path / "a", ("test/loss",)), read_rows(tmp_path / "train_only", ("test/loss",))
    assert len(with_noise) == len(without) == 4 and all(a != b for a, b in zip(with_noise, without))
    assert (tmp_path / "a/metrics.csv").read_bytes() == (tmp_path / "b/metrics.csv").read_bytes()
    assert read_rows(tmp_path / "shorter", ("test/",)) == read_rows(tmp_path / "a", ("test/",))[:6]  # steps 0-20


def test_mnist_format_run_logs_train_and_test_accuracy(tmp_path, mnist_root):
    train_run(tmp_path, "+experiment=mnist_bn", "scale=smoke", "data=fashion_mnist", f"data.root={mnist_root}",
              "data.download=false")
    names = set(pd.read_csv(tmp_path / "metrics.csv").name)
    assert {"train/acc", "train/loss", "test/acc", "test/loss", "act/q15", "act/q85"} <= names


def test_the_loop_is_sgd_on_the_streams_batches_written_out_by_hand(tmp_path, mnist_root):
    """The trained weights and BN statistics equal a hand-written momentum SGD with weight decay and a step
    schedule on the same batches: gradients are not accumulated across steps, evaluation (eval mode, every
    10 steps here) and the activation probe leave training alone, and nothing else steps."""
    overrides = ("+experiment=mnist_bn", "scale=smoke", f"data.root={mnist_root}", "data.download=false",
                 "optim.momentum=0.9", "optim.weight_decay=0.01", "optim.schedule=multistep", "optim.milestones=[5]",
                 "train.steps=12")
    train_run(tmp_path, *overrides)
    trained = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]

    cfg = compose_config(*overrides)
    seed_everything(cfg.seed)
    data = load_data(cfg.data, cfg.seed)
    model = build_model(cfg, data)
    batches = BatchStream(data.train_x, data.train_y, cfg.train.batch_size, cfg.seed)
    momentum, weight_decay = cfg.optim.momentum, cfg.optim.weight_decay
    params = list(model.parameters())
    velocity = [None] * len(params)
    for step in range(cfg.train.steps):
        lr = cfg.optim.lr * (cfg.optim.gamma if step >= cfg.optim.milestones[0] else 1)
        x, y = batches.next()
        grads = torch.autograd.grad(data.loss_fn(model(x), y), params)
        with torch.no_grad():
            for k, (p, g) in enumerate(zip(params, grads)):
                d = g.add(p, alpha=weight_decay)
                velocity[k] = d.clone() if velocity[k] is None else velocity[k].mul_(momentum).add_(d)
                p.add_(velocity[k], alpha=-lr)
    by_hand = model.state_dict()
    assert trained.keys() == by_hand.keys()
    assert all(torch.equal(trained[k], by_hand[k]) for k in trained)


def test_the_recorded_commit_is_dirty_only_for_changes_a_run_depends_on(tmp_path):
    """Regenerating committed results changes files under results/ while runs train: their commit must not
    read "-dirty" for that, only for the package, the configs or the entry point."""
    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    for name in ("src/bnopt/rundir.py", "configs/train.yaml", "train.py", "results/run/summary.json", "README.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("1\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "first")
    source = tmp_path / "src/bnopt"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "results/run/summary.json").unlink()
    (tmp_path / "README.md").write_text("2\n")
    assert git_commit(source) == commit
    for name in ("src/bnopt/rundir.py", "configs/train.yaml", "train.py"):
        (tmp_path / name).write_text("2\n")
        assert git_commit(source) == commit + "-dirty", name
        git("checkout", "-q", "--", name)


def test_summary_json_is_strict_json_even_with_nan_and_inf(tmp_path):
    """A final metric can be NaN or inf (a test loss that overflowed; on a GPU the loss is checked only at
    logging steps). Python's json would write the bare tokens NaN and Infinity, which jq, JavaScript and
    other strict readers refuse; they are written as strings."""
    run = RunDirectory(tmp_path)
    run.write_summary({"status": "completed", "final": {"test/loss": float("inf"), "train/loss": float("nan")}})

    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    on_disk = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert on_disk["final"] == {"test/loss": "inf", "train/loss": "nan"}


def test_each_metrics_row_reaches_the_file_when_it_is_logged(tmp_path):
    """A run killed outright (SIGKILL, out of memory) keeps every row it logged: rows are not held in a
    buffer until the file closes."""
    writer = MetricsWriter(tmp_path / "metrics.csv")
    writer.log(0, "train/loss", 1.5)
    writer.log(0, "ics/l2", 0.25, layer=9)
    assert (tmp_path / "metrics.csv").read_text().splitlines()[-2:] == ["0,train/loss,1.5,,", "0,ics/l2,0.25,9,"]
    writer.close()
