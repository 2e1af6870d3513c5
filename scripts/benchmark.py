"""Speed of the training loop and cost of each probe, as the README reports them.

    python scripts/benchmark.py                 # CPU, all sections (about 13 minutes on 2 cores)
    python scripts/benchmark.py --device cuda   # on a GPU (VGG-16 at full width)
    python scripts/benchmark.py --only probes --models dln_bn vgg11
    python scripts/benchmark.py --only flops    # FLOP counts alone (half a minute)
    python scripts/benchmark.py --only memory   # peak memory alone (about 3 minutes on 2 cores)
    python scripts/benchmark.py --device cuda --tf32 --only loop --models vgg16   # a run with train.tf32=true

Costs are multiples of one bare training step (forward + backward + SGD step) of the same model and batch.
Each ratio is the median over rounds that time a step, the measured thing and another step back to back,
because absolute times drift on shared machines (here by up to 2x) while ratios taken together do not.
Everything is timed under the numerics a run sets: TF32 off unless ``--tf32`` (``train.tf32``). torch's own
default runs a GPU's convolutions in TF32, about twice as fast for VGG-16 on an H200, so a bare loop left at
that default is not the same computation as a run's.
The same probe calls are also counted in conv and matmul FLOPs, at the paper's width: the ratio that times
approach wherever those products dominate the time (large models on a GPU); and their peak memory, the bytes
of the tensors each call makes and holds at once (``bnopt.memory``), against a step's, at the paper's width
and the settings' batch: counted, so the same on any machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bnopt import models  # noqa: E402
from bnopt.data import sum_squared_loss  # noqa: E402
from bnopt.memory import peak_tensor_bytes  # noqa: E402
from bnopt.norms import norm_factory  # noqa: E402
from bnopt.probes import ActivationRecorder, measure_ics, probe_landscape  # noqa: E402
from bnopt.probes.observation import observation  # noqa: E402
from bnopt.train import device_name, process_settings  # noqa: E402


@dataclass
class Setting:
    name: str
    build: Callable[[float | None], nn.Module]  # VGG's width multiplier, None for the setting's own
    batch: Callable[[torch.device], tuple[torch.Tensor, torch.Tensor]]
    loss_fn: Callable
    lr: float
    etas: list[float]
    activation_layers: list[int]
    overrides: list[str]  # the same model for `train.py`


def image_batch(n, c, size):
    return lambda device: (torch.randn(n, c, size, size, device=device), torch.randint(0, 10, (n,), device=device))


def settings(device: torch.device) -> dict[str, Setting]:
    vgg_width = 1.0 if device.type == "cuda" else 0.125
    dln_loss = sum_squared_loss(0.5)
    vgg_etas = [0.05, 0.1, 0.2, 0.4]
    return {
        "mlp_bn": Setting("MLP 784-100x3-10, BN, batch 60", lambda width: models.mlp(norm_factory("batchnorm")),
                          lambda d: (torch.randn(60, 1, 28, 28, device=d), torch.randint(0, 10, (60,), device=d)),
                          nn.functional.cross_entropy, 0.5, [0.25, 0.5, 1.0, 2.0], [3],
                          ["model=mlp", "data=fashion_mnist", "norm=batchnorm"]),
        "dln_none": Setting("DLN 25x(10x10), no norm, full batch 1000", lambda width: models.dln(norm_factory("none")),
                            lambda d: (torch.randn(1000, 10, device=d), torch.randn(1000, 10, device=d)),
                            dln_loss, 1e-6, [1e-8, 1e-7, 1e-6, 1e-5, 3e-5], [1, 11, 24],
                            ["+experiment=dln_bn", "norm=none", "probes=none"]),
        "dln_bn": Setting("DLN 25x(10x10), BN, full batch 1000", lambda width: models.dln(norm_factory("batchnorm")),
                          lambda d: (torch.randn(1000, 10, device=d), torch.randn(1000, 10, device=d)),
                          dln_loss, 1e-6, [1e-8, 1e-7, 1e-6, 1e-5, 3e-5], [1, 11, 24],
                          ["+experiment=dln_bn", "probes=none"]),
        "vgg11": Setting(f"VGG-11 width {vgg_width:g}, BN, batch 128, 32x32",
                         lambda width: models.vgg(norm_factory("batchnorm"), depth=11, width=width or vgg_width),
                         image_batch(128, 3, 32), nn.functional.cross_entropy, 0.1, vgg_etas, [2, 3, 8],
                         ["+experiment=vgg_bn", "model.depth=11", f"model.width={vgg_width}"]),
        "vgg16": Setting(f"VGG-16 width {vgg_width:g}, BN, batch 128, 32x32",
                         lambda width: models.vgg(norm_factory("batchnorm"), depth=16, width=width or vgg_width),
                         image_batch(128, 3, 32), nn.functional.cross_entropy, 0.1, vgg_etas, [2, 3, 9, 11, 13],
                         ["+experiment=vgg_bn", f"model.width={vgg_width}"]),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def ratio(measured: Callable, step: Callable, device: torch.device, rounds: int) -> float:
    """Median over rounds of (time of ``measured``) / (mean time of the steps just before and after it):
    each call is compared with steps taken in the same state of caches and allocator."""
    measured(), step()  # warm up
    ratios = []
    for _ in range(rounds):
        before = timed(step, device)
        cost = timed(measured, device)
        after = timed(step, device)
        ratios.append(2 * cost / (before + after))
    return statistics.median(ratios)


def naive_ics(model, loss_fn, batch, optimizer, layers):
    """The naive scheme the issue compares against: one full forward and backward per layer."""
    params = [p for layer in layers for p in layer]
    names = {p: n for n, p in model.named_parameters()}
    grads = torch.autograd.grad(loss_fn(model(batch[0]), batch[1]), params)
    updated = {p: p.detach() - optimizer.param_groups[0]["lr"] * g for p, g in zip(params, grads)}
    for i in range(len(layers)):
        prefix = {names[p]: updated[p] for layer in layers[:i] for p in layer}
        out = torch.func.functional_call(model, prefix, (batch[0],), strict=False)
        torch.autograd.grad(loss_fn(out, batch[1]), params, allow_unused=True)


def ics_suffix_floor(model, loss_fn, batch, layers):
    """The part of ICS no exact scheme can avoid: G' of layer i needs the old-weight layers from i on run
    forward from the moved prefix's output and back to layer i's parameters, and each layer's suffix sees
    different inputs, so nothing is shared between them. Run here from the unmoved prefix's outputs
    (computed beforehand, not timed), which costs the same."""
    inputs, targets = batch
    blocks = list(model.blocks)
    with observation(model, batch), torch.no_grad():
        prefix_outputs = [inputs]
        for block in blocks[:-1]:
            prefix_outputs.append(block(prefix_outputs[-1]))

    def suffixes():
        with observation(model, batch):
            for i in range(1, len(blocks)):
                out = prefix_outputs[i]
                for block in blocks[i:]:
                    out = block(out)
                torch.autograd.grad(loss_fn(out, targets), layers[i], allow_unused=True)

    return suffixes


class Hidden(nn.Module):
    """Hides a ChainModel's structure, so that measure_ics takes its general path."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def prepared(s: Setting, device: torch.device, vgg_width: float | None = None, samples: int | None = None):
    """(model, batch, optimizer, step) of a setting, after one step, which leaves ``.grad`` of this batch as
    between backward and step in the loop. Optionally at another VGG width or on the batch's first ``samples``."""
    torch.manual_seed(0)
    model = s.build(vgg_width).to(device)
    inputs, targets = s.batch(device)
    batch = (inputs[:samples], targets[:samples])
    optimizer = torch.optim.SGD(model.parameters(), lr=s.lr)

    def step():
        optimizer.zero_grad(set_to_none=True)
        s.loss_fn(model(batch[0]), batch[1]).backward()
        optimizer.step()

    step()
    return model, batch, optimizer, step


