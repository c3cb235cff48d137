# lightning-ood: `make demo` trains and evaluates the quickstart; `make test` runs the test suite.
# Both create (or reuse) the virtual environment in $(VENV) and install what is missing; a second run is fast.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST_DEB := /usr/share/datasets/fashion-mnist
DATA_ROOT ?= data
export WANDB_SILENT ?= true

.PHONY: help install lock fashion-mnist demo test lint format bench clean

help:
	@echo "make demo   - train + evaluate the quickstart classifier on the offline Fashion-MNIST benchmark"
	@echo "make test   - lint and run the test suite (CPU, no network)"
	@echo "make lint | format | bench | lock | clean"

# constraints.txt pins every dependency to the versions the documented numbers were produced with.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# Re-pin constraints.txt to what .venv has now (after an intended upgrade).
lock: $(STAMP)
	@{ head -2 constraints.txt; $(PY) -m pip freeze --exclude-editable | grep -v -i '^lightning[-_]ood'; } > constraints.txt.new
	@mv constraints.txt.new constraints.txt && echo "constraints.txt: $$(grep -vc '^#' constraints.txt) pins"

# Fashion-MNIST: the Debian package when apt is available, else torchvision's download into $(DATA_ROOT).
fashion-mnist: $(STAMP)
	@if [ -f $(FMNIST_DEB)/train-images-idx3-ubyte.gz ] || \
	    [ -f $(DATA_ROOT)/FashionMNIST/raw/train-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST: found"; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	     { apt-get install -y -q dataset-fashion-mnist || { apt-get update -q && apt-get install -y -q dataset-fashion-mnist; }; }; then \
	  echo "Fashion-MNIST: installed the Debian package dataset-fashion-mnist"; \
	else \
	  echo "Fashion-MNIST: downloading with torchvision into $(DATA_ROOT)/"; \
	  $(PY) -c "from torchvision.datasets import FashionMNIST as F; [F('$(DATA_ROOT)', train=t, download=True) for t in (True, False)]"; \
	fi

demo: $(STAMP) fashion-mnist
	$(PY) train.py --config configs/quickstart.yaml

test: $(STAMP) lint
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) benchmarks/eval_throughput.py

clean:
	rm -rf logs .pytest_cache .ruff_cache
