"""Source `online`: reference.path, one frozen model run beside the trained one (megaslm/reference/online.py).

It owns reference.path and reference.placement: their validation and preflight checks serve the `ensemble` and
`cross` sources too (they read the same keys), and `build_one` builds any one model of them."""

from __future__ import annotations

from pathlib import Path

from megaslm.config import first_train_path, reference_paths
from megaslm.reference.sources.base import Member, ReferenceSource, register_source

PLACEMENTS = ("auto", "replicated", "zero3", "zero3_offload")


def build_one(cfg, path: str, ctx):
    """One reference model of `path`, online; carried over by bytes when its tokenizer is not the shards'."""
    from megaslm.reference.cross import CrossTokenizerReference, tokenizer_pair
    from megaslm.reference.online import OnlineReference

    pair = tokenizer_pair(path, ctx.shards, cfg.data.tokenizer, vocab_size=ctx.vocab_size)
    model = OnlineReference(path, cfg.reference.placement, dtype=ctx.dtype, micro_batch_size=ctx.micro_batch_size,
                            dp_size=ctx.dp_size, mpu=ctx.mpu, tp_group=ctx.tp_group, tp_size=ctx.tp_size)
    return model if pair is None else CrossTokenizerReference(model, pair)


def note_unscored_cache(cfg, path: str) -> None:
    if cfg.reference.cache:
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"megaslm: reference.cache {cfg.reference.cache} holds no complete cache; running the reference "
                  f"{path} online (score it first with `megaslm score`)", flush=True)


@register_source
class OnlineSource(ReferenceSource):
    name = "online"
    order = 50

    @classmethod
    def validate(cls, cfg, bad) -> None:
        if cfg.reference.placement not in PLACEMENTS:
            raise bad("reference.placement", f"must be {', '.join(PLACEMENTS[:-1])} or {PLACEMENTS[-1]}, got "
                      f"{cfg.reference.placement!r}")

    @classmethod
    def configured(cls, cfg) -> bool:
        return bool(reference_paths(cfg))

    @classmethod
    def members(cls, cfg, *, assume_cache_scored=False):
        paths = reference_paths(cfg)
        return [Member("online", paths[0])] if len(paths) == 1 else None

    @classmethod
    def build(cls, cfg, members, ctx):
        note_unscored_cache(cfg, members[0].path)
        return build_one(cfg, members[0].path, ctx)

    @classmethod
    def preflight(cls, cfg, src: str) -> None:
        if cfg.objective != "slm":
            return
        from megaslm.preflight import expect_dir

        for i, path in enumerate(reference_paths(cfg)):
            expect_dir("reference.path" if isinstance(cfg.reference.path, str) else f"reference.path[{i}]", path,
                       "config.json", "a Hugging Face model directory", src)

    @classmethod
    def check(cls, cfg, model_vocab: int | None) -> None:
        from megaslm.errors import UserError
        from megaslm.preflight import check_positions, reference_hf_config

        for path in reference_paths(cfg):  # every model of a reference ensemble
            ref = reference_hf_config(cfg, path)
            if ref is None:
                continue
            check_positions(ref, cfg.train.seq_len, f"reference.path {path}")
            own_tokenizer = any((Path(path) / f).exists() for f in ("tokenizer.json", "tokenizer.model"))
            if model_vocab is not None and ref.vocab_size != model_vocab and not own_tokenizer:
                raise UserError(f"reference.path {path} has vocab_size {ref.vocab_size} but the trained model's "
                                f"vocabulary is {model_vocab} (data.train {first_train_path(cfg.data)}): the "
                                "reference must share the tokenizer, or its directory must hold its own tokenizer "
                                "(aligned by bytes)")
