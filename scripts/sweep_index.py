"""Write (or rewrite) ``index.csv`` for sweep directories and print it.

    python scripts/sweep_index.py results/runs/dln_bn/2026-11-21/12-00-00 [more sweep dirs...]

One row per run directory: job number and overrides of the command that trained it (empty where they
cannot be known), status (completed, diverged, failed, interrupted, running, killed, unknown), steps, final
train/test metrics, wall time, error; and one per job the sweep never started (status not started, no
directory), from the sweep's multirun.yaml. A sweep writes it when it ends; this rebuilds it for a sweep that
was killed or is still running.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bnopt.sweeps import write_index  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dirs", nargs="+", type=Path, metavar="SWEEP_DIR")
    all_found = True
    sys.stdout.reconfigure(encoding="utf-8")  # the index as written (UTF-8), whatever the locale's encoding
    for directory in parser.parse_args().sweep_dirs:
        if not directory.is_dir():
            all_found = False
            print(f"{directory}: not a directory", file=sys.stderr)
            continue
        if any((directory / name).exists() for name in ("summary.json", "metrics.csv", "config.yaml")):
            all_found = False
            print(f"{directory}: a run's directory, not a sweep's (which holds one per job); not indexed",
                  file=sys.stderr)
            continue
        index = write_index(directory, warn=lambda m: print(m, file=sys.stderr))
        if index is None:
            print(f"{directory}: no job directories in it, nor a multirun.yaml that lists jobs (is it a sweep's?); "
                  "not indexed", file=sys.stderr)
            continue
        print(index.read_text(encoding="utf-8"), end="")
    return 0 if all_found else 1  # the others are indexed all the same


if __name__ == "__main__":
    sys.exit(main())
