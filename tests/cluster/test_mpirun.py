"""`mpirun` starts the ranks; shardtune finds rank, size and local rank in OMPI_* variables.

On one node the rendezvous address is 127.0.0.1 by itself; across nodes it must be given
(MASTER_ADDR exported with mpirun -x), as documented, because Open MPI does not provide one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import TINY

from .harness import SCRIPTS, read_result

pytestmark = pytest.mark.cluster

SHARDTUNE_BIN = Path(sys.executable).with_name("shardtune")
MPIRUN = ["mpirun", "--allow-run-as-root", "-np", 2]


def _assert_trained(out: Path, proc) -> None:
    assert "on 2 rank(s)" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = read_result(out)
    assert (result["steps"], result["stopped_reason"]) == (8, "completed")


def test_mpirun_on_one_node(cluster, tmp_path):
    out = tmp_path / "run"
    proc = cluster.run(0, *MPIRUN, "--oversubscribe", SHARDTUNE_BIN, "train", TINY, f"run.output_dir={out}",
                       timeout=180)
    _assert_trained(out, proc)


def test_mpirun_across_two_nodes_with_explicit_master_addr(cluster, tmp_path):
    out = tmp_path / "run"
    subnet = "10.213.0.0/24"
    across_nodes = [
        *MPIRUN, "-H", "node0,node1", "--mca", "plm_rsh_agent", SCRIPTS / "rsh-agent.sh",
        "--mca", "oob_tcp_if_include", subnet, "--mca", "btl_tcp_if_include", subnet,
    ]
    env = cluster.env(SHARDTUNE_CLUSTER_DIR=str(cluster.dir))
    placement = cluster.run(0, *across_nodes, "hostname", env=env).stdout.split()
    assert sorted(placement) == ["node0", "node1"], placement

    proc = cluster.run(
        0, *across_nodes, "-x", "MASTER_ADDR=node0", "-x", "MASTER_PORT=29600",
        SHARDTUNE_BIN, "train", TINY, f"run.output_dir={out}", timeout=180, env=env,
    )
    _assert_trained(out, proc)
