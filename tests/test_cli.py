"""`python train.py` as a user runs it: clear one-line errors before any training, exit codes, the
default run directory, and runs that survive being killed."""

import errno
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from bnopt.cli import SLURM_LAUNCHER, override_word, sweep_stopped_by_ctrl_c
from bnopt.config import ONE_CONFIG_GROUPS, ConfigError, check_against_run, check_config, check_one_config_per_group
from bnopt.hydra_callbacks import SweepIndex
from bnopt.synthetic import write_mnist
from conftest import REPO, check_added_keys_as_train_does, compose_config, read_rows, run_cli, train_run
from test_sweeps import read_index

# --- bad input, in-process ---------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, key", [
    (["optim.lr=-0.1"], "optim.lr"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=abc"], "optim.lr"),
    (["train.batch_size=0"], "train.batch_size"),
    (["train.steps=-5"], "train.steps"),
    (["train.log_every=0"], "train.log_every"),
    (["norm=lp1", "norm.p=3"], "norm.p"),
    (["norm=noisy_batchnorm", "norm.noise.n_sigma=0.5"], "norm.noise.n_sigma"),
    (["optim.momentum=1.5"], "optim.momentum"),
    (["optim.nesterov=true"], "optim.momentum"),
    (["device=gpu"], "device"),
    (["model.depth=12"], "model.depth"),
    (["model=dln"], "data.name"),
    (["probes=[activations]", "probes.activations.quantiles=[0.5,2]"], "probes.activations.quantiles"),
    (["probes=[landscape]", "probes.landscape.etas=[]"], "probes.landscape.etas"),
    (["+probes.icz.every=3"], "probes.icz"),
    (["model=mlp", "data=mnist", "train.channels_last=true"], "train.channels_last"),  # GPU options
    (["+experiment=noisy_bn", "train.compile=true"], "train.compile"),
    (["train.tf32=maybe"], "train.tf32"),
    # one bad value for every other check, so that none can be dropped unnoticed
    (["name=a/b"], "name"),
    (["name="], "name"),
    (["seed=-1"], "seed"),
    (["seed=9223372036854775808"], "seed"),  # 2**63: past what the loaders' generators take
    (["device=cuda:x"], "device"),
    (["threads=0"], "threads"),
    (["model.name=resnet"], "model.name"),
    (["model.width=0"], "model.width"),
    (["model.bias=maybe"], "model.bias"),
    (["model=mlp", "data=mnist", "model.hidden=[100,0]"], "model.hidden"),
    (["model=mlp", "data=mnist", "model.init_std=he"], "model.init_std"),
    (["model=mlp", "data=mnist", "model.init_std=-1"], "model.init_std"),
    (["+experiment=dln_bn", "model.depth=0"], "model.depth"),
    (["data.name=imagenet"], "data.name"),
    (["+experiment=dln_bn", "data.n_samples=0"], "data.n_samples"),
    (["+experiment=dln_bn", "data.dim=0"], "data.dim"),
    (["+experiment=dln_bn", "data.loss_scale=0"], "data.loss_scale"),
    (["+experiment=dln_bn", "data.seed=-1"], "data.seed"),
    (["+experiment=dln_bn", "data.seed=9223372036854775808"], "data.seed"),
    (["model=mlp", "data=gaussian_regression"], "model.name"),
    (["data.root="], "data.root"),
    (["data.download=maybe"], "data.download"),
    (["data.augment=maybe"], "data.augment"),
    (["data.normalise=global"], "data.normalise"),
    (["+experiment=dln_bn", "data.x_std=0"], "data.x_std"),
    (["+experiment=dln_bn", "data.a_std=-1"], "data.a_std"),
    (["+experiment=dln_bn", "model.norm_after_last=maybe"], "model.norm_after_last"),
    (["norm=lp2", "norm.norm_of=centered"], "norm.norm_of"),
    (["norm=noisy_batchnorm", "norm.noise.train_only=maybe"], "norm.noise.train_only"),
    (["norm=noisy_batchnorm", "norm.noise.train_only=1"], "norm.noise.train_only"),  # 1 == True in Python
    (["data.augment=0"], "data.augment"),
    (["probes=[landscape]", "probes.landscape.batched=1"], "probes.landscape.batched"),
    (["data.max_train_samples=0"], "data.max_train_samples"),
    (["data.max_test_samples=0"], "data.max_test_samples"),
    (["data.num_classes=0"], "data.num_classes"),
    (["model=mlp", "data=fashion_mnist", "data.search_paths=[1]"], "data.search_paths"),
    (["norm.kind=groupnorm"], "norm.kind"),
    (["norm=batchnorm", "norm.eps=0"], "norm.eps"),
    (["norm=batchnorm", "norm.momentum=1.5"], "norm.momentum"),
    (["norm=batchnorm", "norm.momentum=0"], "norm.momentum"),  # evaluation would use the starting statistics
    (["norm=lp1", "norm.p=2"], "norm.name"),  # an lp2 run that the figures would file under L1
    (["norm=noisy_batchnorm", "norm.noise=null"], "norm.name"),
    (["norm=none", "norm.kind=batchnorm", "+norm.eps=1e-5", "+norm.momentum=0.1"], "norm.name"),
    (["model=mlp", "data=mnist", "norm=batchnorm", "train.batch_size=1"], "train.batch_size"),
    (["+experiment=dln_bn", "norm=lp1", "train.batch_size=1"], "train.batch_size"),
    (["+experiment=dln_bn", "+data.augment=true"], "data.augment"),
    (["probes=[ics]", "+probes.ics.evry=5"], "probes.ics"),
    (["train.steps=1e3"], "train.steps"),
    (["norm=noisy_batchnorm", "norm.noise.n_mu=-1"], "norm.noise.n_mu"),
    (["norm=noisy_batchnorm", "norm.noise.r_mu=-1"], "norm.noise.r_mu"),
    (["norm=noisy_batchnorm", "norm.noise.r_sigma=-1"], "norm.noise.r_sigma"),
    (["optim.name=adam"], "optim.name"),
    (["optim.weight_decay=-1"], "optim.weight_decay"),
    (["optim.nesterov=maybe"], "optim.nesterov"),
    (["optim.schedule=linear"], "optim.schedule"),
    (["optim.schedule=multistep", "optim.milestones=[]"], "optim.milestones"),
    (["optim.schedule=multistep", "optim.milestones=[100]", "optim.gamma=0"], "optim.gamma"),
    (["optim.milestones=[100]"], "optim.milestones"),
    (["optim.schedule=cosine", "optim.milestones=[100]"], "optim.milestones"),
    (["train.eval_every=0"], "train.eval_every"),
    (["train.checkpoint_every=0"], "train.checkpoint_every"),
    (["train.eval_batch_size=0"], "train.eval_batch_size"),
    (["train.channels_last=maybe"], "train.channels_last"),
    (["train.compile=maybe"], "train.compile"),
    (["+probes.ics.every=3"], "probes.ics"),
    (["probes=[ics]", "probes.ics.every=0"], "probes.ics.every"),
    (["probes=[ics]", "probes.ics.layers=[0]"], "probes.ics.layers"),
    (["probes=[landscape]", "probes.landscape.direction=sideways"], "probes.landscape.direction"),
    (["probes=[landscape]", "probes.landscape.batched=sometimes"], "probes.landscape.batched"),
    (["probes=[activations]", "probes.activations.layers=[]"], "probes.activations.layers"),
    (["probes=[activations]", "probes.activations.bins=0"], "probes.activations.bins"),
    (["optim.lr=${nowhere}"], "optim.lr"),
])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(overrides, key):
    with pytest.raises(ConfigError) as err:
        check_config(compose_config(*overrides))
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}=") and "is not allowed:" in str(err.value)


