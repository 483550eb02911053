"""Every configuration default of a sweep, in one commented place, and its strict parser.

A sweep YAML has these top-level keys (all but ``name``, ``methods`` and ``datasets`` optional)::

    name, description, seeds, methods, datasets, train, eval, scale, resources, profiles

Unknown keys anywhere are errors that name the file, the key path, the line and the nearest
valid key (StudioGAN's strict check, with a better message). Values are type-checked against the
dataclass field types below.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from datasets.base import DatasetSpec


class ConfigError(ValueError):
    """A user error in a sweep file or a command-line override."""


@dataclass
class TrainConfig:
    steps: int = 200  # optimisation steps per trial (each method's train_step is one step)
    batch_size: int = 4
    # Optimiser settings; null (the default) = each method's official value, e.g. SPADE/CoCosNet
    # Adam TTUR G 1e-4, D 4e-4, betas (0, 0.9); CoCosNet v2 G 5e-5, D 2e-4; MIDMs AdamW 3e-6,
    # betas (0.9, 0.999). The values a trial used are its params resolved.*.
    lr_g: Optional[float] = None  # generator (and correspondence network) learning rate
    lr_d: Optional[float] = None  # discriminator learning rate
    beta1: Optional[float] = None
    beta2: Optional[float] = None
    checkpoint_every: int = 100  # steps between checkpoints reported to Ray Tune (0: only at the end)
    log_every: int = 10  # steps between loss logs to MLflow and progress lines
    num_workers: int = 0  # DataLoader worker processes (0: load in the trial process)
    # Mixed precision (CUDA only): autocast each train step in bfloat16, which needs no grad scaler
    # (the CoCosNet v2 code's fp16 + GradScaler needs the scaler inside the method's own backward).
    # On CPU it is ignored and the run records why (tag bench.amp).
    amp: bool = False
    allow_untrained_backbones: bool = False  # opt-in: random-init VGG etc. in losses, labelled untrained
    # Data-parallel trials (resources.workers > 1): batch_size is per worker; "linear" multiplies
    # the learning rates by the number of workers (Goyal et al. 2017), "none" keeps them.
    lr_scaling: str = "none"
    # Data-parallel trials: BatchNorm statistics (and their gradients) over the global batch, as the
    # official SPADE/CoCosNet/CoCosNet v2 code's synchronized BatchNorm; null = the method's official
    # choice (its ``sync_batchnorm``); false = per-worker statistics (plain DDP).
    sync_bn: Optional[bool] = None
    weights_dir: Optional[str] = None  # where pretrained weights files are looked up first


@dataclass
class EvalConfig:
    num_samples: int = 64  # evaluation samples (the first N of the eval split, in order)
    batch_size: int = 8
    metrics: List[str] = field(default_factory=lambda: ["l1", "psnr", "ssim"])  # or ["all"]
    allow_untrained_backbones: bool = False  # opt-in: random-init Inception/VGG/AlexNet, labelled
    grid_samples: int = 6  # columns of the logged sample grid
    metric_options: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # per-metric settings
    # Evaluation during training: every N steps (0: only at the end) the same metrics are computed
    # and logged at their step (metric curves in MLflow and the report). The trial's random streams
    # are put back after each one, so training is the same with or without it.
    every: int = 0
    # Which weights the trial ends with: "final" (the last step's) or "best:<metric>" (e.g.
    # best:fid_sources; the periodic evaluation with the best value, in the metric's own direction).
    # The kept step is the param eval.best_step; the final metrics and checkpoint describe it.
    select: str = "final"
    # Every evaluated output, with its condition, exemplar and target, saved to the run's artifacts
    # (outputs/) as png (lossless) or jpg (quality 95), so other code can score them; none: not saved.
    save_outputs: str = "none"
    # What the metrics read: "memory" (the generated tensors) or "files" (the outputs as written in
    # save_outputs' format and read back: what scoring the saved images elsewhere would see).
    score_from: str = "memory"


@dataclass
class ScaleConfig:
    resolution: int = 64  # square image side the data are resized to and the method runs at
    width: float = 1.0  # channel-width multiplier; 1.0 = the papers' widths


@dataclass
class ResourcesConfig:
    cpu: float = 1.0  # CPUs per trial (also torch's thread count in the trial)
    gpu: float = 0.0  # GPUs per trial; fractions share a GPU between trials
    max_concurrent: int = 0  # trials at once (0: as many as the resources allow)
    max_failures: int = 0  # Ray retries of a crashed trial (resumes from its last checkpoint)
    # Data-parallel workers per trial (Ray Train TorchTrainer, DDP); cpu and gpu above are then
    # per worker. 1 = train in the trial's own process.
    workers: int = 1


@dataclass
class MethodEntry:
    name: str
    options: Dict[str, Any] = field(default_factory=dict)  # shared by every variant
    # Named override sets (how ablations are written). Bare keys are method options; dotted keys
    # starting with train./eval./scale. override the trial's sections.
    variants: Dict[str, Dict[str, Any]] = field(default_factory=lambda: {"default": {}})
    # Per-dataset settings. ``official``: the method's own per-dataset recipe (the options the
    # official training command for that dataset sets, e.g. CoCosNet on DeepFashion: warp_patch,
    # lambda_warp_self 100); ``none``: the method's defaults on every dataset.
    recipe: str = "official"
    # This sweep's own per-dataset overrides, keyed by dataset name (``celebahq``) or name-variant
    # (``celebahq-edge``), written like variants (bare keys: method options; dotted: train./eval./scale.,
    # and dataset.options.<key> for the dataset's own options, e.g. its training-exemplar policy).
    # Order of application, later wins: method defaults < official recipe < options < recipes < variant.
    recipes: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # Run this method only on these datasets (names or name-variants); None: every dataset of the sweep.
    datasets: Optional[List[str]] = None
    # Start from these weights instead of the method's initialisation: a checkpoint file (a released
    # official checkpoint converted with ``python -m bench.convert``, or a trial's checkpoint.pt), an
    # MLflow run id (its logged checkpoint), or a mapping {dataset or dataset-variant: one of those}.
    # Relative paths are looked up in the sweep's ``checkpoints_dir``. With train.steps: 0 the trial
    # only evaluates the loaded weights.
    init_from: Union[None, str, Dict[str, str]] = None


@dataclass
class SweepSpec:
    name: str
    methods: List[MethodEntry]
    datasets: List[DatasetSpec]
    description: str = ""
    seeds: List[int] = field(default_factory=lambda: [0])
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    # name -> overrides (dotted keys or whole sections), selected with --profile
    profiles: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    # Where relative ``init_from`` paths of the methods are looked up (default: the current directory).
    checkpoints_dir: Optional[str] = None


TRIAL_SECTIONS = ("train", "eval", "scale")
DATASET_OPTIONS_PREFIX = "dataset.options."  # recipe/variant keys that set the trial's dataset options


# ---- strict construction of dataclasses from plain data ---------------------------------------
class _Where:
    """Formats error locations: file, dotted key path and (when known) the YAML line."""

    def __init__(self, file: str, line_of=None):
        self.file = file
        self.line_of = line_of or (lambda path: None)

    def __call__(self, path: List[Union[str, int]], msg: str) -> ConfigError:
        dotted = ".".join(str(p) for p in path) or "<top level>"
        line = self.line_of(path)
        at = f"{self.file}:{line}" if line else self.file
        return ConfigError(f"{at}: {dotted}: {msg}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, path, where: _Where) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin is Union:  # Optional[X], Union[str, Dict[...]]: the first member that accepts it
        if value is None and type(None) in args:
            return None
        errors = []
        for member in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, member, path, where)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[-1]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise where(path, f"expected a list, got {type(value).__name__} {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], path + [i], where) for i, v in enumerate(value))
        if len(args) != len(value):
            raise where(path, f"expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, path + [i], where) for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path, where)
    if origin in (list, List):
        if not isinstance(value, list):
            raise where(path, f"expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], path + [i], where) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise where(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _coerce(v, args[1], path + [k], where) for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise where(path, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def unknown_key_error(key: str, valid: List[str], path, where: _Where) -> ConfigError:
    close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return where(path + [key], f"unknown key{hint} (valid keys: {', '.join(valid)})")


def build(cls, data: Any, path=None, where: Optional[_Where] = None):
    """Construct dataclass ``cls`` from ``data``, strictly (unknown keys, types, missing keys)."""
    path = list(path or [])
    where = where or _Where("<config>")
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if cls is DatasetSpec and isinstance(data, str):  # "- embedded" is short for "- {name: embedded}"
        data = {"name": data}
    if cls is MethodEntry and isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, dict):
        raise where(path, f"expected a mapping for {cls.__name__}, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise unknown_key_error(key, list(fields), path, where)
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], path + [name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise where(path + [name], "required key is missing")
    return cls(**kwargs)


# ---- dotted overrides ----------------------------------------------------------------------
def parse_override(text: str) -> tuple:
    """``"train.steps=50"`` -> (["train", "steps"], 50); the value is parsed as YAML."""
    from bench.yaml_input import parse_yaml  # bounded and traceback-free, like sweep files

    shown = text if len(text) <= 80 else text[:77] + "..."  # the override as error messages quote it
    if "=" not in text:
        raise ConfigError(f"override {shown!r}: expected key=value, e.g. train.steps=50")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {shown!r}: empty key")
    value = parse_yaml(raw, f"override {shown!r}", "value") if raw.strip() else ""
    return key.split("."), value


def set_dotted(data: Dict[str, Any], keys: List[str], value: Any, origin: str) -> None:
    """Set ``data[k1][k2]... = value``, creating sections; errors name the override's origin."""
    node = data
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{origin}: {'.'.join(keys[: i + 1])} is not a section, cannot set {'.'.join(keys)}")
        node = nxt
    node[keys[-1]] = value
