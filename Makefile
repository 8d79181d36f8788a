# ckapipe: everything runs inside its own virtual environment (.venv).
#   make extract analyze     run the default study (pipelines/default.yaml)
#   make test                the test suite (what CI runs); the model-source tests
#                            run again in .venv-extras, with torchvision, timm and transformers
#   make bench               benchmarks (in .venv-extras: torchvision's ResNets); ratios measured in one run
#   make submit              the same as SLURM jobs (ckapipe run PIPELINE --slurm)
#   make device-wheels       wheels for a GPU node's Python 3.12 (then: bash scripts/gpu_check.sh there)
# Another study:   make extract analyze PIPELINE=pipelines/examples/resnets-cifar10.yaml

PYTHON   ?= python3.11
VENV     ?= .venv
PIPELINE ?= pipelines/default.yaml
EXTRAS   ?= demo,cluster,test
PY       := $(VENV)/bin/python
CKAPIPE  := $(VENV)/bin/ckapipe
# torchvision needs torch 2.14.1 (a CUDA build, 5.5 GB, on disk here): it lives
# in a second environment so that the default install stays lean.
XVENV    ?= .venv-extras
XPY      := $(XVENV)/bin/python

.PHONY: install install-extras extract analyze submit test bench device-wheels clean

install: $(VENV)/.installed

install-extras: $(XVENV)/.installed

# torch==2.13.0 first: pip takes the CPU wheel that lies on disk, and the
# dependencies below then find torch satisfied instead of pulling a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check torch==2.13.0
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[$(EXTRAS)]'
	touch $@

$(XVENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(XVENV)
	$(XVENV)/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(XVENV)/bin/pip install -q --disable-pip-version-check -e '.[vision,hf,$(EXTRAS)]'
	touch $@

extract: install
	$(CKAPIPE) run $(PIPELINE) --stage extract

analyze: install
	$(CKAPIPE) run $(PIPELINE) --stage analyze

# On a SLURM cluster: the extraction job array, then the dependent analysis job.
submit: install
	$(CKAPIPE) run $(PIPELINE) --slurm

test: install install-extras
	$(PY) -m pytest -q
	$(XPY) -m pytest -q -m extras

bench: install-extras
	$(XPY) -m bench

# What a GPU node with CUDA, CuPy, torch and torchvision (Python 3.12) lacks, at
# the versions .venv-extras tests, as wheels in .whl/ for scripts/gpu_check.sh.
DEVICE_WHEELS := zarr|numcodecs|donfig|google-crc32c|dask|distributed|partd|locket|tblib|zict|tornado|torch-cka|ckatorch
device-wheels: install-extras
	$(XPY) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: -d .whl \
	  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
	  $$($(XPY) -m pip freeze | grep -i -E '^($(DEVICE_WHEELS))==')

clean:
	rm -rf cache results bench-results
