"""Starting a trial from given weights (``init_from``), evaluation-only trials (``train.steps: 0``),
per-method dataset filters and recipe-set dataset options."""
from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from bench.config import ConfigError
from bench.init_from import InitFromError, InitWeights, apply_init_from, init_from_problems
from bench.runner import RunOptions, run_sweep
from bench.sweep import expand, spec_from_dict
from methods.common.convert import CHECKPOINT_FORMAT

TRAIN = {"steps": 4, "batch_size": 2, "log_every": 2, "checkpoint_every": 2}
EVAL = {"num_samples": 4, "batch_size": 4, "metrics": ["l1", "psnr"]}


def _sweep(name, method, **extra):
    raw = {"name": name, "seeds": [0], "methods": [method], "datasets": [{"name": "embedded", "variant": "edge"}],
           "train": dict(TRAIN), "eval": dict(EVAL), "scale": {"resolution": 32}, "resources": {"cpu": 1}}
    raw.update(extra)
    return expand(spec_from_dict(raw))


def _runs(uri, name):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return client, [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("bench.role") == "trial"]


def test_evaluation_only_trial_from_a_run_and_from_a_converted_file(ray_session, tmp_path):
    uri = f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    opts = RunOptions(workdir=tmp_path)
    assert run_sweep("source", _sweep("source", {"name": "toy"}), opts, log=lambda s: None) == 0
    client, (src,) = _runs(uri, "source")

    # From the run: the same weights, evaluated the same way, give the same numbers; nothing is trained.
    trials = _sweep("again", {"name": "toy", "init_from": src.info.run_id}, train={**TRAIN, "steps": 0})
    assert trials[0].init_from == "run:" + src.info.run_id and trials[0].identity()["init_from"]
    assert run_sweep("again", trials, opts, log=lambda s: None) == 0
    _, (ev,) = _runs(uri, "again")
    assert ev.info.status == "FINISHED"
    for m in ("l1", "psnr"):
        assert ev.data.metrics[m] == pytest.approx(src.data.metrics[m], rel=1e-6)
    tags = ev.data.tags
    assert tags["bench.eval_only"] == "true" and tags["bench.init_from.kind"] == "run"
    assert src.info.run_id in tags["bench.init_from.origin"] and len(tags["bench.init_from.sha256"]) == 64
    assert "checkpoints" not in {a.path for a in client.list_artifacts(ev.info.run_id)}
    assert "l1_loss" not in ev.data.metrics  # no training step was taken

    # From a converted (official-format) checkpoint file, looked up in checkpoints_dir.
    local = client.download_artifacts(src.info.run_id, "checkpoints/checkpoint.pt", str(tmp_path))
    state = torch.load(local, weights_only=True)["state"]["model"]
    ckdir = tmp_path / "ckpts"
    ckdir.mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "method": "toy", "options": {}, "context": {}, "model": state,
                "source": {"release": "demo", "official_repo": "someone/toy", "official_commit": "0123456789"}},
               ckdir / "toy.pt")
    trials = _sweep("official", {"name": "toy", "init_from": {"embedded-edge": "toy.pt"}},
                    train={**TRAIN, "steps": 0}, checkpoints_dir=str(ckdir))
    assert trials[0].init_from == str((ckdir / "toy.pt").resolve())
    assert run_sweep("official", trials, opts, log=lambda s: None) == 0
    _, (off,) = _runs(uri, "official")
    assert off.data.tags["bench.init_from.kind"] == "official"
    assert "release demo (someone/toy@0123456)" in off.data.tags["bench.init_from.origin"]
    assert off.data.metrics["l1"] == pytest.approx(src.data.metrics["l1"], rel=1e-6)
    from bench.report import build_report

    index = build_report("official", tracking_uri=uri, workdir=tmp_path, log_to_mlflow=False)
    text = index.read_text() + "".join(p.read_text() for p in index.parent.rglob("*.md"))
    assert "default (official weights)" in text and "released official checkpoint" in text


def test_init_from_problems_are_found_before_anything_runs(tmp_path):
    trials = _sweep("missing", {"name": "toy", "init_from": "nope/absent.pt"}, checkpoints_dir=str(tmp_path))
    problems = init_from_problems(trials, f"sqlite:///{tmp_path}/mlflow.db")
    assert len(problems) == 1 and "absent.pt: file not found" in problems[0] and "bench.convert toy" in problems[0]
    trials = _sweep("norun", {"name": "toy", "init_from": "0" * 32})
    assert "no such MLflow run" in init_from_problems(trials, f"sqlite:///{tmp_path}/mlflow.db")[0]
    assert not (tmp_path / "mlflow.db").exists()  # looking did not create a store


def test_weights_that_do_not_fit_are_listed():
    from tests.plugins.toy_methods import ToyMethod, ToyOptions
    from datasets.base import DataInfo
    from methods.base import MethodContext

    info = DataInfo(name="x", variant="edge", split="train", size=1, resolution=32, cond_channels=1)
    method = ToyMethod(ToyOptions(), MethodContext(data=info, resolution=32, width=1.0))
    state = {k: v.clone() for k, v in method.state_dict().items()}
    state["net.9.weight"] = torch.zeros(1)
    state["net.0.weight"] = torch.zeros(2, 2)
    del state["net.2.bias"]
    with pytest.raises(InitFromError) as err:
        apply_init_from(method, InitWeights(state=state, options={"width": 99}), "x.pt")
    msg = str(err.value)
    assert "unexpected: net.9.weight" in msg and "missing: net.2.bias" in msg and "shape: net.0.weight" in msg
    assert "'width': 99" in msg


def test_method_dataset_filter_and_recipe_dataset_options():
    raw = {"name": "f", "methods": [{"name": "toy", "datasets": ["embedded-mask"],
                                     "variants": {"a": {"dataset.options.pseudo_flip": 0.0}}}],
           "datasets": [{"name": "embedded", "variant": "edge"}, {"name": "embedded", "variant": "mask"}]}
    with pytest.raises(ConfigError, match="unknown key 'pseudo_flip'|pseudo_flip"):  # not an embedded option
        expand(spec_from_dict(raw))
    raw["methods"][0]["variants"] = {"a": {"dataset.options.eval_size": 8}}
    raw["methods"][0]["recipes"] = {"embedded-mask": {"dataset.options.eval_size": 16, "dataset.options.num_classes": 4}}
    trials = expand(spec_from_dict(raw))
    assert [t.dataset_label for t in trials] == ["embedded-mask"]
    assert trials[0].dataset.options["eval_size"] == 8 and trials[0].dataset.options["num_classes"] == 4  # variant wins
    raw["methods"][0]["datasets"] = ["ade20k"]
    with pytest.raises(ConfigError, match="runs on none of this sweep's datasets"):
        expand(spec_from_dict(raw))
    raw["methods"][0].update(datasets=None, init_from={"embedded-mask": "m.pt"})
    with pytest.raises(ConfigError, match="no entry for dataset 'embedded-edge'"):
        expand(spec_from_dict(raw))
