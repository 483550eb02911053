"""The Caffe-converted VGG19 of the CoCosNet papers, and one wrapper giving it or torchvision's.

The official CoCosNet (v1 and v2) losses and the authors' evaluation scripts (``sc_vgg_metric.py``,
``ref_vgg_metric.py``) run ``VGG19_feature_color_torchversion`` loaded from ``vgg19_conv.pth``
(reference/methods.md 2.1, reference/metrics.md 5.2-5.3): Caffe-converted weights with keys
``conv1_1.weight`` ... ``conv5_4.bias``, max pooling between blocks, and Caffe preprocessing of
images in [-1, 1]: -> [0, 1] (``--vgg_normal_correct``), RGB -> BGR, minus the BGR mean
(0.40760392, 0.45795686, 0.48501961), times 255 (no std division). Their features ``r12, r22,
r32, r42, r52`` are called ``relu1_2`` ... ``relu5_2`` here, as in torchvision.

The file is distributed through a Google-Drive link that a plain HTTP GET cannot fetch, so it is
never downloaded: put it in the weights directory (or ``$TORCH_HOME/hub/checkpoints``). Without
it, ``BackboneSettings.allow_untrained`` builds a seeded random-init network recorded as
untrained; otherwise ``MissingWeightsError`` names the file and where to put it. Only the convs up
to the deepest requested layer are built and loaded, strictly; deeper keys in the file (conv5_3,
conv5_4) are ignored.

``VGG19Features(backbone, layers, ...)`` returns the same layer names from ``backbone="caffe"``
(this network) or ``"torchvision"`` (ImageNet VGG19 via ``methods.common.vgg``, RGB with ImageNet
mean/std): same architecture, different weights and input scaling, so numbers differ.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import BackboneSettings
from methods.common.vgg import VGGFeatures
from methods.common.weights import find_weights, private_rng, provenance_of

CAFFE_FILE = "vgg19_conv.pth"
# Shown in the missing-file message only (never fetched).
CAFFE_URL = ("https://drive.google.com/file/d/1D-z73DOt63BrPTgIxffN6Q4_L9qma9y8/view?usp=sharing "
             "(the CoCosNet READMEs' Google-Drive link; the same file is in "
             "https://github.com/zhangmozhe/Deep-Exemplar-based-Video-Colorization/releases/download/v1.0/"
             "colorization_checkpoint.zip)")
CAFFE_MEAN_BGR = (0.40760392, 0.45795686, 0.48501961)
BACKBONES = ("caffe", "torchvision")
# (in channels, out channels, convs) per block, as in the official file
BLOCKS = ((3, 64, 2), (64, 128, 2), (128, 256, 4), (256, 512, 4), (512, 512, 4))
CONVS = tuple(f"conv{b}_{i}" for b, (_, _, n) in enumerate(BLOCKS, start=1) for i in range(1, n + 1))
CAFFE_LAYERS = tuple(f"relu{c[4:]}" for c in CONVS)  # relu1_1 ... relu5_4
# The official code's names for the layers its losses and metrics use.
OFFICIAL_NAMES = {"r12": "relu1_2", "r22": "relu2_2", "r32": "relu3_2", "r42": "relu4_2", "r52": "relu5_2"}


def caffe_preprocess(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], RGB -> the Caffe network's input: [0, 1], BGR, minus the mean, x 255."""
    mean = torch.tensor(CAFFE_MEAN_BGR, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (((x + 1) / 2).flip(1) - mean) * 255.0


class CaffeVGG19(nn.Module):
    """The first ``num_convs`` convs of ``VGG19_feature_color_torchversion``, named as in the file."""

    def __init__(self, num_convs: int = len(CONVS)):
        super().__init__()
        for b, (cin, cout, n) in enumerate(BLOCKS, start=1):
            for i in range(1, n + 1):
                name = f"conv{b}_{i}"
                if CONVS.index(name) < num_convs:
                    self.add_module(name, nn.Conv2d(cin if i == 1 else cout, cout, 3, padding=1))

    def forward(self, x: torch.Tensor, layers: Sequence[str]) -> Dict[str, torch.Tensor]:
        """``layers`` (e.g. ``relu3_2``) of images in [-1, 1], computed up to the deepest one."""
        last = max(CAFFE_LAYERS.index(l) for l in layers)
        h = caffe_preprocess(x)
        out: Dict[str, torch.Tensor] = {}
        for name in CONVS[: last + 1]:
            if name.endswith("_1") and name != "conv1_1":
                h = F.max_pool2d(h, 2, 2)
            h = F.relu(getattr(self, name)(h))
            out[f"relu{name[4:]}"] = h
        return {l: out[l] for l in layers}


_CACHE: Dict[Tuple[str, int, int, str], Tuple[CaffeVGG19, str]] = {}


def _num_convs(layers: Sequence[str]) -> int:
    unknown = [l for l in layers if l not in CAFFE_LAYERS]
    if unknown or not layers:
        raise ValueError(f"unknown Caffe VGG19 layers {list(layers)}; known: {list(CAFFE_LAYERS)}")
    return max(CAFFE_LAYERS.index(l) for l in layers) + 1


def _frozen(net: CaffeVGG19, weights: Optional[Mapping[str, torch.Tensor]], origin: str) -> CaffeVGG19:
    """``net`` loaded with ``weights`` (the official key layout; strict on the convs ``net`` has,
    deeper ones such as conv5_3 / conv5_4 are not needed), in eval mode, without gradients."""
    if weights is not None:
        own = net.state_dict()
        missing = [k for k in own if k not in weights]
        if missing:
            raise ValueError(f"{origin} is not the official {CAFFE_FILE}: missing keys {missing[:4]}")
        try:
            net.load_state_dict({k: weights[k] for k in own}, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{origin} is not the official {CAFFE_FILE}: {e}") from e
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def load_caffe_vgg19(settings: BackboneSettings, layers: Sequence[str],
                     purpose: str = "the Caffe VGG19") -> Tuple[CaffeVGG19, str]:
    """The frozen Caffe VGG19 with the convs ``layers`` need, and its provenance.

    Shared per process (callers must not modify it). Looked up locally only (no stable URL). The
    cache is per device the network was built on (the default device: a network built on the meta
    device, e.g. for checking a converter, must never be handed out for real use).
    """
    num_convs = _num_convs(layers)
    path = find_weights(CAFFE_FILE, CAFFE_URL, dataclasses.replace(settings, download=False), purpose)
    key = (str(path), settings.seed, num_convs, torch.empty(0).device.type)
    if key not in _CACHE:
        with private_rng(settings.seed):  # seeded random init when untrained (labelled so)
            net = CaffeVGG19(num_convs)
        weights = torch.load(path, map_location="cpu", weights_only=True) if path is not None else None
        _CACHE[key] = (_frozen(net, weights, str(path)), provenance_of(path, settings.seed))
    return _CACHE[key]


class VGG19Features(nn.Module):
    """Frozen VGG19 activations ``{layer: tensor}`` (in ``layers`` order) of images in [-1, 1].

    ``backbone``: ``caffe`` (``vgg19_conv.pth``, Caffe preprocessing) or ``torchvision`` (ImageNet
    weights, ImageNet mean/std). ``provenance`` is the weights' hash or ``untrained(seed=N)``.
    The network is shared and kept out of ``state_dict`` (and so out of checkpoints). ``state_dict``
    (caffe only): load these official-layout weights into a private network instead of looking up
    ``vgg19_conv.pth``.
    """

    def __init__(self, backbone: str, layers: Sequence[str], settings: BackboneSettings, purpose: str = "VGG19",
                 state_dict: Optional[Mapping[str, torch.Tensor]] = None):
        super().__init__()
        self.backbone = backbone
        self.layers: List[str] = list(layers)
        if state_dict is not None:
            # Given weights (e.g. an official-format state dict in a parity check): a private,
            # uncached network with the state dict's dtype; provenance is the caller's business.
            if backbone != "caffe":
                raise ValueError(f"{purpose}: state_dict is only supported for the caffe backbone, not {backbone!r}")
            dtype = next(iter(state_dict.values())).dtype
            net = _frozen(CaffeVGG19(_num_convs(self.layers)).to(dtype), state_dict, "the given state dict")
            object.__setattr__(self, "_caffe", net)
            self.provenance = "given state dict"
        elif backbone == "torchvision":
            # VGGFeatures keeps its shared convs unregistered itself; registering it only lets
            # .to(device) move its normalisation buffers.
            self.tv = VGGFeatures(self.layers, settings, purpose)
            self.provenance = self.tv.provenance
        elif backbone == "caffe":
            net, self.provenance = load_caffe_vgg19(settings, self.layers, purpose)
            object.__setattr__(self, "_caffe", net)  # not registered: moved lazily in forward
        else:
            raise ValueError(f"{purpose}: the VGG19 backbone must be one of {BACKBONES}, got {backbone!r}")

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if self.backbone == "torchvision":
            feats = self.tv(x)
            return {l: feats[l] for l in self.layers}
        net = self._caffe
        if net.conv1_1.weight.device != x.device:
            net.to(x.device)
        return net(x, self.layers)
