# `make run` and `make test` set everything up on a fresh machine: a .venv with this repository
# installed editable with its suite and test extras (pyproject.toml, via requirements.txt).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_ARGS ?= trainer.epochs=12 trainer.batch_size=64 optimizer.momentum=0.9

.PHONY: setup run test lint test-slow sweep pi-latency report clean

$(VENV)/.installed: requirements.txt pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

setup: $(VENV)/.installed

run: setup  ## the main job: fine-tune on the embedded default dataset, offline
	$(PY) train.py $(RUN_ARGS)

test: setup lint  ## lint, then the default (fast) test suite
	$(PY) -m pytest -q -m "not slow"

lint: setup  ## ruff on everything, mypy on the library
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test-slow: setup
	$(PY) -m pytest -q -m slow

sweep: setup  ## every method on the small model and embedded data
	$(PY) train.py -m method=vanilla,lora,svd_llm,wsi,asi,wasi $(RUN_ARGS)

pi-latency: setup  ## training/inference latency, vanilla vs WASI at each epsilon (Raspberry Pi 5 profile)
	$(PY) -m device.latency $(LATENCY_ARGS)

report: setup  ## Markdown table + PNG plots of a sweep's results.json files (SWEEP=multirun/<date>/<time>)
	$(PY) -m experiments.report $(or $(SWEEP),$(lastword $(sort $(wildcard multirun/*/*)))) $(REPORT_ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
