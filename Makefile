# Two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: env demo test lint format bench clean

env: $(STAMP)

# torch==2.13.0 is installed first on machines without a CUDA GPU: an unpinned `torch` would pull
# several GB of CUDA packages, while the pinned CPU build installs in seconds.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >/dev/null 2>&1; then \
		$(PIP) install -q torch==2.13.0; \
	fi
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

# The founding report in miniature (configs/experiments/demo.yaml); a second run skips what is done.
demo: $(STAMP)
	$(PY) -m upcycle run configs/experiments/demo.yaml

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/finetune_eval.py
	$(PY) benchmarks/convert.py

clean:
	rm -rf $(VENV) demo-out .pytest_cache .ruff_cache
