"""Preflight: every reason a sweep's trials cannot run, found in the driver in seconds, before Ray
starts and before anything is written to MLflow.

Per trial family (method x variant x dataset; seeds share everything checked here):

- the data: each split the trial reads is opened as the trial would open it, on a bounded sample of
  its files (``SAMPLE_FILES``: the root, the split lists and the files they name, the conditions
  the variant needs);
- the method: built as the trial builds it, but on the meta device (no memory, no weights read) and
  with ``find_weights`` probing (``methods.common.weights.probe_weights``), so its own option checks
  against the resolution, width and dataset run, and every weights file it would load is named;
- the metrics: built the same way (their backbones' files), and metrics the dataset or method
  cannot support are reported up front (the trial would skip them);
- ``init_from`` checkpoints exist;
- resources: a trial's cpu/gpu (x workers) fit the machine or the attached cluster.

Everything is collected and printed at once, grouped by family, naming the sweep file, line and key
or the file on disk, with the fix where there is an obvious one.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from bench.sweep import TrialConfig

SAMPLE_FILES = 16  # samples per split whose files are opened and checked (a bounded sample)
DOCS_DATASETS = "docs/datasets.md"


@dataclass
class Problem:
    family: str  # "method/variant on dataset", or "all trials"
    what: str  # data | method | weights | metric | init_from | resources
    message: str
    where: str = ""  # "sweep.yaml:12 resources.gpu" or a file on disk
    fix: str = ""


@dataclass
class Verdict:
    problems: List[Problem] = field(default_factory=list)  # the sweep cannot run as it is
    notes: List[Problem] = field(default_factory=list)  # it runs, but the user should know
    checked: List[str] = field(default_factory=list)  # one line per family: what was found

    @property
    def ok(self) -> bool:
        return not self.problems

    def report(self, sweep_file: str) -> str:
        lines = []
        if self.checked:
            lines.append("preflight:")
            lines += [f"  {c}" for c in self.checked]
        for title, items in (("cannot run", self.problems), ("notes", self.notes)):
            if not items:
                continue
            groups = _grouped(items)
            n = sum(len(g) for g in groups.values())
            noun = ("problem" if title == "cannot run" else "note") + ("s" if n != 1 else "")
            lines.append(f"preflight: {n} {noun} in {sweep_file}" + (" (the sweep cannot run as it is):"
                                                                      if title == "cannot run" else ":"))
            for families, group in groups.items():
                lines.append(f"  {families}:")
                for p in group:
                    at = f" [{p.where}]" if p.where else ""
                    body = p.message.replace("\n", "\n      ")
                    lines.append(f"    - {p.what}: {body}{at}")
                    if p.fix:
                        lines.append(f"      fix: {p.fix}")
        if self.ok:
            lines.append("preflight: every trial can start")
        return "\n".join(lines)


def _grouped(items: Sequence[Problem]) -> Dict[str, List[Problem]]:
    """The same problem in several families is printed once, under all of them."""
    families_of: Dict[Tuple, List[str]] = OrderedDict()
    first: Dict[Tuple, Problem] = {}
    for p in items:
        key = (p.what, p.message, p.where, p.fix)
        first.setdefault(key, p)
        fams = families_of.setdefault(key, [])
        if p.family not in fams:
            fams.append(p.family)
    out: Dict[str, List[Problem]] = OrderedDict()
    for key, fams in families_of.items():
        out.setdefault(_family_list(fams), []).append(first[key])
    return out


def _family_list(families: Sequence[str]) -> str:
    """"a/x on d", "b/x on d" -> "a/x, b/x on d" (families on one dataset folded)."""
    by_dataset: Dict[str, List[str]] = OrderedDict()
    for f in families:
        head, sep, dataset = f.partition(" on ")
        by_dataset.setdefault(dataset if sep else "", []).append(head)
    return "; ".join(f"{', '.join(heads)} on {d}" if d else ", ".join(heads) for d, heads in by_dataset.items())


def family_of(t: TrialConfig) -> str:
    return f"{t.method}/{t.variant} on {t.dataset_label}"


class Locator:
    """'file:line dotted.key' for a key path of the sweep file (as written; overrides and profiles
    are named by what the user typed)."""

    def __init__(self, sweep_file: str, line_of: Optional[Callable] = None, spec=None):
        self.file, self.line_of, self.spec = sweep_file, line_of or (lambda path: None), spec

    def __call__(self, path: Sequence) -> str:
        line = self.line_of(list(path))
        dotted = ".".join(str(p) for p in path)
        return f"{self.file}:{line} {dotted}" if line else f"{self.file} {dotted}"

    def dataset(self, t: TrialConfig, key: str) -> str:
        """The trial's dataset entry's ``key`` (its index in the sweep's datasets list)."""
        ds = list(getattr(self.spec, "datasets", None) or [])
        i = next((i for i, d in enumerate(ds) if d.name == t.dataset.name
                  and d.variant in (None, t.dataset.variant)), None)
        return self(["datasets", i, key] if i is not None else ["datasets"])

    def method(self, t: TrialConfig, key: str) -> str:
        ms = list(getattr(self.spec, "methods", None) or [])
        i = next((i for i, m in enumerate(ms) if m.name == t.method), None)
        return self(["methods", i, key] if i is not None else ["methods"])


# ---- the checks --------------------------------------------------------------------------------
def preflight(spec, trials: Sequence[TrialConfig], sweep_file: str = "<sweep>", line_of: Optional[Callable] = None,
              tracking_uri: Optional[str] = None, resources: Optional[Dict[str, float]] = None) -> Verdict:
    """Check every trial of ``spec`` (a ``SweepSpec``); ``resources``: what the cluster offers
    ({"CPU": n, "GPU": m}), None to leave resources to ``check_resources`` (an attached cluster is
    asked after connecting)."""
    import datasets  # noqa: F401  (registers the loaders)
    import methods  # noqa: F401
    from bench.plugins import load_plugins

    load_plugins()
    with warnings.catch_warnings():
        # Building on the meta device: "copying from a non-meta parameter ... is a no-op" and the like.
        warnings.simplefilter("ignore")
        return _preflight(spec, trials, sweep_file, line_of, tracking_uri, resources)


def _preflight(spec, trials, sweep_file, line_of, tracking_uri, resources) -> Verdict:
    loc = Locator(sweep_file, line_of, spec)
    has_smoke = "smoke" in (spec.profiles or {})
    verdict = Verdict()
    families: Dict[str, List[TrialConfig]] = OrderedDict()
    for t in trials:
        families.setdefault(family_of(t), []).append(t)
    data_memo: Dict[Tuple, object] = {}
    metric_use: Dict[str, List[str]] = OrderedDict()  # metric -> families that compute it
    incomplete = False  # some family could not be checked as far as its metrics
    weights_seen: Dict[str, object] = {}
    for family, members in families.items():
        t = members[0]
        infos = _check_data(t, family, loc, verdict, data_memo, has_smoke)
        if infos is None:
            incomplete = True
            continue  # without data the method cannot be built (it is sized from the data)
        train_info, eval_info = infos
        has_warp = _check_method(t, family, train_info or eval_info, verdict, weights_seen)
        incomplete |= has_warp is None
        if has_warp is not None:
            _check_metrics(t, family, eval_info, has_warp, loc, verdict, weights_seen, metric_use)
        verdict.checked.append(f"{family}: {len(members)} trial{'s' if len(members) != 1 else ''}; data "
                               + ", ".join(f"{split} {info.params.get('listed', info.size)}"
                                           for split, info in (("train", train_info), ("eval", eval_info)) if info))
    for name, users in metric_use.items():
        if not users and not incomplete and not any("all" in t.eval.metrics for t in trials):
            verdict.problems.append(Problem("all trials", "metric", f"{name} applies to none of the sweep's trials",
                                            loc(["eval", "metrics"]), f"drop {name} from eval.metrics"))
    _check_init_from(trials, tracking_uri, loc, verdict)
    _resolve_weights(weights_seen, verdict)
    if resources is not None:
        verdict.problems += check_resources(trials, resources, loc, "this machine")
    return verdict


def _check_data(t: TrialConfig, family: str, loc: Locator, verdict: Verdict, memo, has_smoke: bool):
    """(train DataInfo or None, eval DataInfo), or None when a split cannot be opened."""
    from datasets.registry import DATASETS

    spec = t.dataset
    cap = SAMPLE_FILES if spec.max_samples is None else min(spec.max_samples, SAMPLE_FILES)
    bounded = dataclasses.replace(spec, max_samples=cap)
    splits = ([("train", spec.train_split)] if t.train.steps > 0 else []) + [("eval", spec.eval_split)]
    infos = {}
    for role, split in splits:
        key = (repr(bounded), split, t.scale.resolution)
        if key not in memo:
            try:
                ds = DATASETS.get(spec.name)(bounded, split, t.scale.resolution, t.seed)
                memo[key] = ds.info
            except Exception as exc:  # noqa: BLE001 - every loader error is a user-facing message
                memo[key] = exc
        got = memo[key]
        if isinstance(got, Exception):
            fixes = [f"see {DOCS_DATASETS}#{spec.name}"] if spec.name != "embedded" else []
            if has_smoke and spec.name != "embedded":
                fixes.insert(0, "--profile smoke runs the sweep on the embedded dataset")
            root = f"dataset root {spec.root}" if spec.root else "dataset (no root set)"
            verdict.problems.append(Problem(family, "data", f"{split} split: {_one_line(got)}",
                                            f"{loc.dataset(t, 'root')} ({root})", "; ".join(fixes)))
            return None
        infos[role] = got
    return infos.get("train"), infos["eval"]


def _check_method(t: TrialConfig, family: str, info, verdict: Verdict, weights_seen) -> Optional[bool]:
    """Build the method on the meta device with weights probed; its has_warp, or None on failure."""
    from bench.trial import build_method  # the trial's own construction, here on the meta device
    from methods.common.weights import probe_weights

    try:
        with probe_weights() as requests, torch.device("meta"):
            method = build_method(t, info, torch.device("meta"))
        has_warp = bool(method.has_warp)
        del method
    except Exception as exc:  # noqa: BLE001 - the method's own option checks, as the trial would see them
        verdict.problems.append(Problem(family, "method", _one_line(exc),
                                        f"{t.method} options at scale.resolution {t.scale.resolution}, "
                                        f"scale.width {t.scale.width}"))
        return None
    _record_weights(weights_seen, requests, family, "train")
    return has_warp


def _check_metrics(t: TrialConfig, family: str, info, has_warp: bool, loc: Locator, verdict: Verdict,
                   weights_seen, metric_use: Dict[str, List[str]]) -> None:
    from bench.evaluate import select_metrics
    from bench.trial import build_trial_metrics, TrialEnv
    from methods.common.weights import probe_weights

    names, skipped = select_metrics(t.eval.metrics, info, has_warp)
    for name in names:
        metric_use.setdefault(name, []).append(family)
    for name, reason in skipped.items():
        metric_use.setdefault(name, [])
        if "all" not in t.eval.metrics:  # with "all", leaving out what does not apply is the request
            verdict.notes.append(Problem(family, "metric", f"{name} is skipped: {reason}", loc(["eval", "metrics"])))
    env = TrialEnv(tracking_uri="", experiment_id="", parent_run_id="", cache_dir=os.devnull)
    for name in names:
        try:
            with probe_weights() as requests, torch.device("meta"):
                build_trial_metrics(t, [name], _SizedInfo(info), torch.device("meta"), env)
        except Exception as exc:  # noqa: BLE001
            verdict.problems.append(Problem(family, "metric", f"{name}: {_one_line(exc)}",
                                            loc(["eval", "metric_options", name])))
            continue
        _record_weights(weights_seen, requests, family, "eval")


def _record_weights(seen, requests, family: str, section: str) -> None:
    """filename -> (the strictest request for it, {family: sweep section that can opt out}). A
    lenient look-up (e.g. FID first looking without downloading) must not hide a strict one."""
    for r in requests:
        kept, families = seen.get(r.filename, (None, {}))
        if kept is None or (kept.settings.allow_untrained and not r.settings.allow_untrained):
            kept = r
        if not r.settings.allow_untrained:
            families.setdefault(family, section)
        seen[r.filename] = (kept, families)


class _SizedInfo:
    """What ``build_trial_metrics`` reads of the eval dataset: its info and length."""

    def __init__(self, info):
        self.info = info

    def __len__(self) -> int:
        return self.info.size


def _resolve_weights(weights_seen, verdict: Verdict) -> None:
    """Every weights file some trial needs and cannot find: fetched now when it can be downloaded
    (once, in the driver), else a problem naming the file, its URL and where to put it."""
    from methods.common.weights import fetch_weights

    for filename, (request, families) in weights_seen.items():
        if request.found is not None or request.settings.allow_untrained:
            continue
        if fetch_weights(request) is not None:
            continue
        for family, section in families.items():  # identical messages are printed once, under every family
            verdict.problems.append(Problem(
                family, "weights", request.missing_message(), "",
                f"put the file in one of those folders, or run with seeded random-init networks: "
                f"{section}.allow_untrained_backbones=true (numbers labelled untrained)"))


def _check_init_from(trials: Sequence[TrialConfig], tracking_uri: Optional[str], loc: Locator, verdict: Verdict):
    from bench.init_from import init_from_problems

    for t in trials:
        for msg in init_from_problems([t], tracking_uri):
            verdict.problems.append(Problem(family_of(t), "init_from", msg.split(": ", 1)[1],
                                            loc.method(t, "init_from")))


# ---- resources -----------------------------------------------------------------------------------
def local_resources(num_cpus: Optional[int] = None, num_gpus: Optional[int] = None) -> Dict[str, float]:
    """What a local Ray instance started by ``bench.run`` offers."""
    gpus = num_gpus if num_gpus is not None else (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    return {"CPU": float(num_cpus or os.cpu_count() or 1), "GPU": float(gpus)}


def check_resources(trials: Sequence[TrialConfig], available: Dict[str, float], loc: Optional[Locator] = None,
                    where: str = "the cluster") -> List[Problem]:
    """A trial whose cpu/gpu (per worker x workers) exceeds what ``available`` offers never starts:
    Ray would wait for it forever."""
    loc = loc or Locator("<sweep>")
    problems, seen = [], set()
    cpus, gpus = available.get("CPU", 0.0), available.get("GPU", 0.0)
    for t in trials:
        r = t.resources
        need_cpu, need_gpu = r.cpu * r.workers, r.gpu * r.workers
        key = (need_cpu, need_gpu, r.workers)
        if key in seen:
            continue
        seen.add(key)
        per = f" ({r.workers} workers x {r.cpu:g} CPU, {r.gpu:g} GPU)" if r.workers > 1 else ""
        if need_gpu > gpus:
            problems.append(Problem("all trials" if len(seen) == 1 else family_of(t), "resources",
                                    f"a trial needs {need_gpu:g} GPU{per}; {where} has {gpus:g}",
                                    loc(["resources", "gpu"]),
                                    "resources.gpu=0 runs on CPU" if gpus == 0 else
                                    f"resources.gpu={gpus / max(1, r.workers):g} or fewer workers"))
        if need_cpu > cpus:
            problems.append(Problem("all trials" if len(seen) == 1 else family_of(t), "resources",
                                    f"a trial needs {need_cpu:g} CPU{per}; {where} has {cpus:g}",
                                    loc(["resources", "cpu"]),
                                    f"resources.cpu={max(1, int(cpus // max(1, r.workers)))}"
                                    + (" or resources.workers=1" if r.workers > 1 else "")))
    return problems


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 2000 else text[:2000] + " ..."