EXPERIMENTS = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_passes_the_checks_at_every_scale(experiment):
    """What a user runs must not stop at the checks: each experiment, as shipped, at each scale preset."""
    for scale in ("paper", "cpu", "smoke"):
        check_config(compose_config(f"+experiment={experiment}", f"scale={scale}"))


@pytest.mark.parametrize("overrides, reason", [
    (["norm=batchnorm", "norm.momentum=0"], "a number in (0, 1]"),
    (["probes=[ics]", "+probes.ics.evry=5"], "unknown key evry; known: every, layers"),
    (["+probes.ics.every=3"], "needs layers: select it with probes=[ics,...]"),
    (["model=mlp", "data=mnist", "norm=batchnorm", "train.batch_size=1"],
     "at least 2 with norm.kind=batchnorm on model=mlp: one sample's batch statistics"),
    (["norm=lp1", "norm.p=2"], "it names kind=lp, p=1, noise off (the figures and the report go by it)"),
])
def test_a_refusal_says_what_is_allowed(overrides, reason):
    with pytest.raises(ConfigError) as err:
        check_config(compose_config(*overrides))
    assert reason in err.value.allowed


def test_a_refused_group_of_settings_shows_its_values_not_their_interpolations():
    with pytest.raises(ConfigError) as err:
        check_config(compose_config("probes=[ics]", "+probes.ics.evry=5"))
    assert str(err.value).startswith("probes.ics={'every': 100, 'layers': [5, 10], 'evry': 5} is not allowed")


@pytest.mark.parametrize("overrides", [
    ["norm=batchnorm", "norm.momentum=1"],  # each evaluation with the last training batch's statistics
    ["norm=lp1", "norm.p=2", "norm.name=lp2_from_lp1"],
    ["norm=batchnorm", "train.batch_size=1"],  # VGG: a sample's spatial positions make its batch statistics
    ["model=mlp", "data=mnist", "norm=noisy_none", "train.batch_size=1"],  # no statistics
])
def test_values_next_to_the_refused_ones_pass(overrides):
    check_config(compose_config(*overrides))


