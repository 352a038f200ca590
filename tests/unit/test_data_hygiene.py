"""``data prepare`` on inputs shaped like real data: length guards, near-duplicates that spare
valid records, fail-fast errors, clear messages, real CSV line numbers.

Each test writes its own small data from random words (no fixed dataset), so it checks a
class of input, not one file.
"""

from __future__ import annotations

import csv
import json
import random
import string
import time

import pytest

from shardtune.cli import main as cli_main
from shardtune.config import PrepareSection
from shardtune.data.prepare import prepare_dataset
from shardtune.data.tokenizer import train_tokenizer
from shardtune.errors import DataError

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega red green blue cyan black white library files "
         "development headers runtime support tools documentation plugin module bindings").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


def name(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8)))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = random.Random(0)
    texts = [sentence(rng, 30) for _ in range(200)] + ["<|user|> <|assistant|> <|system|> ++ - : ."]
    return train_tokenizer(texts, 400, tmp_path_factory.mktemp("tok"))


def settings(**kw) -> PrepareSection:
    kw.setdefault("progress", False)
    kw.setdefault("splits", {"train": 1, "validation": 0, "test": 0})
    return PrepareSection(**kw)


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def chat(rng: random.Random, reply: str | None = None) -> dict:
    return {"messages": [{"role": "user", "content": sentence(rng, 8)},
                         {"role": "assistant", "content": reply or sentence(rng, 10)}]}


# -- length guards -----------------------------------------------------------------------


