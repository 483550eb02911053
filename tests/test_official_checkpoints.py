"""The released-checkpoint path end to end, with releases built by fill.py from the official manifests:
official folder layout -> ``bench.convert --all`` -> ``sweeps/official_checkpoints.yaml --profile
smoke`` on the real dataset samples -> evaluation-only runs tagged with their official origin."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from bench.convert import convert_all, converter
from bench.parity.fixtures import parity_dir
from bench.parity.releases import write_release
from bench.runner import RunOptions, run_sweep
from bench.sweep import expand, load_sweep

REPO = Path(__file__).resolve().parents[1]
FIXTURES_PREFIX = "../shared/fixtures/real/"  # how the smoke profile names the real samples


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = parity_dir()
    if not (root / "cocosnet" / "manifests").is_dir():
        pytest.skip(f"no parity manifests under {root} (set BENCH_PARITY_DIR)")
    out = tmp_path_factory.mktemp("releases")
    import methods  # noqa: F401
    from methods.registry import METHODS

    for method in METHODS.names():
        try:
            names = converter(method).RELEASES
        except Exception:  # noqa: BLE001 - methods without releases
            continue
        for release in names:
            write_release(method, release, out)
    written = convert_all(out, log=lambda s: None)
    return out / "converted", written


def test_every_release_converts_and_evaluates(releases, real_fixtures, ray_session, tmp_path):
    converted, written = releases
    assert {p.name for p in written} == {
        "spade-ade20k_pretrained.pt", "cocosnet-ade20k.pt", "cocosnet-celebahq.pt", "cocosnet-celebahqedge.pt",
        "cocosnet-deepfashion.pt", "cocosnet_v2-deepfashionHD.pt", "midms-midms_celebA_finetuned.pt"}
    spec = load_sweep(str(REPO / "sweeps" / "official_checkpoints.yaml"), [f"checkpoints_dir={converted}"],
                      profile="smoke")
    # The profile names the samples relative to the repository; follow BENCH_FIXTURES if it is elsewhere.
    spec.datasets = [dataclasses.replace(d, root=str(real_fixtures / d.root.split(FIXTURES_PREFIX, 1)[1]))
                     for d in spec.datasets]
    trials = expand(spec)
    assert len(trials) == 7 and all(t.train.steps == 0 and t.init_from for t in trials)
    assert run_sweep(spec.name, trials, RunOptions(workdir=tmp_path), log=lambda s: None) == 0
    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    exp = client.get_experiment_by_name(spec.name)
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("bench.role") == "trial"]
    assert sorted(r.info.run_name for r in runs) == sorted(t.name for t in trials)
    for r in runs:
        tags = r.data.tags
        assert r.info.status == "FINISHED" and tags["bench.eval_only"] == "true"
        assert tags["bench.init_from.kind"] == "official" and len(tags["bench.init_from.sha256"]) == 64
        assert re.search(r"\(\S+/\S+@[0-9a-f]{7}", tags["bench.init_from.origin"]), tags["bench.init_from.origin"]
        assert "loaded" in tags["bench.init_from.networks"] and {"l1", "psnr", "ssim"} <= set(r.data.metrics)
