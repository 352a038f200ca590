"""Generated preference pairs with a known right answer, for tests and the preference benchmark.

Each pair is a prompt of the built-in instruction task (``synthetic.py``: addition, word
reversal, sorting, capitals), its correct completion as ``chosen`` and a typical mistake as
``rejected``: an off-by-some sum, the words not reversed, the numbers in descending order, the
capital of another country. A model that learns the preference learns the rule the mistake breaks.

    python -m shardtune.data.synthetic_feedback OUT.jsonl [--pairs 2000] [--seed 7]

``collect`` stands in for deployment and user feedback (docs/iteration.md): a fine-tuned model
(a Hugging Face directory, e.g. a run's export) answers new prompts of the same task, several
sampled answers each, and a rater who knows the right answer scores each 1 (right) or 0
(wrong) and, for a share of the wrong ones, writes the correction. The output is ratings JSONL
(``{"prompt", "response", "rating", "correction"?}``) for ``data prepare`` with format preference.

    python -m shardtune.data.synthetic_feedback collect MODEL_DIR OUT.jsonl [--prompts 600] [--samples 2]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from shardtune.data.synthetic import _CAPITALS, generate_records


def _mistake(prompt: str, answer: str, rng: random.Random) -> str:
    if prompt.startswith("Add "):
        return str(int(answer) + rng.choice([-10, -2, -1, 1, 2, 10]))
    if prompt.startswith("Reverse: "):
        return prompt[len("Reverse: "):]
    if prompt.startswith("Sort: "):
        return " ".join(reversed(answer.split()))
    return rng.choice(sorted(c for c in _CAPITALS.values() if c != answer))


def generate_pairs(num_pairs: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed + 1)
    pairs = []
    for r in generate_records(num_pairs, seed):
        wrong = _mistake(r["prompt"], r["completion"], rng)
        if wrong != r["completion"]:  # a palindromic reversal or a one-number sort has no mistake
            pairs.append({"prompt": r["prompt"], "chosen": r["completion"], "rejected": wrong})
    return pairs


def collect_ratings(model_dir: str, num_prompts: int, samples: int, seed: int, *, max_new_tokens: int = 16,
                    correction_rate: float = 0.5, temperature: float = 1.0, batch: int = 32) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    records = generate_records(num_prompts, seed)
    ratings = []
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        # The SFT document layout: BOS, the prompt and a newline, then the answer.
        prompts = [bos + tokenizer(r["prompt"] + "\n", add_special_tokens=False)["input_ids"] for r in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                                 top_k=0, max_new_tokens=max_new_tokens, num_return_sequences=samples,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        answers = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        for k, answer in enumerate(answers):
            r = chunk[k // samples]
            answer = answer.strip()
            right = answer == r["completion"]
            rating = {"prompt": r["prompt"], "response": answer or "(no answer)", "rating": int(right)}
            if not right and rng.random() < correction_rate:
                rating["correction"] = r["completion"]
            ratings.append(rating)
    return ratings


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["collect"]:
        return _collect_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="JSONL file to write")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    pairs = generate_pairs(args.pairs, args.seed)
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    print(f"wrote {len(pairs)} pairs to {path}")
    return 0


def _collect_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardtune.data.synthetic_feedback collect")
    parser.add_argument("model_dir", help="a Hugging Face model directory (e.g. RUN/hf from shardtune ckpt export)")
    parser.add_argument("out", help="ratings JSONL to write")
    parser.add_argument("--prompts", type=int, default=600)
    parser.add_argument("--samples", type=int, default=2, help="sampled answers per prompt")
    parser.add_argument("--seed", type=int, default=99, help="prompts and sampling (not the SFT data's seed)")
    parser.add_argument("--correction-rate", type=float, default=0.5, help="share of wrong answers corrected")
    args = parser.parse_args(argv)
    ratings = collect_ratings(args.model_dir, args.prompts, args.samples, args.seed,
                              correction_rate=args.correction_rate)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in ratings))
    right = sum(r["rating"] for r in ratings)
    print(f"wrote {len(ratings)} ratings of {args.prompts} prompts to {path}: {right} right, "
          f"{len(ratings) - right} wrong, {sum('correction' in r for r in ratings)} corrected")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
