"""What reports and regression checks read: the metric catalogue, the published numbers, and a
sweep's runs from MLflow as one pandas frame (one row per finished trial).

MLflow is the source of truth (bench/tracking.py conventions): an experiment per sweep, a child
run per trial tagged ``bench.role=trial`` with ``bench.method/variant/dataset/seed/status``, the
final evaluation metrics at the last step, losses as metric histories.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[2]
PUBLISHED_FILE = REPO_ROOT / "reports" / "published.yaml"


# ---- metric catalogue ------------------------------------------------------------------------
@dataclass(frozen=True)
class MetricInfo:
    label: str  # column header
    better: str  # "lower" or "higher"
    tolerance: float  # default absolute tolerance of a new baseline entry (mmagic-style)
    digits: int  # decimals shown in tables
    source: Optional[str]  # the registered metric that computes it (its backbone provenance), None: no network
    family: str  # which summary table it belongs to

    @property
    def arrow(self) -> str:
        return "↓" if self.better == "lower" else "↑"


_PIXEL = {"l1": ("L1", "lower", 1.0, 2), "psnr": ("PSNR", "higher", 0.1, 2), "ssim": ("SSIM", "higher", 0.01, 3)}
_FIXED: Dict[str, MetricInfo] = {
    **{k: MetricInfo(lab, b, tol, d, None, "pixel") for k, (lab, b, tol, d) in _PIXEL.items()},
    "fid_sources": MetricInfo("FID", "lower", 0.5, 2, "fid_sources", "quality"),
    "swd": MetricInfo("SWD", "lower", 0.5, 2, None, "quality"),
    "kid_sources": MetricInfo("KID", "lower", 0.001, 4, "kid_sources", "quality"),
    "fid_exemplars": MetricInfo("FID (exemplars)", "lower", 0.5, 2, "fid_exemplars", "quality"),
    "kid_exemplars": MetricInfo("KID (exemplars)", "lower", 0.001, 4, "kid_exemplars", "quality"),
    "lpips_gt": MetricInfo("LPIPS (GT)", "lower", 0.01, 3, "lpips_gt", "quality"),
    "lpips_diversity": MetricInfo("LPIPS (diversity)", "higher", 0.01, 3, "lpips_diversity", "diversity"),
    "sem_consistency": MetricInfo("Semantic consistency", "higher", 0.005, 3, "sem_consistency", "semantic"),
    "sem_consistency_global": MetricInfo("Sem. consistency (global)", "higher", 0.005, 3,
                                         "sem_consistency_global", "semantic_extra"),
    "style_color": MetricInfo("Color", "higher", 0.005, 3, "style_relevance", "style"),
    "style_texture": MetricInfo("Texture", "higher", 0.005, 3, "style_relevance", "style"),
    "style_color_global": MetricInfo("Color (global)", "higher", 0.005, 3, "style_relevance_global", "style_extra"),
    "style_texture_global": MetricInfo("Texture (global)", "higher", 0.005, 3, "style_relevance_global",
                                       "style_extra"),
    # Cost (bench/trial.py): hardware-dependent, so tabulated but never put in a baseline by --update.
    "train_seconds": MetricInfo("Train s", "lower", 0.0, 2, None, "cost"),
    "eval_seconds": MetricInfo("Eval s", "lower", 0.0, 2, None, "cost"),
    "peak_rss_mb": MetricInfo("Peak RSS MB", "lower", 0.0, 0, None, "cost"),
    "peak_gpu_mb": MetricInfo("Peak GPU MB", "lower", 0.0, 0, None, "cost"),
}
_PATTERNS: List[Tuple[re.Pattern, Any]] = [
    # warp_<l1|psnr|ssim>_l<res> (bench/metrics/pixel.py) and the derived _finest (see add_derived)
    (re.compile(r"warp_(l1|psnr|ssim)_(l\d+|finest)$"),
     lambda m: MetricInfo(f"Warp {_PIXEL[m[1]][0]}" + ("" if m[2] == "finest" else f" @{m[2][1:]}"),
                          _PIXEL[m[1]][1], _PIXEL[m[1]][2], _PIXEL[m[1]][3], None,
                          "warp" if m[2] == "finest" else "warp_levels")),
    (re.compile(r"swd_l(\d+)$"), lambda m: MetricInfo(f"SWD @{m[1]}", "lower", 0.5, 2, None, "quality_extra")),
    (re.compile(r"sem_consistency(_global)?_(relu\d_\d)$"),
     lambda m: MetricInfo(f"Sem. {m[2]}" + (" (global)" if m[1] else ""), "higher", 0.005, 3,
                          "sem_consistency" + (m[1] or ""), "semantic_extra")),
]
# The summary tables of a sweep, in the papers' grouping (CoCosNet v2 Tables 1/2/3, Tables 4-5).
FAMILIES = [("quality", "Image quality"), ("semantic", "Semantic consistency"), ("style", "Style relevance"),
            ("diversity", "Diversity"), ("pixel", "Output vs ground truth"), ("warp", "Warp accuracy (finest level)"),
            ("cost", "Cost (this machine)")]
FAMILY_ORDER = {  # column order inside a family
    "quality": ["fid_sources", "swd", "kid_sources", "lpips_gt", "fid_exemplars", "kid_exemplars"],
    "style": ["style_color", "style_texture"],
    "pixel": ["l1", "psnr", "ssim"],
    "warp": ["warp_l1_finest", "warp_psnr_finest", "warp_ssim_finest"],
    "cost": ["train_seconds", "eval_seconds", "peak_rss_mb", "peak_gpu_mb"],
}
# Logged with the losses but not losses: throughput (bench/trial.py), or anything named like it.
THROUGHPUT = re.compile(r"(_per_s|_per_step|_seconds|_mb)$")
EVAL_PREFIX = "eval/"  # periodic evaluations (eval.every): curves, not final results
DIAGNOSTICS = ("exemplar_l1",)  # logged by every evaluation for the collapse checks, not a table metric


def metric_info(key: str) -> Optional[MetricInfo]:
    """The catalogue entry of an evaluation metric key, None for losses and timings."""
    if key in _FIXED:
        return _FIXED[key]
    for pat, make in _PATTERNS:
        m = pat.match(key)
        if m:
            return make(m)
    return None


FAMILY_RANK = {f: i for i, (f, _) in enumerate(FAMILIES)}


def metric_sort_key(key: str) -> Tuple[int, int, str]:
    """Families in table order, then the papers' column order inside a family, then by name."""
    info = metric_info(key)
    family = info.family if info else ""
    order = FAMILY_ORDER.get(family, [])
    return (FAMILY_RANK.get(family, len(FAMILY_RANK)), order.index(key) if key in order else len(order), key)


