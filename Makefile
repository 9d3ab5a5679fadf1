# Everything a fresh machine needs is done by these targets: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# checkov (Kubernetes manifest scanner) pins packages torch and schemathesis need newer: its own venv.
CHECKOV_VENV := .venv-checkov
CHECKOV := $(CHECKOV_VENV)/bin/checkov
CHECKOV_VERSION := 3.3.30
DEMO_DIR := models/demo
DEMO_EVAL_DIR := models/demo-eval

.PHONY: install run test test-fast lock lint format bench bench-frontend bench-protocol bench-swap bench-precision bench-trust demo-model doctor wheelhouse docker-build docker-up docker-down clean

install: $(STAMP)

# Re-install only when the locked dependencies change. Every package comes from the lockfile, checked
# against its hashes (requirements/dev.lock: runtime + dev + demo); the project itself without deps.
$(STAMP): pyproject.toml requirements/dev.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/dev.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

# Regenerate the lockfiles from pyproject.toml's pins (pip-tools, in a venv of its own): the image
# installs requirements/runtime.lock, `make install` requirements/dev.lock.
PIP_TOOLS_VENV := .venv-pip-tools
PIP_COMPILE := $(PIP_TOOLS_VENV)/bin/pip-compile
LOCK_FLAGS := --quiet --generate-hashes --strip-extras --allow-unsafe --no-header --no-emit-index-url --no-emit-find-links
$(PIP_COMPILE):
	@test -x $(PIP_TOOLS_VENV)/bin/python || $(PYTHON) -m venv $(PIP_TOOLS_VENV)
	$(PIP_TOOLS_VENV)/bin/python -m pip install --quiet "pip-tools==7.7.0"

lock: $(PIP_COMPILE)
	$(PIP_COMPILE) $(LOCK_FLAGS) --output-file requirements/runtime.lock pyproject.toml
	$(PIP_COMPILE) $(LOCK_FLAGS) --extra dev --extra demo --output-file requirements/dev.lock pyproject.toml

demo-model: $(STAMP)
	$(BIN)/cat-breeds-api demo-model --output $(DEMO_DIR) --eval-output $(DEMO_EVAL_DIR)

# Serve API_CHECKPOINT_PATH (environment or .env); with none configured, the embedded demo model.
# Model settings left unset defer to what the checkpoint records (.env.example leaves them unset); for
# the demo, any an operator pinned in .env for their own model are set aside.
run: $(STAMP)
	@export MALLOC_ARENA_MAX=2; \
	if [ -z "$${API_CHECKPOINT_PATH:-}" ] && ! grep -Eqs '^[[:space:]]*API_CHECKPOINT_PATH=[^[:space:]]' .env; then \
		echo "no API_CHECKPOINT_PATH configured: serving the embedded demo model ($(DEMO_DIR))"; \
		$(BIN)/cat-breeds-api demo-model --output $(DEMO_DIR) --eval-output $(DEMO_EVAL_DIR) >/dev/null || exit 1; \
		export API_CHECKPOINT_PATH=$(DEMO_DIR) API_EVAL_DIR=$(DEMO_EVAL_DIR) API_MODEL_NAME= API_NUM_CLASSES= API_IMAGE_SIZE= API_CLASS_NAMES_PATH=; \
		exec $(BIN)/cat-breeds-api serve; \
	else \
		exec $(BIN)/cat-breeds-api serve; \
	fi

# Preflight for the Docker Compose deployment (Docker, NVIDIA runtime and driver, models folder, port).
doctor: $(STAMP)
	$(BIN)/cat-breeds-api doctor

# Wheels for an offline image build (docker/wheelhouse); make docker-build installs only those when present.
wheelhouse: $(STAMP)
	scripts/wheelhouse.sh

# GPU host: the base file; on a host without an NVIDIA GPU add COMPOSE_FILES="-f docker-compose.yml -f docker-compose.cpu.yml".
COMPOSE_FILES ?= -f docker-compose.yml
# With wheels in docker/wheelhouse (make wheelhouse) the build installs only those, served on loopback.
docker-build:
	$(PYTHON) scripts/with_wheelhouse.py docker compose $(COMPOSE_FILES) build

docker-up:
	docker compose $(COMPOSE_FILES) up -d --wait

docker-down:
	docker compose $(COMPOSE_FILES) down

# Throughput and latency vs the in-process ceiling (not part of `make test`): artifacts/bench/.
bench: $(STAMP)
	$(BIN)/python -m bench.run

# The front-end-bound scenario: no forward pass (API_RUNTIME=null), CPU per image per process.
# wrk drives these two (Debian's package; nothing else installs it)
NEED_WRK = @command -v wrk >/dev/null || { echo "$@ needs wrk, the HTTP load generator: apt-get install wrk"; exit 2; }

bench-frontend: $(STAMP)
	$(NEED_WRK)
	$(BIN)/python -m bench.frontend

# Front-end CPU per image by protocol (v1 multipart, v2 binary / JSON / batched / pixels) vs decode alone.
# Then the floor of one call over gRPC and over HTTP (echo servers): would gRPC pay?
bench-protocol: $(STAMP)
	$(NEED_WRK)
	$(BIN)/python -m bench.protocol
	$(BIN)/python -m bench.floors

# A resnet50 swapped under load (Gunicorn, 2 front-ends): answers, versions, latency before/during/after.
# Every runtime x precision measured as API_PRECISION=auto measures it (four models), and the resnet50
# service at INT8 against bf16 in one run: artifacts/bench/precision.json.
bench-precision: $(STAMP)
	$(BIN)/python -m bench.precision

bench-trust: $(STAMP)
	$(BIN)/python -m bench.trust

bench-swap: $(STAMP)
	$(BIN)/python -m bench.swap

lint: $(STAMP)
	$(BIN)/ruff check api tests bench scripts
	$(BIN)/ruff format --check api tests bench scripts
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format api tests bench scripts
	$(BIN)/ruff check --fix api tests bench scripts

$(CHECKOV):
	@test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet "checkov==$(CHECKOV_VERSION)"

test: lint $(CHECKOV)
	CHECKOV=$(CHECKOV) $(BIN)/python -m pytest

# Before every commit: lint, then the unit and API tiers (tiny models, a real server on 127.0.0.1).
test-fast: lint
	$(BIN)/python -m pytest -m "unit or api"

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) $(PIP_TOOLS_VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
