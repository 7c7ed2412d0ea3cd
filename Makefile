# The two commands of the README: `make demo` and `make test`. Both build the environment first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# torch's CPU build; an unpinned torch pulls a multi-GB CUDA build. GPU hosts: TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test bench env services-check clean

env: $(STAMP) services-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[worker,test,demo,api]'
	touch $(STAMP)

# The tests and the demo start their own redis-server; install it when the machine lacks one.
services-check:
	@command -v redis-server >/dev/null || { echo "installing redis-server"; \
	  (apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) || \
	  { echo "redis-server is required: install it with your OS package manager"; exit 1; }; }
	@# The failover tests start sentinels as worker/dev/sentinel.py does: redis-sentinel, else redis-server --sentinel.
	@if command -v redis-sentinel >/dev/null; then echo "sentinel: $$(command -v redis-sentinel)"; \
	  elif command -v redis-server >/dev/null; then \
	  echo "sentinel: redis-sentinel not installed; the failover tests run redis-server --sentinel"; \
	  else echo "sentinel: unavailable (apt-get install redis-sentinel)"; fi

demo: env
	$(BIN)/vqa demo

test: env
	$(BIN)/python -m pytest

bench: env
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python -m bench
	$(BIN)/python -m bench.preprocess

clean:
	rm -rf $(VENV) models .demo
