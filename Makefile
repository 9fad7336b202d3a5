# Two entry points: `make demo` and `make test`. Each bootstraps what it needs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench clean sysdeps

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

# nftables/iproute2/iptables for the agent's real-dataplane tests; installed only when missing and root.
sysdeps:
	@if [ "$$(id -u)" = "0" ]; then \
	  missing=""; \
	  command -v nft >/dev/null || missing="$$missing nftables"; \
	  command -v ip >/dev/null || missing="$$missing iproute2"; \
	  command -v iptables-restore >/dev/null || missing="$$missing iptables"; \
	  command -v ipset >/dev/null || missing="$$missing ipset"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null; \
	  fi; \
	else echo "not root: skipping system packages (dataplane tests will skip)"; fi

demo: $(STAMP)
	$(BIN)/ringfence demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check layers agent functions tests

typecheck: $(STAMP)
	$(BIN)/mypy layers/core/ringfence agent/ringfence_agent

unit: $(STAMP) sysdeps
	$(BIN)/pytest -q

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/ringfence bench --workloads 10000

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
