"""The TRL side of bench/preference.py, in its own process: DPOTrainer on the pairs shardtune trains on.

Input (argv[1], JSON): the model directory, the pairs as text in shardtune's epoch-0 order, the
token ids shardtune built for each (to prove TRL tokenized the same), and the hyper-parameters.
Output (argv[2], JSON): TRL's per-step loss, its tokens per second and the tokenization check.
Shuffling is off (a sequential sampler): the order is shardtune's, so step k sees the same pairs.
"""

from __future__ import annotations

import json
import sys
import time


def main(spec_path: str, out_path: str) -> int:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    spec = json.loads(open(spec_path).read())
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)
    hp = spec["hparams"]
    args = DPOConfig(
        output_dir=spec["work_dir"], per_device_train_batch_size=hp["micro_batch_size"],
        gradient_accumulation_steps=hp["global_batch_size"] // hp["micro_batch_size"], max_steps=hp["steps"],
        learning_rate=hp["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, beta=hp["beta"],
        loss_type=["sigmoid"], max_length=hp["seq_len"], precompute_ref_log_probs=True, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False, seed=0, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True,
    )

    class InOrder(DPOTrainer):
        def _get_train_sampler(self, *unused, **unused_kw):
            return SequentialSampler(self.train_dataset)

    losses, times = [], []

    class Record(TrainerCallback):
        def on_step_begin(self, *a, **k):
            times.append(time.perf_counter())

        def on_log(self, _args, state, _control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    dataset = Dataset.from_list(spec["pairs"])
    trainer = InOrder(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      callbacks=[Record()])
    # The ids TRL will train on, against shardtune's: the comparison means nothing if they differ.
    processed = trainer.train_dataset
    same = sum(
        list(row["prompt_ids"]) + list(row["chosen_ids"]) == ids[0] and list(row["prompt_ids"]) + list(row["rejected_ids"]) == ids[1]
        for row, ids in zip(processed, spec["token_ids"], strict=False)
    )
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    steady = times[-1] - times[1] if len(times) > 2 else wall  # from step 2: no warm-up, no reference pass
    json.dump({"losses": losses, "wall_s": wall, "steady_s_per_step": steady / max(1, len(times) - 2),
               "tokenization_identical": same, "pairs": len(spec["pairs"]),
               "trl_version": __import__("trl").__version__}, open(out_path, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
