"""Checkpoints: DeepSpeed's sharded save plus our per-rank RNG states, a manifest, and a commit pointer.

Layout: `checkpoints/TAG/` (DeepSpeed's files, `rng_rankNNNNN.pt`, `manifest.json`, see manifest.py) and
`checkpoints/latest_complete`, the name of the newest committed tag.

Saving (`save`): rank 0 clears a leftover directory of the same tag (a crashed or abandoned save); every rank
writes its files; the ranks agree on the outcome (an all-gather of each rank's error, never a bare barrier: a rank
whose write failed must not leave the others waiting); rank 0 writes the manifest, then replaces the pointer
atomically (temp file + rename), then prunes. A crash at any point leaves the previous pointer in force. A failed
write (full disk, permissions, I/O error) removes the partial directory, keeps the previous pointer and stops
every rank with one line naming the file and the OS's reason.

Loading (`resume`): `train.resume_from` is `latest` (the pointer's tag, then older tags, newest first), a tag, or
`none`. Each candidate is verified against its manifest on every rank before DeepSpeed touches the engine; a
failed check or a failed load is reported in one line naming the file and the next candidate is tried. A load
that fails half-way may have left the engine half-loaded: that is only accepted if a later candidate then loads
completely (every part DeepSpeed loads is overwritten by a full load); otherwise the run stops.
A checkpoint that is intact but holds another configuration's model (tensor shapes or names differ: another
vocabulary, width, depth) is no damage: the run stops at once with one line naming the differing tensor, the
config of the run that wrote it (RUN_DIR/config.yaml, still the old one at that point) and how it differs from
this config, and the two ways on (`train.resume_from=none`, or a new `run.dir`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from megaslm.atomic import write_text
from megaslm.config import CHECKPOINT_TAG_RE
from megaslm.errors import UserError
from megaslm.train import manifest, reshard
from megaslm.train.config_change import group_layout_change, model_mismatch, other_config_message
from megaslm.faults import maybe_fail, maybe_fail_write
from megaslm.lease import lost_message, still_holding
from megaslm.train.halt import halt
from megaslm.train.rng import load_rng, rng_for_rank, rng_state, set_rng_state

POINTER = "latest_complete"
FENCED = "the lease of this launch was taken over"  # a save's outcome on rank 0 after a lost lease


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def pointer_tag(ckpt_root: Path) -> str | None:
    """The tag `latest_complete` names (whether or not its directory still exists)."""
    p = Path(ckpt_root) / POINTER
    if not p.is_file():
        return None
    return p.read_text().strip() or None


def latest_tag(ckpt_root: Path) -> str | None:
    tag = pointer_tag(ckpt_root)
    return tag if tag and (Path(ckpt_root) / tag).is_dir() else None


# ---------------------------------------------------------------------------------------------------- saving
def save(engine, ckpt_root: Path, step: int, client_state: dict, keep: int) -> str:
    """Write and commit checkpoint `step` on every rank; on a failed write, stop every rank (RunHalted)."""
    ckpt_root = Path(ckpt_root)
    tag = tag_for(step)
    rank = dist.get_rank()
    error = _agree((_fence() or _prepare_dir(ckpt_root, tag)) if rank == 0 else None)
    if error is None:
        local = _write_files(engine, ckpt_root, tag, step, client_state)
        maybe_fail("crash_in_save", step)
        error = _agree(local)
    if error is None:
        layout = reshard.engine_layout(engine).to_dict()
        error = _agree((_fence() or _commit(ckpt_root, tag, step, keep, layout)) if rank == 0 else None)
    if error is not None and FENCED in error:  # the run directory is another launch's now: touch nothing
        halt(lost_message(f" (saving {tag})"), rank)
    if error is not None:
        _abandon(ckpt_root, tag, error)
    return tag


def _fence() -> str | None:
    """Rank 0, before the save writes into the run directory and again before it commits: FENCED once this
    launch no longer holds the run directory's lease (the file's token is another launch's)."""
    return None if still_holding() else FENCED


def agree_fenced() -> bool:
    """Every rank: whether rank 0 found the lease lost (one collective; for the writes at startup)."""
    return _agree(_fence() if dist.get_rank() == 0 else None) is not None


def _agree(local_error: str | None, name_rank: bool = True) -> str | None:
    """Every rank's outcome of one phase; the first failure (naming its rank) or None, the same on all ranks."""
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, local_error)  # a collective every rank reaches, failed or not
    for r, e in enumerate(errors):
        if e is not None:
            return f"rank {r}: {e}" if name_rank else e
    return None


