# ckapipe: everything runs inside its own virtual environment (.venv).
#   make extract analyze     run the default study (pipelines/default.yaml)
#   make test                the test suite (what CI runs); the model-source tests
#                            run again in .venv-extras, with torchvision, timm and transformers
#   make coverage            the same under coverage, subprocesses included: % per module
#   make bench               benchmarks (in .venv-extras: torchvision's ResNets); writes docs/benchmarks.md
#   make submit              the same as SLURM jobs (ckapipe run PIPELINE --slurm)
#   make device-wheels       wheels for a GPU node's Python 3.12 (then: bash scripts/gpu_check.sh there)
# Another study:   make extract analyze PIPELINE=pipelines/examples/resnets-cifar10.yaml
# Another Python:  make extract analyze PYTHON=python3.12

PYTHON   ?= python3
VENV     ?= .venv
PIPELINE ?= pipelines/default.yaml
EXTRAS   ?= demo                 # what running needs: torch and scikit-learn's digits
TEST_EXTRAS ?= demo,cluster,test # what the tests add
PY       := $(VENV)/bin/python
CKAPIPE  := $(VENV)/bin/ckapipe
# torchvision needs torch 2.14.1 (a CUDA build, 5.5 GB, on disk here): it lives
# in a second environment so that the default install stays lean.
XVENV    ?= .venv-extras
XPY      := $(XVENV)/bin/python
# torch 2.13.0's CPU wheel for Python 3.11 lies on this machine's disk; another
# Python downloads torch's CUDA build from PyPI (about 3 GB with its libraries).
TORCH    ?= torch==2.13.0

ifeq ($(filter clean,$(MAKECMDGOALS)),)
PYTHON_OK := $(shell $(PYTHON) -c 'import sys; print(int(sys.version_info >= (3, 11)))' 2>/dev/null)
ifneq ($(PYTHON_OK),1)
$(error $(PYTHON) is not Python 3.11 or newer: run make PYTHON=python3.11 (or 3.12, 3.13))
endif
endif

.PHONY: install install-test install-extras extract analyze submit test test-default test-extras coverage bench device-wheels clean

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

install-extras: $(XVENV)/.installed

# $(TORCH) first: pip takes the CPU wheel that lies on disk, and the
# dependencies below then find torch satisfied instead of pulling a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check $(TORCH)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[$(strip $(EXTRAS))]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[$(strip $(TEST_EXTRAS))]'
	touch $@

$(XVENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(XVENV)
	$(XVENV)/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(XVENV)/bin/pip install -q --disable-pip-version-check -e '.[vision,hf,$(strip $(TEST_EXTRAS))]'
	touch $@

# CACHE=DIR and RESULTS=DIR override the study file's directories.
STUDY_DIRS = $(if $(CACHE),--cache $(CACHE)) $(if $(RESULTS),--out $(RESULTS))

extract: install
	$(CKAPIPE) run $(PIPELINE) --stage extract $(STUDY_DIRS)

analyze: install
	$(CKAPIPE) run $(PIPELINE) --stage analyze $(STUDY_DIRS)

# On a SLURM cluster: the extraction job array, then the dependent analysis job.
submit: install
	$(CKAPIPE) run $(PIPELINE) --slurm $(STUDY_DIRS)

# Two environments; -rfEs prints the reason of every skip and names every failure. The
# default one runs everything but the extras and gpu tests, so a skip there is always worth
# reading; in .venv-extras the extras must import (CKAPIPE_REQUIRE_EXTRAS: a missing or
# broken torchvision fails, never skips).
# The default environment's tests run on TEST_WORKERS pytest-xdist processes (CI's 2 cores;
# most tests wait on a subprocess, a disk or a cluster, so two nearly halve the time), the
# slurm tests one after another on one of them, the default study built once for both.
PYTEST_DEFAULT := -m "not extras and not gpu"
PYTEST_EXTRAS  := -m extras
TEST_WORKERS ?= 2

test: test-default test-extras

test-default: install-test
	$(PY) -m pytest -q -rfEs -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_DEFAULT)

test-extras: install-extras
	CKAPIPE_REQUIRE_EXTRAS=1 $(XPY) -m pytest -q -rfEs $(PYTEST_EXTRAS)

# The same two runs under coverage (subprocesses too: [tool.coverage.run] patch = subprocess),
# combined: the percentage per module.
coverage: install-test install-extras
	rm -f .coverage .coverage.*
	COVERAGE_FILE=$(CURDIR)/.coverage $(PY) -m coverage run -m pytest -q -rfEs -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_DEFAULT)
	COVERAGE_FILE=$(CURDIR)/.coverage CKAPIPE_REQUIRE_EXTRAS=1 $(XPY) -m coverage run -m pytest -q -rfEs $(PYTEST_EXTRAS)
	$(PY) -m coverage combine -q
	$(PY) -m coverage report

bench: install-extras
	$(XPY) -m bench

# What a GPU node with CUDA, CuPy, torch and torchvision (Python 3.12) lacks, at
# the versions .venv-extras tests, as wheels in .whl/ for scripts/gpu_check.sh.
DEVICE_WHEELS := zarr|numcodecs|donfig|google-crc32c|dask|distributed|partd|locket|tblib|zict|tornado|torch-cka|ckatorch|pytorch-cka|pytest-timeout
device-wheels: install-extras
	$(XPY) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d .whl \
	  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
	  $$($(XPY) -m pip freeze | grep -i -E '^($(DEVICE_WHEELS))==')

clean:
	rm -rf cache results bench-results .coverage .coverage.*
