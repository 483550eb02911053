"""``python -m bench.report SWEEP_OR_EXPERIMENT``: a sweep's tables, plots and figures from MLflow.

Writes ``reports/<sweep>/`` (under ``--workdir``, default .):

  index.md                 everything below in one page (tables inline, plots and figures embedded)
  tables/<id>.{md,tex,csv} summary tables per metric family and, for every published table with a
                           row in the sweep, the paper's layout (reports/published.yaml)
  cells.csv, pairwise.csv  every cell (per-seed values, CI, Holm p vs best) and every pairwise
                           Welch test; runs.csv: one line per finished trial with all its metrics
  plots/                   metric vs a swept option, training curves (PNG + PDF)
  figures/                 qualitative grids per dataset (PNG + PDF)

The same files are logged to the sweep's parent run under ``report/`` so the MLflow UI shows them.

Examples::

    python -m bench.report quickstart
    python -m bench.report sweeps/ablation_v2.yaml --tracking-uri http://127.0.0.1:5000
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional

from bench.report.data import PUBLISHED_FILE, RunSet, load_published, load_runs, resolve_experiment
from bench.report.tables import (Table, cells_frame, paper_tables, pairwise_frame, summary_tables, to_csv, to_latex,
                                 to_markdown)
from bench.tracking import default_tracking_uri

GENERATED = ("tables", "plots", "figures")


def build_report(name: str, tracking_uri: Optional[str] = None, workdir: Path = Path("."),
                 out_dir: Optional[Path] = None, *, published_file: Path = PUBLISHED_FILE,
                 figure_seed: Optional[int] = None, log_to_mlflow: bool = True) -> Path:
    """Build the report of sweep/experiment ``name``; returns the path of its ``index.md``."""
    workdir = Path(workdir)
    experiment = resolve_experiment(name)
    published = load_published(published_file)  # a malformed file is said before any store is opened
    uri = tracking_uri or default_tracking_uri(workdir.resolve())
    out = Path(out_dir) if out_dir is not None else workdir / "reports" / experiment
    out.mkdir(parents=True, exist_ok=True)
    for sub in GENERATED:  # a rebuilt report must not keep tables of rows that are gone
        shutil.rmtree(out / sub, ignore_errors=True)

    runset = load_runs(experiment, uri)
    omitted: List[str] = []
    tables = summary_tables(runset, published) + paper_tables(runset, published, omitted)
    for t in tables:
        d = out / "tables"
        d.mkdir(exist_ok=True)
        (d / f"{t.id}.md").write_text(to_markdown(t))
        (d / f"{t.id}.tex").write_text(to_latex(t))
        (d / f"{t.id}.csv").write_text(to_csv(t))
    cells_frame(tables).to_csv(out / "cells.csv", index=False)
    pairwise_frame([t for t in tables if t.source is None]).to_csv(out / "pairwise.csv", index=False)
    runset.runs.drop(columns=[c for c in runset.runs.columns if c.startswith("_")]).to_csv(out / "runs.csv",
                                                                                          index=False)
    plots: List[Path] = []
    figures: List[Path] = []
    notes: List[str] = []
    if not runset.runs.empty:
        from bench.report.figures import qualitative_figures
        from bench.report.plots import axis_plots, evaluation_curves, training_curves

        plots = (axis_plots(runset, published, out / "plots") + training_curves(runset, out / "plots")
                 + evaluation_curves(runset, out / "plots"))
        figures, notes = qualitative_figures(runset, out / "figures", seed=figure_seed)
    index = out / "index.md"
    index.write_text(render_index(runset, tables, plots, figures, notes, out, omitted))
    if log_to_mlflow and runset.parent_run_id:
        _log(runset, out)
    return index


def render_index(runset: RunSet, tables: List[Table], plots: List[Path], figures: List[Path], notes: List[str],
                 out: Path, omitted: List[str] = ()) -> str:
    df = runset.runs
    lines = [f"# Report: {runset.experiment}", "",
             f"Built {time.strftime('%Y-%m-%d %H:%M:%S')} from MLflow `{runset.tracking_uri}` "
             f"(experiment {runset.experiment_id}, parent run {runset.parent_run_id}).", ""]
    if df.empty:
        lines.append("No finished trial runs: nothing to tabulate.")
    else:
        lines.append(f"{len(df)} finished trials: {df['row'].nunique()} rows x {df['dataset'].nunique()} datasets "
                     f"x seeds {sorted(int(s) for s in df['seed'].dropna().unique())}.")
    warned = df[df["tags.bench.warning"].notna()] if "tags.bench.warning" in df.columns else df.iloc[0:0]
    if len(warned):  # collapse flags (bench.trial): numbers that look fine but come from a degenerate model
        lines += ["", "Warnings (tag `bench.warning`; their numbers are in the tables, read them with care):"]
        lines += [f"- {name}: {why}" for name, why in zip(warned.get("tags.mlflow.runName", warned["run_id"]),
                                                         warned["tags.bench.warning"])]
    if runset.not_finished:
        lines += ["", "Trials without a finished run (left out of every table): "
                  + ", ".join(f"{n} ({s})" for n, s in runset.not_finished) + "."]
    lines += ["", "Files: `tables/` (Markdown, LaTeX booktabs, CSV), `cells.csv`, `pairwise.csv`, `runs.csv`, "
              "`plots/`, `figures/` (PNG + PDF).", ""]
    summaries = [t for t in tables if t.source is None]
    papers = [t for t in tables if t.source is not None]
    if summaries:
        lines += ["## Summary tables", ""]
        for t in summaries:
            lines += [to_markdown(t), f"[LaTeX](tables/{t.id}.tex) · [CSV](tables/{t.id}.csv)", ""]
    if papers or omitted:
        lines += ["## In the papers' layout", ""]
        for t in papers:
            lines += [to_markdown(t), f"[LaTeX](tables/{t.id}.tex) · [CSV](tables/{t.id}.csv)", ""]
        if omitted:
            lines += [f"Not shown: {', '.join(omitted)} (comparison tables with a row of this sweep, but this "
                      "sweep ran none of their datasets; reports/published.yaml has their numbers).", ""]
    pngs = [p for p in plots if p.suffix == ".png"]
    if pngs:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in pngs] + [""]
    figs = [p for p in figures if p.suffix == ".png"]
    if figs or notes:
        lines += ["## Qualitative figures", "",
                  "From each run's `samples/grid.png` (the final model on the first evaluation samples).", ""]
        lines += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in figs]
        lines += [f"- {n}" for n in notes] + [""]
    return "\n".join(lines) + "\n"


def _log(runset: RunSet, out: Path) -> None:
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(runset.tracking_uri).log_artifacts(runset.parent_run_id, str(out), "report")
    except Exception as exc:  # noqa: BLE001 - the files on disk are the report; the upload is a convenience
        print(f"warning: could not log the report to run {runset.parent_run_id}: {exc}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="sweep name (= MLflow experiment) or sweep YAML file")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<workdir>/mlflow.db)")
    p.add_argument("--workdir", default=".", help="where mlflow.db is and reports/ goes (default: .)")
    p.add_argument("--out", help="output directory (default: <workdir>/reports/<sweep>)")
    p.add_argument("--seed", type=int, help="seed of the runs shown in the qualitative figures (default: smallest)")
    p.add_argument("--published", default=str(PUBLISHED_FILE), help="published numbers (default: %(default)s)")
    p.add_argument("--no-mlflow-log", action="store_true", help="do not log the report to the sweep's parent run")
    args = p.parse_args(argv)
    try:
        index = build_report(args.target, tracking_uri=args.tracking_uri, workdir=Path(args.workdir),
                             out_dir=Path(args.out) if args.out else None, published_file=Path(args.published),
                             figure_seed=args.seed, log_to_mlflow=not args.no_mlflow_log)
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {index}")
    return 0


