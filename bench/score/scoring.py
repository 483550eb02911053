"""Feed folders of images to the harness' metric classes, exactly as ``bench.evaluate`` feeds them.

One ``MetricContext`` for all metrics (so the VGG metrics share one feature pass, as in a trial),
batches in key order, ``update(batch, MethodOutput(output=fakes))`` per metric (``update_groups``
for lpips_diversity, whose K outputs per input come from K ``--fake`` folders), the memo's
``end_batch`` after every batch, then ``compute`` once.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from bench.evaluate import build_metrics
from bench.metrics.base import MetricContext
from bench.score.images import FolderReport, check_files, first_size, read_labels, read_rgb, to_harness
from bench.score.pairing import Folder, ScoreInputError, pair_folders
from datasets.base import DataInfo
from methods.base import BackboneSettings, MethodOutput
from methods.common.weights import is_untrained


@dataclass(frozen=True)
class FolderInputs:
    """The folders of one scoring, by role (``fakes[0]`` is what every metric but lpips_diversity scores)."""

    fakes: Sequence[Folder]
    real: Optional[Folder] = None
    exemplars: Sequence[Folder] = ()
    conditions: Optional[Folder] = None
    exemplar_conditions: Optional[Folder] = None

    def all(self) -> List[Folder]:
        optional = [self.real, *self.exemplars, self.conditions, self.exemplar_conditions]
        return [*self.fakes, *[f for f in optional if f is not None]]


@dataclass(frozen=True)
class ScoreOptions:
    backbones: BackboneSettings
    cache_dir: Path  # real-image Inception features, content-addressed (as a sweep's .cache/bench)
    device: torch.device = torch.device("cpu")
    batch_size: int = 16
    seed: int = 0  # KID subsets, SWD draws, seeded stand-in backbones
    metric_options: Dict[str, Dict[str, object]] = field(default_factory=dict)


@dataclass
class ScoreResult:
    values: Dict[str, float]
    settings: Dict[str, object]  # flat: inputs.*, metric.<name>.<key> (as a trial logs them), run settings
    provenance: Dict[str, str]  # "<metric>.<network>" -> sha256:... / untrained(seed=N)
    produced_by: Dict[str, str]  # value name -> the metric that computed it (swd_l64 -> swd)

    @property
    def untrained(self) -> List[str]:
        return sorted(k for k, v in self.provenance.items() if is_untrained(v))


@dataclass(frozen=True)
class Prepared:
    """Checked inputs: paired keys, image size, per-folder reports, number of label classes."""

    keys: List[str]
    size: Tuple[int, int]
    reports: Dict[str, FolderReport]
    num_classes: Optional[int]


def prepare(inputs: FolderInputs) -> Prepared:
    """Pair the folders and check every file's header (errors before any computation)."""
    keys = pair_folders(inputs.all())
    size = first_size(inputs.fakes[0], keys[0])
    reports: Dict[str, FolderReport] = {}
    for i, f in enumerate(inputs.fakes):
        reports["fake" if i == 0 else f"fake{i + 1}"] = check_files(f, keys, size, labels=False)
    if inputs.real is not None:
        reports["real"] = check_files(inputs.real, keys, size, labels=False)
    for i, f in enumerate(inputs.exemplars):
        reports["exemplars" if i == 0 else f"exemplars{i + 1}"] = check_files(f, keys, size, labels=False)
    num_classes = None
    for name, folder in (("conditions", inputs.conditions), ("exemplar_conditions", inputs.exemplar_conditions)):
        if folder is not None:
            reports[name] = check_files(folder, keys, size, labels=True)
            top = max(int(read_labels([p]).max()) for p in folder.files.values())
            num_classes = max(num_classes or 0, top + 1)
    return Prepared(keys, size, reports, num_classes)


def _context(inputs: FolderInputs, prep: Prepared, opts: ScoreOptions) -> MetricContext:
    info = DataInfo(name="folders", variant="default", split="folders", size=len(prep.keys),
                    resolution=prep.size[0], cond_channels=0, num_classes=prep.num_classes,
                    has_target=False, params={"real": str(inputs.real.root) if inputs.real else ""})
    real_root = str(inputs.real.root.resolve()) if inputs.real else ""
    ex_root = str(inputs.exemplars[0].root.resolve()) if inputs.exemplars else ""
    # The cache key of the real-image features; the rows themselves are content-addressed, so a
    # changed file is recomputed, never read stale.
    data_key = f"folders|real={real_root}|exemplars={ex_root}|n={len(prep.keys)}|{prep.size[0]}x{prep.size[1]}"
    return MetricContext(data=info, device=opts.device, backbones=opts.backbones, cache_dir=opts.cache_dir,
                         data_key=data_key, seed=opts.seed)


