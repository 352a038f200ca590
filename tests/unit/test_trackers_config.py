"""``metrics.trackers``: what the config accepts, and the error when a tracker's extra is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, TINY

from shardtune.config import load_config
from shardtune.errors import ConfigError, MissingExtraError, exit_code_for
from shardtune.eval.trackers import result_metrics


def test_trackers_default_and_validation():
    assert load_config(TINY).metrics.trackers == ["tensorboard", "jsonl"]
    cfg = load_config(TINY, ["metrics.trackers=[jsonl,wandb,mlflow,wandb]"])
    assert cfg.metrics.trackers == ["jsonl", "wandb", "mlflow"]
    with pytest.raises(ConfigError, match="must include jsonl"):
        load_config(TINY, ["metrics.trackers=[wandb]"])
    with pytest.raises(ConfigError, match="metrics.trackers"):
        load_config(TINY, ["metrics.trackers=[jsonl,comet]"])


# Without site-packages (python -S) neither wandb nor mlflow can be imported: the check must
# name the package and the extra that installs it.
MISSING = """
import sys
sys.path.insert(0, {root!r})
from shardtune.errors import MissingExtraError
from shardtune.eval.trackers import check_installed
check_installed(["jsonl"])  # jsonl needs no package
for name in ("wandb", "mlflow"):
    try:
        check_installed(["jsonl", name])
    except MissingExtraError as exc:
        print(exc)
"""


def test_a_missing_extra_is_an_error_naming_it():
    proc = subprocess.run([sys.executable, "-S", "-c", MISSING.format(root=str(ROOT))], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    wandb, mlflow = proc.stdout.strip().splitlines()
    assert "names wandb, but the 'wandb' package is not installed: pip install 'shardtune[wandb]'" in wandb
    assert "pip install 'shardtune[mlflow]'" in mlflow
    assert exit_code_for(MissingExtraError("x"))[0] == 2


def test_result_metrics_are_the_numbers_of_the_result():
    result = {"steps": 8, "tokens_per_s": 10.5, "final": {"loss": 2.0, "confusion": [[1]]}, "resumed_from": None,
              "completed": True}
    assert result_metrics(result) == {"result/steps": 8.0, "result/tokens_per_s": 10.5, "result/final/loss": 2.0}
