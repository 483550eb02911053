"""Sweep files -> validated ``SweepSpec`` -> the grid of ``TrialConfig`` (method x variant x dataset x seed).

A trial's identity is the hash of its resolved configuration (method options with defaults
filled in, dataset spec with options, seed, train/eval/scale), so the same trial is recognised
across invocations, machines and edits of unrelated parts of the sweep.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from bench.config import (DATASET_OPTIONS_PREFIX, TRIAL_SECTIONS, ConfigError, EvalConfig, MethodEntry,
                          ResourcesConfig, ScaleConfig, SweepSpec, TrainConfig, _Where, build, parse_override,
                          set_dotted)
from bench.yaml_input import read_yaml_file
from datasets.base import DatasetSpec

# Settings that change how a trial is observed, not what it computes: left out of its identity so
# that, e.g., logging more often does not re-run finished trials.
_NOT_IDENTITY = {"train": ("log_every", "checkpoint_every", "num_workers"), "eval": ("grid_samples", "save_outputs")}
# Settings added after trials were first hashed: left out of the identity at their default, so the
# trials of existing stores keep their keys (and are not re-run) until a sweep sets them.
_IDENTITY_IF_SET = {"eval": {"every": 0, "select": "final", "score_from": "memory"}, "train": {"sync_bn": None}}


@dataclass
class TrialConfig:
    sweep: str
    method: str
    variant: str
    method_options: Dict[str, Any]
    dataset: DatasetSpec
    seed: int
    train: TrainConfig
    eval: EvalConfig
    scale: ScaleConfig
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    # Which per-dataset recipes shaped the options, e.g. "official:celebahq-edge" (descriptive: the
    # resolved options above are what identify the trial).
    recipe: str = ""
    # Weights the trial starts from: an absolute checkpoint path or "run:<MLflow run id>" ("": none).
    init_from: str = ""

    @property
    def dataset_label(self) -> str:
        return self.dataset.name + (f"-{self.dataset.variant}" if self.dataset.variant else "")

    @property
    def name(self) -> str:
        return f"{self.method}/{self.variant}/{self.dataset_label}/s{self.seed}"

    def identity(self) -> Dict[str, Any]:
        ident = {
            "method": self.method, "variant": self.variant, "method_options": self.method_options,
            "dataset": dataclasses.asdict(self.dataset), "seed": self.seed,
            "train": dataclasses.asdict(self.train), "eval": dataclasses.asdict(self.eval),
            "scale": dataclasses.asdict(self.scale),
        }
        for section, keys in _NOT_IDENTITY.items():
            for k in keys:
                ident[section].pop(k, None)
        if self.eval.score_from == "files":  # then the saved format changes the numbers (jpg's loss)
            ident["eval"]["save_outputs"] = self.eval.save_outputs
        for section, defaults in _IDENTITY_IF_SET.items():
            for k, default in defaults.items():
                if ident[section].get(k) == default:
                    ident[section].pop(k)
        if self.resources.workers > 1:  # data parallelism changes the effective batch
            ident["workers"] = self.resources.workers
        if self.init_from:
            ident["init_from"] = self.init_from
        return ident

    @property
    def key(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrialConfig":
        d = dict(d)
        return cls(
            sweep=d["sweep"], method=d["method"], variant=d["variant"], method_options=d["method_options"],
            dataset=DatasetSpec(**d["dataset"]), seed=d["seed"], train=TrainConfig(**d["train"]),
            eval=EvalConfig(**d["eval"]), scale=ScaleConfig(**d["scale"]),
            resources=ResourcesConfig(**d["resources"]), recipe=d.get("recipe", ""),
            init_from=d.get("init_from", ""),
        )


# ---- locating keys in the YAML text for error messages ---------------------------------------
def _line_finder(text: str):
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        root = None

    def line_of(path) -> Optional[int]:
        node, line = root, None
        for key in path:
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if k.value == str(key):
                        node, line = v, k.start_mark.line + 1
                        break
                else:
                    return line
            elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
                node = node.value[key]
                line = node.start_mark.line + 1
            else:
                return line
        return line

    return line_of


def sweep_line_finder(path: str):
    """``line_of(key path) -> line`` for a sweep file ``load_sweep`` has accepted."""
    _, text = read_yaml_file(path, "sweep file")
    return _line_finder(text)


def load_sweep(path: str, overrides: List[str] = (), profile: Optional[str] = None) -> SweepSpec:
    """Read, profile, override and validate a sweep file (``yaml.safe_load`` semantics, bounded:
    ``bench.yaml_input``). Any problem is a one-line ``ConfigError`` naming the file."""
    file = str(path)
    raw, text = read_yaml_file(path, "sweep file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: a sweep file is a mapping with keys name, methods, datasets, ... "
                          f"(got {type(raw).__name__})")
    return spec_from_dict(raw, file, _line_finder(text), overrides, profile)


def spec_from_dict(raw: Dict[str, Any], file: str = "<sweep>", line_of=None, overrides: List[str] = (),
                   profile: Optional[str] = None) -> SweepSpec:
    where = _Where(file, line_of)
    try:
        return _spec_from_dict(raw, file, where, overrides, profile)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, RecursionError) as exc:
        # A shape the checks above did not anticipate: still one line naming the file, never a
        # traceback (BENCH_DEBUG=1 shows it, for whoever fixes the check).
        if os.environ.get("BENCH_DEBUG") == "1":
            raise
        raise ConfigError(f"{file}: cannot be read as a sweep ({type(exc).__name__}: {exc})") from None


def _spec_from_dict(raw, file: str, where: _Where, overrides, profile) -> SweepSpec:
    raw = copy.deepcopy(raw)
    if profile:
        profiles = raw.get("profiles") or {}
        if not isinstance(profiles, dict):
            raise where(["profiles"], f"expected a mapping of profile name -> overrides, got {type(profiles).__name__}")
        if profile not in profiles:
            known = ", ".join(sorted(map(str, profiles))) or "(none defined)"
            raise ConfigError(f"{file}: profile {profile!r} is not defined; profiles: {known}")
        chosen = profiles[profile] or {}
        if not isinstance(chosen, dict):
            raise where(["profiles", profile], f"expected a mapping of key -> value, got {type(chosen).__name__}")
        for key, value in chosen.items():
            set_dotted(raw, str(key).split("."), copy.deepcopy(value), f"{file}: profiles.{profile}.{key}")
    for text in overrides:
        keys, value = parse_override(text)
        set_dotted(raw, keys, value, f"override {text!r}")
    spec = build(SweepSpec, raw, [], where)
    _validate(spec, where)
    return spec


def _validate(spec: SweepSpec, where: _Where) -> None:
    import methods  # noqa: F401  (registers methods)
    import datasets  # noqa: F401
    from bench.metrics import METRICS
    from bench.plugins import load_plugins

    load_plugins()
    from datasets.registry import DATASETS
    from methods.registry import METHODS

    if not spec.methods:
        raise where(["methods"], "at least one method is required")
    if not spec.datasets:
        raise where(["datasets"], "at least one dataset is required")
    if not spec.seeds:
        raise where(["seeds"], "at least one seed is required")
    for i, m in enumerate(spec.methods):
        try:
            METHODS.get(m.name)
        except KeyError as exc:
            raise where(["methods", i, "name"], str(exc)) from None
        if not m.variants:
            raise where(["methods", i, "variants"], "needs at least one variant (e.g. default: {})")
    for i, d in enumerate(spec.datasets):
        try:
            cls = DATASETS.get(d.name)
        except KeyError as exc:
            raise where(["datasets", i, "name"], str(exc)) from None
        if d.variant is not None and d.variant not in cls.variants:
            raise where(["datasets", i, "variant"], f"unknown variant {d.variant!r}; {d.name} has {list(cls.variants)}")
        _resolved_dataset(d, ["datasets", i, "options"], where)
    for i, name in enumerate(spec.eval.metrics):
        if name != "all" and name not in METRICS:
            try:
                METRICS.get(name)
            except KeyError as exc:
                raise where(["eval", "metrics", i], str(exc)) from None
    if not MIN_RESOLUTION <= spec.scale.resolution <= MAX_RESOLUTION:
        raise where(["scale", "resolution"], f"must be in [{MIN_RESOLUTION}, {MAX_RESOLUTION}], "
                                             f"got {spec.scale.resolution}")
    if spec.train.steps < 0 or spec.train.batch_size < 1:
        raise where(["train"], "steps must be >= 0 and batch_size >= 1")
    if spec.eval.num_samples < 1 or spec.eval.batch_size < 1:
        raise where(["eval"], "num_samples and batch_size must be >= 1")
    _validate_eval(spec.eval, ["eval"], where)
    if spec.resources.cpu <= 0 or spec.resources.gpu < 0 or spec.resources.workers < 1:
        raise where(["resources"], "cpu must be > 0, gpu >= 0 and workers >= 1")
    if spec.train.lr_scaling not in ("none", "linear"):
        raise where(["train", "lr_scaling"], f"must be 'none' or 'linear', got {spec.train.lr_scaling!r}")
    expand(spec, where)  # variants and options are checked by expanding once


def _validate_eval(e: EvalConfig, path, where: _Where) -> None:
    """The evaluation schedule and output settings (checked per trial too: variants may set them)."""
    if e.every < 0:
        raise where(path + ["every"], f"must be >= 0 (0: evaluate only at the end), got {e.every}")
    if e.save_outputs not in SAVE_FORMATS:
        raise where(path + ["save_outputs"], f"must be one of {list(SAVE_FORMATS)}, got {e.save_outputs!r}")
    if e.score_from not in ("memory", "files"):
        raise where(path + ["score_from"], f"must be 'memory' or 'files', got {e.score_from!r}")
    if e.score_from == "files" and e.save_outputs == "none":
        raise where(path + ["score_from"], "'files' scores the saved outputs: set save_outputs to png or jpg")
    if e.select != "final":
        from bench.report.data import metric_info

        metric = e.select[len("best:"):] if e.select.startswith("best:") else None
        if not metric or metric_info(metric) is None:
            raise where(path + ["select"], f"must be 'final' or 'best:<metric>' with an evaluation metric "
                                           f"(e.g. best:fid_sources, best:l1), got {e.select!r}")
        if e.every <= 0:
            raise where(path + ["select"], f"{e.select} picks among periodic evaluations: set eval.every > 0")


SAVE_FORMATS = ("none", "png", "jpg")


def _apply_overrides(options: Dict[str, Any], sections: Dict[str, Any], overrides: Dict[str, Any], path,
                     where: _Where) -> None:
    """Apply a variant's or recipe's overrides: bare keys to method options, dotted keys to trial
    sections, ``dataset.options.<key>`` to the trial's dataset options (``sections["dataset_options"]``)."""
    for key, value in (overrides or {}).items():
        key = str(key)
        parts = key.split(".")
        if key.startswith(DATASET_OPTIONS_PREFIX) and len(parts) == 3:
            sections.setdefault("dataset_options", {})[parts[2]] = copy.deepcopy(value)
        elif len(parts) > 1:
            if parts[0] not in TRIAL_SECTIONS:
                raise where(path + [key], f"dotted keys must start with one of {list(TRIAL_SECTIONS)} "
                                          f"or be {DATASET_OPTIONS_PREFIX}<key>")
            set_dotted(sections, parts, copy.deepcopy(value), f"{where.file}: {'.'.join(map(str, path + [key]))}")
        else:
            options[key] = copy.deepcopy(value)


