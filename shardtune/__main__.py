from shardtune.cli import entry

entry()
