#!/usr/bin/env bash
# The GPU check (about 6 minutes on an H100/H200). Run from the repository root on an NVIDIA GPU machine:
#   bench/gpu.sh                                  (creates .venv if needed; writes artifacts/bench-gpu/)
#   PYTHON=python3 OUT_DIR=/some/dir bench/gpu.sh  (an interpreter that already has the dependencies)
# 1. tests/gpu: fp16/bf16 against fp32, padded batches, torch.compile and the service, on the GPU;
# 2. resnet50 fp16, one worker batching up to 64, concurrency 1/16/64, against the in-process GPU ceiling;
# 3. the same at concurrency 64 with the eager forward pass (API_CUDA_GRAPHS=false), for comparison;
# 4. the same at concurrency 64 with WORKERS (default: the CPUs less 2) front-ends and one engine
#    process, for both photos (451x300 with resize on the GPU, 1600x1066);
# 5. model-only resnet50 at batch 64/128/256, NCHW and channels_last, eager and CUDA graphs;
# 6. the front-end bench (null model): CPU per image per process, the engine loop's ceiling;
# 7. the front-end layout on this host: resnet50 fp16 on the GPU behind 1, 4, 8 and 15 front-ends (one
#    engine), 451x300 and 1600x1066 JPEGs, front-end and engine CPU per image from /proc.
# Every step runs even if one before it failed; the exit status is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-artifacts/bench-gpu}
if [ -z "${PYTHON:-}" ]; then
    [ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -e ".[dev]"; } || exit
    PYTHON=.venv/bin/python
fi
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit
status=0
step() { echo "== $*"; "$@" || { rc=$?; echo "== failed ($rc): $*"; [ "$status" -ne 0 ] || status=$rc; }; }
common=(--device cuda --precision fp16 --max-batch-size 64 --requests 1024 --ceiling-images 512 --max-queue 256
        --images chelsea_451x300 --skip-extras)
step "$PYTHON" -m pytest tests/gpu -q -p no:cacheprovider -W default --junit-xml "$OUT_DIR/tests.xml"
step "$PYTHON" -m bench.run "${common[@]}" --concurrency 1,16,64 --out "$OUT_DIR/one-worker"
step "$PYTHON" -m bench.run "${common[@]}" --concurrency 64 --server-env API_CUDA_GRAPHS=false --out "$OUT_DIR/eager"
workers=${WORKERS:-$(( $(nproc) > 3 ? $(nproc) - 2 : 1 ))}
step "$PYTHON" -m bench.run "${common[@]}" --concurrency 64,256 --workers "$workers" --max-batch-size 128 \
    --images chelsea_451x300,photo_1600x1066 --out "$OUT_DIR/frontends"
step "$PYTHON" -m bench.model_only
step "$PYTHON" -m bench.frontend --seconds 5 --skip-breakdown
step "$PYTHON" -m bench.frontend --seconds 8 --skip-breakdown --frontends 1,4,8,15 \
    --model API_DEVICE=cuda,API_PRECISION=fp16
exit $status
