# Two entry points for a fresh machine: `make run` (the main job) and `make test`.
SHELL := /bin/bash
PY := .venv/bin/python
BASE := weights/smollm2-135m-instruct

.PHONY: run test venv weights bench bench-deps clean

venv: .venv/installed
.venv/installed: setup.cfg
	python3 -m venv .venv
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,plot]'
	touch $@

weights: venv
	$(PY) weights/smollm2.py

run: weights
	$(PY) train.py config/sentiment.py --overwrite
	$(PY) generate.py --base $(BASE) --prompt out/sentiment/prompt.safetensors --labels " negative, positive" \
	    --text $$'Review: an engrossing, beautifully acted film\nSentiment:' \
	    --text $$'Review: a tedious mess that never finds its footing\nSentiment:'
	$(PY) generate.py --base $(BASE) --chat --text "What is the capital of France?"

test: venv
	$(PY) -m pytest -q

bench: weights
	$(PY) bench/bench.py

# llama.cpp, the peer of bench/bench_generate.py at batch 1: built from source (~6 min)
bench-deps: venv
	$(PY) -m pip install -q -e '.[bench]'

clean:
	rm -rf .venv weights/downloads $(BASE)
