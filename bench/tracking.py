"""MLflow bookkeeping: the store, the sweep's parent run, one child run per trial, idempotent logging.

Uses ``MlflowClient`` with explicit run ids (no fluent global state), so the same code works in
the driver, in Ray workers and in tests. Conventions (tags):

  bench.role        "sweep" (parent) or "trial" (child)
  bench.trial_key   the trial's config hash: its identity across invocations
  bench.status      FINISHED / FAILED / DIVERGED (MLflow's own status is FINISHED or FAILED)

Logging is at-least-once safe: a resumed trial continues its existing run, and metric steps at or
below the last step already logged are not written again (Ray may re-run steps after a crash).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
MAX_PARAM_LEN = 6000
# Where `mlflow ui` serves a local store (the README's `make dashboard`).
DEFAULT_UI = "http://127.0.0.1:5000"
# MLflow 3.17's UI opens an experiment in its GenAI view (traces) unless the URL asks for the
# "Model training" workflow; this query parameter is what its bundle reads (workflowType).
RUNS_VIEW_QUERY = "workflowType=machine_learning"
# The experiment tag MLflow's UI knows for the experiment's kind ("Machine learning" in its kind
# selector). 3.17's bundle follows the URL's workflowType instead, so the link above is what
# actually opens the runs; the tag records the kind for UIs that read it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"


def default_tracking_uri(workdir: Path) -> str:
    return f"sqlite:///{(workdir / DEFAULT_DB).resolve()}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    # With an http store MLflow prints "View run ... at" / "View experiment at" on every
    # set_terminated: once per trial, from the trial workers. The sweep ends with one link of its
    # own (browse_message), so ask MLflow not to (its documented switch; a user's own value wins).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    return MlflowClient(tracking_uri=uri)


def is_server_uri(uri: str) -> bool:
    return uri.split("://", 1)[0].lower() in ("http", "https")


def runs_link(uri: str, experiment_id: str) -> str:
    """The URL of the experiment's runs table: the tracking server's own UI for an http(s) URI,
    else where `mlflow ui` serves the store by default."""
    base = uri.rstrip("/") if is_server_uri(uri) else DEFAULT_UI
    return f"{base}/#/experiments/{experiment_id}/runs?{RUNS_VIEW_QUERY}"


def browse_message(uri: str, experiment_id: str) -> str:
    """The end of a sweep's output: where to see its runs. A server is already serving them
    (one line, its link); a local store needs `mlflow ui` started first."""
    link = runs_link(uri, experiment_id)
    if is_server_uri(uri):
        return f"runs: {link}"
    return ("dashboard: MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui "
            f"--backend-store-uri {uri} --host 127.0.0.1 --port 5000 --workers 1\n"
            f"runs: {link}")


def ensure_experiment(uri: str, name: str, artifact_root: Optional[Path]) -> str:
    """Create the store and experiment in the driver, before any trial (concurrent first use of a
    fresh SQLite store races on schema creation: reference/harness.md C.3)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # created before bench tagged its experiments
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
        return exp.experiment_id
    location = None
    if artifact_root is not None and uri.startswith("sqlite:"):
        location = (artifact_root / name).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location,
                                    tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT})


INVOCATION_TAG = "bench.invocation"  # which bench.run call made a run (--force tells its own runs apart)
SUPERSEDED_TAG = "bench.superseded_by"  # on a FINISHED run a --force re-run replaced: the new run's id