def _prepare_dir(ckpt_root: Path, tag: str) -> str | None:
    """Rank 0: an empty directory for the tag (a leftover of a crashed save would mix old files into this one)."""
    tag_dir = ckpt_root / tag
    try:
        if tag_dir.exists() and tag != pointer_tag(ckpt_root):
            shutil.rmtree(tag_dir)
        tag_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return write_error(e, tag_dir)
    return None


class _RecordingWrites:
    """Wraps DeepSpeed's checkpoint engine: a failed write is recorded instead of raised, so this rank still
    goes through the collectives of DeepSpeed's save_checkpoint and the others never wait for it."""

    def __init__(self, inner, step: int):
        self.inner, self.step, self.error = inner, step, None

    def save(self, state_dict, path: str) -> None:
        if self.error is not None:
            return
        if dist.get_rank() == 0 and _fence():  # taken over mid-save: never overwrite the other launch's files
            self.error = FENCED
            return
        try:
            maybe_fail_write(self.step, dist.get_rank(), dist.get_world_size(), path)
            self.inner.save(state_dict, path)
        except (OSError, RuntimeError) as e:  # torch.save reports a short write as RuntimeError
            self.error = write_error(e, Path(path))

    def makedirs(self, path, exist_ok=False) -> None:
        try:
            self.inner.makedirs(path, exist_ok=exist_ok)
        except OSError as e:
            self.error = self.error or write_error(e, Path(path))

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _write_files(engine, ckpt_root: Path, tag: str, step: int, client_state: dict) -> str | None:
    """This rank's files of the checkpoint; the error of the first write that failed, or None."""
    rec = _RecordingWrites(engine.checkpoint_engine, step)
    engine.checkpoint_engine = rec
    try:
        engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=client_state, save_latest=False)
    except OSError as e:
        # A write DeepSpeed makes itself (rank 0 copies zero_to_fp32.py) after the last checkpoint file and
        # before save_checkpoint's closing barrier: take that barrier here so the other ranks are released.
        rec.error = rec.error or write_error(e, ckpt_root / tag)
        dist.barrier()
    finally:
        engine.checkpoint_engine = rec.inner
    rec.save(rng_state(), str(ckpt_root / tag / f"rng_rank{dist.get_rank():05d}.pt"))
    return rec.error


def _commit(ckpt_root: Path, tag: str, step: int, keep: int, layout: dict) -> str | None:
    """Rank 0, once every rank's files are written: manifest, then pointer, then pruning."""
    try:
        manifest.write_manifest(ckpt_root / tag, step, dist.get_world_size(), layout)
        write_text(ckpt_root / POINTER, tag)
    except OSError as e:
        return write_error(e, ckpt_root / tag)
    _prune(ckpt_root, keep, tag)
    return None


def _abandon(ckpt_root: Path, tag: str, error: str) -> None:
    """A failed save: rank 0 removes the partial tag; every rank stops with one message (printed by rank 0)."""
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(ckpt_root / tag, ignore_errors=True)
    prev = latest_tag(ckpt_root)
    kept = f"{POINTER} still names {prev}" if prev else "there is no earlier complete checkpoint"
    halt(f"saving checkpoint {tag} failed on {error}; removed the partial {ckpt_root / tag}; {kept}. "
         f"Fix the cause and re-run the same command to resume", rank)


def write_error(e: BaseException, path: Path) -> str:
    """'PATH: reason' for a failed write; the OS's reason where torch.save only says the write came up short."""
    if isinstance(e, OSError) and e.errno:
        return f"{e.filename or path}: {e.strerror}"
    reason = _probe_write(path if path.is_dir() else path.parent)
    return f"{path}: {reason or str(e).splitlines()[0]}"


def _probe_write(directory: Path) -> str | None:
    """Write 1 MiB beside the failed file: the OS error it raises (e.g. 'No space left on device'), or None."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".megaslm-probe-", dir=directory)
    except OSError as e:
        return e.strerror
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"\0" * (1 << 20))
            f.flush()
            os.fsync(f.fileno())
        return None
    except OSError as e:
        return e.strerror
    finally:
        Path(tmp).unlink(missing_ok=True)


def list_tags(ckpt_root: Path) -> list[str]:
    """Checkpoint tags present on disk, oldest first (complete ones are those <= the `latest_complete` tag)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    return sorted(d.name for d in root.iterdir() if d.is_dir() and CHECKPOINT_TAG_RE.fullmatch(d.name))


