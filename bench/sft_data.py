"""Variable-length chat conversations for bench/sft.py (1-6 turns, ~10x spread in tokens).

shardtune's own generator (``shardtune.data.synthetic_chat``) makes the *short* set as it is:
one or two turns of one-line answers, all of similar length. Real SFT data mixes one-line
answers with long multi-turn exchanges, which is where padding to the longest example costs
the most, so this set adds turns whose answers run from one word to a paragraph, and 1-6
turns per conversation. It reuses the project's skills and vocabulary; the project's
generator and its default output stay untouched (the tests depend on them).

    .venv/bin/python bench/sft_data.py OUT.jsonl [--records 1500] [--seed 11]
"""

from __future__ import annotations

import argparse
import random

from shardtune.data.synthetic import _CAPITALS, _WORDS
from shardtune.data.synthetic_chat import SKILLS, SYSTEM_PROMPT, write_jsonl

_ORDINALS = "first second third fourth fifth sixth seventh eighth".split()
_FACTS = ("{c} lies beside the {w} coast.", "The people of {c} trade {w} and salt.",
          "Travellers reach {k} by the old {w} road.", "{k} holds a market every {o} day.",
          "The river through {k} is named after a {w}.", "{c} elects a council of {n} members.",
          "Children in {c} learn to carve {w} wood.", "The flag of {c} shows a {w} on green.",
          "Winters in {k} are long and the {w} trees lose their leaves.",
          "Every spring {k} celebrates the {o} harvest with music.")


def _sorted_words(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(_WORDS, rng.randint(4, 16))
    return f"Sort these words alphabetically: {', '.join(words)}.", ", ".join(sorted(words))


def _describe(rng: random.Random) -> tuple[str, str]:
    country = rng.choice(sorted(_CAPITALS))
    capital = _CAPITALS[country]
    facts = [f.format(c=country, k=capital, w=rng.choice(_WORDS), o=rng.choice(_ORDINALS), n=rng.randint(3, 99))
             for f in rng.sample(_FACTS, rng.randint(2, 7))]
    return f"Tell me about {country} in a few sentences.", f"{country} has {capital} as its capital. " + " ".join(facts)


def _count_words(rng: random.Random) -> tuple[str, str]:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
    target = rng.choice(words)
    return (f"How many times does '{target}' appear in: {' '.join(words)}? Explain briefly.",
            f"'{target}' appears {words.count(target)} time(s): at positions "
            + ", ".join(str(i + 1) for i, w in enumerate(words) if w == target) + ".")


# Half the turns keep the project's one-line answers, half have answers of 5-120 tokens.
_LONG_SKILLS = (_sorted_words, _describe, _count_words)


def generate_variable(num_records: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(num_records):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}]
        # Skewed towards few turns, as in real chat logs; the long tail sets the padding.
        turns = rng.choices(range(1, 7), weights=(30, 20, 15, 12, 12, 11))[0]
        for _turn in range(turns):
            skill = rng.choice(_LONG_SKILLS if rng.random() < 0.5 else SKILLS)
            question, answer = skill(rng)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        records.append({"messages": messages})
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("--records", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    path = write_jsonl(args.out, generate_variable(args.records, args.seed))
    print(f"wrote {args.records} conversations to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
