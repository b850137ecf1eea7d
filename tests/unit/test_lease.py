"""The run lease (megaslm/lease.py) without a run: who may take it, exclusivity, heartbeat, release."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from megaslm import lease as L


def rec(**kw):
    now = time.time()
    r = {"host": "gpu7", "pid": 4242, "machine": "elsewhere", "slurm_job_id": None, "slurm_restart_count": 0,
         "started": now - 100, "heartbeat": now - 5, "stale_after_s": 300.0, "token": "t"}
    r.update(kw)
    return r


def judge(r, env=None, force=False, machine="here"):
    return L.judge(r, now=time.time(), env=env or {}, machine=machine, force=force)


def test_judge_live_stale_requeue_force_and_damaged():
    assert judge(rec()) is None  # fresh heartbeat on another machine: live
    assert "heartbeat is 301 s old (stale after 300 s)" in judge(rec(heartbeat=time.time() - 301))
    assert judge(rec(heartbeat=time.time() - 299)) is None
    assert "stale after 60 s" in judge(rec(heartbeat=time.time() - 61, stale_after_s=60))  # the holder's bound
    # A requeued Slurm job (same id, higher restart count) takes over its own lease; another job does not.
    job = {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}
    assert "Slurm job 77 was restarted (restart 1; the lease is from restart 0)" in judge(rec(slurm_job_id="77"), job)
    assert judge(rec(slurm_job_id="78"), job) is None
    assert judge(rec(slurm_job_id="77", slurm_restart_count=1), job) is None  # a second launch in one allocation
    assert "forced" in judge(rec(), force=True)
    assert "not a lease" in judge({})


def test_judge_tests_pids_only_on_the_same_machine():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    me = L.machine_id()
    assert me  # Linux: boot id + pid namespace
    assert f"pid {dead} is no longer running on this machine" in judge(rec(pid=int(dead), machine=me), machine=me)
    assert judge(rec(pid=int(dead), machine="other-node"), machine=me) is None  # a pid elsewhere means nothing
    assert judge(rec(pid=os.getpid(), machine=me), machine=me) is None


def test_second_holder_is_refused_naming_the_first(tmp_path):
    a = L.Lease(tmp_path / "run" / L.LEASE_FILE, "run directory R")
    a.acquire()
    held = json.loads(a.path.read_text())
    assert held["pid"] == os.getpid() and held["token"] == a.token and held["stale_after_s"] == 300.0
    b = L.Lease(a.path, "run directory R")
    with pytest.raises(L.LeaseHeld) as e:
        b.acquire()
    msg = str(e.value)
    assert msg.startswith(f"run directory R is in use by a live run: pid {os.getpid()} on host ")
    assert "heartbeat 0 s ago" in msg and "--force" in msg and str(a.path) in msg
    b.release()  # a refused launch removes nothing
    assert json.loads(a.path.read_text())["token"] == a.token
    a.release()
    assert not a.path.exists() and not a.path.parent.exists()  # it made the directory and wrote nothing else


def test_takeover_is_announced_and_the_old_holder_cannot_remove_or_refresh_it(tmp_path, capsys):
    a = L.Lease(tmp_path / L.LEASE_FILE, "run directory R")
    a.acquire()
    b = L.Lease(a.path, "run directory R")
    lines = []
    b.acquire(force=True, say=lambda s, **kw: lines.append(s))
    assert len(lines) == 1 and lines[0].startswith(f"megaslm: took over the lease on run directory R from pid "
                                                   f"{os.getpid()}") and lines[0].endswith("forced (--force / "
                                                                                           "run.take_over)")
    assert a._refresh() is False  # the old holder sees it lost the lease and writes nothing
    a.release()
    assert json.loads(b.path.read_text())["token"] == b.token
    b.release()
    assert not b.path.exists()


def test_heartbeat_refreshes_and_stops_when_taken_over(tmp_path, capsys):
    a = L.Lease(tmp_path / L.LEASE_FILE, "run directory R", heartbeat_s=0.02)
    a.acquire()
    first = json.loads(a.path.read_text())["heartbeat"]
    a.start_heartbeat()
    deadline = time.time() + 20
    while json.loads(a.path.read_text())["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.01)
    assert json.loads(a.path.read_text())["heartbeat"] > first
    b = L.Lease(a.path, "run directory R")
    b.acquire(force=True, say=lambda *x, **k: None)
    a._thread.join(20)
    assert not a._thread.is_alive() and not a.held and a.lost  # quiet: the training loop says it, in one line
    assert a.lost_to["token"] == b.token
    assert a.lost_message(" (at step 5)") == (
        f"this launch lost the lease on run directory R (at step 5): it was taken over by "
        f"{L.holder_text(a.lost_to)}. It stopped without writing anything more there; the directory is the other "
        f"launch's now")
    assert json.loads(b.path.read_text())["token"] == b.token
    b.release()


def test_a_holder_that_reads_in_a_takers_gap_names_the_taker(tmp_path):
    """A takeover renames the old lease aside, then creates its own: a holder that looks in between finds no file,
    and must wait for the taker's lease rather than report "the lease file is gone"."""
    a = L.Lease(tmp_path / L.LEASE_FILE, "run directory R")
    a.acquire()
    b = L.Lease(a.path, "run directory R")
    os.rename(a.path, tmp_path / "aside")  # the taker's first half
    t = threading.Timer(0.2, b._create)  # ... and its second, while `a` is already looking
    t.start()
    assert not a.verify()
    t.join()
    assert a.lost and a.lost_to is not None and a.lost_to["token"] == b.token


