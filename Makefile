# tfpipe: `make demo` trains a Transformer pipelined across devices; `make test` runs `make lint`
# (ruff, strict mypy) then the suite (which also builds the docs with --strict); `make docs` builds
# the documentation site into site/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo lint test docs install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/char_transformer.py

lint: $(STAMP)
	$(PY) -m ruff check . && $(PY) -m mypy

test: lint
	$(PY) -m pytest -q tests

docs: $(STAMP)
	$(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache site
