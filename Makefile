# make align MODEL=gemma2   align one model (default gemma2) and write reports/<model>/
# make test                 the test suite (what CI runs)
# make gate                 align every model marked ci = true, write reports/junit.xml; exit 1 if any fails
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The stamp is the install: it is redone only when pyproject.toml changes.
STAMP  := $(VENV)/.installed
MODEL  ?= gemma2
ARGS   ?=

.PHONY: align test gate venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

align: $(STAMP)
	$(VENV)/bin/align run $(MODEL) $(ARGS)

gate: $(STAMP)
	$(VENV)/bin/align gate --junit reports/junit.xml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf reports/*/ build/
