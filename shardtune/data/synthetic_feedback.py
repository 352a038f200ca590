"""Generated preference pairs with a known right answer, for tests and the preference benchmark.

Each pair is a prompt of the built-in instruction task (``synthetic.py``: addition, word
reversal, sorting, capitals), its correct completion as ``chosen`` and a typical mistake as
``rejected``: an off-by-some sum, the words not reversed, the numbers in descending order, the
capital of another country. A model that learns the preference learns the rule the mistake breaks.

    python -m shardtune.data.synthetic_feedback OUT.jsonl [--pairs 2000] [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import random
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


def main(argv: list[str] | None = None) -> int:
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


if __name__ == "__main__":
    raise SystemExit(main())
