"""A sweep whose driver is killed (SIGKILL) resumes with --resume and ends with exactly one
FINISHED run per trial and a continuous metric history without duplicated steps."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]

SWEEP = """\
name: killme
seeds: [0, 1]
methods:
  - name: toy
    options: {step_seconds: 0.25}
datasets: [{name: embedded, variant: edge}]
train: {steps: 24, batch_size: 2, log_every: 2, checkpoint_every: 4}
eval: {num_samples: 4, batch_size: 4, metrics: [l1]}
scale: {resolution: 32}
resources: {cpu: 1, max_concurrent: 2}
"""


def _pids() -> set:
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill_new_ray_processes(before: set) -> None:
    """Ray's own daemons can outlive a SIGKILLed driver (reference/harness.md C.1): stop them."""
    for pid in _pids() - before:
        cmd = _cmdline(pid)
        if "ray" in cmd or "bench.run" in cmd:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _max_logged_step(db: Path) -> int:
    """Read-only peek at the store while the driver writes it (an MlflowClient here could race the
    driver's schema creation)."""
    import sqlite3

    if not db.exists():
        return -1
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            row = con.execute("SELECT max(step) FROM metrics WHERE key = 'l1_loss'").fetchone()
    except sqlite3.Error:
        return -1
    return row[0] if row and row[0] is not None else -1


def test_killed_driver_resumes_without_duplicates(tmp_path):
    sweep = tmp_path / "killme.yaml"
    sweep.write_text(textwrap.dedent(SWEEP))
    env = dict(os.environ, PYTHONPATH=str(REPO), BENCH_PLUGINS="tests.plugins.toy_methods")
    cmd = [sys.executable, "-m", "bench.run", str(sweep), "--workdir", str(tmp_path), "--num-cpus", "2",
           "--no-report"]
    uri = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    before = _pids()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            time.sleep(1)
            if _max_logged_step(tmp_path / "mlflow.db") >= 10:
                break
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(2)
        _kill_new_ray_processes(before)
    interrupted_at = _max_logged_step(tmp_path / "mlflow.db")
    assert 10 <= interrupted_at < 24

    before = _pids()
    try:
        done = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    finally:
        _kill_new_ray_processes(before)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "resuming " in out

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("killme")
    runs = client.search_runs([exp.experiment_id], "tags.`bench.role` = 'trial'")
    assert sorted(r.info.run_name for r in runs) == ["toy/default/embedded-edge/s0", "toy/default/embedded-edge/s1"]
    for run in runs:
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "l1_loss")]
        assert steps == list(range(2, 25, 2)), (run.info.run_name, steps)  # continuous, no duplicates
        assert len(client.get_metric_history(run.info.run_id, "l1")) == 1


def test_killed_trial_is_retried_from_its_checkpoint_in_the_same_run(ray_session, tmp_path):
    """The trial's worker process dies mid-way (os._exit); Ray retries it from its last checkpoint
    (resources.max_failures) and it continues its one MLflow run without duplicated steps."""
    from bench.runner import RunOptions, run_sweep
    from bench.sweep import expand, spec_from_dict

    marker = tmp_path / "killed"
    raw = {"name": "killtrial", "seeds": [0],
           "methods": [{"name": "toy", "options": {"kill_once_at_step": 7, "kill_marker": str(marker)}}],
           "datasets": [{"name": "embedded", "variant": "edge"}],
           "train": {"steps": 12, "batch_size": 2, "log_every": 1, "checkpoint_every": 4},
           "eval": {"num_samples": 2, "batch_size": 2, "metrics": ["l1"]},
           "scale": {"resolution": 32}, "resources": {"cpu": 1, "max_failures": 1}}
    lines = []
    assert run_sweep("killtrial", expand(spec_from_dict(raw)), RunOptions(workdir=tmp_path), log=lines.append) == 0
    assert marker.exists()  # the worker really died once
    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    exp = client.get_experiment_by_name("killtrial")
    runs = client.search_runs([exp.experiment_id], "tags.`bench.role` = 'trial'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "l1_loss")]
    assert steps == list(range(1, 13))  # steps 1-7 before the crash, 8-12 after resuming from step 4
