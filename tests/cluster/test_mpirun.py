"""`mpirun` starts the ranks; shardtune finds rank, size and local rank in OMPI_* variables.

On one node the rendezvous address is 127.0.0.1 by itself. Across nodes it may be given
(MASTER_ADDR exported with mpirun -x); without it, rank 0 picks one with mpi4py
(distributed/mpi_rendezvous.py) and every rank checks it can connect before the group starts.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY, losses_by_step, run_shardtune

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


SUBNET = "10.213.0.0/24"
# What mpirun needs to reach the emulated nodes; the job itself gets no MASTER_ADDR.
MPIRUN_ARGS = (f"--allow-run-as-root --mca plm_rsh_agent {SCRIPTS / 'rsh-agent.sh'} "
               f"--mca oob_tcp_if_include {SUBNET} --mca btl_tcp_if_include {SUBNET}")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _netns(cluster, node: int | str) -> str:
    prefix = (cluster.dir / "netns-prefix").read_text().strip()
    return f"{prefix}{'sw' if node == 'sw' else f'n{node}'}"


def _launch_mpirun(cluster, out: Path, *overrides: str, timeout: float = 400):
    env = cluster.env(SHARDTUNE_CLUSTER_DIR=str(cluster.dir))
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    start = time.monotonic()
    proc = cluster.run(0, sys.executable, "-m", "shardtune", "launch", TINY, "--mpirun", "--hosts", "node0,node1",
                       "--nproc", 1, f"--mpirun-args={MPIRUN_ARGS}", f"run.output_dir={out}", *overrides,
                       timeout=timeout, check=False, env=env)
    return proc, time.monotonic() - start


def test_mpirun_across_two_nodes_without_master_addr_matches_torchrun(cluster, tmp_path):
    # node0 is multi-homed: a second interface on a network node1 has no route to.
    ns0 = _netns(cluster, 0)
    _ip("-n", ns0, "link", "add", "side0", "type", "veth", "peer", "name", "side1")
    try:
        _ip("-n", ns0, "addr", "add", "10.77.0.1/24", "dev", "side0")
        for dev in ("side0", "side1"):
            _ip("-n", ns0, "link", "set", dev, "up")
        proc, seconds = _launch_mpirun(cluster, tmp_path / "mpi")
    finally:
        _ip("-n", ns0, "link", "del", "side0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "MPI rendezvous at 10.213.0.1:" in proc.stderr and "on host node0, reached by all 2 rank(s)" in proc.stderr
    _assert_trained(tmp_path / "mpi", proc)
    print(f"mpirun across two nodes, mpi4py rendezvous: {seconds:.0f} s")

    # The same job under torchrun (2 ranks, one thread each): the same losses, step by step.
    reference = run_shardtune(tmp_path / "torchrun", nproc=2, env={"OMP_NUM_THREADS": "1"})
    mpi_losses, torchrun_losses = losses_by_step(tmp_path / "mpi"), losses_by_step(reference.out_dir)
    assert sorted(mpi_losses) == list(range(1, 9))
    assert mpi_losses == pytest.approx(torchrun_losses, rel=1e-6, abs=0)
    exact = sum(mpi_losses[k] == torchrun_losses[k] for k in mpi_losses)
    print(f"losses equal to torchrun's: {exact}/8 bit-identical, all within 1e-6")


def test_mpirun_with_an_unreachable_rendezvous_names_the_rank_and_host(cluster, tmp_path):
    # A second network (10.214.0.0/24 on eth1) offered for the rendezvous; node1's route to
    # node0's address on it is blocked, while MPI's own traffic stays on the first network.
    sw = _netns(cluster, "sw")
    _ip("-n", sw, "link", "add", "br1", "type", "bridge")
    try:
        _ip("-n", sw, "link", "set", "br1", "up")
        for i in range(2):
            ns = _netns(cluster, i)
            _ip("link", "add", "eth1", "netns", ns, "type", "veth", "peer", "name", f"port{i}b", "netns", sw)
            _ip("-n", sw, "link", "set", f"port{i}b", "master", "br1", "up")
            _ip("-n", ns, "addr", "add", f"10.214.0.{i + 1}/24", "dev", "eth1")
            _ip("-n", ns, "link", "set", "eth1", "up")
        _ip("-n", _netns(cluster, 1), "route", "add", "unreachable", "10.214.0.1/32")
        init_timeout = 8  # the probe retries an unreachable route until then: short keeps the test short
        proc, seconds = _launch_mpirun(cluster, tmp_path / "run", "distributed.rendezvous_interface=eth1",
                                       f"distributed.init_timeout_s={init_timeout}")
    finally:
        for i in range(2):
            subprocess.run(["ip", "-n", _netns(cluster, i), "link", "del", "eth1"], capture_output=True)
        subprocess.run(["ip", "-n", sw, "link", "del", "br1"], capture_output=True)
    assert proc.returncode == 5, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "rank 0's address 10.214.0.1:" in proc.stderr and "(host node0) is unreachable from 1 of 2" in proc.stderr
    assert "rank 1 on host node1 cannot connect: [Errno 113] No route to host" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "run" / "result.json").exists()
    # The probe gives up after the init timeout (capped at 30 s); the rest is start-up of two
    # Python processes that import torch on a shared 2-core machine.
    print(f"unreachable rendezvous reported after {seconds:.0f} s (init timeout {init_timeout} s)")
    assert seconds < init_timeout + 150
