#!/usr/bin/env bash
# The GPU check (about 10 minutes on an H100/H200): resnet50 fp16, concurrency 64, against the
# in-process GPU ceiling. Run from the repository root on a machine with an NVIDIA GPU:
#   bench/gpu.sh            (creates .venv if needed; writes artifacts/bench-gpu/)
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { python3 -m venv .venv && .venv/bin/pip install -q -e ".[dev]"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
.venv/bin/python -m bench.run --device cuda --precision fp16 --max-batch-size 64 --concurrency 1,16,64 \
    --requests 512 --ceiling-images 512 --max-queue 256 --skip-extras --out artifacts/bench-gpu
