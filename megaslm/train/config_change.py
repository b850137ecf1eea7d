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
    old = ((saved_config(run_dir / "config.yaml") or {}).get("train") or {}).get("weight_decay")
    new = ((config or {}).get("train") or {}).get("weight_decay")
    if old is None or new is None:
        return None
    groups_then, groups_now = (1 if float(wd) == 0 else 2 for wd in (old, new))
    if groups_then == groups_now:
        return None
    return (f"its optimizer state has {groups_then} parameter group(s) (train.weight_decay {old}), this run's "
            f"{groups_now} (train.weight_decay {new}; 0 means one group, any other value two: decay and no decay)")


def saved_config(saved: Path) -> dict | None:
    """The config.yaml the old run saved, as a dict (None when it is missing or unreadable)."""
    import yaml

    try:
        old = yaml.safe_load(saved.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    return old if isinstance(old, dict) else None


def _config_differences(saved: Path, config: dict | None, limit: int = 4) -> str:
    """'key a -> b, ...' between the config saved with the old run and this run's, or '' if either is missing."""
    old = saved_config(saved)
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
    saved = run_dir / "config.yaml"
    diffs = _config_differences(saved, config)
    then = f"; that config -> this one: {diffs}" if diffs else ""
    return (f"checkpoint {tag} in {ckpt_root} belongs to another configuration, not to this one (it is not "
            f"damaged): {what}. It was written by the run configured in {saved}{then}. Set train.resume_from=none "
            f"to start over in {run_dir} (its checkpoints are replaced as the new run saves), or set run.dir to a "
            f"new directory to keep them")


