# The README's commands. `make test` builds .venv from nothing (pip registry only) and runs the
# default test tier; `make test-slow` runs the slow tier (real launcher, longer training);
# `make demo` runs the whole cycle on tiny models.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-slow test-all lint demo demo-long clean-venv

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

test-all: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .

# The whole cycle on tiny models and shapes-world data, no GPU (tools/demo.py, docs/DEMO.md):
# 13-17 minutes on 2 CPU cores after the install; demo-long pretrains and trains longer (about 34).
demo: $(STAMP)
	$(PY) tools/demo.py

demo-long: $(STAMP)
	$(PY) tools/demo.py --long

clean-venv:
	rm -rf $(VENV)