@pytest.mark.parametrize("overrides, hint", [
    (["+optim.lrr=0.1"], "did you mean optim.lr?"),  # what Hydra suggests when optim.lrr=0.1 is refused
    (["+lr=0.1"], "did you mean model.paper.lr or optim.lr?"),
    (["+experiment=dln_bn", "+model.dept=3"], "did you mean model.depth?"),
    (["norm=none", "+norm.eps=1e-3"], "the settings of norm: norm.name, norm.kind, norm.noise"),  # none has none
    (["norm=batchnorm", "+norm.noise.n_mu=1"], "the settings of norm: norm.name, norm.kind, norm.eps"),
    (["+zzz=1"], "the top-level settings: model, data, norm"),
    (["++optim.lrr=0.1"], "did you mean optim.lr?"),  # `++` sets a key the config has and adds one it lacks
    (["+experiment=dln_bn", "++model.dept=3"], "did you mean model.depth?"),
    (["norm=none", "++norm.eps=1e-3"], "the settings of norm: norm.name, norm.kind, norm.noise"),  # BN's has it
    (["++optim.lr=0.1", "++zzz=1"], "the top-level settings: model, data, norm"),
])
def test_a_setting_added_with_plus_that_nothing_reads_is_refused(overrides, hint):
    """Hydra adds with `+` only keys the config lacks, and with `++` also those: nothing reads them, so the
    run would train with the value ignored, its config.yaml saying otherwise."""
    with pytest.raises(ConfigError) as err:
        check_added_keys_as_train_does(*overrides)
    added = overrides[-1].split("=")[0]
    key = added.lstrip("+")
    assert err.value.key == key
    plus = added[:-len(key)]
    assert f"no such setting (a '{plus}' adds a key that nothing reads, so it would be ignored); {hint}" in str(err.value)


def test_a_plus_that_adds_a_group_a_hydra_setting_or_a_probe_setting_passes():
    overrides = ["+experiment=dln_bn", "+hydra.callbacks.unfinished_jobs.record=x", "+probes.ics.evry=3",
                 "optim.lr=0.1", "++optim.momentum=0.5", "~optim.milestones", "++model.paper.ics_layers.0=3",
                 "++probes.ics.evry=3", "++hydra.job.chdir=false", "norm=batchnorm", "++norm.eps=1e-3"]
    check_added_keys_as_train_does(*overrides)  # probes: check_config's to refuse
    check_added_keys_as_train_does("+experiment@_global_=dln_bn")  # where the experiment puts itself: refused before


@pytest.mark.parametrize("overrides, unread", [
    (["+norm@model.norm=batchnorm"], "(model.norm.name, model.norm.kind, model.norm.eps, model.norm.momentum, "
                                     "model.norm.noise); norm=batchnorm chooses the run's norm"),
    (["+optim@model=sgd"], "(model.lr, model.momentum, model.weight_decay,"),  # into a section there is: its new keys
])
def test_a_groups_config_put_where_nothing_reads_it_is_refused(overrides, unread):
    """Hydra refuses norm@model.norm=batchnorm and suggests +norm@model.norm=batchnorm: the run would train
    with its own norm (none), its config.yaml showing BatchNorm's settings under model.norm."""
    with pytest.raises(ConfigError) as err:
        check_added_keys_as_train_does(*overrides)
    group, package = overrides[-1][1:].split("=")[0].split("@")
    assert str(err.value).startswith(f"{group}@{package}=")
    message = str(err.value)
    assert f"it puts {group} config " in message and f" at {package}, where nothing reads its settings {unread}" in message


@pytest.mark.parametrize("overrides, sweep", [
    (["norm=[batchnorm,none]"], "-m norm=batchnorm,none"),
    (["+experiment=[dln_bn,fig9]"], "-m +experiment=dln_bn,fig9"),
    (["model=[vgg,mlp]", "data=mnist"], "-m model=vgg,mlp"),
])
def test_a_list_of_configs_for_a_group_that_takes_one_is_refused(overrides, sweep):
    """Hydra merges a list of configs into one run of neither (norm none with BatchNorm's eps; an MLP with
    VGG's depth, which nothing reads), where a sweep over them was meant; probes=[...] is the list it means."""
    with pytest.raises(ConfigError) as err:
        check_one_config_per_group(overrides)
    assert err.value.key == overrides[0].lstrip("+").split("=")[0]
    assert str(err.value).endswith(f"one config per run (a list merges them into one run of neither); for a run "
                                   f"of each, a sweep: {sweep}")
    check_one_config_per_group(["probes=[ics,landscape]", "norm=[none]", "norm=batchnorm,none", "model.hidden=[3,4]"])


def test_the_groups_that_take_one_config_are_the_config_directories_but_probes():
    groups = {p.name for p in (REPO / "configs").iterdir() if p.is_dir()} - {"probes", "hydra"}
    assert set(ONE_CONFIG_GROUPS) == groups


def test_a_list_of_configs_is_refused_before_anything_runs(tmp_path):
    assert_one_line_error(run_cli("+experiment=[dln_bn,fig9]", "scale=smoke", f"hydra.run.dir={tmp_path}"),
                          "experiment='[dln_bn,fig9]' is not allowed")


def test_the_deep_linear_network_trains_on_its_whole_data_set_whatever_its_size():
    """Protocol section 2: full-batch gradient descent. A fixed batch of 1000 made a run with more samples
    mini-batch SGD without a word."""
    assert compose_config("+experiment=dln_bn", "data.n_samples=2000").train.batch_size == 2000
    assert compose_config("+experiment=dln_bn").train.batch_size == 1000


def test_a_probe_layer_that_does_not_exist_and_a_batch_larger_than_the_data_set():
    cfg = compose_config("+experiment=dln_bn", "model.paper.ics_layers=[9,26]")
    with pytest.raises(ConfigError, match=r"probes.ics.layers=\[9, 26\] is not allowed: layer numbers between 1 and 25"):
        check_against_run(cfg, num_layers=25, train_size=1000)
    with pytest.raises(ConfigError, match="train.batch_size=2000 .* at most the training set size"):
        check_against_run(compose_config("+experiment=dln_bn", "train.batch_size=2000"), num_layers=25, train_size=1000)


