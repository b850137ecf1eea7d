"""The token-selection rules, one module each, registered by name in megaslm.loss.weights (WEIGHTINGS, SCORES).

Every module of this package is imported here, Rho-1's own first (so the config lists its choices first): a new
rule is one new file in this directory plus its test, with no edit to the objective, the trainer or the config.
A rule module imports torch inside the methods that compute, not at its top: the config checks import every rule
(to learn its name and the fields it owns) before `megaslm train` takes its lease, and torch takes seconds to load
(tests/unit/test_lazy_imports.py holds every rule to it).
"""

from __future__ import annotations

import importlib
import pkgutil

from megaslm.loss.weights import SCORES, WEIGHTINGS

from . import rho1  # noqa: F401  (topk, soft; excess, loss)

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["SCORES", "WEIGHTINGS"]
