"""Metrics that declare how they combine over the micro-steps of one optimizer step.

Each figure is recorded with its reduction, so that combining micro-steps never guesses from a name:
- ratio(name, num, den): sum of numerators / sum of denominators, divided once at the end (a loss is token-
  weighted, selected_frac is selected over total); omitted when the summed denominator is 0 (no NaN);
- total(name, value): summed (counts);
- mean(name, value, count=1): mean over the micro-steps that recorded it (count 1; 0: not recorded), for order
  statistics such as thresholds and quantiles, which have no exact combination without the tokens.

Terms may be Python numbers or 0-dim device tensors (float64, as the objective all-reduced them): they stay on
the device through `combine` and go to the host once, for all micro-steps of a step together (`resolve_all`: one
`.tolist()`), not one sync per micro-step. Host and device terms add in the same float64 order, so the resolved
figures are the same bits either way. `Metrics` is a dict of the resolved values (what one micro-step reports)
that also keeps its terms; a Metrics with device terms is empty until resolved.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

RATIO, TOTAL, MEAN = "ratio", "total", "mean"


class Metrics(dict):
    def __init__(self):
        super().__init__()
        self.terms: dict[str, tuple[str, object, object]] = {}  # name -> (reduction, a, b)

    def ratio(self, name: str, num, den) -> None:
        self._add(name, RATIO, _num(num), _num(den))

    def total(self, name: str, value) -> None:
        self._add(name, TOTAL, _num(value), 0.0)

    def mean(self, name: str, value, count=1.0) -> None:
        self._add(name, MEAN, _num(value), _num(count))

    def _add(self, name: str, kind: str, a, b) -> None:
        old = self.terms.get(name)
        if old is not None:
            if old[0] != kind:
                raise ValueError(f"metric {name!r} recorded as {old[0]} and as {kind}")
            a, b = old[1] + a, old[2] + b
        self.terms[name] = (kind, a, b)
        if not (isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor)):
            self._resolve(name)

    def _resolve(self, name: str) -> None:
        kind, a, b = self.terms[name]
        if kind == TOTAL:
            self[name] = a
        elif b > 0:
            self[name] = a / b
        else:
            self.pop(name, None)

    @property
    def on_device(self) -> bool:
        return any(isinstance(x, torch.Tensor) for _, a, b in self.terms.values() for x in (a, b))

    def resolved(self) -> Metrics:
        Metrics.resolve_all([self])
        return self

    @staticmethod
    def resolve_all(parts: list, extra: list | tuple = ()) -> list[float]:
        """Bring the device terms of every Metrics in `parts` to the host in one transfer, and resolve them.
        `extra`: other 0-dim device tensors to bring in the same transfer; returns their host values."""
        slots = [(m, name, i) for m in parts if isinstance(m, Metrics)
                 for name, term in m.terms.items() for i in (1, 2) if isinstance(term[i], torch.Tensor)]
        if not slots and not extra:
            return []
        tensors = [m.terms[name][i] for m, name, i in slots]
        dev = tensors[0].device if tensors else None
        tensors += [torch.as_tensor(x).to(dev, torch.float64).reshape(()) for x in extra]  # e.g. a norm off-device
        values = torch.stack(tensors).tolist()  # sync point: the step's figures
        values, rest = values[:len(slots)], values[len(slots):]
        for (m, name, i), v in zip(slots, values):
            term = list(m.terms[name])
            term[i] = v
            m.terms[name] = tuple(term)
        for m in {id(m): m for m, _, _ in slots}.values():
            for name in m.terms:
                m._resolve(name)
        return rest

    @classmethod
    def combine(cls, parts: list) -> Metrics:
        out = cls()
        for p in parts:
            # A plain dict (a micro-step skipped for NaN losses reports {"loss": nan}) counts as means.
            terms = p.terms if isinstance(p, Metrics) else {k: (MEAN, float(v), 1.0) for k, v in p.items()}
            for name, (kind, a, b) in terms.items():
                out._add(name, kind, a, b)
        return out


def _num(x):
    """A float, or a 0-dim float64 tensor kept on its device."""
    return x.double() if isinstance(x, torch.Tensor) else float(x)


def present(cond, value):
    """(value where cond else 0, cond as a count) for a host bool or a device tensor condition."""
    if isinstance(cond, torch.Tensor):
        return torch.where(cond, torch.as_tensor(value, dtype=torch.float64, device=cond.device), 0.0), cond.double()
    return (value, 1.0) if cond else (0.0, 0.0)


def objective_metrics(sums: dict, w, objective, group, num_sources: int) -> Metrics:
    """The objective's figures of one micro-step from its all-reduced sums (see compute_objective); the sums may
    be device tensors (then so are the terms)."""
    from .weights import SCORE_QUANTILES

    m = Metrics()
    m.total("n_valid", sums["n_valid"])
    if "stop_requested" in sums:
        m.total("stop_requested", sums["stop_requested"])
    wl, scored = sums["wl"], True
    if "n_nan" in sums:  # a NaN score voids the step (see Objective): its loss is NaN, its order statistics absent
        wl = torch.where(sums["n_nan"] > 0, math.nan, wl)
        scored = sums["n_nan"] == 0
    m.ratio("loss", wl, sums["w"])
    m.ratio("loss_all", sums["all_loss"], sums["n_valid"])
    srcs = sums["_sources"]
    for i in range(num_sources if len(srcs) else 0):
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
        t = torch.as_tensor(math.inf if threshold is None else threshold, dtype=torch.float64,
                            device=w.weights.device)
        t = torch.where((n_sel > 0) & (t == t), t, math.inf)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
        threshold = t
    if threshold is not None:
        m.mean("threshold", *present((n_sel > 0) & scored, threshold))
    name = objective.score.name if objective.score is not None else "score"  # excess_p50, loss_p50, entropy_p50, ...
    for q, v in zip(SCORE_QUANTILES, w.quantiles):
        m.mean(f"{name}_p{round(q * 100)}", *present((v == v) & scored, v))
    for i in range(num_sources if len(srcs) else 0):
        m.ratio(f"selected_frac/{i}", srcs[num_sources + i], srcs[i])
    return m
