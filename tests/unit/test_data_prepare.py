"""``shardtune data prepare``: validation, cleaning, accounting, splits, formats, CLI."""

from __future__ import annotations

import csv
import json
import random

import numpy as np
import pytest

from shardtune.cli import main as cli_main
from shardtune.config import PrepareSection
from shardtune.data.prepare import prepare_dataset
from shardtune.data.records import NearDuplicateIndex, clean_text
from shardtune.data.shards import SPLITS, open_corpus, read_manifest
from shardtune.data.tokenizer import train_tokenizer
from shardtune.errors import DataError

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega red green blue cyan black white").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = random.Random(0)
    texts = [sentence(rng, 30) for _ in range(200)] + ["<|user|> <|assistant|> <|system|> café"]
    return train_tokenizer(texts, 400, tmp_path_factory.mktemp("tok"))


def settings(**kw) -> PrepareSection:
    kw.setdefault("progress", False)
    return PrepareSection(**kw)


def chat(rng: random.Random) -> dict:
    return {"messages": [
        {"role": "system", "content": sentence(rng, 6)},
        {"role": "user", "content": sentence(rng, 10)},
        {"role": "assistant", "content": sentence(rng, 15)},
        {"role": "user", "content": sentence(rng, 8)},
        {"role": "assistant", "content": sentence(rng, 12)},
    ]}


def write_lines(path, lines: list[bytes]) -> None:
    path.write_bytes(b"\n".join(lines) + b"\n")


def dumps(obj) -> bytes:
    return json.dumps(obj).encode()


