"""Prepared shards on disk: writing them, checking them, and memory-mapping them back.

Layout of a prepared directory::

    manifest.json                      counts, token totals, fingerprints, sha256 and size per file
    tokenizer/                         the tokenizer the shards were made with
    train/shard-00000/tokens.npy       flat token ids (uint16, or uint32 for vocab > 65536)
                     /loss_mask.npy    uint8, 1 where a token is a training target
                     /doc_offsets.npy  int64, shard-local start of each document
                     /doc_lengths.npy  int64
                     /prompt_lengths.npy int64, leading tokens without loss (compatibility)
                     /doc_labels.npy   int64 class id, -1 when the record has no label
                     /doc_keys.npy     uint64, content hash of the source record (provenance)
    validation/..., test/...

A document never spans two shards, so any slice of one document lies in one file. Files
are ``.npy`` so they carry their dtype and open with ``np.load(mmap_mode="r")``.

A training run checks every shard file it maps against the manifest before reading it: the
size always (a ``stat``), the sha256 unless ``data.verify_checksums`` is false (a sequential
read of the split on every rank). A bad file is then one error naming it, on every rank
alike, instead of a numpy error or a silently different token stream.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shardtune.data.packing import PackedEpoch, TokenizedCorpus
from shardtune.errors import ShardError
from shardtune.integrity import read_json_object, sha256_file
from shardtune.run_dirs import make_run_dir

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
SPLITS = ("train", "validation", "test")
DOC_ARRAYS = ("doc_offsets", "doc_lengths", "prompt_lengths", "doc_labels", "doc_keys")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


class ShardWriter:
    """Appends documents to one split, starting a new shard every ``shard_tokens`` tokens."""

    def __init__(self, split_dir: Path, dtype: np.dtype, shard_tokens: int):
        self.split_dir = split_dir
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        self._tokens: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._prompt_lengths: list[int] = []
        self._labels: list[int] = []
        self._keys: list[int] = []
        self._num_tokens = 0

    def add(self, ids: np.ndarray, mask: np.ndarray, prompt_length: int, label: int, key: int) -> None:
        self._tokens.append(np.asarray(ids, dtype=self.dtype))
        self._masks.append(np.asarray(mask, dtype=np.uint8))
        self._prompt_lengths.append(prompt_length)
        self._labels.append(label)
        self._keys.append(key)
        self._num_tokens += len(ids)
        if self._num_tokens >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if not self._tokens:
            return
        name = f"shard-{len(self.shards):05d}"
        shard_dir = self.split_dir / name
        make_run_dir(shard_dir)
        lengths = np.fromiter((len(t) for t in self._tokens), dtype=np.int64, count=len(self._tokens))
        offsets = np.concatenate([[0], np.cumsum(lengths[:-1])]).astype(np.int64)
        arrays = {
            "tokens": np.concatenate(self._tokens),
            "loss_mask": np.concatenate(self._masks),
            "doc_offsets": offsets,
            "doc_lengths": lengths,
            "prompt_lengths": np.asarray(self._prompt_lengths, dtype=np.int64),
            "doc_labels": np.asarray(self._labels, dtype=np.int64),
            "doc_keys": np.asarray(self._keys, dtype=np.uint64),
        }
        files, sizes = {}, {}
        for key, array in arrays.items():
            path = shard_dir / f"{key}.npy"
            np.save(path, array)
            files[path.name] = sha256_file(path)
            sizes[path.name] = path.stat().st_size
        self.shards.append({
            "path": f"{self.split_dir.name}/{name}",
            "documents": len(lengths),
            "tokens": int(lengths.sum()),
            "sha256": files,
            "bytes": sizes,
        })
        self._reset()


def read_manifest(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / MANIFEST
    if not path.is_file():
        raise ShardError(f"{path} not found: run `shardtune data prepare` to create {prepared_dir}")
    manifest = read_json_object(path, ShardError, "data manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(
            f"{path}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}; "
            "re-run `shardtune data prepare`"
        )
    return manifest


def verify_shards(prepared_dir: str | Path, manifest: dict, splits=SPLITS, *, checksums: bool = True) -> None:
    """Check every shard file against the manifest (size; sha256 too if ``checksums``).

    Raises naming the first bad file. Manifests written before sizes were recorded get
    the existence check and the checksum only.
    """
    root = Path(prepared_dir)
    for split in splits:
        for shard in manifest["splits"].get(split, {}).get("shards", []):
            sizes = shard.get("bytes", {})
            for name, expected in shard["sha256"].items():
                path = root / shard["path"] / name
                if not path.is_file():
                    raise ShardError(f"shard file missing: {path}; re-run `shardtune data prepare`")
                size = path.stat().st_size
                if name in sizes and size != sizes[name]:
                    raise ShardError(
                        f"{'truncated' if size < sizes[name] else 'resized'} shard file {path}: "
                        f"{size} bytes, the manifest says {sizes[name]}; re-run `shardtune data prepare`"
                    )
                if not checksums:
                    continue
                actual = sha256_file(path)
                if actual != expected:
                    raise ShardError(
                        f"corrupted shard file {path}: sha256 {actual[:16]}... does not match the "
                        f"manifest's {expected[:16]}...; re-run `shardtune data prepare`"
                    )


class ShardedArray:
    """Several memory-mapped 1-D arrays seen as one; a slice must not cross a shard boundary."""

    def __init__(self, parts: list[np.ndarray]):
        self.parts = parts
        sizes = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.dtype = parts[0].dtype if parts else np.dtype(np.uint16)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("ShardedArray supports contiguous slices only")
        start, stop, _ = index.indices(len(self))
        part = int(np.searchsorted(self.starts, start, side="right")) - 1
        base = int(self.starts[part])
        if stop > int(self.starts[part + 1]):
            raise IndexError(f"slice [{start}:{stop}] crosses a shard boundary")
        return self.parts[part][start - base : stop - base]


def open_corpus(prepared_dir: str | Path, manifest: dict, split: str) -> TokenizedCorpus:
    """A ``TokenizedCorpus`` whose tokens and loss mask stay on disk (memory-mapped).

    Only the per-document arrays (a few int64 per document) are loaded into memory.
    """
    root = Path(prepared_dir)
    shards = manifest["splits"].get(split, {}).get("shards", [])
    if not shards:
        raise ShardError(f"{root}: the {split!r} split has no documents")
    tokens, masks, docs = [], [], {k: [] for k in DOC_ARRAYS}
    token_base = 0
    for shard in shards:
        shard_dir = root / shard["path"]
        tokens.append(_load(shard_dir / "tokens.npy", mmap=True))
        masks.append(_load(shard_dir / "loss_mask.npy", mmap=True))
        for key in DOC_ARRAYS:
            docs[key].append(_load(shard_dir / f"{key}.npy"))
        _check_shard(shard_dir, shard, tokens[-1], masks[-1], {k: v[-1] for k, v in docs.items()})
        docs["doc_offsets"][-1] = docs["doc_offsets"][-1] + token_base
        token_base += len(tokens[-1])
    merged = {k: np.concatenate(v) for k, v in docs.items()}
    return TokenizedCorpus(
        tokens=ShardedArray(tokens),
        doc_offsets=merged["doc_offsets"],
        doc_lengths=merged["doc_lengths"],
        prompt_lengths=merged["prompt_lengths"],
        loss_mask=ShardedArray(masks),
    )


def _load(path: Path, mmap: bool = False) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None)  # allow_pickle stays False
    except (OSError, ValueError, EOFError) as exc:
        raise ShardError(f"unreadable shard file {path}: {exc}; re-run `shardtune data prepare`") from exc


def _check_shard(shard_dir: Path, shard: dict, tokens, mask, docs: dict[str, np.ndarray]) -> None:
    """Cheap consistency of one shard's arrays (no token is read): lengths agree with the manifest."""
    expected_docs, expected_tokens = shard["documents"], shard["tokens"]
    for key, array in docs.items():
        if array.ndim != 1 or len(array) != expected_docs:
            raise ShardError(f"shard file {shard_dir / (key + '.npy')} holds {array.shape} values, "
                             f"the manifest says {expected_docs} documents; re-run `shardtune data prepare`")
    for name, array in (("tokens.npy", tokens), ("loss_mask.npy", mask)):
        if array.ndim != 1 or len(array) != expected_tokens:
            raise ShardError(f"shard file {shard_dir / name} holds {array.shape} values, "
                             f"the manifest says {expected_tokens} tokens; re-run `shardtune data prepare`")


