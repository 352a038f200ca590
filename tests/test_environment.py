from __future__ import annotations

import pytest

from shardtune.launch.environment import detect_environment, first_slurm_host
from shardtune.launch.local import torchrun_command


def test_torchrun_variables():
    env = detect_environment({
        "TORCHELASTIC_RUN_ID": "x", "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234",
    })
    assert (env.kind, env.rank, env.world_size, env.local_rank, env.node_rank) == ("torchrun", 5, 8, 1, 1)
    assert (env.master_addr, env.master_port, env.local_world_size) == ("10.0.0.1", 1234, 4)


def test_slurm_one_task_per_rank_uses_first_host_of_nodelist():
    env = detect_environment({
        "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
        "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
    })
    assert (env.kind, env.rank, env.world_size, env.local_rank, env.node_rank) == ("slurm", 3, 4, 1, 1)
    assert env.master_addr == "gpu07"


def test_open_mpi_variables():
    env = detect_environment({
        "OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_ADDR": "node1",
    })
    assert (env.kind, env.rank, env.world_size, env.node_rank, env.master_addr) == ("openmpi", 2, 4, 1, "node1")


def test_pmix_fallback_when_open_mpi_rank_is_unset():
    env = detect_environment({"PMIX_RANK": "1", "PMI_SIZE": "2"})
    assert (env.kind, env.rank, env.world_size) == ("pmix", 1, 2)


def test_single_process_default():
    env = detect_environment({})
    assert (env.kind, env.rank, env.world_size) == ("single", 0, 1)


def test_bad_integer_names_the_variable():
    with pytest.raises(ValueError, match="RANK='x'"):
        detect_environment({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


@pytest.mark.parametrize("nodelist, first", [("n1", "n1"), ("n[3-5,9],m2", "n3"), ("a-b[10,2]", "a-b10"), ("x1,x2", "x1")])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_launch_builds_torchrun_commands():
    local = torchrun_command("c.yaml", ["train.lr=1"], nproc=2)
    assert "--standalone" in local and local[-3:] == ["train", "c.yaml", "train.lr=1"]
    multi = torchrun_command(None, [], nproc=8, nnodes=2, node_rank=1, master_addr="h0", master_port=29400)
    assert "--rdzv-endpoint=h0:29400" in multi and "--node-rank=1" in multi and "--standalone" not in multi
