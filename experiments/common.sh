# Shared by the figure recipes; `source` it with the recipe's arguments: [scale] [extra overrides...].
#
# Every run goes to a fixed place, $RESULTS/<scale>-<data>/<model>/<norm>_lr<lr>_seed<seed>/, so a run that
# several figures share is trained once: a finished run is not re-run (its name is not part of its identity).
# scale=cpu shrinks only VGG, so the DLN and MLP runs are made and stored as scale=paper runs.
#
# Environment: VGG_DATA (default cifar10), MLP_DATA (default mnist), JOBS (parallel runs, default 1;
# more than 1 needs `pip install -e ".[cluster]"` for the joblib launcher), RESULTS (default results/, and
# results/runs/recipes/ for scale smoke, whose runs are no results: the committed tree and figures stay as they are).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
for argument in "$@"; do
  if [ "$argument" = -h ] || [ "$argument" = --help ]; then
    sed -n '2,/^source/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
    sed -n '/^# Environment/,/^set -euo/p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'
    exit 0
  fi
done
SCALE="${1:-cpu}"
EXTRA=("${@:2}")
case $SCALE in
  cpu | paper | smoke) ;;
  *) echo "error: scale '$SCALE' is none of cpu, paper, smoke (usage: $0 [scale] [overrides...])" >&2; exit 2 ;;
esac
for override in ${EXTRA[@]+"${EXTRA[@]}"}; do
  case ${override#+} in
    data=* | scale=* | model=* | experiment=*)  # they would land in a tree named after other settings
      echo "error: $override: a recipe sets the experiments, models, data sets and scale itself, each run at its" \
           "place named after them; give the scale as the first argument and the data sets as VGG_DATA=..." \
           "MLP_DATA=..." >&2
      exit 2 ;;
    -*)
      echo "error: $override: a recipe takes [scale] [overrides...] and --help, no other options" >&2
      exit 2 ;;
  esac
done
VGG_DATA="${VGG_DATA:-cifar10}"
MLP_DATA="${MLP_DATA:-mnist}"
JOBS="${JOBS:-1}"
if [ "$SCALE" = smoke ]; then RESULTS="${RESULTS:-$REPO/results/runs/recipes}"; else RESULTS="${RESULTS:-$REPO/results}"; fi
SETS=()  # the result sets this recipe's sweeps wrote: its figures are drawn from them alone

# A job whose run's place holds a run of another config (this recipe given another override before), or a run
# that another process is training, is refused and the sweep goes on, as does one that failed (missing data)
# or was interrupted; the UnfinishedJobs callback lists such jobs here, and the recipe stops before drawing a
# figure from runs that are not its own, or from none. In RESULTS because every job writes it (on a cluster,
# from its node).
mkdir -p "$RESULTS"
UNFINISHED="$(mktemp "$RESULTS/.unfinished-jobs.XXXXXX")"
trap 'rm -f "$UNFINISHED"' EXIT

# hydra_override <key> <path>: key=path as one argument that Hydra, then OmegaConf, read back as path. A plain
# path goes as typed; any other in Hydra's double quotes, escaped as bnopt.cli.hydra_override does it: Hydra
# refused a clone in "bnopt (1)" or under a home directory named José, and took a comma for a sweep over two
# directories. In Hydra's quotes a backslash escapes only a quote and the backslashes before one (or before the
# closing quote); OmegaConf reads ${ as an interpolation unless escaped, and the backslashes before it likewise.
hydra_override() {
  local LC_ALL=C key=$1 text=$2 quoted="" backslashes="" char  # C: [A-Za-z] is ASCII, a character a byte
  if [[ $text == */* && $text != *[!A-Za-z0-9_.@%+:/-]* ]]; then printf '%s=%s' "$key" "$text"; return; fi
  while [ -n "$text" ]; do
    char=${text:0:1} text=${text:1}
    if [ "$char" = '\' ]; then backslashes+=$char; continue; fi
    if [ "$char" = '"' ] || { [ "$char" = '$' ] && [ "${text:0:1}" = '{' ]; }; then
      quoted+="$backslashes$backslashes\\$char"
    else
      quoted+="$backslashes$char"
    fi
    backslashes=""
  done
  printf '%s="%s"' "$key" "$quoted$backslashes$backslashes"
}
RECORD_OVERRIDE="$(hydra_override +hydra.callbacks.unfinished_jobs.record "$UNFINISHED")"

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
  local status=0
  python "$REPO/train.py" -m "+experiment=$experiment" "scale=$scale" "data=$data" \
    "$(hydra_override hydra.sweep.dir "$RESULTS/$scale-$data/$store")" \
    'hydra.sweep.subdir=${norm.name}_lr${optim.lr}_seed${seed}' \
    '+hydra.callbacks.unfinished_jobs._target_=bnopt.hydra_callbacks.UnfinishedJobs' "$RECORD_OVERRIDE" \
    ${launcher[@]+"${launcher[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} || status=$?
  if [ "$status" = 130 ]; then  # a signal stopped the sweep job by job: the recipe stops too
    echo "$0: interrupted; run the recipe again to continue (finished runs are skipped, the others resume)" >&2
    exit 130
  elif [ "$status" != 0 ]; then
    exit "$status"
  fi
  if [ -s "$UNFINISHED" ]; then
    {
      echo "error: $experiment: these jobs did not finish their runs, so nothing is drawn:"
      sed 's/^/  /' "$UNFINISHED"
      if grep -q "another config" "$UNFINISHED"; then
        echo "A recipe places each run by its norm, lr and seed only; give runs of other overrides their own tree:"
        echo "  RESULTS=<another dir> $(printf '%q ' "$0" "$SCALE" ${EXTRA[@]+"${EXTRA[@]}"})"  # to paste
      fi
      if grep -q "another process" "$UNFINISHED"; then
        echo "Run the recipe again when the other process has ended: it then finds those runs finished."
      fi
      if grep -q "ended " "$UNFINISHED"; then
        echo "Mend what stopped them (the errors above, or each run's summary.json) and run the recipe again:" \
             "finished runs are skipped, the others resume."
      fi
    } >&2
    exit 2
  fi
  [[ " ${SETS[*]-} " == *" $RESULTS/$scale-$data/ "* ]] || SETS+=("$RESULTS/$scale-$data/")
}

# figure <key>: draw it from the result sets of this recipe's sweeps.
figure() {
  python "$REPO/scripts/make_figures.py" "$1" --runs "${SETS[@]}" --out "$RESULTS/figures"
}
