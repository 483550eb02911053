"""FID and KID through clean-fid, on in-memory tensors, against sources or exemplars.

Pipeline: outputs / real images -> uint8 HWC (as saved PNGs would be) -> clean-fid's resizer for
the mode (``cleanfid.resize.build_resizer``) -> clean-fid's feature network -> (N, 2048) features
(``cleanfid.fid.get_batch_features``) -> mean / covariance -> clean-fid's Fréchet formula, or the
features -> clean-fid's KID. clean-fid's feature pipeline is used as is (only the folder loading is
replaced by tensors, mirroring ``cleanfid.utils.ResizeDataset``); its two final functions are
replaced by equal, faster ones: ``frechet.py`` (the trace of the matrix square root from a
symmetric spectrum instead of a 2048x2048 ``sqrtm``, 11-13 s) and ``kernel_distance.py`` (clean-fid's
KID subsets, all at once); both are tested against clean-fid's own functions.

Names: ``fid_sources`` / ``kid_sources`` compare the outputs with the real ground-truth images
(``reference_image``), ``fid_exemplars`` / ``kid_exemplars`` with the set of exemplar images
(MIDMs Table 1 "FID w/ exemplars"). A real set is the set of *distinct* real images fed (folder
semantics: an exemplar used by ten inputs counts once).

Modes (``eval.metric_options.<name>.mode``, recorded in settings): ``clean`` (default; PIL bicubic
resize, TorchScript Inception), ``legacy_tensorflow`` (TorchScript, resize inside the net, TTUR
numbers), ``legacy_pytorch`` (pytorch-fid's port and bilinear resize).

Weights: ``inception-2015-12-05.pt`` (clean, legacy_tensorflow) and
``pt_inception-2015-12-05-6726825d.pth`` (legacy_pytorch), found with ``find_weights`` (weights
dir, $BENCH_WEIGHTS_DIR, $TORCH_HOME/hub/checkpoints, and clean-fid's own ``/tmp`` location),
downloaded from clean-fid's URLs when allowed. With ``allow_untrained`` and no file, a documented
stand-in runs: clean-fid's ``InceptionV3`` (the pytorch-fid port of the same TF graph) with a
seeded He-normal init, in every mode; its numbers are stamped ``untrained(seed=N)``.

Real features are content-addressed and cached on disk (``feature_cache.FeatureBank``) under a key
of (data_key, split, resolution, mode, backbone provenance, n), so a sweep computes them once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.metrics.base import METRICS, Metric, MetricContext, reference_image, to_uint8_hwc
from bench.metrics.feature_cache import FeatureBank, FeatureCache, LRUFeatureMemo, cache_key, digest_of_list
from bench.metrics.frechet import GaussianStats, frechet_distance_stats
from bench.metrics.kernel_distance import kernel_distance
from methods.base import BackboneSettings
from methods.common.weights import find_weights, probing_weights, provenance_of

log = logging.getLogger("bench.metrics.fid")

MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")
TORCHSCRIPT_FILE = "inception-2015-12-05.pt"
PYTORCH_FILE = "pt_inception-2015-12-05-6726825d.pth"
CLEANFID_TMP_DIR = Path("/tmp")  # where clean-fid itself looks for / downloads the TorchScript file
FEATURE_DIM = 2048
STAND_IN = "stand-in: clean-fid InceptionV3 (pytorch-fid port of inception-2015-12-05), seeded He-normal init"
IMPLEMENTATION = ("clean-fid 0.1.35 features (in-memory tensors, uint8); its Fréchet and KID formulas via "
                  "bench.metrics.frechet / bench.metrics.kernel_distance")
STAND_IN_TF_RESIZE = "; the TorchScript's internal resize replaced by bilinear (align_corners=False) to 299"


def _torchscript_url() -> str:
    from cleanfid.downloads_helper import inception_url

    return inception_url


def _pytorch_url() -> str:
    from cleanfid.inception_pytorch import FID_WEIGHTS_URL

    return FID_WEIGHTS_URL


# --------------------------------------------------------------------------------------------
# Feature network


@contextlib.contextmanager
def _quiet():
    """torchvision's ``pretrained=`` deprecation (clean-fid 0.1.35 passes it) is noise here;
    everything else still warns."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*pretrained.*")
        warnings.filterwarnings("ignore", message=".*weights.*")
        yield


