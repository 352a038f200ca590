"""Host memory and time to load a pre-trained model for training, per strategy and world size.

Writes a ~300M-parameter Llama (random weights, bf16 safetensors, as Hugging Face ships
checkpoints) once into .cache/bench-loading/, then loads it with ``strategy.build_model`` +
``strategy.setup`` (what ``build_run`` does) under torchrun. Each rank reports the growth of
its peak resident set (VmHWM, reset just before the load) and the load time; a row keeps the
largest rank's numbers. Rows:

* fsdp and zero3 at 1, 2, 4 ranks (meta build, own shards read with ``pread``), ddp at 2;
* ``full build``: fsdp and zero3 at 2 ranks the way they loaded before (every rank builds
  the whole model, then shards): the time and memory to beat;
* readers: fsdp at 2 ranks with ``safe_open`` slices and with torch DCP's
  ``HuggingFaceStorageReader`` instead of ``pread``.

    nice -n 10 python bench/loading.py            # 3 rounds of every case: ~25 min on 2 cores
    python bench/loading.py --report              # rewrite the table from the JSON

Each case's raw result is kept in .cache/bench-loading/runs/ and reused by a rerun; delete
that directory to measure everything again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench-loading"
RESULTS = ROOT / "bench" / "results"
WORKER = ROOT / "bench" / "loading_worker.py"
# ~302M parameters: 20 blocks of hidden 1024 (GQA 16/8 heads, MLP 2816), 32000-token vocabulary.
LLAMA_300M = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=20, num_attention_heads=16,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=2048,
                  tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIG = """run: {name: bench-loading, seed: 3}
model: {name_or_path: %(dir)s}
tokenizer: {name_or_path: %(dir)s}
data: {source: synthetic, seq_len: 128}
train: {micro_batch_size: 1, global_batch_size: 4, max_steps: 10, lr: 1.0e-4}
distributed: {strategy: fsdp, collective_timeout_s: 1200}
"""
CASES = [  # (label, strategy, world size, reader, full build)
    ("sharded", "fsdp", 1, "pread", False), ("sharded", "fsdp", 2, "pread", False),
    ("sharded", "fsdp", 4, "pread", False),
    ("sharded", "zero3", 1, "pread", False), ("sharded", "zero3", 2, "pread", False),
    ("sharded", "zero3", 4, "pread", False),
    ("full model per rank", "ddp", 2, "pread", False),
    ("full build (before)", "fsdp", 2, "pread", True), ("full build (before)", "zero3", 2, "pread", True),
    ("reader: safe_open slices", "fsdp", 2, "safe_open", False),
    ("reader: DCP HuggingFaceStorageReader", "fsdp", 2, "dcp", False),
]


def checkpoint() -> tuple[Path, int]:
    """The bench model's directory (written on first use) and its parameter count."""
    directory = CACHE / "llama-300m"
    if not (directory / "config.json").is_file():
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.manual_seed(0)
        with torch.device("meta"):
            shapes = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **LLAMA_300M))
        # Random bf16 values written tensor by tensor: no full fp32 model in this process.
        state = {name: torch.randn(p.shape, dtype=torch.bfloat16) * 0.02 for name, p in shapes.named_parameters()}
        shapes.config.dtype = "bfloat16"
        shapes.save_pretrained(directory, state_dict=state)
    config = json.loads((directory / "config.json").read_text())
    from shardtune.plan import Architecture

    return directory, Architecture.from_mapping(config).params