def test_a_monster_message_is_dropped_even_when_the_tokenizer_compresses_it(tmp_path):
    rng = random.Random(1)
    records = [chat(rng) for _ in range(40)]
    # Repeated text: a BPE trained on this very file turns it into a handful of tokens.
    unit = sentence(rng, 6) + " "
    monster_line = rng.randrange(5, 35)
    records.insert(monster_line - 1, chat(rng, reply=(unit * (200_000 // len(unit) + 1))[:200_000]))
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, records)
    # No max_tokens and no tokenizer given: the defaults alone must catch it.
    result = prepare_dataset(settings(), tmp_path / "out", inputs=[str(path)], tokenizer_vocab_size=300)
    report = result.report
    assert report["dropped_by_reason"] == {"too_long": 1}
    assert report["drop_examples"]["too_long"][0].startswith(f"{path}:{monster_line} ")
    assert "messages[1]" in report["drop_examples"]["too_long"][0]
    assert report["records_kept"] == 40
    # The limit follows seq_len and can be turned off, but only explicitly.
    off = prepare_dataset(settings(max_chars=None, max_message_chars=None), tmp_path / "off", inputs=[str(path)],
                          tokenizer_vocab_size=300)
    assert off.report["records_kept"] == 41
    assert result.manifest["settings"]["max_chars"] < 200_000 <= prepare_dataset(
        settings(), tmp_path / "long-seq", inputs=[str(path)], tokenizer_vocab_size=300, seq_len=16384,
    ).manifest["settings"]["max_chars"]


def test_a_long_plain_record_is_too_long_by_characters_and_by_tokens(tmp_path, tokenizer):
    rng = random.Random(2)
    path = tmp_path / "text.jsonl"
    records = [{"text": sentence(rng, 20)} for _ in range(10)]
    records.insert(3, {"text": "x" * 50_000})  # one "word": no whitespace to split on
    records.insert(7, {"text": sentence(rng, 300)})
    write_jsonl(path, records)
    result = prepare_dataset(settings(max_tokens=200), tmp_path / "out", inputs=[str(path)], tokenizer=tokenizer)
    examples = result.report["drop_examples"]["too_long"]
    assert result.report["dropped_by_reason"] == {"too_long": 2}
    assert examples[0].startswith(f"{path}:4 ") and "characters" in examples[0]
    assert examples[1].startswith(f"{path}:8 ") and "tokens" in examples[1]


# -- near-duplicates ---------------------------------------------------------------------


def _variants(rng: random.Random, base: str) -> list[str]:
    """Names that differ by a couple of characters and mean different packages."""
    return [f"{base}-dev", f"{base}++-dev", f"lib{base}", f"lib{base}2", f"{base}.js", f"{base}-doc",
            f"py{base}", f"{base}-c", f"{base}-c++", f"{base}#"]


def test_short_distinct_texts_survive_and_true_near_duplicates_go(tmp_path, tokenizer):
    rng = random.Random(3)
    records, expected_kept = [], 0
    for _ in range(15):  # short records whose texts differ only in the name: all valid
        base, desc = name(rng), sentence(rng, rng.randint(4, 12))
        for variant in rng.sample(_variants(rng, base), 3):
            records.append({"text": f"{variant}: {desc}"})
            expected_kept += 1
    originals = []
    for _ in range(10):  # long texts, and copies with one word changed: near-duplicates
        text = sentence(rng, rng.randint(120, 200))
        originals.append(len(records) + 1)
        records.append({"text": text})
        words = text.split()
        words[rng.randrange(len(words))] = "zzz"
        records.append({"text": " ".join(words)})
        expected_kept += 1
    short = sentence(rng, 6)
    records.append({"text": short})
    records.append({"text": "  " + short.upper().replace(" ", "   ") + "."})  # exact once normalised
    expected_kept += 1
    path = tmp_path / "names.jsonl"
    write_jsonl(path, records)
    result = prepare_dataset(settings(), tmp_path / "out", inputs=[str(path)], tokenizer=tokenizer)
    report = result.report
    assert report["dropped_by_reason"] == {"near_duplicate": 10, "exact_duplicate": 1}
    assert report["records_kept"] == expected_kept
    # Each drop names the record it matched: the kept one, the line just before it.
    for example in report["drop_examples"]["near_duplicate"]:
        line = int(example.split(" ")[0].rsplit(":", 1)[1])
        assert line - 1 in originals and f"matches {path}:{line - 1} " in example
    (exact,) = report["drop_examples"]["exact_duplicate"]
    assert exact.endswith(f"(same as {path}:{len(records) - 1})")


# -- fail fast ---------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_on_bad_record_error_stops_at_the_first_bad_record(tmp_path, tokenizer, workers):
    rng = random.Random(4)
    path = tmp_path / "big.jsonl"
    good = [json.dumps({"text": sentence(rng, 12)}) for _ in range(200)]
    # A large input after the bad record: processing all of it (or training a tokenizer on
    # it, or starting workers first) takes many seconds.
    lines = [good[0], '{"text": "unterminated', *(good * 1500)]
    path.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(DataError, match=rf"{path}:2: malformed_json"):
        prepare_dataset(settings(on_bad_record="error", workers=workers, near_dedup=False), tmp_path / "out",
                        inputs=[str(path)], tokenizer=tokenizer if workers > 1 else None)
    assert time.perf_counter() - start < 1.5
    assert not (tmp_path / "out").exists()


# -- clear errors ------------------------------------------------------------------------


def test_a_directory_input_says_it_is_a_directory(tmp_path, tokenizer, capsys):
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="is a directory"):
        prepare_dataset(settings(), tmp_path / "out", inputs=[str(tmp_path / "data")], tokenizer=tokenizer)
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(str(tok_dir))
    code = cli_main(["data", "prepare", str(tmp_path / "data"), "--out", str(tmp_path / "o"),
                     "--tokenizer", str(tok_dir), "--no-progress"])
    assert code != 0 and "is a directory" in capsys.readouterr().err


def test_zero_records_kept_is_an_error_naming_the_drop_reasons(tmp_path, tokenizer, capsys):
    path = tmp_path / "empty.jsonl"
    write_jsonl(path, [{"text": " "}] * 3 + [{"prompt": "p"}] * 2 + [{"text": "\u200b"}])
    with pytest.raises(DataError, match=r"no record kept.*empty: 4.*missing_field: 2"):
        prepare_dataset(settings(), tmp_path / "out", inputs=[str(path)], tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(str(tok_dir))
    code = cli_main(["data", "prepare", str(path), "--out", str(tmp_path / "o"), "--tokenizer", str(tok_dir),
                     "--no-progress"])
    captured = capsys.readouterr()
    assert code != 0 and "written" not in captured.out and "empty" in captured.err


def test_format_auto_refuses_a_table_it_cannot_read(tmp_path, tokenizer):
    rng = random.Random(5)
    path = tmp_path / "topics.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "category"])
        for _ in range(6):
            writer.writerow([sentence(rng, 8), rng.choice(["a", "b"])])
    with pytest.raises(DataError, match=r"\['category', 'text'\]"):
        prepare_dataset(settings(), tmp_path / "out", inputs=[str(path)], tokenizer=tokenizer)
    # An explicit format is obeyed: text ignores the other column.
    result = prepare_dataset(settings(format="text"), tmp_path / "out", inputs=[str(path)], tokenizer=tokenizer)
    assert result.report["records_kept"] == 6


def test_csv_locations_are_the_files_real_lines(tmp_path, tokenizer):
    rng = random.Random(6)
    path = tmp_path / "pairs.csv"
    rows = [[sentence(rng, 5), sentence(rng, 5)] for _ in range(4)]
    rows[1][0] = "a prompt\nthat spans\nthree lines"  # a quoted field with newlines
    rows.insert(0, ["", sentence(rng, 3)])  # empty prompt is fine; the completion is there
    rows.insert(3, [sentence(rng, 4), ""])  # empty completion: dropped
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["prompt", "completion"])
        writer.writerows(rows)
    lines = path.read_text().split("\n")
    empty_line = next(i for i, line in enumerate(lines, 1) if line.endswith(","))
    result = prepare_dataset(settings(), tmp_path / "out", inputs=[str(path)], tokenizer=tokenizer)
    (where,) = result.report["drop_examples"]["empty"]
    assert where.startswith(f"{path}:{empty_line} ")
    bad = tmp_path / "bad.csv"
    # The first data row sits on line 2, under the header.
    bad.write_text("prompt,completion\n" + sentence(rng, 3) + ",x,extra\n")
    with pytest.raises(DataError, match=rf"{bad}:2: malformed_csv"):
        prepare_dataset(settings(on_bad_record="error"), tmp_path / "out3", inputs=[str(bad)], tokenizer=tokenizer)