def test_an_unwritable_output_directory_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    from bnopt.rundir import OutputDirError

    with pytest.raises(OutputDirError, match="not writable"):
        train_run(tmp_path / "file" / "run", "+experiment=dln_bn", "scale=smoke")


def test_checking_a_directory_leaves_another_process_s_check_alone(tmp_path):
    """Processes that check one directory at once (two recipes sharing a sweep directory) each write and delete
    a probe file there; with one shared name each deleted the other's, which then found the directory
    "not writable (No such file or directory)"."""
    from bnopt.rundir import RunDirectory

    others = tmp_path / ".write-test"  # another process's probe, between its write and its delete
    others.write_text("")
    RunDirectory(tmp_path).ensure_writable()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".write-test"]  # its own probe gone, the other's kept


# --- the command line ----------------------------------------------------------------------------------


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_errors_are_one_line_and_exit_non_zero(tmp_path):
    damaged = write_mnist(tmp_path / "damaged", n_train=30, n_test=20) / "train-images-idx3-ubyte.gz"
    damaged.write_bytes(damaged.read_bytes()[:100])  # a download cut short
    (tmp_path / "file").write_text("")
    refused = [  # (command line, what its one error line says)
        (("data=mnist", f"data.root={tmp_path}/none", "data.download=false", "scale=smoke",
          f"hydra.run.dir={tmp_path / 'b'}"), ("MNIST not found", f"{tmp_path}/none")),
        (("data=mnist", f"data.root={damaged.parent}", "data.download=false", "scale=smoke",
          f"hydra.run.dir={tmp_path / 'd'}"), (f"MNIST: cannot read {damaged}", "Fix: delete the files")),
        (("+experiment=dln_bn", f"hydra.run.dir={tmp_path / 'file' / 'run'}"), ("not writable", "hydra.run.dir")),
        (("-m", "+experiment=dln_bn", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'file' / 'sweep'}"),
         ("not writable", "hydra.sweep.dir")),
        # `++`: checked against the config composed without it, inside the app (the `+` case: tests above)
        (("+experiment=dln_bn", "++optim.lrr=0.1", f"hydra.run.dir={tmp_path / 'e'}"),
         ("optim.lrr=0.1 is not allowed: no such setting (a '++'", "did you mean optim.lr?")),
        # read before the config's checks, to limit the job's threads: one line too, not torch's traceback
        (("+experiment=dln_bn", "threads=-1", f"hydra.run.dir={tmp_path / 'f'}"), ("threads=-1 is not allowed",)),
        (("+experiment=dln_bn", "optim.lr=${nowhere}", f"hydra.run.dir={tmp_path / 'g'}"),
         ("optim.lr='<unresolvable>' is not allowed", "Interpolation key 'nowhere' not found")),
        # a value the run directory is made of: Hydra's traceback came first
        (("+experiment=dln_bn", "name=${nowhere}"), ("hydra.run.dir cannot be resolved (InterpolationKeyError",)),
    ]

    def refused_twice():  # one directory, one command after the other
        first = run_cli("+experiment=dln_bn", "optim.lr=-1", f"hydra.run.dir={tmp_path / 'a'}")
        return first, json.loads((tmp_path / "a/summary.json").read_text()), \
            run_cli("+experiment=dln_bn", "seed=-1", f"hydra.run.dir={tmp_path / 'a'}")

    # Side by side: each command is mostly Python's and torch's start-up, and one at a time they took 40 s.
    with ThreadPoolExecutor(max_workers=4) as pool:
        twice = pool.submit(refused_twice)
        unknown = pool.submit(run_cli, "norm=batchnrom", f"hydra.run.dir={tmp_path / 'c'}")
        results = [pool.submit(run_cli, *args) for args, _ in refused]
    for (_, fragments), result in zip(refused, results):
        assert_one_line_error(result.result(), *fragments)
    first, failed, second = twice.result()
    assert_one_line_error(first, "optim.lr=-1", "positive learning rate")
    assert failed["status"] == "failed" and failed["job"] == {"num": None, "overrides": ["+experiment=dln_bn", "optim.lr=-1"]}
    assert_one_line_error(second, "seed=-1")
    failed_again = json.loads((tmp_path / "a/summary.json").read_text())  # says why the latest command failed
    assert failed_again["status"] == "failed" and failed_again["error"].startswith("ConfigError: seed=-1")
    unknown = unknown.result()
    assert unknown.returncode != 0 and "Could not find 'norm/batchnrom'" in unknown.stderr
    assert "noisy_batchnorm" in unknown.stderr  # Hydra lists the options


