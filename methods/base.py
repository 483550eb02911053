"""The interface every method implements; the harness only talks to methods through it.

A method is an ``nn.Module`` that owns its networks, losses and optimisers. The harness calls
``train_step`` once per step with a batch (see ``datasets.base`` for its keys, all on the
method's device) and ``generate`` for evaluation. Methods never import the harness (``bench``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from torch import nn

from datasets.base import DataInfo


@dataclass
class BackboneSettings:
    """Where pretrained backbone weights are looked up, and whether random init is allowed."""

    weights_dir: Optional[str] = None  # searched first; then $TORCH_HOME/hub/checkpoints
    allow_untrained: bool = False  # opt-in: seeded random-init networks, labelled untrained
    download: bool = True  # try the official URL when the file is absent
    seed: int = 0  # seed of random-init backbones


@dataclass
class MethodContext:
    """Everything a method is built from besides its own options."""

    data: DataInfo
    resolution: int
    width: float  # channel-width multiplier; 1.0 = the paper's widths
    # Optimiser settings from the sweep; None = the method's official value (``official_optim``).
    lr_g: Optional[float] = None
    lr_d: Optional[float] = None
    beta1: Optional[float] = None
    beta2: Optional[float] = None
    lr_scale: float = 1.0  # data-parallel trials with train.lr_scaling linear: x workers, on every lr
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backbones: BackboneSettings = field(default_factory=BackboneSettings)
    seed: int = 0
    total_steps: int = 1  # for methods with phases (warm-up) or schedules
    # False for evaluation-only trials (train.steps: 0, e.g. released weights): the method builds
    # no optimisers and no training-only networks (loss backbones, discriminators).
    training: bool = True

    def official_optim(self, **official: float) -> Dict[str, float]:
        """The optimiser settings to use: the sweep's where it set them, else the method's official
        ones (keys lr_g, lr_d, beta1, beta2); learning rates (keys starting with ``lr``) times
        ``lr_scale``."""
        out = {k: (getattr(self, k) if getattr(self, k, None) is not None else v) for k, v in official.items()}
        return {k: v * self.lr_scale if k.startswith("lr") else v for k, v in out.items()}


@dataclass
class MethodOutput:
    """What ``generate`` returns: the translated image and, for correspondence methods, warps."""

    output: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    # Warped exemplars by level name (e.g. "64", "128"), each (B, 3, h, w) in [-1, 1]. The
    # harness puts them in the sample grid and scores them against the ground truth.
    warps: Dict[str, torch.Tensor] = field(default_factory=dict)


def scaled(channels: int, width: float, minimum: int = 4) -> int:
    """A paper channel count scaled by the run's width multiplier (at least ``minimum``)."""
    return max(minimum, int(round(channels * width)))


class ExemplarMethod(nn.Module):
    """Base class. Subclasses set ``Options`` (a dataclass of the method's hyper-parameters,
    every default commented there) and implement the three methods below."""

    Options: type = None
    has_warp: bool = False
    # Official per-dataset option overrides (what the official training command for that dataset
    # sets), keyed by dataset name or name-variant; applied by sweeps with ``recipe: official``.
    # Kept in ``methods/<name>/recipes.py``.
    recipes: Dict[str, Dict[str, Any]] = {}
    # State-dict prefixes that pretrained checkpoints never hold: frozen backbones the method loads
    # itself (loss VGGs), so ``load_pretrained`` neither expects nor accepts them.
    pretrained_exclude: tuple = ()
    # Whether the official code synchronises BatchNorm statistics across GPUs (SPADE's and CoCosNet's
    # SynchronizedBatchNorm2d): a data-parallel harness then does the same by default.
    sync_batchnorm: bool = False

    def __init__(self, options: Any, ctx: MethodContext):
        super().__init__()
        self.options = options
        self.ctx = ctx
        # Provenance of every pretrained or random-init backbone: name -> "sha256:<hex>" or
        # "untrained(seed=N)". The harness logs it as run tags.
        self.provenance: Dict[str, str] = {}
        # Resolved settings worth recording that are not options (e.g. the optimiser's learning rates
        # and betas after ``ctx.official_optim``); the harness logs them as params ``resolved.*``.
        self.resolved: Dict[str, Any] = {}

    def train_step(self, batch: Dict[str, torch.Tensor], step: int) -> Dict[str, float]:
        """One optimisation step (all of the method's networks); returns scalar losses by name."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(self, batch: Dict[str, torch.Tensor]) -> MethodOutput:
        raise NotImplementedError

    # Checkpoints hold networks and optimisers; subclasses with more state extend these.
    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        return {}

    def training_state(self) -> Dict[str, Any]:
        return {
            "model": self.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers().items()},
        }

    def load_training_state(self, state: Dict[str, Any]) -> None:
        self.load_state_dict(state["model"])
        for k, o in self.optimizers().items():
            o.load_state_dict(state["optimizers"][k])

    def load_pretrained(self, state: Dict[str, torch.Tensor], what: str = "checkpoint") -> Dict[str, str]:
        """Load networks' weights (``init_from``): every key must be one of ours with our shape; a
        network the checkpoint has must be complete; a network it lacks entirely (e.g. the
        discriminator of a test-only release) keeps its initialisation. Returns {network: "loaded" |
        "kept initialisation" | "not built"}; raises ``ValueError`` listing every problem at once."""
        from methods.common.convert import format_key_problems

        ours = {k: v for k, v in self.state_dict().items() if not k.startswith(self.pretrained_exclude)}
        top = lambda k: k.split(".", 1)[0]  # noqa: E731
        # A network this model does not build (attribute None: e.g. the discriminator of an
        # evaluation-only trial) is skipped: releases ship latest_net_D.pth next to the generator.
        not_built = sorted({top(k) for k in state if getattr(self, top(k), 0) is None})
        state = {k: v for k, v in state.items() if top(k) not in not_built}
        given = {top(k) for k in state}
        unexpected = [k for k in state if k not in ours]
        shapes = [f"{k}: {tuple(state[k].shape)} vs ours {tuple(ours[k].shape)}"
                  for k in state if k in ours and tuple(state[k].shape) != tuple(ours[k].shape)]
        missing = [k for k in ours if top(k) in given and k not in state]
        if unexpected or shapes or missing:
            raise ValueError(format_key_problems(f"{type(self).__name__}: {what} does not fit", missing,
                                                 unexpected, shapes))
        self.load_state_dict(state, strict=False)
        status = {name: ("loaded" if name in given else "kept initialisation")
                  for name in sorted({top(k) for k in ours})}
        status.update({name: "not built" for name in not_built})
        return status


def options_dict(options: Any) -> Dict[str, Any]:
    return dataclasses.asdict(options) if options is not None else {}
