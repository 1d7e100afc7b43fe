# The two commands: `make run` (Qwen2 recipe on the tiny preset) and `make test`.
# Each sets itself up on a fresh machine: a venv in .venv with torch==2.13.0 pinned (CPU build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmfab-installed
EXTRAS ?= train,kfp,deepspeed,dev
PYTEST_ARGS ?=

.PHONY: run test test-slow bench lint setup clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.13.0" -e ".[$(EXTRAS)]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/llmfab run qwen2 --preset tiny

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) llmfab-store mlflow.db .pytest_cache
