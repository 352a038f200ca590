"""The ``shardtune`` executable's fast exit still ends the threads a command leaves behind."""

from __future__ import annotations

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
