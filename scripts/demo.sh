#!/usr/bin/env bash
# The main job in one command, on a fresh Debian 12 machine or an installed one:
#   1. bash scripts/setup.sh (idempotent: Debian packages, .venv, PyTorch, the project);
#   2. the live demo with a daemon of its own (--spawn-server: the bundled student trained on natively rendered
#      LR, on the GPU if there is one, else on the CPU; in bf16 or fp16 where that is faster, measured once and cached:
#      the demo's --backend auto), stopped cleanly when the demo ends (Esc, Ctrl-C, SIGTERM or an error).
# With a display that answers ($DISPLAY, or $WAYLAND_DISPLAY through XWayland) the demo opens a window; without one
# (or when the variable names a display gone, as after a dropped ssh -X) it renders
# headless into demo_out/ (frames/*.png, demo.mp4, stats.json). Extra arguments pass through to the demo:
#   bash scripts/demo.sh --scene garden --lr 320x180
#   bash scripts/demo.sh --checkpoint runs/my_run/student.safetensors --device cpu
#   bash scripts/demo.sh --headless --frames 300 --out my_out
# Relative paths in the arguments (--out, --checkpoint) are taken from the folder it is run in, like demo_out/.
# Exit status: the demo's (docs/demo.md); 4 when the daemon cannot start (its log is printed).

# more_help: --help ends with the options the demo takes, once setup.sh has made .venv
more_help() {
    local python
    python="$(dirname "$0")/../.venv/bin/python"
    echo
    if [[ -x $python ]]; then
        echo "The demo's options (python -m client_demo --help):"
        "$python" -m client_demo --help
    else
        echo "The demo's options: run bash scripts/setup.sh, then .venv/bin/python -m client_demo --help"
    fi
}
source "$(dirname "$0")/lib/help.sh" "$@"
set -euo pipefail
unset CDPATH # an exported CDPATH would send the cd below elsewhere

repo=$(cd "$(dirname "$0")/.." && pwd)
(cd "$repo" && bash scripts/setup.sh)

mode=()
why_headless="no display"
if [[ -n "${DISPLAY:-}" || -n "${WAYLAND_DISPLAY:-}" ]]; then
    # a display variable left from a dropped ssh -X session (or a container) names no display: the window then
    # failed (status 5) where the demo should run headless; glfw's own probe, before any daemon starts
    if problem=$("$repo/.venv/bin/python" -c 'import sys
try:
    from client_demo.window import display_problem
    problem = display_problem()
except Exception as exc:  # glfw or imgui missing, or no library for a window
    problem = str(exc)
print(problem or "", end="")
sys.exit(1 if problem else 0)' 2>/dev/null); then
        why_headless=""
    else
        why_headless="DISPLAY=${DISPLAY:-} WAYLAND_DISPLAY=${WAYLAND_DISPLAY:-} reach no display (${problem:-no reason given})"
    fi
fi
if [[ -n "$why_headless" ]]; then
    mode=(--headless --out demo_out)
    echo "[demo] $why_headless: rendering headless (frames/*.png, demo.mp4, stats.json) into $PWD/demo_out/ unless --out says otherwise; the window's options (--exit-after, --max-fps, --screenshot-after) do not apply" >&2
fi
# Without an NVIDIA GPU the student runs on the CPU, which manages a few frames per second at 320x180 LR but
# not 640x360 (docs/demo.md has the numbers): start small there, unless "$@" names its own --lr.
lr=""
previous=""
for arg in "$@"; do
    [[ "$previous" == --lr ]] && lr=$arg
    [[ "$arg" == --lr=* ]] && lr=${arg#--lr=}
    previous=$arg
done
size=()
if ! { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; then
    if [[ -z "$lr" ]]; then
        lr=320x180
        size=(--lr "$lr")
    fi
    echo "[demo] no NVIDIA GPU: the student runs on the CPU; starting at --lr $lr" >&2
fi
exec "$repo/.venv/bin/python" -m client_demo --spawn-server "${mode[@]}" "${size[@]}" "$@"
