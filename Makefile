# The two set-up commands: `make demo` (train on the embedded default) and `make test`.
# Each creates .venv and installs what it needs. torch is pinned in the same pip command so a CPU
# machine gets the local CPU build, never a multi-GB CUDA download.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
NPROC ?= 2

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q "$(TORCH)" -e '.[dev]'
	touch $@

.PHONY: demo test bench
demo: $(VENV)/.installed
	$(PY) -m tulu.demo --output_dir output/demo --nproc $(NPROC)

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/sft_throughput.py
	$(PY) benchmarks/weight_sync.py
	$(PY) benchmarks/verifiers.py
	$(PY) benchmarks/checkpoint.py
