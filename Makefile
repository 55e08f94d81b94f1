# OSCAR on Flower — the README's commands.
#   make demo   offline demo: 1 SuperLink + 3 SuperNodes on 127.0.0.1, tiny models, real MNIST digits
#   make test   the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch/torchvision pinned to the builds this project is tested with (CPU use here, any CUDA build on a GPU server).
TORCH  ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: venv system-packages demo test test-fast clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e ".[demo,test]"
	touch $(STAMP)

demo: venv
	$(PY) -m oscar_demo.demo --workdir demo

# iproute2 (network namespaces), docker-compose, docker.io and debootstrap (the compose federation), installed when root.
system-packages:
	bash scripts/install-system-packages.sh

# Two workers: the end-to-end tests wait on their Flower processes much of the time (pytest-xdist).
test: venv system-packages
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# Everything but the end-to-end runs with real Flower processes.
test-fast: venv
	$(PY) -m pytest -q -n 2 tests/unit

clean-demo:
	rm -rf demo
