"""Sweeps through Ray Tune and MLflow: failures, divergence, dedupe, the quickstart's promises."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bench.runner import RunOptions, run_sweep
from bench.sweep import expand, load_sweep, spec_from_dict

REPO = Path(__file__).resolve().parents[1]


def children(uri, name):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("bench.role") == "sweep"]
    kids = [r for r in runs if r.data.tags.get("bench.role") == "trial"]
    return client, parents, kids


def test_failed_and_diverged_trials_do_not_stop_the_others(ray_session, tmp_path):
    raw = {"name": "mixed", "seeds": [0],
           "methods": [{"name": "toy", "variants": {"ok": {}, "crash": {"fail_at_step": 2},
                                                   "nan": {"nan_at_step": 1, "train.steps": 50}}}],
           "datasets": [{"name": "embedded", "variant": "edge"}],
           "train": {"steps": 6, "batch_size": 2, "log_every": 2, "checkpoint_every": 2},
           "eval": {"num_samples": 4, "batch_size": 4, "metrics": ["l1", "psnr", "ssim"]},
           "scale": {"resolution": 32}, "resources": {"cpu": 1, "max_concurrent": 2}}
    trials = expand(spec_from_dict(raw))
    lines = []
    opts = RunOptions(workdir=tmp_path, sweep_file="mixed.yaml")
    code = run_sweep("mixed", trials, opts, log=lines.append)
    out = "\n".join(lines)
    assert code == 1
    assert "not finished: toy/crash/embedded-edge/s0 (FAILED), toy/nan/embedded-edge/s0 (DIVERGED)" in out
    assert "[toy/ok/embedded-edge/s0] step 6/6 loss" in out  # live progress lines
    uri = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    client, parents, kids = children(uri, "mixed")
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    status = {r.info.run_name: (r.info.status, r.data.tags.get("bench.status")) for r in kids}
    assert status == {"toy/ok/embedded-edge/s0": ("FINISHED", "FINISHED"),
                      "toy/crash/embedded-edge/s0": ("FAILED", "FAILED"),
                      "toy/nan/embedded-edge/s0": ("FAILED", "DIVERGED")}
    crash = next(r for r in kids if r.info.run_name.startswith("toy/crash"))
    assert "traceback.txt" in {a.path for a in client.list_artifacts(crash.info.run_id)}
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in kids)

    # (Re-running skips finished trials: shown by the quickstart test below.)


def test_quickstart_sweep_logs_what_the_readme_promises(ray_session, tmp_path):
    spec = load_sweep(str(REPO / "sweeps" / "quickstart.yaml"),
                      ["train.steps=4", "train.log_every=2", "train.checkpoint_every=2", "eval.num_samples=4",
                       "eval.metrics=[l1,psnr,ssim]", "scale.width=0.0625"])
    trials = expand(spec)
    opts = RunOptions(workdir=tmp_path, sweep_file="sweeps/quickstart.yaml")
    lines = []
    assert run_sweep(spec.name, trials, opts, log=lines.append) == 0
    uri = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    client, parents, kids = children(uri, "quickstart")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and len(kids) == 4
    for run in kids:
        assert run.info.status == "FINISHED"
        assert {"l1", "psnr", "ssim", "G_total", "D_total"} <= set(run.data.metrics)
        assert len(client.get_metric_history(run.info.run_id, "G_total")) == 2  # a loss curve
        assert run.data.params["method"] == "spade" and "scale.resolution" in run.data.params
        assert run.data.tags["bench.git_sha"] and run.data.tags["bench.version.torch"]
        if float(run.data.params["method_options.lambda_vgg"]) != 0:
            assert run.data.tags["bench.weights.vgg19_loss"] == "untrained(seed=%s)" % run.data.params["seed"]
            assert run.data.tags["bench.untrained_backbones"] == "vgg19_loss"
        arts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "samples", "checkpoints"} <= arts
    assert sorted(r.info.run_name for r in kids) == sorted(t.name for t in trials)
    lines.clear()
    assert run_sweep(spec.name, trials, opts, log=lines.append) == 0
    assert "skipped 4 finished" in lines
    assert len(children(uri, "quickstart")[2]) == 4
    # --force: the finished trial runs again in a new run; the old one stays, pointing at it.
    forced = dataclasses.replace(opts, force=True)
    assert run_sweep(spec.name, trials[:1], forced, log=lines.append) == 0
    kids = children(uri, "quickstart")[2]
    mine = sorted((r for r in kids if r.info.run_name == trials[0].name), key=lambda r: r.info.start_time)
    assert len(kids) == 5 and len(mine) == 2 and all(r.info.status == "FINISHED" for r in mine)
    assert mine[0].data.tags["bench.superseded_by"] == mine[1].info.run_id


def test_spade_on_a_real_fixture_dataset(ray_session, real_fixtures, tmp_path):
    """SPADE on the real ADE20K samples (mask -> photo, 151 channels) through the same runner."""
    raw = {"name": "real_smoke", "seeds": [0],
           "methods": [{"name": "spade"}],
           "datasets": [{"name": "ade20k", "root": str(real_fixtures / "ade20k"), "max_samples": 4,
                         "skip_bad": True}],
           "train": {"steps": 2, "batch_size": 2, "log_every": 1, "checkpoint_every": 1,
                     "allow_untrained_backbones": True},
           "eval": {"num_samples": 2, "batch_size": 2, "metrics": ["l1", "psnr", "ssim"]},
           "scale": {"resolution": 64, "width": 0.0625}, "resources": {"cpu": 1}}
    trials = expand(spec_from_dict(raw))
    assert run_sweep("real_smoke", trials, RunOptions(workdir=tmp_path), log=lambda s: None) == 0
    uri = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    _, _, kids = children(uri, "real_smoke")
    assert len(kids) == 1 and kids[0].info.status == "FINISHED"
    params = kids[0].data.params
    assert params["dataset.name"] == "ade20k" and "data.train.size" in params
    assert {"l1", "psnr", "ssim"} <= set(kids[0].data.metrics)