class PreparedSource:
    """A ``SequenceSource`` over prepared shards: memory-mapped, packed by ``PackedEpoch``.

    The epoch's order is a pure function of (seed, epoch, document lengths), exactly as for
    the in-memory source, so the global cursor resumes at any world size.
    """

    def __init__(self, prepared_dir: str | Path, split: str, seq_len: int, seed: int, *,
                 verify: bool = True, tokenizer_fingerprint: str | None = None):
        """``verify``: sha256 every file of the split (sizes are always checked)."""
        self.prepared_dir = Path(prepared_dir)
        self.manifest = read_manifest(self.prepared_dir)
        expected = self.manifest["tokenizer"]["fingerprint"]
        if tokenizer_fingerprint is not None and tokenizer_fingerprint != expected:
            raise ShardError(
                f"{self.prepared_dir} was prepared with another tokenizer (fingerprint {expected[:12]}, "
                f"this run's is {tokenizer_fingerprint[:12]}); point tokenizer.name_or_path at "
                f"{self.prepared_dir / 'tokenizer'} or re-run `shardtune data prepare`"
            )
        verify_shards(self.prepared_dir, self.manifest, splits=(split,), checksums=verify)
        self.split = split
        self.corpus = open_corpus(self.prepared_dir, self.manifest, split)
        self.seq_len = seq_len
        self.seed = seed

    def epoch(self, epoch: int) -> PackedEpoch:
        return PackedEpoch(self.corpus, self.seq_len, self.seed, epoch)
