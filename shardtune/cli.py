"""Command line: ``shardtune train|launch|sweep|eval|report|slurm submit|config show|data prepare|ckpt``."""

from __future__ import annotations

import argparse
import sys

from shardtune.config import ConfigError, dump_config, load_config
from shardtune.run_dirs import restrict_umask


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default=None, help="YAML run config (default: the embedded CPU demo)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 distributed.strategy=fsdp")


def _split_config_and_overrides(args) -> tuple[str | None, list[str]]:
    # ``shardtune train train.lr=1`` means the default config with one override.
    if args.config is not None and "=" in args.config:
        return None, [args.config, *args.overrides]
    return args.config, list(args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardtune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_train = sub.add_parser("train", help="run this process's share of a job (under torchrun, or alone)")
    _add_config_args(p_train)

    p_launch = sub.add_parser("launch", help="spawn torchrun for a job on this machine")
    _add_config_args(p_launch)
    p_launch.add_argument("--nproc", type=int, default=1, help="ranks on this node")
    p_launch.add_argument("--nnodes", type=int, default=1)
    p_launch.add_argument("--node-rank", type=int, default=0)
    p_launch.add_argument("--master", default="127.0.0.1", help="address of node 0 (multi-node)")
    p_launch.add_argument("--port", type=int, default=29500)
    p_launch.add_argument("--max-restarts", type=int, default=0,
                          help="restart all of this node's workers up to N times after a failure")
    p_launch.add_argument("--rdzv-id", help="job id shared by all nodes of one run (multi-node)")
    p_launch.add_argument("--dry-run", action="store_true", help="print the torchrun command only")

    _add_slurm_parser(sub)

    p_plan = sub.add_parser("plan", help="estimate per-rank memory for every strategy and recommend one")
    _add_config_args(p_plan)
    p_plan.add_argument("--nodes", type=int, default=1)
    p_plan.add_argument("--gpus-per-node", type=int, default=8)
    p_plan.add_argument("--gpu-memory", default="80GiB", help="memory per GPU, e.g. 80GiB")

    from shardtune.checkpoint.commands import add_parser as add_ckpt_parser

    add_ckpt_parser(sub)

    p_sweep = sub.add_parser(
        "sweep", help="run a grid of configs in turn and write a comparison table",
        description="shardtune sweep CONFIG --grid finetune.strategy=full,frozen_head,lora "
        "--grid train.lr=1e-5,3e-5 [key=value ...]: runs every combination with `shardtune launch` "
        "(locally, one after another) and writes sweep.md and sweep.csv (validation/test metrics vs "
        "the baseline, steps, wall time, trainable parameters).",
    )
    _add_config_args(p_sweep)
    p_sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                         help="a config key and its values; repeat for a cartesian product")
    p_sweep.add_argument("--nproc", type=int, default=1, help="ranks per run")
    p_sweep.add_argument("--port", type=int, default=29500)
    p_sweep.add_argument("--out", help="sweep directory (default: <runs>/<run.name>-sweep)")
    p_sweep.add_argument("--collect", metavar="SWEEP_DIR",
                         help="only (re)write sweep.md/.csv of a sweep directory from what its runs wrote")
    p_sweep.add_argument("--slurm", action="store_true",
                         help="submit a SLURM job array (task i runs combination i) plus a dependent job "
                         "that writes the table; the options below apply to every task")
    p_sweep.add_argument("--nodes", type=int, default=1, help="--slurm: nodes per combination")
    p_sweep.add_argument("--gpus-per-node", type=int, default=0, help="--slurm: 0 on CPU-only nodes")
    p_sweep.add_argument("--ranks-per-node", type=int, help="--slurm: default --nproc, or one per GPU")
    p_sweep.add_argument("--partition")
    p_sweep.add_argument("--account")
    p_sweep.add_argument("--time", help="--slurm: wall-clock limit per task, e.g. 4:00:00")
    p_sweep.add_argument("--cpus-per-task", type=int)
    p_sweep.add_argument("--max-parallel", type=int, help="--slurm: at most this many tasks at once (--array=0-N%%K)")
    p_sweep.add_argument("--max-requeues", type=int, default=3, help="--slurm: requeues per task after preemption")
    p_sweep.add_argument("--warn-seconds", type=int, default=180,
                         help="--slurm: SIGUSR1 this long before the time limit, to checkpoint")
    p_sweep.add_argument("--template", help="--slurm: sbatch template instead of slurm/sweep-array.sbatch")
    p_sweep.add_argument("--no-collect-job", action="store_true", help="--slurm: submit the array only")
    p_sweep.add_argument("--dry-run", action="store_true", help="--slurm: print the array script, submit nothing")

    p_eval = sub.add_parser(
        "eval", help="evaluate a checkpoint or Hugging Face directory on a split",
        description="shardtune eval CHECKPOINT_OR_HF_DIR [CONFIG] [key=value ...] --split test: one "
        "process; the data comes from the config (default: the run config stored in the checkpoint).",
    )
    p_eval.add_argument("path", help="a checkpoint (step-N or a checkpoints dir: latest) or an HF model dir")
    p_eval.add_argument("config", nargs="?", default=None, help="run config (default: the checkpoint's own)")
    p_eval.add_argument("overrides", nargs="*")
    p_eval.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p_eval.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file")

    p_report = sub.add_parser("report", help="(re)write report.md and its plots for a run directory")
    p_report.add_argument("run_dir")

    p_config = sub.add_parser("config", help="inspect configs")
    config_sub = p_config.add_subparsers(dest="config_command", required=True)
    p_show = config_sub.add_parser("show", help="print the resolved config")
    _add_config_args(p_show)

    p_data = sub.add_parser("data", help="prepare datasets")
    data_sub = p_data.add_subparsers(dest="data_command", required=True)
    p_prepare = data_sub.add_parser(
        "prepare",
        help="clean, validate, split and tokenize files into checksummed shards",
        description="shardtune data prepare [CONFIG.yaml] [INPUT ...] [key=value ...] --out DIR. "
        "Inputs are JSONL/CSV/Parquet files or globs (default: data.prepare.inputs); options come "
        "from data.prepare.* (e.g. data.prepare.max_tokens=2048 data.prepare.on_bad_record=error). "
        "Writes shards, manifest.json, report.json/.txt and token_lengths.png; a re-run with the "
        "same inputs and settings does nothing.",
    )
    p_prepare.add_argument("items", nargs="*", metavar="CONFIG_OR_INPUT_OR_OVERRIDE",
                           help="a .yaml run config, input files/globs, and dotted key=value overrides")
    p_prepare.add_argument("--out", help="output directory (default: data.prepared_dir)")
    p_prepare.add_argument("--tokenizer", help="tokenizer dir or hub id (default: tokenizer.name_or_path; "
                           "if unset, a byte-level BPE of tokenizer.vocab_size is trained on the inputs)")
    p_prepare.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _add_slurm_parser(sub) -> None:
    from shardtune.launch.slurm import DEFAULT_MAX_REQUEUES, DEFAULT_WARN_SECONDS, LAUNCHERS

    p_slurm = sub.add_parser("slurm", help="run on a SLURM cluster")
    slurm_sub = p_slurm.add_subparsers(dest="slurm_command", required=True)
    p_submit = slurm_sub.add_parser(
        "submit", help="render an sbatch script from slurm/ and submit it",
        description="Render an sbatch script from a template in slurm/ and submit it with sbatch; "
        "prints the job id and the log path. Preempted or timed-out jobs checkpoint, requeue "
        "themselves and resume.",
    )
    _add_config_args(p_submit)
    p_submit.add_argument("--nodes", type=int, required=True)
    p_submit.add_argument("--gpus-per-node", type=int, required=True, help="0 on CPU-only nodes")
    p_submit.add_argument("--ranks-per-node", type=int, help="default: one per GPU (1 without GPUs)")
    p_submit.add_argument("--launcher", choices=sorted(LAUNCHERS), default="torchrun",
                          help="torchrun: one task per node running torchrun; srun: one task per rank")
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


