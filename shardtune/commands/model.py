"""``shardtune model import SRC --out DIR``: a GGUF file -> a Hugging Face safetensors directory."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("model", help="import pre-trained models")
    model_sub = p.add_subparsers(dest="model_command", required=True)
    p_import = model_sub.add_parser(
        "import", help="de-quantise a GGUF file into a safetensors model directory",
        description="shardtune model import SRC --out DIR: SRC is a .gguf file or pkg:<package>/<file>.gguf "
        "(a file inside an installed Python package). DIR gets float32 safetensors, config.json, the "
        "tokenizer with its chat template, and shardtune_import.json (source, sha256, versions); "
        "model.name_or_path / tokenizer.name_or_path can then name DIR. Without --out the file is "
        "imported into the cache that model.name_or_path: SRC uses.",
    )
    p_import.add_argument("src", help="a .gguf path or pkg:<package>/<file>.gguf")
    p_import.add_argument("--out", help="directory to write (default: the shared import cache)")
    p_import.add_argument("--force", action="store_true", help="replace DIR if it exists")


def run(args, extra, parser) -> int:
    from shardtune.commands._args import reject_stray
    from shardtune.errors import ModelImportError
    from shardtune.models.gguf import cached_import, import_gguf, is_gguf, read_provenance

    reject_stray(parser, extra)
    if not is_gguf(args.src):
        raise ModelImportError(f"{args.src}: only GGUF files (.gguf) are imported; a Hugging Face "
                               "directory is used as it is")
    out = import_gguf(args.src, args.out, force=args.force) if args.out else cached_import(args.src)
    note = read_provenance(out)
    print(f"{out}: {note['architecture']}, {note['parameters']:,} parameters ({note['dtype']}), "
          f"from {note['file']} (sha256 {note['sha256'][:16]}...)")
    print(f"use it with: model.name_or_path={out} tokenizer.name_or_path={out}")
    return 0
