# Two entry points (see README): `make study` and `make test`; both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup study test bench clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[notebooks,test]"
	touch $(STAMP)

setup: $(STAMP)

study: $(STAMP)
	$(PY) -m cclnb study --preset demo
	@echo "Report: reports/demo/index.html"

test: $(STAMP)
	$(PY) -m pytest -n 2 tests

bench: $(STAMP)
	$(PY) -m cclnb bench --device cpu

clean-venv:
	rm -rf $(VENV)
