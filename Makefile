# make align MODEL=gemma2   align one model (default gemma2) and write reports/<model>/
# make test                 the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The stamp is the install: it is redone only when pyproject.toml changes.
STAMP  := $(VENV)/.installed
MODEL  ?= gemma2
ARGS   ?=

.PHONY: align test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

align: $(STAMP)
	$(VENV)/bin/align run $(MODEL) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf reports/*/ build/
