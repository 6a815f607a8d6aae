# Two entry points for a fresh machine: `make run` (the main job) and `make test`.
PY := .venv/bin/python
BASE := weights/smollm2-135m-instruct

.PHONY: run test venv weights bench clean

venv: .venv/installed
.venv/installed: setup.cfg
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

weights: venv
	$(PY) weights/smollm2.py

run: weights
	$(PY) generate.py --base $(BASE) --chat --text "What is the capital of France?"

test: venv
	$(PY) -m pytest -q

bench: weights
	$(PY) bench/bench_generate.py

clean:
	rm -rf .venv weights/downloads $(BASE)