METRIC_SOURCES = {i.source for i in _FIXED.values() if i.source} | {"sem_consistency_global", "warp", "swd"}


def untrained_split(tag: str) -> Tuple[List[str], List[str]]:
    """``bench.untrained_backbones`` -> (metric backbones "fid_sources.inception", training backbones
    "vgg19_loss"). Metric entries are "<registered metric>.<network>" (bench/trial.py)."""
    items = [s for s in (tag or "").split(",") if s and s != "none"]
    metric = [s for s in items if s.split(".", 1)[0] in METRIC_SOURCES]
    return metric, [s for s in items if s not in metric]


# ---- published numbers -----------------------------------------------------------------------
@dataclass
class PublishedTable:
    id: str
    paper: str  # short citation, e.g. "CoCosNet v2 (Zhou et al., CVPR 2021)"
    table: str  # "Table 1"
    caption: str
    metrics: List[str]
    datasets: List[str]
    rows: Dict[str, Dict[str, Any]]  # row key -> {label, values: {dataset: [value per metric]}}
    note: str = ""

    @property
    def source(self) -> str:
        return f"{self.paper}, {self.table}"

    def value(self, row_key: str, dataset: str, metric: str) -> Optional[float]:
        row = self.rows.get(row_key)
        if row is None or metric not in self.metrics:
            return None
        vals = (row.get("values") or {}).get(dataset)
        if not vals:
            return None
        v = vals[self.metrics.index(metric)]
        return None if v is None else float(v)


class PublishedError(LookupError):
    """The published-numbers file is unreadable or malformed (one line naming it)."""


def load_published(path: Path = PUBLISHED_FILE) -> List[PublishedTable]:
    from bench.config import ConfigError
    from bench.yaml_input import read_yaml_file

    try:
        raw, _ = read_yaml_file(path, "published tables file")
        if not isinstance(raw, dict):
            raise PublishedError(f"{path}: expected a mapping with 'papers' and 'tables'")
        return _published_tables(path, raw)
    except ConfigError as exc:
        raise PublishedError(str(exc)) from None
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        raise PublishedError(f"{path}: malformed ({type(exc).__name__}: {exc})") from None


