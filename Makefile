# `make run` and `make test` bootstrap .venv on first use and whenever
# pyproject.toml changes, so a fresh clone needs only python3 and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# database servers the tests start on loopback ports (program:debian-package)
SERVERS := postgres:postgresql redis-server:redis-server
# test processes side by side: most tests wait on servers, subprocesses and
# timers, so three keep two cores busy (on 2026-12-07 three used 1.5 of the two
# and took 9.5 minutes where two took 13) (TEST_WORKERS=0: one process)
TEST_WORKERS ?= 3

.PHONY: run test bench screenshots clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/taskwatch --store sqlite:///.taskwatch/demo.db

test: $(STAMP)
	@[ -z "$(SERVERS)" ] || .ci/need $(SERVERS)
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS)

$(VENV)/.bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	touch $@

bench: $(VENV)/.bench
	$(PY) bench/throughput.py
	$(PY) bench/store.py
	$(PY) bench/start.py

screenshots: $(STAMP)
	$(PY) -m taskwatch.tui.screenshots screenshots

clean:
	rm -rf $(VENV) build *.egg-info
