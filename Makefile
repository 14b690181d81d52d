# saelib: the two commands a newcomer needs are `make run` and `make test` (see README.md).
PY      := .venv/bin/python
STAMP   := .venv/.saelib-installed
PARAMS  ?= params/default/topk_s0.yaml
NOTEBOOKS := notebooks/train.ipynb notebooks/evaluate.ipynb notebooks/compare.ipynb notebooks/competition.ipynb
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup model run run-one study smoke test test-fast sync lab

## setup: local .venv with the pinned stack (idempotent: re-runs only when pyproject.toml changes)
setup: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the local CPU wheel, so nothing pulls a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# sae-bench declares torchvision but never imports it; PyPI's build breaks transformers next to CPU torch
	$(PY) -m pip uninstall -q -y torchvision || true
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

## model: convert the embedded Gemma 3 270M once into the float32 cache ($$SAELIB_CACHE or ~/.cache/saelib)
model: setup
	$(PY) -m saelib.models

## run: the whole default study on the embedded model, offline: 23 runs of 16,384-latent SAEs (≈ 7.5 h on 2 cores)
## through the train and evaluate notebooks, then compare/competition reports, reports/default/ (index.html, answers.md)
run: model
	$(PY) -m saelib.study params/default

## run-one: one run of the default study (cache, SAE, core eval, HTML report; ≈ 10 min): PARAMS=params/default/topk_s0.yaml
run-one: model
	$(PY) -m saelib.notebook notebooks/train.ipynb $(PARAMS)

## study: every run of params/$(STUDY) through the train and evaluate notebooks (parallel, skip/resume; see saelib/study.py)
STUDY ?= default
study: model
	$(PY) -m saelib.study params/$(STUDY)

## smoke: the train notebook at the smoke profile (params/smoke/_study.yaml), into runs/smoke/topk
smoke: model
	$(PY) -m saelib.notebook notebooks/train.ipynb params/smoke/topk.yaml

## test: unit tests, integration tests on the real model, nbval over every notebook
test: model
	$(PY) -m pytest -q --durations=15 tests
	# at the smoke profile, in dependency order: evaluate reads the smoke run that train writes; compare/competition read tests/fixtures/study;
	# tests/nbval_iopub.py: nbval reads a cell's output while it runs (alone, it drops what outgrows ZeroMQ's buffers)
	SAELIB_PROFILE=smoke $(PY) -m pytest -q -p tests.nbval_iopub --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg $(NOTEBOOKS)

test-fast: setup
	$(PY) -m pytest -q -m "not real_model" tests

## sync: make every notebooks/*.ipynb agree with its jupytext .py source
sync: setup
	.venv/bin/jupytext --sync notebooks/*.py

## lab: JupyterLab on the notebooks (notebooks/*.py open as notebooks through jupytext; plotly figures render)
LAB_PORT ?= 8888
LAB_ARGS ?=
lab: setup
	.venv/bin/jupyter lab --no-browser --ip=127.0.0.1 --port=$(LAB_PORT) $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)
