"""The one checkpointer: every strategy, every stateful piece, atomic commit, async writes.

Layout under ``checkpoint.dir`` (default ``<run>/checkpoints``)::

    step-00000100/           committed checkpoint (the rename from .tmp-* is the commit)
      .metadata, __R_0.distcp  DCP shards: model weights + optimizer moments, logical layout
      trainer_state.json     step, tokens, data cursor, scheduler, config, versions
      rng/rank-0000R.json    per-rank RNG streams
      model_config.json, tokenizer/   what export needs to rebuild a Hugging Face model
      manifest.json          per-file size + sha256, logical tensor shapes (written last)
    latest                   name of the newest committed checkpoint (moved last)

A crash at any moment leaves at worst a ``.tmp-*`` directory, never selected, and the
previous checkpoint still committed and named by ``latest``.
"""

from __future__ import annotations

import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from shardtune import faults
from shardtune.checkpoint.manifest import (
    CHECKPOINT_ERRORS,
    FORMAT_VERSION,
    MANIFEST,
    TRAINER_STATE,
    CheckpointInfo,
    describe_files,
    list_checkpoints,
    newest_valid_checkpoint,
    resolve_checkpoint,
    retention_victims,
    step_dir_name,
    write_latest,
)
from shardtune.checkpoint.rng import load_rng_state, rng_state
from shardtune.checkpoint.safe_io import (
    SafeFileSystemReader,
    TensorOnlyLoadPlanner,
    check_checkpoint,
    safe_load_metadata,
)
from shardtune.checkpoint.staging import StagingBuffer, replica_share
from shardtune.checkpoint.trainer_state import TrainerState
from shardtune.errors import CheckpointError, UnsafeCheckpointError
from shardtune.integrity import fsync_path, read_json_object, write_json_atomic
from shardtune.run_dirs import make_run_dir


def flatten_shapes(state: dict, prefix: str = "") -> dict[str, list[int]]:
    """Logical (unsharded) shape of every tensor, keyed the way DCP flattens nested dicts."""
    shapes = {}
    for key, value in state.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            shapes.update(flatten_shapes(value, path + "."))
        elif isinstance(value, torch.Tensor):
            shapes[path] = list(value.shape)  # a DTensor reports its global shape
    return shapes


def check_compatible(checkpoint_shapes: dict[str, list[int]], template: dict, where: Path) -> None:
    for key, shape in flatten_shapes(template).items():
        if key not in checkpoint_shapes:
            raise CheckpointError(
                f"{where} does not fit this model: it has no tensor {key!r} "
                f"(it holds {len(checkpoint_shapes)} tensors)"
            )
        if list(checkpoint_shapes[key]) != shape:
            raise CheckpointError(
                f"{where} does not fit this model: first mismatching tensor {key!r} has shape "
                f"{list(checkpoint_shapes[key])} in the checkpoint but {shape} in the model"
            )


def logical_shapes(directory: Path) -> dict[str, list[int]]:
    """Unsharded shape of every tensor, from DCP's own metadata (whichever rank wrote it)."""
    metadata = safe_load_metadata((directory / ".metadata").read_bytes(), directory / ".metadata")
    return {
        key: list(meta.size)
        for key, meta in sorted(metadata.state_dict_metadata.items())
        if hasattr(meta, "size")
    }


# DCP reports write failures as CheckpointException, which derives from BaseException.
SAVE_ERRORS = (Exception, CheckpointException)


def _describe_error(exc: BaseException) -> str:
    """One line per distinct cause; DCP wraps every rank's own error in ``failures``."""
    causes = getattr(exc, "failures", None) or {None: exc}
    lines = []
    for cause in causes.values():
        if isinstance(cause, tuple):  # (exception, traceback frames)
            cause = cause[0]
        text = str(cause).strip().splitlines()
        line = f"{type(cause).__name__}: {text[0] if text else ''}"
        if line not in lines:
            lines.append(line)
    return " / ".join(lines)


class CheckpointSaveError(CheckpointError):
    """A save failed on some rank and ``checkpoint.on_save_error`` is ``stop``."""