def recipe_keys(dataset: DatasetSpec) -> List[str]:
    """The recipe keys that apply to a dataset, general first: its name, then name-variant."""
    keys = [dataset.name]
    if dataset.variant:
        keys.append(f"{dataset.name}-{dataset.variant}")
    return keys


def _apply_recipes(options: Dict[str, Any], sections: Dict[str, Any], recipes: Dict[str, Dict[str, Any]],
                   dataset: DatasetSpec, source: str, path, where: _Where) -> List[str]:
    """Apply the recipes for ``dataset`` (name, then name-variant); returns "<source>:<key>" of each."""
    applied = []
    for key in recipe_keys(dataset):
        if key in recipes:
            _apply_overrides(options, sections, recipes[key], path + [key], where)
            applied.append(f"{source}:{key}")
    return applied


def _check_recipes(spec: SweepSpec, where: _Where) -> None:
    """Recipe keys must name a registered dataset or dataset-variant (a typo would silently apply
    nothing); they need not match this sweep's datasets, since profiles swap datasets."""
    from datasets.registry import DATASETS

    known = sorted({k for n in DATASETS.names() for v in DATASETS.get(n).variants
                    for k in recipe_keys(DatasetSpec(name=n, variant=v))})
    for mi, m in enumerate(spec.methods):
        if m.recipe not in ("official", "none"):
            raise where(["methods", mi, "recipe"], f"must be 'official' or 'none', got {m.recipe!r}")
        for key in m.recipes:
            if key not in known:
                raise where(["methods", mi, "recipes", key],
                            f"not a dataset or dataset-variant; recipe keys are one of {known}")


