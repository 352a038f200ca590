from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import TINY

from shardtune.distributed.environment import detect_environment, first_slurm_host, slurm_tasks_on_node
from shardtune.launch.local import torchrun_command, torchrun_environment


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


def test_forked_workers_run_the_trainer_script_with_the_same_arguments():
    forked = torchrun_command("c.yaml", ["train.lr=1"], nproc=2, fork_workers=True)
    script = forked[forked.index("--run-path") + 1]
    assert "--start-method=fork" in forked and Path(script).is_file()
    assert forked[forked.index(script) + 1 :] == ["c.yaml", "train.lr=1"]


def test_launcher_execs_workers_once_cuda_is_initialised(monkeypatch, capsys):
    import torch

    from shardtune.commands.launch import _preload_for_fork
    from shardtune.config import load_config

    cfg = load_config(str(TINY), [])
    assert _preload_for_fork(cfg)
    assert "transformers.models.llama.modeling_llama" in sys.modules  # the model's code, preloaded
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert not _preload_for_fork(cfg)
    assert "--worker-start=exec" in capsys.readouterr().err


# --- every launcher's variables, as measured under each launcher, and the fall-backs ---

def test_torchrun_under_srun_prefers_torchrun_variables():
    env = detect_environment({
        "TORCHELASTIC_RUN_ID": "42", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "1", "MASTER_ADDR": "node1", "MASTER_PORT": "41000",
        "SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_NODEID": "1",
    })
    assert (env.kind, env.rank, env.world_size, env.node_rank, env.master_addr) == ("torchrun", 3, 4, 1, "node1")


def test_srun_task_one_per_rank():
    env = detect_environment({
        "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1",
        "SLURM_NODEID": "2", "SLURM_TASKS_PER_NODE": "2(x3)", "SLURM_JOB_NODELIST": "gpu[12-14]",
        "MASTER_PORT": "20070",
    })
    assert (env.kind, env.rank, env.world_size, env.local_rank, env.local_world_size) == ("slurm", 5, 6, 1, 2)
    assert (env.node_rank, env.master_addr, env.master_port) == (2, "gpu12", 20070)


def test_slurm_uneven_tasks_per_node():
    env = detect_environment({
        "SLURM_JOB_ID": "7", "SLURM_STEPID": "1", "SLURM_PROCID": "6", "SLURM_NTASKS": "7", "SLURM_LOCALID": "0",
        "SLURM_NODEID": "3", "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_JOB_NODELIST": "n[1-4]",
    })
    assert (env.local_world_size, env.node_rank) == (1, 3)


def test_slurm_master_addr_from_the_environment_wins_over_the_node_list():
    env = detect_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a[1-2]",
                              "MASTER_ADDR": "10.1.2.3"})
    assert env.master_addr == "10.1.2.3"


def test_batch_script_is_one_process_despite_slurm_task_variables():
    # Measured in a 2-node batch script: SLURM_PROCID=0 and SLURM_NTASKS=2 but no step id.
    env = detect_environment({"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "2",
                              "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "node[0-1]"})
    assert (env.kind, env.world_size) == ("single", 1)


def test_open_mpi_on_one_node_rendezvous_on_loopback():
    env = detect_environment({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                              "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert (env.kind, env.rank, env.local_rank, env.node_rank, env.master_addr) == ("openmpi", 1, 1, 0, "127.0.0.1")


def test_open_mpi_across_nodes_without_master_addr_uses_the_mpi_rendezvous():
    across = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
              "OMPI_COMM_WORLD_LOCAL_SIZE": "1", "OMPI_COMM_WORLD_NODE_RANK": "1"}
    found = detect_environment(across)  # the address comes from distributed/mpi_rendezvous.py
    assert (found.rendezvous, found.master_addr) == ("mpi", "")
    explicit = detect_environment({**across, "MASTER_ADDR": "node0", "MASTER_PORT": "29600"})
    assert (explicit.node_rank, explicit.master_addr, explicit.master_port) == (1, "node0", 29600)


def test_open_mpi_inside_a_slurm_allocation_uses_its_first_node():
    env = detect_environment({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
                              "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "SLURM_JOB_ID": "5",
                              "SLURM_JOB_NODELIST": "cn[101-102]"})
    assert (env.kind, env.node_rank, env.master_addr) == ("openmpi", 1, "cn101")


def test_srun_with_pmix_falls_back_to_slurm_variables():
    # srun --mpi=pmix: PMIX_RANK and SLURM_* are set, OMPI_COMM_WORLD_RANK is not.
    env = detect_environment({"PMIX_RANK": "1", "SLURM_JOB_ID": "3", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1",
                              "SLURM_NTASKS": "2", "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "1(x2)",
                              "SLURM_JOB_NODELIST": "node[0-1]"})
    assert (env.kind, env.rank, env.world_size, env.master_addr) == ("slurm", 1, 2, "node0")


def test_mpich_hydra_variables():
    env = detect_environment({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
                              "MASTER_ADDR": "head"})
    assert (env.kind, env.rank, env.world_size, env.local_rank, env.node_rank, env.master_addr) == \
        ("pmix", 3, 4, 1, 1, "head")
    assert detect_environment({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALNRANKS": "2"}).rendezvous == "mpi"


@pytest.mark.parametrize("tasks, node, count", [("4", 0, 4), ("2(x3),1", 2, 2), ("2(x3),1", 3, 1), ("1,3(x2)", 2, 3)])
def test_slurm_tasks_on_node(tasks, node, count):
    assert slurm_tasks_on_node(tasks, node) == count


def test_multi_node_launch_options():
    cmd = torchrun_command("c.yaml", [], nproc=2, nnodes=2, node_rank=0, master_addr="node0",
                           max_restarts=3, rdzv_id="job7")
    assert "--max-restarts=3" in cmd and "--rdzv-id=job7" in cmd
    assert torchrun_environment(2, 0) == {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    assert torchrun_environment(1, 0) == {}
