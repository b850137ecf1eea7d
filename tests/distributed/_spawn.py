"""Run a function in N fresh processes joined in a gloo process group on 127.0.0.1.

    from _spawn import run_gloo
    run_gloo(worker, 2, arg1, arg2)   # calls worker(rank, world_size, arg1, arg2) in each process

`worker` must be a module-level function (it is pickled by reference). An exception in any worker fails the
caller with that worker's traceback; a worker that does not finish within `timeout` seconds fails it too.
"""

from __future__ import annotations

import os
import time

import torch.distributed as dist
import torch.multiprocessing as mp

from megaslm.parallel.dist import free_port


def _entry(rank, fn, world_size, port, threads, args):
    import torch

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_gloo(fn, world_size: int, *args, timeout: float = 120.0, threads: int = 1) -> None:
    """Call fn(rank, world_size, *args) in `world_size` fresh processes sharing a gloo group."""
    # forkserver: one clean server process imports torch once per session and forks the workers from it, so a
    # worker starts in a fraction of a second (a spawned one re-imports torch: seconds on a busy 2-core box),
    # and, unlike a plain fork of the test process, no OpenMP or gloo state of the parent is inherited.
    mp.set_forkserver_preload(["torch", "torch.distributed"])
    ctx = mp.start_processes(
        _entry, args=(fn, world_size, free_port(), threads, args), nprocs=world_size, join=False,
        start_method="forkserver",
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gloo workers did not finish within {timeout:.0f} s")
    finally:
        for p in ctx.processes:  # only the processes started here
            if p.is_alive():
                p.terminate()
                p.join(5)
