"""Data-parallel trials: 2 CPU workers (gloo) train to the same parameters as 1 worker with the
doubled batch, log one run, and only rank 0 writes it."""
from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from bench.runner import RunOptions, run_sweep
from bench.sweep import expand, spec_from_dict


def toy_sweep(name, workers, batch):
    return {"name": name, "seeds": [0], "methods": [{"name": "toy"}],
            "datasets": [{"name": "embedded", "variant": "edge"}],
            "train": {"steps": 6, "batch_size": batch, "log_every": 2, "checkpoint_every": 3},
            "eval": {"num_samples": 4, "batch_size": 4, "metrics": ["l1"]},
            "scale": {"resolution": 32}, "resources": {"cpu": 1, "workers": workers}}


def final_state(uri, name, tmp_path):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], "tags.`bench.role` = 'trial'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    path = client.download_artifacts(runs[0].info.run_id, "checkpoints/checkpoint.pt", str(tmp_path / name))
    return runs[0], torch.load(path, weights_only=True)["state"]["model"]


def test_two_workers_equal_one_worker_with_double_batch(ray_session, tmp_path):
    uri = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    for name, workers, batch in (("ddp2", 2, 2), ("single", 1, 4)):
        trials = expand(spec_from_dict(toy_sweep(name, workers, batch)))
        assert run_sweep(name, trials, RunOptions(workdir=tmp_path), log=lambda s: None) == 0
    ddp_run, ddp = final_state(uri, "ddp2", tmp_path)
    single_run, single = final_state(uri, "single", tmp_path)
    for k in single:
        # Same data, same init; gradients differ only in float summation order (tolerance).
        assert torch.allclose(ddp[k], single[k], atol=1e-5, rtol=1e-4), k
    p = ddp_run.data.params
    assert (p["parallel.workers"], p["parallel.effective_batch_size"], p["parallel.lr_scaling"]) == ("2", "4", "none")
    assert len(MlflowClient(uri).get_metric_history(ddp_run.info.run_id, "l1_loss")) == 3  # one writer


def test_training_differs_without_gradient_averaging():
    """The equality above is not trivial: one worker's half batch alone trains differently."""
    from bench.trial import batch_indices

    full = batch_indices(100, 4, 0, 3)
    halves = batch_indices(100, 4, 0, 3)[:2], batch_indices(100, 4, 0, 3)[2:]
    assert list(halves[0]) + list(halves[1]) == full and halves[0] != halves[1]
