# tfpipe: `make demo` trains a Transformer pipelined across devices; `make test` runs `make lint`
# (ruff, strict mypy), the suite (which also builds the docs with --strict) on the newest
# TensorFlow and Keras with oneDNN forced on, the core tests again with oneDNN forced off
# (`make test-onednn-off`), then `make test-compat`; `make docs` builds the documentation site
# into site/.
#
# oneDNN: TensorFlow turns it on by default only on some x86 processors (AVX-512 ones among
# them); it changes CPU numerics and whether the CPU allocator keeps statistics. Forcing it each
# way makes a run mean the same on every machine (tests/conftest.py prints which in the header).
# The suite runs in TEST_WORKERS pytest-xdist processes (tests that start TF worker processes
# or subprocesses bound their waits, so a busy machine slows them but does not fail them).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# test-compat: the oldest supported TensorFlow + Keras (constraints/oldest.txt) in a second venv,
# running the core tests that prove tfpipe.fit equals model.fit (the fit grid's 4-stage rows,
# one of the skip-connection schedules, nested and subclassed models).
COMPAT_VENV := .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.installed
COMPAT_TESTS := tests/test_transparency.py tests/test_placement.py tests/test_functional_graphs.py \
	tests/test_replicas.py tests/test_any_model.py
COMPAT_SELECT := not test_skip_connections_across_stages and (not test_fit_equals_keras or -4-) \
	or 1f1b-4-8
# test-onednn-off: a small core with oneDNN forced off: the fit grid's 4-stage rows, placement,
# skip connections under 1F1B, mixed precision, and the monitor (which must say in one line why
# it writes no memory scalars).
ONEDNN_OFF_TESTS := tests/test_transparency.py tests/test_placement.py \
	tests/test_functional_graphs.py tests/test_training_features.py tests/test_monitor.py
ONEDNN_OFF_SELECT := (test_fit_equals_keras and -4-) or test_placement or 1f1b-4-8 or mixed \
	or test_monitor_writes
TEST_WORKERS ?= 2
PYTEST := -m pytest -q -n $(TEST_WORKERS) --durations=25
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo lint test test-onednn-off test-compat docs install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-cache-dir --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir -e '.[test,hub]'
	touch $(STAMP)

$(COMPAT_STAMP): pyproject.toml constraints/oldest.txt
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --quiet --no-cache-dir --upgrade pip
	$(COMPAT_PY) -m pip install --quiet --no-cache-dir -c constraints/oldest.txt -e '.[test]'
	touch $(COMPAT_STAMP)

demo: $(STAMP)
	$(PY) examples/char_transformer.py

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m mypy

test: lint
	TF_ENABLE_ONEDNN_OPTS=1 $(PY) $(PYTEST) tests
	$(MAKE) --no-print-directory test-onednn-off
	$(MAKE) --no-print-directory test-compat

test-onednn-off: $(STAMP)
	TF_ENABLE_ONEDNN_OPTS=0 $(PY) $(PYTEST) $(ONEDNN_OFF_TESTS) -k '$(ONEDNN_OFF_SELECT)'

test-compat: $(COMPAT_STAMP)
	@$(COMPAT_PY) -c 'from importlib.metadata import version as v; \
		print("test-compat on tensorflow", v("tensorflow"), "and keras", v("keras"))'
	TF_ENABLE_ONEDNN_OPTS=1 $(COMPAT_PY) $(PYTEST) $(COMPAT_TESTS) -k '$(COMPAT_SELECT)'

docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache site
