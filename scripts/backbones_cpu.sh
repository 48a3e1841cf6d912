#!/usr/bin/env bash
# The paper's backbone comparison of issue 10 (teacher -> TA -> TAKDSR student, PISR' student, X_s, with
# bicubic and Lanczos) on a 2-core CPU, for RFDN, PAN and RLFN, every family with its architecture from the
# paper's config (training/configs/<family>_x2.toml) and one reduced schedule that is the same for all of
# them: teachers (discrete and continuous CF) 3,000 steps, TAs and students 1,500 steps, batch 8 of 96 px HR
# patches, the data of the ablations (59 POV-Ray renders and 48 scene frames at 1280x720). Every model is
# trained from scratch here, the teachers included. Two queues of stages run as parallel 1-thread processes;
# a finished stage is skipped and an interrupted one resumed, so rerunning continues where it stopped.
#
#   scripts/backbones_cpu.sh [FAMILY...]        the comparison, then its evaluation (default: rfdn pan rlfn)
#   scripts/backbones_cpu.sh cf-ta FAMILY...    after it: the two missing corners of CF kind x TA (discrete CF
#                                               without a TA, continuous CF with one), students scored with both
#   scripts/backbones_cpu.sh ship FAMILY...     on its own: the TAKDSR chain (teacher, TA, student) and X_s
#                                               again, TA 1,000 and students 2,500 steps, one queue per family,
#                                               evaluated: the students that ship
#   scripts/backbones_cpu.sh ship-pisr FAMILY...  after or beside 'ship': PISR' (continuous-CF teacher, then its
#                                               student, no TA) at the shipped set's schedule, in the same
#                                               folder, scored on its own (pisr_scores.json)
#   scripts/backbones_cpu.sh teachers FAMILY STEPS  the discrete- and the continuous-CF teacher of FAMILY at
#                                               STEPS steps (two parallel 1-thread processes), scored: does
#                                               the gap between the CF kinds close with the teacher's schedule?
# The environment variable RUN_ROOT (RUN_ROOT=runs/mine scripts/backbones_cpu.sh ...; default runs/backbones; an
# argument, as ablations_cpu.sh takes it, is read as a family) holds a folder per family: results.json and
# report.md of the comparison, cf_ta_scores.json of the corners; <family>_ship/ the shipped set (docs/ablations.md
# has the tables).
# It runs from the checkout (cd below); RUN_ROOT and PYTHON are taken from where it is started.
source "$(dirname "$0")/lib/help.sh" "$@"
source "$(dirname "$0")/lib/paths.sh"
set -euo pipefail
RUN_ROOT=$(from_here "${RUN_ROOT:-}") PYTHON=$(command_from_here "${PYTHON:-}")
cd "$(dirname "$0")/.."
ROOT=${RUN_ROOT:-runs/backbones}
PY=${PYTHON:-.venv/bin/python}

# TOML inline tables must stay on one line
POVRAY='{kind="folder", path="data/povray", weight=1.0}'
SCENES='{kind="scenes", width=1280, height=720, supersample=2, frames_per_preset=12, cache_dir="data/scenes-cache", weight=1.0}'
STUDENT_STEPS=1500
SHIPPED_TA_STEPS=1000
SHIPPED_STUDENT_STEPS=2500
SCHEDULE=(
    --set experiment.teacher_steps=3000 --set experiment.ta_steps=$STUDENT_STEPS
    --set experiment.student_steps=$STUDENT_STEPS --set optim.batch_size=8 --set data.patch_size=96
    --set runtime.device=cpu --set runtime.amp=off --set runtime.workers=1 --set runtime.threads=1
    --set runtime.log_every=50 --set runtime.checkpoint_every=500 --set runtime.progress=false
    --set "data.sources=[$POVRAY, $SCENES]"
)

config() { echo "training/configs/$1_x2.toml"; }
# stages FAMILY STAGE[,STAGE...]: train those stages of FAMILY's experiment (no evaluation)
stages() { "$PY" -m training pipeline --config "$(config "$1")" --run-dir "$ROOT/$1" --stages "$2" "${SCHEDULE[@]}"; }
# evaluate FAMILY: score every stage with bicubic and Lanczos (cg-dev, rendered-val), results.json, report.md
evaluate() {
    "$PY" -m training pipeline --config "$(config "$1")" --run-dir "$ROOT/$1" "${SCHEDULE[@]}" --set runtime.threads=2
}

# The two queues hold about the same work: one family's TAKDSR chain (teacher, TA, student) in one queue, its
# baselines (continuous teacher, PISR', X_s) in the other, alternating from family to family.
queue() {
    local index=$1 family
    shift
    for family in "$@"; do
        if ((index % 2 == 0)); then stages "$family" teacher,ta1,student_takdsr
        else stages "$family" teacher_continuous,student_pisr,student_alone; fi
        index=$((index + 1))
    done
}

