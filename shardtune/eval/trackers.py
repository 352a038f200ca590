"""Experiment trackers beside metrics.jsonl and TensorBoard: Weights & Biases and MLflow.

``metrics.trackers`` names them. Only rank 0's metrics logger opens a tracker (the other
ranks' logger does nothing), so a run of any world size records exactly one tracker run. Each
receives the run's config once, every scalar the logger writes (``kind/key`` at its step), and
the finished run's numbers (``result/...``: steps, tokens per second, final/best/test metrics).

Both work without a server. ``WANDB_MODE=offline`` writes the run under
``<run.output_dir>/wandb/`` for a later ``wandb sync``. MLflow logs to ``MLFLOW_TRACKING_URI``
and, when that is unset, to the file store ``<run.output_dir>/mlruns`` (``mlflow ui
--backend-store-uri file:...`` shows it). A run resumed from a checkpoint in the same output
directory continues the tracker runs it started, whose ids ``trackers.json`` keeps.

wandb and mlflow are optional extras (``pip install 'shardtune[wandb]'`` / ``[mlflow]``),
imported only when named; a missing one is an error before training starts, on every rank.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

from shardtune.errors import MissingExtraError

# tracker -> (module it imports, the pip requirement that provides it)
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "shardtune[wandb]"),
             "mlflow": ("mlflow", "shardtune[mlflow]")}
IDS_FILE = "trackers.json"


def check_installed(names: list[str]) -> None:
    for name in names:
        module, requirement = _PACKAGES.get(name, (None, None))
        if module and importlib.util.find_spec(module) is None:
            raise MissingExtraError(
                f"metrics.trackers names {name}, but the {module!r} package is not installed: "
                f"pip install '{requirement}' (or remove {name} from metrics.trackers)"
            )


def flatten(tree: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; lists and empty dicts stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}{sep}", sep))
        else:
            out[f"{prefix}{key}"] = value
    return out


def result_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of a finished run's result.json as ``result/<path>`` metrics."""
    return {f"result/{k}": float(v) for k, v in flatten(result, sep="/").items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _ids(run_dir: Path) -> dict[str, str]:
    try:
        return json.loads((run_dir / IDS_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _remember(run_dir: Path, name: str, run_id: str) -> None:
    (run_dir / IDS_FILE).write_text(json.dumps({**_ids(run_dir), name: run_id}, indent=1) + "\n")


class WandbTracker:
    def __init__(self, run_dir: Path, run_name: str, config: dict, resume: bool):
        import wandb

        previous = _ids(run_dir).get("wandb") if resume else None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "shardtune"), name=run_name, dir=str(run_dir),
            config=config, id=previous, resume="allow" if previous else None,
            # The run's output already goes to its terminal or SLURM log; a copy in W&B is not needed.
            settings=wandb.Settings(console="off"),
        )
        _remember(run_dir, "wandb", self.run.id)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def finish(self, result: dict | None) -> None:
        if result is not None:
            self.run.summary.update(result_metrics(result))
        self.run.finish(exit_code=0 if result is not None else 1)


class MlflowTracker:
    # One log_batch call takes at most 100 params; MLflow 2+ accepts values up to 6000 characters.
    _PARAMS_PER_CALL = 100
    _PARAM_CHARS = 6000

    def __init__(self, run_dir: Path, run_name: str, config: dict, resume: bool):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            # MLflow 3 opens a file store only with this switch; a file: URI is the request for one.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric = Metric
        self.client = MlflowClient(tracking_uri=uri)
        previous = _ids(run_dir).get("mlflow") if resume else None
        if previous:
            self.run_id = previous
            self.client.update_run(previous, status="RUNNING")
            return
        experiment_id = self._experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "shardtune"))
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        _remember(run_dir, "mlflow", self.run_id)
        params = [Param(k, (v if isinstance(v, str) else json.dumps(v))[: self._PARAM_CHARS])
                  for k, v in flatten(config).items()]
        for start in range(0, len(params), self._PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[start : start + self._PARAMS_PER_CALL])

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except MlflowException:  # another run sharing the store created it meanwhile
            return self.client.get_experiment_by_name(name).experiment_id

    def log(self, step: int, scalars: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._metric(k, float(v), now, step) for k, v in scalars.items()])

    def finish(self, result: dict | None) -> None:
        if result is not None:
            self.log(int(result.get("steps", 0)), result_metrics(result))
        self.client.set_terminated(self.run_id, status="FINISHED" if result is not None else "FAILED")


class ExternalTrackers:
    """The W&B / MLflow runs of one training run (rank 0), opened when the loop knows whether it resumed."""

    def __init__(self, names: list[str], run_dir: Path, run_name: str, config: dict):
        self.names = [n for n in names if n in ("wandb", "mlflow")]
        self.run_dir, self.run_name, self.config = run_dir, run_name, config
        self.open: list | None = None

    def start(self, resumed: bool) -> None:
        if self.open is None:
            kinds = {"wandb": WandbTracker, "mlflow": MlflowTracker}
            self.open = [kinds[n](self.run_dir, self.run_name, self.config, resumed) for n in self.names]

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.start(resumed=False)
        for tracker in self.open:
            tracker.log(step, scalars)

    def finish(self, result: dict | None) -> None:
        """``result``: the finished run's result (None: the run failed or stopped early)."""
        trackers, self.open = self.open or [], []
        for tracker in trackers:
            tracker.finish(result)
