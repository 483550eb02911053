"""Report plots (matplotlib, PNG + PDF): a metric against the option an ablation sweeps (MIDMs
Table 4's noise level, CoCosNet v2 Table 4's correspondence levels), and training curves per
variant.

The swept option is found from the runs, not hard-coded per sweep: a method option that takes at
least 3 values across variants whose other options are all equal (two values are an on/off
ablation, better read in a table).
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # no display: reports are built by CLIs, tests and Ray drivers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from bench import stats  # noqa: E402
from bench.report.data import (EVAL_PREFIX, FAMILIES, PublishedTable, RunSet, canonical_dataset,  # noqa: E402
                               metric_info, metric_sort_key, row_matches, untrained_split)

OPTION_PREFIX = "params.method_options."
MAX_PLOT_METRICS = 4
MAX_LOSSES = 6


def save(fig, path_stem: Path) -> List[Path]:
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "pdf"):
        p = path_stem.with_suffix(f".{ext}")
        fig.savefig(p, dpi=120, bbox_inches="tight")
        out.append(p)
    plt.close(fig)
    return out


# ---- a metric against a swept option ---------------------------------------------------------
def _parse(v: Any) -> Any:
    """A logged param back to a value: params are str() of the option ("0.25", "(8, 4)", "[8, 4]")."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    try:
        value = ast.literal_eval(str(v))  # Python literals, tuples included (never evaluates code)
    except (ValueError, SyntaxError):
        try:
            value = yaml.safe_load(str(v))
        except yaml.YAMLError:
            value = str(v)
    return list(value) if isinstance(value, tuple) else value


@dataclass
class Axis:
    method: str
    option: str
    variants: List[str]  # ordered along the axis
    x: List[float]
    ticks: List[str]