def expand(spec: SweepSpec, where: Optional[_Where] = None) -> List[TrialConfig]:
    """The grid, in a stable order: method, variant, dataset, seed."""
    from methods.registry import METHODS

    where = where or _Where("<sweep>")
    _check_recipes(spec, where)
    trials: List[TrialConfig] = []
    datasets = [_resolved_dataset(d) for d in spec.datasets]
    for mi, m in enumerate(spec.methods):
        method_cls = METHODS.get(m.name)
        official = getattr(method_cls, "recipes", {}) if m.recipe == "official" else {}
        method_datasets = [d for d in datasets if m.datasets is None or set(recipe_keys(d)) & set(m.datasets)]
        if not method_datasets:
            raise where(["methods", mi, "datasets"], f"method {m.name!r} runs on none of this sweep's datasets "
                        f"({', '.join(recipe_keys(d)[-1] for d in datasets)})")
        for variant, overrides in m.variants.items():
            vpath = ["methods", mi, "variants", variant]
            for d0 in method_datasets:
                options: Dict[str, Any] = {}
                sections = {s: dataclasses.asdict(getattr(spec, s)) for s in TRIAL_SECTIONS}
                applied = _apply_recipes(options, sections, official, d0, "official", [f"{m.name}.recipes"], where)
                options.update(copy.deepcopy(m.options))
                applied += _apply_recipes(options, sections, m.recipes, d0, "sweep", ["methods", mi, "recipes"], where)
                _apply_overrides(options, sections, overrides or {}, vpath, where)
                d = _with_dataset_options(d0, sections.pop("dataset_options", {}), vpath, where)
                resolved = _typed_options(method_cls.Options, options,
                                          vpath if overrides else ["methods", mi, "options"], where,
                                          f"method {m.name!r}" + (f" ({', '.join(applied)})" if applied else ""))
                train = build(TrainConfig, sections["train"], vpath, where)
                evalc = build(EvalConfig, sections["eval"], vpath, where)
                _validate_eval(evalc, vpath, where)
                scale = build(ScaleConfig, sections["scale"], vpath, where)
                if d.resolution:
                    scale = dataclasses.replace(scale, resolution=d.resolution)
                if not MIN_RESOLUTION <= scale.resolution <= MAX_RESOLUTION:
                    raise where(vpath if d.resolution is None else ["datasets"],
                                f"resolution {scale.resolution} is outside [{MIN_RESOLUTION}, {MAX_RESOLUTION}] "
                                f"(scale.resolution, or the dataset's resolution)")
                init_from = _init_from(m, d, spec.checkpoints_dir, ["methods", mi, "init_from"], where)
                for seed in spec.seeds:
                    trials.append(TrialConfig(
                        sweep=spec.name, method=m.name, variant=variant,
                        method_options=dataclasses.asdict(resolved) if resolved is not None else {},
                        dataset=d, seed=int(seed), train=train, eval=evalc, scale=scale,
                        resources=spec.resources, recipe="+".join(applied), init_from=init_from))
    names = [t.name for t in trials]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise where(["methods"], f"trials with the same name: {dupes} (give variants/datasets distinct names)")
    return trials


