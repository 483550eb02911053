# Two commands do everything on a fresh machine:
#   make quickstart   set up, then run sweeps/quickstart.yaml (CPU, a few minutes)
#   make test         set up, then run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
SWEEP ?= sweeps/quickstart.yaml

.PHONY: setup quickstart test parity dashboard report check clean

setup: $(VENV)/.installed

# torch first, pinned: it resolves from the machine's local wheel cache; letting a dependency pull
# an unpinned torch would download a multi-GB build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $@

quickstart: setup
	$(PY) -m bench.run $(SWEEP)

test: setup
	$(PY) -m pytest -q

# Every official-code parity fixture, the heavy ones too (test runs those within its time budget).
parity: setup
	$(PY) -m bench.parity

dashboard: setup
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000 --workers 1

report: setup
	$(PY) -m bench.report $(SWEEP)

check: setup
	$(PY) -m bench.check --baseline reports/baselines/$(notdir $(basename $(SWEEP))).yaml $(SWEEP)

clean:
	rm -rf results mlartifacts mlflow.db .cache
