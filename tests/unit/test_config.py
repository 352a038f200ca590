from pathlib import Path

import pytest

from shardtune.config import load_config, nearest_key
from shardtune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


MINIMAL = "model:\n  config:\n    model_type: llama\n"


def test_embedded_default_is_the_demo():
    cfg = load_config(None)
    assert cfg.run.name == "demo-cpu"
    assert cfg.distributed.strategy == "ddp"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        # Second stages (chat-sft.yaml, preference-dpo.yaml) start from the export their first stage
        # writes under runs/: on a fresh clone that directory is the only thing allowed to be missing.
        problems = [line for line in str(exc).splitlines()[1:] if line.strip()]
        assert problems and all("no such file or directory: runs/" in line for line in problems), str(exc)
        return
    assert cfg.train.global_batch_size % cfg.train.micro_batch_size == 0


def test_shipped_configs_cover_cpu_and_gpu_scales():
    names = {p.name for p in SHIPPED}
    assert "demo-cpu.yaml" in names
    assert len(names) >= 3, "expected the CPU demo plus GPU configs (8B FSDP2, 70B ZeRO-3)"


def test_overrides_are_coerced_to_field_types(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), [
        "train.lr=3e-4", "train.max_steps=7", "metrics.progress_bar=false",
        "train.betas=[0.8, 0.9]", "distributed.strategy=zero3", "model.config.hidden_size=32",
    ])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.max_steps == 7
    assert cfg.metrics.progress_bar is False
    assert cfg.train.betas == (0.8, 0.9)
    assert cfg.distributed.strategy == "zero3"
    assert cfg.model.config["hidden_size"] == 32


def test_unknown_key_names_path_and_nearest_valid_key(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL + "train:\n  learning_rat: 0.1\n"))
    assert "train.learning_rat" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL), ["train.micro_batch_sise=2"])
    assert "'train.micro_batch_sise'" in str(err.value)
    assert "did you mean 'train.micro_batch_size'" in str(err.value)


def test_mistyped_section_is_suggested():
    assert nearest_key("distribted") == "distributed"
    assert nearest_key("distributed.stratgy") == "distributed.strategy"


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, MINIMAL), ["train.max_steps=many"])
    message = str(err.value)
    assert "train.max_steps" in message and "'many'" in message
    assert str(tmp_path / "run.yaml") in message


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["distributed.strategy=zero4"], "distributed.strategy"),
        (["train.global_batch_size=10", "train.micro_batch_size=4"], "multiple of"),
        (["train.max_steps=null"], "train.max_steps or train.epochs"),
        (["distributed.deepspeed={zero_optimization: {stage: 2}}"], "only used by zero"),
        (["model.name_or_path=some/model"], "exactly one of"),
        (["train.lr=-1"], "train.lr"),
        (["data.source=jsonl"], "data.path"),
    ],
)
def test_invalid_combinations_are_rejected(tmp_path, overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(write(tmp_path, MINIMAL), overrides)


def test_override_into_a_value_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(None, ["train.lr.x=1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))
