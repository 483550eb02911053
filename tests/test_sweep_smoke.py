"""Every shipped paper sweep runs through the harness in its smoke form (embedded data, CPU).

The whole grid of each file runs (every method x variant x dataset of the profile), with the
steps and evaluation samples cut further so the suite stays within CI's budget: this checks that
each ablation switch, method and metric of the file works end to end, not the numbers.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bench.runner import RunOptions, run_sweep
from bench.sweep import expand, load_sweep

REPO = Path(__file__).resolve().parents[1]
# official_checkpoints.yaml evaluates converted releases: tests/test_official_checkpoints.py builds
# them (from the parity manifests) and runs its smoke profile.
SMOKE = sorted(p.name for p in (REPO / "sweeps").glob("*.yaml")
               if "\n  smoke:" in p.read_text() and p.name != "official_checkpoints.yaml")
CUT = ["train.steps=1", "train.log_every=1", "train.checkpoint_every=1", "eval.num_samples=2",
       "eval.batch_size=2", "seeds=[0]"]


def test_every_paper_sweep_has_a_smoke_profile():
    papers = {"ablation_v1_losses.yaml", "ablation_v2.yaml", "main_comparison.yaml", "midms_noise.yaml",
              "midms_components.yaml", "midms_losses.yaml"}
    assert papers <= set(SMOKE)


@pytest.mark.parametrize("sweep", SMOKE)
def test_smoke_profile_runs_through_bench_run(ray_session, tmp_path, sweep):
    spec = load_sweep(str(REPO / "sweeps" / sweep), CUT, profile="smoke")
    trials = expand(spec)
    lines = []
    code = run_sweep(spec.name, trials, RunOptions(workdir=tmp_path, sweep_file=sweep), log=lines.append)
    assert code == 0, "\n".join(lines[-30:])
    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    exp = client.get_experiment_by_name(spec.name)
    runs = client.search_runs([exp.experiment_id], "tags.`bench.role` = 'trial'")
    assert sorted(r.info.run_name for r in runs) == sorted(t.name for t in trials)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert "l1" in run.data.metrics or any(k.startswith("warp_") for k in run.data.metrics)
