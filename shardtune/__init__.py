"""shardtune: fine-tune Hugging Face language models across processes and nodes."""

__version__ = "0.1.0"
