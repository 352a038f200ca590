"""``shardtune generate RUN_OR_CHECKPOINT_OR_HF_DIR --prompt "..." [--chat]``: try a trained model.

A run directory means its best checkpoint (``result.json``), else its latest; a shardtune
checkpoint of any strategy and world size is exported to a temporary Hugging Face directory
first (LoRA adapters merged, so no manual merge step); a Hugging Face directory (``shardtune
ckpt export`` output, an imported GGUF, a hub snapshot) is loaded as it is; a ``.gguf`` file
or ``pkg:`` spec goes through the import cache. The prompt is wrapped in the tokenizer's chat
template when it has one (``--raw`` sends it as plain text) and answered greedily, so the same
prompt always gets the same answer: the one the run's own evaluations scored.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="answer prompts with a trained model (run, checkpoint or HF directory)",
        description=__doc__.split("\n\n")[0] + " " + " ".join(__doc__.split("\n\n")[1].split()),
    )
    p.add_argument("path", help="a run directory, a checkpoint (or checkpoints dir), an HF model dir, or a .gguf")
    p.add_argument("--prompt", action="append", default=[],
                   help="a user message to answer (repeat for several, each answered on its own)")
    p.add_argument("--chat", action="store_true", help="then read messages from stdin, keeping the conversation")
    p.add_argument("--system", help="a system message to start each conversation with")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="plain text prompts, no chat template")


def best_or_latest_checkpoint(path: Path) -> Path:
    from shardtune.checkpoint.manifest import resolve_checkpoint

    result = path / "result.json"
    if result.is_file():
        best = json.loads(result.read_text()).get("best_checkpoint")
        if best and Path(best).is_dir():
            return Path(best)
    return resolve_checkpoint(path)


@contextlib.contextmanager
def model_directory(spec: str):
    """(Hugging Face directory to load, what it came from), exporting a checkpoint if needed."""
    from shardtune.models.loading import resolve_pretrained

    resolved = resolve_pretrained(spec)
    path = Path(resolved)
    if (path / "config.json").is_file():
        yield path, str(spec)
        return
    from shardtune.checkpoint.export import export_hf
    from shardtune.checkpoint.manifest import verify_checkpoint

    checkpoint = best_or_latest_checkpoint(path)
    verify_checkpoint(checkpoint, checksums=True)
    with tempfile.TemporaryDirectory(prefix="shardtune-generate-") as tmp:
        yield export_hf(checkpoint, Path(tmp) / "hf", adapters_only=False), str(checkpoint)


def load_for_generation(directory: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    model.config.use_cache = True
    return model, tokenizer


def prompt_ids(tokenizer, messages: list[dict], raw: bool = False) -> list[int]:
    """Token ids the model continues: the chat template up to the assistant's turn, or raw text."""
    if raw or not getattr(tokenizer, "chat_template", None):
        text = "\n".join(m["content"] for m in messages) + "\n"
        return tokenizer(text, add_special_tokens=True)["input_ids"]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def greedy_reply(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    """The greedy continuation up to the first end-of-sequence token, decoded."""
    import torch

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    new = out[0, len(ids):].tolist()
    if eos in new:
        new = new[: new.index(eos)]
    return tokenizer.decode(new, skip_special_tokens=True).strip()


def run(args, extra, parser) -> int:
    from shardtune.commands._args import reject_stray

    reject_stray(parser, extra)
    if not args.prompt and not args.chat:
        parser.error("give --prompt TEXT and/or --chat")
    start = [{"role": "system", "content": args.system}] if args.system else []
    with model_directory(args.path) as (directory, origin):
        model, tokenizer = load_for_generation(directory)
        print(f"model: {origin}", file=sys.stderr)
        for prompt in args.prompt:
            messages = [*start, {"role": "user", "content": prompt}]
            print(greedy_reply(model, tokenizer, prompt_ids(tokenizer, messages, args.raw), args.max_new_tokens))
        if args.chat:
            _chat(model, tokenizer, start, args)
    return 0


def _chat(model, tokenizer, start: list[dict], args) -> None:
    messages = list(start)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("exit", "quit"):
            return
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        reply = greedy_reply(model, tokenizer, prompt_ids(tokenizer, messages, args.raw), args.max_new_tokens)
        messages.append({"role": "assistant", "content": reply})
        print(f"model> {reply}" if interactive else reply, flush=True)