def test_cli_run_lands_in_the_readable_default_directory_and_divergence_exits_zero(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "+experiment=dln_bn", "scale=smoke",
                             "norm=none", "optim.lr=1.0"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (summary,) = tmp_path.glob("results/runs/dln_bn/*-*-*/*-*-*/summary.json")
    assert json.loads(summary.read_text())["status"] == "diverged"
    assert (summary.parent / "metrics.csv").exists() and (summary.parent / "config.yaml").exists()


# --- runs that survive ---------------------------------------------------------------------------------

# threads: the uninterrupted run trains in this process, the others in subprocesses that would take every core
SURVIVOR = ("+experiment=dln_bn", "train.steps=600", "train.checkpoint_every=100", "probes=[ics,landscape]",
            "model.paper.ics_layers=[2,9,17]", "train.log_every=10", "threads=2")


def start(run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *SURVIVOR, f"hydra.run.dir={run_dir}"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = run_dir / "metrics.csv"
        if metrics.exists() and any(line.startswith(f"{step},") for line in metrics.read_text().splitlines()):
            return
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    raise TimeoutError(f"step {step} never logged")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train_run(run_dir, *SURVIVOR)
    return run_dir


# slow (40 s with its reference run, the default suite's largest item): resuming an interrupted run at any step
# is tested in-process (test_sweeps), a killed run's status and index entry there too
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_run_resumes_to_exactly_the_uninterrupted_result(tmp_path, uninterrupted, sig):
    process = start(tmp_path)
    wait_for_step(tmp_path, 250, process)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    summary = json.loads((tmp_path / "summary.json").read_text())
    if sig == signal.SIGTERM:
        assert process.returncode == 0 and summary["status"] == "interrupted"
        assert f"{tmp_path}: interrupted at step {summary['steps']}; to continue it, run the same command with " \
               f"hydra.run.dir={tmp_path}" in stderr
        assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["status"] == "interrupted"
    else:
        assert summary["status"] == "running"  # killed without a word: the summary says so
    kept = read_rows(tmp_path, ("train/",))
    assert kept and kept == read_rows(uninterrupted, ("train/",))[: len(kept)]  # flushed as it went
    stopped = (tmp_path / "summary.json").read_bytes()
    stopped_at = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"]
    assert_one_line_error(run_cli(*SURVIVOR, "optim.lr=2e-6", f"hydra.run.dir={tmp_path}"), "another config")
    assert_one_line_error(run_cli(*SURVIVOR, "optim.lr=-1", f"hydra.run.dir={tmp_path}"), "positive learning rate")
    assert (tmp_path / "summary.json").read_bytes() == stopped  # still says how the run stopped, not "failed"

    resumed = run_cli(*SURVIVOR, f"hydra.run.dir={tmp_path}")
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "metrics.csv").read_bytes() == (uninterrupted / "metrics.csv").read_bytes()
    final = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    reference = torch.load(uninterrupted / "checkpoint.pt", weights_only=True)
    assert final["step"] == reference["step"] == 600
    assert all(torch.equal(final["model"][k], reference["model"][k]) for k in reference["model"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["job"] == {"num": None, "overrides": list(SURVIVOR)}
    log = (tmp_path / "train.log").read_text()  # Hydra's log of the run: how each command started and ended
    assert f"{tmp_path}: resuming from step {stopped_at} of 600 on cpu" in log
    assert f"{tmp_path}: completed at step 600; train/loss " in log


def read_back_override(word: str) -> str:
    """The value Hydra, then OmegaConf, make of ``word`` pasted into a shell."""
    [override] = shlex.split(word)
    return hydra_reads(override)


def hydra_reads(override: str) -> str:
    """The value Hydra, then OmegaConf, make of ``override``, one command-line argument."""
    return OmegaConf.create({"value": OverridesParser.create().parse_override(override).value()}).value


# Paths Hydra's override grammar or OmegaConf read otherwise if given unquoted, and a plain one
ODD_PATHS = ["/runs/plain/r-1_2.3", "/home/My Drive/runs", "/runs/a,b", "/runs/it's", "/runs/a\\'b", '/runs/a\\"b',
             '/runs/q"q', "/runs/end\\", "/runs/end\\\\", "/runs/x=y", "/runs/a~b#c", "/runs/[a]{b}(c)",
             "/runs/$HOME/${x}", "/runs/\\${x}", "/runs/a\\b", "/runs/tab\there", "/runs/ü", "/runs/ü ñ", "1e5", "true",
             "null", "sweep"]


@pytest.mark.parametrize("path", ODD_PATHS)
def test_a_directory_to_continue_in_is_printed_as_one_shell_word_that_hydra_reads_back(path):
    """The line an interrupted run or sweep prints names the directory to continue in; a space or a comma in
    it (a home directory named "My Drive") made that override two shell words, or a sweep over two values."""
    word = override_word("hydra.run.dir", Path(path))
    assert word.startswith(("hydra.run.dir=", "'hydra.run.dir="))
    assert read_back_override(word) == path
    if path == "/runs/plain/r-1_2.3":
        assert word == f"hydra.run.dir={path}"  # as typed, where nothing needs quoting
    assert read_back_override(override_word("hydra.run.dir", Path("runs") / path.lstrip("/"))) == \
        f"runs/{path.lstrip('/')}"  # relative


def test_a_signal_stops_a_sweep_run_job_by_job_with_its_index_written(tmp_path):
    """A first Ctrl-C checkpoints the job it lands in; the sweep's next jobs must not start after it (they
    did: one Ctrl-C per job was needed to stop a sweep). The index says where it stopped, and the line that
    says how to continue gives its directory, which has a space in its name, as one shell word."""
    sweep_dir = tmp_path / "a sweep"
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), "-m", "+experiment=dln_bn", "scale=smoke",
                                "probes=none", "train.steps=1000000", "seed=0,1", f"hydra.sweep.dir={sweep_dir}"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(sweep_dir / "0", 50, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    stop = "interrupted, so the sweep stops here; to continue it, run the same command with "
    assert f"{stop}'hydra.sweep.dir=\"{sweep_dir}\"'\n" in stderr
    assert read_back_override(stderr.split(stop)[1].splitlines()[0]) == str(sweep_dir)
    assert json.loads((sweep_dir / "0" / "summary.json").read_text())["status"] == "interrupted"
    assert not (sweep_dir / "1").exists()
    assert [(r["job"], r["dir"], r["status"]) for r in read_index(sweep_dir)] == [
        ("0", "0", "interrupted"), ("1", "", "not started")]


def test_a_ctrl_c_stops_a_parallel_sweep_with_its_index_written(tmp_path):
    """A terminal's Ctrl-C goes to the whole process group: the joblib pool's jobs stop with a checkpoint, and
    Hydra's process, waiting on them, ended in a traceback of KeyboardInterrupt, without the index or a word
    on how to continue."""
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
         "+experiment=dln_bn", "scale=smoke", "probes=none", "train.steps=1000000", "seed=0,1,2",
         f"hydra.sweep.dir={tmp_path}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # as a terminal's foreground command has it (a shell's background job ignores SIGINT)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_step(tmp_path / "0", 50, process)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert f"the sweep stopped (Ctrl-C); to continue it, run the same command with hydra.sweep.dir={tmp_path}" \
        in stderr
    assert not (tmp_path / "2").exists()  # the third job waited for a free worker
    rows = read_index(tmp_path)
    assert {r["job"] for r in rows if r["dir"]} <= {"0", "1"} and rows[0]["job"] == "0"
    assert [(r["dir"], r["status"]) for r in rows if r["job"] == "2"] == [("", "not started")]


def test_ctrl_c_outside_a_sweep_is_left_to_python_and_a_slurm_sweep_s_jobs_go_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(SweepIndex, "launched", None)
    sweep_stopped_by_ctrl_c()  # returns: train.py re-raises the KeyboardInterrupt
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "summary.json").write_text(json.dumps({"status": "running", "steps": 0}))
    monkeypatch.setattr(SweepIndex, "launched", (tmp_path, SLURM_LAUNCHER))
    with pytest.raises(SystemExit) as stop:
        sweep_stopped_by_ctrl_c()
    assert stop.value.code == 130
    assert "its jobs submitted to SLURM go on (squeue and scancel" in capsys.readouterr().err
    assert [r["status"] for r in read_index(tmp_path)] == ["running"]
    SweepIndex().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "ended")}}}))
    assert SweepIndex.launched is None  # a Ctrl-C after the sweep ended is no longer the sweep's


