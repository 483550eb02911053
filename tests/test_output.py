"""What a sweep prints: its progress, its summary and one link to its runs; not MLflow's per-run
links, Ray's notices, or native stack dumps when it is stopped.

The last test runs ``python -m bench.run`` as a user does, against a real tracking server, and
stops it with SIGTERM (as ``kill``, ``timeout`` or a batch scheduler do) once one trial has
finished: everything the terminal would show is checked.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from bench.tracking import (EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT, browse_message, ensure_experiment,
                            runs_link)
from tests.mlflow_server import mlflow_ui, stop_group  # noqa: F401 - mlflow_ui is a fixture

REPO = Path(__file__).resolve().parents[1]


# ---- the end-of-run message -------------------------------------------------------------------
def test_a_local_store_ends_with_how_to_serve_it_and_the_runs_link():
    msg = browse_message("sqlite:////data/bench/mlflow.db", "3")
    assert msg.splitlines() == [
        "dashboard: MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri "
        "sqlite:////data/bench/mlflow.db --host 127.0.0.1 --port 5000 --workers 1",
        "runs: http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"]


def test_a_tracking_server_ends_with_its_own_runs_link():
    for uri in ("http://10.1.2.3:5000", "http://10.1.2.3:5000/", "HTTPS://mlflow.example.org"):
        msg = browse_message(uri, "7")
        assert msg == f"runs: {uri.rstrip('/')}/#/experiments/7/runs?workflowType=machine_learning"
        assert "mlflow ui" not in msg and "backend-store-uri" not in msg  # a server is not a store to serve
    assert runs_link("http://h:5000", "7") in browse_message("http://h:5000", "7")


def test_the_installed_mlflow_ui_reads_what_the_link_and_the_tag_say():
    """The link's query and the experiment tag are spelled as the installed UI bundle reads them
    (tests/test_dashboard.py checks the effect in a browser, when chromium is available)."""
    js = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    bundle = "".join(p.read_text(errors="replace") for p in sorted(js.glob("*.js")))
    assert 'get("workflowType")' in bundle and 'MACHINE_LEARNING="machine_learning"' in bundle
    assert f'"{EXPERIMENT_KIND_TAG}"' in bundle and f'="{MODEL_DEVELOPMENT}"' in bundle


def test_experiments_are_tagged_as_model_development(tmp_path):
    uri = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    client = MlflowClient(uri)
    old = client.create_experiment("made_before_the_tag")  # as an older bench left it
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    assert ensure_experiment(uri, "made_before_the_tag", tmp_path / "mlartifacts") == old
    new = ensure_experiment(uri, "brand_new", tmp_path / "mlartifacts")
    for exp_id in (old, new):
        assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == MODEL_DEVELOPMENT


# ---- a real run, stopped with SIGTERM ---------------------------------------------------------
SWEEP = """\
name: quiet_check
seeds: [0]
methods:
  - name: toy
    variants:
      quick: {}
      slow: {step_seconds: 0.5, train.steps: 400, train.log_every: 10}
