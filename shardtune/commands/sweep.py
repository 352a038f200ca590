"""``shardtune sweep``: a grid of configs run in turn (or as a SLURM job array), and their table."""

from __future__ import annotations

from shardtune.commands._args import add_config_args, config_and_overrides, reject_stray


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sweep", help="run a grid of configs in turn and write a comparison table",
        description="shardtune sweep CONFIG --grid finetune.strategy=full,frozen_head,lora "
        "--grid train.lr=1e-5,3e-5 [key=value ...]: runs every combination with `shardtune launch` "
        "(locally, one after another) and writes sweep.md and sweep.csv (validation/test metrics vs "
        "the baseline, steps, wall time, trainable parameters).",
    )
    add_config_args(p)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                         help="a config key and its values; repeat for a cartesian product")
    p.add_argument("--nproc", type=int, default=1, help="ranks per run")
    p.add_argument("--port", type=int, default=29500)
    p.add_argument("--out", help="sweep directory (default: <runs>/<run.name>-sweep)")
    p.add_argument("--collect", metavar="SWEEP_DIR",
                         help="only (re)write sweep.md/.csv of a sweep directory from what its runs wrote")
    p.add_argument("--slurm", action="store_true",
                         help="submit a SLURM job array (task i runs combination i) plus a dependent job "
                         "that writes the table; the options below apply to every task")
    p.add_argument("--nodes", type=int, default=1, help="--slurm: nodes per combination")
    p.add_argument("--gpus-per-node", type=int, default=0, help="--slurm: 0 on CPU-only nodes")
    p.add_argument("--ranks-per-node", type=int, help="--slurm: default --nproc, or one per GPU")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", help="--slurm: wall-clock limit per task, e.g. 4:00:00")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--max-parallel", type=int, help="--slurm: at most this many tasks at once (--array=0-N%%K)")
    p.add_argument("--max-requeues", type=int, default=3, help="--slurm: requeues per task after preemption")
    p.add_argument("--warn-seconds", type=int, default=180,
                         help="--slurm: SIGUSR1 this long before the time limit, to checkpoint")
    p.add_argument("--template", help="--slurm: sbatch template instead of slurm/sweep-array.sbatch")
    p.add_argument("--no-collect-job", action="store_true", help="--slurm: submit the array only")
    p.add_argument("--dry-run", action="store_true", help="--slurm: print the array script, submit nothing")


def run(args, extra, parser) -> int:
    from shardtune.sweep import collect_sweep, run_sweep, submit_sweep_array

    reject_stray(parser, extra)
    config_path, overrides = config_and_overrides(args, extra)
    if args.collect:
        print(collect_sweep(args.collect).read_text(), end="")
    elif args.slurm:
        return submit_sweep_array(config_path, args.grid, overrides, args)
    else:
        run_sweep(config_path, args.grid, overrides, nproc=args.nproc, out=args.out, port=args.port)
    return 0
