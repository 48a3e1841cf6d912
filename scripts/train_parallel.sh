#!/usr/bin/env bash
# Train several independent pipeline stages at once, one process each, on one GPU, each fitted into a
# wall-time budget (runtime.time_budget_s), or each for its configured steps with BUDGET_S 0. The small
# TAKDSR networks leave a GPU mostly idle, so independent stages (teacher, teacher_continuous,
# student_alone; then ta1, student_pisr) share it well.
#
#   scripts/train_parallel.sh CONFIG RUN_DIR BUDGET_S STAGE[,STAGE...] [--set KEY=VALUE ...]
#
# Each stage logs to RUN_DIR/<stage>.log. With a budget, a stage still running BUDGET_S + 90 s after it
# started is sent Ctrl-C (SIGINT): it saves its state and a later run resumes it. With BUDGET_S 0 the
# stages run their steps (the cosine over steps, so stages of equal steps get the same schedule) with
# no time limit of their own: the caller's Ctrl-C stops them the same way. Exits non-zero if any stage
# failed. Afterwards `python -m training pipeline --config CONFIG --run-dir RUN_DIR` trains what is
# left and evaluates everything (a stage stopped early resumes only with the same overrides: rerun its line).
set -uo pipefail

if [[ $# -lt 4 ]]; then
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
config=$1 run_dir=$2 budget=$3 stages=$4
shift 4
# PYTHON runs the trainers: by default the repository's .venv (scripts/setup.sh) when there is one, else python3
venv_python="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
[[ -x $venv_python ]] || venv_python=python3
python=${PYTHON:-$venv_python}
mkdir -p "$run_dir"

pids=()
names=()
limit=()
[[ $budget != 0 ]] && limit=(timeout --signal=INT --kill-after=60 "$((${budget%.*} + 90))")
for stage in ${stages//,/ }; do
    "${limit[@]}" "$python" -m training pipeline --config "$config" --run-dir "$run_dir" --stages "$stage" \
        --set "runtime.time_budget_s=$budget" --set runtime.progress=false "$@" \
        >"$run_dir/$stage.log" 2>&1 &
    pids+=($!)
    names+=("$stage")
done

status=0
for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then
        echo "${names[$i]}: done ($(tail -n 1 "$run_dir/${names[$i]}.log"))"
    else
        code=$?
        status=1
        echo "${names[$i]}: exit $code, last lines of $run_dir/${names[$i]}.log:"
        tail -n 5 "$run_dir/${names[$i]}.log"
    fi
done
exit $status
