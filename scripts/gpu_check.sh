#!/bin/bash
# The GPU checks, on a machine with CUDA, CuPy, torch and torchvision but not
# the rest of ckapipe's needs (an offline GPU node with Python 3.12):
#
#   make device-wheels                 # where pip works: .whl/ gets zarr, dask, ... for CPython 3.12
#   bash scripts/gpu_check.sh [OUTDIR]   # on the GPU machine, in the repository root, with .whl/ copied
#
# installs the wheels into a private directory, prints the GPU, runs every test marked gpu
# (CKAPIPE_REQUIRE_GPU: a missing GPU or CuPy fails them instead of skipping; the log goes to
# OUTDIR/pytest-gpu.log, its summary line here), then prints ONE table of every CUDA path against
# its CPU twin, max |difference| and time (tests/gpu_report.py: kernels, analysis --device cuda,
# measures, bootstrap, extraction's device Grams, fused compare; CI prints the same table through
# the CuPy stand-in, tests/fake_cupy.py), then the GPU rows of the bench. BENCH_ARGS is passed to the
# bench (default: the reduced sizes of pieces G, M, W1, F1, F3 and F5: ckapipe against the other CKA tools
# on the same workloads; "--full" for issue 5's sizes, "--only W1" for one piece). Everything lands in
# OUTDIR (default $OUT, else gpu-results/). The exit status is 1 when a test or a row failed.
set -euo pipefail
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
site=${CKAPIPE_SITE:-/tmp/ckapipe-site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
# Without an install, extract/, analyze/ and pipelines/ import as ckapipe.* the way the editable
# install maps them (scripts/sitecustomize.py: runs first in every Python process started here,
# Dask workers included).
cp scripts/sitecustomize.py "$site/sitecustomize.py"
export CKAPIPE_REPO="$PWD" PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch, cupy; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "| cupy", cupy.__version__)' | tee -a "$out/gpu.txt"
status=0
CKAPIPE_REQUIRE_GPU=1 python3 -m pytest -q -p no:cacheprovider -m gpu -rs > "$out/pytest-gpu.log" 2>&1 || status=1
echo "pytest -m gpu: $(tail -n 1 "$out/pytest-gpu.log") (log: $out/pytest-gpu.log)"
python3 -m tests.gpu_report 2>&1 | tee "$out/gpu-table.md" || status=1
python3 -m bench --device cuda --out "$out" ${BENCH_ARGS:---only G,M,W1,F1,F3,F5} 2>&1 | tee "$out/bench.log" || status=1
exit $status
