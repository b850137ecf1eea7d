"""Process-group setup that works the same under deepspeed, torchrun, srun and a plain `python`.

Launchers disagree on how they announce ranks. torchrun and the deepspeed launcher set RANK / LOCAL_RANK /
WORLD_SIZE / MASTER_ADDR / MASTER_PORT; srun sets SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS (our batch
scripts export MASTER_ADDR/MASTER_PORT). A bare process gets a world of one on a free local port.
"""

from __future__ import annotations

import os
import socket
import subprocess
from datetime import timedelta

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host() -> str | None:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return nodelist.split(",")[0] if "[" not in nodelist else None


def map_launcher_env() -> None:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* from Slurm, or for a single process, when unset."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _first_slurm_host() or "127.0.0.1"
        if "MASTER_PORT" not in env:
            env["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    if "RANK" not in env:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in env:
        if env["WORLD_SIZE"] != "1":
            raise RuntimeError("MASTER_PORT is not set for a multi-process run")
        env["MASTER_PORT"] = str(free_port())


def quiet_libraries() -> None:
    """Keep the console for our progress lines: library banners and per-call warnings go below WARNING."""
    import warnings

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skips DeepSpeed's "no GPU found" warning
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    warnings.filterwarnings("ignore", message=".*torch.distributed.all_gather_into_tensor.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed (it also sets up its comm layer)."""
    if dist.is_initialized():
        return
    map_launcher_env()
    quiet_libraries()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    from megaslm.quiet import DEEPSPEED_OP_LOADED, dropping_lines

    ds_logger.setLevel("WARNING")
    with dropping_lines(DEEPSPEED_OP_LOADED):  # "... shm_comm_op built successfully", on every rank, every launch
        deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False,
                                   timeout=timedelta(minutes=int(os.environ.get("MEGASLM_DIST_TIMEOUT_MIN", "30"))))


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
