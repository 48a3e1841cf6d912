#!/usr/bin/env bash
# Set up everything this project needs on a fresh Debian 12 machine, idempotently:
# Debian packages (Mesa EGL/llvmpipe for headless rendering, Xvfb, POV-Ray and its examples),
# a virtual environment in .venv, PyTorch (the CPU build unless an NVIDIA GPU is present) and the
# project with its Python dependencies. A second run only checks and returns in seconds; a .venv that came with a
# moved or copied project folder (its scripts name the old folder) is rebuilt.
#
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh --dev    # + test tools (pytest, ruff, scikit-image)
source "$(dirname "$0")/lib/help.sh" "$@"
set -euo pipefail
# Ctrl-C must stop the setup: bash would otherwise read an interrupted check (python exits 1 on SIGINT) as
# "not installed" and go on installing
trap 'log "interrupted"; exit 130' INT TERM
unset CDPATH # an exported CDPATH would send the cd below elsewhere

cd "$(dirname "$0")/.."
EXTRAS=""
case "$*" in
"") ;;
--dev) EXTRAS="[dev]" ;;
*) # a typo such as --devv would otherwise set up without the test tools, found only when pytest is missing
    echo "setup: unknown argument(s) '$*' (nothing, --dev, or --help)" >&2
    exit 2 ;;
esac
TORCH_VERSION="2.13.0"
# EGL/llvmpipe: headless rendering; xvfb: the demo window in tests; povray: training data; procps: pkill, with
# which scripts/ablations_cpu.sh passes a stop on to its trainers; the rest builds and checks the C client
APT_PACKAGES=(libegl1 libegl-mesa0 libgl1-mesa-dri libgles2 xvfb xauth povray povray-examples procps
    build-essential pkg-config libzmq3-dev libmsgpack-dev libpng-dev valgrind)
PIP=(.venv/bin/python -m pip) # not .venv/bin/pip: its first line names the folder the venv was made in

log() { printf '[setup] %s\n' "$*" >&2; }

install_debian_packages() {
    local missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    python3 -c "import ensurepip" 2>/dev/null || missing+=(python3-venv)
    [[ ${#missing[@]} -eq 0 ]] && return 0
    local sudo=""
    [[ $(id -u) -ne 0 ]] && sudo="sudo"
    log "installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

pick_python() {
    for candidate in python3.11 python3.12 python3.13 python3.10 python3; do
        if command -v "$candidate" >/dev/null &&
            "$candidate" -c "import sys; sys.exit(sys.version_info < (3, 10))" 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    log "Python >= 3.10 not found"
    return 1
}

venv_works() {
    [[ -x .venv/bin/python ]] && .venv/bin/python -m pip --version >/dev/null 2>&1
}

# The folder a venv was made for. A venv moved or copied with the project still runs, but its scripts' first lines
# and the project's editable install name the old folder: the copy ran the original's code, the moved one found no
# project. Recorded in .venv/.made-for; for a venv of an earlier setup.sh, the folder its activate script names.
venv_made_for() {
    if [[ -f .venv/.made-for ]]; then
        cat .venv/.made-for
        return
    fi
    local venv
    venv=$(sed -n 's/^ *VIRTUAL_ENV="\(.*\)\/\.venv"$/\1/p' .venv/bin/activate 2>/dev/null | head -n 1)
    if [[ -n "$venv" ]]; then realpath -m -- "$venv"; else echo "$here"; fi # -m: the old folder may be gone
}

has_nvidia_gpu() { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }

install_torch() {
    .venv/bin/python -c "import torch" 2>/dev/null && return 0
    local spec="torch==${TORCH_VERSION}" index=()
    if has_nvidia_gpu; then
        log "NVIDIA GPU found: installing torch ${TORCH_VERSION} (CUDA build)"
    else
        # Plain `torch` from PyPI is the multi-gigabyte CUDA build; without a GPU take the CPU one.
        log "no NVIDIA GPU: installing torch ${TORCH_VERSION} (CPU build)"
        spec+="+cpu"
        index=(--extra-index-url https://download.pytorch.org/whl/cpu)
    fi
    "${PIP[@]}" install -q --retries 1 "$spec" numpy "${index[@]}" # numpy too: torch warns at import without it
    if ! .venv/bin/python -c "import torch" 2>/dev/null; then # installed but broken: pip said "already satisfied"
        log "torch is installed but does not import: reinstalling it"
        "${PIP[@]}" install -q --retries 1 --force-reinstall --no-deps "$spec" "${index[@]}"
    fi
    .venv/bin/python -c "import torch" # still broken: stop here, with its error
}

install_project() {
    # Reinstall only when the dependency list changed (keeps a second run fast); a --dev install also serves a
    # runtime run, so switching between the demo and the tests installs nothing
    local hash
    hash=$(sha256sum pyproject.toml | cut -c1-16)
    [[ -f ".venv/.setup-${hash}${EXTRAS}" || -f ".venv/.setup-${hash}[dev]" ]] && return 0
    log "installing the project and its Python dependencies${EXTRAS}"
    "${PIP[@]}" install -q -e ".${EXTRAS}"
    rm -f .venv/.setup-*
    touch ".venv/.setup-${hash}${EXTRAS}"
}

install_debian_packages
here=$(pwd -P)
if venv_works && [[ "$(venv_made_for)" != "$here" ]]; then
    log ".venv was made for $(venv_made_for), not this folder (moved or copied): rebuilding it"
    rm -f .venv/bin/python # not venv_works any more: rebuilt whole below
fi
if ! venv_works; then
    log "creating .venv"
    "$(pick_python)" -m venv --clear .venv # --clear: a broken venv (its Python gone or moved) is rebuilt whole
    "${PIP[@]}" install -q --upgrade pip
fi
printf '%s\n' "$here" >.venv/.made-for
install_torch
install_project
summary=$(.venv/bin/python -c 'import sys, torch; print(f"Python {sys.version.split()[0]}, torch {torch.__version__}")')
log "ready: $summary"
