"""A real MLflow tracking server for tests, and the process-group helpers that stop it.

The server binds 127.0.0.1 on a free port, runs one worker and no job runner (MLflow's default
job runner costs ~2 GB), keeps its store and artifacts under the test's directory, and runs in
its own process group so that teardown stops it and every process it started.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest


def stop_group(proc: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM the process group we started (server + its workers, browser + its helpers), wait
    until every member is gone (helpers can outlive their parent briefly), SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.time() + timeout
        while time.time() < deadline:
            proc.poll()  # reap the leader so it does not linger as a zombie
            if not group_alive(proc.pid):
                return
            time.sleep(0.1)
    proc.poll()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store_uri: str, workdir: Path) -> tuple[subprocess.Popen, str, object]:
    """``mlflow ui`` (the same server as ``mlflow server``, harness.md C.2) for ``store_uri``,
    artifacts proxied into ``workdir/mlartifacts``; returns (process, base URL, log file) once
    /health answers."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(workdir / f"mlflow_ui_{port}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store_uri,
                             "--artifacts-destination", str(workdir / "mlartifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"mlflow ui exited {proc.returncode}: {Path(log.name).read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        return proc, base, log
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"mlflow ui did not answer on {base}: {Path(log.name).read_text()[-2000:]}")
    except BaseException:
        stop_group(proc)
        log.close()
        raise


@pytest.fixture()
def mlflow_ui(tmp_path) -> Iterator[Callable[[str], str]]:
    """Start ``mlflow ui`` for a store; yields a function (store uri) -> base URL; stops every
    server it started at teardown."""
    procs = []

    def start(store_uri: str) -> str:
        proc, base, log = start_server(store_uri, tmp_path)
        procs.append((proc, log))
        return base

    yield start
    for p, log in procs:
        stop_group(p)
        log.close()
        assert not group_alive(p.pid), "mlflow ui left processes behind"