def _with_dataset_options(d: DatasetSpec, extra: Dict[str, Any], path, where: _Where) -> DatasetSpec:
    """The dataset with recipe/variant ``dataset.options.*`` settings applied (re-checked strictly)."""
    if not extra:
        return d
    return _resolved_dataset(dataclasses.replace(d, options={**d.options, **extra}), path, where)


RUN_ID_PREFIX = "run:"
# Image sides a trial may ask for: the papers use 64..1024; beyond 4096 is a typo that would make
# loaders allocate gigabytes (already in the preflight, which opens the data).
MIN_RESOLUTION, MAX_RESOLUTION = 16, 4096


def _init_from(m: MethodEntry, d: DatasetSpec, checkpoints_dir: Optional[str], path, where: _Where) -> str:
    """The resolved ``init_from`` of method ``m`` on dataset ``d``: an absolute path, "run:<id>" or ""."""
    spec = m.init_from
    if isinstance(spec, dict):
        keys = [k for k in reversed(recipe_keys(d)) if k in spec]  # name-variant before name
        if not keys:
            raise where(path, f"no entry for dataset {recipe_keys(d)[-1]!r} (entries: {', '.join(spec)}); add one "
                              f"or restrict the method with datasets: [...]")
        spec = spec[keys[0]]
    if not spec:
        return ""
    spec = str(spec).strip()
    if spec.startswith(RUN_ID_PREFIX) or is_run_id(spec):
        return RUN_ID_PREFIX + spec[len(RUN_ID_PREFIX):] if spec.startswith(RUN_ID_PREFIX) else RUN_ID_PREFIX + spec
    p = Path(spec).expanduser()
    if not p.is_absolute():
        p = Path(checkpoints_dir or ".").expanduser() / p
    return str(p.resolve())


