"""One live run per run directory: an exclusive lease, held by rank 0 and kept alive by a heartbeat.

`megaslm train` takes the lease `RUN_DIR/lease.json` before it writes anything into RUN_DIR (`megaslm score` takes
`<reference.cache>.lease.json`); a second launch on the same directory is refused in one line that names the
holder. The file is JSON, written atomically (temp file + rename), with:

    host, pid, machine   where the holder runs (machine: boot id + pid namespace, for the same-machine pid test)
    slurm_job_id, slurm_restart_count
    started, heartbeat   Unix times; the heartbeat is rewritten every `stale_after_s / BEATS_PER_BOUND` seconds
    stale_after_s        the holder's own bound: a reader takes the lease over once the heartbeat is older
    token                random, unique per holder: only the holder refreshes or removes its lease

Liveness is the heartbeat's age, because a pid means nothing on another node of a shared filesystem. Two fast
paths: a holder on this machine whose pid is gone is dead at once, and a Slurm job restarted under the same
SLURM_JOB_ID (a requeue: a higher SLURM_RESTART_COUNT) takes over its own lease. `force` takes over any lease.

Races: a lease is created with O_EXCL, and a taken-over one is first renamed to a name unique to the taker, so
of two launches racing for the same directory exactly one wins. The lease is removed when the run ends (normal
end, error, SIGTERM/SIGUSR1/Ctrl-C stop); after SIGKILL or a node failure it is left behind and ages out.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from pathlib import Path

from megaslm.errors import UserError

LEASE_FILE = "lease.json"
DEFAULT_STALE_AFTER_S = 300.0
BEATS_PER_BOUND = 15  # heartbeats per stale bound: 20 s at the default 300 s


class LeaseHeld(UserError):
    """A live run holds the lease."""


_launch: "Lease | None" = None  # the lease this process took for its launch (rank 0 only): the fence checks


def holding() -> bool:
    """False once this process's launch lease is known lost (the heartbeat or a check saw it); no file read.
    True in a process that holds no launch lease (another rank, a test): rank 0 decides for the launch."""
    return _launch is None or not _launch.lost


def still_holding() -> bool:
    """The fence before a write to the run directory: rereads the lease file (one small read) and compares its
    token with this launch's. True in a process without a launch lease."""
    return _launch is None or _launch.verify()


def lost_message(where: str = "") -> str:
    """The one line a launch that lost its lease stops with, naming the new holder."""
    return _launch.lost_message(where) if _launch is not None else f"this launch lost its lease{where}"