def locate_inception(mode: str, settings: BackboneSettings) -> Optional[Path]:
    """The weights file for ``mode``: configured dirs / hub cache / clean-fid's /tmp, else download,
    else None (allow_untrained) or MissingWeightsError naming file, URL and directories."""
    if mode not in MODES:
        raise ValueError(f"unknown clean-fid mode {mode!r}; choose one of {MODES}")
    torchscript = mode != "legacy_pytorch"
    filename = TORCHSCRIPT_FILE if torchscript else PYTORCH_FILE
    url = _torchscript_url() if torchscript else _pytorch_url()
    no_fetch = dataclasses.replace(settings, download=False, allow_untrained=True)
    found = find_weights(filename, url, no_fetch, "FID/KID")
    if found is None and torchscript and (CLEANFID_TMP_DIR / filename).is_file():
        found = CLEANFID_TMP_DIR / filename
    if found is not None:
        return found
    return find_weights(filename, url, settings, f"FID/KID (clean-fid mode {mode!r}, Inception)")


def _he_init_(net: nn.Module, seed: int) -> None:
    """Seeded He-normal (fan_in, ReLU gain) init of every conv/linear weight.

    Why not torchvision's own init: its truncated normal (std 0.1) explodes through ~90 layers
    without trained batch-norm statistics, and PyTorch's default (kaiming_uniform a=sqrt(5))
    vanishes; He-normal keeps activations O(1), so distances are finite and non-degenerate.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.zero_()


def _random_fid_inception_state(seed: int) -> Dict[str, torch.Tensor]:
    """A seeded random state dict with the layout of clean-fid's ``fid_inception_v3``.

    The module list mirrors ``cleanfid.inception_pytorch.fid_inception_v3`` minus its download;
    ``_pytorch_inception`` then loads the result *strictly* into clean-fid's own builder, so any
    mismatch with clean-fid's architecture fails loudly instead of silently differing.
    """
    import cleanfid.inception_pytorch as ip

    with _quiet():
        net = ip._inception_v3(num_classes=1008, aux_logits=False, pretrained=False)
    net.Mixed_5b = ip.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = ip.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = ip.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = ip.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = ip.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = ip.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = ip.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = ip.FIDInceptionE_1(1280)
    net.Mixed_7c = ip.FIDInceptionE_2(2048)
    _he_init_(net, seed)
    return net.state_dict()


def _pytorch_inception(state: Dict[str, torch.Tensor]) -> nn.Module:
    """clean-fid's ``InceptionV3(output_blocks=[3], resize_input=False)`` with ``state`` loaded in
    place of its torch.hub download (clean-fid calls ``inception.load_state_dict`` strictly)."""
    import cleanfid.inception_pytorch as ip

    with _quiet(), mock.patch.object(ip, "load_state_dict_from_url", lambda *a, **k: state):
        return ip.InceptionV3(output_blocks=[3], resize_input=False).eval()


class InceptionExtractor:
    """clean-fid's resizer + feature network for one mode: uint8 (B,H,W,3) -> (B, 2048) float32."""

    def __init__(self, mode: str, settings: BackboneSettings, device: torch.device):
        from cleanfid.resize import build_resizer

        path = locate_inception(mode, settings)
        self.mode, self.device = mode, device
        self.provenance = provenance_of(path, settings.seed)
        self.untrained = path is None
        self.resize = build_resizer(mode)
        # The sweep preflight only asks which file this needs (it is ``path``'s look-up); building a
        # random Inception, even on the meta device, would cost it seconds per metric.
        self.net = None if probing_weights() else self._build(mode, path, settings.seed, device)
        if path is None:
            self.backbone = STAND_IN + (STAND_IN_TF_RESIZE if mode == "legacy_tensorflow" else "")
        else:
            self.backbone = f"clean-fid {mode} Inception ({path.name})"

    @staticmethod
    def _build(mode: str, path: Optional[Path], seed: int, device: torch.device) -> Callable:
        """The callable clean-fid's ``build_feature_extractor(mode)`` would return, from ``path``."""
        if path is not None and mode != "legacy_pytorch":
            from cleanfid.inception_torchscript import InceptionV3W

            model = InceptionV3W(str(path.parent), download=False,
                                 resize_inside=(mode == "legacy_tensorflow")).to(device).eval()
            return model
        if path is not None:
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            state = _random_fid_inception_state(seed)
        model = _pytorch_inception(state).to(device)
        resize_inside = path is None and mode == "legacy_tensorflow"

        def model_fn(x: torch.Tensor) -> torch.Tensor:
            # as cleanfid.features.feature_extractor("pytorch_inception"): [0,255] -> /255 -> net
            if resize_inside:  # stand-in for the TorchScript's internal resize
                x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            return model(x / 255)[0].squeeze(-1).squeeze(-1)

        return model_fn

    def _to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """One resized HWC array -> CHW float in [0, 255], as ``cleanfid.utils.ResizeDataset``."""
        resized = self.resize(image)
        t = torch.from_numpy(np.ascontiguousarray(resized).transpose(2, 0, 1).copy())
        return t.float()  # uint8 -> its values (ToTensor()*255); float32 -> unchanged

    def __call__(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        from cleanfid.fid import get_batch_features

        out = []
        for i in range(0, len(images), batch_size):
            batch = torch.stack([self._to_tensor(im) for im in images[i:i + batch_size]])
            out.append(get_batch_features(batch, self.net, self.device))
        return np.concatenate(out).astype(np.float32, copy=False)


_EXTRACTORS: Dict[Tuple, InceptionExtractor] = {}
_FAKE_MEMO: Dict[Tuple, LRUFeatureMemo] = {}


def get_extractor(mode: str, settings: BackboneSettings, device: torch.device) -> InceptionExtractor:
    """One extractor per (mode, weights settings, device) per process (Inception is ~100 MB)."""
    if probing_weights():  # the preflight must see every look-up, and must not cache a meta-device network
        return InceptionExtractor(mode, settings, device)
    key = (mode, settings.weights_dir, settings.allow_untrained, settings.seed, str(device))
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = InceptionExtractor(mode, settings, device)
    return _EXTRACTORS[key]


# --------------------------------------------------------------------------------------------
# Statistics -> numbers (clean-fid's formulas, computed faster: frechet.py, kernel_distance.py)


def fid_from_features(fake: np.ndarray, real: np.ndarray, real_stats: Optional[GaussianStats] = None) -> float:
    """FID of two feature sets: clean-fid's ``fid_from_feats`` (mean, ``np.cov``, Fréchet formula),
    through ``frechet.py``; ``real_stats`` are the real set's statistics when already at hand."""
    check_sample_count("FID", len(fake), len(real), minimum=2)
    real_stats = real_stats if real_stats is not None else GaussianStats.from_features(real)
    return frechet_distance_stats(GaussianStats.from_features(fake), real_stats)


def kid_subset_size(n_fake: int, n_real: int, requested: int = 1000) -> int:
    """clean-fid's subset size m = min(n_fake, n_real, requested); KID needs m >= 2."""
    check_sample_count("KID", n_fake, n_real, minimum=2)
    return min(n_fake, n_real, requested)


def kid_from_features(fake: np.ndarray, real: np.ndarray, num_subsets: int = 100,
                      max_subset_size: int = 1000, seed: int = 0) -> float:
    """clean-fid's KID (``kernel_distance.py``) with the global ``np.random`` seeded for
    reproducibility (clean-fid draws the subsets unseeded) and restored afterwards."""
    kid_subset_size(len(fake), len(real), max_subset_size)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return kernel_distance(fake, real, num_subsets=num_subsets, max_subset_size=max_subset_size)
    finally:
        np.random.set_state(state)


def check_sample_count(what: str, n_fake: int, n_real: int, minimum: int) -> None:
    if n_fake < minimum or n_real < minimum:
        raise ValueError(f"{what} needs at least {minimum} generated and {minimum} distinct real images; "
                         f"got {n_fake} generated and {n_real} real")


# --------------------------------------------------------------------------------------------
# Metrics


class _InceptionDistance(Metric):
    """Shared plumbing: features of outputs and of one real set, then one number."""

    reference = "sources"  # or "exemplars"
    kind = "fid"  # or "kid"

    def __init__(self, ctx: MetricContext):
        super().__init__(ctx)
        opts = dict(ctx.options)
        self.mode = str(opts.pop("mode", "clean"))
        self.num_subsets = int(opts.pop("kid_subsets", 100))
        self.max_subset = int(opts.pop("kid_subset_size", 1000))
        self.batch_size = int(opts.pop("batch_size", 32))
        if opts:
            raise ValueError(f"{self.name}: unknown options {sorted(opts)}; valid: mode, kid_subsets, "
                             f"kid_subset_size, batch_size")
        self.extractor = get_extractor(self.mode, ctx.backbones, ctx.device)
        self.provenance = {"inception": self.extractor.provenance}
        parts = dict(data_key=ctx.data_key, split=ctx.data.split, resolution=ctx.data.resolution,
                     mode=self.mode, backbone=self.extractor.provenance, n=ctx.data.size)
        self.bank = FeatureBank.shared(FeatureCache(ctx.cache_dir), cache_key(kind="inception", **parts), parts)
        self.memo = _FAKE_MEMO.setdefault((id(self.extractor),), LRUFeatureMemo())
        self.fake: List[np.ndarray] = []
        self.real_digests: Dict[str, None] = {}  # insertion-ordered set

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.reference}"

    def _extract(self, images: np.ndarray) -> np.ndarray:
        return self.extractor(images, self.batch_size)

    def _real_images(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return reference_image(batch) if self.reference == "sources" else batch["exemplar"]

    def update(self, batch, out):
        self.fake.append(self.memo.lookup(to_uint8_hwc(out.output), self._extract))
        digests, _ = self.bank.lookup(to_uint8_hwc(self._real_images(batch)), self._extract)
        self.real_digests.update(dict.fromkeys(digests))

    def _features(self) -> Tuple[np.ndarray, List[str], np.ndarray]:
        self.bank.flush()
        digests = list(self.real_digests)
        fake = np.concatenate(self.fake) if self.fake else np.zeros((0, FEATURE_DIM), np.float32)
        real = np.stack([self.bank.rows[d] for d in digests]) if digests else np.zeros((0, FEATURE_DIM))
        return fake, digests, real

    def _record(self, n_fake: int, n_real: int) -> None:
        self.settings.update({"mode": self.mode, "backbone": self.extractor.backbone,
                              "n_generated": n_fake, "n_real_distinct": n_real,
                              "implementation": IMPLEMENTATION})

    def compute(self):
        raise NotImplementedError


class _FID(_InceptionDistance):
    kind = "fid"

    def compute(self):
        fake, digests, real = self._features()
        check_sample_count("FID", len(fake), len(real), minimum=2)
        self._record(len(fake), len(real))
        # Statistics of this exact real set, cached: with N > 2048 their covariance factor is a
        # pivoted Cholesky of a 2048x2048 matrix, worth keeping across periodic evaluations.
        stats = self.bank.cache.get_or_compute(
            "refgauss", cache_key(bank=self.bank.key, images=digest_of_list(digests)), {"n": len(digests)},
            lambda: _stats_arrays(GaussianStats.from_features(real)))
        self.settings["covariance_rank_deficient"] = min(len(fake), len(real)) <= FEATURE_DIM
        real_stats = GaussianStats(stats["mu"], float(stats["trace"]), stats["factor"])
        return {self.name: fid_from_features(fake, real, real_stats)}


def _stats_arrays(stats: GaussianStats) -> Dict[str, np.ndarray]:
    return {"mu": stats.mu, "trace": np.asarray(stats.trace), "factor": stats.factor}


class _KID(_InceptionDistance):
    kind = "kid"

    def compute(self):
        fake, _, real = self._features()
        m = kid_subset_size(len(fake), len(real), self.max_subset)
        self._record(len(fake), len(real))
        self.settings.update({"subset_size": m, "subsets": self.num_subsets,
                              "subset_size_requested": self.max_subset, "subset_seed": self.ctx.seed})
        return {self.name: kid_from_features(fake, real, self.num_subsets, self.max_subset, self.ctx.seed)}


@METRICS.register("fid_sources")
class FIDSources(_FID):
    """FID of the outputs vs the real ground-truth images (lower is better)."""

    reference = "sources"


@METRICS.register("fid_exemplars")
class FIDExemplars(_FID):
    """FID of the outputs vs the distinct exemplar images (MIDMs Table 1; lower = closer style)."""

    reference = "exemplars"


@METRICS.register("kid_sources")
class KIDSources(_KID):
    """KID (clean-fid, cubic polynomial kernel, mean over subsets) vs the ground truths."""

    reference = "sources"


@METRICS.register("kid_exemplars")
class KIDExemplars(_KID):
    """KID vs the distinct exemplar images."""

    reference = "exemplars"
