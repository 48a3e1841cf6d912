#!/usr/bin/env bash
# Every check that needs a CUDA GPU, as one command for a short device lease (docs/performance.md, issues 6, 10
# and 11): the GPU tests, the inference time of every shipped model at 960x540, the daemon end to end at 1920x1080
# with and without --overlap, and the backend table at 1920x1080 (eager and compiled fp16, plain and with the
# channels padded to a multiple of 8). Each part has its own time limit, so one slow part cannot eat the rest, and
# together they fit one device call (540 s of parts: run it with timeout_s=600). The results land in $OUT (default
# gpu_out/): machine.txt, checks.log and four JSON files (the device tool brings back 8 files at most).
#
#   here, once (needs PyPI):  bash scripts/gpu_checks.sh --download-wheels    # wheels the GPU image lacks -> .whl/
#   on the GPU machine:       bash scripts/gpu_checks.sh                      # carry .whl; uses python3 there
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
# What the project imports that the GPU image lacks (the device's KINDS.md lists what it has).
MISSING=(pyzmq==27.1.0 tomli-w==1.2.0)

if [[ "${1:-}" == "--download-wheels" ]]; then
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$p")
    done
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$WHEELS" "${MISSING[@]}"
fi

PY=${PYTHON:-python3}
OUT=${OUT:-gpu_out}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_checks: no CUDA device visible to $PY" >&2
    exit 2
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
# only the files that hold GPU tests: the others import what the image lacks (moderngl, glfw)
part tests 120 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_backends.py tests/test_server_engine.py \
    tests/test_server_lifecycle.py
part latency 60 "$PY" -m training latency models/weights/*.safetensors --device cuda --input 960x540 --repeats 20 \
    --json "$OUT/latency_cuda.json"
STUDENT=models/weights/rlfn_s_takdsr_x2.safetensors
part e2e 120 bash -c "$PY -m upscaler_server.bench --device cuda --checkpoint $STUDENT --sizes 1920x1080 \
    --frames 200 --budget 10 --json $OUT/e2e.json && $PY -m upscaler_server.bench --device cuda \
    --checkpoint $STUDENT --sizes 1920x1080 --frames 200 --budget 10 --overlap --json $OUT/e2e_overlap.json"
part backends 240 "$PY" -m upscaler_server.bench --device cuda --checkpoint "$STUDENT" --skip-e2e --sizes 1920x1080 \
    --backends eager-fp32,eager-fp16,eager-fp16-pad8,compile-fp16,compile-fp16-pad8 --json "$OUT/backends.json"
echo "gpu_checks: done; failed parts: ${failed[*]:-none}" | tee -a "$OUT/checks.log"
[[ ${#failed[@]} -eq 0 ]]
