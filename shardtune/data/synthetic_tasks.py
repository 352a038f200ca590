"""Generated fine-tuning tasks with short, fixed-format answers (the real-model demo's data).

``tickets``: customer-support tickets, each to be filed under one of five categories. The
conversation is a system prompt naming the categories, the ticket as the user turn, and the
category alone as the assistant turn, so a generated reply is scored by exact match. A
pre-trained chat model knows what the words mean but not this label set's boundaries (a
refund for a double charge is ``billing``, a refund for a returned item is ``returns``) nor
the one-word reply format; that is what fine-tuning teaches it.

Tickets are assembled from a few thousand phrase combinations (greeting, complaint,
details, sign-off) with products, order numbers, amounts and dates drawn at random, so the
content-hash split of ``shardtune data prepare`` puts unseen combinations in the validation
and test splits.

    python -m shardtune.data.synthetic_tasks OUT.jsonl [--task tickets] [--records 1200] [--seed 5]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CATEGORIES = ("billing", "shipping", "account", "technical", "returns")
TICKET_SYSTEM_PROMPT = ("Classify the support ticket. Reply with one word: billing, shipping, account, "
                        "technical or returns.")

_PRODUCTS = ("wireless earbuds", "standing desk", "coffee grinder", "smart thermostat", "hiking backpack",
             "air fryer", "mechanical keyboard", "robot vacuum", "yoga mat", "electric kettle",
             "webcam", "desk lamp", "phone case", "blender", "monitor stand", "smartwatch")
_GREETINGS = ("", "Hi, ", "Hello, ", "Hi team, ", "Good morning, ", "Hey there, ", "Dear support, ")
_SIGNOFFS = ("", " Thanks.", " Please help.", " Thank you in advance.", " Any update would be great.",
             " This is urgent.", " Regards, {name}.")
_NAMES = ("Ana", "Ben", "Chloe", "Dev", "Elif", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Luca")

# Per category: what happened, then an optional detail. Slots: {product} {order} {amount} {date} {days}.
_COMPLAINTS = {
    "billing": (
        "I was charged twice for my {product} order.",
        "my card was billed {amount} but the invoice says less.",
        "there is a charge of {amount} on my statement that I do not recognise.",
        "my subscription renewed at the wrong price this month.",
        "the discount code was not applied and I paid {amount} too much.",
        "I need a corrected invoice for order {order}.",
        "you took payment for order {order} after I cancelled it.",
    ),
    "shipping": (
        "my {product} has not arrived yet.",
        "the tracking for order {order} has not moved in {days} days.",
        "the courier says delivered but there is no parcel at my door.",
        "order {order} was sent to my old address.",
        "my {product} is stuck in customs since {date}.",
        "the delivery date for my {product} keeps getting pushed back.",
        "can I change the delivery address for order {order}?",
    ),
    "account": (
        "I cannot log in to my account.",
        "the password reset email never arrives.",
        "please change the email address on my account.",
        "my account was locked after too many attempts.",
        "I want to delete my account and my data.",
        "someone else seems to have signed in to my account.",
        "I cannot turn on two-factor authentication.",
    ),
    "technical": (
        "my {product} will not turn on.",
        "the app crashes every time I open the settings of my {product}.",
        "my {product} keeps disconnecting from wifi.",
        "the firmware update failed and now the {product} shows an error.",
        "the screen of my {product} flickers after {days} days of use.",
        "my {product} does not pair with my phone.",
        "the battery of my {product} drains in an hour.",
    ),
    "returns": (
        "I would like to return my {product}.",
        "how do I send back the {product} from order {order}?",
        "I returned the {product} on {date} and still have no refund.",
        "the {product} is the wrong size, can I exchange it?",
        "I need a return label for order {order}.",
        "the {product} arrived damaged and I want to send it back.",
        "is it too late to return a {product} bought on {date}?",
    ),
}
_DETAILS = ("", " This is the second time this happens.", " I have been a customer for years.")
# Details about an order fit every category but account problems.
_ORDER_DETAILS = (" Order number {order}.", " I ordered it on {date}.", " It cost {amount}.")


def _slots(rng: random.Random) -> dict[str, str]:
    return {
        "product": rng.choice(_PRODUCTS),
        "order": f"#{rng.randint(10000, 99999)}",
        "amount": f"${rng.randint(5, 400)}.{rng.randint(0, 99):02d}",
        "date": f"{rng.choice(('March', 'April', 'May', 'June', 'July'))} {rng.randint(1, 28)}",
        "days": str(rng.randint(3, 14)),
        "name": rng.choice(_NAMES),
    }


def ticket(rng: random.Random) -> tuple[str, str]:
    """(ticket text, category)."""
    category = rng.choice(CATEGORIES)
    slots = _slots(rng)
    greeting = rng.choice(_GREETINGS)
    complaint = rng.choice(_COMPLAINTS[category]).format(**slots)
    if not greeting:
        complaint = complaint[0].upper() + complaint[1:]
    details = _DETAILS if category == "account" else _DETAILS + _ORDER_DETAILS
    text = greeting + complaint + rng.choice(details).format(**slots) + rng.choice(_SIGNOFFS).format(**slots)
    return text, category


def ticket_conversations(num_records: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(num_records):
        text, category = ticket(rng)
        records.append({"messages": [
            {"role": "system", "content": TICKET_SYSTEM_PROMPT},
            {"role": "user", "content": text},
            {"role": "assistant", "content": category},
        ]})
    return records


TASKS = {"tickets": ticket_conversations}


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="JSONL file to write (chat records: {'messages': [...]})")
    parser.add_argument("--task", choices=sorted(TASKS), default="tickets")
    parser.add_argument("--records", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args(argv)
    path = write_jsonl(args.out, TASKS[args.task](args.records, args.seed))
    print(f"wrote {args.records} {args.task} conversations to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
