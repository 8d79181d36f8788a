#!/bin/bash
# The GPU checks, on a machine with CUDA, CuPy, torch and torchvision but not
# the rest of ckapipe's needs (an offline GPU node with Python 3.12):
#
#   make device-wheels                 # where pip works: .whl/ gets zarr, dask, ... for CPython 3.12
#   bash scripts/gpu_check.sh [OUTDIR]   # on the GPU machine, in the repository root, with .whl/ copied
#
# installs the wheels into a private directory, prints the GPU, runs every test
# marked gpu, each a CUDA path against its CPU twin: the CuPy kernels against
# NumPy (test_kernels.py), the analysis with --device cuda (test_analyze_engine.py),
# the extraction on CUDA with pinned copies and Grams filled on the device, and
# the fused compare (test_cuda.py); CKAPIPE_REQUIRE_GPU makes a missing GPU or
# CuPy fail them instead of skipping. Then the bench with --device cuda. BENCH_ARGS is passed to the
# bench (default: the reduced sizes, pieces G, M and W1-W4; "--full" for issue 5's
# sizes, "--only W1" for one piece). Everything lands in OUTDIR (default
# $OUT, else gpu-results/).
set -euo pipefail
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
site=${CKAPIPE_SITE:-/tmp/ckapipe-site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
# Without an install, extract/, analyze/ and pipelines/ import as ckapipe.* the way the editable
# install maps them: ckapipe's package path gets the repository root (sitecustomize runs first in
# every Python process started here, Dask workers included).
printf 'import ckapipe\nckapipe.__path__.append(%s)\n' "'$PWD'" > "$site/sitecustomize.py"
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch, cupy; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "| cupy", cupy.__version__)' | tee -a "$out/gpu.txt"
CKAPIPE_REQUIRE_GPU=1 python3 -m pytest -q -p no:cacheprovider -m gpu -rs 2>&1 | tee "$out/pytest-gpu.log"
python3 -m bench --device cuda --out "$out" ${BENCH_ARGS:---only G,M,W1,W2,W3,W4} 2>&1 | tee "$out/bench.log"
