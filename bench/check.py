"""``python -m bench.check --baseline reports/baselines/<name>.yaml RUN_OR_SWEEP``: regression gate.

Compares the final metrics of a sweep's runs (or one run, or a sweep's parent run) with the
expected values of a baseline file, each with a rule and a tolerance, like mmagic's metafile
benchmark tests: ``rule: less`` (lower is better) fails when observed > value + tolerance,
``rule: larger`` fails when observed < value - tolerance. The observed value is the mean over the
entry's finished runs (seeds). Prints a table; exits 1 on a regression or when an expected entry
or metric has no run to compare with, 0 otherwise, 2 on usage errors.

``--update`` writes the baseline from the runs instead: existing entries keep their metrics,
rules and tolerances and get the new values; new (method, variant, dataset) groups get every
quality metric they logged, the rule from the metric's direction and a tolerance of
max(the metric's default, 3 standard errors across seeds).

Baseline format::

    description: what the expected values are for
    sweep: sweeps/quickstart.yaml  # how the runs are made: a sweep file, or the sweep inline (a mapping)
    entries:
      - method: toy
        variant: default
        dataset: embedded-mask
        seeds: [0, 1]              # optional: only these seeds count
        metrics:
          l1: {value: 30.0, rule: less, tolerance: 2.0}      # rel_tolerance: 0.05 also accepted
          psnr: {value: 16.2, rule: larger, tolerance: 0.4}
"""
from __future__ import annotations

import argparse
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pandas as pd
import yaml

from bench import stats
from bench.report.data import (add_columns, canonical_dataset, finished_trials, metric_info, metric_sort_key,
                               resolve_experiment, search_frame, tag)
from bench.tracking import default_tracking_uri

RULES = {"less": "lower", "larger": "higher"}
UPDATE_FAMILIES = ("quality", "semantic", "style", "diversity", "pixel", "warp")  # not cost: hardware-bound
RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class BaselineError(ValueError):
    pass


@dataclass
class Expected:
    metric: str
    value: float
    rule: str  # "less" | "larger"
    tolerance: float  # absolute
    rel_tolerance: float = 0.0  # fraction of |value|; the larger of the two applies

    @property
    def allowed(self) -> float:
        return max(self.tolerance, self.rel_tolerance * abs(self.value))


@dataclass
class Entry:
    method: str
    variant: str
    dataset: str
    metrics: List[Expected]
    seeds: Optional[List[int]] = None

    @property
    def name(self) -> str:
        return f"{self.method}/{self.variant}/{self.dataset}"


@dataclass
class Result:
    entry: str
    metric: str
    rule: str
    expected: float
    tolerance: float
    n: int
    observed: float
    ci95: float
    status: str  # OK, IMPROVED, REGRESSION, MISSING, NOT RUN

    @property
    def delta(self) -> float:
        return self.observed - self.expected

    @property
    def failed(self) -> bool:
        return self.status in ("REGRESSION", "MISSING", "NOT RUN")


# ---- baseline files --------------------------------------------------------------------------
def load_baseline(path: Path) -> Tuple[Dict[str, Any], List[Entry]]:
    """The baseline file; every problem a one-line ``BaselineError`` naming the file and entry."""
    from bench.config import ConfigError
    from bench.yaml_input import read_yaml_file

    try:
        raw, _ = read_yaml_file(path, "baseline file")
    except ConfigError as exc:
        raise BaselineError(str(exc)) from None
    raw = raw or {}
    if not isinstance(raw, dict) or not isinstance(raw.get("entries") or [], list):
        raise BaselineError(f"{path}: a baseline is a mapping with a list 'entries' of "
                            f"{{method, variant, dataset, metrics}} (write one with --update)")
    try:
        return raw, _entries(path, raw)
    except BaselineError:
        raise
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
        raise BaselineError(f"{path}: malformed entry ({type(exc).__name__}: {exc})") from None


def _entries(path: Path, raw: Dict[str, Any]) -> List[Entry]:
    entries = []
    for i, e in enumerate(raw.get("entries") or []):
        where = f"{path}: entries[{i}]"
        if not isinstance(e, dict):
            raise BaselineError(f"{where}: expected a mapping with method, variant, dataset, metrics")
        missing = [k for k in ("method", "variant", "dataset", "metrics") if k not in e]
        if missing:
            raise BaselineError(f"{where}: missing {', '.join(missing)}")
        exp = []
        if not isinstance(e["metrics"], dict):
            raise BaselineError(f"{where}.metrics: expected a mapping metric -> {{value, rule, tolerance}}")
        for m, spec in e["metrics"].items():
            if not isinstance(spec, dict):
                raise BaselineError(f"{where}.metrics.{m}: expected a mapping with value/rule/tolerance")
            rule = spec.get("rule") or _default_rule(m)
            if rule not in RULES:
                raise BaselineError(f"{where}.metrics.{m}: rule {rule!r} must be one of {sorted(RULES)}")
            if "value" not in spec:
                raise BaselineError(f"{where}.metrics.{m}: no value")
            exp.append(Expected(m, float(spec["value"]), rule, float(spec.get("tolerance", 0.0)),
                                float(spec.get("rel_tolerance", 0.0))))
        entries.append(Entry(str(e["method"]), str(e["variant"]), str(e["dataset"]), exp,
                             [int(s) for s in e["seeds"]] if e.get("seeds") is not None else None))
    return entries


