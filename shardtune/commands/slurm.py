"""``shardtune slurm submit|signal-trainers``: run on a SLURM cluster."""

from __future__ import annotations

from shardtune.commands._args import add_config_args, load_run_config


def add_parser(sub) -> None:
    from shardtune.launch.slurm import DEFAULT_MAX_REQUEUES, DEFAULT_WARN_SECONDS, LAUNCHERS

    p_slurm = sub.add_parser("slurm", help="run on a SLURM cluster")
    slurm_sub = p_slurm.add_subparsers(dest="slurm_command", required=True)
    p_submit = slurm_sub.add_parser(
        "submit", help="render an sbatch script from slurm/ and submit it",
        description="Render an sbatch script from a template in slurm/ and submit it with sbatch; "
        "prints the job id and the log path. Preempted or timed-out jobs checkpoint, requeue "
        "themselves and resume.",
    )
    add_config_args(p_submit)
    p_submit.add_argument("--nodes", type=int, required=True)
    p_submit.add_argument("--gpus-per-node", type=int, required=True, help="0 on CPU-only nodes")
    p_submit.add_argument("--ranks-per-node", type=int, help="default: one per GPU (1 without GPUs)")
    p_submit.add_argument("--launcher", choices=sorted(LAUNCHERS), default="torchrun",
                          help="torchrun: one task per node running torchrun; srun: one task per rank; "
                          "mpi: one srun --mpi=pmix task per rank, mpi4py rendezvous")
    p_submit.add_argument("--partition")
    p_submit.add_argument("--account")
    p_submit.add_argument("--time", help="wall-clock limit, e.g. 24:00:00")
    p_submit.add_argument("--cpus-per-task", type=int)
    p_submit.add_argument("--max-requeues", type=int, default=DEFAULT_MAX_REQUEUES,
                          help="stop requeueing after this many restarts (default %(default)s)")
    p_submit.add_argument("--warn-seconds", type=int, default=DEFAULT_WARN_SECONDS,
                          help="ask for SIGUSR1 this long before the time limit, to checkpoint "
                          "(default %(default)s)")
    p_submit.add_argument("--template", help="sbatch template to render instead of slurm/<launcher>.sbatch")
    p_submit.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")

    p_relay = slurm_sub.add_parser(
        "signal-trainers", help="(used by the sbatch scripts) signal this node's trainer processes"
    )
    p_relay.add_argument("signal", choices=["USR1", "TERM"])
    p_relay.add_argument("--job", help="only trainers of this SLURM job id")
    p_relay.add_argument("--wait", type=float, default=30.0, help="seconds to wait for trainers to start")


def run(args, extra, parser) -> int:
    if args.slurm_command == "signal-trainers":
        import signal

        from shardtune.launch.trainer_signals import signal_trainers

        signal_trainers(signal.Signals["SIG" + args.signal], args.job, wait_s=args.wait)
        return 0
    config_path, overrides, cfg = load_run_config(args, extra, parser)
    return _submit(args, config_path, overrides, cfg)


def _submit(args, config_path: str | None, overrides: list[str], cfg) -> int:
    from pathlib import Path

    from shardtune.launch.slurm import SlurmJob, render_job, submit

    workdir = Path.cwd()
    job = SlurmJob(
        config=Path(config_path).resolve() if config_path else None,
        overrides=tuple(overrides), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        ranks_per_node=args.ranks_per_node, launcher=args.launcher, run_name=cfg.run.name,
        output_dir=workdir / cfg.output_dir, workdir=workdir, partition=args.partition,
        account=args.account, time=args.time, cpus_per_task=args.cpus_per_task,
        max_requeues=args.max_requeues, warn_seconds=args.warn_seconds,
    )
    script = render_job(job, Path(args.template) if args.template else None)
    if args.dry_run:
        print(script, end="")
        return 0
    job_id = submit(script, job)
    print(f"submitted job {job_id}\nlog: {job.log_path(job_id)}")
    return 0
