"""The config key space is pinned: adding, removing, renaming a key or changing its type or default
shows up here as a diff to review, not as a silent change to every user's config.

After a change meant to alter the key space: ``make snapshots`` and commit the diff.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, run_env

from shardtune.config import explain_key, key_space

SNAPSHOT = Path(__file__).parent / "snapshots" / "config-keys.txt"


def test_key_space_matches_the_snapshot():
    current = "\n".join(key_space()) + "\n"
    if os.environ.get("SHARDTUNE_WRITE_SNAPSHOT") == "1":
        SNAPSHOT.write_text(current)
    pinned = SNAPSHOT.read_text()
    added = sorted(set(current.splitlines()) - set(pinned.splitlines()))
    removed = sorted(set(pinned.splitlines()) - set(current.splitlines()))
    assert not added and not removed, "config keys changed (make snapshots):\n+ " + "\n+ ".join(added) + \
        "\n- " + "\n- ".join(removed)


def test_every_key_can_be_explained_and_documented_keys_say_so():
    for line in key_space():
        key = line.split(":", 1)[0]
        assert explain_key(key).startswith(f"{key}: ")
    assert "content" in explain_key("data.prepare.splits")
    assert "(no description)" not in explain_key("data.verify_checksums")


def test_explain_on_the_command_line_names_a_misspelt_key():
    out = subprocess.run([sys.executable, "-m", "shardtune", "config", "show", "--explain", "train.lrr"],
                         capture_output=True, text=True, env=run_env(), cwd=ROOT, timeout=120)
    assert out.returncode == 2 and "did you mean 'train.lr'" in out.stderr
