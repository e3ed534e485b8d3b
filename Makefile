# Two entry points for a fresh machine with only python3: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PKI ?= .dev-pki
STATE ?= jobworker-state
LISTEN ?= tcp:8443:interface=127.0.0.1
STAMP := $(VENV)/.installed

.PHONY: run test soak lint bench clean install pki

install: $(STAMP)

# An editable install, plus a .pth file that puts the checkout itself on sys.path: twistd
# discovers dropins by scanning sys.path for twisted/plugins/, which an editable install's
# import hook does not provide.  (A plain `pip install .` ships the dropin and needs neither.)
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lint]'
	echo "$(CURDIR)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/jobworker-checkout.pth"
	touch $@

pki: $(PKI)/ca.pem

$(PKI)/ca.pem: | $(STAMP)
	$(VENV)/bin/jobworker-certs init $(PKI)
	$(VENV)/bin/jobworker-certs client $(PKI) admin --role admin
	$(VENV)/bin/jobworker-certs client $(PKI) alice --role user
	$(VENV)/bin/jobworker-certs client $(PKI) bob --role user
	$(VENV)/bin/jobworker-certs client $(PKI) auditor --role viewer

run: $(STAMP) $(PKI)/ca.pem
	$(VENV)/bin/twistd --nodaemon --pidfile= jobworker --pki $(PKI) --state-dir $(STATE) --listen $(LISTEN)

# The suite runs on TEST_WORKERS processes (pytest-xdist): most tests wait on real daemons
# and child processes, so two workers on two cores take about half the time of one.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

# The load tests' soak versions (marked soak: counts scaled up, minutes each), which
# make test leaves out; see docs/robustness.md.
soak: $(STAMP)
	$(PY) -m pytest --soak -m soak --durations=0 $(PYTEST_ARGS)

# ruff's settings are in pyproject.toml, import-linter's contracts (the layers) in setup.cfg.
lint: $(STAMP)
	$(VENV)/bin/ruff check jobworker tests bench twisted
	$(VENV)/bin/mypy jobworker
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[test,lint,bench]'
	$(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
