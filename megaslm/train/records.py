"""What a training step reports beyond the objective's metrics, and the callbacks that validate and log it.

- `Throughput`: tokens/s, TFLOPs per device and MFU (the trained model's FLOPs plus one reference forward per
  token, as `megaslm plan` counts them), tokens seen, epoch;
- `MixtureMetrics` (a mixture run): per-source metrics under their names (`name_sources`) and each component's
  epoch;
- `Validation`: val_loss every `train.eval_every` steps and at the last one (with data.valid);
- `Logging`: the record to metrics.jsonl / wandb and one console line, every `train.log_every` steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megaslm.callbacks import Callback
from megaslm.data.loader import model_inputs
from megaslm.monitor import device_peak_tflops, flops_per_token


class Throughput:
    def __init__(self, cfg, summary: dict, world: int, dp_size: int, reference=None):
        t = cfg.train
        self.world = world
        self.tokens_per_step = t.seq_len * t.micro_batch_size * t.grad_accum * dp_size
        self.flops_per_token = flops_per_token(summary["params"], summary["layers"], summary["hidden"], t.seq_len)
        if reference is not None:  # one forward of the reference per token (2N + attention, as `plan`)
            self.flops_per_token += reference.forward_flops_per_token(t.seq_len)
        self.peak_tflops = t.peak_tflops or device_peak_tflops()

    def fill(self, rec: dict, step: int, dt: float, epoch: int) -> None:
        rec["step_time"] = dt
        rec["tokens_per_s"] = self.tokens_per_step / dt
        rec["tflops_per_device"] = self.flops_per_token * rec["tokens_per_s"] / self.world / 1e12
        if self.peak_tflops:
            rec["mfu"] = rec["tflops_per_device"] / self.peak_tflops
        if "n_selected" in rec:
            rec["selected_tokens_per_s"] = rec["n_selected"] / dt
        rec["tokens_seen"] = step * self.tokens_per_step
        rec["epoch"] = epoch


def name_sources(rec: dict, names: list[str]) -> dict:
    """Per-source metrics of a mixture under their names: tokens/<i> -> tokens/<names[i]> (and selected_frac).
    With data.track_sources the names are "<component>/<file index>", and each component's totals are added as
    tokens/<component> and selected_frac/<component> (selected over total)."""
    out = {k: v for k, v in rec.items() if not k.startswith(("tokens/", "selected_frac/"))}
    sums: dict[str, list[float]] = {}
    for i, name in enumerate(names):
        n = rec.get(f"tokens/{i}")
        if n is None:
            continue
        out[f"tokens/{name}"] = n
        frac = rec.get(f"selected_frac/{i}")
        if frac is not None:
            out[f"selected_frac/{name}"] = frac
        if "/" in name:
            total = sums.setdefault(name.split("/")[0], [0.0, 0.0])
            total[0] += n
            total[1] += (frac or 0.0) * n
    for comp, (n, sel) in sums.items():
        out[f"tokens/{comp}"] = n
        if any(k.startswith("selected_frac/") for k in rec) and n > 0:
            out[f"selected_frac/{comp}"] = sel / n
    return out


class MixtureMetrics(Callback):
    """A mixture's per-source figures under their names, and each component's epoch (before other callbacks)."""

    def post_step(self, trainer, rec: dict) -> None:
        named = name_sources(rec, trainer.source_names)
        rec.clear()
        rec.update(named)
        loader = trainer.loader
        rec.update({f"epoch/{c.name}": e for c, e in zip(loader.components, loader.epochs)})


class Validation(Callback):
    """val_loss (the first set's, so existing tools keep working) and, for a data.valid mapping, val_loss/<name>
    for every set: mean CE over the labelled tokens of each validation set."""

    def post_step(self, trainer, rec: dict) -> None:
        t = trainer.cfg.train
        if trainer.data.valid and ((t.eval_every and trainer.step % t.eval_every == 0) or trainer.step == t.steps):
            losses = self.evaluate(trainer)
            rec["val_loss"] = next(iter(losses.values()))
            if isinstance(trainer.cfg.data.valid, dict):
                rec.update({f"val_loss/{k}": v for k, v in losses.items()})

    @torch.no_grad()
    def evaluate(self, trainer) -> dict[str, float | None]:
        """{name: loss} in config order (None for a set with no labelled token)."""
        from megaslm.train.build import make_loader

        trainer.engine.eval()
        out = {}
        for name, shards in trainer.data.valid.items():
            loader = make_loader(trainer.cfg, shards, trainer.groups, train=False)
            total = torch.zeros(2, dtype=torch.float64, device=trainer.device)
            for batch in loader.eval_batches(trainer.cfg.data.valid_sequences):
                labels = batch["labels"].to(trainer.device)
                token_loss = trainer.engine(batch["input_ids"].to(trainer.device), labels,
                                            **model_inputs(batch, trainer.device))
                total[0] += token_loss.double().sum()
                total[1] += (labels != -100).sum()
            dist.all_reduce(total, group=trainer.groups.dp_group)  # sums over ranks: every rank gets the same loss
            out[name] = (total[0] / total[1]).item() if total[1] > 0 else None
        trainer.engine.train()
        return out


class Logging(Callback):
    def post_step(self, trainer, rec: dict) -> None:
        t = trainer.cfg.train
        evaluated = "val_loss" in rec or "eval/seconds" in rec  # a step with an evaluation is always logged
        if trainer.step % t.log_every == 0 or trainer.step == t.steps or evaluated:
            trainer.monitor.log(rec, console_line(rec, t.steps))


def console_line(rec: dict, total: int) -> str:
    parts = [f"step {rec['step']}/{total}", f"loss {rec['loss']:.4f}"]
    if "loss_all" in rec and "selected_frac" in rec:
        ref = f" ref {rec['ref_loss']:.4f}" if "ref_loss" in rec else ""
        parts.append(f"loss_all {rec['loss_all']:.4f}{ref} sel {rec['selected_frac']:.2f}")
    if rec.get("val_loss") is not None:
        parts.append(f"val_loss {rec['val_loss']:.4f}")
    parts.append(f"lr {rec['lr']:.2e}")
    if rec.get("grad_norm") is not None:
        parts.append(f"gnorm {rec['grad_norm']:.3f}")
    parts.append(f"{rec['tokens_per_s']:.0f} tok/s")
    if "mfu" in rec:
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    return " | ".join(parts)
