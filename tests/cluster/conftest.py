"""Session fixtures: a real two-node cluster on this machine, always torn down.

The nodes are network namespaces with their own hostnames (tests/cluster/net-up.sh); SLURM
(munged, slurmctld, two slurmd) runs on them (slurm-up.sh). Needs root and Linux; the
packages are installed when missing (install-packages.sh). Without root, or when they cannot
be installed, the tests are skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from .harness import SCRIPTS, Cluster, Slurm

NODES = 2


def _script(name: str, *args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def cluster_prerequisites() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("cluster tests need Linux network namespaces")
    if os.geteuid() != 0:
        pytest.skip("cluster tests need root: they create network namespaces and start SLURM daemons")
    proc = _script("install-packages.sh")
    if proc.returncode != 0:
        pytest.skip(f"cluster tests need slurm-wlm, munge and openmpi-bin, which could not be installed: "
                    f"{proc.stderr.strip()[-500:]}")


@pytest.fixture(scope="session")
def cluster(cluster_prerequisites):
    # Not under pytest's 0700 temp root: munged runs as user munge and must reach its socket.
    state = Path(tempfile.mkdtemp(prefix="shardtune-cluster-"))
    state.chmod(0o755)
    nodes = Cluster(state, NODES)
    try:
        proc = _script("net-up.sh", state, NODES, timeout=60)
        if proc.returncode != 0:
            pytest.fail(f"net-up.sh failed:\n{proc.stdout}\n{proc.stderr}")
        yield nodes
    finally:
        nodes.stop_spawned()
        _script("down.sh", state, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm(cluster) -> Slurm:
    proc = _script("slurm-up.sh", cluster.dir, timeout=120)
    if proc.returncode != 0:
        logs = "".join(f"\n--- {p.name}\n{p.read_text()[-1500:]}" for p in (cluster.dir / "slurm" / "log").glob("*"))
        pytest.fail(f"slurm-up.sh failed:\n{proc.stdout}\n{proc.stderr}{logs}")
    return Slurm(cluster)


@pytest.fixture
def spawned(cluster):
    """Background processes of one test are ended when it ends, passed or not."""
    yield cluster
    cluster.stop_spawned()