def test_a_finished_run_is_not_rerun_and_another_config_is_refused(tmp_path, uninterrupted):
    again = run_cli(*SURVIVOR, f"hydra.run.dir={uninterrupted}")
    assert again.returncode == 0 and "already completed" in again.stdout
    assert_one_line_error(run_cli(*SURVIVOR, "optim.lr=2e-6", f"hydra.run.dir={uninterrupted}"),
                          "another config", "optim.lr: 1e-06 -> 2e-06", "another output directory (hydra.run.dir=...)")
    assert json.loads((uninterrupted / "summary.json").read_text())["status"] == "completed"  # not "failed"
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert_one_line_error(run_cli(*SURVIVOR, f"hydra.run.dir={tmp_path}"), "cannot be read", "corrupt",
                          "another output directory (hydra.run.dir=...)")
    failed = json.loads((tmp_path / "summary.json").read_text())  # nothing else says why this run did not start
    assert failed["status"] == "failed" and "cannot be read" in failed["error"]
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"not a checkpoint"  # nothing overwritten


def test_a_command_refused_once_the_model_is_built_leaves_a_killed_runs_files_as_they_were(tmp_path):
    """A run killed before its first checkpoint starts afresh for the next command, but one refused on the
    built model (a probe layer it lacks) must not relabel what the killed run left: its config.yaml still
    describes its metrics.csv (the figures read both)."""
    smoke = ("+experiment=dln_bn", "scale=smoke")
    train_run(tmp_path, *smoke)
    (tmp_path / "checkpoint.pt").unlink()  # as if killed before the first checkpoint
    summary = json.loads((tmp_path / "summary.json").read_text())
    (tmp_path / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    left = {name: (tmp_path / name).read_bytes() for name in ("config.yaml", "metrics.csv")}
    with pytest.raises(ConfigError, match="probes.ics.layers"):
        train_run(tmp_path, *smoke, "model.paper.ics_layers=[99]")
    assert {name: (tmp_path / name).read_bytes() for name in left} == left
    assert train_run(tmp_path, *smoke, "optim.lr=2e-6")["status"] == "completed"  # an accepted one starts afresh
    assert "lr: 2.0e-06" in (tmp_path / "config.yaml").read_text()


def test_a_failure_replaces_a_summary_that_is_not_a_json_object(tmp_path):
    """Valid JSON of the wrong kind (a list) is as unreadable as a summary cut short: recording the failure
    writes a fresh one instead of crashing on it."""
    from bnopt.cli import record_failure

    (tmp_path / "summary.json").write_text('["not", "a summary"]')
    record_failure(tmp_path, ConfigError("optim.lr", -1, "a positive learning rate"), {"num": 2, "overrides": []})
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["job"] == {"num": 2, "overrides": []}


def test_a_command_refused_for_its_value_or_data_leaves_the_summary_of_a_run_that_started_here(tmp_path):
    """A killed run's summary says ``running`` at the step it reached (the index: ``killed``, and how to
    resume it); a command with a bad value, or without the data, in its directory never touched that run, so
    the summary stays. An unreadable checkpoint is the run's own failure, and is recorded."""
    from bnopt.cli import record_failure
    from bnopt.data import DatasetNotFoundError
    from bnopt.train import ResumeError

    killed = {"status": "running", "steps": 250, "final": {}, "started": "2026-12-02T08:00:00", "error": None,
              "job": {"num": None, "overrides": ["+experiment=dln_bn"]}}
    (tmp_path / "summary.json").write_text(json.dumps(killed))
    stopped = (tmp_path / "summary.json").read_bytes()
    job = {"num": None, "overrides": ["+experiment=dln_bn", "optim.lr=-1"]}
    record_failure(tmp_path, ConfigError("optim.lr", -1, "a positive learning rate"), job)
    record_failure(tmp_path, DatasetNotFoundError("MNIST not found in data/"), job)
    assert (tmp_path / "summary.json").read_bytes() == stopped
    record_failure(tmp_path, ResumeError("checkpoint.pt cannot be read"), job)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {**killed, "status": "failed", "error": "ResumeError: checkpoint.pt cannot be read"}


def test_a_run_that_another_process_is_training_is_refused_and_left_alone(tmp_path):
    """Two processes in one run directory would interleave metrics rows and overwrite checkpoints; the second
    is refused and touches nothing (the command line's one-line errors: the slow test below). The SIGKILL
    test above shows that a killed trainer leaves no lock behind."""
    from bnopt.rundir import RunBusyError, RunDirectory

    run_dir = tmp_path / "job"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text('{"status": "running"}\n')  # as the trainer wrote it
    with RunDirectory(run_dir).claimed():  # this process is the trainer
        with pytest.raises(RunBusyError, match=f"{run_dir} is being trained by pid {os.getpid()}"):
            train_run(run_dir, "+experiment=dln_bn", "scale=smoke")
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "summary.json"]
        assert (run_dir / "summary.json").read_text() == '{"status": "running"}\n'
    assert train_run(run_dir, "+experiment=dln_bn", "scale=smoke")["status"] == "completed"  # released with the block


