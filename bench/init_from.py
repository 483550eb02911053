"""Weights a trial starts from (a method's ``init_from``): a released official checkpoint converted
with ``python -m bench.convert``, a trial's own ``checkpoint.pt``, or an MLflow run's logged one.

Every load is recorded: the tags ``bench.init_from`` (what the sweep said), ``.sha256`` (of the
file), ``.origin`` (which official release and commit, or which run) and ``.kind`` (``official`` /
``run`` / ``file``) -- the report marks rows of official weights by the last one.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from bench.sweep import RUN_ID_PREFIX
from methods.common.convert import CHECKPOINT_FORMAT
from methods.common.weights import file_sha256

RUN_CHECKPOINT = "checkpoints/checkpoint.pt"  # where a trial logs its final checkpoint (bench.trial)


class InitFromError(ValueError):
    """An ``init_from`` that cannot be used: the message names it and says what to do."""


@dataclass
class InitWeights:
    state: Dict[str, torch.Tensor]  # our method's state-dict entries (networks only)
    tags: Dict[str, str] = field(default_factory=dict)
    options: Optional[Dict[str, Any]] = None  # the method options a converted checkpoint was made for


def _model_state(obj: Any, where: str, method: str) -> (Dict[str, torch.Tensor], Dict[str, str], Optional[dict]):
    """The network weights in a checkpoint file of either kind, with origin tags."""
    if isinstance(obj, Mapping) and obj.get("format") == CHECKPOINT_FORMAT:
        if obj.get("method") != method:
            raise InitFromError(f"{where}: a {obj.get('method')!r} checkpoint, but the trial's method is {method!r}")
        src = obj.get("source") or {}
        origin = (f"official {method} release {src.get('release', '?')} ({src.get('official_repo', '?')}@"
                  f"{str(src.get('official_commit', '?'))[:7]})")
        return dict(obj["model"]), {"kind": "official" if src.get("official", True) else "file",
                                    "origin": origin}, obj.get("options")
    if isinstance(obj, Mapping) and isinstance(obj.get("state"), Mapping) and "model" in obj["state"]:
        return dict(obj["state"]["model"]), {"kind": "file", "origin": f"trial checkpoint (step {obj.get('step')})"}, None
    raise InitFromError(f"{where}: not an exbench checkpoint (neither a file written by python -m bench.convert nor a "
                        f"trial's checkpoint.pt)")


def load_init_from(spec: str, method: str, tracking_uri: str) -> InitWeights:
    """Read ``spec`` ("run:<id>" or an absolute path, as ``bench.sweep`` resolves it)."""
    if spec.startswith(RUN_ID_PREFIX):
        run_id = spec[len(RUN_ID_PREFIX):]
        import mlflow

        client = mlflow.MlflowClient(tracking_uri)
        try:
            run = client.get_run(run_id)
        except Exception as exc:  # noqa: BLE001 - MLflow raises its own types
            raise InitFromError(f"init_from {spec}: no such MLflow run in {tracking_uri} ({exc})") from None
        with tempfile.TemporaryDirectory() as d:
            try:
                path = Path(client.download_artifacts(run_id, RUN_CHECKPOINT, d))
            except Exception as exc:  # noqa: BLE001
                raise InitFromError(f"init_from {spec}: run {run.info.run_name!r} has no {RUN_CHECKPOINT} ({exc})") from None
            weights = _from_file(path, spec, method)
        weights.tags.update({"bench.init_from.kind": "run",
                             "bench.init_from.origin": f"run {run_id} ({run.info.run_name})"})
        return weights
    return _from_file(Path(spec), spec, method)


def _from_file(path: Path, spec: str, method: str) -> InitWeights:
    if not path.is_file():
        raise InitFromError(f"init_from {spec}: file not found. Released official weights are converted with "
                            f"python -m bench.convert {method} <official folder> --out {path} (README: "
                            f"'Evaluating the released checkpoints')")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state, tags, options = _model_state(obj, str(path), method)
    tags = {"": spec, "sha256": file_sha256(path), **tags}
    return InitWeights(state=state, tags={f"bench.init_from{'.' + k if k else ''}": v for k, v in tags.items()},
                       options=options)


def apply_init_from(method_obj, weights: InitWeights, spec: str) -> Dict[str, str]:
    """Load ``weights`` into the method (leaving out the method's frozen backbones); the tags to set."""
    exclude = tuple(getattr(method_obj, "pretrained_exclude", ()))
    state = {k: v for k, v in weights.state.items() if not k.startswith(exclude)} if exclude else weights.state
    try:
        loaded = method_obj.load_pretrained(state, what=f"init_from {spec}")
    except ValueError as exc:
        hint = ""
        if weights.options:
            hint = (f"\nThe checkpoint was converted for these method options (set them in the sweep, or use "
                    f"recipe: official for the release's dataset): {weights.options}")
        raise InitFromError(f"{exc}{hint}") from None
    tags = dict(weights.tags)
    tags["bench.init_from.networks"] = ", ".join(f"{k}: {v}" for k, v in loaded.items())
    return tags


def init_from_problems(trials, tracking_uri: Optional[str]) -> list:
    """What makes a trial's ``init_from`` unusable, found in the driver before anything starts:
    missing files, and run ids the tracking store does not have (one line each)."""
    problems, runs_checked = [], {}
    for t in trials:
        spec = t.init_from
        if not spec:
            continue
        if spec.startswith(RUN_ID_PREFIX):
            run_id = spec[len(RUN_ID_PREFIX):]
            if run_id not in runs_checked:
                runs_checked[run_id] = _run_exists(run_id, tracking_uri)
            if not runs_checked[run_id]:
                problems.append(f"{t.name}: init_from {spec}: no such MLflow run in {tracking_uri}")
        elif not Path(spec).is_file():
            problems.append(f"{t.name}: init_from {spec}: file not found (convert a released checkpoint with "
                            f"python -m bench.convert {t.method} <official folder> --out {spec})")
    return problems


def _run_exists(run_id: str, tracking_uri: Optional[str]) -> bool:
    if not tracking_uri:
        return False
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        return False  # do not create an empty store just to look
    import mlflow

    try:
        mlflow.MlflowClient(tracking_uri).get_run(run_id)
        return True
    except Exception:  # noqa: BLE001 - MLflow raises its own types for "not found"
        return False
