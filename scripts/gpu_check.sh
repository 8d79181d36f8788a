#!/bin/bash
# The GPU checks, on a machine with CUDA, CuPy, torch and torchvision but not
# the rest of ckapipe's needs (an offline GPU node with Python 3.12):
#
#   make device-wheels                 # where pip works: .whl/ gets zarr, dask, ... for CPython 3.12
#   bash scripts/gpu_check.sh [OUTDIR]   # on the GPU machine, in the repository root, with .whl/ copied
#
# installs the wheels into a private directory, prints the GPU, runs the CuPy
# tests (pytest -m gpu: the CuPy kernels and the analysis with --device cuda
# against NumPy) and the bench with --device cuda. BENCH_ARGS is passed to the
# bench (default: the reduced sizes, pieces G, M and W1-W4; "--full" for issue 5's
# sizes, "--only W1" for one piece). Everything lands in OUTDIR (default
# $OUT, else gpu-results/).
set -euo pipefail
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
site=${CKAPIPE_SITE:-/tmp/ckapipe-site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider -m gpu -rs 2>&1 | tee "$out/pytest-gpu.log"
python3 -m bench --device cuda --out "$out" ${BENCH_ARGS:---only G,M,W1,W2,W3,W4} 2>&1 | tee "$out/bench.log"
