# Two entry points: `make demo` and `make test`. Each bootstraps what it needs.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: bytecode vendor-check map-bench lock demo test lint typecheck unit bench clean sysdeps static-aws bench-aws openapi agent-artifact

# checkov pins heavy dependencies that fight moto/boto3: it lives in its own venv
CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed

LOCK := requirements/dev.lock

# The venv holds exactly the lock (hash-checked), then this project without its dependencies,
# built by the locked setuptools: a fresh clone months from now installs the same thing.
$(STAMP): $(LOCK) pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes -r $(LOCK)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=compat
	@# compat mode's .pth names the project root; name the two package roots instead. The default
	@# (finder) mode imports pathlib and importlib.util at every start: ~10 ms per process, for each
	@# CLI call and each lab agent (docs/benchmarks.md).
	for pth in "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"/__editable__.ringfence-*.pth; do \
	  printf '%s\n' "$(CURDIR)/layers/core" "$(CURDIR)/agent" > "$$pth"; done
	@touch $(STAMP)

# Refresh the lock from pyproject.toml (newest versions that fit), with hashes for every platform.
UV_VERSION := 0.13.8
lock:
	@test -x .venv-lock/bin/uv || ($(PY) -m venv .venv-lock && .venv-lock/bin/pip install -q 'uv==$(UV_VERSION)')
	.venv-lock/bin/uv pip compile pyproject.toml --extra dev --generate-hashes --universal \
	  --python-version 3.11 --custom-compile-command "make lock" -o $(LOCK)
	.venv-lock/bin/uv pip compile requirements/checkov.in --generate-hashes --universal \
	  --python-version 3.11 --custom-compile-command "make lock" -o requirements/checkov.lock

# chromium + chromium-driver: the dependency map's browser tests (tests/viz), driven offline by selenium.
# nftables/iproute2/iptables/ipset/conntrack for the agent's real-dataplane tests (conntrack: the
# agent lists connections with it where /proc/net/nf_conntrack is absent); only when missing and root.
sysdeps:
	@if [ "$$(id -u)" = "0" ]; then \
	  missing=""; \
	  command -v nft >/dev/null || missing="$$missing nftables"; \
	  command -v ip >/dev/null || missing="$$missing iproute2"; \
	  command -v iptables-restore >/dev/null || missing="$$missing iptables"; \
	  command -v ipset >/dev/null || missing="$$missing ipset"; \
	  command -v conntrack >/dev/null || missing="$$missing conntrack"; \
	  test -x /usr/bin/chromium || missing="$$missing chromium"; \
	  test -x /usr/bin/chromedriver || missing="$$missing chromium-driver"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null; \
	  fi; \
	else echo "not root: skipping system packages (dataplane tests will skip)"; fi

demo: $(STAMP) sysdeps bytecode
	$(BIN)/ringfence demo

# Our modules' bytecode, compiled ahead: where PYTHONDONTWRITEBYTECODE is set (this image, many
# containers) Python never caches it and compiled every module from source at every start: ~20 ms
# per agent and per CLI call. Only changed files are compiled again.
bytecode: $(STAMP)
	@$(BIN)/python -m compileall -q -j 0 layers/core/ringfence agent/ringfence_agent functions

# docs/openapi/*.json from the routes (tests/test_openapi_docs.py fails when they are stale)
openapi: $(STAMP)
	$(BIN)/python -m ringfence.routes.openapi docs/openapi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check layers agent functions tests

typecheck: $(STAMP)
	$(BIN)/mypy layers/core/ringfence agent/ringfence_agent

# four workers (pytest-xdist) on CI's 2 cores: much of the suite waits on subprocesses, the
# kernel and moto rather than computing (two workers kept the cores 68 % busy; three, 84 %: the
# suite in 19 min 35 s; four, 92 %: 18 min 9 s, on this project's 2-core machine). Tests are spread
# one at a time (loadgroup: a test marked xdist_group stays on one worker with the others of its
# group). PYTEST_WORKERS=0 runs serially.
PYTEST_WORKERS ?= 4
unit: $(STAMP) sysdeps bytecode
	$(BIN)/pytest -q --durations=30 -n $(PYTEST_WORKERS) --dist loadgroup

$(CHECKOV_STAMP): requirements/checkov.lock
	@test -x $(CHECKOV_VENV)/bin/python || $(PY) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q --require-hashes -r requirements/checkov.lock
	@touch $(CHECKOV_STAMP)

# AWS deployment artifacts: cfn-lint (errors fail) and checkov (any failed check fails; accepted
# findings are skipped inline with a reason, see docs/deploy-aws.md)
static-aws: $(STAMP) $(CHECKOV_STAMP)
	$(BIN)/cfn-lint --non-zero-exit-code error template.yaml
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --skip-download --framework cloudformation -f template.yaml
	$(BIN)/cfn-lint --non-zero-exit-code error infra/guardrails/label-guard.yaml
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --skip-download --framework cloudformation -f infra/guardrails/label-guard.yaml
	$(CHECKOV_VENV)/bin/checkov --quiet --compact --skip-download --framework terraform -d infra
	@if command -v terraform >/dev/null; then terraform fmt -check -recursive infra; \
	  else echo "terraform not installed: skipping terraform fmt -check"; fi

test: lint typecheck static-aws unit

# the agent alone, hash-pinned, for install.sh (docs/agent.md, Install)
agent-artifact: $(STAMP)
	$(BIN)/python agent/packaging/build_artifact.py build/agent

# the map's vendored JavaScript (layers/core/ringfence/viz/vendor): re-fetched from the npm registry
# and checked against the sha256 sums in VERSIONS
vendor-check:
	layers/core/ringfence/viz/vendor/fetch.sh

# the dependency map of 2,000 app groups loaded in headless Chromium (docs/benchmarks.md)
map-bench: $(STAMP) sysdeps
	$(BIN)/python -m tests.bench.map_bench --groups 2000

bench-aws: $(STAMP)
	$(BIN)/python -m tests.aws.bench_storm --instances 500

bench: $(STAMP) bytecode
	$(BIN)/ringfence bench --workloads 10000

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .venv-lock .mypy_cache .pytest_cache .ruff_cache
