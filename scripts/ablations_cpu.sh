#!/usr/bin/env bash
# The RLFN x2 ablations of issue 10 at the reduced CPU schedule of training/configs/rlfn_x2_ablation_cpu.toml
# (the same steps, batch and data for every row). Every row starts from the shipped H100 teachers, so the
# rows differ only in the ablated choice. Two queues of rows run as parallel 1-thread processes.
# A finished stage is skipped and an interrupted one resumed, so rerunning continues where it stopped.
#   usage: [CONFIG=FILE] scripts/ablations_cpu.sh [RUN_ROOT]   (default runs/ablations; results: docs/ablations.md)
# CONFIG (default the CPU ablation config) lets a GPU session rerun every row on a copy with a longer schedule.
# When it ends, RUN_ROOT/scores_*.json hold the scores; scripts/scores_table.py prints them as tables.
# It runs from the checkout (cd below); RUN_ROOT, CONFIG and PYTHON are taken from where it is started.
source "$(dirname "$0")/lib/help.sh" "$@"
source "$(dirname "$0")/lib/paths.sh"
set -euo pipefail
GIVEN_ROOT=$(from_here "${1:-}") CONFIG=$(from_here "${CONFIG:-}") PYTHON=$(command_from_here "${PYTHON:-}")
cd "$(dirname "$0")/.."
if (($# > 1)) || [[ ${1:-} == -* ]]; then  # not a folder named --x, nor a second argument left unread
    echo "ablations_cpu: usage: [CONFIG=FILE] scripts/ablations_cpu.sh [RUN_ROOT] (--help: what it does)" >&2
    exit 2
fi
ROOT=${GIVEN_ROOT:-runs/ablations}
PY=${PYTHON:-.venv/bin/python}
CONFIG=${CONFIG:-training/configs/rlfn_x2_ablation_cpu.toml}
TEACHER=models/weights/rlfn_teacher_takdsr_x2.safetensors
CONTINUOUS_TEACHER=models/weights/rlfn_teacher_continuous_x2.safetensors

# put_stage RUN STAGE CHECKPOINT: a finished stage the pipeline will reuse instead of training it
put_stage() { mkdir -p "$ROOT/$1/$2"; cp "$3" "$ROOT/$1/$2/final.safetensors"; }
pipe() { local run=$1; shift; "$PY" -m training pipeline --config "$CONFIG" --run-dir "$ROOT/$run" "$@"; }

row_base() {  # the paper's setting: one 3-block TA reading 0.3 CF' + 0.7 X, discrete CF, feature term, teacher init
    put_stage base teacher "$TEACHER"
    pipe base --stages ta1,student_takdsr
}
row_no_feature() {  # needs row_base's TA
    put_stage no_feature teacher "$TEACHER"
    put_stage no_feature ta1 "$ROOT/base/ta1/final.safetensors"
    pipe no_feature --stages student_takdsr --set loss.feature=0
}
row_seed() {  # row_base's student again with another seed (other patches and flips): the noise floor
    put_stage base_seed1 teacher "$TEACHER"
    put_stage base_seed1 ta1 "$ROOT/base/ta1/final.safetensors"
    pipe base_seed1 --stages student_takdsr --set runtime.seed=1
}
row_scratch() {  # needs row_base's TA; guided like TAKDSR but randomly initialised
    local dir="$ROOT/scratch/student_takdsr" resume=()
    [ -f "$dir/final.safetensors" ] && return 0
    [ -f "$dir/state.pt" ] && resume=(--resume "$dir")  # interrupted: go on (train never starts over a run)
    "$PY" -m training train --config "$CONFIG" --run-dir "$dir" "${resume[@]}" \
        --set stage.name=student_takdsr --set stage.role=student --set stage.steps=0 \
        --set "stage.guides=[\"$TEACHER\", \"$ROOT/base/ta1/final.safetensors\"]"
}
row_mix() {  # row_mix NAME A B: the TA reads A CF' + B X
    put_stage "$1" teacher "$TEACHER"
    pipe "$1" --stages ta1,student_takdsr --set "experiment.mix=[$2,$3]"
}
row_two_tas() {  # TA1 (4 blocks) then TA2 (2 blocks), dense guidance: each is guided by every model above it
    put_stage two_tas teacher "$TEACHER"
    pipe two_tas --stages ta1,ta2,student_takdsr --set "experiment.ta_blocks=[4,2]"
}
row_continuous_ta() {  # TAKDSR with the continuous-CF teacher: the TA mixes the unrounded CF
    put_stage continuous_ta teacher "$CONTINUOUS_TEACHER"
    pipe continuous_ta --stages ta1,student_takdsr
}
row_baselines() {  # X_s (student alone) and PISR' (continuous teacher -> student, no TA) at the same steps
    put_stage base teacher_continuous "$CONTINUOUS_TEACHER"
    pipe base --stages student_alone,student_pisr --set experiment.baselines=true
}

# Scores of every student on cg-dev and the rendered validation frames, and of the TAs of the mix study (a TA is
# scored on its mixed input, so it needs the teacher whose CF it mixes); the other TAs are left out to save time
evaluate_rows() {
    local sets=cg-dev,rendered-val students=() tas=()
    for file in "$ROOT"/*/student_*/final.safetensors; do students+=(--checkpoint "$file"); done
    for run in base mix_01_09 mix_05_05; do tas+=(--checkpoint "$ROOT/$run/ta1/final.safetensors"); done
    "$PY" -m training evaluate --sets $sets "${students[@]}" --json "$ROOT/scores_students.json"
    "$PY" -m training evaluate --sets $sets "${tas[@]}" --teacher "$TEACHER" --json "$ROOT/scores_tas.json"
}

queue_1() { row_base && row_no_feature && row_scratch && row_mix mix_01_09 0.1 0.9 && row_seed; }
queue_2() { row_baselines && row_continuous_ta && row_mix mix_05_05 0.5 0.5 && row_two_tas; }

mkdir -p "$ROOT"
queue_1 >"$ROOT/queue_1.log" 2>&1 &
first=$!
queue_2 >"$ROOT/queue_2.log" 2>&1 &
second=$!
signals=0  # a signal cuts a wait short: the queue is waited for again until it has stopped
# A terminal's Ctrl-C reaches the trainers itself (they share its process group); the queues, background subshells,
# ignore SIGINT. A SIGTERM to this script alone becomes one SIGINT for each queue's running trainer (its child):
# it saves its state and stops, and its queue with it (PYTHON must be python itself, or a wrapper that execs it).
# `|| true`: pkill fails when it finds no trainer (a queue between two rows), and set -e would end the script here.
trap 'signals=$((signals + 1))' INT
trap 'signals=$((signals + 1)); pkill -INT -P "$first,$second" || true' TERM
status=0
for queue in 1 2; do
    if ((queue == 1)); then pid=$first; else pid=$second; fi
    while true; do
        before=$signals code=0
        wait $pid || code=$?
        ((signals != before)) || break
    done
    if ((code != 0)); then  # the reason is in the queue's log only: name it on the console
        status=$code
        echo "ablations_cpu: queue $queue failed (exit $code); the reason is in $ROOT/queue_$queue.log, which ends:" >&2
        tail -n 5 "$ROOT/queue_$queue.log" | sed 's/^/    /' >&2
    fi
done
if ((status == 0)); then  # not after &&, where a failing first evaluation would not stop the function
    evaluate_rows
fi
exit $status
