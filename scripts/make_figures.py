"""Draw the paper's figures from runs on disk.

    python scripts/make_figures.py all                       # every figure from the committed results/
    python scripts/make_figures.py 1 --runs results/runs/fig1 --out /tmp/figs
    python scripts/make_figures.py --list                    # the figures and what each claims

Reads ``config.yaml`` and ``metrics.csv`` (and ``summary.json``, ``activations.npz``) of every run found
at or below ``--runs`` (directories or globs); runs that cannot be parsed are named and skipped, missing
runs are named and the rest is drawn. Writes ``<out>/fig<key>.png`` and ``.pdf`` (``fig<key>_<sets>``, one
per combination, when the runs hold several result sets of a model); a figure that found none of the runs
it needs is not written, so a file drawn before stays. Exits 1 when nothing was drawn (no runs read, or
none that the figure needs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bnopt.figures import FIGURES, draw  # noqa: E402
from bnopt.results import committed_result_dirs, load_runs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figure", nargs="?", help=f"one of {', '.join(FIGURES)}, or all")
    parser.add_argument("--runs", nargs="+", default=[str(p) for p in committed_result_dirs(REPO)],
                        help="run directories or globs (default: the committed results under results/)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "figures")
    parser.add_argument("--list", action="store_true", help="list the figures and their claims")
    args = parser.parse_args(argv)
    if args.list or not args.figure:
        for key, spec in FIGURES.items():
            print(f"{key:>9}  {spec.claim}")
        return 0
    keys = list(FIGURES) if args.figure == "all" else [args.figure]
    unknown = [k for k in keys if k not in FIGURES]
    if unknown:
        parser.error(f"unknown figure {unknown[0]!r}; choose from {', '.join(FIGURES)} or all")
    runs = load_runs(args.runs, warn=lambda message: print(message, file=sys.stderr))
    print(f"{len(runs)} runs read from {', '.join(map(str, args.runs)) or '(nothing)'}")
    written = [path for key in keys for path in draw(key, runs, args.out, warn=lambda m: print(m, file=sys.stderr))]
    for path in written:
        print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0 if written else 1  # a recipe must not go on as if its figure were there


if __name__ == "__main__":
    sys.exit(main())
