# The README's commands. `make test` builds .venv from nothing (pip registry only) and runs the
# default test tier; `make test-slow` runs the slow tier (real launcher, longer training);
# `make demo` runs the whole cycle on tiny models. The default tier includes the web demo's
# browser test (tests/test_app_browser.py), which drives Debian's Chromium: `make test` installs
# it when missing and run as root, else that test skips and says why.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the SAM 2 tests' oracle (see requirements-test.txt)
SAM2_ORACLE := sam2==1.1.0
CHROMIUM := /usr/bin/chromium
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends

.PHONY: test test-slow test-all lint demo demo-long demo-assets clean-venv browser

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	SAM2_BUILD_CUDA=0 $(PY) -m pip install -q --no-deps --no-build-isolation $(SAM2_ORACLE)
	touch $(STAMP)

browser:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    $(APT_INSTALL) chromium || { apt-get update -q && $(APT_INSTALL) chromium; } || \
	      echo "make browser: apt-get could not install chromium; the browser test will skip"; \
	  else \
	    echo "make browser: $(CHROMIUM) is missing and this is not root; the browser test will" \
	      "skip (install it with: sudo apt-get install --no-install-recommends chromium)"; \
	  fi; \
	fi

test: $(STAMP) browser
	$(PY) -m pytest -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

test-all: $(STAMP) browser
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .

# The whole cycle on tiny models and shapes-world data, no GPU (tools/demo.py, docs/DEMO.md),
# starting from the pretrained tiny base models in demo_assets/; demo-long trains longer (4 epochs
# of 800 steps instead of 3 of 600); demo-assets rewrites demo_assets/ (the pretraining alone,
# about 30 minutes).
demo: $(STAMP)
	$(PY) tools/demo.py

demo-long: $(STAMP)
	$(PY) tools/demo.py --long

demo-assets: $(STAMP)
	$(PY) tools/demo.py --base_models

clean-venv:
	rm -rf $(VENV)
