#!/usr/bin/env bash
# The GPU checks of issues 18 and 23 in one short script, for a lent accelerator machine (the `device` tool):
#   1. the device tests of the suite (the gradient methods on CUDA against the CPU; they skip where no GPU is),
#   2. benchmarks/bench_device.py: each torch path's answer on CUDA against the CPU's, the cost of `unrolled` for
#      digits (100 tests) and the facts language model (240 queries) on the GPU, and one linear_mom fit with its
#      conjugate-gradient solves on the GPU.
# Run from the repository root; needs a python with torch (CUDA), numpy, scipy, pandas, click, tqdm, threadpoolctl
# and pytest (the device machines' image has them). Logs go to $OUT (default /tmp/device-check). Takes ~5-8 min.
#   bash benchmarks/device_check.sh                # the fit at its default size (N=20,000, M=200, 64 x 500 x 16)
#   FIT_POINT="100000 1000 256 1000 32" bash benchmarks/device_check.sh      # issue 23's target size
set -uo pipefail
OUT="${OUT:-/tmp/device-check}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'torch sees no CUDA device')" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
status=0
timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_attribution_simulators.py -k device \
    2>&1 | tee "$OUT/tests.log" || status=1
# shellcheck disable=SC2086
timeout 420 "$PY" benchmarks/bench_device.py --device cuda ${FIT_POINT:+--fit-point $FIT_POINT} \
    2>&1 | tee "$OUT/bench_device.md" || status=1
exit $status