def machine_id() -> str:
    """The boot id and pid namespace of this process: two processes that share it can test each other's pids."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""
    return f"{boot}:{ns}"


def read_lease(path: Path) -> dict | None:
    """The lease at `path`, None when there is none; a file that is not a lease reads as {} (taken over)."""
    try:
        rec = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


GAP_WAIT_S = 2.0  # how long a holder that finds no lease file waits for a taker's lease to appear


def read_taker(path: Path) -> dict | None:
    """The lease at `path` as a holder that lost it reads it: a taker first renames the old lease aside and then
    creates its own, so a file missing for a moment is looked at again (for up to GAP_WAIT_S) to name the taker."""
    deadline = time.monotonic() + GAP_WAIT_S
    while (rec := read_lease(path)) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return rec


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def holder_text(rec: dict, now: float | None = None) -> str:
    """`pid 123 on host gpu7 (Slurm job 55), started 2026-12-01 18:00:00 UTC, heartbeat 4 s ago`."""
    now = time.time() if now is None else now
    job = f" (Slurm job {rec['slurm_job_id']})" if rec.get("slurm_job_id") else ""
    age = now - float(rec.get("heartbeat", 0))
    return (f"pid {rec.get('pid', '?')} on host {rec.get('host', '?')}{job}, started "
            f"{_utc(float(rec.get('started', 0)))}, heartbeat {max(age, 0):.0f} s ago")


def _pid_gone(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError, OverflowError):
        return False
    return False


def judge(rec: dict, *, now: float, env, machine: str, force: bool) -> str | None:
    """Why the lease `rec` may be taken over (a phrase), or None when a live run holds it. Pure but for the pid
    test on this machine."""
    if not rec or "heartbeat" not in rec:
        return "the lease file is not a lease (damaged?)"
    job = env.get("SLURM_JOB_ID")
    if job and str(rec.get("slurm_job_id") or "") == job:
        try:
            mine, theirs = int(env.get("SLURM_RESTART_COUNT") or 0), int(rec.get("slurm_restart_count") or 0)
        except ValueError:
            mine, theirs = 0, 0
        if mine > theirs:
            return f"Slurm job {job} was restarted (restart {mine}; the lease is from restart {theirs})"
    age = now - float(rec["heartbeat"])
    bound = float(rec.get("stale_after_s") or DEFAULT_STALE_AFTER_S)
    if age > bound:
        return f"its heartbeat is {age:.0f} s old (stale after {bound:.0f} s)"
    if machine and rec.get("machine") == machine and _pid_gone(rec.get("pid")):
        return f"pid {rec.get('pid')} is no longer running on this machine"
    if force:
        return "forced (--force / run.take_over)"
    return None


class Lease:
    """The lease file `path` for `what` (a phrase naming the directory, for messages)."""

    def __init__(self, path: Path | str, what: str, *, stale_after_s: float = DEFAULT_STALE_AFTER_S,
                 heartbeat_s: float | None = None, force_hint: str = "--force (or --set run.take_over=true)"):
        self.path = Path(path)
        self.what = what
        self.force_hint = force_hint
        self.stale_after_s = float(stale_after_s)
        self.heartbeat_s = heartbeat_s or self.stale_after_s / BEATS_PER_BOUND
        self.token = secrets.token_hex(8)
        self.held = False
        self.lost = False  # set once the lease file is seen to be another holder's (or gone) while held
        self.lost_to: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ the file
    def _record(self, started: float) -> dict:
        env = os.environ
        restarts = env.get("SLURM_RESTART_COUNT") or "0"
        return {"host": socket.gethostname(), "pid": os.getpid(), "machine": machine_id(),
                "slurm_job_id": env.get("SLURM_JOB_ID"),
                "slurm_restart_count": int(restarts) if restarts.isdigit() else 0,
                "started": started, "started_utc": _utc(started), "heartbeat": time.time(),
                "stale_after_s": self.stale_after_s, "token": self.token, "argv": sys.argv[1:]}

    def _create(self) -> bool:
        """Write a new lease with O_EXCL: True when this process now holds it, False when a file is there."""
        self.started = time.time()
        data = json.dumps(self._record(self.started), indent=1).encode()
        # Written under a private name, then linked in: the lease appears complete or not at all.
        tmp = self.path.with_name(f".{self.path.name}.{self.token}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)  # fails if the file exists: exactly one of two racing launches wins
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _refresh(self) -> bool:
        """Rewrite the heartbeat; False (and no write) when another holder has taken the lease over."""
        with self._lock:
            if not self.held:
                return False
            cur = read_lease(self.path)
            if not cur or cur.get("token") != self.token:
                return False
            tmp = self.path.with_name(f".{self.path.name}.{self.token}")
            tmp.write_text(json.dumps({**self._record(self.started), "heartbeat": time.time()}, indent=1))
            os.replace(tmp, self.path)
            return True

    def verify(self) -> bool:
        """True while the lease file still carries this holder's token; otherwise marks the lease lost."""
        if self.lost:
            return False
        cur = read_lease(self.path)
        if cur and cur.get("token") == self.token:
            return True
        self._mark_lost(cur)
        return False

    def _mark_lost(self, cur: dict | None = None) -> None:
        """Record the lease as lost to `cur`, the file as read; None (no file, or not read) is looked at again, since
        it may be a taker's moment between moving the old lease aside and creating its own."""
        self.lost_to = (read_taker(self.path) if cur is None else cur) or None
        self.held = False
        self.lost = True

    def lost_message(self, where: str = "") -> str:
        who = (holder_text(self.lost_to) if self.lost_to else
               "another launch (the lease file is gone now: that launch may have ended)")
        return (f"this launch lost the lease on {self.what}{where}: it was taken over by {who}. It stopped without "
                f"writing anything more there; the directory is the other launch's now")

    # ------------------------------------------------------------------ take, keep, give back
    def acquire(self, *, force: bool = False, say=print) -> None:
        """Take the lease or raise LeaseHeld naming the holder; a takeover is announced with `say`."""
        self.made_dir = not self.path.parent.exists()  # removed again by release() if still empty
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lease that vanishes or changes while it is judged: look again
            if self._create():
                self.held = True
                return
            rec = read_lease(self.path)
            if rec is None:
                continue
            why = judge(rec, now=time.time(), env=os.environ, machine=machine_id(), force=force)
            if why is None:
                raise LeaseHeld(
                    f"{self.what} is in use by a live run: {holder_text(rec)} (lease {self.path}). Wait for it to "
                    f"end, use another directory, or take over with {self.force_hint} if "
                    f"that run is gone; a lease whose heartbeat is older than "
                    f"{float(rec.get('stale_after_s') or DEFAULT_STALE_AFTER_S):.0f} s is taken over by itself")
            # Move the old lease aside under a name of our own: only one taker's rename succeeds.
            aside = self.path.with_name(f".{self.path.name}.taken-{self.token}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            moved = read_lease(aside)
            if moved and rec and moved.get("token") != rec.get("token"):
                # Another launch took it over between our read and our rename: put its lease back, look again.
                try:
                    os.link(aside, self.path)
                except FileExistsError:
                    pass
                aside.unlink(missing_ok=True)
                continue
            aside.unlink(missing_ok=True)
            if self._create():
                self.held = True
                who = holder_text(rec) if rec else "an unreadable lease"
                say(f"megaslm: took over the lease on {self.what} from {who}: {why}", flush=True)
                return
        raise LeaseHeld(f"{self.what}: could not take the lease {self.path}: other launches keep taking it")

    def start_heartbeat(self) -> None:
        """Refresh the heartbeat from a daemon thread until release(); once the lease is seen taken from us, mark
        it lost and stop (the training loop then stops within a step and prints who holds it now)."""
        if self._thread is not None or not self.held:
            return

        def beat():
            while not self._stop.wait(self.heartbeat_s):
                try:
                    ok = self._refresh()
                except OSError as e:  # a full or unreachable disk: keep trying; the bound is many beats long
                    print(f"megaslm: warning: could not refresh the lease {self.path}: {e}", file=sys.stderr,
                          flush=True)
                    continue
                if not ok and self.held:
                    self._mark_lost()
                    return

        self._thread = threading.Thread(target=beat, name="megaslm-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Remove the lease if it is still ours (never a taker's)."""
        self._stop.set()
        global _launch
        if _launch is self:
            _launch = None
        with self._lock:
            if not self.held:
                return
            self.held = False
            rec = read_lease(self.path)
            if rec and rec.get("token") == self.token:
                self.path.unlink(missing_ok=True)
            if getattr(self, "made_dir", False):
                try:  # a launch refused before it wrote anything leaves no run directory behind
                    self.path.parent.rmdir()
                except OSError:
                    pass


def live_holder(path: Path | str) -> dict | None:
    """The lease at `path` when a live run holds it (heartbeat within its bound), else None."""
    rec = read_lease(Path(path))
    if not rec:
        return None
    if judge(rec, now=time.time(), env={}, machine=machine_id(), force=False) is not None:
        return None
    return rec


def warn_if_live(run_dir: Path | str, doing: str) -> None:
    """For readers of a run directory (export, analyze): say so when a live run holds it."""
    rec = live_holder(Path(run_dir) / LEASE_FILE)
    if rec:
        print(f"megaslm: warning: {run_dir} is held by a live run ({holder_text(rec)}): {doing}", file=sys.stderr,
              flush=True)


def acquire_for_launch(path: Path | str, what: str, *, force: bool, stale_after_s: float,
                       force_hint: str = "--force (or --set run.take_over=true)") -> Lease | None:
    """Called by every rank of a launch before anything is written: rank 0 takes the lease and starts its
    heartbeat; the other ranks return None. A refusal reaches every rank: rank 0 prints the one error line at once
    and exits 2 (SystemExit) and, in a multi-process launch, the others learn it from a broadcast over the
    process group (which the run would create next anyway) and exit quietly (status 0, before rank 0, which
    exits 2), instead of waiting for a rendezvous that would never come."""
    env = os.environ  # the launcher's rank, read without importing torch: a refusal comes in about a second
    rank = int(env.get("RANK") or env.get("SLURM_PROCID") or 0)
    world = int(env.get("WORLD_SIZE") or (env.get("SLURM_NTASKS") if "RANK" not in env else None) or 1)
    lease, refusal = None, None
    if rank == 0:
        lease = Lease(path, what, stale_after_s=stale_after_s, force_hint=force_hint)
        try:
            lease.acquire(force=force)
        except LeaseHeld as e:
            lease, refusal = None, e
            print(f"error: {e}", file=sys.stderr, flush=True)  # now, before the other ranks are waited for
    if world > 1:
        import torch.distributed as dist

        from megaslm.parallel import dist as mdist

        mdist.init_distributed()
        box = [str(refusal) if refusal else None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            dist.barrier()  # every rank has the verdict before any leaves
            if rank != 0:
                # Quietly and first, as the other ranks do after a preemption checkpoint: rank 0 reports (exit 2).
                # Leaving after rank 0 would have `srun --kill-on-bad-exit` kill us, and report that instead.
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
            dist.destroy_process_group()
            raise SystemExit(2)
    elif refusal is not None:
        raise SystemExit(2)
    if lease is not None:
        global _launch
        _launch = lease
        lease.start_heartbeat()
    return lease