# failed LOG STATUS: say on the console which log holds the reason of a failure, with its last lines
failed() {
    echo "backbones_cpu: failed (exit $2); the reason is in $1, which ends:" >&2
    tail -n 5 "$1" | sed 's/^/    /' >&2
}

# run_logged LOG FUNCTION ARGS...: FUNCTION ARGS (stopping at its first failing command) with its output in LOG;
# a failure is named on the console (failed). Call it as a plain command, not in `if` or after && or ||, where
# bash would not stop FUNCTION at a failing command.
run_logged() {
    local log=$1 status
    shift
    set +e
    (
        set -e
        "$@"
    ) >"$log" 2>&1
    status=$?
    set -e
    ((status == 0)) || failed "$log" $status
    return $status
}

# wait_all PID LOG [PID LOG...]: wait for every background job PID, whose output goes to LOG (Ctrl-C interrupts
# them all); fails if any failed, naming the log of each failure on the console. The jobs are in this script's
# process group, so a Ctrl-C from the terminal reaches their trainers already (a second one would stop them
# unsaved); SIGTERM, to this script alone, is passed on as SIGINT (to the trainers of `teachers`: a queue's
# subshell ignores it, as bash has asynchronous commands ignore SIGINT).
wait_all() {
    local pids=() logs=() i status=0 code before
    signals=0
    while (($#)); do
        pids+=("$1") logs+=("$2")
        shift 2
    done
    trap 'signals=$((signals + 1))' INT
    trap "signals=\$((signals + 1)); kill -INT ${pids[*]} 2>/dev/null" TERM
    for i in "${!pids[@]}"; do
        while true; do  # a signal cuts a wait short: wait again for the job to stop
            before=$signals code=0
            wait "${pids[$i]}" || code=$?
            ((signals != before)) || break
        done
        ((code == 0)) || { failed "${logs[$i]}" $code; status=$code; }
    done
    return $status
}

comparison() {
    local pids=()
    mkdir -p "$ROOT"
    queue 0 "$@" >"$ROOT/queue_1.log" 2>&1 &
    pids+=($! "$ROOT/queue_1.log")
    queue 1 "$@" >"$ROOT/queue_2.log" 2>&1 &
    pids+=($! "$ROOT/queue_2.log")
    wait_all "${pids[@]}" || return $?
    for family in "$@"; do run_logged "$ROOT/evaluate_$family.log" evaluate "$family"; done
}

# extra_stage FAMILY DIR NAME ROLE STEPS INIT GUIDE...: one stage outside the pipeline in DIR/NAME, the same
# schedule otherwise; skipped once trained
extra_stage() {
    local family=$1 dir=$2 name=$3 role=$4 steps=$5 init=$6 guides resume=()
    shift 6
    [ -f "$dir/$name/final.safetensors" ] && return 0
    [ -f "$dir/$name/state.pt" ] && resume=(--resume "$dir/$name")  # interrupted: go on (train never starts over a run)
    guides=$(printf '"%s", ' "$@")
    "$PY" -m training train --config "$(config "$family")" --run-dir "$dir/$name" "${resume[@]}" "${SCHEDULE[@]}" \
        --set stage.name="$name" --set stage.role="$role" --set stage.steps="$steps" \
        --set stage.init_from="\"$init\"" --set "stage.guides=[${guides%, }]"
}

# score DIR JSON STAGE...: the final checkpoints of those stages of DIR on cg-dev and rendered-val, with
# bicubic and Lanczos, into DIR/JSON
score() {
    local dir=$1 json=$2 stage checkpoints=()
    shift 2
    for stage in "$@"; do checkpoints+=(--checkpoint "$dir/$stage/final.safetensors"); done
    "$PY" -m training evaluate --sets cg-dev,rendered-val --json "$dir/$json" "${checkpoints[@]}"
}

# TAKDSR is discrete CF + TA and PISR' continuous CF without one; these are the other two corners, so the
# effect of the CF kind and of the TA can be told apart
cf_ta() {
    local family=$1 dir="$ROOT/$1"
    local teacher=$dir/teacher/final.safetensors continuous=$dir/teacher_continuous/final.safetensors
    extra_stage "$family" "$dir" student_discrete_no_ta student $STUDENT_STEPS "$teacher" "$teacher"
    extra_stage "$family" "$dir" ta_continuous ta $STUDENT_STEPS "$continuous" "$continuous"
    extra_stage "$family" "$dir" student_continuous_ta student $STUDENT_STEPS "$continuous" "$continuous" \
        "$dir/ta_continuous/final.safetensors"
    score "$dir" cf_ta_scores.json student_discrete_no_ta student_continuous_ta
}

# ship_pipeline FAMILY ARGS...: the pipeline of FAMILY's shipped set (its own TA and student schedule)
ship_pipeline() {
    local family=$1
    shift
    "$PY" -m training pipeline --config "$(config "$family")" --run-dir "$ROOT/${family}_ship" "${SCHEDULE[@]}" \
        --set experiment.ta_steps=$SHIPPED_TA_STEPS --set experiment.student_steps=$SHIPPED_STUDENT_STEPS "$@"
}
# ship_family FAMILY: train the chain and X_s, then score the chain with bicubic and Lanczos (results.json,
# report.md) and X_s (x_s_scores.json)
ship_family() {
    ship_pipeline "$1" --stages teacher,ta1,student_takdsr,student_alone
    ship_pipeline "$1" --set experiment.baselines=false
    score "$ROOT/$1_ship" x_s_scores.json student_alone
}
# ship_pisr_family FAMILY: PISR' beside the chain, its teacher 3,000 steps as the discrete one, its student
# SHIPPED_STUDENT_STEPS as the TAKDSR student and X_s, so the three students compare at one schedule
ship_pisr_family() {
    ship_pipeline "$1" --stages teacher_continuous,student_pisr
    score "$ROOT/$1_ship" pisr_scores.json teacher_continuous student_pisr
}
# teachers FAMILY STEPS: both teachers at STEPS steps in ROOT/FAMILY_teachers_STEPS, then teacher_scores.json
teachers() {
    local family=$1 steps=$2 dir="$ROOT/$1_teachers_$2" stage pids=()
    mkdir -p "$dir"
    for stage in teacher teacher_continuous; do
        "$PY" -m training pipeline --config "$(config "$family")" --run-dir "$dir" --stages "$stage" \
            "${SCHEDULE[@]}" --set experiment.teacher_steps="$steps" >"$dir/$stage.log" 2>&1 &
        pids+=($! "$dir/$stage.log")
    done
    wait_all "${pids[@]}" || return $?
    score "$dir" teacher_scores.json teacher teacher_continuous
}
# per_family FUNCTION FAMILY...: FUNCTION FAMILY for every family as parallel 1-thread queues, logs in ROOT
per_family() {
    local run=$1 family pids=()
    shift
    mkdir -p "$ROOT"
    for family in "$@"; do
        "$run" "$family" >"$ROOT/${run}_$family.log" 2>&1 &
        pids+=($! "$ROOT/${run}_$family.log")
    done
    wait_all "${pids[@]}"
}

# usage_error MESSAGE: refuse the command line before anything trains
usage_error() {
    echo "backbones_cpu: $*" >&2
    echo "usage: $0 [FAMILY...] | cf-ta FAMILY... | ship FAMILY... | ship-pisr FAMILY... | teachers FAMILY STEPS" >&2
    exit 2
}
# check_families FAMILY...: each a family with its config (training/configs/<family>_x2.toml), each named once
check_families() {
    local family seen=" " known=() file
    for file in training/configs/*_x2.toml; do
        file=${file##*/}
        known+=("${file%_x2.toml}")
    done
    for family in "$@"; do
        [[ $family =~ ^[A-Za-z0-9_]+$ && -f training/configs/${family}_x2.toml ]] ||
            usage_error "unknown family or mode '$family' (families: ${known[*]}; modes: cf-ta ship ship-pisr teachers)"
        [[ $seen != *" $family "* ]] || usage_error "family '$family' is named twice"
        seen+="$family "
    done
}

mode=${1:-}
if [[ $mode == cf-ta || $mode == ship || $mode == ship-pisr ]]; then
    shift
    (($#)) || usage_error "$mode needs at least one FAMILY (e.g. $mode rfdn pan)"
    check_families "$@"
    if [[ $mode == cf-ta ]]; then
        mkdir -p "$ROOT"
        for family in "$@"; do run_logged "$ROOT/cf_ta_$family.log" cf_ta "$family"; done
    elif [[ $mode == ship ]]; then
        per_family ship_family "$@"
    else
        per_family ship_pisr_family "$@"
    fi
elif [[ $mode == teachers ]]; then
    (($# == 3)) || usage_error "teachers needs FAMILY STEPS (e.g. teachers rfdn 6000)"
    check_families "$2"
    [[ $3 =~ ^[1-9][0-9]*$ ]] || usage_error "STEPS must be a whole number of steps > 0, not '$3'"
    teachers "$2" "$3"
else
    families=("$@")
    ((${#families[@]})) || families=(rfdn pan rlfn)
    check_families "${families[@]}"
    comparison "${families[@]}"
fi
