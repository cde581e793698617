# `make run` and `make test` set everything up on a fresh machine: a .venv with this repository
# installed editable with its suite and test extras (pyproject.toml, via requirements.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_ARGS ?=
RUN_DIR := outputs/run/$(shell date +%Y-%m-%d_%H-%M-%S)

.PHONY: setup run test lint test-slow sweep pi-latency report clean

# `make report` reads one sweep, named by SWEEP: refused before anything is set up when it is missing.
ifneq ($(filter report,$(MAKECMDGOALS)),)
ifeq ($(strip $(SWEEP)),)
$(error make report needs SWEEP=<a sweep folder>, e.g. make report SWEEP=$(or $(lastword $(sort $(wildcard multirun/*/*))),multirun/<date>/<time>))
endif
endif

$(VENV)/.installed: requirements.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

setup: $(VENV)/.installed

run: setup  ## the main job: vanilla, WASI as the paper ran it and WASI alone fine-tuning the shipped model on digits, offline
	$(PY) train.py -m experiment=demo hydra.sweep.dir=$(RUN_DIR) $(RUN_ARGS)
	$(PY) -m experiments.report $(RUN_DIR) --out $(or $(REPORT_OUT),$(RUN_DIR)/report)

test: setup lint  ## lint, then the default (fast) test suite, two files at a time (pytest-xdist)
	$(PY) -m pytest -q -m "not slow" -n 2 --dist loadfile

lint: setup  ## ruff on everything, mypy on the library and the training loop's modules (pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test-slow: setup
	$(PY) -m pytest -q -m slow

sweep: setup  ## every method fine-tuning the shipped pretrained model on digits
	$(PY) train.py -m experiment=demo method=vanilla,lora,svd_llm,wsi,asi,wasi $(RUN_ARGS)

pi-latency: setup  ## training/inference latency, vanilla vs WASI at each epsilon (the benchmark's Raspberry Pi 5 preset)
	$(PY) -m experiments.bench --preset pi $(LATENCY_ARGS)

report: setup  ## Markdown table + PNG plots of a sweep's results.json files (SWEEP=multirun/<date>/<time>, required)
	$(PY) -m experiments.report $(SWEEP) $(REPORT_ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