def _default_rule(metric: str) -> Optional[str]:
    info = metric_info(metric)
    if info is None:
        return None
    return "less" if info.better == "lower" else "larger"


# ---- runs ------------------------------------------------------------------------------------
def collect_runs(target: str, tracking_uri: str) -> Tuple[pd.DataFrame, str, bool]:
    """(finished trial runs, description, whether target was a whole sweep). ``target``: an MLflow
    run id (a trial run, or a sweep's parent run for its trials), a sweep file or an experiment."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if RUN_ID.match(target):
        try:
            run = client.get_run(target)
        except MlflowException:
            run = None
        if run is not None:
            exp = client.get_experiment(run.info.experiment_id).name
            df = search_frame(exp, tracking_uri)
            parent = tag(df, "mlflow.parentRunId")
            df = df[(df["run_id"] == target) | (parent == target)]
            ok, _ = finished_trials(df)
            whole = run.data.tags.get("bench.role") == "sweep"
            return (add_columns(ok) if not ok.empty else ok), f"run {target} ({exp})", whole
    experiment = resolve_experiment(target)
    if client.get_experiment_by_name(experiment) is None:
        raise LookupError(f"no MLflow run or experiment {target!r} in {tracking_uri}")
    ok, _ = finished_trials(search_frame(experiment, tracking_uri))
    return (add_columns(ok) if not ok.empty else ok), f"experiment {experiment}", True


def _select(runs: pd.DataFrame, method: str, variant: str, dataset: str,
            seeds: Optional[List[int]] = None) -> pd.DataFrame:
    if runs.empty:
        return runs
    sel = runs[(runs["method"] == method) & (runs["variant"] == variant)
               & (runs["dataset"].map(canonical_dataset) == canonical_dataset(dataset))]
    if seeds is not None:
        sel = sel[sel["seed"].isin(seeds)]
    return sel


# ---- the check -------------------------------------------------------------------------------
def compare(entries: List[Entry], runs: pd.DataFrame, whole_sweep: bool) -> List[Result]:
    """One result per (entry, metric). An entry without runs is NOT RUN (a failure) when a whole
    sweep was given; for a single run only the entries it matches are checked."""
    out = []
    for e in entries:
        sel = _select(runs, e.method, e.variant, e.dataset, e.seeds)
        for x in e.metrics:
            if sel.empty:
                if whole_sweep:
                    out.append(Result(e.name, x.metric, x.rule, x.value, x.allowed, 0, math.nan, math.nan, "NOT RUN"))
                continue
            col = f"metrics.{x.metric}"
            vals = sel[col].dropna().tolist() if col in sel.columns else []
            s = stats.summarize(vals)
            if s.n == 0:
                out.append(Result(e.name, x.metric, x.rule, x.value, x.allowed, 0, math.nan, math.nan, "MISSING"))
                continue
            worse = s.mean - x.value if x.rule == "less" else x.value - s.mean  # > 0: worse than expected
            status = "REGRESSION" if worse > x.allowed else "IMPROVED" if -worse > x.allowed else "OK"
            out.append(Result(e.name, x.metric, x.rule, x.value, x.allowed, s.n, s.mean, s.ci95, status))
    return out


def uncovered(entries: List[Entry], runs: pd.DataFrame) -> List[str]:
    """Groups of runs that no baseline entry checks (reported, not failed: e.g. a new variant)."""
    if runs.empty:
        return []
    covered = {(e.method, e.variant, canonical_dataset(e.dataset)) for e in entries}
    groups = runs[["method", "variant", "dataset"]].drop_duplicates()
    return [f"{m}/{v}/{d}" for m, v, d in groups.itertuples(index=False)
            if (m, v, canonical_dataset(d)) not in covered]


def _f(x: float, digits: int = 4) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def render(results: List[Result]) -> str:
    head = ["entry", "metric", "rule", "expected", "tolerance", "observed (mean ± 95% CI)", "n", "delta", "status"]
    body = []
    for r in results:
        obs = _f(r.observed) + (f" ± {_f(r.ci95, 3)}" if math.isfinite(r.ci95) else "")
        d = r.delta if math.isfinite(r.observed) and abs(r.delta) >= 5e-5 else 0.0  # no "-0.0000"
        delta = "-" if not math.isfinite(r.observed) else f"{d:+.4f}"
        body.append([r.entry, r.metric, r.rule, _f(r.expected), _f(r.tolerance, 3), obs, str(r.n), delta, r.status])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(b) for b in body])


# ---- --update --------------------------------------------------------------------------------
def updated_baseline(raw: Dict[str, Any], entries: List[Entry], runs: pd.DataFrame, source: str) -> Dict[str, Any]:
    """The baseline file's content with values from ``runs`` (see the module docstring)."""
    out_entries = []
    seen = set()
    for e, re_raw in zip(entries, raw.get("entries") or []):
        sel = _select(runs, e.method, e.variant, e.dataset, e.seeds)
        seen.add((e.method, e.variant, canonical_dataset(e.dataset)))
        new = dict(re_raw)
        if not sel.empty:
            metrics = {}
            for x in e.metrics:
                spec = dict(re_raw["metrics"][x.metric])
                vals = sel[f"metrics.{x.metric}"].dropna().tolist() if f"metrics.{x.metric}" in sel else []
                if vals:
                    spec["value"] = _round(stats.summarize(vals).mean, x.metric)
                metrics[x.metric] = spec
            new["metrics"] = metrics
        out_entries.append(new)
    if not runs.empty:
        for (m, v, d), grp in runs.groupby(["method", "variant", "dataset"], sort=False):
            if (m, v, canonical_dataset(d)) in seen:
                continue
            metrics = {}
            keys = [c[len("metrics."):] for c in grp.columns if c.startswith("metrics.") and grp[c].notna().any()]
            for k in sorted(keys, key=metric_sort_key):
                info = metric_info(k)
                if info is None or info.family not in UPDATE_FAMILIES:
                    continue
                s = stats.summarize(grp[f"metrics.{k}"].dropna().tolist())
                spread = 3 * s.std / math.sqrt(s.n) if s.n >= 2 else 0.0
                metrics[k] = {"value": _round(s.mean, k), "rule": _default_rule(k),
                              "tolerance": _round(max(info.tolerance, spread), k)}
            if metrics:
                out_entries.append({"method": m, "variant": v, "dataset": d,
                                    "seeds": sorted(int(s) for s in grp["seed"].dropna().unique()),
                                    "metrics": metrics})
    new_raw = {k: val for k, val in raw.items() if k != "entries"}
    new_raw.setdefault("description", f"expected values from {source}")
    new_raw["updated"] = f"{time.strftime('%Y-%m-%d')} from {source}"
    new_raw["entries"] = out_entries
    return new_raw


