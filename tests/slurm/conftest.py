"""A real two-node Slurm cluster on this host for the tests in this directory (see cluster.py)."""

from __future__ import annotations

import os

import pytest

from .cluster import Cluster, ensure_installed


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Install Slurm if needed (apt-get, as root), start munged + slurmctld + two slurmd; always stop them."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (to install Slurm and to run slurmd)")
    reason = ensure_installed()
    if reason:
        pytest.skip(f"Slurm cannot be installed here: {reason}")
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