def is_run_id(text: str) -> bool:
    """An MLflow run id: 32 lowercase hex digits."""
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def _typed_options(options_cls, values, path, where: _Where, what: str):
    """A method's or dataset's ``Options`` built strictly: unknown keys name the nearest valid one,
    values are checked and converted to the declared types (YAML lists -> tuples, "1e-4" -> float)."""
    if options_cls is None:
        if values:
            raise where(path, f"{what} takes no options, got {sorted(values)}")
        return None
    try:
        return build(options_cls, values, path, where)
    except (TypeError, ValueError) as exc:  # __post_init__ checks of the options class
        if isinstance(exc, ConfigError):
            raise
        raise where(path, f"{what}: {exc}") from None


def _resolved_dataset(d: DatasetSpec, path=None, where: Optional[_Where] = None) -> DatasetSpec:
    """The dataset spec with its default variant and every option default filled in."""
    from datasets.registry import DATASETS

    cls = DATASETS.get(d.name)
    opts = _typed_options(cls.Options, d.options, path or ["datasets"], where or _Where("<sweep>"),
                          f"dataset {d.name!r}")
    return dataclasses.replace(d, variant=d.variant or cls.variants[0],
                               root=str(Path(d.root).expanduser().resolve()) if d.root else None,
                               options=dataclasses.asdict(opts) if opts is not None else {})


def file_hash(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


__all__ = ["TrialConfig", "load_sweep", "spec_from_dict", "expand", "ConfigError", "file_hash"]
