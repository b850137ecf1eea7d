"""Downstream evaluation with lm-evaluation-harness, offline: the adapter (adapter.py), the built-in tasks
(tasks/), `megaslm eval` (run.py) and the in-loop evaluator (callback.py). docs/eval.md."""