def _x_of(option: str, value: Any, resolution: Optional[int]) -> Tuple[float, str]:
    """Position and tick label of an option value. ``levels`` (CoCosNet v2) are downsampling
    factors: the tick names the correspondence resolutions, like the paper's "64+128"."""
    if isinstance(value, list):
        if option == "levels" and resolution:
            return float(len(value)), "+".join(str(resolution // int(f)) for f in value)
        return float(len(value)), "+".join(map(str, value))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if option == "noise_level":
            return float(value), f"{value:.0%}"
        return float(value), f"{value:g}"
    raise ValueError(value)


def find_axes(runs: pd.DataFrame) -> List[Axis]:
    axes = []
    opt_cols = [c for c in runs.columns if c.startswith(OPTION_PREFIX)]
    for method, grp in runs.groupby("method", sort=False):
        per_variant = grp.drop_duplicates("variant").set_index("variant")
        if len(per_variant) < 3:
            continue
        opts = {v: {c[len(OPTION_PREFIX):]: _parse(per_variant.at[v, c]) for c in opt_cols} for v in per_variant.index}
        res = {v: _parse(per_variant.at[v, "params.scale.resolution"]) if "params.scale.resolution" in per_variant
               else None for v in per_variant.index}
        names = sorted({k for o in opts.values() for k in o})
        for name in names:
            groups: Dict[str, List[str]] = {}
            for v, o in opts.items():
                rest = yaml.safe_dump({k: val for k, val in o.items() if k != name}, sort_keys=True)
                groups.setdefault(rest, []).append(v)
            best = max(groups.values(), key=lambda vs: (len({yaml.safe_dump(opts[v].get(name)) for v in vs}),
                                                       any(v in ("full", "default") for v in vs)))
            if len({yaml.safe_dump(opts[v].get(name)) for v in best}) < 3:
                continue
            try:
                pts = [(_x_of(name, opts[v].get(name), res[v]), v) for v in best]
            except ValueError:
                continue
            pts.sort(key=lambda p: p[0][0])
            axes.append(Axis(method, name, [v for _, v in pts], [p[0][0] for p in pts], [p[0][1] for p in pts]))
    return axes


def _plot_metrics(runset: RunSet, rows: List[str], first: Sequence[str] = ()) -> List[str]:
    """Up to MAX_PLOT_METRICS headline metrics the rows logged; ``first`` (the published table's
    metrics) lead, so the plot shows what the paper's table shows."""
    df = runset.runs[runset.runs["row"].isin(rows)]
    keys = [k for k in runset.metric_columns() if df[f"metrics.{k}"].notna().any()]
    headline = sorted((k for k in keys if metric_info(k).family in {f for f, _ in FAMILIES}
                       and metric_info(k).family != "cost"), key=metric_sort_key)
    lead = [k for k in first if k in headline]
    return (lead + [k for k in headline if k not in lead])[:MAX_PLOT_METRICS]


def _published_for(published: Sequence[PublishedTable], method: str, variants: List[str]) -> Optional[PublishedTable]:
    """The published table whose rows cover the most of these variants (at least 2)."""
    best, hits = None, 1
    for t in published:
        n = sum(any(row_matches(k, method, v) for k in t.rows) for v in variants)
        if n > hits:
            best, hits = t, n
    return best


def axis_plots(runset: RunSet, published: Sequence[PublishedTable], out_dir: Path) -> List[Path]:
    written = []
    df = runset.runs
    for ax_spec in find_axes(df):
        rows = [f"{ax_spec.method}/{v}" for v in ax_spec.variants]
        pt = _published_for(published, ax_spec.method, ax_spec.variants)
        metrics = _plot_metrics(runset, rows, pt.metrics if pt else ())
        if not metrics:
            continue
        fig, axs = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
        for ax, metric in zip(axs[0], metrics):
            info = metric_info(metric)
            for ds in dict.fromkeys(df["dataset"]):
                ys, lo = [], []
                for row in rows:
                    vals = df.loc[(df["row"] == row) & (df["dataset"] == ds), f"metrics.{metric}"].dropna()
                    s = stats.summarize(vals.tolist())
                    ys.append(s.mean)
                    lo.append(0.0 if math.isnan(s.ci95) else s.ci95)
                if all(math.isnan(y) for y in ys):
                    continue
                sel = df[df["row"].isin(rows) & (df["dataset"] == ds)]
                random_init = info.source and any(u.split(".", 1)[0] == info.source for t in sel["untrained"]
                                                  for u in untrained_split(t)[0])
                note = ", untrained backbone: not comparable" if random_init else ""
                ax.errorbar(ax_spec.x, ys, yerr=lo, marker="o", capsize=3, label=f"{ds} (ours{note})")
                if pt is not None:
                    method = ax_spec.method
                    py = []
                    for v in ax_spec.variants:
                        key = next((k for k in pt.rows if row_matches(k, method, v)), None)
                        val = pt.value(key, canonical_dataset(ds), metric) if key else None
                        py.append(np.nan if val is None else val)
                    if not all(np.isnan(py)):
                        ax.plot(ax_spec.x, py, "k--", marker="s", label=f"{ds} ({pt.source})")
            ax.set_xticks(ax_spec.x, ax_spec.ticks)
            ax.set_xlabel(ax_spec.option)
            ax.set_ylabel(f"{info.label} {info.arrow}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        where = f" ({pt.source})" if pt else ""
        fig.suptitle(f"{ax_spec.method}: metric vs {ax_spec.option}{where}; mean ± 95 % CI over seeds")
        fig.tight_layout()
        written += save(fig, out_dir / f"{ax_spec.method}_vs_{ax_spec.option}")
    return written


# ---- training curves -------------------------------------------------------------------------
def _loss_keys(keys: List[str]) -> List[str]:
    """Totals first (what the progress line shows), then the rest alphabetically."""
    totals = [k for k in keys if "total" in k.lower() or k == "loss"]
    return (sorted(totals) + sorted(k for k in keys if k not in totals))[:MAX_LOSSES]


def histories(runset: RunSet, run_ids: Sequence[str], keys: Sequence[str]) -> Dict[Tuple[str, str], pd.Series]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(runset.tracking_uri)
    out = {}
    for rid in run_ids:
        for k in keys:
            hist = client.get_metric_history(rid, k)
            if hist:
                s = pd.Series({m.step: m.value for m in hist}).sort_index()
                out[(rid, k)] = s
    return out


def training_curves(runset: RunSet, out_dir: Path) -> List[Path]:
    """One figure per (method, dataset): a panel per loss, a line per variant (mean over seeds,
    shaded min-max across seeds)."""
    return _curves(runset, out_dir, lambda cols: _loss_keys(cols), runset.loss_columns(), "Training curves",
                   "training")


def evaluation_curves(runset: RunSet, out_dir: Path) -> List[Path]:
    """The periodic evaluations (``eval.every``: metrics logged as ``eval/<metric>`` at their step),
    laid out like the training curves."""
    cols = [c[len("metrics."):] for c in runset.runs.columns if c.startswith(f"metrics.{EVAL_PREFIX}")]
    cols = [c for c in cols if metric_info(c[len(EVAL_PREFIX):]) is not None]
    pick = lambda keys: sorted(keys, key=lambda k: metric_sort_key(k[len(EVAL_PREFIX):]))[:MAX_LOSSES]  # noqa: E731
    return _curves(runset, out_dir, pick, cols, "Metrics during training", "evaluation")


def _curves(runset: RunSet, out_dir: Path, pick, columns: List[str], title: str, stem: str) -> List[Path]:
    df = runset.runs
    written = []
    for (method, ds), grp in df.groupby(["method", "dataset"], sort=False):
        cols = [c for c in columns if grp[f"metrics.{c}"].notna().any()]
        keys = pick(cols)
        if not keys:
            continue
        hist = histories(runset, grp["run_id"].tolist(), keys)
        ncols = min(3, len(keys))
        nrows = math.ceil(len(keys) / ncols)
        fig, axs = plt.subplots(nrows, ncols, figsize=(3.8 * ncols, 2.9 * nrows + 0.4), squeeze=False)
        for ax in axs.flat[len(keys):]:
            ax.set_visible(False)
        for ax, k in zip(axs.flat, keys):
            for variant, vg in grp.groupby("variant", sort=False):
                series = [hist[(rid, k)] for rid in vg["run_id"] if (rid, k) in hist]
                if not series:
                    continue
                frame = pd.concat(series, axis=1)
                mean = frame.mean(axis=1)
                line, = ax.plot(mean.index, mean.values, label=f"{variant} (n={len(series)})",
                                marker="o" if stem == "evaluation" else None, markersize=3)
                if len(series) > 1:
                    ax.fill_between(frame.index, frame.min(axis=1), frame.max(axis=1), alpha=0.2,
                                    color=line.get_color())
            ax.set_title(k, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axs[0][0].legend(fontsize=7)
        fig.suptitle(f"{title}: {method} on {ds} (mean over seeds, band = min-max)")
        fig.tight_layout()
        written += save(fig, out_dir / f"{stem}_{method}_{ds}")
    return written
