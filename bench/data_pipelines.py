"""The two data pipelines bench/data.py times, built on the same JSONL and tokenizer.

shardtune: ``prepare_dataset`` (clean, dedup, split, tokenize, write checksummed shards) once,
then ``GlobalBatchLoader`` over ``PreparedSource`` (memory-mapped shards, elastic packing).

Hugging Face ``datasets``: ``load_dataset("json", streaming=True)`` -> batched ``map``
(tokenize) -> batched ``map`` (pack) -> ``torch.utils.data.DataLoader``; the packing map is
the ``group_texts`` recipe of the transformers examples (concatenate a batch of documents, cut
into ``seq_len`` windows, drop the batch's tail), which keeps ``IterableDataset.state_dict``
usable. The tokenize map calls shardtune's own ``DocumentEncoder``, so both pipelines spend the
same on tokenization (same template, same assistant-only loss mask) and the comparison is of
the pipelines around it. Both emit the same fields: input_ids, labels, position_ids.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np

from shardtune.data.synthetic import generate_records

IGNORE_INDEX = -100
HF_TOKENIZE_BATCH = 512  # shardtune's prepare encodes in batches of 512 too
HF_PACK_BATCH = 1000  # datasets' default map batch size, as in the transformers examples
LARGE_TOKENS = "large-tokens.u16"

# --------------------------------------------------------------------------------------
# Data and tokenizer


def chat_records(num_records: int, seed: int) -> list[dict]:
    """Multi-turn chats (2-8 turns) whose turns are the project's synthetic instruction pairs."""
    rng = random.Random(seed)
    turns = [rng.randint(2, 8) for _ in range(num_records)]
    pairs = iter(generate_records(sum(turns), seed))
    records = []
    for k in turns:
        messages = []
        for _ in range(k):
            pair = next(pairs)
            messages.append({"role": "user", "content": pair["prompt"]})
            messages.append({"role": "assistant", "content": pair["completion"]})
        records.append({"messages": messages})
    return records


def write_jsonl(records: list[dict], path: Path, repeat: int = 1) -> int:
    lines = "".join(json.dumps(r) + "\n" for r in records)
    with path.open("w") as fh:
        for _ in range(repeat):
            fh.write(lines)
    return path.stat().st_size


def build_tokenizer(records: list[dict], vocab_size: int, save_dir: Path):
    """A byte-level BPE trained on the data, loaded back the way a run loads it."""
    from shardtune.config import TokenizerSection
    from shardtune.data.tokenizer import load_tokenizer, train_tokenizer

    texts = ("\n".join(m["content"] for m in r["messages"]) for r in records)
    train_tokenizer(texts, vocab_size, save_dir)
    return load_tokenizer(TokenizerSection(name_or_path=str(save_dir)), False)


def chat_encoder(tokenizer):
    from shardtune.data.encoder import DocumentEncoder, resolve_chat_template

    template, _ = resolve_chat_template(tokenizer, None)
    return DocumentEncoder(tokenizer, template)


# --------------------------------------------------------------------------------------
# shardtune


def prepare(jsonl: Path, out_dir: Path, tokenizer) -> tuple[float, dict]:
    """``shardtune data prepare`` end to end through its Python API: (seconds, manifest)."""
    import shutil

    from shardtune.config import PrepareSection
    from shardtune.data.prepare import prepare_dataset

    shutil.rmtree(out_dir, ignore_errors=True)  # else the fingerprint cache makes it a no-op
    settings = PrepareSection(format="chat", progress=False)
    t0 = time.perf_counter()
    result = prepare_dataset(settings, out_dir, inputs=[str(jsonl)], tokenizer=tokenizer)
    return time.perf_counter() - t0, result.manifest


def prepare_cached(jsonl: Path, out_dir: Path, tokenizer) -> float:
    """The same command again: fingerprint match + checksum verification, nothing rewritten."""
    from shardtune.config import PrepareSection
    from shardtune.data.prepare import prepare_dataset

    t0 = time.perf_counter()
    result = prepare_dataset(PrepareSection(format="chat", progress=False), out_dir,
                             inputs=[str(jsonl)], tokenizer=tokenizer)
    assert result.cached, "the second prepare run should have been a cached no-op"
    return time.perf_counter() - t0


