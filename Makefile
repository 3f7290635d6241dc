# The README's commands. `make test` builds .venv from nothing (pip registry only) and runs the
# default test tier; `make test-slow` runs the slow tier (real launcher, longer training).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-slow test-all lint demo clean-venv

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

demo:
	@echo "make demo arrives with the demo issue (#7); see README.md." && exit 1

clean-venv:
	rm -rf $(VENV)
