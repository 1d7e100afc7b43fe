# `make help` lists the targets. The everyday two: `make run` (Qwen2 recipe on the tiny preset) and `make test`.
# Each sets itself up on a fresh machine: a venv in .venv with torch==2.13.0 pinned (CPU build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmfab-installed
EXTRAS ?= train,kfp,deepspeed,dev
PYTEST_ARGS ?=
DOCKER ?= docker

.PHONY: help run test test-slow bench lint setup compile images deploy clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "torch==2.13.0" -e ".[$(EXTRAS)]"
	touch $(STAMP)

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z][a-z-]*:.*## / {printf "  %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(STAMP) ## create .venv and install llmfab into it (editable, with torch and kubectl)

run: $(STAMP) ## run the Qwen2 recipe on the tiny preset (MLflow: ./mlflow.db, store: ./llmfab-store)
	$(BIN)/llmfab run qwen2 --preset tiny

lint: $(STAMP) ## ruff check and ruff format --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) lint ## lint, then the test suite without the slow tests
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP) ## the slow tests
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

bench: $(STAMP) ## the benchmarks (JSON in benchmarks/results/latest.json)
	$(BIN)/python -m benchmarks

compile: $(STAMP) ## compile every family's pipeline and stage component to KFP YAML (pipelines/, components/)
	$(BIN)/llmfab compile-pipelines --root .

# The images' TARGET=IMAGE pairs, groups first so that the stage targets reuse their layers. Expanded into one
# `docker build` line per image, so that `make -n images` shows the real commands. $LLMFAB_IMAGE_REGISTRY and
# $LLMFAB_IMAGE_TAG rename the images (as they do for the compiled pipelines).
image_pairs = $(shell $(BIN)/llmfab images --plain | tr ' ' '=')
define build_image
$(DOCKER) build -f images/Dockerfile --target $(word 1,$(subst =, ,$(1))) -t $(word 2,$(subst =, ,$(1))) .

endef
build_images = $(if $(1),$(foreach pair,$(1),$(call build_image,$(pair))),$(error llmfab images listed none))

images: $(STAMP) ## build every image of images/Dockerfile (needs Docker with BuildKit)
	$(call build_images,$(image_pairs))

# infra/bootstrap.sh is the one deploy procedure: kind cluster, KFP, Trainer, the dev overlay's secrets, then
# `kubectl apply -k manifests/overlays/dev`; idempotent, and it loads the images `make images` built.
deploy: $(STAMP) ## create or reuse the kind cluster llmfab-dev and apply manifests/overlays/dev (with KFP, Trainer)
	infra/bootstrap.sh up

clean: ## remove .venv, ./llmfab-store and ./mlflow.db
	rm -rf $(VENV) llmfab-store mlflow.db .pytest_cache