def tokenize_only(records: list[dict], tokenizer) -> tuple[float, int]:
    """prepare's tokenize step alone: ``DocumentEncoder.encode`` over parsed records, batch 512."""
    from shardtune.data.prepare import ENCODE_BATCH
    from shardtune.data.records import RecordRules, parse_record

    rules = RecordRules(format="chat")
    parsed = [parse_record(r, f"bench:{i}", rules) for i, r in enumerate(records)]
    encoder = chat_encoder(tokenizer)
    tokens = 0
    t0 = time.perf_counter()
    for i in range(0, len(parsed), ENCODE_BATCH):
        tokens += sum(len(ids) for ids, _ in encoder.encode(parsed[i : i + ENCODE_BATCH]))
    return time.perf_counter() - t0, tokens


def open_source(prepared_dir: Path, seq_len: int, seed: int):
    from shardtune.data.shards import PreparedSource

    t0 = time.perf_counter()
    source = PreparedSource(prepared_dir, "train", seq_len, seed)  # verifies the shard checksums
    return source, time.perf_counter() - t0


def with_packing(source, packing: str):
    if packing == "concat":  # PreparedSource's own packer
        return source
    from shardtune.data.corpus import with_packing as wrap

    return wrap(source, packing)


def make_loader(source, batch: int, workers: int):
    """A one-rank ``GlobalBatchLoader``, as a run builds it (``data.num_workers`` prefetch threads)."""
    from shardtune.data.loader import GlobalBatchLoader

    kwargs = {"num_workers": workers} if workers else {}
    return GlobalBatchLoader(source, global_batch_size=batch, micro_batch_size=batch, rank=0,
                             world_size=1, max_epochs=1, **kwargs)


def shardtune_epoch(source, batch: int, workers: int) -> tuple[int, int]:
    """One epoch through the loader, plan included: (sequences, tokens incl. masked ones)."""
    loader = make_loader(source, batch, workers)
    seqs = tokens = 0
    try:
        while (step := loader.next_step()) is not None:
            for micro in step:
                seqs += micro["input_ids"].shape[0]
                tokens += micro["input_ids"].numel()
    finally:
        close = getattr(loader, "close", None)
        if close is not None:
            close()
    return seqs, tokens