# slow (15 s, three commands): the oldest-versions stage of CI took 10:05 against its 10 minutes
@pytest.mark.slow
def test_commands_into_a_run_that_another_process_is_training_are_refused_in_one_line(tmp_path):
    """As a single run, with a bad value, and as a sweep job (the sweep goes on)."""
    from bnopt.rundir import RunDirectory

    smoke = ("+experiment=dln_bn", "scale=smoke")
    run_dir = tmp_path / "sweep" / "job"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text('{"status": "running"}\n')
    with RunDirectory(run_dir).claimed():
        assert_one_line_error(run_cli(*smoke, f"hydra.run.dir={run_dir}"),
                              f"{run_dir} is being trained by pid {os.getpid()}", "(hydra.run.dir=...)")
        assert_one_line_error(run_cli(*smoke, "optim.lr=-1", f"hydra.run.dir={run_dir}"), "optim.lr=-1")
        sweep = run_cli("-m", *smoke, "seed=0", f"hydra.sweep.dir={run_dir.parent}", "hydra.sweep.subdir=job")
        assert sweep.returncode == 0 and "is being trained by" in sweep.stderr, sweep.stderr
        assert "another output directory (hydra.sweep.dir=...)" in sweep.stderr
        written = sorted(p.name for p in run_dir.iterdir() if p.name not in (".hydra", "train.log"))  # Hydra's
        assert written == [".lock", "summary.json"]
        assert (run_dir / "summary.json").read_text() == '{"status": "running"}\n'


def test_a_file_system_without_locks_trains_unguarded_with_a_warning(tmp_path, monkeypatch, capsys):
    import errno

    from bnopt import runlock

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    (tmp_path / ".lock").write_text("pid 1 on another-run-s-node\n")  # a run killed earlier
    assert train_run(tmp_path, "+experiment=dln_bn", "scale=smoke")["status"] == "completed"
    assert f"cannot lock {tmp_path / '.lock'} (No locks available)" in capsys.readouterr().err
    # This process's line, not the dead one's: the run would read as killed while this process trained it.
    assert (tmp_path / ".lock").read_text() == runlock.holder_line() + "\n"


