# Shared by the figure recipes; `source` it with the recipe's arguments: [scale] [extra overrides...].
#
# Every run goes to a fixed place, results/<scale>-<data>/<model>/<norm>_lr<lr>_seed<seed>/, so a run that
# several figures share is trained once: a finished run is not re-run (its name is not part of its identity).
# scale=cpu shrinks only VGG, so the DLN and MLP runs are made and stored as scale=paper runs.
#
# Environment: VGG_DATA (default cifar10), MLP_DATA (default mnist), JOBS (parallel runs, default 1;
# more than 1 needs `pip install -e ".[cluster]"` for the joblib launcher), RESULTS (default results/).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCALE="${1:-cpu}"
EXTRA=("${@:2}")
VGG_DATA="${VGG_DATA:-cifar10}"
MLP_DATA="${MLP_DATA:-mnist}"
JOBS="${JOBS:-1}"
RESULTS="${RESULTS:-$REPO/results}"

# A job whose run's place holds a run of another config (this recipe given another override before), or a run
# that another process is training, is refused and the sweep goes on; the RefusedJobs callback lists such jobs
# here, and the recipe stops before drawing a figure from runs that are not its own. In RESULTS because every
# job writes it (on a cluster, from its node).
mkdir -p "$RESULTS"
REFUSED="$(mktemp "$RESULTS/.refused-jobs.XXXXXX")"
trap 'rm -f "$REFUSED"' EXIT

# sweep <experiment> <model> [store suffix]: every job of the experiment's Hydra sweep, at its fixed place.
sweep() {
  local experiment=$1 model=$2 store="$2${3:-}" scale=$SCALE data
  case $model in
    vgg) data=$VGG_DATA ;;
    mlp) data=$MLP_DATA ;;
    dln) data=gaussian_regression ;;
  esac
  [ "$model" != vgg ] && [ "$scale" = cpu ] && scale=paper
  local launcher=()
  if [ "$JOBS" -gt 1 ]; then launcher=(hydra/launcher=joblib "hydra.launcher.n_jobs=$JOBS"); fi
  echo "== $experiment: scale=$scale data=$data -> $RESULTS/$scale-$data/$store/"
  python "$REPO/train.py" -m "+experiment=$experiment" "scale=$scale" "data=$data" \
    "hydra.sweep.dir=$RESULTS/$scale-$data/$store" 'hydra.sweep.subdir=${norm.name}_lr${optim.lr}_seed${seed}' \
    '+hydra.callbacks.refused_jobs._target_=bnopt.hydra_callbacks.RefusedJobs' \
    "+hydra.callbacks.refused_jobs.record=$REFUSED" \
    ${launcher[@]+"${launcher[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
  if [ -s "$REFUSED" ]; then
    {
      echo "error: $experiment: jobs were refused, so these runs are not this command's; nothing drawn:"
      sed 's/^/  /' "$REFUSED"
      if grep -q "another config" "$REFUSED"; then
        echo "A recipe places each run by its norm, lr and seed only; give runs of other overrides their own tree:"
        echo "  RESULTS=<another dir> $0 $SCALE ${EXTRA[*]-}"
      fi
      if grep -q "another process" "$REFUSED"; then
        echo "Run the recipe again when the other process has ended: it then finds those runs finished."
      fi
    } >&2
    exit 2
  fi
}

# figure <key>: draw it from everything stored under results/.
figure() {
  python "$REPO/scripts/make_figures.py" "$1" --runs "$RESULTS"/*-*/ --out "$RESULTS/figures"
}