def dirty_jsonl(path) -> tuple[int, dict[str, int]]:
    """A JSONL with every kind of problem; returns (records that must be kept, drops by reason)."""
    rng = random.Random(1)
    good = [chat(rng) for _ in range(20)]
    good += [{"prompt": sentence(rng, 12), "completion": sentence(rng, 10)} for _ in range(20)]
    good += [{"text": sentence(rng, 40)} for _ in range(20)]
    good += [{"text": sentence(rng, 10), "label": rng.choice(["pos", "neg"])} for _ in range(10)]
    long_text = good[45]["text"]
    bad = [
        (b"", "blank_line"),
        (b'{"messages": [', "malformed_json"),
        (b'{"text": "caf\xe9 au lait"}', "undecodable_bytes"),
        (b'{"text": "lone \\ud800 surrogate"}', "undecodable_bytes"),
        (b"[1, 2, 3]", "not_an_object"),
        (dumps({"foo": "bar"}), "missing_field"),
        (dumps({"prompt": "only a prompt here"}), "missing_field"),
        (dumps({"prompt": 3, "completion": "three"}), "wrong_type"),
        (dumps({"messages": "hello"}), "wrong_type"),
        (dumps({"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}), "wrong_type"),
        (dumps({"text": "labelled", "label": 1.5}), "wrong_type"),
        (dumps({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "ok"}]}), "unknown_role"),
        (dumps({"text": "   \n\t  "}), "empty"),
        (dumps({"text": "\u200b\ufeff"}), "empty"),
        (dumps({"prompt": "a question", "completion": "  "}), "empty"),
        (dumps({"messages": [{"role": "user", "content": "no reply"}]}), "no_assistant_turn"),
        (dumps(good[3]), "exact_duplicate"),
        # Same content once normalised: trailing spaces, CRLF, a non-breaking space.
        (dumps({"prompt": good[25]["prompt"] + "  ", "completion": good[25]["completion"].replace(" ", "\u00a0", 1) + "\r\n"}), "exact_duplicate"),
        (dumps({"text": long_text.rsplit(" ", 1)[0] + " different"}), "near_duplicate"),
        (dumps({"text": sentence(rng, 400)}), "too_long"),
    ]
    lines = [dumps(r) for r in good]
    for line, _ in bad:
        # Wherever a duplicate lands, one of the pair is kept and the other counted.
        lines.insert(rng.randrange(len(lines) + 1), line)
    write_lines(path, lines)
    expected: dict[str, int] = {}
    for _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    return len(good), expected


def test_accounting_invariant_on_dirty_jsonl(tmp_path, tokenizer):
    path = tmp_path / "dirty.jsonl"
    kept, expected_drops = dirty_jsonl(path)
    result = prepare_dataset(settings(max_tokens=300), tmp_path / "out", inputs=[str(path)], tokenizer=tokenizer)
    report = result.report
    assert report["dropped_by_reason"] == expected_drops
    assert report["records_kept"] == kept
    assert report["records_read"] == kept + sum(expected_drops.values())
    assert report["records_read"] == report["records_kept"] + report["records_dropped"]
    # Every kept record is in a shard, and the per-split counts add up.
    manifest = result.manifest
    assert sum(manifest["splits"][s]["documents"] for s in SPLITS) == kept
    assert sum(sum(sh["documents"] for sh in manifest["splits"][s]["shards"]) for s in SPLITS) == kept
    # Examples name file:line, and the line really holds that problem.
    lines = path.read_bytes().split(b"\n")
    where = report["drop_examples"]["malformed_json"][0].split(" ")[0]
    assert where.startswith(f"{path}:")
    assert lines[int(where.rsplit(":", 1)[1]) - 1] == b'{"messages": ['
    assert manifest["labels"] and set(manifest["labels"]) == {"pos", "neg"}
    for name in ("report.json", "report.txt", "token_lengths.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "malformed_json" in (tmp_path / "out" / "report.txt").read_text()


def test_overlong_truncate_keeps_a_cut_record(tmp_path, tokenizer):
    rng = random.Random(2)
    path = tmp_path / "long.jsonl"
    write_lines(path, [dumps({"text": sentence(rng, 400)}), dumps({"text": sentence(rng, 20)})])
    out = prepare_dataset(settings(max_tokens=64, overlong="truncate", splits={"train": 1, "validation": 0, "test": 0}),
                          tmp_path / "out", inputs=[str(path)], tokenizer=tokenizer)
    assert out.report["records_kept"] == 2 and out.report["kept_truncated"] == 1
    corpus = open_corpus(out.out_dir, out.manifest, "train")
    assert corpus.doc_lengths.max() == 64


def test_on_bad_record_error_names_file_and_line(tmp_path, tokenizer):
    rng = random.Random(3)
    path = tmp_path / "bad.jsonl"
    write_lines(path, [dumps({"text": sentence(rng, 10)}), dumps({"text": sentence(rng, 10)}),
                       dumps({"messages": [{"role": "robot", "content": "x"}]})])
    with pytest.raises(DataError, match=rf"{path}:3: unknown_role"):
        prepare_dataset(settings(on_bad_record="error"), tmp_path / "out", inputs=[str(path)], tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()
    # Cleaning drops are never errors: an empty record is fine with on_bad_record=error.
    write_lines(path, [dumps({"text": sentence(rng, 10)}), dumps({"text": " "})])
    result = prepare_dataset(settings(on_bad_record="error"), tmp_path / "out", inputs=[str(path)], tokenizer=tokenizer)
    assert result.report["dropped_by_reason"] == {"empty": 1}


def test_clean_text_forms_and_whitespace():
    assert clean_text("cafe\u0301") == "caf\u00e9"  # NFC composes
    assert clean_text("\ufb01ne \u00b2") == "\ufb01ne \u00b2"  # NFC keeps compatibility forms
    assert clean_text("\ufb01ne \u00b2", "NFKC") == "fine 2"
    assert clean_text("  a\u00a0 b \r\n\n\n\n    c\u200b\x07 \n") == "a  b\n\n    c"


def test_near_duplicate_index_is_deterministic_and_thresholded():
    rng = random.Random(4)
    base = sentence(rng, 60)
    index = NearDuplicateIndex(threshold=0.8)
    assert not index.check_and_add(base)
    assert index.check_and_add(base.rsplit(" ", 1)[0] + " omega")  # one word of 60 changed
    assert not index.check_and_add(sentence(rng, 60))  # unrelated
    half = " ".join(base.split()[:30] + sentence(rng, 30).split())
    assert not index.check_and_add(half)  # Jaccard ~ 1/3
    assert np.array_equal(NearDuplicateIndex().signature(base), NearDuplicateIndex().signature(base))


def _split_by_key(result) -> dict[int, str]:
    out = {}
    for split in SPLITS:
        for shard in result.manifest["splits"][split]["shards"]:
            for key in np.load(result.out_dir / shard["path"] / "doc_keys.npy"):
                out[int(key)] = split
    return out


def test_splits_are_stable_when_data_is_appended(tmp_path, tokenizer):
    rng = random.Random(5)
    first = tmp_path / "a.jsonl"
    second = tmp_path / "b.jsonl"
    write_lines(first, [dumps({"prompt": sentence(rng, 8), "completion": sentence(rng, 8)}) for _ in range(300)])
    write_lines(second, [dumps({"prompt": sentence(rng, 8), "completion": sentence(rng, 8)}) for _ in range(300)])
    ratios = {"train": 0.6, "validation": 0.2, "test": 0.2}
    before = _split_by_key(prepare_dataset(settings(splits=ratios), tmp_path / "one", inputs=[str(first)], tokenizer=tokenizer))
    after = _split_by_key(prepare_dataset(settings(splits=ratios), tmp_path / "two",
                                          inputs=[str(first), str(second)], tokenizer=tokenizer))
    assert len(before) == 300 and len(after) == 600
    assert {k: after[k] for k in before} == before
    counts = {s: sum(1 for v in after.values() if v == s) for s in SPLITS}
    assert all(abs(counts[s] / 600 - ratios[s]) < 0.08 for s in SPLITS), counts


def test_chat_loss_mask_covers_assistant_turns_only(tmp_path, tokenizer):
    rng = random.Random(6)
    record = chat(rng)
    path = tmp_path / "chat.jsonl"
    write_lines(path, [dumps(record)])
    result = prepare_dataset(settings(splits={"train": 1, "validation": 0, "test": 0}), tmp_path / "out",
                             inputs=[str(path)], tokenizer=tokenizer)
    corpus = open_corpus(result.out_dir, result.manifest, "train")
    ids, mask = corpus.tokens[0 : corpus.num_tokens], corpus.loss_mask[0 : corpus.num_tokens]
    runs, current = [], []
    for token, target in zip(ids.tolist(), mask.tolist(), strict=True):
        if target:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    replies = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    assert runs == [f"{r}{tokenizer.eos_token}\n" for r in replies]
    assert corpus.prompt_lengths[0] == int(np.argmax(mask))


def test_csv_and_parquet_inputs(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(7)
    csv_path = tmp_path / "pairs.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "completion"])
        for _ in range(5):
            writer.writerow([sentence(rng, 8), sentence(rng, 8)])
    with csv_path.open("ab") as fh:
        fh.write(b"bad \xff bytes,here\n")
    rows = [{"text": sentence(rng, 12), "label": lab} for lab in ["spam", "ham", "spam"]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "labelled.parquet")
    chats = [chat(rng) for _ in range(3)]
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "chat.parquet")
    result = prepare_dataset(settings(splits={"train": 1, "validation": 0, "test": 0}), tmp_path / "out",
                             inputs=[str(csv_path), str(tmp_path / "*.parquet")], tokenizer=tokenizer)
    report = result.report
    assert report["records_read"] == 12 and report["records_kept"] == 11
    assert report["dropped_by_reason"] == {"undecodable_bytes": 1}
    assert report["drop_examples"]["undecodable_bytes"][0].startswith(f"{csv_path}:7 ")
    assert result.manifest["labels"] == ["spam", "ham"]  # order of first appearance
    labels = np.load(result.out_dir / result.manifest["splits"]["train"]["shards"][0]["path"] / "doc_labels.npy")
    assert sorted(labels.tolist()) == [-1] * 8 + [0, 0, 1]


def test_cli_prepare_then_cached(tmp_path, tokenizer, capsys):
    rng = random.Random(8)
    path = tmp_path / "in.jsonl"
    write_lines(path, [dumps({"text": sentence(rng, 20)}) for _ in range(30)])
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(str(tok_dir))
    argv = ["data", "prepare", str(path), "--out", str(tmp_path / "out"), "--tokenizer", str(tok_dir),
            "--no-progress", "data.prepare.splits.train=1", "data.prepare.splits.test=0", "data.prepare.splits.validation=0"]
    assert cli_main(argv) == 0
    first = capsys.readouterr().out
    assert "records read" in first and "written" in first
    assert read_manifest(tmp_path / "out")["splits"]["train"]["documents"] == 30
    assert cli_main(argv) == 0
    assert "unchanged" in capsys.readouterr().out
    assert cli_main(["data", "prepare", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o2"),
                     "--tokenizer", str(tok_dir)]) == 2


def test_worker_processes_write_identical_shards_and_report(tmp_path, tokenizer, monkeypatch):
    # Parsing and tokenizing move to worker processes; de-duplication, splitting and writing
    # stay in input order in the parent, so every byte of the output must be the same.
    import multiprocessing

    import shardtune.data.prepare as prepare_module

    pools = []
    real = prepare_module.parse_and_encode_in_workers

    def counting(*args, **kwargs):
        for item in real(*args, **kwargs):
            pools.append(len(multiprocessing.active_children()))
            yield item

    monkeypatch.setattr(prepare_module, "parse_and_encode_in_workers", counting)
    path = tmp_path / "dirty.jsonl"
    dirty_jsonl(path)
    one = prepare_dataset(settings(max_tokens=300), tmp_path / "one", inputs=[str(path)], tokenizer=tokenizer)
    two = prepare_dataset(settings(max_tokens=300, workers=2), tmp_path / "two", inputs=[str(path)],
                          tokenizer=tokenizer)
    assert pools and min(pools) == 2  # two worker processes really did the parsing
    assert two.report == one.report
    files = sorted(p.relative_to(one.out_dir) for p in one.out_dir.rglob("*.npy"))
    assert files and files == sorted(p.relative_to(two.out_dir) for p in two.out_dir.rglob("*.npy"))
    for name in files:
        assert (one.out_dir / name).read_bytes() == (two.out_dir / name).read_bytes(), name
    assert one.manifest["fingerprint"] == two.manifest["fingerprint"]  # the worker count is not a setting of the data
    # A bad record is still an error naming file:line when a worker parsed it.
    write_lines(path, [dumps({"text": "fine"}), dumps({"messages": [{"role": "robot", "content": "x"}]})])
    with pytest.raises(DataError, match=rf"{path}:2: unknown_role"):
        prepare_dataset(settings(on_bad_record="error", workers=2), tmp_path / "three", inputs=[str(path)],
                        tokenizer=tokenizer)