@pytest.mark.parametrize("in_sweep", [False, True], ids=["single run", "sweep job"])
def test_a_job_that_crashes_fails_alone_in_a_sweep_and_with_its_traceback_in_a_single_run(
        tmp_path, monkeypatch, caplog, in_sweep):
    """An unexpected exception (a bug, not a user error) ends a single run with its traceback; in a sweep it is
    logged with the job's directory and the other jobs go on."""
    from bnopt import cli

    as_hydra_runs(monkeypatch, tmp_path, ["+experiment=dln_bn"], in_sweep)

    def crash(cfg, run_dir, job):
        raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(cli, "train", crash)
    cfg = compose_config("+experiment=dln_bn", "device=cpu")
    if in_sweep:
        assert cli.main(cfg) == {"status": "failed", "error": "RuntimeError: a bug in the loop"}  # for UnfinishedJobs
        assert f"job {tmp_path} failed; the sweep goes on" in caplog.text and "a bug in the loop" in caplog.text
    else:
        with pytest.raises(RuntimeError, match="a bug in the loop"):
            cli.main(cfg)


def as_hydra_runs(monkeypatch, run_dir: Path, overrides: list[str], in_sweep: bool = False) -> None:
    """``cli.main`` then runs as Hydra runs it for ``python train.py <overrides>`` (``-m``: a sweep's job 3)
    into ``run_dir``: in this process, where the test can patch what it calls."""
    from types import SimpleNamespace

    from hydra.types import RunMode

    from bnopt import cli

    choices = dict(override.lstrip("+").split("=", 1) for override in overrides)
    choices = {group: choice for group, choice in choices.items() if (REPO / "configs" / group).is_dir()}
    hydra_cfg = SimpleNamespace(runtime=SimpleNamespace(output_dir=str(run_dir), choices=choices),
                                launcher=None, mode=RunMode.MULTIRUN if in_sweep else RunMode.RUN,
                                job=SimpleNamespace(num=3), overrides=SimpleNamespace(task=OmegaConf.create(overrides)))
    monkeypatch.setattr(cli.HydraConfig, "get", staticmethod(lambda: hydra_cfg))


class FullDisk(io.FileIO):
    """A file on a disk with room for ``room`` more bytes: a write past it writes what fits and raises ENOSPC,
    as the kernel does, and so does every flush after (closing included: buffered rows stay unwritten)."""

    def __init__(self, path, mode: str, room: int):
        super().__init__(path, mode)
        self.room = room

    def write(self, data) -> int:
        fits = min(len(data), self.room)
        if fits == 0 and len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= fits
        return super().write(bytes(data[:fits]))


# A DLN run of 30 steps with checkpoints at steps 10 and 20, and without its probes' rows (they are not
# logged where the disk refuses them, and need not be for the test)
DISK_RUN = ["+experiment=dln_bn", "scale=smoke", "probes=none", "train.checkpoint_every=10", "train.log_every=1",
            "device=cpu"]


@pytest.fixture(scope="module")
def uninterrupted_disk_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted_disk_run")
    train_run(run_dir, *DISK_RUN)
    return run_dir


@pytest.mark.parametrize("refused", ["checkpoint", "metrics"])
def test_a_full_disk_fails_the_run_in_one_line_and_the_same_command_continues_it(
        tmp_path, monkeypatch, capsys, uninterrupted_disk_run, refused):
    """The disk fills at the run's second checkpoint (a file as large as the model), or while it logs a row of
    step 15: the run stops with one line (exit status 2), its summary saying ``failed`` and why; the checkpoint
    cut short is removed, and its file closed, so that its space is free again; once there is room, the same
    command continues from the last checkpoint to the uninterrupted run's results."""
    from bnopt import cli, rundir

    if refused == "checkpoint":
        name, rooms = "checkpoint.pt.tmp", iter([None, 2000])  # bytes left at each opening; None: all it needs
    else:
        kept = [line for line in (uninterrupted_disk_run / "metrics.csv").read_text(encoding="utf-8").splitlines()[1:]
                if int(line.split(",")[0]) < 15]
        name, rooms = "metrics.csv", iter([sum(len(line) + 1 for line in kept) + 5])  # and 5 bytes of step 15
    opened = []

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        room = next(rooms, None) if Path(path).name == name else None
        if room is None:
            return open(path, mode, *args, **kwargs)
        file = io.BufferedWriter(FullDisk(path, {"a": "ab", "wb": "wb"}[mode], room))
        opened.append(file if mode == "wb" else io.TextIOWrapper(file, encoding="utf-8", line_buffering=True))
        return opened[-1]

    monkeypatch.setattr(rundir, "open", open_on_a_full_disk, raising=False)
    as_hydra_runs(monkeypatch, tmp_path, DISK_RUN)
    with pytest.raises(SystemExit) as stopped:
        cli.main(compose_config(*DISK_RUN))
    assert stopped.value.code == 2
    assert capsys.readouterr().err == f"error: No space left on device while training {tmp_path}; free space and " \
                                      "run the same command again\n"
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert summary["status"] == "failed" and summary["error"] == "OSError: [Errno 28] No space left on device"
    assert summary["steps"] == (20 if refused == "checkpoint" else 15)
    assert len(opened) == 1 and opened[0].closed
    assert sorted(path.name for path in tmp_path.iterdir()) == [".lock", "checkpoint.pt", "config.yaml",
                                                                "metrics.csv", "summary.json"]
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 10

    monkeypatch.undo()
    as_hydra_runs(monkeypatch, tmp_path, DISK_RUN)
    assert cli.main(compose_config(*DISK_RUN))["status"] == "completed"
    assert (tmp_path / "metrics.csv").read_bytes() == (uninterrupted_disk_run / "metrics.csv").read_bytes()
