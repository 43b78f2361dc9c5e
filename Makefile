# Fairlane developer loop. `make dev` and `make test` work on a fresh machine.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
BUF_VERSION := 1.61.0
BUF := .tools/node_modules/.bin/buf
# The contract as last released: `buf breaking` compares protos/ against it, so a break is
# a decision (`make proto-release` records it), never an accident.
PROTO_RELEASE := protos/release-image.json

.PHONY: install tools dev test lint fmt gen proto-release services pytest soak clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

install: $(STAMP) $(BUF)

# The real tools the deploy/ tests run (promtool, nginx, envoy, helm, ...): test-only.
tools: install
	scripts/install_deploy_tools.sh

gen: install
	$(BIN)/python scripts/gen_protos.py

# Makes the current protos the released contract (the baseline of `buf breaking`).
proto-release: install
	$(BUF) build --exclude-source-info -o '-#format=json' \
		| $(BIN)/python -m json.tool --indent 1 > $(PROTO_RELEASE)

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

lint: tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy services clients/fairlane tests scripts
	$(BUF) lint
	$(BUF) breaking --against $(PROTO_RELEASE)

services:
	scripts/ensure_services.sh

pytest: tools services
	$(BIN)/pytest -q

test: tools services lint pytest

# Long runs, not part of `make test`: the e2e workload matrix with SOAK_SCALE times the
# requests and a worker replica killed with SIGKILL halfway through each case, and the
# stateful lane test with SOAK_EXAMPLES examples. Add further long runs to SOAK_TESTS.
SOAK_SCALE ?= 10
SOAK_EXAMPLES ?= 200
SOAK_TESTS ?= tests/e2e/test_workload_matrix.py tests/integration/test_lane_stateful.py

soak: install services
	FAIRLANE_SOAK_SCALE=$(SOAK_SCALE) FAIRLANE_STATEFUL_EXAMPLES=$(SOAK_EXAMPLES) \
		$(BIN)/pytest $(SOAK_TESTS) -v -s --timeout=7200 -p no:cacheprovider

# Only Python is needed: embedded broker and SQLite, nothing else installed or started.
dev: $(STAMP)
	$(BIN)/fairlane dev --demo

clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache
