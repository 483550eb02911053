"""``bench.check``: rules, tolerances, statuses and exit codes on hand-set runs, ``--update``, and
the end-to-end path a new method takes: the toy method (registered through BENCH_PLUGINS) runs
through a sweep, gets a report, passes its baseline, and fails it when made deliberately worse.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from bench.check import compare, load_baseline, main as check_main
from bench.report import build_report
from bench.report.data import add_columns, finished_trials, search_frame
from bench.runner import RunOptions, run_sweep
from bench.sweep import expand, spec_from_dict
from tests.test_report import Store, empty_store  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
TOY_BASELINE = REPO / "reports" / "baselines" / "toy.yaml"


def _baseline(path: Path, entries, **extra) -> Path:
    body = {"description": "test", **extra, "entries": entries}
    path.write_text("# my notes\n" + yaml.safe_dump(body, sort_keys=False))
    return path


@pytest.fixture()
def two_seeds(tmp_path, empty_store):  # noqa: F811
    s = Store(tmp_path, empty_store, "mine")
    for seed, (l1, psnr) in enumerate([(30.0, 16.0), (32.0, 16.4)]):
        s.trial("toy", "default", "embedded-mask", seed, {"l1": l1, "psnr": psnr})
    s.trial("toy", "extra", "embedded-mask", 0, {"l1": 50.0, "psnr": 10.0})
    return s


def test_rules_tolerances_and_statuses(two_seeds, tmp_path, capsys):
    e = {"method": "toy", "variant": "default", "dataset": "embedded-mask"}
    path = _baseline(tmp_path / "b.yaml", [
        {**e, "metrics": {"l1": {"value": 30.0, "rule": "less", "tolerance": 2.0},       # 31 is 1 worse: OK
                          "psnr": {"value": 17.0, "rule": "larger", "tolerance": 0.5},   # 16.2 is 0.8 worse
                          "ssim": {"value": 0.3, "rule": "larger", "tolerance": 0.1}}},  # never logged
        {**e, "metrics": {"l1": {"value": 28.0, "rule": "less", "tolerance": 0.0, "rel_tolerance": 0.1}}},  # 3 > 2.8
        {**e, "metrics": {"l1": {"value": 29.0, "rule": "less", "rel_tolerance": 0.1}}},  # 2 <= 2.9: OK
        {**e, "metrics": {"l1": {"value": 35.0, "rule": "less", "tolerance": 1.0}}},      # 4 better
        {**e, "seeds": [1], "metrics": {"l1": {"value": 31.0, "rule": "less", "tolerance": 0.5}}},  # 32: 1 worse
        {"method": "toy", "variant": "gone", "dataset": "embedded-mask",
         "metrics": {"l1": {"value": 1.0, "rule": "less", "tolerance": 1.0}}},
    ])
    _, entries = load_baseline(path)
    frame, _ = finished_trials(search_frame("mine", two_seeds.uri))
    results = compare(entries, add_columns(frame), whole_sweep=True)
    assert [(r.metric, r.status) for r in results] == [
        ("l1", "OK"), ("psnr", "REGRESSION"), ("ssim", "MISSING"), ("l1", "REGRESSION"), ("l1", "OK"),
        ("l1", "IMPROVED"), ("l1", "REGRESSION"), ("l1", "NOT RUN")]
    assert results[0].observed == 31.0 and results[0].n == 2 and results[3].tolerance == pytest.approx(2.8)
    assert results[6].n == 1 and results[6].observed == 32.0

    assert check_main(["--baseline", str(path), "mine", "--tracking-uri", two_seeds.uri]) == 1
    out = capsys.readouterr().out
    assert "toy/default/embedded-mask  psnr    larger  17        0.5        16.2 ± 2.54" in out
    assert "note: toy/extra/embedded-mask has runs but no baseline entry (add one with --update)" in out
    assert out.rstrip().splitlines()[-1].startswith("FAILED: 5 of 8 checks")


def test_update_writes_a_baseline_that_passes(two_seeds, tmp_path, capsys):
    path = tmp_path / "new.yaml"
    assert check_main(["--baseline", str(path), "mine", "--tracking-uri", two_seeds.uri, "--update"]) == 0
    raw, entries = load_baseline(path)
    assert [(e.method, e.variant, e.dataset, e.seeds) for e in entries] == [
        ("toy", "default", "embedded-mask", [0, 1]), ("toy", "extra", "embedded-mask", [0])]
    l1, psnr = entries[0].metrics
    # tolerance = max(default, 3 standard errors): l1 sd 1.414 / sqrt(2) x 3 = 3.0; psnr 0.2 x 3 = 0.6
    assert (l1.metric, l1.value, l1.rule, l1.tolerance) == ("l1", 31.0, "less", 3.0)
    assert (psnr.metric, psnr.value, psnr.rule, psnr.tolerance) == ("psnr", 16.2, "larger", 0.6)
    assert entries[1].metrics[0].tolerance == 1.0  # one seed: the metric's default tolerance
    assert check_main(["--baseline", str(path), "mine", "--tracking-uri", two_seeds.uri]) == 0
    assert capsys.readouterr().out.rstrip().endswith("passed: 4 checks")

    # Updating an existing file keeps its notes, rules and hand-set tolerances; only values move.
    mine = _baseline(tmp_path / "mine.yaml", [{"method": "toy", "variant": "default", "dataset": "embedded-mask",
                                               "metrics": {"l1": {"value": 1.0, "rule": "less", "tolerance": 0.25}}}])
    assert check_main(["--baseline", str(mine), "mine", "--tracking-uri", two_seeds.uri, "--update"]) == 0
    text = mine.read_text()
    assert text.startswith("# my notes\n")
    raw, entries = load_baseline(mine)
    assert entries[0].metrics[0].value == 31.0 and entries[0].metrics[0].tolerance == 0.25
    assert [e.variant for e in entries] == ["default", "extra"]


def test_run_id_targets_and_usage_errors(two_seeds, tmp_path, capsys):
    path = _baseline(tmp_path / "b.yaml", [
        {"method": "toy", "variant": "default", "dataset": "embedded-mask",
         "metrics": {"l1": {"value": 31.0, "rule": "less", "tolerance": 0.1}}},
        {"method": "toy", "variant": "gone", "dataset": "embedded-mask",
         "metrics": {"l1": {"value": 1.0, "rule": "less", "tolerance": 1.0}}}], sweep="sweeps/mine.yaml")
    frame, _ = finished_trials(search_frame("mine", two_seeds.uri))
    seed1 = frame[frame["tags.mlflow.runName"] == "toy/default/embedded-mask/s1"]["run_id"].iloc[0]
    # One trial run: only the entry it matches is checked (32 vs 31 + 0.1: a regression).
    assert check_main(["--baseline", str(path), seed1, "--tracking-uri", two_seeds.uri]) == 1
    out = capsys.readouterr().out
    assert "REGRESSION" in out and "NOT RUN" not in out
    # The sweep's parent run stands for the whole sweep: the missing variant fails it.
    assert check_main(["--baseline", str(path), two_seeds.parent, "--tracking-uri", two_seeds.uri]) == 1
    out = capsys.readouterr().out
    gone = [ln.split() for ln in out.splitlines() if ln.startswith("toy/gone/embedded-mask")]
    assert gone == [["toy/gone/embedded-mask", "l1", "less", "1", "1", "-", "0", "-", "NOT", "RUN"]]
    assert "hint: the baseline's runs come from `python -m bench.run sweeps/mine.yaml`" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"entries": [{"method": "toy", "variant": "default", "dataset": "x",
                                                "metrics": {"l1": {"value": 1, "rule": "smaller"}}}]}))
    assert check_main(["--baseline", str(bad), "mine", "--tracking-uri", two_seeds.uri]) == 2
    assert "rule 'smaller' must be one of ['larger', 'less']" in capsys.readouterr().err
    assert check_main(["--baseline", str(path), "nope", "--tracking-uri", two_seeds.uri]) == 2


def test_toy_method_sweep_report_check_and_a_worse_variant(ray_session, tmp_path, capsys):
    """How a new method lands: it is registered (here through BENCH_PLUGINS, tests/conftest.py),
    its sweep runs, the report is built, and bench.check compares it with its baseline entry."""
    base = yaml.safe_load(TOY_BASELINE.read_text())
    spec = spec_from_dict(base["sweep"])
    opts = RunOptions(workdir=tmp_path, sweep_file=str(TOY_BASELINE))
    assert spec.train.steps <= 6 and spec.scale.resolution == 32
    assert run_sweep(spec.name, expand(spec), opts, log=lambda s: None) == 0

    index = build_report(spec.name, workdir=tmp_path)
    assert index == tmp_path / "reports" / "toy_check" / "index.md"
    table = (index.parent / "tables" / "summary_pixel.md").read_text()
    lines = {ln.split(" |")[0].strip("| "): ln for ln in table.splitlines() if ln.startswith("| ")}
    assert set(lines) >= {"default", "worse"}
    assert "**" in lines["default"].split("|")[2] and "(n=2)" in lines["worse"]  # default's L1 is best
    assert (index.parent / "figures" / "qualitative_embedded-mask_s0.png").is_file()
    assert (index.parent / "plots" / "training_toy_embedded-mask.pdf").is_file()

    capsys.readouterr()
    assert check_main(["--baseline", str(TOY_BASELINE), spec.name, "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert [ln.split()[1] for ln in out.splitlines() if ln.startswith("toy/default")] == ["l1", "psnr", "ssim"]
    assert all(ln.rstrip().endswith("OK") for ln in out.splitlines() if ln.startswith("toy/default"))
    assert "note: toy/worse/embedded-mask has runs but no baseline entry" in out

    # The same trial with the default variant made deliberately worse (one seed keeps it quick; the
    # entry's seeds [0, 1] select seed 0): the gate must fail.
    worse = dict(base["sweep"], name="toy_check_regressed", seeds=[0],
                 methods=[{"name": "toy", "variants": {"default": {"quality": 0.2}}}])
    assert run_sweep("toy_check_regressed", expand(spec_from_dict(worse)), opts, log=lambda s: None) == 0
    assert check_main(["--baseline", str(TOY_BASELINE), "toy_check_regressed", "--workdir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    statuses = {ln.split()[1]: ln.split()[-1] for ln in out.splitlines() if ln.startswith("toy/default")}
    assert statuses == {"l1": "REGRESSION", "psnr": "REGRESSION", "ssim": "REGRESSION"}
    assert out.rstrip().splitlines()[-1].startswith("FAILED: 3 of 3 checks")
    cells = pd.read_csv(index.parent / "cells.csv")
    assert set(cells["row_key"]) >= {"toy/default", "toy/worse"}