def find_runs(uri: str, experiment_id: str, filter_string: str) -> List[Any]:
    client = _client(uri)
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                  page_token=token, order_by=["attributes.start_time DESC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def parent_run(uri: str, experiment_id: str, sweep: str, tags: Dict[str, str]) -> str:
    """The sweep's parent run: reused across invocations (one parent per sweep), else created."""
    client = _client(uri)
    existing = find_runs(uri, experiment_id, f"tags.`bench.role` = 'sweep' AND tags.`bench.sweep` = '{sweep}'")
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(experiment_id, run_name=sweep,
                                   tags={"bench.role": "sweep", "bench.sweep": sweep}).info.run_id
    client.set_tag(run_id, "bench.last_invocation", time.strftime("%Y-%m-%d %H:%M:%S"))
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    return run_id


def end_parent(uri: str, run_id: str, ok: bool) -> None:
    _client(uri).set_terminated(run_id, status="FINISHED" if ok else "FAILED")


def trial_runs(uri: str, experiment_id: str, keys: Iterable[str]) -> Dict[str, Any]:
    """The newest run of each trial key (any status)."""
    wanted = set(keys)
    out: Dict[str, Any] = {}
    for run in find_runs(uri, experiment_id, "tags.`bench.role` = 'trial'"):
        key = run.data.tags.get("bench.trial_key")
        if key in wanted and key not in out:
            out[key] = run
    return out


def finished_keys(uri: str, experiment_id: str, keys: Iterable[str]) -> Dict[str, str]:
    """trial key -> run id, for the trials that already have a FINISHED run."""
    wanted = set(keys)
    runs = find_runs(uri, experiment_id, "tags.`bench.role` = 'trial' AND attributes.status = 'FINISHED'")
    out = {}
    for run in runs:
        key = run.data.tags.get("bench.trial_key")
        if key in wanted and key not in out:
            out[key] = run.info.run_id
    return out


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, str]:
    out: Dict[str, str] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, name + "."))
        else:
            s = str(v)
            out[name] = s if len(s) <= MAX_PARAM_LEN else s[: MAX_PARAM_LEN - 3] + "..."
    return out


class TrialRun:
    """A trial's MLflow run: created once, continued on resume, logged idempotently."""

    def __init__(self, uri: str, experiment_id: str, parent_id: str, name: str, key: str,
                 tags: Dict[str, str], invocation: str = "", force: bool = False):
        """``invocation``: the ``bench.run`` call that runs the trial (a tag of the run). With
        ``force`` (``--force``), only runs of this invocation count: the trial gets a new run, and
        the FINISHED runs of earlier invocations are tagged ``bench.superseded_by`` when it finishes."""
        self.uri = uri
        self.client = _client(uri)
        existing = [r for r in find_runs(uri, experiment_id, f"tags.`bench.trial_key` = '{key}'")]
        self.supersedes: List[str] = []
        if force:
            mine = [r for r in existing if r.data.tags.get(INVOCATION_TAG) == invocation]
            self.supersedes = [r.info.run_id for r in existing if r not in mine and r.info.status == "FINISHED"]
            existing = mine
        if invocation:
            tags = {**tags, INVOCATION_TAG: invocation}
        finished = [r for r in existing if r.info.status == "FINISHED"]
        self.already_finished = bool(finished)
        if finished:
            self.run_id = finished[0].info.run_id
            self.resumed = False
            return
        if existing:  # an interrupted or failed attempt: continue its run
            self.run_id = existing[0].info.run_id
            self.resumed = True
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            all_tags = {"mlflow.parentRunId": parent_id, "bench.role": "trial", "bench.trial_key": key}
            all_tags.update(tags)
            self.run_id = self.client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id
            self.resumed = False
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)
        # metric key -> last step logged; a resumed run never logs a step twice
        self._last: Dict[str, int] = self._logged_steps() if self.resumed else {}

    def _logged_steps(self) -> Dict[str, int]:
        run = self.client.get_run(self.run_id)
        last: Dict[str, int] = {}
        for k in run.data.metrics:
            hist = self.client.get_metric_history(self.run_id, k)
            if hist:
                last[k] = max(m.step for m in hist)
        return last

    @property
    def last_logged_step(self) -> int:
        return max(self._last.values(), default=-1)

    def log_params(self, params: Dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        existing = self.client.get_run(self.run_id).data.params
        items = [p for p in items if p.key not in existing]  # params are write-once in MLflow
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i: i + 100])

    def set_tags(self, tags: Dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: Dict[str, float], step: int) -> int:
        """Log each metric at ``step`` unless that key already has a value at or after ``step``
        (a resumed run re-doing steps); returns how many were written."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        todo = [Metric(k, float(v), ts, step) for k, v in metrics.items() if self._last.get(k, -1) < step]
        if todo:
            self.client.log_batch(self.run_id, metrics=todo)
            for m in todo:
                self._last[m.key] = step
        return len(todo)

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: Path, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.set_tags({"bench.status": status})
        self.client.set_terminated(self.run_id, status="FINISHED" if status == "FINISHED" else "FAILED")
        if status == "FINISHED":  # --force: the earlier results stay, pointing at what replaced them
            for old in self.supersedes:
                self.client.set_tag(old, SUPERSEDED_TAG, self.run_id)

