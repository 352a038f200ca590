"""The built-in instruction task: prompt/completion pairs a small model can learn in minutes.

Four skills with exact answers (addition, word reversal, sorting, and a fixed lookup table)
so the loss has a real floor well below the unigram entropy, and a falling loss means the
model learned the rules, not just the vocabulary.
"""

from __future__ import annotations

import random

_WORDS = (
    "amber birch cedar delta ember fjord grove harbor iris jade kelp lumen maple nectar "
    "onyx pebble quartz raven sage tundra umber violet willow xenon yarrow zephyr"
).split()

_CAPITALS = {
    "Aldoria": "Brightwater", "Belmora": "Casterly", "Corvana": "Dunmere",
    "Dravik": "Eastholm", "Elvaria": "Frostgate", "Fenwick": "Glenrock",
    "Galdor": "Highmoor", "Halcyra": "Ironvale", "Istria": "Juniper",
    "Jorvath": "Kestrel", "Kalmor": "Lindenhall", "Lorvane": "Mistral",
}


def _addition(rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return {"prompt": f"Add {a} and {b}.", "completion": str(a + b)}


def _reverse(rng: random.Random) -> dict[str, str]:
    words = rng.sample(_WORDS, rng.randint(3, 7))
    return {"prompt": "Reverse: " + " ".join(words), "completion": " ".join(reversed(words))}


def _sort(rng: random.Random) -> dict[str, str]:
    nums = [rng.randint(0, 99) for _ in range(rng.randint(3, 8))]
    return {"prompt": "Sort: " + " ".join(map(str, nums)), "completion": " ".join(map(str, sorted(nums)))}


def _capital(rng: random.Random) -> dict[str, str]:
    country = rng.choice(sorted(_CAPITALS))
    return {"prompt": f"What is the capital of {country}?", "completion": _CAPITALS[country]}


_TASKS = (_addition, _reverse, _sort, _capital)


def generate_records(num_records: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [rng.choice(_TASKS)(rng) for _ in range(num_records)]
