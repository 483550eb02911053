"""One driver per sweep and store: a second one is refused at once, naming the first; a killed
holder leaves no lock behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.sweep_lock import SweepLock, SweepLocked, lock_path

HOLD = """
import sys, time
from pathlib import Path
from bench.sweep_lock import SweepLock
lock = SweepLock(sys.argv[1], "s", Path(sys.argv[2])).acquire()  # kept: the lock lives with the object
print("held", flush=True)
time.sleep(60)
"""


def test_second_driver_is_refused_and_a_killed_holder_releases(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    repo = Path(__file__).resolve().parents[1]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, uri, str(tmp_path), "bench.run", "demo.yaml"],
                              cwd=repo, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(repo)))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SweepLocked) as exc:
            SweepLock(uri, "s", tmp_path).acquire()
        assert f"pid {holder.pid}" in str(exc.value) and "already running" in str(exc.value)
        with SweepLock(uri, "other sweep", tmp_path):  # other sweeps on the same store are free to run
            pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        t0 = time.time()
        with SweepLock(uri, "s", tmp_path):  # the kernel dropped the dead holder's lock
            assert time.time() - t0 < 1
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert lock_path(uri, "s", tmp_path).parent == tmp_path  # next to the sqlite file


def test_run_sweep_refuses_a_running_sweep_before_anything_starts(tmp_path):
    from bench.runner import RunOptions, run_sweep

    uri = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    lines = []
    with SweepLock(uri, "busy", tmp_path.resolve()):
        code = run_sweep("busy", [], RunOptions(workdir=tmp_path), log=lines.append)
    assert code == 2 and "already running" in lines[0]
    assert not (tmp_path / "mlflow.db").exists()  # refused before the store was touched
