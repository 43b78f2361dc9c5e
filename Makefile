# Fairlane developer loop. `make dev` and `make test` work on a fresh machine.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml clients/pyproject.toml | sha1sum | cut -c1-12)
BUF_VERSION := 1.61.0
BUF := .tools/node_modules/.bin/buf
# The contract as last released: `buf breaking` compares protos/ against it, so a break is
# a decision (`make proto-release` records it), never an accident.
PROTO_RELEASE := protos/release-image.json
# The TypeScript client: its npm packages (tsc, biome, buf, protoc-gen-es) install from its lock.
TS := clients/typescript
TS_STAMP := $(TS)/node_modules/.installed-$(shell sha1sum < $(TS)/package-lock.json | cut -c1-12)

.PHONY: install tools dev test lint fmt gen proto-release services pytest tstest soak clean

# Both distributions, editable: the client (clients/, with its CLI extra) and the server,
# which depends on it (pip takes the client from here, not from an index).
$(STAMP): pyproject.toml clients/pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/pip install -q --disable-pip-version-check -e './clients[cli]' -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

$(BUF):
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

$(TS_STAMP): $(TS)/package-lock.json
	cd $(TS) && npm ci --silent --no-audit --no-fund
	rm -f $(TS)/node_modules/.installed-* && touch $@

install: $(STAMP) $(BUF) $(TS_STAMP)

# The real tools the deploy/ tests run (promtool, nginx, envoy, helm, ...): test-only.
tools: install
	scripts/install_deploy_tools.sh

gen: install
	$(BIN)/python scripts/gen_protos.py
	cd $(TS) && npm run --silent generate

# Makes the current protos the released contract (the baseline of `buf breaking`).
proto-release: install
	$(BUF) build --exclude-source-info -o '-#format=json' \
		| $(BIN)/python -m json.tool --indent 1 > $(PROTO_RELEASE)

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	cd $(TS) && npm run --silent format

lint: tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy fairlane_server clients/fairlane tests scripts
	$(BUF) lint
	$(BUF) breaking --against $(PROTO_RELEASE)
	cd $(TS) && npm run --silent check

services:
	scripts/ensure_services.sh

pytest: tools services
	$(BIN)/pytest -q --durations=15

# The TypeScript unit tests; its end-to-end tests run in pytest (tests/e2e), on real services.
tstest: install
	cd $(TS) && npm test

test: tools services lint tstest pytest

# Long runs, not part of `make test`: the e2e workload matrix with SOAK_SCALE times the
# requests and a worker replica killed with SIGKILL halfway through each case, and every
# drill on the throw-away 3-node RabbitMQ cluster (make test runs only its leader kill).
# Tests that read FAIRLANE_STATEFUL_EXAMPLES run SOAK_EXAMPLES examples. The fuzz test
# (tests/e2e/test_fuzz.py) sends SOAK_FUZZ_PER_RPC inputs to every RPC. Add long runs to
# SOAK_TESTS.
SOAK_SCALE ?= 10
SOAK_EXAMPLES ?= 200
SOAK_FUZZ_PER_RPC ?= 5000
SOAK_TESTS ?= tests/e2e/test_workload_matrix.py tests/e2e/test_cluster_drills.py \
	tests/e2e/test_rebalance.py tests/e2e/test_fuzz.py tests/integration/test_lane_stateful.py

soak: install services
	FAIRLANE_SOAK_SCALE=$(SOAK_SCALE) FAIRLANE_STATEFUL_EXAMPLES=$(SOAK_EXAMPLES) \
		FAIRLANE_FUZZ_PER_RPC=$(SOAK_FUZZ_PER_RPC) \
		$(BIN)/pytest $(SOAK_TESTS) -v -s --timeout=7200 -p no:cacheprovider

# Only Python is needed: embedded broker and SQLite, nothing else installed or started.
dev: $(STAMP)
	$(BIN)/fairlane dev --demo

clean:
	rm -rf $(VENV) .tools .mypy_cache .ruff_cache .pytest_cache $(TS)/node_modules $(TS)/dist
