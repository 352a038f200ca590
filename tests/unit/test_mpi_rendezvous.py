"""The MPI rendezvous: when it is used, how rank 0's address is picked and checked, and that a
single-process or torchrun run never imports mpi4py. Real runs under mpirun: tests/cluster."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, TINY, run_env

from shardtune.distributed.environment import detect_environment
from shardtune.distributed.mpi_rendezvous import _Listener, interface_addresses, pick_address, probe
from shardtune.errors import RendezvousError
from shardtune.launch.mpi import mpirun_command
from shardtune.launch.slurm import SlurmJob, render_job

ACROSS = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
          "OMPI_COMM_WORLD_LOCAL_SIZE": "1"}


def test_mpi_rendezvous_is_used_only_where_the_launcher_left_something_out():
    assert detect_environment(ACROSS).rendezvous == "mpi"
    assert detect_environment({**ACROSS, "MASTER_ADDR": "node0"}).rendezvous == "env"
    one_node = {**ACROSS, "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert (detect_environment(one_node).rendezvous, detect_environment(one_node).master_addr) == ("env", "127.0.0.1")
    # MPICH/Intel MPI without the local-rank variables: the communicator must tell.
    assert detect_environment({"PMI_RANK": "0", "PMI_SIZE": "2", "MASTER_ADDR": "h"}).rendezvous == "mpi"
    srun = {"SLURM_JOB_ID": "3", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
            "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_JOB_NODELIST": "node[0-1]", "PMIX_RANK": "1"}
    assert detect_environment(srun).rendezvous == "env"
    assert detect_environment({**srun, "SHARDTUNE_RENDEZVOUS": "mpi"}).rendezvous == "mpi"
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "OMPI_COMM_WORLD_RANK": "0"}
    assert detect_environment(torchrun).rendezvous == "env"
    assert detect_environment({}).rendezvous == "env"


def test_pick_address_prefers_the_interface_asked_for_and_ignores_shared_bridges():
    mine = {"lo": "127.0.0.1", "eth0": "10.1.0.5", "ib0": "10.2.0.5", "docker0": "172.17.0.1"}
    assert pick_address(mine, [["10.1.0.6"]], "ib0") == "10.2.0.5"
    with pytest.raises(RendezvousError, match=r"rendezvous_interface=eth7: rank 0's host .* no IPv4 address"):
        pick_address(mine, [["10.1.0.6"]], "eth7")
    assert pick_address(mine, [], None) == "127.0.0.1"  # one node
    # The other node's only address is one this host has as well (a docker bridge): no evidence.
    with pytest.raises(RendezvousError, match="no route to any address of the other nodes"):
        pick_address(mine, [["172.17.0.1"]], None)


def test_pick_address_uses_the_route_towards_the_other_nodes():
    mine = interface_addresses()
    outward = {name: a for name, a in mine.items() if not a.startswith("127.")}
    if not outward:
        pytest.skip("this machine has no non-loopback IPv4 address")
    name, address = sorted(outward.items())[0]
    a, b, c, d = map(int, address.split("."))
    neighbour = f"{a}.{b}.{c}.{(d % 250) + 2}"  # same subnet, not this host
    if neighbour in mine.values():
        neighbour = f"{a}.{b}.{c}.{(d % 250) + 3}"
    assert pick_address(mine, [[neighbour]], None) in outward.values()


def test_probe_reports_success_and_the_reason_of_a_failure():
    listener = _Listener("127.0.0.1", 0)
    try:
        assert probe("127.0.0.1", listener.port, timeout_s=5) is None
    finally:
        listener.close()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    problem = probe("127.0.0.1", closed, timeout_s=0.5)
    assert problem is not None and "refused" in problem.lower()


def test_launch_mpirun_command_and_forwarded_environment():
    cmd = mpirun_command("c.yaml", ["train.lr=1"], nproc=2, hosts=["node0", "node1"],
                         mpirun_args="--mca btl_tcp_if_include eth1",
                         environ={"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "HOME": "/root", "OMP_NUM_THREADS": "1"})
    assert cmd[:5] == ["mpirun", "-np", "4", "-H", "node0:2,node1:2"]
    assert cmd[5:11] == ["-x", "HF_HUB_OFFLINE", "-x", "OMP_NUM_THREADS", "-x", "WANDB_MODE"]  # not HOME
    assert cmd[11:14] == ["--mca", "btl_tcp_if_include", "eth1"]
    assert cmd[-5:] == ["-m", "shardtune", "train", "c.yaml", "train.lr=1"]
    assert mpirun_command(None, [], nproc=3, environ={})[:3] == ["mpirun", "-np", "3"]



def test_launch_mpirun_checks_the_batch_split_against_every_hosts_ranks(capsys):
    from shardtune.cli import main

    # 2 hosts x --nproc 2 = 4 ranks: 6 samples split into 2 ranks but not into 4.
    argv = ["launch", str(TINY), "--mpirun", "--hosts", "a,b", "--nproc", "2", "--dry-run",
            "train.micro_batch_size=1"]
    assert main([*argv, "train.global_batch_size=6"]) == 2
    assert "must split into 4 ranks" in capsys.readouterr().err
    assert main([*argv, "train.global_batch_size=8"]) == 0
    assert capsys.readouterr().out.startswith("mpirun -np 4 -H a:2,b:2 ")
    assert main(["launch", str(TINY), "--mpirun", "--nnodes", "2", "--dry-run"]) == 2
    assert "with --mpirun name the hosts with --hosts" in capsys.readouterr().err

def test_slurm_mpi_launcher_renders_srun_with_pmix_and_no_master_addr(tmp_path):
    job = SlurmJob(config=tmp_path / "c.yaml", overrides=(), nodes=2, gpus_per_node=0, run_name="r",
                   output_dir=tmp_path / "out", workdir=tmp_path, launcher="mpi")
    script = render_job(job)
    assert "srun --mpi=pmix --kill-on-bad-exit=0" in script
    assert "export SHARDTUNE_RENDEZVOUS=mpi" in script
    assert "MASTER_ADDR=" not in script and "unset MASTER_ADDR MASTER_PORT" in script


# A lone process, then a run through the torchrun code path (its variables, world size 1), in
# one interpreter: after both trained, nothing shardtune or its libraries loaded imported mpi4py.
NO_MPI = """
import json, os, sys
from shardtune.cli import main
from shardtune.distributed.environment import detect_environment
small = ["train.max_steps=1", "eval.batches=1"]
kinds = [detect_environment().kind]
codes = [main(["train", {config!r}, "run.output_dir={out}/single", *small])]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT="{port}", TORCHELASTIC_RUN_ID="test")
kinds.append(detect_environment().kind)
codes.append(main(["train", {config!r}, "run.output_dir={out}/torchrun", *small]))
print(json.dumps({{"kinds": kinds, "codes": codes,
                  "mpi4py": sorted(m for m in sys.modules if m.startswith("mpi4py"))}}))
"""


def test_single_process_and_torchrun_runs_never_import_mpi4py(tmp_path):
    pytest.importorskip("mpi4py")  # installed (make installs the extra): importable, yet not imported
    env = run_env(OMP_NUM_THREADS="1")
    for name in [n for n in env if n.startswith(("OMPI_", "PMI", "SLURM_", "MASTER_", "SHARDTUNE_RENDEZVOUS"))]:
        del env[name]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = NO_MPI.format(config=str(TINY), out=tmp_path, port=port)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcome = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcome == {"kinds": ["single", "torchrun"], "codes": [0, 0], "mpi4py": []}, proc.stderr[-3000:]