def _round(x: float, metric: str) -> float:
    info = metric_info(metric)
    return round(float(x), (info.digits if info else 3) + 2)


HEADER = """# Regression baseline for `python -m bench.check` (rules: less = lower is better, larger =
# higher is better; a check fails when the mean over seeds is worse than value by more than
# tolerance). Written by `python -m bench.check --update`; edit tolerances by hand if needed.
"""


def _header(path: Path) -> str:
    """An existing file's leading comment block (its provenance notes), else the standard one."""
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        head = []
        for line in lines:
            if not line.startswith("#"):
                break
            head.append(line)
        if head:
            return "".join(head)
    return HEADER


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help="sweep name (= MLflow experiment), sweep YAML file, or an MLflow run id")
    p.add_argument("--baseline", required=True, help="baseline YAML (reports/baselines/<name>.yaml)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite:///<workdir>/mlflow.db)")
    p.add_argument("--workdir", default=".", help="where mlflow.db is (default: .)")
    p.add_argument("--update", action="store_true", help="write the baseline from the runs instead of checking")
    args = p.parse_args(argv)
    uri = args.tracking_uri or default_tracking_uri(Path(args.workdir).resolve())
    path = Path(args.baseline)
    try:
        raw, entries = load_baseline(path) if path.is_file() or not args.update else ({}, [])
        runs, source, whole = collect_runs(args.target, uri)
    except (LookupError, BaselineError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.update:
        if runs.empty:
            print(f"error: {source} has no finished trial runs to take values from", file=sys.stderr)
            return 2
        content = updated_baseline(raw, entries, runs, source)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_header(path) + yaml.safe_dump(content, sort_keys=False, allow_unicode=True,
                                                default_flow_style=None, width=100))
        n = sum(len(e["metrics"]) for e in content["entries"])
        print(f"wrote {path}: {len(content['entries'])} entries, {n} expected values from {source}")
        return 0
    results = compare(entries, runs, whole)
    print(f"baseline {path} vs {source} ({len(runs)} finished trial runs)")
    print(render(results))
    for g in uncovered(entries, runs):
        print(f"note: {g} has runs but no baseline entry (add one with --update)")
    failed = [r for r in results if r.failed]
    if not results:
        print("FAILED: no baseline entry matches these runs: nothing was compared")
        return 1
    if any(r.status == "NOT RUN" for r in failed) and isinstance(raw.get("sweep"), str):
        print(f"hint: the baseline's runs come from `python -m bench.run {raw['sweep']}`")
    if failed:
        print(f"FAILED: {len(failed)} of {len(results)} checks "
              f"({', '.join(sorted({f'{r.entry} {r.metric} {r.status}' for r in failed}))})")
        return 1
    print(f"passed: {len(results)} checks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
