"""Preference tuning against TRL's DPOTrainer: the same model, pairs, order and hyper-parameters.

    .venv/bin/python bench/preference.py [--steps 10] [--out bench/results/preference-cpu]

1. Generated pairs (shardtune.data.synthetic_feedback: a right answer over a typical mistake) are
   prepared by ``shardtune data prepare`` (format: preference) with a byte-level BPE.
2. One tiny Llama is initialised once and saved as a Hugging Face directory; both trainers load it.
3. shardtune trains on 1 and on 2 gloo ranks (``shardtune launch``); TRL (``DPOTrainer``, in
   bench/preference_trl_worker.py) trains on the same pairs, decoded from shardtune's token ids in
   shardtune's epoch-0 order with shuffling off, so step k of every run sees the same 8 pairs.
   Both: sigmoid DPO, beta 0.1, AdamW (0.9, 0.95, eps 1e-8, no weight decay), constant LR,
   clipping at 1.0, fp32, reference log-probs precomputed from the initial weights.
4. The per-step losses are compared (the tolerance and why are in the table), and the pairs per
   second of each run, measured from its second step on, are put side by side.

Writes ``<out>.json`` (naming TRL and its version) and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# fp32 on CPU: the two trainers compute the same sums in another order (TRL's fused log-prob head,
# other batch padding), ~1e-6 relative per step, growing slowly with the updates. 1e-4 is the bound
# the strategy tests use; a wrong normalisation (per token instead of per pair, a missing
# 1/accumulation) or a different reference moves the loss by more than 1e-2 within three steps.
REL_TOLERANCE = 1e-4
HPARAMS = {"micro_batch_size": 2, "global_batch_size": 8, "lr": 1e-3, "beta": 0.1, "seq_len": 64}


def env() -> dict[str, str]:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONWARNINGS": "ignore::FutureWarning"}


def prepare(work: Path) -> tuple[Path, Path]:
    from shardtune.config import PrepareSection
    from shardtune.data.prepare import prepare_dataset
    from shardtune.data.synthetic_feedback import generate_pairs

    pairs = work / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in generate_pairs(600, seed=3)))
    settings = PrepareSection(format="preference", progress=False, splits={"train": 0.9, "validation": 0.1, "test": 0.0})
    prepared = prepare_dataset(settings, work / "prepared", inputs=[str(pairs)], tokenizer_vocab_size=512).out_dir
    return prepared, prepared / "tokenizer"


def initial_model(tokenizer_dir: Path, out: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                  vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def shardtune_config(work: Path, model_dir: Path, prepared: Path, steps: int) -> Path:
    import yaml

    hp = HPARAMS
    config = {
        "run": {"name": "bench-preference", "seed": 11}, "task": "preference",
        "model": {"name_or_path": str(model_dir)}, "tokenizer": {"name_or_path": str(model_dir)},
        "data": {"source": "prepared", "prepared_dir": str(prepared), "seq_len": hp["seq_len"]},
        "finetune": {"preference": {"loss": "dpo", "beta": hp["beta"]}},
        "train": {"micro_batch_size": hp["micro_batch_size"], "global_batch_size": hp["global_batch_size"],
                  "max_steps": steps, "lr": hp["lr"], "schedule": "constant", "warmup_steps": 0,
                  "weight_decay": 0.0, "betas": [0.9, 0.95], "eps": 1e-8, "max_grad_norm": 1.0},
        "distributed": {"precision": "fp32"},
        "checkpoint": {"at_end": False}, "eval": {"save_best": False, "batches": 1},
        "metrics": {"log_every": 1, "progress_bar": False},
    }
    path = work / "shardtune.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_shardtune(config: Path, out: Path, nproc: int) -> dict:
    cmd = [sys.executable, "-m", "shardtune", "launch", str(config), "--nproc", str(nproc), "--port", str(29640 + nproc),
           f"run.output_dir={out}"]
    subprocess.run(cmd, cwd=ROOT, env=env(), check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    seq_len = HPARAMS["seq_len"]
    per_s = [r["tokens_per_s"] / seq_len for r in train[1:]]  # pairs/s of each step, from the second on
    return {"losses": [r["loss"] for r in train], "pairs_per_s": len(per_s) / sum(1 / p for p in per_s)}


def trl_pairs(prepared: Path, tokenizer_dir: Path, seed: int, count: int) -> tuple[list[dict], list[list]]:
    """Pairs in shardtune's epoch-0 order, as the text TRL tokenizes, and shardtune's ids for them."""
    from transformers import AutoTokenizer

    from shardtune.data.preference_source import PreferenceSource
    from shardtune.data.shards import open_corpus, read_manifest

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    source = PreferenceSource(open_corpus(prepared, read_manifest(prepared), "train"), HPARAMS["seq_len"], seed)
    epoch = source.epoch(0)

    def text(ids) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pairs, ids = [], []
    for k in range(count):
        pair = epoch[k]
        p = int((pair["labels"][0] == -100).argmin())
        rows = [pair["input_ids"][i, : pair["lengths"][i]].tolist() for i in range(2)]
        # TRL appends the EOS text to a response itself.
        pairs.append({"prompt": text(rows[0][:p]), "chosen": text(rows[0][p:-1]), "rejected": text(rows[1][p:-1])})
        ids.append(rows)
    return pairs, ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "preference-cpu"))
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-preference"))
    args = parser.parse_args(argv)
    load_at_start = os.getloadavg()[0]
    work = Path(args.work)
    # A previous bench's run directories would be resumed from their last checkpoint.
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    prepared, tokenizer_dir = prepare(work)
    model_dir = initial_model(tokenizer_dir, work / "initial-model")
    config = shardtune_config(work, model_dir, prepared, args.steps)
    runs = {f"shardtune, {n} rank{'s' if n > 1 else ''}": run_shardtune(config, work / f"shardtune-{n}", n) for n in (1, 2)}

    pairs, ids = trl_pairs(prepared, tokenizer_dir, seed=11, count=args.steps * HPARAMS["global_batch_size"])
    spec = {"model_dir": str(model_dir), "pairs": pairs, "token_ids": ids, "work_dir": str(work / "trl"),
            "hparams": {**HPARAMS, "steps": args.steps}}
    (work / "trl-spec.json").write_text(json.dumps(spec))
    subprocess.run([sys.executable, str(ROOT / "bench" / "preference_trl_worker.py"), str(work / "trl-spec.json"),
                    str(work / "trl.json")], cwd=ROOT, env=env(), check=True, capture_output=True, text=True)
    trl = json.loads((work / "trl.json").read_text())
    trl_steady = HPARAMS["global_batch_size"] / trl["steady_s_per_step"]
    runs[f"TRL {trl['trl_version']} DPOTrainer, 1 process"] = {"losses": trl["losses"], "pairs_per_s": trl_steady}

    reference = runs["shardtune, 1 rank"]["losses"]
    for r in runs.values():
        r["max_rel_diff_vs_shardtune_1"] = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], reference, strict=True))
        r["agrees"] = r["max_rel_diff_vs_shardtune_1"] <= REL_TOLERANCE
    result = {"reference": f"TRL {trl['trl_version']} DPOTrainer", "steps": args.steps, "hparams": HPARAMS,
              "tolerance_rel": REL_TOLERANCE, "tokenization_identical": f"{trl['tokenization_identical']}/{trl['pairs']}",
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, 1-min load average {load_at_start:.2f} "
                         "at the start (the runs are side by side, so the ratio holds; absolute rates less)",
              "runs": runs}
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(result: dict) -> str:
    names = list(result["runs"])
    lines = [f"# DPO: shardtune vs {result['reference']} (CPU, fp32)", "",
             f"Same initial weights, pairs, order and hyper-parameters ({json.dumps(result['hparams'])}); "
             f"TRL tokenized {result['tokenization_identical']} pairs to exactly shardtune's ids. "
             f"Tolerance: {result['tolerance_rel']:g} relative per step (see bench/preference.py).", "",
             "| step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for step in range(result["steps"]):
        lines.append(f"| {step + 1} | " + " | ".join(f"{result['runs'][n]['losses'][step]:.6f}" for n in names) + " |")
    lines.append("| max rel. diff vs shardtune 1 rank | "
                 + " | ".join(f"{result['runs'][n]['max_rel_diff_vs_shardtune_1']:.1e}" for n in names) + " |")
    lines.append("| pairs/s (steps 2+) | " + " | ".join(f"{result['runs'][n]['pairs_per_s']:.1f}" for n in names) + " |")
    lines += ["", f"Machine: {result['machine']}; throughput numbers on a shared machine are indicative only."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
