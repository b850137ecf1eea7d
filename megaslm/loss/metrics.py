"""Metrics that declare how they combine over the micro-steps of one optimizer step.

Each figure is recorded with its reduction, so that combining micro-steps never guesses from a name:
- ratio(name, num, den): sum of numerators / sum of denominators, divided once at the end (a loss is token-
  weighted, selected_frac is selected over total); omitted when the summed denominator is 0 (no NaN);
- total(name, value): summed (counts);
- mean(name, value): plain mean over the micro-steps that recorded it (order statistics such as thresholds and
  quantiles, which have no exact combination without the tokens).

`Metrics` is a dict of the resolved values (what one micro-step reports) that also keeps its terms;
`Metrics.combine([...])` merges micro-steps term by term.
"""

from __future__ import annotations

RATIO, TOTAL, MEAN = "ratio", "total", "mean"


class Metrics(dict):
    def __init__(self):
        super().__init__()
        self.terms: dict[str, tuple[str, float, float]] = {}  # name -> (reduction, a, b)

    def ratio(self, name: str, num: float, den: float) -> None:
        self._add(name, RATIO, float(num), float(den))

    def total(self, name: str, value: float) -> None:
        self._add(name, TOTAL, float(value), 0.0)

    def mean(self, name: str, value: float) -> None:
        self._add(name, MEAN, float(value), 1.0)

    def _add(self, name: str, kind: str, a: float, b: float) -> None:
        old = self.terms.get(name)
        if old is not None:
            if old[0] != kind:
                raise ValueError(f"metric {name!r} recorded as {old[0]} and as {kind}")
            a, b = old[1] + a, old[2] + b
        self.terms[name] = (kind, a, b)
        self._resolve(name)

    def _resolve(self, name: str) -> None:
        kind, a, b = self.terms[name]
        if kind == TOTAL:
            self[name] = a
        elif b > 0:
            self[name] = a / b
        else:
            self.pop(name, None)

    @classmethod
    def combine(cls, parts: list["Metrics"]) -> "Metrics":
        out = cls()
        for p in parts:
            # A plain dict (a micro-step skipped for NaN losses reports {"loss": nan}) counts as means.
            terms = p.terms if isinstance(p, Metrics) else {k: (MEAN, float(v), 1.0) for k, v in p.items()}
            for name, (kind, a, b) in terms.items():
                out._add(name, kind, a, b)
        return out


def objective_metrics(sums: dict, w, objective, group, num_sources: int) -> Metrics:
    """The objective's figures of one micro-step from its all-reduced sums (see compute_objective)."""
    import math

    import torch
    import torch.distributed as dist

    from .weights import EXCESS_QUANTILES

    m = Metrics()
    m.total("n_valid", sums["n_valid"])
    if "stop_requested" in sums:
        m.total("stop_requested", sums["stop_requested"])
    m.ratio("loss", sums["wl"], sums["w"])
    m.ratio("loss_all", sums["all_loss"], sums["n_valid"])
    srcs = sums["_sources"]
    for i in range(num_sources if srcs else 0):
        m.total(f"tokens/{i}", srcs[i])
    if objective.kind != "slm":
        return m
    n_sel, n_valid = sums["n_sel"], sums["n_valid"]
    m.total("n_selected", n_sel)
    m.ratio("loss_selected", sums["sel_loss"], n_sel)
    m.ratio("selected_frac", n_sel, n_valid)
    m.ratio("loss_unselected", sums["all_loss"] - sums["sel_loss"], n_valid - n_sel)
    if "ref" in sums:
        m.ratio("ref_loss", sums["ref"], n_valid)
    objective.weighting.metrics(m, sums)
    threshold = w.threshold
    if objective.scope != "global" and group is not None:
        # Local scopes have a threshold per row / rank: report the lowest selected score of the group.
        t = torch.tensor(threshold if n_sel > 0 and threshold == threshold else math.inf, dtype=torch.float64,
                         device=w.weights.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        threshold = t.item()
    if n_sel > 0 and threshold is not None:
        m.mean("threshold", threshold)
    for q, v in zip(EXCESS_QUANTILES, w.quantiles):
        if v == v:
            m.mean(f"excess_p{round(q * 100)}", v)
    for i in range(num_sources if srcs else 0):
        m.ratio(f"selected_frac/{i}", srcs[num_sources + i], srcs[i])
    return m
