"""Resume on another layout: a checkpoint written by another data-parallel size, tensor-parallel size or ZeRO
stage loads through DeepSpeed's universal checkpoint.

DeepSpeed's own checkpoint holds each rank's shard of the fp32 weights and optimizer moments, partitioned for
the layout that wrote it; its loader refuses any other. `deepspeed.checkpoint.ds_to_universal` rewrites a
checkpoint as one fp32 file per parameter and state (`zero/NAME/{fp32,exp_avg,exp_avg_sq}.pt`), which an engine
of any layout loads with `checkpoint.load_universal` on. megaslm converts a tag once, on rank 0, into
`checkpoints/TAG/universal/`: into a staging directory first, renamed into place once complete and marked with
`megaslm_universal.json`, so a conversion cut short never counts (the next launch removes its staging directory
and converts again) and a later launch on the same other layout reuses it. The universal copy goes with its tag
when pruning removes that.

What comes along: the weights, the optimizer moments and step, the lr schedule and every piece of megaslm's
client state (the loader's position, the skip guard, an EMA reference). What cannot: the per-rank RNG streams
(their number is the old world size); see `rng_for_rank`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

UNIVERSAL = "universal"
MARKER = "megaslm_universal.json"
STAGING = ".universal-partial-"

_STAGE3_MODEL = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt")
_MP_MODEL = re.compile(r"mp_rank_(\d+)_model_states\.pt")
_OPTIM = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int
    zero_stage: int

    def __str__(self) -> str:
        tp = f", tensor-parallel {self.tp}" if self.tp > 1 else ""
        stage = self.zero_stage or "1/2"  # 0: a checkpoint of ZeRO-1 or -2 from before megaslm recorded which
        return f"{self.dp} data-parallel rank{'s' if self.dp != 1 else ''}{tp}, ZeRO-{stage}"

    def to_dict(self) -> dict:
        return asdict(self)


def engine_layout(engine) -> Layout:
    """The layout of this launch's engine."""
    return Layout(int(engine.dp_world_size), int(getattr(engine, "mp_world_size", 1) or 1),
                  int(engine.zero_optimization_stage()))


def saved_layout(tag_dir: Path, manifest_layout: dict | None) -> Layout | None:
    """The layout that wrote `tag_dir`: the manifest's record, or for a checkpoint written before megaslm recorded
    it, what DeepSpeed's file names say (per-rank model files are ZeRO-3's; ZeRO-1 and -2 share one format, so
    they read as the engine's own stage). None when the files say nothing (no DeepSpeed checkpoint)."""
    if manifest_layout:
        return Layout(int(manifest_layout["dp"]), int(manifest_layout["tp"]), int(manifest_layout["zero_stage"]))
    names = [p.name for p in Path(tag_dir).iterdir() if p.is_file()]
    stage3 = [m for m in map(_STAGE3_MODEL.fullmatch, names) if m]
    if stage3:
        return Layout(len({m.group(1) for m in stage3}), len({m.group(2) for m in stage3}), 3)
    optim = [m for m in map(_OPTIM.fullmatch, names) if m]
    mp = [m for m in map(_MP_MODEL.fullmatch, names) if m]
    if not optim or not mp:
        return None
    return Layout(len({m.group(1) for m in optim}), len({m.group(1) for m in mp}), 0)  # stage 0: "1 or 2"


def differs(saved: Layout, now: Layout) -> bool:
    """Whether DeepSpeed's own loader cannot take the checkpoint (stage 0 in `saved` is "1 or 2, unrecorded")."""
    stage_differs = (saved.zero_stage == 3) != (now.zero_stage == 3) if saved.zero_stage == 0 else \
        saved.zero_stage != now.zero_stage
    return saved.dp != now.dp or saved.tp != now.tp or stage_differs


