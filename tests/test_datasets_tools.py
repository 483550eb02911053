"""``python -m datasets.prepare`` and ``python -m datasets.build_refs`` (called in-process: same code
path as the command line, without paying for a new interpreter)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datasets  # noqa: F401
from datasets import build_refs, prepare
from datasets.base import DatasetSpec
from datasets.registry import DATASETS


# real_fixtures: the session fixture in conftest.py (skips with a reason when the folder is absent)


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("BENCH_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no stray VGG19 weights


def test_prepare_fills_the_cache_then_reuses_it(real_fixtures, capsys):
    root = str(real_fixtures / "celebahq" / "CelebAMask-HQ")
    args = ["celebahq", "--root", root, "--splits", "test", "--resolution", "32", "--skip-bad", "--no-progress"]
    assert prepare.main(args) == 0
    out = capsys.readouterr().out
    assert "celebahq/test: 4 samples ready (8 listed, 4 skipped); cache 8 computed, 0 reused" in out
    assert "29922_skin.png: no skin part mask" in out
    assert prepare.main(args) == 0
    assert "cache 0 computed, 8 reused" in capsys.readouterr().out


def test_prepare_stops_on_a_bad_sample_with_its_name(tmp_path, capsys):
    for split, tag in (("training", "train"), ("validation", "val")):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "annotations" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / split / f"ADE_{tag}_00000001.jpg")
        Image.fromarray(np.full((8, 8), 151, np.uint8)).save(tmp_path / "annotations" / split / f"ADE_{tag}_00000001.png")
    assert prepare.main(["ade20k", "--root", str(tmp_path), "--splits", "train", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "ADE_train_00000001.png: label value(s) [151] out of range" in err and "Traceback" not in err


def test_prepare_option_parsing():
    assert prepare.parse_options(["a=1", "b=0.5", "c=true", "d=null", "e=some/path.txt"]) == \
        {"a": 1, "b": 0.5, "c": True, "d": None, "e": "some/path.txt"}
    with pytest.raises(SystemExit, match="key=value"):
        prepare.parse_options(["novalue"])


def test_build_refs_needs_weights_or_the_opt_in(real_fixtures, tmp_path, capsys):
    root = str(real_fixtures / "ade20k" / "ADEChallengeData2016")
    out = tmp_path / "refs.txt"
    base = ["ade20k", "--root", root, "--out", str(out), "--top-k", "3", "--resolution", "32"]
    assert build_refs.main(base) == 2
    assert "vgg19-dcbb9e9d.pth" in capsys.readouterr().err and not out.exists()

    assert build_refs.main(base + ["--allow-untrained-backbones"]) == 0
    text = out.read_text().splitlines()
    header = [l for l in text if l.startswith("#")]
    assert any("UNTRAINED" in h for h in header) and any("untrained(seed=0)" in h for h in header)
    lines = [l.split(",") for l in text if not l.startswith("#")]
    assert len(lines) == 39 and all(len(l) == 4 and l[0].startswith("ADE_val_") for l in lines)
    assert all(n.startswith("ADE_train_") for l in lines for n in l[1:]) and all(len(set(l[1:])) == 3 for l in lines)
    # the list it wrote is one the loader reads: every query resolves to its first exemplar
    ds = DATASETS.get("ade20k")(DatasetSpec(name="ade20k", root=root, options={"eval_ref_list": str(out)}), "test", 32)
    assert len(ds) == 39 and ds.info.params["exemplar_list"] == str(out)
    assert ds._plans[0][0].key == lines[0][1]


def test_build_refs_train_split_excludes_self(real_fixtures, tmp_path):
    root = str(real_fixtures / "ade20k" / "ADEChallengeData2016")
    out = tmp_path / "train_refs.txt"
    assert build_refs.main(["ade20k", "--root", root, "--out", str(out), "--split", "train", "--top-k", "20",
                            "--resolution", "32", "--allow-untrained-backbones"]) == 0
    lines = [l.split(",") for l in out.read_text().splitlines() if not l.startswith("#")]
    assert len(lines) == 6 and all(l[0] not in l[1:] and len(l) == 6 for l in lines)  # 5 others each
