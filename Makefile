# Quantization Workbook. Every target creates or reuses .venv first, so one command does all set-up.
#   make workbook [FAST=1]   make test   make lab   make student [CHECK=1]   make bench
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
yes = $(filter 1 true yes True TRUE Yes YES,$(1))
THREADS := $(shell n=$$(nproc 2>/dev/null || echo 2); [ "$$n" -lt 2 ] && echo "$$n" || echo 2)
TEST_OUT := build/test

.PHONY: help venv workbook test uitest nbval lab student bench clean

help:
	@echo "make workbook [FAST=1]  run every notebook headless -> build/report.md"
	@echo "make test               unit tests, notebooks in fast mode, nbgrader checks (what CI runs)"
	@echo "make uitest             every notebook in a real JupyterLab + headless Chromium -> build/screens/"
	@echo "make nbval              every notebook on a fresh kernel with nbval (lax)"
	@echo "make lab                JupyterLab on notebooks/ (127.0.0.1 only)"
	@echo "make student [CHECK=1]  student release -> build/student/"
	@echo "make bench              benchmarks -> build/bench/"
	@echo "make venv | clean       (re)build .venv if requirements changed | remove build/"

venv: $(STAMP)

# The stamp is newer than requirements.txt and pyproject.toml once they are installed: a warm
# venv costs nothing. The kernelspec "python3" is written inside the venv with the venv's own
# interpreter, so papermill/nbval/nbgrader run notebooks with it.
$(STAMP): requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
	  || { echo "need Python >= 3.11 as $(PYTHON) (try: make PYTHON=python3.11 ...)"; exit 1; }
	@test -x $(PY) || { echo "creating $(VENV)"; $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --disable-pip-version-check --progress-bar off -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check --progress-bar off -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (workbook)"
	@touch $@

workbook: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) OMP_WAIT_POLICY=PASSIVE $(PY) -m lecturelib.workbook run $(if $(call yes,$(FAST)),--fast) --out build

# (1) one papermill fast run per notebook (its failures become test_fast_run failures, so
# pytest still runs and has the last word); (2) the same notebooks in a real JupyterLab and
# headless Chromium (make uitest), started in the background next to (3) one pytest process:
# unit tests, conventions, nbval on $(NBVAL_NOTEBOOKS), the student release with nbgrader
# validate --invert, and last tests/test_zz_in_jupyterlab.py, which waits for the browser
# run's report (skipped with a message where chromium is missing).
NBVAL_NOTEBOOKS ?= notebooks/00_start_here.ipynb
test: $(STAMP)
	rm -rf $(TEST_OUT)
	OMP_NUM_THREADS=$(THREADS) OMP_WAIT_POLICY=PASSIVE $(PY) -m lecturelib.workbook run --fast --timeout 180 --out $(TEST_OUT) || true
	mkdir -p $(TEST_OUT)/uitest
	{ OMP_NUM_THREADS=$(THREADS) OMP_WAIT_POLICY=PASSIVE $(PY) -m lecturelib.uitest --out $(TEST_OUT)/uitest \
	    --screens build/screens > $(TEST_OUT)/uitest.log 2>&1 || true; } & \
	trap 'kill %1 2>/dev/null || true' EXIT; \
	status=0; WORKBOOK_FAST=1 OMP_NUM_THREADS=$(THREADS) OMP_WAIT_POLICY=PASSIVE \
	WORKBOOK_FAST_RUNS=$(CURDIR)/$(TEST_OUT)/runs.json \
	WORKBOOK_UITEST=$(CURDIR)/$(TEST_OUT)/uitest/uitest.json \
	WORKBOOK_RESULTS_DIR=$(CURDIR)/$(TEST_OUT)/nbval-results \
	  $(PY) -m pytest tests $(NBVAL_NOTEBOOKS) --nbval-lax --nbval-current-env || status=$$?; \
	wait; echo "== browser run (make uitest):"; grep -E "widgets rendered|passed,|SKIPPED" $(TEST_OUT)/uitest.log || true; \
	exit $$status

# Real browser: JupyterLab on 127.0.0.1 (random port and token) serving a copy of notebooks/,
# Debian's chromium driven by playwright; one line per notebook, screenshots in build/screens/.
uitest: $(STAMP)
	OMP_NUM_THREADS=$(THREADS) OMP_WAIT_POLICY=PASSIVE $(PY) -m lecturelib.uitest --out build/uitest --screens build/screens

# Every notebook on a fresh kernel with nbval (make test runs it on $(NBVAL_NOTEBOOKS) only:
# the papermill run already executes every notebook once).
nbval: $(STAMP)
	WORKBOOK_FAST=1 OMP_NUM_THREADS=$(THREADS) OMP_WAIT_POLICY=PASSIVE \
	WORKBOOK_RESULTS_DIR=$(CURDIR)/build/nbval-results \
	  $(PY) -m pytest notebooks --nbval-lax --nbval-current-env

# Served on 127.0.0.1 only; --allow-root only where make runs as root (containers).
lab: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(VENV)/bin/jupyter lab --notebook-dir=notebooks --ServerApp.ip=127.0.0.1 \
	  $(if $(filter 0,$(shell id -u)),--allow-root)

student: $(STAMP)
	$(PY) -m lecturelib.release student --out build/student $(if $(call yes,$(CHECK)),--check)

# Benchmarks: every bench/*.py and tests/bench_*.py, run from the repository root with
# BENCH_OUT=build/bench. A later benchmark is one new file, e.g. bench/latency.py that calls
# `python -m lecturelib.bench ...`-style code and writes to $BENCH_OUT.
BENCH_SCRIPTS = $(sort $(wildcard bench/*.py tests/bench_*.py))
bench: $(STAMP)
	@mkdir -p build/bench
	@if [ -z "$(BENCH_SCRIPTS)" ]; then echo "no benchmarks yet"; fi
	@for f in $(BENCH_SCRIPTS); do \
	  echo "== $$f"; BENCH_OUT=build/bench OMP_NUM_THREADS=$(THREADS) OMP_WAIT_POLICY=PASSIVE $(PY) "$$f"; \
	done

clean:
	rm -rf build
