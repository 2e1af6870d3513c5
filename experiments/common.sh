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
    ${launcher[@]+"${launcher[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
}

# figure <key>: draw it from everything stored under results/.
figure() {
  python "$REPO/scripts/make_figures.py" "$1" --runs "$RESULTS"/*-*/ --out "$RESULTS/figures"
}
