"""`megaslm train`: the trainer with the parts that live above megaslm.train — the reference (megaslm.reference)
and the callbacks the config asks for (the token view of megaslm.analyze, the profiler, the
downstream evaluation of megaslm.eval). Everything is composed
here, so that train/ imports neither reference/ nor analyze/."""

from __future__ import annotations

import sys

import torch.distributed as dist

from megaslm.callbacks import Callback
from megaslm.config import Config
from megaslm.model.build import zero_stage
from megaslm.train.halt import RunHalted
from megaslm.train.trainer import Trainer


def build_reference(trainer: Trainer):
    """The SLM reference (megaslm.reference: cache, online engine, ensemble or EMA of the trained model; one
    interface) of a trainer whose objective reads one. A mixture's reference is checked against its first
    component (all share one tokenizer); config validation keeps reference.cache away from mixtures and document
    masking."""
    from megaslm.reference import make_reference

    g = trainer.groups
    return make_reference(trainer.cfg, shards=trainer.data.train, vocab_size=trainer.data.vocab,
                          dtype=trainer.dtype, micro_batch_size=trainer.cfg.train.micro_batch_size,
                          dp_size=g.dp_size, mpu=g if g.tp_size > 1 else None, tp_group=g.tp_group,
                          tp_size=g.tp_size, trained_lm=trainer.engine.module.lm,
                          zero_stage=zero_stage(trainer.ds_config))


def config_callbacks(cfg: Config) -> list[Callback]:
    """The callbacks the config asks for."""
    callbacks: list[Callback] = []
    if cfg.train.token_view_every:
        from megaslm.analyze.token_view import TokenView

        callbacks.append(TokenView(cfg.train.token_view_every))
    if cfg.train.profile_steps:
        from megaslm.train.profile import StepProfiler

        callbacks.append(StepProfiler(*cfg.train.profile_steps))
    if cfg.eval.tasks:  # downstream lm-eval tasks, every eval.every steps (megaslm/eval/callback.py)
        from megaslm.eval.callback import DownstreamEval

        callbacks.append(DownstreamEval(cfg.eval))
    return callbacks


def build_trainer(cfg: Config) -> Trainer:
    """The Trainer of a config, with its reference and the callbacks it asks for."""
    return Trainer(cfg, config_callbacks(cfg), reference=build_reference)


def train(cfg: Config) -> int:
    code = build_trainer(cfg).run()
    dist.barrier()
    return code


def main_entry(cfg: Config) -> int:
    try:
        return train(cfg)
    except RunHalted:  # every rank stopped on purpose; rank 0 printed why
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
