"""What every dataset gives a method: the sample dictionary and the dataset's description.

A sample is a dict of tensors (images in [-1, 1], CHW):

  ``cond``            condition map, ``(C_cond, H, W)`` float (one-hot mask, edge map, pose map ...)
  ``cond_vis``        an RGB picture of the condition for sample grids, ``(3, H, W)`` in [-1, 1]
  ``exemplar``        the exemplar (style) image, ``(3, H, W)``
  ``exemplar_cond``   the exemplar's own condition map, ``(C_cond, H, W)``
  ``image``           the real photo that belongs to ``cond`` (its own appearance), ``(3, H, W)``
  ``target``          optional: the exact ground truth for (cond, exemplar) when it is known
                      (the embedded dataset; self-pair datasets where the exemplar is the same
                      subject); metrics fall back to ``image`` when it is absent
  ``label``           optional: ``(H, W)`` int64 class map of ``cond`` (semantic metrics)
  ``exemplar_label``  optional: ``(H, W)`` int64 class map of the exemplar
  ``corr``            optional: ``(2, H, W)`` true correspondence, for every condition pixel the
                      (x, y) position in the exemplar, normalised to [-1, 1] (``grid_sample`` order)
  ``index``           int64 scalar: the sample's index in the split
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch

REQUIRED_KEYS = ("cond", "cond_vis", "exemplar", "exemplar_cond", "image")


@dataclass
class DataInfo:
    """What a method and the metrics need to know about a dataset before seeing a sample."""

    name: str
    variant: str
    split: str
    size: int
    resolution: int
    cond_channels: int
    num_classes: Optional[int] = None  # classes in ``label`` (None: no label map)
    has_target: bool = False  # exact ground truth for (cond, exemplar) is provided
    has_corr: bool = False
    # Everything that identifies the data a run saw (roots, lists, counts, preprocessing); logged as params.
    params: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DatasetSpec:
    """A dataset as a sweep names it: registry name, conditioning variant, location and options."""

    name: str
    variant: Optional[str] = None  # None: the dataset's default conditioning
    root: Optional[str] = None  # on-disk root; the embedded dataset needs none
    train_split: str = "train"
    eval_split: str = "test"
    max_samples: Optional[int] = None  # cap on samples per split (None: all)
    skip_bad: bool = False  # skip unreadable samples (recorded) instead of failing
    options: Dict[str, Any] = field(default_factory=dict)
    # Run this dataset at its own resolution instead of scale.resolution (the papers compare at
    # 512 on DeepFashion/MetFaces but 256 on ADE20K within one table).
    resolution: Optional[int] = None


class ExemplarDataset(torch.utils.data.Dataset):
    """Base class: subclasses set ``self.info`` and implement ``__len__``/``__getitem__``.

    Subclasses declare an ``Options`` dataclass; unknown option keys are rejected by the sweep
    loader using its fields. ``variants`` lists the accepted conditioning variants, first = default.
    """

    Options: type = None  # a dataclass type
    variants: tuple = ("default",)

    info: DataInfo

    def __init__(self, spec: DatasetSpec, split: str, resolution: int, seed: int = 0):
        self.spec = spec
        self.split = split
        self.resolution = resolution
        self.seed = seed
        self.variant = spec.variant or self.variants[0]
        if self.variant not in self.variants:
            raise ValueError(
                f"dataset {spec.name!r}: unknown variant {self.variant!r}; choose one of {list(self.variants)}"
            )
        self.options = make_options(self.Options, spec.options, f"dataset {spec.name!r} options")


def make_options(options_cls: Optional[type], values: Dict[str, Any], where: str):
    """Build an ``Options`` dataclass from a dict, rejecting unknown keys with the nearest valid one."""
    if options_cls is None:
        if values:
            raise ValueError(f"{where}: this takes no options, got {sorted(values)}")
        return None
    import difflib

    names = [f.name for f in dataclasses.fields(options_cls)]
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(names)}")
    return options_cls(**values)
