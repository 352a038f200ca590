"""The ``shardtune`` executable's fast exit still ends the threads a command leaves behind."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

from conftest import ROOT, run_env


def test_exit_stops_an_idle_thread_pool_and_keeps_the_exit_code():
    # A failed checkpoint save leaves its writer pool idle; joining its worker without the
    # interpreter's threading-atexit hooks never returned (the disk-full run hung until killed).
    program = textwrap.dedent("""
        from concurrent.futures import ThreadPoolExecutor
        import atexit
        import shardtune.cli as cli

        pool = ThreadPoolExecutor(max_workers=1)
        def command():
            pool.submit(print, "written")
            atexit.register(print, "atexit ran")
            return 4
        cli.main = command
        cli.entry()
    """)
    proc = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=run_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 4, proc.stderr
    assert proc.stdout.split() == ["written", "atexit", "ran"]


def test_a_failed_command_keeps_what_its_frames_held_until_the_process_exits(monkeypatch):
    """Freeing a failed run's DDP reducer and gloo group while the GIL is held can deadlock with
    gloo's worker thread (seen: a 1-rank run that refused a corrupt resume hung at exit), so a
    failed command's objects stay alive until ``entry`` exits without teardown."""
    import gc
    import weakref

    from shardtune import cli
    from shardtune.errors import ConfigError

    class Held:  # stands in for the model whose reducer holds the process group
        pass

    refs = []

    class FailingVerb:
        add_parser = staticmethod(importlib.import_module("shardtune.commands.train").add_parser)

        @staticmethod
        def run(args, extra, parser):
            held = Held()
            refs.append(weakref.ref(held))
            raise ConfigError("bad key")

    monkeypatch.setattr(cli, "_verb", lambda name: FailingVerb if name == "train" else importlib.import_module(
        f"shardtune.commands.{name}"))
    assert cli.main(["train", "any.yaml"]) != 0
    gc.collect()
    assert refs[0]() is not None
    # One failure at most is held: the next one replaces it.
    assert cli.main(["train", "any.yaml"]) != 0
    gc.collect()
    assert refs[0]() is None and refs[1]() is not None