def _published_tables(path: Path, raw: dict) -> List[PublishedTable]:
    papers = raw.get("papers", {})
    out = []
    for t in raw.get("tables", []):
        p = papers[t["paper"]]
        for key, row in t["rows"].items():
            for ds, vals in (row.get("values") or {}).items():
                if len(vals) != len(t["metrics"]):
                    raise PublishedError(f"{path}: table {t['id']} row {key} dataset {ds}: {len(vals)} values for "
                                     f"{len(t['metrics'])} metrics {t['metrics']}")
        out.append(PublishedTable(id=t["id"], paper=f"{p['short']} ({p['cite']})", table=t["table"],
                                  caption=t.get("caption", ""), metrics=list(t["metrics"]),
                                  datasets=list(t["datasets"]), rows=dict(t["rows"]), note=t.get("note", "")))
    return out


def row_matches(published_key: str, method: str, variant: str) -> bool:
    """A published row "<method>" stands for the method as published (our variant "default" or
    "full"); "<method>/<variant>" names one ablation row."""
    if "/" in published_key:
        return published_key == f"{method}/{variant}"
    return published_key == method and variant in ("default", "full")


_DEFAULT_VARIANT_CACHE: Dict[str, Optional[str]] = {}


def canonical_dataset(label: str) -> str:
    """"celebahq" (a sweep that did not name the variant) -> "celebahq-edge" (its default), so
    published numbers match however the sweep spelled the dataset."""
    name, _, variant = label.partition("-")
    if variant:
        return label
    if name not in _DEFAULT_VARIANT_CACHE:
        try:
            import datasets  # noqa: F401  (registers every dataset)
            from datasets.registry import DATASETS

            _DEFAULT_VARIANT_CACHE[name] = DATASETS.get(name).variants[0]
        except Exception:  # noqa: BLE001 - an unknown (plugin) dataset keeps its label
            _DEFAULT_VARIANT_CACHE[name] = None
    default = _DEFAULT_VARIANT_CACHE[name]
    return f"{name}-{default}" if default else label


# ---- runs ------------------------------------------------------------------------------------
@dataclass
class RunSet:
    experiment: str
    experiment_id: Optional[str]
    tracking_uri: str
    runs: pd.DataFrame  # one row per finished trial (newest run of each trial key)
    not_finished: List[Tuple[str, str]]  # (run name, bench.status) of trials without a finished run
    parent_run_id: Optional[str]

    def metric_columns(self) -> List[str]:
        keys = [c[len("metrics."):] for c in self.runs.columns if c.startswith("metrics.")]
        keys = [k for k in keys if metric_info(k) is not None and self.runs[f"metrics.{k}"].notna().any()]
        return sorted(keys, key=metric_sort_key)

    def loss_columns(self) -> List[str]:
        keys = [c[len("metrics."):] for c in self.runs.columns if c.startswith("metrics.")]
        return [k for k in keys if metric_info(k) is None and not THROUGHPUT.search(k)
                and not k.startswith(EVAL_PREFIX) and k not in DIAGNOSTICS]


def search_frame(experiment: str, tracking_uri: str, filter_string: str = "") -> pd.DataFrame:
    """``mlflow.search_runs`` against an explicit store, leaving the global tracking URI as it was."""
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        return mlflow.search_runs(experiment_names=[experiment], filter_string=filter_string,
                                  max_results=100000, output_format="pandas")
    finally:
        mlflow.set_tracking_uri(previous)


def tag(df: pd.DataFrame, name: str) -> pd.Series:
    col = f"tags.{name}"
    return df[col] if col in df.columns else pd.Series([None] * len(df), index=df.index, dtype=object)


def finished_trials(df: pd.DataFrame) -> Tuple[pd.DataFrame, List[Tuple[str, str]]]:
    """Keep the newest FINISHED run per trial key; list the trials that have none."""
    if df.empty:
        return df, []
    df = df[tag(df, "bench.role") == "trial"].copy()
    if df.empty:
        return df, []
    df["_key"] = tag(df, "bench.trial_key").fillna(df["run_id"])
    df["_status"] = tag(df, "bench.status").fillna(df["status"])
    df = df.sort_values("start_time", ascending=False)
    ok = df[(df["_status"] == "FINISHED") & (df["status"] == "FINISHED")].drop_duplicates("_key")
    ok = ok.sort_values("start_time")  # the sweep's grid order (method, variant, dataset, seed)
    missing = df[~df["_key"].isin(set(ok["_key"]))].drop_duplicates("_key")
    names = tag(missing, "mlflow.runName").fillna(missing["run_id"])
    not_finished = sorted(zip(names, missing["_status"]))
    return ok, not_finished


