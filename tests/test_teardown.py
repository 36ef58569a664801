"""A test run stopped with SIGTERM still stops what its fixtures started (by PID)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HOLD = '''
import os, pathlib, time
def test_hold(stack):
    pathlib.Path(os.environ["PIDS_OUT"]).write_text(" ".join(str(s.pid) for s in stack.services))
    time.sleep(120)
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too (reaped by whoever started it, or by init)
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_to_a_test_run_stops_its_broker_and_redis(tmp_path):
    (tmp_path / "test_hold.py").write_text(HOLD)
    out = tmp_path / "pids"
    env = {**os.environ, "PIDS_OUT": str(out), "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest",
                            "-p", "no:cacheprovider", str(tmp_path / "test_hold.py")],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and out.read_text()):
            assert run.poll() is None, run.communicate()[0][-2000:]
            assert time.monotonic() < deadline, "the inner run never started its stack"
            time.sleep(0.2)
        pids = [int(x) for x in out.read_text().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)  # Tansu, Redis
        run.send_signal(signal.SIGTERM)
        run.communicate(timeout=60)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if _alive(p)]
    finally:
        if run.poll() is None:
            run.kill()
        for p in pids:  # never leave them behind, even when the assertion failed
            if _alive(p):
                os.kill(p, signal.SIGKILL)
