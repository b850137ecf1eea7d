"""How this run's config differs from the one that wrote the run directory's checkpoints.

- Another configuration's checkpoint (a tensor's shape, a parameter only one model has, the optimizer's
  parameter groups): what differs, in a short phrase, for the one line that refuses the resume.
- The config diff of a resume (`resume_changes`): keys that may change between launches of a run take effect and
  are said in one line each; keys that fix what the checkpoint means (model shape, tokenizer, data, seq_len,
  seed) are refused unless the run starts over (`train.resume_from=none`) or moves to a new `run.dir`.
"""

from __future__ import annotations

import re
from pathlib import Path

from megaslm.run_files import CONFIG, saved_config

_SIZE = re.compile(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from "
                   r"checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)")
_KEYS = re.compile(r"(Missing|Unexpected) key\(s\) in state_dict: ((?:\"[\w.]+\"(?:, )?)+)")
_VOCAB = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_in.weight", "embed_out.weight")


def model_mismatch(e: BaseException) -> str | None:
    """What torch's load_state_dict error says differs between the checkpoint's model and this one (a tensor's
    shape, a parameter only one of them has), in a short phrase; None for any other failure."""
    text = str(e)
    m = _SIZE.search(text)
    if m:
        name, there, here = m.group(1), m.group(2), m.group(3)
        phrase = f"{name} is [{there}] in the checkpoint, [{here}] in this run's model"
        if name.endswith(_VOCAB):
            phrase = f"vocabulary {there.split(',')[0]} there, {here.split(',')[0]} here ({phrase})"
        return phrase
    m = _KEYS.search(text)
    if m:
        keys = m.group(2).split(", ")
        where = "this run's model lacks" if m.group(1) == "Unexpected" else "the checkpoint lacks"
        return f"{where} {keys[0]}{f' and {len(keys) - 1} more' if len(keys) > 1 else ''} (another architecture)"
    return None


def group_layout_change(run_dir: Path, config: dict | None) -> str | None:
    """Why the optimizer state cannot load when train.weight_decay crossed 0 since the run that saved it (one
    parameter group without decay, two with: megaslm/train/build.py param_groups); None otherwise."""
    old = ((saved_config(run_dir) or {}).get("train") or {}).get("weight_decay")
    new = ((config or {}).get("train") or {}).get("weight_decay")
    if old is None or new is None:
        return None
    groups_then, groups_now = (1 if float(wd) == 0 else 2 for wd in (old, new))
    if groups_then == groups_now:
        return None
    return (f"its optimizer state has {groups_then} parameter group(s) (train.weight_decay {old}), this run's "
            f"{groups_now} (train.weight_decay {new}; 0 means one group, any other value two: decay and no decay)")


def _config_differences(run_dir: Path, config: dict | None, limit: int = 4) -> str:
    """'key a -> b, ...' between the config saved with the old run and this run's, or '' if either is missing."""
    old = saved_config(run_dir)
    if config is None or old is None:
        return ""

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    a, b = dict(flat(old)), dict(flat(config))
    diffs = [f"{k} {a.get(k)} -> {b.get(k)}" for k in sorted(set(a) | set(b))
             if a.get(k) != b.get(k) and not k.startswith(("run.", "train.resume_from"))]
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return ", ".join(diffs[:limit]) + more


def other_config_message(ckpt_root: Path, tag: str, what: str, config: dict | None) -> str:
    run_dir = Path(ckpt_root).parent
    saved = run_dir / CONFIG
    diffs = _config_differences(run_dir, config)
    then = f"; that config -> this one: {diffs}" if diffs else ""
    return (f"checkpoint {tag} in {ckpt_root} belongs to another configuration, not to this one (it is not "
            f"damaged): {what}. It was written by the run configured in {saved}{then}. Set train.resume_from=none "
            f"to start over in {run_dir} (its checkpoints are replaced as the new run saves), or set run.dir to a "
            f"new directory to keep them")




# Keys that fix what a checkpoint means: a resume under other values would continue another run's weights on
# another model, tokenization, data or sequence order. (The global batch size is checked by the loader, the
# tensor-parallel size by megaslm/parallel/tensor.py.)
FIXED_KEYS = ("model.preset", "model.init_from", "model.vocab_size", "model.dtype", "data.train",
              "data.tokenizer", "data.document_mask", "train.seq_len", "train.seed")
UNSAID = ("run.", "train.resume_from")  # where the run lives and how it resumes: not a change of the run


def flat_config(d: dict, prefix: str = "") -> dict:
    """{'train.lr': 0.001, ...} of a nested config dict (lists, e.g. a mixture, stay whole)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix == "data." and k == "valid"):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_changes(saved: dict, config: dict) -> tuple[list[str], list[str]]:
    """(changes that take effect, fixed keys that changed), each 'key old -> new', between the config the run
    directory's checkpoints were written under and this launch's."""
    a, b = flat_config(saved), flat_config(config)
    changed, fixed = [], []
    for key in sorted(set(a) | set(b)):
        if key.startswith(UNSAID) or a.get(key) == b.get(key) or key not in a:
            continue  # a key the saved config lacks is a key added to megaslm since: its default applies
        (fixed if key in FIXED_KEYS else changed).append(f"{key} {a.get(key)} -> {b.get(key)}")
    return changed, fixed


def check_resume_config(run_dir: Path, config: dict) -> list[str]:
    """Before a resume: raise UserError naming the fixed keys that changed; else the changes that take effect
    ('train.lr 0.001 -> 0.003'; none when the run directory has no readable config.yaml)."""
    from megaslm.errors import UserError

    saved = saved_config(run_dir)
    if saved is None:
        return []
    changed, fixed = resume_changes(saved, config)
    if fixed:
        raise UserError(f"cannot resume {run_dir} under another {'/'.join(f.split()[0] for f in fixed)}: "
                        f"{', '.join(fixed)} (since {Path(run_dir) / CONFIG}); these fix what its checkpoints mean. Set "
                        f"train.resume_from=none to start over there, or a new run.dir")
    return changed


def apply_optimizer_settings(engine, scheduler, train) -> None:
    """After a checkpoint is loaded: this config's optimizer settings, not the checkpoint's. DeepSpeed restores
    the saved ones with the state: the param groups' lr/betas/weight decay, ZeRO's clip value, and the
    scheduler's base lr (LambdaLR saves base_lrs; its lambda, built from this config, is not saved)."""
    opt = engine.optimizer
    for i, group in enumerate(opt.param_groups):
        group["betas"] = (train.beta1, train.beta2)
        # build.param_groups: the decayed matrices first, then norms and biases at 0. By position, not by the
        # loaded value: DeepSpeed's ZeRO-3 universal load gives every group the first group's hyperparameters.
        group["weight_decay"] = train.weight_decay if i == 0 else 0.0
        group["initial_lr"] = train.lr
    if hasattr(opt, "clip_grad"):
        opt.clip_grad = train.grad_clip
    if scheduler is not None:
        scheduler.base_lrs = [train.lr] * len(opt.param_groups)
        lrs = [train.lr * f(scheduler.last_epoch) for f in scheduler.lr_lambdas]
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr
        scheduler._last_lr = lrs
    else:
        for group in opt.param_groups:
            group["lr"] = train.lr
