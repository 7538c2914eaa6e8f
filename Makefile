# PLM: the two set-up commands are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel of PyTorch (lies on this kind of machine's disk). GPU users: install their CUDA torch first.
TORCH_PIN ?= torch==2.13.0
DEMO_DIR ?= runs/demo
DEMO_USERS ?= 3000
DEMO_ARGS ?=
export WANDB_MODE ?= offline
export PYTHONHASHSEED ?= 0

.PHONY: install demo test test-fast lint bench-prep bench-model bench-export clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/plm-synth out=$(DEMO_DIR)/raw users=$(DEMO_USERS) seed=0 overwrite=true
	$(VENV)/bin/plm-pipeline raw=$(DEMO_DIR)/raw out=$(DEMO_DIR)/pipeline overwrite=true $(DEMO_ARGS)
	@echo "demo: report in $(DEMO_DIR)/pipeline/report/report.md;" \
		"embeddings in $(DEMO_DIR)/pipeline/embeddings; model in $(DEMO_DIR)/pipeline/train"

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check plm data_prep tests bench

bench-model: install
	$(VENV)/bin/pip install -q -e ".[bench]"
	$(PY) bench/model.py

bench-export: install
	$(PY) bench/export.py --data $(DEMO_DIR)/pipeline/prepared --ckpt $(DEMO_DIR)/pipeline/train/final.pt

bench-prep: install
	$(PY) bench/prep.py

clean:
	rm -rf runs .pytest_cache