def build(names: Sequence[str], inputs: FolderInputs, prep: Prepared, opts: ScoreOptions):
    """The metric objects (their networks are located here: missing weights fail before scoring)."""
    ctx = _context(inputs, prep, opts)
    metrics = {}
    for name in names:
        options = dict(opts.metric_options.get(name, {}))
        if name == "lpips_diversity":
            options.setdefault("k", len(inputs.fakes))
            if int(options["k"]) != len(inputs.fakes):
                raise ScoreInputError(f"lpips_diversity: option k={options['k']} but {len(inputs.fakes)} --fake folders "
                                 f"were given (k is the number of --fake folders)")
        metrics.update(build_metrics([name], dataclasses.replace(ctx, options=options)))
    return metrics


def score(metrics: Dict[str, object], inputs: FolderInputs, prep: Prepared, opts: ScoreOptions,
          progress: Callable[[int, int], None] = lambda done, total: None) -> ScoreResult:
    keys, dev = prep.keys, opts.device
    ex_source = ("--exemplars folders, one per --fake" if len(inputs.exemplars) == len(inputs.fakes) > 1
                 else "no exemplar folder per --fake: every pair counted")
    memos = list({id(m.ctx.memo): m.ctx.memo for m in metrics.values()}.values())
    with torch.no_grad():
        for lo in range(0, len(keys), opts.batch_size):
            chunk = keys[lo:lo + opts.batch_size]
            fakes = [to_harness(read_rgb([f.files[k] for k in chunk])).to(dev) for f in inputs.fakes]
            batch: Dict[str, torch.Tensor] = {}
            if inputs.real is not None:
                batch["image"] = to_harness(read_rgb([inputs.real.files[k] for k in chunk])).to(dev)
            exemplars = [to_harness(read_rgb([f.files[k] for k in chunk])).to(dev) for f in inputs.exemplars]
            if exemplars:
                batch["exemplar"] = exemplars[0]
            if inputs.conditions is not None:
                batch["label"] = torch.from_numpy(read_labels([inputs.conditions.files[k] for k in chunk])).to(dev)
            if inputs.exemplar_conditions is not None:
                batch["exemplar_label"] = torch.from_numpy(
                    read_labels([inputs.exemplar_conditions.files[k] for k in chunk])).to(dev)
            out = MethodOutput(output=fakes[0])
            for name, m in metrics.items():
                if name == "lpips_diversity":
                    per_fake = exemplars if len(exemplars) == len(fakes) > 1 else None
                    m.update_groups(fakes, per_fake, ex_source)
                else:
                    m.update(batch, out)
            for memo in memos:
                memo.end_batch()
            progress(lo + len(chunk), len(keys))
    values: Dict[str, float] = {}
    settings: Dict[str, object] = {}
    provenance: Dict[str, str] = {}
    produced_by: Dict[str, str] = {}
    for name, m in metrics.items():
        computed = m.compute()
        values.update(computed)
        produced_by.update(dict.fromkeys(computed, name))
        settings.update({f"metric.{name}.{k}": v for k, v in m.settings.items()})
        provenance.update({f"{name}.{k}": v for k, v in m.provenance.items()})
    for role, report in prep.reports.items():
        settings.update({f"inputs.{role}.{k}": v for k, v in report.as_settings().items()})
    settings.update({"n_images": len(keys), "resolution": f"{prep.size[0]}x{prep.size[1]}",
                     "pairing": "relative path without extension (bench/score/pairing.py)",
                     "metrics_selected": ",".join(metrics), "seed": opts.seed, "device": str(dev),
                     "batch_size": opts.batch_size, "tensor_convention": "uint8 -> u/127.5-1 in [-1,1], as the "
                     "evaluator's outputs; the metrics quantise back to the same uint8"})
    return ScoreResult(values, settings, provenance, produced_by)


def stderr_progress(done: int, total: int) -> None:
    print(f"\rscored {done}/{total} images", end="\n" if done == total else "", file=sys.stderr, flush=True)