def _prune(ckpt_root: Path, keep: int, current: str) -> None:
    """Keep the newest `keep` checkpoints; keep == 0 keeps all of them (for `megaslm analyze dynamics`)."""
    tags = list_tags(ckpt_root)
    older = [t for t in tags if t < current] if keep > 0 else []
    for t in older[: max(0, len(older) - (keep - 1))]:
        shutil.rmtree(ckpt_root / t, ignore_errors=True)
    for t in tags:  # a tag newer than the committed one is a crashed or abandoned save: it is garbage
        if t > current:
            shutil.rmtree(ckpt_root / t, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- loading
def candidates(ckpt_root: Path, resume_from: str) -> list[str]:
    """The tags to try, in order: `latest` -> the pointer's tag, then older tags (newest first); tags newer than
    the pointer are unfinished saves. A tag -> that tag alone. `none` -> nothing."""
    ckpt_root = Path(ckpt_root)
    if resume_from == "none":
        return []
    if resume_from != "latest":
        if not (ckpt_root / resume_from).is_dir():
            raise UserError(f"train.resume_from: no checkpoint {resume_from} in {ckpt_root} "
                            f"(have: {', '.join(list_tags(ckpt_root)) or 'none'}; or use latest / none)")
        return [resume_from]
    newest = pointer_tag(ckpt_root)
    if newest is None:
        return []
    return [newest, *sorted((t for t in list_tags(ckpt_root) if t < newest), reverse=True)]


def resume(engine, ckpt_root: Path, resume_from: str, say, config: dict | None = None) -> dict | None:
    """Load the first candidate that verifies and loads on every rank; its client state (with "tag"), or None
    when there is nothing to resume. `say(line)` prints on rank 0. Raises UserError if no candidate loads, or
    at once if one is another configuration's (`config`, this run's resolved config, names the differences)."""
    ckpt_root = Path(ckpt_root)
    if resume_from == "none":
        _forget(ckpt_root, say)
        return None
    tags = candidates(ckpt_root, resume_from)
    problems = []
    for tag in tags:
        problem = _agree(manifest.verify(ckpt_root / tag), name_rank=False)  # ranks see the same files
        if problem is None and not manifest.has_manifest(ckpt_root / tag):
            say(f"megaslm: checkpoint {tag} has no manifest (written before megaslm recorded them): "
                f"loading it without verification")
        if problem is None:
            state, problem, other_config = _try_load(engine, ckpt_root, tag, config, say)
            if other_config:
                raise UserError(other_config_message(ckpt_root, tag, problem, config))
            if problem is None:
                _settle(ckpt_root, tag, tags, say)
                return state
        problems.append(f"{tag}: {problem}")
        say(f"megaslm: checkpoint {tag} is unusable: {problem}")
    if problems:
        raise UserError(f"no checkpoint in {ckpt_root} could be loaded ({'; '.join(problems)}). Restore the "
                        f"damaged file, or set train.resume_from=none to start over (existing checkpoints are "
                        f"replaced as the new run saves)")
    return None


def _forget(ckpt_root: Path, say) -> None:
    """resume_from=none in a run directory with checkpoints: they stop being this run's (no pointer names them,
    so the new run's saves replace them instead of writing into a committed directory)."""
    old = pointer_tag(ckpt_root)
    if old is None:
        return
    say(f"megaslm: train.resume_from=none: starting at step 0; {ckpt_root} held {old}, which is no longer "
        f"resumed from (the checkpoints there are replaced as this run saves)")
    if dist.get_rank() == 0:
        (ckpt_root / POINTER).unlink(missing_ok=True)


def _try_load(engine, ckpt_root: Path, tag: str, config: dict | None,
              say) -> tuple[dict | None, str | None, bool]:
    """(client state, problem, whether the problem is another configuration's model rather than damage)."""
    outcome = None
    try:
        state = _load(engine, ckpt_root, tag, config, say)
    except UserError:  # a layout DeepSpeed cannot convert to: the same on every rank, and no damage
        raise
    except Exception as e:  # noqa: BLE001 - any failure inside DeepSpeed's load is reported the same way
        state = None
        damage = manifest.diagnose(ckpt_root / tag)
        shapes = None if damage else (model_mismatch(e) or group_layout_change(ckpt_root.parent, config))
        outcome = (damage or shapes or f"loading failed: {type(e).__name__}: {e}", shapes is not None)
    agreed = _agree(outcome, name_rank=False)
    return (state, None, False) if agreed is None else (None, *agreed)


def _load(engine, ckpt_root: Path, tag: str, config: dict | None, say) -> dict:
    tag_dir = ckpt_root / tag
    now = reshard.engine_layout(engine)
    then = reshard.saved_layout(tag_dir, manifest.saved_layout(tag_dir))
    if then is not None and reshard.differs(then, now):
        reshard.check_supported(tag_dir, then, now)
        client_state = _load_universal(engine, tag_dir, then, now, say)
        seed = int(((config or {}).get("train") or {}).get("seed", 0))
        set_rng_state(rng_for_rank(seed, int(client_state["step"]), dist.get_rank()))
    else:
        _, client_state = engine.load_checkpoint(str(ckpt_root), tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
        if client_state is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
        rng_file = tag_dir / f"rng_rank{dist.get_rank():05d}.pt"
        if rng_file.exists() and not load_rng(rng_file) and dist.get_rank() == 0:
            print(f"megaslm: {rng_file} is of the earlier pickled format: not loaded (megaslm loads no pickles "
                  f"from a run directory); the random streams continue from this launch's seed", flush=True)
    client_state["tag"] = tag
    return client_state


def _load_universal(engine, tag_dir: Path, then: reshard.Layout, now: reshard.Layout, say) -> dict:
    """Load `tag_dir` written by another layout: rank 0 converts it to DeepSpeed's universal format once (the
    other ranks wait in the agreement), then every rank loads that with `load_universal` on."""
    done = None
    if dist.get_rank() == 0:
        out, problem, seconds = (None, FENCED, 0.0) if _fence() else reshard.convert(tag_dir, then)
        done = problem or (f"converted once into {out} in {seconds:.1f} s" if seconds else f"converted before, "
                                                                                               f"in {out}")
    note = _agree(done if dist.get_rank() == 0 else None, name_rank=False)
    if note == FENCED:
        halt(lost_message(f" (converting {tag_dir.name})"), dist.get_rank())
    if not note.startswith("converted"):  # not damage: the same would happen to every tag of this layout
        raise UserError(f"checkpoint {tag_dir.name} was written by {then}; this launch has {now}, and {note}. "
                        f"Resume with the layout it was written with, or start over (train.resume_from=none) or in "
                        f"a new run.dir")
    say(f"megaslm: checkpoint {tag_dir.name} was written by {then}; this launch has {now}: loading it as "
        f"DeepSpeed's universal checkpoint ({note}); the per-rank random streams are re-derived from train.seed, "
        f"the step and the rank (docs/resilience.md)")
    engine._config.load_universal_checkpoint = True  # read on every call; on only for this load
    try:
        _, client_state = engine.load_checkpoint(str(tag_dir), tag=reshard.UNIVERSAL, load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
    finally:
        engine._config.load_universal_checkpoint = False
    _unshare_adam_steps(engine.optimizer)
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load the universal checkpoint {tag_dir / reshard.UNIVERSAL}")
    return client_state


def _unshare_adam_steps(optimizer) -> None:
    """DeepSpeed's ZeRO-3 universal load gives every parameter group's state one and the same `step` tensor;
    torch's Adam increments it in place once per group, so with two groups (decay, no decay) the bias
    correction would count two steps per step. Each state gets its own copy."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in getattr(inner, "state", {}).values():
        if isinstance(state, dict) and torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _settle(ckpt_root: Path, tag: str, tags: list[str], say) -> None:
    """After loading an older tag than the pointer's: the pointer names it, so that a crash before the next save
    resumes from here too; the later tags are no longer this run's history (the next save removes them)."""
    newest = pointer_tag(ckpt_root)
    if tag == newest:
        return
    if tag != tags[0]:
        say(f"megaslm: falling back to {tag}, the newest checkpoint that verifies and loads")
    dist.barrier()  # every rank has read the pointer before rank 0 replaces it
    if dist.get_rank() == 0:
        write_text(ckpt_root / POINTER, tag)
        say(f"megaslm: {POINTER} now names {tag} (was {newest or 'unset'}); later checkpoints are removed at "
            f"the next save")
