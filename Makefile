# Two entry points: `make demo` (set up, fetch + convert the default model, calibrate, generate
# dense and sparse) and `make test` (set up, run the suite). Everything lives in ./.venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MODEL := checkpoints/SmolLM2-135M-Instruct
CALIB_TEXT := checkpoints/python-docs.txt
PROMPT ?= Explain in two sentences why the sky is blue.
SPARSITY ?= 0.4

.PHONY: demo test setup model clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the pinned build is the local CPU wheel on the project's machines; any >=2.5 works
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q 'torch>=2.5'
	$(PY) -m pip install -q -r requirements-dev.txt
	# the project itself, editable: scripts/, benchmarks/ and tests/ import its modules
	$(PY) -m pip install -q --no-deps -e .
	touch $@

model: $(MODEL)/model.safetensors

$(MODEL)/model.safetensors: | $(VENV)/.installed
	$(PY) -m scripts.fetch_default_model --out $(MODEL)

# Calibration text every Python install carries: the topic pages of Python's own documentation.
$(CALIB_TEXT): | $(VENV)/.installed
	$(PY) -m scripts.python_docs_text $@

# Makefile: a clone calibrated by an older demo recipe (uniform only) recalibrates for --allocation greedy
$(MODEL)/teal_thresholds.safetensors: $(MODEL)/model.safetensors $(CALIB_TEXT) Makefile
	$(PY) calibrate.py --checkpoint_path $(MODEL) --text $(CALIB_TEXT) --output $@ --max_sparsity 0.6

demo: $(MODEL)/teal_thresholds.safetensors
	$(PY) generate.py --checkpoint_path $(MODEL) --chat --prompt "$(PROMPT)" --temperature 0 \
		--max_new_tokens 120 --compile --sparsity 0 $(SPARSITY) --allocation greedy

# Two pytest-xdist workers of one torch thread each, a test file per worker at a time (module fixtures
# load once): 3 min 20 s on a 2-core machine against 6-8 min in one process (2026-12-05).
TEST_WORKERS ?= 2

test: $(MODEL)/model.safetensors
	REQUIRE_MODEL=1 TRITON_INTERPRET=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) checkpoints
