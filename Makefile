# tfpipe: `make demo` trains a Transformer pipelined across devices; `make test` runs `make lint`
# (ruff, strict mypy), the suite (which also builds the docs with --strict) on the newest
# TensorFlow and Keras, then `make test-compat`; `make docs` builds the documentation site
# into site/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# test-compat: the oldest supported TensorFlow + Keras (constraints/oldest.txt) in a second venv,
# running the core tests that prove tfpipe.fit equals model.fit (the fit grid's 4-stage rows,
# one of the skip-connection schedules).
COMPAT_VENV := .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.installed
COMPAT_TESTS := tests/test_transparency.py tests/test_placement.py tests/test_functional_graphs.py \
	tests/test_replicas.py
COMPAT_SELECT := not test_skip_connections_across_stages and (not test_fit_equals_keras or -4-) \
	or 1f1b-4-8
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo lint test test-compat docs install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(COMPAT_STAMP): pyproject.toml constraints/oldest.txt
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --quiet --upgrade pip
	$(COMPAT_PY) -m pip install --quiet -c constraints/oldest.txt -e '.[test]'
	touch $(COMPAT_STAMP)

demo: $(STAMP)
	$(PY) examples/char_transformer.py

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m mypy

test: lint
	$(PY) -m pytest -q tests
	$(MAKE) --no-print-directory test-compat

test-compat: $(COMPAT_STAMP)
	@$(COMPAT_PY) -c 'from importlib.metadata import version as v; \
		print("test-compat on tensorflow", v("tensorflow"), "and keras", v("keras"))'
	$(COMPAT_PY) -m pytest -q $(COMPAT_TESTS) -k '$(COMPAT_SELECT)'

docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache site