class Checkpointer:
    def __init__(self, cfg, root: Path, ctx, strategy, state: TrainerState, *, extras_writer=None):
        self.cfg = cfg
        self.root = root
        self.ctx = ctx
        self.strategy = strategy
        self.state = state  # the non-tensor parts: asked at every save, restored by resume()
        self.extras_writer = extras_writer  # rank 0: writes model_config.json, tokenizer/ into a dir
        # Background writes run their own collectives; on the default group they could
        # interleave with the training loop's and deadlock.
        self.io_group = dist.new_group(backend="gloo")
        # Asynchronous saves: one staging copy reused by every save, one writer thread.
        self._staging = StagingBuffer(pin_memory=ctx.device.type == "cuda")
        self._writer: ThreadPoolExecutor | None = None
        self.pending = None
        self.last_blocking_s = 0.0
        self.failed_saves = 0
        self.last_saved_step: int | None = None
        self.pinned: set[int] = set()  # steps retention never deletes (the best evaluation)
        self._validity: dict[str, bool] = {}  # retention's verdict per checkpoint directory
        if ctx.is_main:
            make_run_dir(root)
            for stale in root.glob(".tmp-step-*"):
                shutil.rmtree(stale, ignore_errors=True)
        dist.barrier()

    # -- saving -----------------------------------------------------------------------------

    def due(self, step: int, total_steps: int) -> bool:
        every = self.cfg.every_steps
        return bool(every and step % every == 0) or (self.cfg.at_end and step == total_steps)

    def save(self, step: int, *, blocking: bool = False) -> None:
        """Stage this step's state and write it; commit now (blocking) or when
        ``commit_finished_save`` sees every rank's write done."""
        trainer_state = self.state.state_dict()
        start = time.perf_counter()
        self.wait()  # one save in flight at a time; the previous must commit first
        self.last_saved_step = step
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            if final.exists():  # re-saving a step (e.g. at the end after an interval save)
                shutil.rmtree(final)
            make_run_dir(tmp)
        dist.barrier()
        faults.hooks().kill_point("before_staging", step)
        state = self.strategy.checkpoint_state()
        if self.strategy.name == "ddp":
            # Every DDP rank holds the same tensors: each stages and writes only its share, so
            # the ranks together write (and copy) one replica, not world_size of them.
            state = replica_share(state, self.ctx.rank, self.ctx.world_size)
        snapshot = {"trainer": trainer_state, "rng": rng_state()}
        writer = FileSystemWriter(str(tmp), sync_files=True)
        if blocking or not self.cfg.async_save:
            outcome: Future = Future()
            faults.hooks().signal_point("save", self.ctx.rank, step)
            outcome.set_result(self._write_and_commit(state, writer, step, tmp, final, snapshot))
            self.pending = (outcome, step)
            self.last_blocking_s = time.perf_counter() - start
            self._finish()
        else:
            # The loop waits for the copy into the staging buffer only; planning, writing,
            # fsync, checksums and the commit itself run on the writer thread (its collectives
            # on io_group), so a save costs the loop one memory copy.
            staged = self._staging.stage(state)
            if self._writer is None:
                self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardtune-ckpt")
            future = self._writer.submit(self._write_and_commit, staged, writer, step, tmp, final, snapshot)
            faults.hooks().signal_point("save", self.ctx.rank, step)  # the writes are in flight
            self.pending = (future, step)
            self.last_blocking_s = time.perf_counter() - start

    def _write(self, state: dict, writer: FileSystemWriter, tmp: Path, snapshot: dict) -> dict:
        """Everything of a save that needs no other rank: this rank's shards and RNG file, and
        on rank 0 the trainer state, export extras and tensor shapes; their sizes and sha256.
        Runs on the writer thread for an asynchronous save."""
        dcp.save(state, storage_writer=writer, process_group=self.io_group)
        rng_file = f"rng/rank-{self.ctx.rank:05d}.json"
        make_run_dir(tmp / "rng")
        write_json_atomic(tmp / rng_file, snapshot["rng"])
        mine = [rng_file] + sorted(p.name for p in tmp.glob(f"__{self.ctx.rank}_*.distcp"))
        written = {"files": describe_files(tmp, mine)}
        if self.ctx.is_main:
            write_json_atomic(tmp / TRAINER_STATE, snapshot["trainer"])
            extra = [TRAINER_STATE, ".metadata"]
            if self.extras_writer is not None:
                extra += self.extras_writer(tmp)
            written["rank0"] = {"files": describe_files(tmp, extra), "tensors": logical_shapes(tmp)}
        return written

    def commit_finished_save(self) -> None:
        """Take the outcome of the in-flight save once every rank's background work is done."""
        if self.pending is None:
            return
        future = self.pending[0]
        done = torch.tensor([1.0 if future.done() else 0.0])
        # Every rank must take the outcome at the same step: a failed save with
        # on_save_error=stop raises, and a rank raising alone would leave the others waiting.
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        if done.item() == 1.0:
            self._finish()

    def wait(self) -> None:
        if self.pending is not None:
            self._finish()

    def _finish(self) -> None:
        future, step = self.pending
        self.pending = None
        errors = future.result()  # the same list on every rank: rank 0 broadcast it
        if errors:
            self._save_failed(step, errors)

    def _write_and_commit(self, state: dict, writer: FileSystemWriter, step: int, tmp: Path, final: Path,
                          snapshot: dict) -> list[str]:
        """Write this rank's part, then commit on every rank together: rank 0 writes the
        manifest and renames; a failure anywhere fails the save everywhere. Returns the errors
        (none: committed). Its collectives use io_group, so it may run on the writer thread."""
        rank = self.ctx.rank
        written, described, error = None, None, None
        try:
            written = self._write(state, writer, tmp, snapshot)
            faults.hooks().kill_point("after_write", step)
            described = written["files"]
            faults.hooks().signal_point("commit", rank, step)
        except SAVE_ERRORS as exc:  # disk full, permissions, a peer's write error
            error = f"rank {rank}: {_describe_error(exc)}"
        gathered = [None] * self.ctx.world_size if self.ctx.is_main else None
        dist.gather_object((described, error), gathered, dst=0, group=self.io_group)
        errors = [None]
        if self.ctx.is_main:
            errors[0] = [e for _, e in gathered if e]
            if not errors[0]:
                try:
                    self._write_manifest(tmp, step, written["rank0"], [d for d, _ in gathered])
                    faults.hooks().kill_point("before_rename", step)
                    tmp.rename(final)
                    fsync_path(self.root)
                    faults.hooks().kill_point("before_latest", step)
                    write_latest(self.root, final.name)
                    self._apply_retention(step)
                except OSError as exc:
                    errors[0] = [f"rank 0: {type(exc).__name__}: {exc}"]
            if errors[0]:
                shutil.rmtree(tmp, ignore_errors=True)  # never leave a half checkpoint behind
        dist.broadcast_object_list(errors, src=0, group=self.io_group)
        return errors[0]

    def _save_failed(self, step: int, errors: list[str]) -> None:
        # A full disk often surfaces as a short write inside torch.save ("unexpected pos"),
        # not as ENOSPC: the free space is the fact that explains it.
        free_mib = shutil.disk_usage(self.root).free / 2**20
        message = (
            f"checkpoint at step {step} failed ({'; '.join(errors)}; {free_mib:.1f} MiB free on "
            f"{self.root}); the previous checkpoint is kept: {self.newest_committed() or 'none'}"
        )
        if self.cfg.on_save_error == "stop":
            raise CheckpointSaveError(message)
        self.failed_saves += 1
        if self.ctx.is_main:
            print(f"shardtune: {message}; training continues (checkpoint.on_save_error=continue)",
                  file=sys.stderr, flush=True)

    def newest_committed(self) -> str | None:
        committed = list_checkpoints(self.root)
        return committed[-1].path.name if committed else None

    def _write_manifest(self, tmp: Path, step: int, rank0: dict, gathered: list[dict]) -> None:
        files = {}
        for per_rank in gathered:
            files.update(per_rank)
        files.update(rank0["files"])
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "world_size": self.ctx.world_size,
            "strategy": self.strategy.name,
            "tensors": rank0["tensors"],
            "files": files,
            "created_unix": time.time(),
        }
        write_json_atomic(tmp / MANIFEST, manifest)  # last: its presence means complete
        fsync_path(tmp)

    def _apply_retention(self, newest: int) -> None:
        # `newest` was just committed and `latest` names it: it is never deleted. It may replace
        # a directory of the same step that an earlier retention pass found invalid.
        self._validity[str(self.root / step_dir_name(newest))] = True
        for c in retention_victims(list_checkpoints(self.root), newest=newest, keep_last=self.cfg.keep_last,
                                   keep_every=self.cfg.keep_every, pinned=set(self.pinned), is_valid=self._is_valid):
            shutil.rmtree(c.path, ignore_errors=True)

    def _is_valid(self, c: CheckpointInfo) -> bool:
        """Checked once per directory and process (hashes too, if resume would check them)."""
        key = str(c.path)
        if key not in self._validity:
            try:
                check_checkpoint(c.path, checksums=self.cfg.verify_on_resume)
                self._validity[key] = True
            except CHECKPOINT_ERRORS as exc:
                self._validity[key] = False
                print(f"shardtune: retention: {exc}; not counted and not deleted", file=sys.stderr, flush=True)
        return self._validity[key]

    # -- resuming ---------------------------------------------------------------------------

    def select_for_resume(self) -> Path | None:
        """Rank 0 picks (verifying as configured) and tells everyone, so all ranks load the same one."""
        choice = [None]
        if self.ctx.is_main:
            try:
                selected = self._select() if self._select_mode() != "never" else None
                choice[0] = {"path": str(selected) if selected is not None else None}
            except CHECKPOINT_ERRORS as exc:
                choice[0] = {"error": str(exc), "unsafe": isinstance(exc, UnsafeCheckpointError)}
        dist.broadcast_object_list(choice, src=0)  # every rank must fail, not wait for rank 0
        if "error" in choice[0]:
            raise (UnsafeCheckpointError if choice[0]["unsafe"] else CheckpointError)(choice[0]["error"])
        return Path(choice[0]["path"]) if choice[0]["path"] else None

    def _select_mode(self) -> str:
        return self.cfg.resume if self.cfg.resume in ("auto", "auto-or-fresh", "never") else "path"

    def _select(self) -> Path | None:
        if self._select_mode() == "path":
            path = resolve_checkpoint(Path(self.cfg.resume))
            check_checkpoint(path, checksums=self.cfg.verify_on_resume)
            return path
        return newest_valid_checkpoint(self.root, checksums=self.cfg.verify_on_resume,
                                       fresh_if_all_invalid=self._select_mode() == "auto-or-fresh",
                                       check=lambda path, sums: check_checkpoint(path, checksums=sums))

    def resume(self) -> Path | None:
        """Load the checkpoint that ``checkpoint.resume`` selects into the model, the optimizer and
        every stateful part; ``None`` (nothing loaded) for a fresh start."""
        path = self.select_for_resume()
        if path is not None:
            state = self.load(path)
            self._on_every_rank(lambda: self.state.load_state_dict(state))
        return path

    def load(self, path: Path) -> dict:
        """Load model + optimizer into the strategy, this rank's RNG; return the trainer state.

        Every rank reads files here, and any of them may find a problem the others do not. Each
        step therefore ends with every rank agreeing on the outcome: one rank's failure stops all
        of them at once with its message (alone, it would leave the others to a closed
        connection or a collective timeout that names nothing)."""
        checked = self._on_every_rank(lambda: check_checkpoint(path, checksums=False))
        template = self.strategy.checkpoint_template()
        self._on_every_rank(lambda: check_compatible(checked.manifest["tensors"], template, path))
        self._on_every_rank(lambda: dcp.load(
            template, storage_reader=SafeFileSystemReader(str(path)), planner=TensorOnlyLoadPlanner(),
        ))
        self.strategy.load_checkpoint_state(template)
        rng_file = path / "rng" / f"rank-{self.ctx.rank:05d}.json"

        def restore_rng() -> None:
            # On another world size the per-rank streams cannot map one-to-one; ranks keep the
            # fresh seeds they were given (only dropout-like randomness depends on them).
            if checked.manifest["world_size"] == self.ctx.world_size and rng_file.is_file():
                try:
                    load_rng_state(read_json_object(rng_file, CheckpointError, "RNG state"))
                except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                    raise CheckpointError(f"{rng_file}: not an RNG state ({type(exc).__name__}: {exc})") from None

        self._on_every_rank(restore_rng)
        return checked.trainer_state

    def _on_every_rank(self, step):
        """Run ``step`` here; if it failed on any rank, raise that rank's error on every rank."""
        result, error = None, None
        try:
            result = step()
        except SAVE_ERRORS as exc:  # DCP's CheckpointException is a BaseException
            unsafe = isinstance(exc, UnsafeCheckpointError) or "UnsafeCheckpointError" in str(exc)
            error = (f"rank {self.ctx.rank}: {exc if isinstance(exc, CHECKPOINT_ERRORS) else _describe_error(exc)}",
                     unsafe)
        # Gathered to rank 0 and its verdict broadcast: O(world) in all, where an all-gather of
        # every rank's error to every rank would move O(world^2) objects at 1,000 ranks.
        errors = [None] * self.ctx.world_size if self.ctx.is_main else None
        dist.gather_object(error, errors, dst=0, group=self.io_group)
        verdict = [None]
        if self.ctx.is_main:
            failed = [e for e in errors if e]
            if failed:
                more = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
                verdict[0] = (failed[0][0] + more, failed[0][1])
        dist.broadcast_object_list(verdict, src=0, group=self.io_group)
        if verdict[0] is not None:
            message, unsafe = verdict[0]
            raise (UnsafeCheckpointError if unsafe else CheckpointError)(message)
        return result

    def close(self) -> None:
        self.wait()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        self._staging.release()


__all__ = ["Checkpointer", "CheckpointError", "CheckpointInfo", "check_compatible"]