def shardtune_resume(make_source, batch: int, position: int) -> dict:
    """A fresh loader on a fresh source resumed after ``position`` sequences: load_state_dict +
    its first step, which packs the epoch (and, for ``whole_documents``, the truncation plan).

    The position becomes (epoch, sequences consumed in it) as the loader counts them (an
    epoch's tail that does not fill a global batch is dropped); positions beyond one epoch are
    later epochs.
    """
    from shardtune.data.loader import GlobalBatchLoader

    def loader():
        return GlobalBatchLoader(make_source(), global_batch_size=batch, micro_batch_size=batch, rank=0,
                                 world_size=1)

    usable = loader().steps_per_epoch() * batch
    state = {"epoch": position // usable, "consumed": position % usable}
    fresh = loader()
    t0, c0 = time.perf_counter(), time.process_time()
    fresh.load_state_dict(state)
    first = fresh.next_step()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": seconds, "cpu_s": cpu, "state": state, "first": first, "epoch_sequences": usable}


def shardtune_replay_check(source, batch: int, position: int, resumed_first) -> bool:
    """The resumed first step equals the step an uninterrupted loader takes at ``position``."""
    from shardtune.data.loader import GlobalBatchLoader

    loader = GlobalBatchLoader(source, global_batch_size=batch, micro_batch_size=batch, rank=0, world_size=1)
    for _ in range(position // batch):
        loader.next_step()
    expected = loader.next_step()
    return all(bool((a[k] == b[k]).all()) for a, b in zip(expected, resumed_first, strict=True) for k in a)


def large_corpus(lengths: np.ndarray, prompt_lengths: np.ndarray, min_sequences: int, seq_len: int,
                 seed: int, work: Path):
    """A corpus holding ``min_sequences`` packed sequences in ONE epoch, tokens memory-mapped.

    Document lengths are resampled from the real prepared train split. The token file is sparse
    (created by truncate): reads cost what a memory map costs, but nothing ~500 MB is written.
    Wrap it in ``InMemorySource(corpus, seq_len, seed, packing)``, the source the in-memory
    data path uses over the same ``TokenizedCorpus`` type ``PreparedSource`` opens.
    """
    from shardtune.data.packing import TokenizedCorpus

    rng = np.random.default_rng(seed)
    need = int(min_sequences * seq_len * 1.01) + seq_len
    num_docs = int(need / lengths.mean() * 1.02) + 1
    pick = rng.integers(0, len(lengths), size=num_docs)
    doc_lengths, doc_prompts = lengths[pick].astype(np.int64), prompt_lengths[pick].astype(np.int64)
    offsets = np.zeros(num_docs, dtype=np.int64)
    np.cumsum(doc_lengths[:-1], out=offsets[1:])
    total = int(doc_lengths.sum())
    path = work / LARGE_TOKENS
    with path.open("wb") as fh:
        fh.truncate(total * 2)
    tokens = np.memmap(path, dtype=np.uint16, mode="r", shape=(total,))
    corpus = TokenizedCorpus(tokens=tokens, doc_offsets=offsets, doc_lengths=doc_lengths,
                             prompt_lengths=doc_prompts)
    return corpus


# --------------------------------------------------------------------------------------
# Hugging Face datasets streaming


def _tokenize_fn(encoder):
    from shardtune.data.records import Record

    def tokenize(batch):
        records = [Record(kind="chat", location="", messages=m) for m in batch["messages"]]
        encoded = encoder.encode(records)
        return {"input_ids": [ids for ids, _ in encoded], "loss_mask": [mask for _, mask in encoded]}

    return tokenize


def _pack_fn(seq_len: int):
    def pack(batch):
        ids = [np.asarray(x, dtype=np.int64) for x in batch["input_ids"]]
        labels, positions = [], []
        for doc, mask in zip(ids, batch["loss_mask"], strict=True):
            lab = np.where(np.asarray(mask, dtype=bool), doc, IGNORE_INDEX)
            lab[0] = IGNORE_INDEX  # as shardtune: nothing inside a document predicts its first token
            labels.append(lab)
            positions.append(np.arange(len(doc), dtype=np.int64))
        flat = [np.concatenate(x) for x in (ids, labels, positions)]
        n = len(flat[0]) // seq_len  # the batch's tail is dropped, as in the transformers recipe
        cut = [[a[i * seq_len : (i + 1) * seq_len] for i in range(n)] for a in flat]
        return {"input_ids": cut[0], "labels": cut[1], "position_ids": cut[2]}

    return pack


def hf_pipeline(jsonl: Path, tokenizer, seq_len: int):
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(jsonl), split="train", streaming=True)
    ds = ds.map(_tokenize_fn(chat_encoder(tokenizer)), batched=True, batch_size=HF_TOKENIZE_BATCH,
                remove_columns=["messages"])
    return ds.map(_pack_fn(seq_len), batched=True, batch_size=HF_PACK_BATCH,
                  remove_columns=["input_ids", "loss_mask"])


def hf_loader(ds, batch: int):
    from torch.utils.data import DataLoader

    return DataLoader(ds, batch_size=batch, num_workers=0)


def hf_epoch(jsonl: Path, tokenizer, seq_len: int, batch: int) -> tuple[int, int]:
    seqs = tokens = 0
    for micro in hf_loader(hf_pipeline(jsonl, tokenizer, seq_len), batch):
        seqs += micro["input_ids"].shape[0]
        tokens += micro["input_ids"].numel()
    return seqs, tokens


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def hf_resume(jsonl: Path, tokenizer, seq_len: int, batch: int, position: int) -> dict:
    """Both resume routes at ``position`` sequences, on one pass.

    Replay (what ``Trainer`` does: accelerate's ``skip_first_batches``): time until the first
    batch after skipping position/batch batches. Then the dataset's state_dict (position +
    one batch) is loaded into a fresh pipeline and its first batch timed and compared with
    the next batch of the uninterrupted pass.
    """
    from accelerate.data_loader import skip_first_batches

    ds = hf_pipeline(jsonl, tokenizer, seq_len)
    t0, c0 = time.perf_counter(), time.process_time()
    it = iter(skip_first_batches(hf_loader(ds, batch), position // batch))
    next(it)
    replay, replay_cpu = time.perf_counter() - t0, time.process_time() - c0
    state = ds.state_dict()  # num_workers=0: the DataLoader reads this very object
    expected = next(it)
    del it

    fresh = hf_pipeline(jsonl, tokenizer, seq_len)
    t0, c0 = time.perf_counter(), time.process_time()
    fresh.load_state_dict(state)
    got = next(iter(hf_loader(fresh, batch)))
    resumed, resumed_cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"replay_s": replay, "replay_cpu_s": replay_cpu, "state_dict_s": resumed,
            "state_dict_cpu_s": resumed_cpu, "state_dict_exact": _same(got, expected),
            "state_bytes": len(json.dumps(state, default=str))}
