# Entry points (see README): `make lab`, `make study` and `make test`; each creates .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup lab study test bench clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[notebooks,test]"
	touch $(STAMP)

setup: $(STAMP)

# JupyterLab from the venv: its `python3` kernel is then the venv's interpreter, the one papermill
# and `cclnb study` use. Opens notebooks/explore.ipynb; LAB_ARGS adds options (e.g. --no-browser --port 8899).
lab: $(STAMP)
	$(PY) -m jupyterlab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks/explore.ipynb \
		$(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

study: $(STAMP)
	$(PY) -m cclnb study --preset demo
	@echo "Report: reports/demo/index.html"

test: $(STAMP)
	$(PY) -m pytest -n 2 tests

bench: $(STAMP)
	$(PY) -m cclnb bench --device cpu

clean-venv:
	rm -rf $(VENV)
