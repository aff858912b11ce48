# Sophia backbone: the two commands a new user needs are `make demo` and `make test`.
# Each creates the virtualenv and installs the project on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?= datasets/agent_runs
# The runtime dependencies install at the versions of the inference image's lock (`-c`), so `make test`
# tests what the images run and a new upstream release changes nothing until `make lock UPGRADE=1`.
LOCK   := deploy/requirements-inference.lock
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | cksum | cut -d' ' -f1)

# Quix Streams for bench/bench_processors.py, in a virtualenv of its own: it pins confluent-kafka < 2.13, the
# backbone runs 2.16. Not a dependency of the project; only bench/quix_count.py runs in it.
QUIX_VENV   ?= .venv-quix
QUIXSTREAMS ?= 3.28.1
QUIX_STAMP  := $(QUIX_VENV)/.installed-quixstreams-$(QUIXSTREAMS)

.PHONY: install demo test test-unit test-integration bench bench-tools bench-quix-venv chaos soak lint eval clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build of 2.13.0 is on this machine's disk (a bare `torch` would pull CUDA)
	$(BIN)/python -m pip install -q 'torch==2.13.0'
	$(BIN)/python -m pip install -q -e '.[dev,inference]' -c $(LOCK)
	rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/backbone demo --data $(DATA)

# make test runs the tests in TEST_WORKERS pytest-xdist workers (each with its own embedded stack; a test
# file's tests stay on one worker); most of the suite's time is waits (group joins, idle stops), not CPU.
# TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2

test: $(STAMP) promtool
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile tests

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest tests/integration tests/e2e

bench: $(STAMP) $(QUIX_STAMP) bench-tools
	$(BIN)/python -m bench

# ApacheBench (Debian's apache2-utils): the C load generator of bench/bench_ingest.py --ab
bench-tools:
	command -v ab >/dev/null || { \
	  SUDO=$$(command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends apache2-utils; }

# Quix Streams' own virtualenv (`make bench` makes it; bench/bench_processors.py skips its rows without it)
$(QUIX_STAMP):
	test -x $(QUIX_VENV)/bin/python || $(PYTHON) -m venv $(QUIX_VENV)
	$(QUIX_VENV)/bin/python -m pip install -q --disable-pip-version-check 'quixstreams==$(QUIXSTREAMS)'
	rm -f $(QUIX_VENV)/.installed-*; touch $@

bench-quix-venv: $(QUIX_STAMP)

# Faults (SIGKILL, SIGSTOP, PostgreSQL restarts) under a seeded workload, then the history checker; SEED=N to vary.
SEED ?= 1
soak: $(STAMP)
	$(BIN)/python bench/soak.py --minutes $(or $(MINUTES),10)

chaos: $(STAMP)
	$(BIN)/backbone chaos --profile full --seed $(SEED)

# ruff (lint + format), mypy (strict for core/ and streams/, overrides listed in pyproject.toml), the layer contract
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# Quality on real labelled data (../shared/data), one table per capability; each row also has --json.
SHARED ?= ../shared/data
eval: $(STAMP)
	$(BIN)/backbone eval healing --data $(SHARED)/agent_runs
	$(BIN)/backbone eval outage --data $(SHARED)/agent_runs
	$(BIN)/backbone eval incidents --data $(SHARED)/incidents/nezha
	$(BIN)/backbone eval anomalies --data $(SHARED)/anomaly/nab --leave-one-out
	$(BIN)/backbone eval links --slack $(SHARED)/chat_and_code/racket/slack_racket_general_2018.xml --commits $(SHARED)/chat_and_code/racket/racket_commits_2018.tsv
	$(BIN)/backbone routing fit-learner --data $(SHARED)/routing/mmlu --out .backbone/routing/learner
	$(BIN)/backbone routing eval-learner --router .backbone/routing/learner.npz --data $(SHARED)/routing/mmlu
	$(BIN)/backbone routing eval-learner --router .backbone/routing/learner.npz --data $(SHARED)/routing/mmlu --online

clean:
	rm -rf $(VENV) $(QUIX_VENV) .backbone .pytest_cache

# ---- production deployment (paste into the Makefile; see docs/PRODUCTION.md) ----------------------
# `make up` / `make down` need Docker Compose v2 and, for the gpu profile, the NVIDIA container toolkit.
COMPOSE ?= docker compose

.PHONY: up down images lock promtool test-deploy k8s-render

.env:
	cp example.env .env
	@echo "created .env from example.env: set the three passwords in it, then run make up again"; exit 1

up: .env
	$(COMPOSE) up -d --build --wait

down:
	$(COMPOSE) down

images:
	docker build -t sophia/backbone:0.1.0 .
	docker build -f deploy/docker/inference.Dockerfile -t sophia/backbone-inference:0.1.0 .

# Regenerate deploy/requirements*.lock (uv pip compile, pinned to the test venv's versions); with
# UPGRADE=1, the newest versions pyproject.toml allows (the next `make install` installs them).
lock: $(STAMP)
	VENV=$(VENV) UPGRADE=$(UPGRADE) deploy/lock.sh

# promtool for tests/deploy/test_prometheus*.py (Debian's `prometheus` package; CI runs on a fresh machine).
promtool:
	command -v promtool >/dev/null || { \
	  SUDO=$$(command -v sudo >/dev/null && [ "$$(id -u)" != 0 ] && echo sudo); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends prometheus; }

test-deploy: $(STAMP) promtool
	$(BIN)/python -m pytest tests/deploy

# Print the rendered Kubernetes manifests of an overlay (default: production).
OVERLAY ?= production
k8s-render: $(STAMP)
	$(BIN)/python deploy/k8s/render.py deploy/k8s/overlays/$(OVERLAY)
