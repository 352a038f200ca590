"""``shardtune data prepare``: clean, validate, split and tokenize files into checksummed shards."""

from __future__ import annotations

from pathlib import Path

from shardtune.errors import DataError


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="prepare datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p_prepare = data_sub.add_parser(
        "prepare",
        help="clean, validate, split and tokenize files into checksummed shards",
        description="shardtune data prepare [CONFIG.yaml] [INPUT ...] [key=value ...] --out DIR. "
        "Inputs are JSONL/CSV/Parquet files or globs (default: data.prepare.inputs); options come "
        "from data.prepare.* (e.g. data.prepare.max_tokens=2048 data.prepare.on_bad_record=error). "
        "Writes shards, manifest.json, report.json/.txt and token_lengths.png; a re-run with the "
        "same inputs and settings does nothing.",
    )
    p_prepare.add_argument("items", nargs="*", metavar="CONFIG_OR_INPUT_OR_OVERRIDE",
                           help="a .yaml run config, input files/globs, and dotted key=value overrides")
    p_prepare.add_argument("--out", help="output directory (default: data.prepared_dir)")
    p_prepare.add_argument("--tokenizer", help="tokenizer dir or hub id (default: tokenizer.name_or_path; "
                           "if unset, a byte-level BPE of tokenizer.vocab_size is trained on the inputs)")
    p_prepare.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args, extra, parser) -> int:
    """``shardtune data prepare [CONFIG] [INPUT ...] [key=value ...] --out DIR``."""
    from shardtune.config import TokenizerSection, load_config
    from shardtune.data.prepare import prepare_dataset
    from shardtune.data.report import format_table
    from shardtune.errors import ConfigError
    stray = [a for a in extra if a.startswith("-")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    config_path, inputs, overrides = None, [], []
    for item in [*args.items, *extra]:
        if item.endswith((".yaml", ".yml")) and config_path is None:
            config_path = item
        elif "=" in item and not Path(item).exists():
            overrides.append(item)
        else:
            inputs.append(item)
    cfg = load_config(config_path, overrides)
    settings = cfg.data.prepare
    if args.no_progress:
        settings.progress = False
    out_dir = args.out or cfg.data.prepared_dir
    if not out_dir:
        raise ConfigError("give --out DIR (or data.prepared_dir in the config)")
    tokenizer_path = args.tokenizer or cfg.tokenizer.name_or_path
    try:
        tokenizer = None
        if tokenizer_path:
            # Imported here: it imports torch (seconds), which a run that trains its own BPE, or
            # stops at its first bad record, does not need.
            from shardtune.models.loading import load_model_tokenizer

            tokenizer = load_model_tokenizer(TokenizerSection(name_or_path=tokenizer_path), cfg.model.trust_remote_code)
        result = prepare_dataset(settings, out_dir, inputs=inputs or None, tokenizer=tokenizer,
                                 tokenizer_vocab_size=cfg.tokenizer.vocab_size, seq_len=cfg.data.seq_len)
    except FileNotFoundError as exc:
        raise DataError(str(exc)) from None
    print(format_table(result.report), end="")
    state = "unchanged (inputs and settings match the manifest)" if result.cached else "written"
    print(f"\n{result.out_dir}: {state}; report in {result.out_dir / 'report.txt'}")
    print(f"train on it with: data.source=prepared data.prepared_dir={result.out_dir} "
          f"tokenizer.name_or_path={result.out_dir / 'tokenizer'}")
    return 0
