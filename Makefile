# The two commands a newcomer needs: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test test-fast test-unit lint docker-check bench kafka-up kafka-down kafka-fetch schemas clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,demo]'
	@touch $(STAMP)

install: $(STAMP)

kafka-fetch:
	$(PYTHON) -m localkafka fetch

## Start the local Kafka broker (KRaft, 127.0.0.1:19092 or LOCALKAFKA_PORT); prints its bootstrap address.
kafka-up: kafka-fetch
	@$(PYTHON) -m localkafka up

kafka-down:
	@$(PYTHON) -m localkafka down

## The whole pipeline on a real broker: aggregator + 3 agent processes, live table, summary.
demo: install kafka-fetch
	$(PY) examples/fleet_demo.py

## Unit and integration tests. The fixture uses KAFKA_BOOTSTRAP_SERVERS, else starts (and stops) the local broker.
test: install kafka-fetch lint
	$(PY) -m pytest

## The quick loop: every test but those marked slow (rebalances, SIGKILL loops, the outage, TLS/SASL and ACL
## brokers of their own, the hostile table); same install and broker as `make test`, which runs everything.
test-fast: install kafka-fetch
	$(PY) -m pytest -m "not slow"

## ruff and mypy, as CI runs them.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

## The Dockerfile through hadolint, docker-compose.yml against the Compose Specification's JSON Schema
## (no Docker engine needed; tests/unit/test_compose.py runs both and more).
docker-check: install
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

test-unit: install
	$(PY) -m pytest tests/unit

## Every benchmark, its figures and plots in bench/results/ (<name>.json, <name>*.png); each starts its
## own broker unless KAFKA_BOOTSTRAP_SERVERS is set. Installs the bench extra (matplotlib) and the seed
## measured beside ours (with --no-deps: its metadata asks for the whole agent-framework meta-package).
BENCH_STAMP := $(VENV)/.bench-stamp
BENCHES := hot_path pipeline restore propagation overshoot lag_overshoot limits_catchup \
	rules_aggregator rules_catchup rules_hot_path $(if $(wildcard bench/decode.py),decode)

$(BENCH_STAMP): $(STAMP) pyproject.toml constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt -e '.[bench]'
	$(PY) -m pip install --quiet --no-deps azureaicommunity-agent-token-guard==0.1.0
	@touch $(BENCH_STAMP)

## `make bench BEFORE=<commit>`: pipeline, restore, propagation and overshoot also run that commit's code
## (a worktree in .cache/) side by side on the same broker: before/after figures from one run.
BEFORE ?=
BEFORE_TREE := $(CURDIR)/.cache/before-$(BEFORE)
before_args = $(if $(BEFORE),$(if $(filter pipeline restore,$(1)),--before $(BEFORE_TREE),$(if $(filter propagation overshoot,$(1)),--compare $(BEFORE_TREE))))

bench: $(BENCH_STAMP) kafka-fetch
	@set -e; if [ -n "$(BEFORE)" ] && [ ! -d "$(BEFORE_TREE)" ]; then git worktree add --detach "$(BEFORE_TREE)" "$(BEFORE)"; fi; \
	$(foreach name,$(BENCHES),echo "== bench/$(name).py $(call before_args,$(name))"; $(PY) bench/$(name).py $(call before_args,$(name));)

## Regenerate schemas/json/ from the pydantic models.
schemas: install
	$(PY) -m schemas.export

clean:
	-$(PYTHON) -m localkafka down
	rm -rf $(VENV) .cache .pytest_cache .hypothesis
