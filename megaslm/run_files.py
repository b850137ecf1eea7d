"""The files of a run directory, named and read in one place.

    RUN_DIR/config.yaml      the resolved config (written at every launch; a resume compares against it)
    RUN_DIR/run_info.json    what the run is: model summary, dtype, layout, step-batch changes
    RUN_DIR/metrics.jsonl    one JSON record per logged step (a line cut by a crash is skipped on reading)
    RUN_DIR/checkpoints/     DeepSpeed checkpoints (megaslm/train/checkpoint.py owns their tags)
    RUN_DIR/hf_config/       the Hugging Face config of the trained model

Readers that may meet a directory of another kind return None or raise `UserError` naming the file; none
imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from megaslm.errors import UserError

CONFIG = "config.yaml"
RUN_INFO = "run_info.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file() and (Path(path) / CHECKPOINTS).is_dir()


def saved_config(run_dir: str | Path) -> dict | None:
    """The config the run saved, as a dict; None when it is missing or unreadable."""
    import yaml

    try:
        cfg = yaml.safe_load((Path(run_dir) / CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    return cfg if isinstance(cfg, dict) else None


def run_config(run_dir: str | Path) -> dict:
    """The config the run saved; a directory without a readable one is not a megaslm run directory."""
    cfg = saved_config(run_dir)
    if cfg is None:
        raise UserError(f"{Path(run_dir) / CONFIG}: missing or unreadable (is {run_dir} a megaslm run directory?)")
    return cfg


def run_info(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / RUN_INFO
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable ({e})") from None


def metrics(run_dir: str | Path) -> list[dict]:
    """The run's metric records in order; a line cut by a crash is skipped."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise UserError(f"{Path(run_dir)}: no {METRICS} (is it a megaslm run directory?)")
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
