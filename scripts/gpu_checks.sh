#!/usr/bin/env bash
# Every check that needs a CUDA GPU, as prepared parts of one command for a short device lease (docs/performance.md,
# docs/results.md; issues 6 and 11). Each part has its own time limit, so one slow part cannot eat the rest.
#   tests     (120 s) the GPU tests
#   latency    (60 s) the inference time of every shipped model at 960x540
#   e2e       (120 s) the daemon end to end at 1920x1080: its defaults, then its fastest (--overlap --map-slots;
#                     the transport table of each run gives the share of --map-slots alone)
#   backends  (240 s) the backend table at 1920x1080: eager and compiled fp16, each plain, with a CUDA graph per
#                     resolution, and with the graph and channels padded to 8 (one change per step)
#   students  (450 s) the three RLFN students retrained side by side at equal steps (scripts/matched_students.sh);
#                     needs data/povray carried (64 MiB in all) and the GL loaders of --download-wheels
# No PART runs tests, latency, e2e and backends (540 s: one device call with timeout_s=600). A lease of 15 minutes
# holds one such call, so `students latency` (510 s) is a call of its own. The results land in $OUT (default
# gpu_out/): machine.txt, checks.log and each part's files (the device tool brings back 8 files at most).
#
#   here, once (needs PyPI, Debian):  bash scripts/gpu_checks.sh --download-wheels  # -> .whl/ and .gl/
#   on the GPU machine:               bash scripts/gpu_checks.sh [PART...]           # carry .whl (.gl, data/povray)
source "$(dirname "$0")/lib/help.sh" "$@"
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
GL_DEBS=.gl
# What the project imports that the GPU image lacks (the device's KINDS.md lists what it has); moderngl and
# glcontext render the scene frames of the students part
MISSING=(pyzmq==27.1.0 tomli-w==1.2.0 moderngl==5.13.0 glcontext==3.1.0)
# The GL loaders (glvnd) the image lacks: the NVIDIA driver's EGL is reached through them (the device's README)
GL_LOADERS=(libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
DEFAULT_PARTS=(tests latency e2e backends)
# The backend table's rows: each one change from the row before it (graphs, then padding), for eager and compile
BACKEND_ROWS=eager-fp32,eager-fp16,eager-fp16-graphs,eager-fp16-pad8-graphs
BACKEND_ROWS+=,compile-fp16,compile-fp16-graphs,compile-fp16-pad8-graphs

download() {
    local platforms=() apt_opts=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64)
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
        manylinux1_x86_64; do
        platforms+=(--platform "$p")
    done
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$WHEELS" "${MISSING[@]}" || return 1
    mkdir -p "$GL_DEBS" /tmp/amd64/partial
    apt-get "${apt_opts[@]}" update -qq && (cd "$GL_DEBS" && apt-get "${apt_opts[@]}" download "${GL_LOADERS[@]}")
}

# The GL loaders carried in .gl, unpacked into / (the device's README: only these, nothing else there)
install_gl_loaders() {
    compgen -G "$GL_DEBS/*.deb" >/dev/null || return 0
    for deb in "$GL_DEBS"/*.deb; do dpkg -x "$deb" /; done
    ldconfig
    local vendor=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
    [[ -f $vendor ]] && export __EGL_VENDOR_LIBRARY_FILENAMES=${__EGL_VENDOR_LIBRARY_FILENAMES:-$vendor}
    return 0
}

if [[ "${1:-}" == "--download-wheels" ]]; then
    download
    exit
fi
parts=("$@")
[[ ${#parts[@]} -eq 0 ]] && parts=("${DEFAULT_PARTS[@]}")
for name in "${parts[@]}"; do
    [[ $name =~ ^(tests|latency|e2e|backends|students)$ ]] || {
        echo "gpu_checks: unknown part $name (parts: tests latency e2e backends students; --download-wheels; --help)" >&2
        exit 2
    }
done

PY=${PYTHON:-python3}
export PYTHON=$PY # the students part's scripts start their trainers with it
OUT=${OUT:-gpu_out}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# first: the carried wheels are for the GPU image's python and may not install anywhere else
if ! "$PY" -c "import torch" 2>/dev/null; then # a wrong interpreter was reported as "no CUDA device"
    echo "gpu_checks: $PY cannot import torch (on this project's machine set PYTHON=.venv/bin/python; on the GPU" \
        "machine its python3 has torch)" >&2
    exit 2
fi
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_checks: no CUDA device visible to $PY" >&2
    exit 2
fi
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
mkdir -p "$OUT"

failed=()
# part NAME SECONDS COMMAND...: run one part under a time limit; all output also goes to $OUT/checks.log
part() {
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    echo "== $name (limit ${limit}s)" | tee -a "$OUT/checks.log"
    timeout --signal=INT --kill-after=20 "$limit" "$@" >>"$OUT/checks.log" 2>&1 || failed+=("$name")
    echo "== $name: $((SECONDS - started)) s" | tee -a "$OUT/checks.log"
}

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; "$PY" -c \
    "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"; } >"$OUT/machine.txt" 2>&1
STUDENT=models/weights/rlfn_s_takdsr_x2.safetensors
for name in "${parts[@]}"; do
    case $name in
    tests) # only the files that hold GPU tests: the others import what the image lacks (glfw, imgui)
        part tests 120 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_backends.py \
            tests/test_server_engine.py tests/test_server_lifecycle.py tests/test_training_memory.py ;;
    latency)
        part latency 60 "$PY" -m training latency models/weights/*.safetensors --device cuda --input 960x540 \
            --repeats 20 --json "$OUT/latency_cuda.json" ;;
    e2e)
        part e2e 120 bash -c "$PY -m upscaler_server.bench --device cuda --checkpoint $STUDENT --sizes 1920x1080 \
            --frames 200 --budget 10 --json $OUT/e2e.json && $PY -m upscaler_server.bench --device cuda \
            --checkpoint $STUDENT --sizes 1920x1080 --frames 200 --budget 10 --overlap --map-slots \
            --json $OUT/e2e_overlap.json" ;;
    backends)
        part backends 240 "$PY" -m upscaler_server.bench --device cuda --checkpoint "$STUDENT" --skip-e2e \
            --sizes 1920x1080 --backends "$BACKEND_ROWS" \
            --json "$OUT/backends.json" ;;
    students) # equal steps: about the shipped TAKDSR student's 6,106; a run dir under runs/ resumes if carried
        install_gl_loaders
        part students 450 bash scripts/matched_students.sh runs/matched "$OUT" 6000 \
            --set runtime.workers=4 ;;
    esac
done
echo "gpu_checks: done; failed parts: ${failed[*]:-none}" | tee -a "$OUT/checks.log"
[[ ${#failed[@]} -eq 0 ]]
