"""Reports from MLflow: statistics, tables (known answers from hand-set runs), published values,
untrained-backbone footnotes, plots, qualitative figures, the report directory and its CLI.

Runs are logged with MlflowClient into a temporary SQLite store with the harness's conventions
(bench/tracking.py), so every expected number below is worked out by hand.
"""
from __future__ import annotations

import functools
import math
import shutil
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from bench import stats
from bench.report import build_report, main as report_main
from bench.report.data import load_published, load_runs, metric_info
from bench.report.figures import qualitative_figures, split_grid
from bench.report.plots import find_axes
from bench.report.tables import paper_tables, summary_tables, to_csv, to_latex, to_markdown

REPO = Path(__file__).resolve().parents[1]


# ---- a store with hand-set runs --------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _migrated_db(root: str) -> Path:
    Path(root).mkdir(parents=True, exist_ok=True)
    path = Path(root) / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An empty, migrated MLflow SQLite file: creating the schema costs seconds, copying it none.
    Cached per process, so test modules importing this fixture share one migration."""
    return _migrated_db(str(tmp_path_factory.getbasetemp() / "mlflow_template_db"))


class Store:
    """An experiment with a sweep parent run; ``trial`` logs a child run like bench/trial.py."""

    def __init__(self, root: Path, template: Path, name: str = "hand"):
        shutil.copyfile(template, root / "mlflow.db")
        self.uri = f"sqlite:///{root.resolve()}/mlflow.db"
        self.name = name
        self.client = MlflowClient(self.uri)
        self.exp = self.client.create_experiment(name, artifact_location=(root / "art").resolve().as_uri())
        self.parent = self.client.create_run(self.exp, run_name=name,
                                             tags={"bench.role": "sweep", "bench.sweep": name}).info.run_id

    def trial(self, method: str, variant: str, dataset: str, seed: int, metrics: Dict[str, float],
              status: str = "FINISHED", untrained: str = "none", params: Optional[Dict[str, str]] = None,
              key: Optional[str] = None, history: Optional[Dict[str, list]] = None, step: int = 10) -> str:
        c = self.client
        name = f"{method}/{variant}/{dataset}/s{seed}"
        tags = {"mlflow.parentRunId": self.parent, "bench.role": "trial", "bench.trial_key": key or name,
                "bench.method": method, "bench.variant": variant, "bench.dataset": dataset,
                "bench.seed": str(seed), "bench.sweep": self.name, "bench.untrained_backbones": untrained}
        rid = c.create_run(self.exp, run_name=name, tags=tags).info.run_id
        p = {"method": method, "variant": variant, "seed": str(seed), "scale.resolution": "64", **(params or {})}
        c.log_batch(rid, params=[Param(k, v) for k, v in p.items()])
        ms = [Metric(k, float(v), 0, step) for k, v in metrics.items()]
        for k, vals in (history or {}).items():
            ms += [Metric(k, float(v), 0, s) for s, v in vals]
        c.log_batch(rid, metrics=ms)
        c.log_batch(rid, tags=[RunTag("bench.status", status)])
        c.set_terminated(rid, status="FINISHED" if status == "FINISHED" else "FAILED")
        return rid


@pytest.fixture()
def comparison(tmp_path, empty_store):
    """SPADE vs CoCosNet on DeepFashion-HD, 3 seeds: FID clearly apart, semantic consistency not."""
    s = Store(tmp_path, empty_store, "comparison")
    fid = {"spade": [30.0, 32.0, 34.0], "cocosnet": [20.0, 21.0, 22.0]}
    sem = {"spade": [0.90, 0.91, 0.92], "cocosnet": [0.905, 0.91, 0.915]}
    for m in ("spade", "cocosnet"):
        for seed in range(3):
            s.trial(m, "default", "deepfashion-hd", seed,
                    {"fid_sources": fid[m][seed], "sem_consistency": sem[m][seed], "l1_loss": 0.5},
                    untrained="sem_consistency.vgg19,vgg19_loss" if m == "spade" else "none")
    # Neither of these may reach a table: a failed trial, and an older finished run of a trial
    # that has a newer one (the newest run of a trial key wins).
    s.trial("cocosnet", "default", "deepfashion-hd", 3, {"fid_sources": 999.0}, status="FAILED")
    s.trial("spade", "default", "deepfashion-hd", 0, {"fid_sources": 500.0, "sem_consistency": 0.1},
            key="spade/default/deepfashion-hd/s0", untrained="sem_consistency.vgg19,vgg19_loss")
    # re-log the real seed-0 run so it is the newest for its key
    s.trial("spade", "default", "deepfashion-hd", 0, {"fid_sources": 30.0, "sem_consistency": 0.90, "l1_loss": 0.5},
            key="spade/default/deepfashion-hd/s0", untrained="sem_consistency.vgg19,vgg19_loss")
    return s


# ---- statistics ------------------------------------------------------------------------------
def test_stats_known_answers():
    s = stats.summarize([1.0, 2.0, 3.0])
    assert (s.n, s.mean, s.std) == (3, 2.0, 1.0)
    assert s.ci95 == pytest.approx(4.302653 / math.sqrt(3), abs=1e-6)  # t(0.975, 2) = 4.302653
    one = stats.summarize([5.0, float("nan")])
    assert one.n == 1 and one.mean == 5.0 and math.isnan(one.ci95)
    # Wikipedia "Welch's t-test", example 1: t = -2.46, nu ~ 25, p = 0.021.
    a1 = [27.5, 21.0, 19.0, 23.6, 17.0, 17.9, 16.9, 20.1, 21.9, 22.6, 23.1, 19.6, 19.0, 21.7, 21.4]
    a2 = [27.1, 22.0, 20.8, 23.4, 23.4, 23.5, 25.8, 22.0, 24.8, 20.2, 21.9, 22.1, 22.9, 20.5, 24.4]
    r = stats.welch(a1, a2)
    assert round(r.t, 2) == -2.46 and r.df == pytest.approx(24.9, abs=0.1) and round(r.p, 3) == 0.021
    assert stats.welch([1.0], [2.0, 3.0]) is None  # no variance from one seed
    assert stats.welch([1.0, 1.0], [2.0, 2.0]).p == 0.0 and stats.welch([1.0, 1.0], [1.0, 1.0]).p == 1.0
    assert stats.holm([0.01, None, 0.04, 0.03]) == pytest.approx([0.03, None, 0.06, 0.06])


# ---- tables ----------------------------------------------------------------------------------
def test_summary_tables_known_answers(comparison):
    runset = load_runs("comparison", comparison.uri)
    assert len(runset.runs) == 6 and runset.not_finished == [("cocosnet/default/deepfashion-hd/s3", "FAILED")]
    tables = {t.id: t for t in summary_tables(runset, load_published())}
    assert set(tables) == {"summary_quality", "summary_semantic"}
    q = tables["summary_quality"]
    assert [r.label for r in q.rows] == ["spade", "cocosnet"]  # one variant per method: rows are methods
    spade, coco = q.cell("spade/default", "deepfashion-hd", "fid_sources"), q.cell("cocosnet/default", "deepfashion-hd",
                                                                                  "fid_sources")
    assert spade.values == [30.0, 32.0, 34.0] and coco.best and not spade.best
    assert coco.summary.ci95 == pytest.approx(4.302653 / math.sqrt(3), abs=1e-6)
    # Welch: t = 11 / sqrt(4/3 + 1/3) = 8.52, df = 2.94 -> p = 0.00366 (one test: Holm = raw)
    assert spade.p_vs_best == pytest.approx(0.00366, abs=1e-5) and spade.significant
    md = to_markdown(q)
    assert "| row | deepfashion-hd FID ↓ | deepfashion-hd FID ↓ (paper) |" in md
    # published CoCosNet v2 Table 1 values beside ours; SPADE trained with a random VGG loss
    assert "| spade§ | 32.00 ± 4.97 (n=3) | 34.40 |" in md
    assert "| cocosnet | **21.00 ± 2.48** (n=3) | 26.90 |" in md
    assert "paper: CoCosNet v2 (Zhou et al., CVPR 2021), Table 1." in md
    assert "§ trained with an untrained loss backbone (vgg19_loss)" in md
    sem = to_markdown(tables["summary_semantic"])
    # equal means (0.91): both are best; SPADE's metric used a random VGG -> "*" and its footnote
    assert "| spade§ | **0.910 ± 0.025**ᵘ (n=3) | 0.883 |" in sem
    assert "| cocosnet | **0.910 ± 0.012** (n=3) | 0.924 |" in sem
    assert "ᵘ computed with an untrained (seeded random-init) backbone (sem_consistency.vgg19)" in sem
    csv_lines = to_csv(q).splitlines()
    assert csv_lines[2].startswith("cocosnet/default,cocosnet,21.0,") and csv_lines[2].endswith(",3,1,,26.9")


def test_not_significant_and_untested_marks(tmp_path, empty_store):
    s = Store(tmp_path, empty_store)
    for seed, (a, b) in enumerate([(10.0, 10.5), (12.0, 11.5), (11.0, 11.2)]):
        s.trial("toy", "a", "embedded-mask", seed, {"psnr": a})
        s.trial("toy", "b", "embedded-mask", seed, {"psnr": b})
    s.trial("toy", "c", "embedded-mask", 0, {"psnr": 9.0})  # one seed: cannot be tested
    t = summary_tables(load_runs("hand", s.uri), load_published())[0]
    assert [r.label for r in t.rows] == ["a", "b", "c"]  # one method: rows are variants
    b = t.cell("toy/b", "embedded-mask", "psnr")
    a = t.cell("toy/a", "embedded-mask", "psnr")
    assert b.best and a.tested and not a.significant
    md = to_markdown(t)
    assert "| a | 11.00 ± 2.48† (n=3) |" in md  # PSNR higher is better: b (11.07) is best
    assert "| c | 9.00‡ (n=1) |" in md
    assert "‡ not tested against the best row: fewer than 2 seeds on one side." in md


def test_paper_layout_tables_ablation(tmp_path, empty_store):
    """CoCosNet v2 Tables 4-5: rows in the paper's order, warp scored at each variant's finest level."""
    s = Store(tmp_path, empty_store)
    levels = {"levels_64": {64: 90.0}, "levels_64_128": {64: 95.0, 128: 85.0},
              "levels_64_128_256": {64: 95.0, 128: 88.0, 256: 83.0},
              "full": {64: 95.0, 128: 90.0, 256: 86.0, 512: 80.0}, "gru_only": {512: 99.0}}
    for v, by_level in levels.items():
        m = {f"warp_l1_l{lvl}": x for lvl, x in by_level.items()}
        m.update({f"warp_psnr_l{lvl}": 20.0 for lvl in by_level})
        s.trial("cocosnet_v2", v, "deepfashion-hd", 0, m)
    tables = {t.id: t for t in paper_tables(load_runs("hand", s.uri), load_published())}
    assert set(tables) == {"cocosnet_v2_table4", "cocosnet_v2_table5"}
    t4 = tables["cocosnet_v2_table4"]
    assert [r.key for r in t4.rows] == ["cocosnet_v2/levels_64", "cocosnet_v2/levels_64_128",
                                        "cocosnet_v2/levels_64_128_256", "cocosnet_v2/full"]
    assert [t4.cell(r.key, "deepfashion-hd", "warp_l1_finest").summary.mean for r in t4.rows] == [90, 85, 83, 80]
    assert t4.published[("cocosnet_v2/full", "deepfashion-hd", "warp_l1_finest")] == (
        77.84, "CoCosNet v2 (Zhou et al., CVPR 2021), Table 4")
    assert (t4.columns == [("deepfashion-hd", "warp_l1_finest"), ("deepfashion-hd", "warp_psnr_finest"),
                           ("deepfashion-hd", "warp_ssim_finest")])  # SSIM: paper only, we did not log it
    md = to_markdown(t4)
    assert "| 64 (cocosnet_v2/levels_64) | 90.00‡ (n=1) | 82.25 | **20.00** (n=1) | 28.03 | 0.750 |" in md
    assert "| Full 64+128+256+512 (cocosnet_v2/full) | **80.00** (n=1) | 77.84 |" in md
    t5 = tables["cocosnet_v2_table5"]
    assert [r.key for r in t5.rows] == ["cocosnet_v2/gru_only", "cocosnet_v2/full"]
    assert t5.published[("cocosnet_v2/full", "deepfashion-hd", "warp_l1_finest")][0] == 81.97
    tex = to_latex(t4)
    for piece in (r"\toprule", r"\midrule", r"\bottomrule", r"\multicolumn{5}{c}{deepfashion-hd}",
                  r"\cmidrule(lr){2-6}", r"Warp L1 $\downarrow$", r"\textbf{80.00} (n=1) & 77.84",
                  r"\caption{CoCosNet v2 (Zhou et al., CVPR 2021), Table 4: Ablation"):
        assert piece in tex, piece


def test_paper_table_on_another_dataset_keeps_columns_apart(tmp_path, empty_store):
    """A smoke run on embedded data gets the paper's layout, but its numbers and the paper's sit in
    different columns (never side by side as if comparable)."""
    s = Store(tmp_path, empty_store)
    for v, fid in (("noise_20", 50.0), ("noise_25", 40.0)):
        s.trial("midms", v, "embedded-edge", 0, {"fid_sources": fid})
    s.trial("spade", "default", "embedded-edge", 0, {"fid_sources": 60.0})
    omitted = []
    tables = paper_tables(load_runs("hand", s.uri), load_published(), omitted)
    # Ablation layouts are kept for a smoke run; comparison tables of datasets it never ran are not.
    assert [t.id for t in tables] == ["midms_table4"]
    assert omitted == ["cocosnet_v2_table1", "cocosnet_table1", "midms_table1"]
    t = tables[0]
    assert t.columns == [("celebahq-edge", "fid_sources"), ("embedded-edge", "fid_sources")]
    md = to_markdown(t)
    assert "| 20% (midms/noise_20) | 23.67 | 50.00‡ (n=1) |" in md
    assert "This sweep ran none of the paper's datasets (celebahq-edge)" in md


def test_published_file_is_consistent():
    tables = load_published()
    assert {t.id for t in tables} >= {f"cocosnet_v2_table{i}" for i in range(1, 6)} | {
        f"cocosnet_table{i}" for i in range(1, 5)} | {f"midms_table{i}" for i in range(1, 6)}
    for t in tables:
        assert all(metric_info(m) is not None for m in t.metrics), t.id
    t = next(t for t in tables if t.id == "midms_table1")
    assert t.value("midms", "deepfashion-inshop", "fid_exemplars") == 8.54
    assert t.value("spade", "celebahq-edge", "fid_exemplars") is None  # "-" in the paper


# ---- plots and figures -----------------------------------------------------------------------
def test_swept_option_axes_and_plots(tmp_path, empty_store):
    s = Store(tmp_path, empty_store)
    for v, lvl in (("noise_20", 0.2), ("noise_25", 0.25), ("noise_30", 0.3), ("noise_35", 0.35), ("other", 0.25)):
        opts = {"method_options.noise_level": str(lvl), "method_options.w_dom": "0.0" if v == "other" else "1.0"}
        s.trial("midms", v, "celebahq-edge", 0, {"fid_sources": 20 + 100 * abs(lvl - 0.25)}, params=opts,
                history={"loss_total": [(1, 2.0), (2, 1.5)]})
    # params hold str() of the option: tuples, as the harness logs CoCosNet v2's levels
    for v, lv in (("levels_64", "(8,)"), ("levels_64_128", "(8, 4)"), ("full", "(8, 4, 2, 1)"),
                  ("levels_64_128_256", "[8, 4, 2]"), ("no_reg", "(8, 4, 2, 1)")):
        opts = {"method_options.levels": lv, "method_options.lambda_cycle": "0.0" if v == "no_reg" else "1.0"}
        s.trial("cocosnet_v2", v, "celebahq-edge", 0, {"warp_l1_l64": 10.0}, params=opts)
    runset = load_runs("hand", s.uri)
    axes = {(a.method, a.option): a for a in find_axes(runset.runs)}
    assert set(axes) == {("midms", "noise_level"), ("cocosnet_v2", "levels")}  # w_dom/lambda_cycle: 2 values
    noise = axes[("midms", "noise_level")]
    assert noise.variants == ["noise_20", "noise_25", "noise_30", "noise_35"]
    assert noise.ticks == ["20%", "25%", "30%", "35%"]
    assert axes[("cocosnet_v2", "levels")].ticks == ["8", "8+16", "8+16+32", "8+16+32+64"]  # at 64x64
    index = build_report("hand", tracking_uri=s.uri, workdir=tmp_path, log_to_mlflow=False)
    plots = index.parent / "plots"
    for stem in ("midms_vs_noise_level", "cocosnet_v2_vs_levels", "training_midms_celebahq-edge"):
        for ext in ("png", "pdf"):
            assert (plots / f"{stem}.{ext}").stat().st_size > 1000, (stem, ext)


def _grid(res: int, n: int, warps: int, seed: int):
    from bench.grid import grid_rows, save_grid
    from methods.base import MethodOutput

    g = torch.Generator().manual_seed(seed)
    rnd = lambda: torch.rand(n, 3, res, res, generator=g) * 2 - 1  # noqa: E731
    batch = {"cond_vis": rnd(), "exemplar": rnd(), "image": rnd()}
    out = MethodOutput(rnd(), {str(res // 2 ** k): torch.rand(n, 3, res // 2 ** k, res // 2 ** k, generator=g)
                              for k in range(warps)})
    return batch, out, grid_rows(batch, out), save_grid


def test_qualitative_figure_from_grid_artifacts(tmp_path, empty_store):
    from bench.grid import render_grid

    batch, out, rows, save_grid = _grid(32, 3, 2, 0)
    img = np.asarray(render_grid(rows))
    parts = split_grid(img, 32, max_cols=2)
    to_u8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()  # noqa: E731
    assert np.array_equal(parts.exemplar[:, :32], to_u8(batch["exemplar"])[0])
    assert np.array_equal(parts.output[:, 34:66], to_u8(out.output)[1])  # second column, 2-px padding
    assert len(parts.warps) == 2 and parts.condition.shape == (32, 66, 3)
    with pytest.raises(ValueError):
        split_grid(img, 30, max_cols=2)

    s = Store(tmp_path, empty_store)
    for m in ("cocosnet", "spade"):
        rid = s.trial(m, "default", "embedded-mask", 0, {"l1": 1.0}, params={"scale.resolution": "32"})
        _, _, rows_m, _ = _grid(32, 3, 2 if m == "cocosnet" else 0, 0)
        p = save_grid(rows_m, tmp_path / m / "samples" / "grid.png")
        s.client.log_artifact(rid, str(p), "samples")
    files, notes = qualitative_figures(load_runs("hand", s.uri), tmp_path / "fig")
    assert sorted(f.name for f in files) == ["qualitative_embedded-mask_s0.pdf", "qualitative_embedded-mask_s0.png"]
    assert notes == []


def test_report_directory_cli_and_mlflow_copy(comparison, tmp_path, capsys):
    assert report_main(["comparison", "--tracking-uri", comparison.uri, "--workdir", str(tmp_path)]) == 0
    out = tmp_path / "reports" / "comparison"
    assert capsys.readouterr().out.strip() == f"report: {out / 'index.md'}"
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    for t in ("summary_quality", "summary_semantic", "cocosnet_v2_table1", "cocosnet_v2_table2"):
        assert {f"tables/{t}.md", f"tables/{t}.tex", f"tables/{t}.csv"} <= names
    assert {"index.md", "cells.csv", "pairwise.csv", "runs.csv", "plots/training_spade_deepfashion-hd.png"} <= names
    index = (out / "index.md").read_text()
    assert "6 finished trials: 2 rows x 1 datasets x seeds [0, 1, 2]." in index
    assert "cocosnet/default/deepfashion-hd/s3 (FAILED)" in index
    cells = pd.read_csv(out / "cells.csv")
    row = cells[(cells.table == "summary_quality") & (cells.row_key == "spade/default")].iloc[0]
    assert row["values"] == "30 32 34" and row["paper"] == 34.4
    pair = pd.read_csv(out / "pairwise.csv")
    assert pair[pair.metric == "fid_sources"]["p"].iloc[0] == pytest.approx(0.00366, abs=1e-5)
    logged = {a.path for a in comparison.client.list_artifacts(comparison.parent, "report")}
    assert "report/index.md" in logged and "report/tables" in logged
    assert report_main(["no_such_sweep", "--tracking-uri", comparison.uri, "--workdir", str(tmp_path)]) == 2