def add_columns(df: pd.DataFrame) -> pd.DataFrame:
    """The fields tables group by (method, variant, dataset, seed) and derived metrics."""
    df = df.copy()
    df["method"] = tag(df, "bench.method").fillna(df.get("params.method"))
    df["variant"] = tag(df, "bench.variant").fillna(df.get("params.variant"))
    df["dataset"] = tag(df, "bench.dataset").fillna("?")
    df["seed"] = pd.to_numeric(tag(df, "bench.seed").fillna(df.get("params.seed")), errors="coerce")
    df["row"] = df["method"].astype(str) + "/" + df["variant"].astype(str)
    df["untrained"] = tag(df, "bench.untrained_backbones").fillna("none")
    df["weights"] = tag(df, "bench.init_from.kind").fillna("trained")  # official | run | file | trained
    return add_derived(df)


def add_derived(df: pd.DataFrame) -> pd.DataFrame:
    """``warp_<k>_finest``: each run's warp metric at its largest level, the full-resolution warp
    CoCosNet v2 Tables 4-5 score (a variant with fewer levels is scored at its finest one)."""
    for k in ("l1", "psnr", "ssim"):
        cols = {int(c.rsplit("_l", 1)[1]): c for c in df.columns if re.fullmatch(rf"metrics\.warp_{k}_l\d+", c)}
        if not cols:
            continue
        finest = []
        for _, r in df.iterrows():
            present = [lvl for lvl, c in cols.items() if pd.notna(r[c])]
            finest.append(r[cols[max(present)]] if present else math.nan)
        df[f"metrics.warp_{k}_finest"] = finest
    return df


def resolve_experiment(target: str) -> str:
    """A sweep file -> its ``name``; anything else is an experiment name."""
    from bench.config import ConfigError
    from bench.yaml_input import read_yaml_file

    p = Path(target)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        try:
            raw, _ = read_yaml_file(p, "sweep file")
        except ConfigError as exc:
            raise LookupError(str(exc)) from None
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise LookupError(f"{p}: a sweep file needs a 'name' (the MLflow experiment)")
        return raw["name"]
    return target


def add_evaluations(trials: pd.DataFrame, df: pd.DataFrame) -> pd.DataFrame:
    """Metrics that ``python -m bench.eval`` added to a trial (FINISHED runs tagged
    ``bench.evaluates=<trial run id>``, newest first) fill that trial's missing metric columns; the
    trial's own values are kept."""
    evals = df[(tag(df, "bench.role") == "evaluation") & (df["status"] == "FINISHED")]
    if evals.empty:
        return trials
    trials = trials.copy()
    evals = evals.sort_values("start_time", ascending=False)
    by_source = {src: grp for src, grp in evals.groupby(tag(evals, "bench.evaluates"))}
    cols = [c for c in evals.columns if c.startswith("metrics.")]
    for i, rid in zip(trials.index, trials["run_id"]):
        grp = by_source.get(rid)
        if grp is None:
            continue
        for c in cols:
            have = c in trials.columns and pd.notna(trials.at[i, c])
            values = grp[c].dropna()
            if not have and len(values):
                trials.loc[i, c] = values.iloc[0]
    return trials


def load_runs(experiment: str, tracking_uri: str) -> RunSet:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LookupError(f"no MLflow experiment {experiment!r} in {tracking_uri}")
    df = search_frame(experiment, tracking_uri)
    parents = df[tag(df, "bench.role") == "sweep"] if not df.empty else df
    parent_id = parents.sort_values("start_time").iloc[-1]["run_id"] if len(parents) else None
    finished, not_finished = finished_trials(df)
    if not finished.empty:
        finished = add_evaluations(finished, df)
        finished = add_columns(finished)
    return RunSet(experiment, exp.experiment_id, tracking_uri, finished.reset_index(drop=True), not_finished,
                  parent_id)
