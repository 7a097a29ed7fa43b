# The two README commands: `make demo` and `make test`. Both create (or reuse)
# the local virtual environment in .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint benchmark benchmark-quick clean

venv: $(STAMP)

$(STAMP): pyproject.toml version
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of this exact version lies on the dev/CI machines' disk;
	# any other spec may pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: venv
	$(PY) -m bids_mcsr.demo --out demo

test: venv
	$(PY) -m pytest -q -n 2 --durations=15

lint: venv
	$(VENV)/bin/ruff check bids_mcsr tests benchmarks run.py
	$(VENV)/bin/ruff format --check bids_mcsr tests benchmarks run.py

benchmark: venv
	$(PY) -m bids_mcsr.benchmark

benchmark-quick: venv
	$(PY) -m bids_mcsr.benchmark --quick

clean:
	rm -rf demo build dist *.egg-info .pytest_cache
