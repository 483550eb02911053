"""Which folders each metric reads when ``bench.score`` feeds it, checked before anything runs.

The harness feeds a metric evaluation batches (``image`` = ground truth, ``exemplar``, ``label``,
``exemplar_label``) and the method's output; ``bench.score`` fills the same keys from folders:

  --fake                 the output (``MethodOutput.output``); lpips_diversity reads K >= 2 of them
  --real                 ``image``, the ground truth of each output
  --exemplars            ``exemplar``, the exemplar each output was made with
  --conditions           ``label``, the input's class map (single-channel class ids)
  --exemplar-conditions  ``exemplar_label``, the exemplar's class map
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from bench.score.pairing import ScoreInputError

ALIASES = {"fid": "fid_sources", "kid": "kid_sources"}  # the folder-vs-folder FID/KID of clean-fid

INPUT_OPTIONS = {"real": "--real", "exemplars": "--exemplars", "conditions": "--conditions",
                 "exemplar_conditions": "--exemplar-conditions", "fakes": "two or more --fake folders"}

NEEDS: Dict[str, Tuple[str, ...]] = {
    "fid_sources": ("real",), "kid_sources": ("real",),
    "fid_exemplars": ("exemplars",), "kid_exemplars": ("exemplars",),
    "swd": ("real",), "l1": ("real",), "psnr": ("real",), "ssim": ("real",), "lpips_gt": ("real",),
    "lpips_diversity": ("fakes",),
    "sem_consistency": ("real", "conditions"), "sem_consistency_global": ("real",),
    "style_relevance": ("exemplars", "conditions", "exemplar_conditions"), "style_relevance_global": ("exemplars",),
}
NOT_SCORABLE = {"warp": "it scores a method's warped exemplars, which folders of images do not hold"}


@dataclass(frozen=True)
class Given:
    """Which inputs the command line gave."""

    fakes: int
    real: bool
    exemplars: int
    conditions: bool
    exemplar_conditions: bool

    def has(self, need: str) -> bool:
        return {"fakes": self.fakes >= 2, "real": self.real, "exemplars": self.exemplars > 0,
                "conditions": self.conditions, "exemplar_conditions": self.exemplar_conditions}[need]


def missing_inputs(name: str, given: Given) -> List[str]:
    return [INPUT_OPTIONS[n] for n in NEEDS[name] if not given.has(n)]


def resolve_metrics(requested: Sequence[str], given: Given, registered: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """``--metrics`` -> (harness metric names, skipped name -> reason). ``all`` is every metric whose
    inputs were given (the others are listed as skipped); a named metric whose inputs are missing
    is an error naming them."""
    if given.exemplars not in (0, 1, given.fakes):
        raise ScoreInputError(f"{given.exemplars} --exemplars folders for {given.fakes} --fake folders: give one "
                              f"(the first --fake's exemplars) or one per --fake, in the same order")
    if list(requested) == ["all"]:
        chosen, skipped = [], {}
        for name in NEEDS:
            miss = missing_inputs(name, given)
            if miss:
                skipped[name] = "needs " + ", ".join(miss)
            else:
                chosen.append(name)
        return chosen, skipped
    names: List[str] = []
    for raw in requested:
        name = ALIASES.get(raw, raw)
        if name in NOT_SCORABLE:
            raise ScoreInputError(f"metric {raw!r} cannot score folders: {NOT_SCORABLE[name]}")
        if name not in NEEDS:
            known = sorted(set(NEEDS) | set(ALIASES))
            extra = " (a registered metric, but not one bench.score can feed)" if name in registered else ""
            raise ScoreInputError(f"unknown metric {raw!r}{extra}; choose from {', '.join(known)} or all")
        if name not in names:
            names.append(name)
    problems = [f"{n} needs {', '.join(missing_inputs(n, given))}" for n in names if missing_inputs(n, given)]
    if problems:
        raise ScoreInputError("missing inputs: " + "; ".join(problems))
    return names, {}


def check_count(names: Sequence[str], n_images: int) -> None:
    """FID and KID estimate a distribution: clean-fid's covariance and subsets need two images."""
    distribution = [n for n in names if n.startswith(("fid_", "kid_"))]
    if distribution and n_images < 2:
        raise ScoreInputError(f"{', '.join(distribution)} need at least 2 images per folder; got {n_images}")
