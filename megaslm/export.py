"""`megaslm export RUN_DIR --out DIR`: a Hugging Face directory from the latest complete checkpoint.

DeepSpeed's ZeRO checkpoints hold each rank's partition of the fp32 master weights; `zero_to_fp32` consolidates
them on the CPU without a process group. Vocab-sharded LM heads (tensor parallel) are concatenated back into the
ordinary layout. The directory is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from megaslm import run_files
from megaslm.atomic import umask
from megaslm.errors import UserError
from megaslm.export_dest import MANIFEST, check_destination, place, written_files
from megaslm.parallel.tensor import consolidate_tp_checkpoint, merge_tp_shards, read_layout
from megaslm.train import manifest
from megaslm.train.checkpoint import candidates, list_tags

PREFIX = "lm."  # TokenLossModel keeps the Hugging Face model as `.lm`


def _rank_state_dict(ckpt_root: Path, tag: str) -> dict[str, torch.Tensor]:
    """The module's weights from DeepSpeed's files under ckpt_root/tag (all of one tensor-parallel rank)."""
    tag_dir = ckpt_root / tag
    if any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from megaslm.quiet import ZERO_TO_FP32, dropping_lines

        with dropping_lines(ZERO_TO_FP32):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)
    else:  # no ZeRO partitions: the module weights are in the model-states file
        files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise UserError(f"{tag_dir}: no DeepSpeed model states found")
        try:  # tensors and plain containers only: a run directory's file must not run code here
            sd = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
        except pickle.UnpicklingError as e:
            raise UserError(f"{files[0]}: holds objects other than tensors, not loaded (weights_only): "
                            f"{str(e).splitlines()[-1][:200]}") from None
    return {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in sd.items()}


def consolidated_state_dict(ckpt_root: Path, tag: str, run_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """The full Hugging Face state dict of a checkpoint: ZeRO partitions consolidated, and with tensor
    parallelism (RUN_DIR/tp_layout.json) each tensor-parallel rank consolidated alone, then the shards merged."""
    layout = read_layout(run_dir) if run_dir is not None else None
    if layout is None or layout["tp_size"] == 1:
        return _rank_state_dict(ckpt_root, tag)
    shards = consolidate_tp_checkpoint(ckpt_root, tag, layout["tp_size"], _rank_state_dict)
    return merge_tp_shards(shards, layout)


def find_tokenizer(run_dir: Path) -> str | None:
    cfg = run_files.run_config(run_dir)
    tok = cfg.get("data", {}).get("tokenizer")
    if tok:
        return tok
    train = cfg["data"]["train"]
    if isinstance(train, list):  # a mixture: its components share one tokenizer
        train = train[0]["path"]
    meta_path = Path(train) / "meta.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text()).get("tokenizer")
    return None


def verified_tag(ckpt_root: Path, tag: str | None) -> str:
    """The tag to read, checked against its manifest as resume checks it: the given tag, or the newest
    checkpoint that passes (saying so on stderr when that is not the latest)."""
    if tag is not None and not (ckpt_root / tag).is_dir():
        raise UserError(f"{ckpt_root}: no checkpoint {tag} (have: {', '.join(list_tags(ckpt_root)) or 'none'})")
    tags = candidates(ckpt_root, tag or "latest")
    if not tags:
        raise UserError(f"{ckpt_root}: no complete checkpoint")
    problems = []
    for t in tags:
        problem = manifest.verify(ckpt_root / t)
        if problem is None:
            if problems:
                print(f"megaslm: using {t}, the newest checkpoint that passes verification", file=sys.stderr)
            elif not manifest.has_manifest(ckpt_root / t):
                print(f"megaslm: checkpoint {t} has no manifest (written before megaslm recorded them): "
                      f"reading it without verification", file=sys.stderr)
            return t
        problems.append(problem)
        print(f"megaslm: checkpoint {t} is unusable: {problem}", file=sys.stderr)
    raise UserError(f"no checkpoint in {ckpt_root} passes verification ({'; '.join(problems)})")


def pruned_message(run: Path, tag: str) -> str:
    """Why a checkpoint's files vanished while export read them: the live run that pruned it, when one holds
    the directory."""
    from megaslm.lease import LEASE_FILE, holder_text, live_holder

    rec = live_holder(run / LEASE_FILE)
    who = (f"the live run {holder_text(rec)} removed it, keeping its newest train.keep_checkpoints checkpoints"
           if rec else "it was removed (pruned or deleted) by another process")
    return (f"checkpoint {tag} in {run / 'checkpoints'} went away while it was read: {who}. Export again (it takes "
            f"the newest complete checkpoint), or wait for the run to end")


def load_run_model(run_dir: str | Path, tag: str | None = None):
    """(model, tag): the Hugging Face model of a run's checkpoint `tag` (default: the latest complete one), in the
    checkpoint's fp32 master precision, on the CPU."""
    run = Path(run_dir)
    ckpt_root = run / "checkpoints"
    if not (run / run_files.CONFIG).is_file():
        raise UserError(f"{run}: not a megaslm run directory (no {run_files.CONFIG})")
    tag = verified_tag(ckpt_root, tag)
    hf_cfg = AutoConfig.from_pretrained(run / "hf_config", local_files_only=True)
    try:
        state = consolidated_state_dict(ckpt_root, tag, run)
    except Exception as e:  # noqa: BLE001 - pruned under us, or a damaged file: name it if a deep check finds it
        if not manifest.files_present(ckpt_root / tag):
            raise UserError(pruned_message(run, tag)) from None
        if isinstance(e, UserError):
            raise
        problem = manifest.diagnose(ckpt_root / tag)
        if problem is None:
            raise
        raise UserError(f"checkpoint {tag} cannot be read: {problem}") from e

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    model = model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {ckpt_root / tag} does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    # Non-persistent buffers (rotary inv_freq) are not in checkpoints: take them from a freshly built module.
    for mod in model.modules():
        if hasattr(mod, "inv_freq") and hasattr(mod, "config"):
            fresh = type(mod)(mod.config)
            for name, buf in fresh.named_buffers(recurse=False):
                getattr(mod, name).copy_(buf)
    return model, tag


def export(run_dir: str, out: str, tag: str | None = None, force: bool = False) -> Path:
    run = Path(run_dir)
    dest = Path(out)
    check_destination(dest, force)  # before the minutes of consolidation
    model, tag = load_run_model(run, tag)
    info = run_files.run_info(run) or {}
    dtype = getattr(torch, info.get("dtype", "float32"))
    model = model.to(dtype)

    tmp = dest.with_name(dest.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" for one small file
    model.save_pretrained(tmp, safe_serialization=True)
    tok = find_tokenizer(run)
    if tok:
        from megaslm.data.tokenizer import load_tokenizer

        load_tokenizer(tok).save_pretrained(str(tmp))
    files = sorted({*written_files(tmp), MANIFEST})
    (tmp / MANIFEST).write_text(json.dumps({"run_dir": str(run.resolve()), "tag": tag, "tokenizer": tok,
                                            "files": files}, indent=2))
    for f in tmp.rglob("*"):  # safetensors writes model.safetensors 0600, whatever the umask
        if f.is_file() and not f.is_symlink():
            f.chmod(0o666 & ~umask())
    place(tmp, dest, force)
    return dest
