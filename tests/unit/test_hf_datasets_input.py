"""Hugging Face datasets as inputs of ``data prepare`` and ``data.mixture`` (real ``datasets``).

The same records must give the same shards whichever reader brought them: a JSONL file, a
``save_to_disk`` Dataset or DatasetDict, ``hf:json`` with ``data_files`` (cached or streamed).
"""

from __future__ import annotations

import json
import random

import datasets
import pytest
from conftest import TINY

from shardtune.config import PrepareSection, load_config
from shardtune.data.corpus import load_records
from shardtune.data.datasets import build_datasets
from shardtune.data.prepare import prepare_dataset
from shardtune.data.tokenizer import train_tokenizer
from shardtune.errors import DataError

WORDS = "north south east west river hill stone field lamp door bread salt wind rain snow".split()


def say(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    rng = random.Random(0)
    return train_tokenizer([say(rng, 30) for _ in range(100)], 300, tmp_path_factory.mktemp("tok"))


def records(n: int = 60, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out.append({"messages": [{"role": "user", "content": say(rng, 8)},
                                     {"role": "assistant", "content": say(rng, 12)}]})
        elif kind == 1:
            out.append({"prompt": say(rng, 9), "completion": say(rng, 7)})
        else:
            out.append({"text": say(rng, 25)})
    out[10] = dict(out[4])  # an exact duplicate
    out[20] = {"prompt": say(rng, 5), "completion": "   "}  # empty after cleaning: dropped
    return out


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def settings(**kw) -> PrepareSection:
    return PrepareSection(progress=False, near_dedup=False, **kw)


def shard_bytes(result) -> dict[str, bytes]:
    root = result.out_dir
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.npy"))}
    assert files
    return files


def assert_same_data(a, b) -> None:
    """Same shards byte for byte, same counts and splits; locations may differ."""
    assert shard_bytes(a) == shard_bytes(b)
    assert a.manifest["splits"] == b.manifest["splits"]
    strip = ("drop_examples",)
    assert {k: v for k, v in a.report.items() if k not in strip} == {k: v for k, v in b.report.items() if k not in strip}


def test_save_to_disk_dataset_and_dataset_dict_match_jsonl(tmp_path, tokenizer):
    rows = records()
    jsonl = tmp_path / "in.jsonl"
    write_jsonl(jsonl, rows)
    reference = prepare_dataset(settings(), tmp_path / "from_jsonl", inputs=[str(jsonl)], tokenizer=tokenizer)
    assert reference.report["dropped_by_reason"] == {"empty": 1, "exact_duplicate": 1}

    ds = datasets.load_dataset("json", data_files=str(jsonl), split="train")
    ds.save_to_disk(str(tmp_path / "ds"))
    one = prepare_dataset(settings(), tmp_path / "from_ds", inputs=[str(tmp_path / "ds")], tokenizer=tokenizer)
    assert_same_data(one, reference)
    assert reference.report["drop_examples"]["empty"][0].startswith(f"{jsonl}:21 ")
    assert one.report["drop_examples"]["empty"][0].startswith(f"{tmp_path / 'ds'}[20] ")  # the row index
    assert one.manifest["inputs"][0]["kind"] == "datasets.save_to_disk"

    # A DatasetDict: its splits are read in order (train, then validation) and re-split by content.
    dd = datasets.DatasetDict(train=ds.select(range(40)), validation=ds.select(range(40, len(ds))))
    dd.save_to_disk(str(tmp_path / "dd"))
    two = prepare_dataset(settings(), tmp_path / "from_dd", inputs=[str(tmp_path / "dd")], tokenizer=tokenizer)
    assert_same_data(two, reference)
    assert two.report["drop_examples"]["empty"][0].startswith(f"{tmp_path / 'dd'}[train][20] ")
    only_validation = prepare_dataset(settings(hf={"split": "validation"}), tmp_path / "from_dd_val",
                                      inputs=[str(tmp_path / "dd")], tokenizer=tokenizer)
    assert only_validation.report["records_read"] == len(rows) - 40
    with pytest.raises(DataError, match="has no split 'test'"):
        prepare_dataset(settings(hf={"split": "test"}), tmp_path / "x", inputs=[str(tmp_path / "dd")],
                        tokenizer=tokenizer)

    # Unchanged inputs and settings: nothing is rewritten; a changed dataset is re-prepared.
    again = prepare_dataset(settings(), tmp_path / "from_ds", inputs=[str(tmp_path / "ds")], tokenizer=tokenizer)
    assert again.cached
    ds.select(range(30)).save_to_disk(str(tmp_path / "ds"))
    assert not prepare_dataset(settings(), tmp_path / "from_ds", inputs=[str(tmp_path / "ds")],
                               tokenizer=tokenizer).cached


def test_hf_json_with_data_files_cached_and_streamed_match_jsonl(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows = records(seed=2)
    jsonl = tmp_path / "in.jsonl"
    write_jsonl(jsonl, rows)
    reference = prepare_dataset(settings(), tmp_path / "ref", inputs=[str(jsonl)], tokenizer=tokenizer)
    for streaming in (False, True):
        hf = {"data_files": [str(jsonl)], "split": "train", "streaming": streaming}
        result = prepare_dataset(settings(hf=hf), tmp_path / f"hf{streaming}", inputs=["hf:json"], tokenizer=tokenizer)
        assert_same_data(result, reference)
        assert result.report["drop_examples"]["empty"][0].startswith("hf:json[train][20] ")
        assert result.manifest["inputs"][0]["data_files_sha256"] == {str(jsonl): reference.manifest["inputs"][0]["sha256"]}
    # Editing the data file re-prepares (the fingerprint holds the file's sha256).
    write_jsonl(jsonl, rows[:30])
    hf = {"data_files": [str(jsonl)], "split": "train", "streaming": True}
    assert prepare_dataset(settings(hf=hf), tmp_path / "hfTrue", inputs=["hf:json"],
                           tokenizer=tokenizer).report["records_read"] == 30


def test_column_mapping(tmp_path, tokenizer):
    rows = records(seed=3)
    jsonl = tmp_path / "in.jsonl"
    write_jsonl(jsonl, rows)
    reference = prepare_dataset(settings(), tmp_path / "ref", inputs=[str(jsonl)], tokenizer=tokenizer)
    # The same records under another dataset's column names, as a hub dataset would have them.
    renamed = [{"conversations": r["messages"]} if "messages" in r else
               {"question": r["prompt"], "answer": r["completion"]} if "prompt" in r else {"body": r["text"]}
               for r in rows]
    write_jsonl(tmp_path / "renamed.jsonl", renamed)
    datasets.load_dataset("json", data_files=str(tmp_path / "renamed.jsonl"), split="train").save_to_disk(
        str(tmp_path / "renamed"))
    columns = {"messages": "conversations", "prompt": "question", "completion": "answer", "text": "body"}
    mapped = prepare_dataset(settings(columns=columns), tmp_path / "mapped", inputs=[str(tmp_path / "renamed")],
                             tokenizer=tokenizer)
    assert_same_data(mapped, reference)
    # Without the mapping nothing is readable: every row lacks the fields.
    with pytest.raises(DataError, match="missing_field"):
        prepare_dataset(settings(on_bad_record="error"), tmp_path / "unmapped", inputs=[str(tmp_path / "renamed")],
                        tokenizer=tokenizer)
    with pytest.raises(DataError, match="maps text to 'content', which is not a column"):
        prepare_dataset(settings(columns={"text": "content"}), tmp_path / "typo", inputs=[str(tmp_path / "renamed")],
                        tokenizer=tokenizer)


def test_bad_row_is_reported_with_its_row_index(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": say(random.Random(i), 6)},
                          {"role": "assistant", "content": say(random.Random(i + 100), 6)}]} for i in range(8)]
    rows[5] = {"messages": [{"role": "wizard", "content": "abracadabra"}, {"role": "assistant", "content": "ok"}]}
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"))
    kept = prepare_dataset(settings(), tmp_path / "out", inputs=[str(tmp_path / "ds")], tokenizer=tokenizer)
    assert kept.report["dropped_by_reason"] == {"unknown_role": 1}
    assert kept.report["drop_examples"]["unknown_role"] == [f"{tmp_path / 'ds'}[5] (messages[0].role='wizard')"]
    with pytest.raises(DataError, match=rf"{tmp_path / 'ds'}\[5\]: unknown_role"):
        prepare_dataset(settings(on_bad_record="error"), tmp_path / "strict", inputs=[str(tmp_path / "ds")],
                        tokenizer=tokenizer)


def test_class_label_ids_become_label_names(tmp_path, tokenizer):
    features = datasets.Features(text=datasets.Value("string"), label=datasets.ClassLabel(names=["neg", "pos"]))
    ds = datasets.Dataset.from_dict({"text": [say(random.Random(i), 10) for i in range(6)], "label": [1, 0, 1, 1, 0, 0]},
                                    features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    result = prepare_dataset(settings(format="labelled"), tmp_path / "out", inputs=[str(tmp_path / "ds")],
                             tokenizer=tokenizer)
    assert result.manifest["labels"] == ["pos", "neg"]  # names, in order of first appearance


def test_hub_name_without_network_is_a_clear_error(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(DataError, match=r"hf:someone/no-such-dataset: not in the local .* Hub cannot be reached"):
        prepare_dataset(settings(), tmp_path / "out", inputs=["hf:someone/no-such-dataset"], tokenizer=tokenizer)


def test_mixture_entry_from_a_dataset(tmp_path, tokenizer):
    rng = random.Random(4)
    pairs = [{"question": say(rng, 6), "answer": say(rng, 5)} for _ in range(60)]
    datasets.Dataset.from_list(pairs).save_to_disk(str(tmp_path / "qa"))
    write_jsonl(tmp_path / "text.jsonl", [{"text": say(rng, 30)} for _ in range(40)])
    cfg = load_config(TINY, [
        f"data.mixture=[{{path: {tmp_path / 'qa'}, weight: 1, columns: {{prompt: question, completion: answer}}}}, "
        f"{{path: {tmp_path / 'text.jsonl'}, weight: 1}}]", "data.seq_len=32",
    ])
    data = build_datasets(cfg, tokenizer)
    by_name = {row["name"]: row for row in data.summary["mixture"]}
    assert set(by_name) == {"qa", "text.jsonl"}
    assert by_name["qa"]["documents"] + data.summary["splits"]["validation"]["documents"] >= 1
    assert len(data.train.epoch(0)) > 0
    # Without tokenizer.name_or_path the run's tokenizer is trained on every mixed source's text.
    texts = load_records(cfg.data, seed=0)
    assert len(texts) == 100 and {"prompt": pairs[0]["question"], "completion": pairs[0]["answer"]} in texts
    cfg = load_config(TINY, [f"data.mixture=[{{path: {tmp_path / 'qa'}, weight: 1}}]"])
    with pytest.raises(DataError, match=r"qa\[0\]: needs string fields 'prompt' and 'completion', or 'text'"):
        build_datasets(cfg, tokenizer)
