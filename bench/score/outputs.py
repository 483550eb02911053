"""Where a ``bench.score`` result goes: the printed table, ``--json``, an MLflow run."""
from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Dict, List, Optional

from bench.score.scoring import ScoreResult
from bench.tracking import ensure_experiment, flatten

UNTRAINED_NOTE = ("untrained backbones (seeded random networks; --allow-untrained-backbones): their numbers are not "
                  "comparable with pretrained ones")


def versions() -> Dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "numpy", "scipy", "clean-fid", "lpips", "scikit-image", "pillow"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _untrained_metrics(result: ScoreResult) -> Dict[str, List[str]]:
    """metric name -> its untrained networks."""
    out: Dict[str, List[str]] = {}
    for key in result.untrained:
        metric, net = key.split(".", 1)
        out.setdefault(metric, []).append(net)
    return out


def table(result: ScoreResult) -> str:
    """One line per value: name, value, and a note when its metric ran on an untrained backbone."""
    untrained = _untrained_metrics(result)
    width = max([len(k) for k in result.values] + [6])
    lines = [f"{'metric':<{width}}  value"]
    for key, value in result.values.items():
        nets = untrained.get(result.produced_by[key], [])
        note = f"  [untrained: {', '.join(nets)}]" if nets else ""
        lines.append(f"{key:<{width}}  {value:<12.6g}{note}".rstrip())
    s = result.settings
    formats = [f"{k.split('.')[1]} {v}" for k, v in s.items() if k.startswith("inputs.") and k.endswith(".formats")]
    lines.append(f"{s['n_images']} images of {s['resolution']} (height x width) per folder; files: "
                 + ", ".join(formats))
    if result.untrained:
        lines.append(f"{UNTRAINED_NOTE}: {', '.join(result.untrained)}")
    return "\n".join(lines)


def _json_number(v: float):
    # JSON has no inf/nan (PSNR of identical images is inf): written as strings, as Python prints them
    return v if math.isfinite(v) else str(v)


def write_json(path: Path, result: ScoreResult, command: str) -> None:
    doc = {"metrics": {k: _json_number(v) for k, v in result.values.items()},
           "settings": {**result.settings, "untrained_backbones": ",".join(result.untrained) or "none",
                        "command": command},
           "provenance": result.provenance,
           "versions": versions()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=False, allow_nan=False) + "\n")


def log_mlflow(uri: str, experiment: str, result: ScoreResult, run_name: Optional[str], command: str) -> str:
    """One MLflow run: params = the settings, metrics = the values (step 0), tags = provenance as a
    trial tags it (``bench.weights.<metric>.<network>``, ``bench.untrained_backbones``); its id."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    experiment_id = ensure_experiment(uri, experiment, None)
    client = MlflowClient(tracking_uri=uri)
    tags = {"bench.role": "score", "bench.command": command[:5000],
            "bench.untrained_backbones": ",".join(result.untrained) or "none",
            **{f"bench.weights.{k}": v for k, v in result.provenance.items()},
            **{f"bench.version.{k}": v for k, v in versions().items()}}
    run_id = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    try:
        params = [Param(k, v) for k, v in flatten(result.settings).items()]
        ts = int(time.time() * 1000)
        metrics = [Metric(k, float(v), ts, 0) for k, v in result.values.items()]
        for i in range(0, max(len(params), len(metrics)), 100):
            client.log_batch(run_id, params=params[i:i + 100], metrics=metrics[i:i + 100])
        client.set_tag(run_id, "bench.status", "FINISHED")
        client.set_terminated(run_id, status="FINISHED")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    return run_id
