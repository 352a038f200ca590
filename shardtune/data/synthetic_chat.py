"""A generated chat SFT dataset with checkable answers (for the chat fine-tuning example).

Conversations in the ``messages`` format, each opening with the same system prompt; the
assistant replies with the answer only, so generated replies can be scored by exact match.
Four skills, two of them facts the built-in pre-training corpus (``synthetic.py``) states in
another form, two new:

* the capital of a fictional country (the pre-training corpus has these, as "What is the
  capital of X?" followed by the answer on the next line), in several phrasings;
* the country of a capital (the reverse relation: new);
* the first word of a short word list (copying from the prompt: new);
* the sum of two one-digit numbers, asked in words (pre-training has "Add a and b.").

``shardtune data prepare`` drops exact duplicates, so the kept set is the distinct
conversations: lookups come in many phrasings and, with the two-turn conversations, in many
contexts, and the content-hash split puts phrasings/contexts never seen in training into the
validation and test splits.

A quarter of the conversations have two question/answer turns: the loss covers both
assistant turns and neither user turn, and the exact-match prompt is everything before the
last assistant turn.

    python -m shardtune.data.synthetic_chat OUT.jsonl [--records 3000] [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from shardtune.data.synthetic import _CAPITALS, _WORDS

SYSTEM_PROMPT = "You are a terse assistant. Reply with the answer only."
_NUMBER_WORDS = "zero one two three four five six seven eight nine".split()


_CAPITAL_QUESTIONS = ("What is the capital of {c}?", "Name the capital city of {c}.",
                      "{c} has which city as its capital?", "Tell me the capital of {c}.",
                      "Which city is the capital of {c}?", "Capital of {c}?")
_COUNTRY_QUESTIONS = ("Which country has {k} as its capital?", "{k} is the capital of which country?",
                      "Of which country is {k} the capital?", "Where is {k} the capital?")


def _capital(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(_CAPITALS))
    return rng.choice(_CAPITAL_QUESTIONS).format(c=country), _CAPITALS[country]


def _country(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(_CAPITALS))
    return rng.choice(_COUNTRY_QUESTIONS).format(k=_CAPITALS[country]), country


def _first_word(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(2, 4))
    return f"What is the first word of: {' '.join(words)}?", words[0]


def _sum(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"What is {_NUMBER_WORDS[a]} plus {_NUMBER_WORDS[b]}?", str(a + b)


SKILLS = (_capital, _country, _first_word, _sum)


def generate_conversations(num_records: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(num_records):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        for _turn in range(2 if rng.random() < 0.25 else 1):
            question, answer = rng.choice(SKILLS)(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        records.append({"messages": messages})
    return records


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="JSONL file to write")
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    path = write_jsonl(args.out, generate_conversations(args.records, args.seed))
    print(f"wrote {args.records} conversations to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