def test_the_fence_rereads_the_lease_file(tmp_path, monkeypatch):
    """still_holding() (before every write to the run directory) compares the file's token with this launch's;
    holding() (every step) only reads the flag the heartbeat or a check set."""
    a = L.Lease(tmp_path / L.LEASE_FILE, "run directory R")
    a.acquire()
    monkeypatch.setattr(L, "_launch", a)
    assert L.holding() and L.still_holding()
    b = L.Lease(a.path, "run directory R")
    b.acquire(force=True, say=lambda *x, **k: None)
    assert L.holding()  # nothing read yet
    assert not L.still_holding() and not L.holding()
    assert L.lost_message().endswith("the directory is the other launch's now") and f"pid {os.getpid()}" in \
        L.lost_message()
    a.release()  # removes nothing of b's
    assert json.loads(b.path.read_text())["token"] == b.token
    b.release()


def test_of_racing_launches_exactly_one_wins(tmp_path):
    path = tmp_path / L.LEASE_FILE
    won, refused = [], []
    start = threading.Barrier(8)

    def launch():
        lease = L.Lease(path, "R")
        start.wait()
        try:
            lease.acquire()
            won.append(lease)
        except L.LeaseHeld:
            refused.append(lease)

    threads = [threading.Thread(target=launch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    assert json.loads(path.read_text())["token"] == won[0].token
    assert sorted(os.listdir(tmp_path)) == [L.LEASE_FILE]  # no temp files left


def test_stale_lease_is_taken_over_and_a_damaged_one_too(tmp_path):
    path = tmp_path / L.LEASE_FILE
    path.write_text(json.dumps(rec(heartbeat=time.time() - 1000, started=time.time() - 2000)))
    lines = []
    a = L.Lease(path, "run directory R")
    a.acquire(say=lambda s, **k: lines.append(s))
    assert "from pid 4242 on host gpu7, started" in lines[0] and "heartbeat 1000 s ago" in lines[0]
    assert lines[0].endswith("its heartbeat is 1000 s old (stale after 300 s)")
    a.release()
    path.write_text("{not json")
    a = L.Lease(path, "run directory R")
    a.acquire(say=lambda s, **k: lines.append(s))
    assert "from an unreadable lease: the lease file is not a lease" in lines[1]
    a.release()


def test_warn_if_live(tmp_path, capsys):
    L.warn_if_live(tmp_path, "exporting")
    assert capsys.readouterr().err == ""
    (tmp_path / L.LEASE_FILE).write_text(json.dumps(rec(slurm_job_id="9")))
    L.warn_if_live(tmp_path, "exporting")
    err = capsys.readouterr().err
    assert err.startswith(f"megaslm: warning: {tmp_path} is held by a live run (pid 4242 on host gpu7 (Slurm job 9)")
    assert err.rstrip().endswith("exporting")
    (tmp_path / L.LEASE_FILE).write_text(json.dumps(rec(heartbeat=time.time() - 1000)))
    L.warn_if_live(tmp_path, "exporting")
    assert capsys.readouterr().err == ""
