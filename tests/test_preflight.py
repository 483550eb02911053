"""The preflight: a sweep that cannot run says why before Ray starts and before MLflow is touched,
every problem at once, naming the sweep file's line and key or the file on disk, with the fix."""
from __future__ import annotations

import io
import re
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from bench import run as bench_run
from bench.preflight import check_resources, local_resources
from bench.sweep import expand, spec_from_dict

REPO = Path(__file__).resolve().parents[1]
TOY = """\
name: pre
seeds: [0, 1]
methods:
  - name: toy
    variants: {a: {}, b: {train.steps: 2}}
datasets:
  - {name: embedded, variant: edge}
train: {steps: 1, batch_size: 2}
eval: {num_samples: 2, batch_size: 2, metrics: [l1]}
scale: {resolution: 32}
resources: {cpu: 1}
"""


def cli(tmp_path: Path, text: str, *args: str):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(textwrap.dedent(text))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = bench_run.main([str(sweep), "--workdir", str(tmp_path), *args])
    return code, out.getvalue() + err.getvalue(), str(sweep)


def test_a_valid_sweep_passes_and_dry_run_prints_the_verdict_after_the_table(tmp_path):
    code, out, _ = cli(tmp_path, TOY, "--dry-run")
    assert code == 0, out
    lines = out.strip().splitlines()
    assert lines.index("4 trials") < lines.index("preflight:") and lines[-1] == "preflight: every trial can start"
    assert "toy/a on embedded-edge: 2 trials" in out


def test_missing_dataset_root_fails_before_ray_and_mlflow(tmp_path, monkeypatch):
    import bench.runner

    def must_not_run(*args, **kwargs):  # Ray starts and MLflow is written only in here
        raise AssertionError("run_sweep was called although the preflight failed")

    monkeypatch.setattr(bench.runner, "run_sweep", must_not_run)
    text = TOY.replace("{name: embedded, variant: edge}", "{name: deepfashion, variant: inshop, root: /no/such/dir}")
    code, out, sweep = cli(tmp_path, text, "--num-cpus", "2")  # a real run, not a dry run
    assert code == 2
    assert not (tmp_path / "mlflow.db").exists()
    assert "toy/a, toy/b on deepfashion-inshop:" in out  # one problem, printed once for both families
    assert out.count("/no/such/dir does not exist") == 1
    assert f"{sweep}:7 datasets.0.root" in out and "docs/datasets.md#deepfashion" in out


def test_options_the_method_rejects_at_this_resolution_are_named(tmp_path):
    text = (REPO / "sweeps" / "quickstart.yaml").read_text()
    code, out, _ = cli(tmp_path, text, "--dry-run", "scale.resolution=63")
    assert code == 2
    assert re.search(r"spade/full, spade/no_vgg on embedded-mask:\n    - method: spade: resolution must be a multiple of 32.*got 63", out), out
    assert "scale.resolution 63" in out


def test_resources_beyond_this_machine_are_refused_with_the_fix(tmp_path):
    code, out, sweep = cli(tmp_path, TOY + "  # trailing\n", "--dry-run", "resources.gpu=1", "--num-gpus", "0")
    assert code == 2
    assert "a trial needs 1 GPU; this machine has 0" in out and f"{sweep}:11 resources.gpu" in out
    assert "fix: resources.gpu=0 runs on CPU" in out
    code, out, _ = cli(tmp_path, TOY, "--dry-run", "resources.workers=2", "resources.cpu=2", "--num-cpus", "2")
    assert code == 2 and "needs 4 CPU (2 workers x 2 CPU, 0 GPU); this machine has 2" in out


def test_resources_against_an_attached_cluster():
    spec = spec_from_dict({**_toy_raw(), "resources": {"cpu": 4, "gpu": 0.5, "workers": 2}})
    problems = check_resources(expand(spec), {"CPU": 16.0, "GPU": 0.0}, where="the cluster at auto")
    assert [p.message for p in problems] == ["a trial needs 1 GPU (2 workers x 4 CPU, 0.5 GPU); the cluster at auto has 0"]
    assert check_resources(expand(spec), {"CPU": 8.0, "GPU": 1.0}) == []
    assert local_resources(3, 0) == {"CPU": 3.0, "GPU": 0.0}


def test_metrics_a_trial_cannot_compute_are_said_up_front(tmp_path):
    code, out, _ = cli(tmp_path, TOY.replace("metrics: [l1]", "metrics: [l1, warp]"), "--dry-run")
    assert code == 2  # listed, but no trial of the sweep can compute it (the toy method has no warp)
    assert "warp applies to none of the sweep's trials" in out and "fix: drop warp from eval.metrics" in out
    text = (REPO / "sweeps" / "main_comparison.yaml").read_text()
    code, out, _ = cli(tmp_path, text, "--dry-run", "--profile", "smoke", "eval.metrics=[l1, warp]")
    assert code == 0, out  # the correspondence methods compute warp; SPADE skips it, said as a note
    assert re.search(r"spade/default on embedded-mask; spade/default on embedded-keypoint:\n"
                     r"    - metric: warp is skipped: the method produces no warped exemplar", out), out


def test_missing_init_from_checkpoint_is_named(tmp_path):
    text = TOY.replace("  - name: toy\n", f"  - name: toy\n    init_from: {tmp_path}/nothing.pt\n")
    code, out, sweep = cli(tmp_path, text, "--dry-run")
    assert code == 2 and f"{tmp_path}/nothing.pt: file not found" in out and f"{sweep}:5 methods.0.init_from" in out


def test_every_problem_is_printed_at_once(tmp_path):
    text = TOY.replace("{name: embedded, variant: edge}", "{name: ade20k, root: /nowhere}")
    code, out, _ = cli(tmp_path, text, "--dry-run", "resources.gpu=2", "--num-gpus", "1")
    assert code == 2 and "data:" in out and "resources:" in out
    assert re.search(r"preflight: 2 problems in .* \(the sweep cannot run as it is\)", out)


@pytest.mark.parametrize("sweep", ["main_comparison.yaml", "ablation_v2.yaml"])
def test_paper_scale_methods_build_on_the_meta_device(tmp_path, real_fixtures, sweep):
    """Every method of the paper sweeps at full width and paper resolution on real data (fixture
    samples), built without allocating anything: the preflight passes where the trial would start."""
    df = real_fixtures / "deepfashion" / "DeepFashion"
    ade = real_fixtures / "ade20k" / "ADEChallengeData2016"
    text = (REPO / "sweeps" / sweep).read_text()
    datasets = (f"datasets=[{{name: deepfashion, variant: hd, root: {df}, resolution: 512, train_split: test, "
                f"skip_bad: true}}" + (f", {{name: ade20k, variant: full, root: {ade}, resolution: 256, "
                                       f"train_split: test, skip_bad: true}}" if sweep == "main_comparison.yaml"
                                       else "") + "]")
    code, out, _ = cli(tmp_path, text, "--dry-run", datasets, "resources.gpu=0", "resources.cpu=1",
                       "train.allow_untrained_backbones=true", "eval.allow_untrained_backbones=true")
    assert code == 0, out
    assert "preflight: every trial can start" in out


def _toy_raw():
    import yaml

    return yaml.safe_load(TOY)
