#!/usr/bin/env bash
# The three RLFN x2 students of docs/results.md (TAKDSR, PISR', X_s) trained again side by side for the same
# number of steps, with the same batch, data and cosine, from the shipped teacher, TA and continuous-CF teacher:
# the paper's protocol (every model the same epochs). The shipped students had equal wall time instead, and so
# unequal steps (TAKDSR 6,106, PISR' 4,416, X_s 9,833). Meant for a GPU (`scripts/gpu_checks.sh students`); on
# a CPU with CONFIG=training/configs/rlfn_x2_ablation_cpu.toml and a small batch (docs/results.md).
#
#   [CONFIG=...] scripts/matched_students.sh RUN_DIR OUT_DIR STEPS [--set KEY=VALUE ...]
#
# Needs data/povray (docs/data.md) beside the scene frames, which are rendered on first use. Seeds RUN_DIR with
# the shipped guides (kept where RUN_DIR has them already), trains the stages that are not finished (a stage
# with a saved state resumes), then copies each stage's final checkpoint to OUT_DIR/<stage>.safetensors, or,
# for a stage stopped early, its saved state to OUT_DIR/<stage>.state.pt (put back as RUN_DIR/<stage>/state.pt,
# a later run resumes it). Ctrl-C stops the trainers, which save their state; this script still copies it.
# It runs from the checkout (cd below); RUN_DIR, OUT_DIR, CONFIG and PYTHON are taken from where it is started (the
# --set values, such as data paths, are the checkout's, as the trainer reads them there).
source "$(dirname "$0")/lib/help.sh" "$@"
source "$(dirname "$0")/lib/paths.sh"
set -uo pipefail
if [[ $# -lt 3 ]]; then
    echo "matched_students: usage: [CONFIG=...] scripts/matched_students.sh RUN_DIR OUT_DIR STEPS [--set KEY=VALUE ...]" \
        "(--help for more)" >&2
    exit 2
fi
run_dir=$(from_here "$1") out_dir=$(from_here "$2") steps=$3
# checked before the guides are copied and three trainers each refuse it
[[ $steps =~ ^[1-9][0-9]*$ ]] || { echo "matched_students: STEPS must be a whole number >= 1, got '$steps'" >&2; exit 2; }
CONFIG=$(from_here "${CONFIG:-}") PYTHON=$(command_from_here "${PYTHON:-}")
cd "$(dirname "$0")/.."
shift 3
STAGES=student_takdsr,student_pisr,student_alone
# PYTHON runs the trainers: by default the repository's .venv (scripts/setup.sh) when there is one, else python3
python=${PYTHON:-.venv/bin/python}
[[ -n ${PYTHON:-} || -x $python ]] || python=python3
# OUT_DIR first: hours of training are no use when their checkpoints cannot be copied out
mkdir -p "$out_dir" && [[ -d $out_dir && -w $out_dir ]] ||
    { echo "matched_students: cannot write to OUT_DIR '$out_dir' (no folder, or not writable)" >&2; exit 1; }
# the guides and initialisations the pipeline looks for in RUN_DIR: the shipped teacher, TA and continuous teacher
"$python" -m training seed-run "$run_dir" --stages teacher,ta1,teacher_continuous || exit 1

# The trainers take a Ctrl-C (passed on by train_parallel.sh) and save their state; this script stays to copy it.
# A trap, not an ignored INT, so that train_parallel.sh can take the signal too.
trap ':' INT
status=0
PYTHON=$python bash scripts/train_parallel.sh "${CONFIG:-training/configs/rlfn_x2.toml}" "$run_dir" 0 "$STAGES" \
    --set "experiment.student_steps=$steps" --set optim.batch_size=32 --set data.cache_mb=2048 \
    --set runtime.log_every=200 --set runtime.checkpoint_every=500 "$@" || status=$?

for stage in ${STAGES//,/ }; do
    if [[ -f $run_dir/$stage/final.safetensors ]]; then
        from=$run_dir/$stage/final.safetensors to=$out_dir/$stage.safetensors
    elif [[ -f $run_dir/$stage/state.pt ]]; then
        from=$run_dir/$stage/state.pt to=$out_dir/$stage.state.pt
    else
        echo "matched_students: $stage left no checkpoint or state in $run_dir/$stage to copy" >&2
        ((status)) || status=1
        continue
    fi
    if ! cp "$from" "$to"; then
        echo "matched_students: could not copy $from to $to" >&2
        ((status)) || status=1
    fi
done
exit $status
