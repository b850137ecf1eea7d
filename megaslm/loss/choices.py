"""The names the config accepts for `objective` and `slm.scope`. Torch-free, like the rule and source registries
(megaslm/loss/rules/, megaslm/reference/sources/): config validation reads them before the run's lease is taken."""

from __future__ import annotations

OBJECTIVES = ("clm", "slm")  # clm: every labelled token; slm: a weighting of a score (megaslm/loss/rules/)
SCOPES = ("sequence", "rank", "global")  # where top k is taken (megaslm/loss/selection.py)