def check_supported(tag_dir: Path, then: Layout, now: Layout) -> None:
    """Refuse, in one line, a change DeepSpeed's universal checkpoint does not carry: between ZeRO-1/2 and
    ZeRO-3 (its two converters write optimizer states of different formats, each loadable by its own family)."""
    from megaslm.errors import UserError

    if (then.zero_stage == 3) != (now.zero_stage == 3):
        want = "a ZeRO-3 config (ds_configs/zero3.json)" if then.zero_stage == 3 else \
            "a ZeRO-1 or ZeRO-2 config (ds_configs/zero2.json)"
        raise UserError(f"checkpoint {tag_dir} was written under {then}; this launch is ZeRO-{now.zero_stage}. "
                        f"DeepSpeed's universal checkpoint loads another data-parallel or tensor-parallel size, not "
                        f"across ZeRO-1/2 and ZeRO-3: resume with {want} (any number of ranks), or start over "
                        f"(train.resume_from=none) or in a new run.dir")


def ready(tag_dir: Path) -> Path | None:
    """The finished universal copy of `tag_dir`, or None."""
    out = Path(tag_dir) / UNIVERSAL
    return out if (out / MARKER).is_file() else None


def convert(tag_dir: Path, source: Layout) -> tuple[Path | None, str | None, float]:
    """Rank 0: (the universal directory, None, seconds) after converting `tag_dir` (or finding it converted),
    or (None, one-line reason, seconds) when DeepSpeed's converter fails. Leftover staging directories of an
    interrupted conversion are removed first (megaslm wrote them: their name says so)."""
    tag_dir = Path(tag_dir)
    t0 = time.time()
    done = ready(tag_dir)
    if done:
        return done, None, 0.0
    for old in tag_dir.glob(f"{STAGING}*"):
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tag_dir / UNIVERSAL, ignore_errors=True)  # no marker: a conversion cut short before it
    staging = tag_dir / f"{STAGING}{int(t0)}"
    out = staging / UNIVERSAL
    # A separate process: the converter's worker pools and its prints stay out of the training ranks.
    workers = str(max(1, min(8, (os.cpu_count() or 2) // 2)))  # rank 0's node waits on it: use some of its cores
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(out), "--inject_missing_state", "--num_extract_workers", workers,
           "--num_merge_workers", workers]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        lines = [x for x in res.stderr.splitlines() if x.strip()] or \
            [x for x in res.stdout.splitlines() if x.strip()]  # the exception's own line comes last on stderr
        return None, f"DeepSpeed's ds_to_universal failed on {tag_dir}: {lines[-1] if lines else res.returncode}", \
            time.time() - t0
    _alias_model_states(out, source)
    (out / MARKER).write_text(json.dumps({"source": source.to_dict(), "seconds": round(time.time() - t0, 2)}))
    out.rename(tag_dir / UNIVERSAL)
    shutil.rmtree(staging, ignore_errors=True)
    return tag_dir / UNIVERSAL, None, time.time() - t0


def _alias_model_states(out: Path, source: Layout) -> None:
    """Give the universal copy the model-states file names of both ZeRO families: an engine of ZeRO-3 reads its
    client state from `zero_pp_rank_0_mp_rank_XX_model_states.pt`, one of ZeRO-1/2 from
    `mp_rank_XX_model_states.pt`. The weights themselves come from `zero/` (fp32), whatever the file holds."""
    for p in list(out.iterdir()):
        m = _MP_MODEL.fullmatch(p.name)
        s3 = _STAGE3_MODEL.fullmatch(p.name)
        if m and source.zero_stage != 3:
            twin = out / f"zero_pp_rank_0_mp_rank_{m.group(1)}_model_states.pt"
        elif s3 and s3.group(1) == "0":
            twin = out / f"mp_rank_{s3.group(2)}_model_states.pt"
        else:
            continue
        if not twin.exists():
            shutil.copyfile(p, twin)


def universal_bytes(tag_dir: Path) -> int:
    out = Path(tag_dir) / UNIVERSAL
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())