def probe_calls(s: Setting, model, batch, optimizer) -> dict[str, Callable]:
    """Each measured probe call, by its column in the table."""
    layers = model.layer_params()
    return {
        "ics_all_layers": lambda: measure_ics(model, s.loss_fn, batch, optimizer, layers, use_grad_fields=True),
        "ics_all_layers_computing_G": lambda: measure_ics(model, s.loss_fn, batch, optimizer, layers),
        "ics_general_path": lambda: measure_ics(Hidden(model), s.loss_fn, batch, optimizer, layers,
                                                use_grad_fields=True),
        "ics_suffix_floor": ics_suffix_floor(model, s.loss_fn, batch, layers),
        "ics_naive": lambda: naive_ics(model, s.loss_fn, batch, optimizer, layers),
        "landscape_loop": lambda: probe_landscape(model, s.loss_fn, batch, s.etas, use_grad_fields=True,
                                                  batched=False),
        "landscape_vmap": lambda: probe_landscape(model, s.loss_fn, batch, s.etas, use_grad_fields=True,
                                                  batched=True),
    }


SLOW_CALLS = ("ics_general_path", "ics_naive")  # timed over a third of the rounds


def probe_costs(s: Setting, device: torch.device, rounds: int) -> dict[str, float]:
    model, batch, optimizer, step = prepared(s, device)
    out = {"step_ms": 1e3 * statistics.median(timed(step, device) for _ in range(10))}
    for key, call in probe_calls(s, model, batch, optimizer).items():
        out[key] = ratio(call, step, device, max(3, rounds // 3) if key in SLOW_CALLS else rounds)
    out["landscape_etas"] = len(s.etas)
    recorder = ActivationRecorder(model, s.activation_layers, seed=0, quantiles=[0.15, 0.5, 0.85], bins=50,
                                  log=lambda *a, **k: None)

    def step_recorded():
        recorder.arm(0)
        step()

    out["activations_extra"] = ratio(step_recorded, step, device, rounds) - 1
    recorder.remove()
    return out


def flop_costs(s: Setting, device: torch.device, samples: int = 8) -> dict[str, float]:
    """Conv and matmul FLOPs of each probe as multiples of a step's, at the paper's width (VGG width 1):
    the ratio times tend to where those products dominate (large models on a GPU). Counted on ``samples``
    samples of the batch: these FLOPs are proportional to the batch size."""
    model, batch, optimizer, step = prepared(s, device, vgg_width=1.0, samples=samples)

    def flops(call: Callable) -> int:
        with FlopCounterMode(display=False) as counter:
            call()
        return counter.get_total_flops()

    per_step = flops(step)
    return {key: flops(call) / per_step for key, call in probe_calls(s, model, batch, optimizer).items()
            if key != "landscape_vmap"}  # the same products as the loop, batched


def memory_costs(s: Setting, device: torch.device) -> dict[str, float]:
    """Peak bytes of the tensors each probe call makes (activations, gradients, copies of weights; not the
    model and batch that exist before it) as multiples of a step's, at the paper's width and the setting's
    batch. Both scale with the batch unless weight-sized copies dominate, as in the MLP."""
    model, batch, optimizer, step = prepared(s, device, vgg_width=1.0)
    per_step = peak_tensor_bytes(step)
    calls = probe_calls(s, model, batch, optimizer)
    return {"step_mib": per_step / 2**20, **{key: peak_tensor_bytes(call) / per_step for key, call in calls.items()}}


def loop_overhead(s: Setting, device: torch.device, steps: int, rounds: int, tf32: bool) -> dict[str, float]:
    """Our loop (``bnopt.train.train``, log_every=100, no probes) against a bare loop on a batch of the same
    data: seconds per step by the run's own clock (``summary.json``'s ``steps_per_s`` times the loop, not
    start-up or loading), each run of ours between two bare runs."""
    from hydra import compose, initialize_config_dir

    from bnopt.cli import hydra_override
    from bnopt.data import load_data
    from bnopt.synthetic import write_cifar10, write_mnist
    from bnopt.train import train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # A test set of one batch: the loop evaluates at step 0, inside the time it reports, and a bare loop
        # does not (500 CIFAR images cost 2-3% of a 60-step VGG-16 run).
        write_mnist(tmp / "mnist", n_train=6000, n_test=10)
        write_cifar10(tmp / "cifar", per_batch=1000, n_test=10)
        root = tmp / ("mnist" if "mlp" in s.overrides[0] else "cifar")
        configs = Path(__file__).resolve().parents[1] / "configs"

        def compose_run(n: int):
            files = [] if "dln" in s.overrides[0] else [hydra_override("data.root", root), "data.download=false"]
            with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
                return compose("train", overrides=[*s.overrides, *files, f"train.steps={n}", "train.log_every=100",
                                                   f"train.eval_every={10 * n}", f"train.checkpoint_every={10 * n}",
                                                   f"device={device}", f"train.tf32={str(tf32).lower()}"])

        def ours(n: int, run: int) -> float:
            return n / train(compose_run(n), tmp / f"run{run}")["steps_per_s"]

        # The bare loop trains on a batch of the same data (speed depends on the values: the DLN's y = A x
        # runs 10% slower than random targets).
        cfg = compose_run(steps)
        data = load_data(cfg.data, cfg.seed).to(device)
        batch = (data.train_x[: cfg.train.batch_size], data.train_y[: cfg.train.batch_size])

        def bare(n: int, fetch: bool = False) -> float:
            """The bare loop; with ``fetch``, it also gathers a fresh shuffled batch each step, as any real
            loop must (ours does it with index_select from the tensor data set)."""
            torch.manual_seed(0)
            model = s.build(None).to(device)
            optimizer = torch.optim.SGD(model.parameters(), lr=s.lr)
            x, y, size = data.train_x, data.train_y, cfg.train.batch_size
            order = torch.randperm(len(x), device=device)

            def run():
                for i in range(n):
                    if fetch and size < len(x):
                        start = (i * size) % (len(x) - size + 1)
                        index = order[start : start + size]
                        inputs, targets = x.index_select(0, index), y.index_select(0, index)
                    else:
                        inputs, targets = batch
                    optimizer.zero_grad(set_to_none=True)
                    s.loss_fn(model(inputs), targets).backward()
                    optimizer.step()

            return timed(run, device)

        ratios, fetching_ratios, ours_per_step, bare_per_step = [], [], [], []
        for r in range(rounds):
            before, before_fetching = bare(steps), bare(steps, fetch=True)
            our_step = ours(steps, r) / steps
            bare_step = (before + bare(steps)) / (2 * steps)
            fetching_step = (before_fetching + bare(steps, fetch=True)) / (2 * steps)
            ratios.append(our_step / bare_step)
            fetching_ratios.append(our_step / fetching_step)
            ours_per_step.append(our_step)
            bare_per_step.append(bare_step)
        return {"bare_step_ms": 1e3 * statistics.median(bare_per_step), "our_step_ms": 1e3 * statistics.median(ours_per_step),
                "paper_run_minutes": 15000 * statistics.median(ours_per_step) / 60,  # 15,000 steps, no probes
                "our_loop_vs_bare": statistics.median(ratios),
                "our_loop_vs_bare_fetching": statistics.median(fetching_ratios)}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:<n>")
    parser.add_argument("--models", nargs="*", default=["mlp_bn", "dln_none", "dln_bn", "vgg11", "vgg16"],
                        help="which settings, by default all: mlp_bn dln_none dln_bn vgg11 vgg16")
    parser.add_argument("--only", choices=["probes", "flops", "memory", "loop"], default=None,
                        help="one section: probe costs in steps, FLOP counts, peak memory, or the training "
                             "loop's overhead (default: all four)")
    parser.add_argument("--rounds", type=positive_int, default=9,
                        help="timing rounds per measurement; the median is reported (default 9)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's, the machine's cores)")
    parser.add_argument("--tf32", action="store_true", help="time steps and runs with TF32 on (train.tf32=true)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    table = settings(device)
    unknown = [key for key in args.models if key not in table]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(table)}")
    with process_settings(args.threads, args.tf32):
        results = measure(args, device, table)
    print(markdown(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def measure(args: argparse.Namespace, device: torch.device, table: dict[str, Setting]) -> dict:
    """The sections ``args`` ask for, model by model (each printed as it is done), under the run's settings."""
    results = {"device": str(device), "device_name": device_name(device), "threads": torch.get_num_threads(),
               "tf32": args.tf32, "torch": torch.__version__, "models": {}}
    for key in args.models:
        s = table[key]
        entry = results["models"][key] = {"setting": s.name}
        if args.only in (None, "probes"):
            entry.update(probe_costs(s, device, args.rounds))
        if args.only in (None, "flops"):
            entry["flops"] = flop_costs(s, device)
        if args.only in (None, "memory"):
            entry["memory"] = memory_costs(s, device)
        if args.only in (None, "loop") and key in ("mlp_bn", "dln_bn", "vgg16"):
            steps = {"mlp_bn": 3000, "dln_bn": 600, "vgg16": 60 if device.type == "cpu" else 600}[key]
            entry.update(loop_overhead(s, device, steps, rounds=max(3, args.rounds // 2), tf32=args.tf32))
        print(json.dumps({key: entry}, indent=1), flush=True)
    return results


COLUMNS = [
    ("step_ms", "step (ms)", "{:.2f}"),
    ("ics_all_layers", "ICS, all layers", "{:.2f}"),
    ("ics_all_layers_computing_G", "ICS, all layers, computing G", "{:.2f}"),
    ("ics_general_path", "ICS, general path", "{:.2f}"),
    ("ics_suffix_floor", "ICS, its old-weight suffixes alone", "{:.2f}"),
    ("ics_naive", "ICS, naive", "{:.2f}"),
    ("landscape_etas", "E (etas)", "{}"),
    ("landscape_loop", "landscape, loop", "{:.2f}"),
    ("landscape_vmap", "landscape, vmap", "{:.2f}"),
    ("activations_extra", "activations (extra)", "{:+.3f}"),
    ("our_loop_vs_bare", "our loop / bare loop", "{:.3f}"),
    ("our_loop_vs_bare_fetching", "our loop / bare loop fetching batches", "{:.3f}"),
    ("paper_run_minutes", "15,000 steps of our loop (min)", "{:.1f}"),
]


FLOP_KEYS = ("ics_all_layers", "ics_all_layers_computing_G", "ics_general_path", "ics_suffix_floor", "ics_naive",
             "landscape_loop")
MEMORY_KEYS = (*FLOP_KEYS, "landscape_vmap")  # vmap's products are the loop's, its memory is not


def markdown(results: dict) -> str:
    lines = [f"device {results['device']} ({results['device_name']}), "
             f"{results['threads']} threads, TF32 {'on' if results['tf32'] else 'off'}, torch {results['torch']}"]
    rows = []
    for entry in results["models"].values():
        cells = ["" if entry.get(key) is None else fmt.format(entry[key]) for key, _, fmt in COLUMNS]
        if any(cells):  # none with --only flops or memory
            rows.append(f"| {entry['setting']} | " + " | ".join(cells) + " |")
    if rows:
        lines += ["", "| model | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
                  "|---" * (len(COLUMNS) + 1) + "|", *rows]
    lines += counted_table(results, "flops", "Conv and matmul FLOPs as multiples of a step's, at the paper's width "
                           "(VGG width 1):", [(key, title) for key, title, _ in COLUMNS if key in FLOP_KEYS])
    lines += counted_table(results, "memory", "Peak memory of the tensors each call makes, as multiples of a step's, "
                           "at the paper's width (VGG width 1) and each setting's batch:",
                           [("step_mib", "step (MiB)"),
                            *((key, title) for key, title, _ in COLUMNS if key in MEMORY_KEYS)])
    return "\n".join(lines)


def counted_table(results: dict, section: str, caption: str, columns: list[tuple[str, str]]) -> list[str]:
    """A table of the counted (not timed) section ``section``, one row per model that has it."""
    counted = {key: entry[section] for key, entry in results["models"].items() if section in entry}
    if not counted:
        return []
    lines = ["", caption, "", "| model | " + " | ".join(title for _, title in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for key, values in counted.items():
        lines.append(f"| {key} | " + " | ".join(f"{values[k]:.2f}" for k, _ in columns) + " |")
    return lines


if __name__ == "__main__":
    main()