def _slurm_submit(args, config_path: str | None, overrides: list[str], cfg) -> int:
    from pathlib import Path

    from shardtune.launch.slurm import SlurmJob, SubmitError, render_job, submit

    workdir = Path.cwd()
    job = SlurmJob(
        config=Path(config_path).resolve() if config_path else None,
        overrides=tuple(overrides), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        ranks_per_node=args.ranks_per_node, launcher=args.launcher, run_name=cfg.run.name,
        output_dir=workdir / cfg.output_dir, workdir=workdir, partition=args.partition,
        account=args.account, time=args.time, cpus_per_task=args.cpus_per_task,
        max_requeues=args.max_requeues, warn_seconds=args.warn_seconds,
    )
    try:
        script = render_job(job, Path(args.template) if args.template else None)
        if args.dry_run:
            print(script, end="")
            return 0
        job_id = submit(script, job)
    except SubmitError as exc:
        print(f"shardtune: {exc}", file=sys.stderr)
        return 2
    print(f"submitted job {job_id}\nlog: {job.log_path(job_id)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options (``launch cfg --nproc 2 train.lr=1``), which argparse
    # leaves unparsed once the positionals are filled: collect those, reject anything else.
    args, extra = parser.parse_known_args(argv)
    # Before anything is written (and inherited by torchrun's workers): no group/world write.
    restrict_umask()
    if args.command == "ckpt":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        from shardtune.checkpoint.commands import run as run_ckpt_command

        return run_ckpt_command(args)
    if args.command == "data":
        from shardtune.data.prepare import run_prepare_command

        return run_prepare_command(args, extra, parser)
    if args.command == "report":
        from shardtune.eval.report import write_report

        print(write_report(args.run_dir))
        return 0
    if args.command == "eval":
        from shardtune.eval.standalone import run_eval_command

        return run_eval_command(args, extra)
    if args.command == "sweep":
        from shardtune.sweep import run_sweep

        stray = [a for a in extra if "=" not in a or a.startswith("-")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        config_path, overrides = _split_config_and_overrides(args)
        from shardtune.launch.slurm import SubmitError
        from shardtune.sweep import collect_sweep, submit_sweep_array

        try:
            if args.collect:
                print(collect_sweep(args.collect).read_text(), end="")
            elif args.slurm:
                return submit_sweep_array(config_path, args.grid, [*overrides, *extra], args)
            else:
                run_sweep(config_path, args.grid, [*overrides, *extra], nproc=args.nproc, out=args.out,
                          port=args.port)
        except (ConfigError, SubmitError) as exc:
            print(f"shardtune: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "slurm" and args.slurm_command == "signal-trainers":
        import signal

        from shardtune.launch.trainer_signals import signal_trainers

        signal_trainers(signal.Signals["SIG" + args.signal], args.job, wait_s=args.wait)
        return 0
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*getattr(args, "overrides", []), *extra]
    config_path, overrides = _split_config_and_overrides(args)
    try:
        cfg = load_config(config_path, overrides)
    except ConfigError as exc:
        print(f"shardtune: {exc}", file=sys.stderr)
        return 2

    if args.command == "plan":
        from shardtune.plan import run_plan

        try:
            print(run_plan(cfg, args.nodes, args.gpus_per_node, args.gpu_memory))
        except ValueError as exc:
            print(f"shardtune: {exc}", file=sys.stderr)
            return 2
        return 0

    if args.command == "config":
        print(dump_config(cfg), end="")
        return 0

    if args.command == "slurm":
        return _slurm_submit(args, config_path, overrides, cfg)

    if args.command == "launch":
        import shlex

        from shardtune.launch.local import run_torchrun, torchrun_command, torchrun_environment

        cmd = torchrun_command(
            config_path, overrides, nproc=args.nproc, nnodes=args.nnodes,
            node_rank=args.node_rank, master_addr=args.master, master_port=args.port,
            max_restarts=args.max_restarts, rdzv_id=args.rdzv_id,
        )
        extra_env = torchrun_environment(args.nnodes, args.max_restarts)
        if args.dry_run:
            print(" ".join([*(f"{k}={v}" for k, v in extra_env.items()), shlex.join(cmd)]))
            return 0
        return run_torchrun(cmd, extra_env)

    from shardtune.checkpoint.manifest import CheckpointError
    from shardtune.checkpoint.safe_io import UnsafeCheckpointError
    from shardtune.data.corpus import DataError
    from shardtune.data.shards import ShardError
    from shardtune.distributed.watchdog import CollectiveTimeoutError
    from shardtune.train.loop import NonFiniteLossError, train
    from shardtune.train.signals import PREEMPTED_EXIT_CODE, Preempted

    try:
        train(cfg)
    except NonFiniteLossError as exc:
        print(f"shardtune: stopped: {exc}", file=sys.stderr)
        return 3
    except Preempted as exc:
        print(f"shardtune: {exc}; rerun the same command to resume", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except (CheckpointError, UnsafeCheckpointError) as exc:
        print(f"shardtune: checkpoint error: {exc}", file=sys.stderr)
        return 4
    except (DataError, ShardError) as exc:
        print(f"shardtune: data error: {exc}", file=sys.stderr)
        return 2
    except CollectiveTimeoutError as exc:
        print(f"shardtune: {exc}", file=sys.stderr)
        return 5
    return 0


if __name__ == "__main__":
    sys.exit(main())
