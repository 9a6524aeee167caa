# splicepool: every target runs inside .venv, which `make install` creates.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo lint soak bench profile clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The engine suite runs three times: worker threads, then (in a monkey-patched
# process) gevent worker greenlets, then gevent direct dispatch.
test: install
	$(PY) -m pytest -q
	SPLICEPOOL_TEST_BACKEND=gevent $(PY) -m pytest -q
	SPLICEPOOL_TEST_BACKEND=gevent-direct $(PY) -m pytest -q

demo: install
	$(PY) -m splicepool.demo

# ruff, then the module layering (the import contracts in pyproject.toml), then no module
# using another module's private names.
lint: install
	$(PY) -m ruff check splicepool tests examples tools
	$(VENV)/bin/lint-imports --no-logo
	$(PY) tools/check_private.py splicepool

soak: install
	SPLICEPOOL_SOAK=1 $(PY) -m pytest -q -m soak --timeout=1800

# splicepool's proxy against a direct connection, a thread and an asyncio relay, HAProxy
# (splicing and not), a Go relay and socat; then the SOCKS5 front door against pproxy (PyPI,
# the bench extra); then the HTTP/1.1 front door against HAProxy, nginx and an aiohttp proxy
# (aiohttp is in the bench extra). As root, compare.py --install-peers first installs with
# apt-get what is missing of haproxy socat iperf3 golang-go nginx-light wrk curl; elsewhere a
# peer that is missing is skipped with a line saying what to install.
bench: install
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/compare.py --install-peers $(BENCH_ARGS)
	$(PY) bench/socks_bench.py
	$(PY) bench/http_bench.py

# A py-spy flame graph of the proxy under a 1-stream bulk load.
profile: install
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) bench/compare.py --profile bench/results/profile.svg

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
