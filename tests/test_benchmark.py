"""scripts/benchmark.py runs, and its FLOP columns count what their titles say: for the K-layer deep linear
network every count has a closed form in matrix products of one layer on the batch (a step is 3K - 1:
K forward, K weight gradients, K - 1 input gradients). Its timings are not tested (they vary by machine)."""

import json
import subprocess
import sys

import pytest
import torch

from bnopt.train import device_name
from conftest import REPO


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "benchmark.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_benchmark_flop_columns_match_the_closed_forms(tmp_path):
    out = tmp_path / "benchmark.json"
    result = run_benchmark("--only", "flops", "--models", "dln_none", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "| dln_none | 8.43 |" in result.stdout  # the markdown table the README quotes
    assert "step (ms)" not in result.stdout  # no timing table without timings
    header = next(line for line in result.stdout.splitlines() if line.startswith("device cpu"))
    assert header.startswith(f"device cpu ({device_name(torch.device('cpu'))}), ")  # the CPU's kind, as runs record it
    assert ", TF32 off, " in header  # timed as a default run computes (train.tf32)
    results = json.loads(out.read_text())
    assert results["tf32"] is False
    flops = results["models"]["dln_none"]["flops"]
    k = 25
    step = 3 * k - 1
    assert flops == {
        # the moved prefix once (K-1), then per layer i the suffix forward (K-i) and back to layer i (K-i)
        "ics_all_layers": pytest.approx((k - 1 + k * (k - 1)) / step),
        "ics_all_layers_computing_G": pytest.approx((k - 1 + k * (k - 1)) / step + 1),
        "ics_general_path": pytest.approx(3 * k * (k - 1) / 2 / step),  # the whole net forward per layer
        "ics_suffix_floor": pytest.approx(k * (k - 1) / step),
        # G, then per layer i (from 0) the whole net forward and back to layer i, with every weight gradient
        "ics_naive": pytest.approx((step + 2 * k * k) / step),
        "landscape_loop": pytest.approx(5.0),  # E = 5 full steps' products
    }


@pytest.mark.parametrize("args, message", [
    (["--models", "dln"], "unknown model(s) dln; choose from mlp_bn, dln_none, dln_bn, vgg11, vgg16"),
    (["--rounds", "0"], "argument --rounds: must be at least 1, got 0"),  # a median over no rounds
])
def test_benchmark_refuses_bad_arguments_before_measuring(args, message):
    result = run_benchmark("--only", "flops", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stdout == ""  # nothing measured


def test_benchmark_memory_columns_count_what_the_probes_hold(tmp_path):
    """Counted, not timed: the DLN's step keeps its 25 layers' outputs on the batch of 1000 x 10 (40 kB each)
    for its backward; exact ICS (shared prefix) holds about what a step does, as naive ICS and the landscape
    loop do, and vmap's landscape holds its E = 5 passes' at once."""
    out = tmp_path / "benchmark.json"
    result = run_benchmark("--only", "memory", "--models", "dln_none", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "| dln_none | 1.0" in result.stdout and "step (ms)" not in result.stdout
    memory = json.loads(out.read_text())["models"]["dln_none"]["memory"]
    assert 25 * 40_000 <= memory["step_mib"] * 2**20 < 1.2 * 25 * 40_000
    assert memory.keys() >= {"ics_all_layers", "ics_naive", "landscape_loop", "landscape_vmap"}
    for key in ("ics_all_layers", "ics_all_layers_computing_G", "ics_suffix_floor", "ics_naive", "landscape_loop"):
        assert 0.9 < memory[key] < 1.15, key
    assert memory["landscape_vmap"] > 5
