#!/usr/bin/env bash
# The paper's backbone comparison of issue 10 (teacher -> TA -> TAKDSR student, PISR' student, X_s, with
# bicubic and Lanczos) on a 2-core CPU, for RFDN, PAN and RLFN, every family with its architecture from the
# paper's config (training/configs/<family>_x2.toml) and one reduced schedule that is the same for all of
# them: teachers (discrete and continuous CF) 3,000 steps, TAs and students 1,500 steps, batch 8 of 96 px HR
# patches, the data of the ablations (59 POV-Ray renders and 48 scene frames at 1280x720). Every model is
# trained from scratch here, the teachers included. Two queues of stages run as parallel 1-thread processes;
# a finished stage is skipped and an interrupted one resumed, so rerunning continues where it stopped.
#   usage: scripts/backbones_cpu.sh [RUN_ROOT] [FAMILY...]   (default runs/backbones, families rfdn pan rlfn)
# Each family's run folder then holds results.json and report.md (docs/ablations.md has the tables).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/backbones}
FAMILIES=(rfdn pan rlfn)
(($# > 1)) && FAMILIES=("${@:2}")
PY=${PYTHON:-.venv/bin/python}

# TOML inline tables must stay on one line
POVRAY='{kind="folder", path="data/povray", weight=1.0}'
SCENES='{kind="scenes", width=1280, height=720, supersample=2, frames_per_preset=12, cache_dir="data/scenes-cache", weight=1.0}'
SCHEDULE=(
    --set experiment.teacher_steps=3000 --set experiment.ta_steps=1500 --set experiment.student_steps=1500
    --set optim.batch_size=8 --set data.patch_size=96
    --set runtime.device=cpu --set runtime.amp=off --set runtime.workers=1 --set runtime.threads=1
    --set runtime.log_every=50 --set runtime.checkpoint_every=500 --set runtime.progress=false
    --set "data.sources=[$POVRAY, $SCENES]"
)

# stages FAMILY STAGE[,STAGE...]: train those stages of FAMILY's experiment (no evaluation)
stages() {
    "$PY" -m training pipeline --config "training/configs/$1_x2.toml" --run-dir "$ROOT/$1" --stages "$2" \
        "${SCHEDULE[@]}"
}
# evaluate FAMILY: score every stage with bicubic and Lanczos (cg-dev, rendered-val), results.json, report.md
evaluate() {
    "$PY" -m training pipeline --config "training/configs/$1_x2.toml" --run-dir "$ROOT/$1" "${SCHEDULE[@]}" \
        --set runtime.threads=2
}

# The two queues hold about the same work: one family's TAKDSR chain (teacher, TA, student) in one queue, its
# baselines (continuous teacher, PISR', X_s) in the other, alternating from family to family.
queue() {
    local index=$1 family
    for family in "${FAMILIES[@]}"; do
        if ((index % 2 == 0)); then stages "$family" teacher,ta1,student_takdsr
        else stages "$family" teacher_continuous,student_pisr,student_alone; fi
        index=$((index + 1))
    done
}

mkdir -p "$ROOT"
queue 0 >"$ROOT/queue_1.log" 2>&1 &
first=$!
queue 1 >"$ROOT/queue_2.log" 2>&1 &
second=$!
trap 'kill -INT $first $second 2>/dev/null' INT TERM
status=0
wait $first || status=$?
wait $second || status=$?
[ $status -eq 0 ] || exit $status
for family in "${FAMILIES[@]}"; do evaluate "$family" >"$ROOT/evaluate_$family.log" 2>&1; done
