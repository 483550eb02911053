"""python -m bench.eval: evaluation-only runs of existing weights, as Ray tasks, linked to their source."""
from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from mlflow.tracking import MlflowClient

from bench import eval as bench_eval
from bench.report.data import load_runs
from bench.runner import RunOptions, run_sweep
from bench.sweep import expand, spec_from_dict

RAW = {"name": "evalme", "seeds": [0], "methods": [{"name": "toy"}],
       "datasets": [{"name": "embedded", "variant": "edge"}],
       "train": {"steps": 2, "batch_size": 2, "log_every": 1, "checkpoint_every": 2},
       "eval": {"num_samples": 4, "batch_size": 4, "metrics": ["l1"]}, "scale": {"resolution": 32}}


def cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = bench_eval.main(list(args))
    return code, out.getvalue() + err.getvalue()


def test_rescore_a_run_with_an_added_metric_then_a_checkpoint_file(ray_session, tmp_path):
    spec = spec_from_dict(RAW)
    assert run_sweep("evalme", expand(spec), RunOptions(workdir=tmp_path), log=lambda s: None) == 0
    uri = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("evalme")
    (trial,) = client.search_runs([exp.experiment_id], "tags.`bench.role` = 'trial'")
    assert "swd" not in trial.data.metrics

    code, out = cli("--run", trial.info.run_id, "--metrics", "l1,swd", "--workdir", str(tmp_path))
    assert code == 0, out
    (ev,) = client.search_runs([exp.experiment_id], "tags.`bench.role` = 'evaluation'")
    assert ev.info.status == "FINISHED" and ev.data.tags["bench.evaluates"] == trial.info.run_id
    assert ev.data.tags["mlflow.parentRunId"] == trial.info.run_id and ev.data.tags["bench.eval_only"] == "true"
    assert ev.data.metrics["l1"] == trial.data.metrics["l1"]  # the same weights on the same samples
    assert "swd" in ev.data.metrics
    row = load_runs("evalme", uri).runs.iloc[0]  # the report shows the added metric in the trial's row
    assert row["run_id"] == trial.info.run_id and row["metrics.swd"] == ev.data.metrics["swd"]
    assert cli("--sweep", _sweep_file(tmp_path), "--metrics", "l1,swd", "--workdir", str(tmp_path))[0] == 0
    assert len(client.search_runs([exp.experiment_id], "tags.`bench.role` = 'evaluation'")) == 1  # done once

    ckpt = Path(client.download_artifacts(trial.info.run_id, "checkpoints/checkpoint.pt", str(tmp_path)))
    code, out = cli("--checkpoint", str(ckpt), "--method", "toy", "--dataset", "embedded-edge", "--resolution", "32",
                    "--num-samples", "4", "--workdir", str(tmp_path))
    assert code == 0, out
    other = client.get_experiment_by_name("evaluations")
    (run,) = client.search_runs([other.experiment_id], "tags.`bench.role` = 'evaluation'")
    assert run.data.tags["bench.evaluates"] == str(ckpt) and run.data.metrics["l1"] == trial.data.metrics["l1"]


def test_bad_sources_are_one_line_errors(tmp_path):
    code, out = cli("--run", "0" * 32, "--workdir", str(tmp_path))
    assert code == 2 and out.startswith("error: no MLflow store at") and not (tmp_path / "mlflow.db").exists()
    code, out = cli("--checkpoint", "x.pt", "--workdir", str(tmp_path))
    assert code == 2 and "--checkpoint needs --method and --dataset" in out


def _sweep_file(tmp_path: Path) -> str:
    import yaml

    p = tmp_path / "evalme.yaml"
    p.write_text(yaml.safe_dump(RAW))
    return str(p)