def run_case(directory: Path, strategy: str, world: int, reader: str, full_build: bool, work: Path,
             repeat: int = 0) -> dict:
    config = work / "config.yaml"
    config.write_text(CONFIG % {"dir": directory})
    cases = work / f"cases-{strategy}-{world}-{reader}-{int(full_build)}-r{repeat}.json"
    out = cases.with_suffix(".out.json")
    cases.write_text(json.dumps([{"config": str(config), "overrides": [f"distributed.strategy={strategy}"],
                                  "reference": False, "full_build": full_build}]))
    env = dict(os.environ, BENCH_READER=reader, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore::FutureWarning")
    cmd = ["nice", "-n", "10", sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
           str(WORKER), str(out), str(cases)]
    if out.is_file():  # measured already (a rerun after a failed case measures only what is missing)
        (result,) = json.loads(out.read_text())
        return result
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if not out.is_file():
        raise RuntimeError(f"{strategy} x{world} {reader}: exit {proc.returncode}\n{proc.stderr[-4000:]}")
    (result,) = json.loads(out.read_text())
    return result


def reader_ab(directory: Path, rounds: int = 5) -> dict:
    """In one process, warm page cache: rank 0 of 2's rows of every tensor into fp32, read with
    shardtune's ``pread`` and with ``safe_open`` slices, alternating so drift hits both alike
    (the torchrun rows' times include start-up and a busy machine's noise)."""
    import time

    import torch
    from safetensors import safe_open

    from shardtune.models.sharded_load import SafetensorsCheckpoint

    checkpoint = SafetensorsCheckpoint(directory)
    shards = {}
    for key, stored in checkpoint.tensors.items():
        rows = -(-stored.shape[0] // 2)
        shards[key] = torch.empty((rows, *stored.shape[1:]), dtype=torch.float32)

    def with_pread() -> None:
        for key, out in shards.items():
            checkpoint.read_flat(key, 0, out)

    def with_safe_open() -> None:
        handles = {}
        for key, out in shards.items():
            path = checkpoint.tensors[key].path
            handles.setdefault(path, safe_open(str(path), "pt"))
            out.copy_(handles[path].get_slice(key)[: out.shape[0]])

    times = {"pread": [], "safe_open": []}
    for _ in range(rounds):
        for name, fn in (("pread", with_pread), ("safe_open", with_safe_open)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    checkpoint.close()
    return {name: {"median_s": round(statistics.median(t), 3), "all_s": [round(x, 3) for x in t]}
            for name, t in times.items()}


def measure(repeats: int) -> dict:
    directory, params = checkpoint()
    full_mib = 4 * params / 2**20
    work = CACHE / "runs"
    work.mkdir(parents=True, exist_ok=True)
    # Round-robin over the cases, each load a fresh torchrun job: every case sees the machine
    # in the same states, so the sharded and full-build times compare side by side.
    results = {case: [] for case in CASES}
    for repeat in range(repeats):
        for case in CASES:
            _, strategy, world, reader, full_build = case
            results[case].append(run_case(directory, strategy, world, reader, full_build, work, repeat))
    rows = []
    for (label, strategy, world, reader, full_build), runs in results.items():
        times = [max(r["load_seconds_all"] for r in run["rows"]) for run in runs]
        ranks = [r for run in runs for r in run["rows"]]
        worst = max(ranks, key=lambda r: r["load_growth_mib"])
        row = {
            "case": label, "strategy": strategy, "world_size": world, "reader": reader,
            "peak_host_mib_per_rank": round(worst["load_growth_mib"], 1),
            "setup_peak_host_mib_per_rank": round(max(r["growth_mib"] for r in ranks), 1),
            "vmhwm_mib_per_rank": round(max(r["peak_mib"] for r in ranks), 1),
            "rss_anon_mib": round(worst["rss_anon_mib"], 1), "rss_file_mib": round(worst["rss_file_mib"], 1),
            "full_model_mib": round(full_mib, 1),
            "load_seconds": round(statistics.median(times), 2),
            "load_seconds_each_repeat": [round(t, 2) for t in times],
            "note": worst["note"],
        }
        if strategy in ("fsdp", "zero3") and not full_build:
            row["target_mib"] = round(full_mib / world + 0.25 * full_mib, 1)
            row["meets_target"] = row["peak_host_mib_per_rank"] <= row["target_mib"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    readers = reader_ab(directory)
    print(json.dumps(readers), flush=True)
    return {"model": {"params": params, "checkpoint_dtype": "bf16", **LLAMA_300M}, "reader_ab": readers,
            "measure": "peak_host_mib_per_rank: largest rank's VmHWM once the weights are in place, minus its "
                       "RSS just before the load (VmHWM reset by /proc/self/clear_refs); "
                       "setup_peak_host_mib_per_rank: the same at the end of strategy.setup, which adds the "
                       "optimizer's / DeepSpeed engine's own buffers (memory: the largest of all repeats); "
                       f"load_seconds: build_model + setup, slowest rank, median of {repeats} fresh jobs "
                       "per case, the cases round-robin",
            "rows": rows}


def report(data: dict) -> str:
    lines = [f"# Loading a {data['model']['params'] / 1e6:.0f}M-parameter Llama (bf16 safetensors) for training, CPU",
             "", f"{data['measure']}. Full fp32 model: {data['rows'][0]['full_model_mib']:.0f} MiB.", "",
             "| case | strategy | ranks | reader | load peak MiB/rank | target MiB | after setup MiB/rank | VmHWM MiB | anon / file MiB after | load s | each job's s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        target = f"{r['target_mib']:.0f} ({'met' if r['meets_target'] else 'NOT met'})" if "target_mib" in r else "-"
        lines.append(f"| {r['case']} | {r['strategy']} | {r['world_size']} | {r['reader']} | "
                     f"{r['peak_host_mib_per_rank']:.0f} | {target} | {r['setup_peak_host_mib_per_rank']:.0f} | "
                     f"{r['vmhwm_mib_per_rank']:.0f} | "
                     f"{r['rss_anon_mib']:.0f} / {r['rss_file_mib']:.0f} | {r['load_seconds']:.1f} | "
                     f"{', '.join(f'{t:.1f}' for t in r.get('load_seconds_each_repeat', []))} |")
    ab = data.get("reader_ab")
    if ab:
        lines += ["", "Readers, one process, warm page cache, rank 0 of 2's rows of every tensor into fp32 "
                  f"(median of {len(ab['pread']['all_s'])}): pread {ab['pread']['median_s']:.2f} s, "
                  f"safe_open slices {ab['safe_open']['median_s']:.2f} s."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="store_true", help="only rewrite the table from the JSON")
    parser.add_argument("--repeats", type=int, default=3, help="fresh jobs per case (load time: their median)")
    args = parser.parse_args()
    out_json = RESULTS / "loading-cpu.json"
    data = json.loads(out_json.read_text()) if args.report else measure(args.repeats)
    out_json.write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / "loading-cpu.md").write_text(report(data))
    print(report(data))


if __name__ == "__main__":
    main()
