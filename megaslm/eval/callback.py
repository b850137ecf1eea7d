"""Downstream evaluation during training (the config's `eval` section): lm-eval tasks every `eval.every` steps.

Every rank runs it after the optimizer step, in lockstep: each builds the same lm-eval requests, the batches are
shared over the data-parallel ranks and the results all-reduced (megaslm/eval/adapter.py), so ZeRO-3's
collective parameter gathers line up and the figures do not depend on the number of ranks. The model is
scored in place: the Hugging Face model itself under ZeRO 0-2 (its weights are whole on every rank), the
training engine's forward under ZeRO-3 or tensor parallelism. Metrics go into the step's record
(metrics.jsonl, wandb, console) as `eval/<task>/<metric>`, with `eval/seconds` the wall time of the evaluation.
Tasks that generate text (gsm8k) are for `megaslm eval` on exports and are refused here.
"""

from __future__ import annotations

import time

from megaslm.errors import UserError
from megaslm.callbacks import Callback


def run_tokenizer_spec(cfg, shards) -> str | None:
    """The run's tokenizer: data.tokenizer, else the one the training shards were made with."""
    if cfg.data.tokenizer:
        return cfg.data.tokenizer
    from megaslm.data.shards import recorded_tokenizer

    return recorded_tokenizer(shards)  # checked against the shards' tokenizer fingerprint


class DownstreamEval(Callback):
    def __init__(self, ecfg):
        self.ecfg = ecfg
        self.lm = None
        self.loaded = None

    def on_train_start(self, trainer) -> None:
        from megaslm.data.tokenizer import load_tokenizer
        from megaslm.eval.adapter import EngineScorer, HFScorer, MegaslmLM, Parallel
        from megaslm.eval.tasks import load_tasks, output_types
        from megaslm.model.build import zero_stage

        e = self.ecfg
        self.loaded = load_tasks(list(e.tasks), e.include_path or None, e.num_fewshot, where="eval.tasks")
        gen = [t for t, kind in output_types(self.loaded).items() if kind == "generate_until"]
        if gen:
            raise UserError(f"eval.tasks: {', '.join(gen)} generates text, which runs in `megaslm eval` on an "
                            "export or a run directory, not in the training loop")
        spec = run_tokenizer_spec(trainer.cfg, trainer.train_shards)
        if spec is None:
            raise UserError("eval.tasks: the run has no tokenizer to encode task text (set data.tokenizer; "
                            "the training shards were prepared before megaslm recorded their tokenizer)")
        g = trainer.groups
        lm = trainer.engine.module.lm
        if zero_stage(trainer.ds_config) < 3 and g.tp_size == 1:
            scorer = HFScorer(lm, trainer.device)
        else:
            scorer = EngineScorer(trainer.engine, trainer.device)
        max_len = int(getattr(lm.config, "max_position_embeddings", trainer.cfg.train.seq_len))
        self.lm = MegaslmLM(scorer, load_tokenizer(spec), max_length=max_len, batch_tokens=e.batch_tokens,
                            parallel=Parallel(g.dp_rank, g.dp_size, g.dp_group), progress=trainer.is_main)

    def post_step(self, trainer, rec: dict) -> None:
        e = self.ecfg
        last = trainer.step == trainer.cfg.train.steps
        if (e.every and trainer.step % e.every == 0) or (last and e.at_end):
            rec.update(self.evaluate(trainer))

    def evaluate(self, trainer) -> dict:
        from megaslm.eval.run import run_tasks

        t0 = time.time()
        was_training = trainer.engine.training
        trainer.engine.eval()
        try:
            table = run_tasks(self.lm, self.loaded, self.ecfg.limit)
        finally:
            if was_training:
                trainer.engine.train()
        out = {f"eval/{task}/{m}": v for task, row in table.items() for m, v in row.items() if m != "n"}
        out["eval/seconds"] = time.time() - t0
        if trainer.is_main:
            figs = ", ".join(f"{k[5:]} {v:.4f}" for k, v in out.items() if k != "eval/seconds")
            print(f"megaslm: eval at step {trainer.step}: {figs} ({out['eval/seconds']:.1f} s, "
                  f"{self.lm.forwards} forwards on this rank in all)", flush=True)
        return out
