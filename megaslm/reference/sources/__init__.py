"""Reference sources as components: one module each in this package, registered by name (as megaslm/loss/rules/).

A source owns its `reference.*` config fields (their validation), when it claims a run (`members`, in `order`),
how it is built (`build`), and its shares of `megaslm plan` (`plan`: the description and placement of each
member) and of the preflight checks (`preflight`: before the run directory exists; `check`: before any engine).
The registry answers the loss layer's one question, `has_reference(cfg)`, and `resolve(cfg)`: the members of the
first source (by order) that claims the run. Every module here is imported below: a new source is one new file
plus its test. Implementations are imported lazily (a config check loads no model code).
"""

from __future__ import annotations

import importlib
import pkgutil

from megaslm.reference.sources.base import (SOURCES, BuildContext, Member, ReferenceSource, claim, has_reference,
                                            ordered, register_source, resolve)

__all__ = ["SOURCES", "BuildContext", "Member", "ReferenceSource", "claim", "has_reference", "ordered",
           "register_source", "resolve"]

for _m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")
