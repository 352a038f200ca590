"""``shardtune launch``: spawn torchrun for a job on this machine."""

from __future__ import annotations

from shardtune.commands._args import add_config_args, load_run_config


def add_parser(sub) -> None:
    p = sub.add_parser("launch", help="spawn torchrun for a job on this machine")
    add_config_args(p)
    p.add_argument("--nproc", type=int, default=1, help="ranks on this node")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master", default="127.0.0.1", help="address of node 0 (multi-node)")
    p.add_argument("--port", type=int, default=29500)
    p.add_argument("--max-restarts", type=int, default=0,
                   help="restart all of this node's workers up to N times after a failure")
    p.add_argument("--rdzv-id", help="job id shared by all nodes of one run (multi-node)")
    p.add_argument("--worker-start", choices=("fork", "exec"), default="fork",
                   help="fork: import the trainer once here and fork each worker from this process "
                   "(saves each worker its imports); exec: each worker is a new interpreter")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun command only")
    p.add_argument("--mpirun", action="store_true",
                   help="start the ranks with Open MPI's mpirun (--nproc per host) instead of torchrun")
    p.add_argument("--hosts", help="--mpirun: comma-separated hosts (default: this machine)")
    p.add_argument("--mpirun-args", default="", help="--mpirun: extra mpirun options, e.g. "
                   "--mpirun-args='--mca btl_tcp_if_include eth0'")


def run(args, extra, parser) -> int:
    import shlex

    from shardtune.launch.local import run_torchrun, torchrun_command, torchrun_environment

    _check_counts(args)
    config_path, overrides, cfg = load_run_config(args, extra, parser)
    if args.mpirun:
        from shardtune.launch.mpi import mpirun_command, run_mpirun

        hosts = [h for h in (args.hosts or "").split(",") if h] or None
        # mpirun starts --nproc ranks on each host; --nnodes is torchrun's and does not apply.
        _check_batch_split(cfg.train, args.nproc * (len(hosts) if hosts else 1))
        cmd = mpirun_command(config_path, overrides, nproc=args.nproc, hosts=hosts, mpirun_args=args.mpirun_args)
        if args.dry_run:
            print(shlex.join(cmd))
            return 0
        return run_mpirun(cmd)  # the trainers' rank 0 holds the run directory's lock
    _check_batch_split(cfg.train, args.nproc * args.nnodes)
    fork = args.worker_start == "fork" and (args.dry_run or _preload_for_fork(cfg))
    cmd = torchrun_command(
        config_path, overrides, nproc=args.nproc, nnodes=args.nnodes,
        node_rank=args.node_rank, master_addr=args.master, master_port=args.port,
        max_restarts=args.max_restarts, rdzv_id=args.rdzv_id, fork_workers=fork,
    )
    extra_env = torchrun_environment(args.nnodes, args.max_restarts)
    if args.dry_run:
        print(" ".join([*(f"{k}={v}" for k, v in extra_env.items()), shlex.join(cmd)]))
        return 0
    import contextlib

    from shardtune.run_dirs import hold_run_dir

    # One job per run directory: node 0 holds the lock for the whole job (on a shared
    # filesystem the other nodes' launchers would only find node 0's lock).
    with hold_run_dir(cfg.output_dir) if args.node_rank == 0 else contextlib.nullcontext():
        return run_torchrun(cmd, extra_env)


def _preload_for_fork(cfg) -> bool:
    """Import what every worker imports first (the trainer, the model's code), so that the
    workers forked from this process start with it loaded."""
    import sys

    from shardtune.launch.forked import preload
    from shardtune.models.loading import model_code_module

    if preload(["shardtune.train.loop", model_code_module(cfg.model) or "transformers.modeling_utils"]):
        return True
    print("launch: CUDA was initialised while importing the trainer, so the workers cannot be "
          "forked from here; each starts as a new interpreter (--worker-start=exec)", file=sys.stderr)
    return False


def _check_batch_split(train, ranks: int) -> None:
    """Before torchrun starts: the message every rank would otherwise print after its start-up."""
    from shardtune.errors import ConfigError

    per_rank, rem = divmod(train.global_batch_size, ranks)
    if rem or per_rank % train.micro_batch_size:
        raise ConfigError(f"train.global_batch_size={train.global_batch_size} must split into {ranks} ranks "
                          f"x whole micro-batches of train.micro_batch_size={train.micro_batch_size}")


def _check_counts(args) -> None:
    from shardtune.errors import ConfigError

    for flag, value, least in (("--nproc", args.nproc, 1), ("--nnodes", args.nnodes, 1),
                               ("--node-rank", args.node_rank, 0), ("--max-restarts", args.max_restarts, 0)):
        if value < least:
            raise ConfigError(f"{flag} must be at least {least} (got {value})")
    if args.mpirun and args.nnodes != 1:
        raise ConfigError("--nnodes is torchrun's: with --mpirun name the hosts with --hosts "
                          "(--nproc ranks start on each)")
    if args.node_rank >= args.nnodes:
        raise ConfigError(f"--node-rank {args.node_rank} is not below --nnodes {args.nnodes}")