datasets: [{name: embedded, variant: mask}]
train: {steps: 2, batch_size: 2, log_every: 1, checkpoint_every: 2}
eval: {num_samples: 4, batch_size: 4, metrics: [l1, psnr, ssim]}
scale: {resolution: 32}
resources: {cpu: 1, max_concurrent: 2}
"""
QUICK, SLOW = "toy/quick/embedded-mask/s0", "toy/slow/embedded-mask/s0"
NOISE = ("View run", "View experiment", "Token authentication is enabled", "SIGTERM received",
         "SIGABRT", "Fatal Python error", "Extension modules", "Traceback")


def _stat(pid: int):
    """(ppid, start time, state) of a live process, None once it is gone (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[19], fields[0]


def descendants(pid: int):
    """(pid, start time) of every process below ``pid``; the start time tells a reused pid apart."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _stat(int(entry.name))):
            parent[int(entry.name)] = st
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [(c, st[1]) for c, st in parent.items() if st[0] == p]
        out += kids
        todo += [c for c, _ in kids]
    return out


def alive(proc) -> bool:
    st = _stat(proc[0])
    return st is not None and st[1] == proc[1] and st[2] != "Z"


def outlived(procs, timeout: float = 30):
    """Which of ``procs`` are still alive ``timeout`` s after their driver ended; those are killed
    (they are this test's: nothing it started may outlive it)."""
    deadline = time.time() + timeout
    while time.time() < deadline and any(alive(p) for p in procs):
        time.sleep(0.5)
    left = [p for p in procs if alive(p)]
    for pid, _ in left:
        os.kill(pid, signal.SIGKILL)
    return left


def ray_session_dir(driver_pid: int) -> Path:
    """The Ray session a local driver started: Ray names it session_<time>_<driver pid>."""
    root = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray"
    found = sorted(root.glob(f"session_*_{driver_pid}"))
    assert len(found) == 1, f"no single Ray session of pid {driver_pid} under {root}: {found}"
    return found[0]


def test_a_sweep_prints_its_progress_and_one_link_and_stops_cleanly_on_sigterm(tmp_path, mlflow_ui):
    base = mlflow_ui(f"sqlite:///{tmp_path.resolve()}/server.db")
    sweep = tmp_path / "quiet_check.yaml"
    sweep.write_text(SWEEP)
    # What the user's shell would pass on, minus what a Ray instance of this test session may have
    # set in this process (token mode would hide the notice this test looks for).
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "bench.run", str(sweep), "--tracking-uri", base,
                             "--workdir", str(tmp_path / "work"), "--no-report"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    ray_procs = []
    try:
        deadline = time.time() + 420  # Ray start-up alone took 15-100 s on a busy 2-core machine
        while time.time() < deadline and proc.poll() is None:
            out = "".join(lines)
            if f"[{QUICK}] finished" in out and f"[{SLOW}] step" in out:
                break
            time.sleep(0.5)
        out = "".join(lines)
        assert f"[{QUICK}] finished" in out and f"[{SLOW}] step" in out, f"the sweep never got there:\n{out}"
        ray_procs = descendants(proc.pid)  # raylet, GCS, agents, trial workers
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=180)
        reader.join(timeout=10)
        out = "".join(lines)
    finally:
        if proc.poll() is None:
            stop_group(proc)
        left = outlived(ray_procs)
    assert code == 1, f"exit {code}:\n{out}"
    for noise in NOISE:
        assert noise not in out, f"{noise!r} printed:\n{out}"
    # Trial output still reaches the terminal; the summary says what happened and what to do.
    assert f"[{SLOW}] step 10/400" in out
    summary = {row.split()[0]: row.split()[1] for row in out.splitlines() if row.startswith("toy/")}
    assert summary[QUICK] == "FINISHED" and summary[SLOW] != "FINISHED", out
    assert "resume with: python -m bench.run" in out
    # One link into the UI, the last line: the one the end-of-run function makes.
    client = MlflowClient(base)
    exp = client.get_experiment_by_name("quiet_check")
    assert out.rstrip("\n").splitlines()[-1] == browse_message(base, exp.experiment_id)
    assert out.count("/#/experiments/") == 1, out
    runs = {r.info.run_name: r.info.status for r in client.search_runs([exp.experiment_id])}
    assert runs[QUICK] == "FINISHED" and runs[SLOW] != "FINISHED", runs
    # No worker was prestarted for no job (one of those aborting was the "Mutex corrupt" dump).
    logs = ray_session_dir(proc.pid) / "logs"
    assert not sorted(logs.glob("worker-*-ffffffff-*")), sorted(p.name for p in logs.glob("worker-*"))
    # And the driver took its Ray processes with it.
    assert not left, f"Ray processes left behind: {left}"
