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
# no time limit of their own: the caller's Ctrl-C stops them the same way (this script passes a Ctrl-C or
# SIGTERM on to every trainer as one SIGINT, then exits 130 or 143). Exits non-zero if any stage failed.
# Afterwards `python -m training pipeline --config CONFIG --run-dir RUN_DIR` trains what is left and
# evaluates everything (a stage stopped early resumes only with the same overrides: rerun its line).
source "$(dirname "$0")/lib/help.sh" "$@"
set -uo pipefail

if [[ $# -lt 4 ]]; then
    usage_text
    exit 2
fi
config=$1 run_dir=$2 budget=$3 stages=$4
shift 4
usage_error() { echo "$(basename "$0"): $*" >&2; exit 2; }
# BUDGET_S: seconds >= 0 (runtime.time_budget_s is a float; timeout gets its whole seconds)
[[ $budget =~ ^[0-9]+(\.[0-9]+)?$ ]] ||
    usage_error "BUDGET_S must be a number of seconds >= 0 (0: no budget, each stage runs its steps), not '$budget'"
whole=$((10#${budget%.*}))  # 10#: a leading zero is no octal
[[ $budget == *.* ]] && budget=$whole.${budget#*.} || budget=$whole  # 0300 as 300: TOML has no leading zeros
[[ $budget =~ ^0(\.0+)?$ ]] && budget=0  # 0.0 is no budget either (timeout would stop it after 90 s)
# STAGE[,STAGE...]: empty names (a doubled or trailing comma) are left out; each stage once (two trainers in
# one stage folder would overwrite each other's state)
names=()
IFS=, read -r -a listed <<<"$stages"
for stage in "${listed[@]}"; do
    [[ -n $stage ]] || continue
    for seen in "${names[@]}"; do
        [[ $seen != "$stage" ]] || usage_error "stage '$stage' is listed twice in '$stages'"
    done
    names+=("$stage")
done
((${#names[@]})) || usage_error "no stage in '$stages' (STAGE[,STAGE...], e.g. teacher,student_alone)"
# PYTHON runs the trainers: by default the repository's .venv (scripts/setup.sh) when there is one, else python3
venv_python="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"
[[ -x $venv_python ]] || venv_python=python3
python=${PYTHON:-$venv_python}
mkdir -p "$run_dir" || exit 1

# Each trainer runs as a job of its own (set -m: a process group of its own), which a terminal's Ctrl-C does not
# reach. This script takes Ctrl-C, SIGTERM and SIGHUP and sends each trainer one SIGINT: it saves its state and
# stops (a second SIGINT would stop it at once, unsaved). With a budget, `timeout --foreground` passes that SIGINT
# on to its trainer alone, as it does its own at the budget's end (without --foreground it would signal the
# trainer and then its group: two SIGINTs).
limit=()
[[ $budget == 0 ]] || limit=(timeout --foreground --signal=INT --kill-after=60 "$((whole + 90))")
pids=()
stopped_by=0  # the signal that stopped the stages, 0 while none did
signals=0     # how many arrived: a wait they cut short is waited again
signalled=0   # how many of pids were sent the SIGINT
stop() {
    stopped_by=$1
    signals=$((signals + 1))
    signalled=${#pids[@]}
    ((signalled == 0)) || kill -INT "${pids[@]}" 2>/dev/null
}
trap 'stop 1' HUP  # a closed terminal: its hangup no longer reaches the trainers either
trap 'stop 2' INT
trap 'stop 15' TERM

for stage in "${names[@]}"; do
    ((stopped_by == 0)) || break
    set -m  # job control for this line: the trainer's job gets a process group of its own
    "${limit[@]}" "$python" -m training pipeline --config "$config" --run-dir "$run_dir" --stages "$stage" \
        --set "runtime.time_budget_s=$budget" --set runtime.progress=false "$@" \
        </dev/null >"$run_dir/$stage.log" 2>&1 &
    pids+=($!)
    set +m
done
# a signal between starting a trainer and noting its pid: that trainer has not been sent it
((stopped_by == 0 || signalled == ${#pids[@]})) || kill -INT "${pids[@]:signalled}" 2>/dev/null

status=0
for i in "${!pids[@]}"; do
    while true; do
        before=$signals
        wait "${pids[$i]}"
        code=$?
        ((signals != before)) || break  # else a signal cut the wait short: the trainer is still stopping
    done
    if ((code == 0 && stopped_by == 0)); then
        echo "${names[$i]}: done ($(tail -n 1 "$run_dir/${names[$i]}.log"))"
    elif ((code == 0)); then  # it had run its steps or budget when the signal came: not stopped early
        echo "${names[$i]}: done before the $(kill -l "$stopped_by") ($(tail -n 1 "$run_dir/${names[$i]}.log"))"
    else
        status=1
        echo "${names[$i]}: exit $code, last lines of $run_dir/${names[$i]}.log:"
        tail -n 5 "$run_dir/${names[$i]}.log"
    fi
done
for stage in "${names[@]:${#pids[@]}}"; do
    echo "$stage: not started ($(kill -l "$stopped_by"))"
done
((stopped_by == 0)) || exit $((128 + stopped_by))
exit $status
