"""The VGG19 the official CoCosNet (v1 and v2) losses use: ``vgg19_conv.pth`` in the layout of
``VGG19_feature_color_torchversion`` (``models/networks/architecture.py``), reference/methods.md 2.1.

That file holds Caffe-converted weights with keys ``conv1_1.weight`` ... ``conv5_4.bias`` and
expects Caffe preprocessing: images in [0, 1] (``--vgg_normal_correct`` maps [-1, 1] first),
RGB -> BGR, minus the BGR mean (0.40760392, 0.45795686, 0.48501961), times 255. Its features
are ``r12, r22, r32, r42, r52`` (relu after conv{1..5}_2), max pooling between blocks.

The file is distributed through the CoCosNet README's Google-Drive link, which a plain HTTP GET
cannot fetch, so it is never downloaded here: put it in the weights directory (or
``$TORCH_HOME/hub/checkpoints``). Without it, ``allow_untrained`` builds a seeded random-init
network recorded as untrained; otherwise ``MissingWeightsError`` says where to put the file.
Alternatively the method option ``vgg: torchvision`` uses torchvision's ImageNet VGG19
(``methods/common/vgg.py``, RGB with ImageNet mean/std), whose numbers differ from the official.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import BackboneSettings
from methods.common.vgg import VGGFeatures
from methods.common.weights import find_weights, provenance_of

CAFFE_FILE = "vgg19_conv.pth"
# The CoCosNet-v2 README's "pretrained VGG model" link (a Google-Drive page: never downloaded).
CAFFE_URL = "https://drive.google.com/file/d/1D-z73DOt63BrPTgIxffN6Q4_L9qma9y8/view?usp=sharing"
BLOCKS = ((3, 64, 2), (64, 128, 2), (128, 256, 4), (256, 512, 4), (512, 512, 4))
BGR_MEAN = (0.40760392, 0.45795686, 0.48501961)
OFFICIAL_LAYERS = ("r12", "r22", "r32", "r42", "r52")
# The same layers in torchvision naming, for ``vgg: torchvision``.
TORCHVISION_NAMES = {"r12": "relu1_2", "r22": "relu2_2", "r32": "relu3_2", "r42": "relu4_2", "r52": "relu5_2"}


class CaffeVGG19(nn.Module):
    """Conv layers named as in the official file; returns the requested ``rXY`` activations."""

    def __init__(self, layers: Sequence[str] = OFFICIAL_LAYERS):
        super().__init__()
        self.layers = list(layers)
        self.last_block = max(int(l[1]) for l in self.layers)
        for b, (cin, cout, n) in enumerate(BLOCKS[: self.last_block], start=1):
            for i in range(1, n + 1):
                setattr(self, f"conv{b}_{i}", nn.Conv2d(cin if i == 1 else cout, cout, 3, padding=1))
        self.register_buffer("mean", torch.tensor(BGR_MEAN).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = (x + 1) / 2  # --vgg_normal_correct
        h = (x.flip(1) - self.mean) * 255.0
        out: Dict[str, torch.Tensor] = {}
        for b, (_, _, n) in enumerate(BLOCKS[: self.last_block], start=1):
            if b > 1:
                h = F.max_pool2d(h, 2, 2)
            for i in range(1, n + 1):
                h = F.relu(getattr(self, f"conv{b}_{i}")(h))
                if f"r{b}{i}" in self.layers:
                    out[f"r{b}{i}"] = h
        return out


class LossVGG(nn.Module):
    """Frozen VGG19 for the v2 losses, returning ``r12..r52`` from either weights source."""

    def __init__(self, source: str, settings: BackboneSettings, layers: Sequence[str] = OFFICIAL_LAYERS):
        super().__init__()
        self.layers: List[str] = list(layers)
        if source == "caffe":
            # Never attempt the download: the official link is an HTML page, not the file.
            path = find_weights(CAFFE_FILE, CAFFE_URL, dataclasses.replace(settings, download=False),
                                "CoCosNet v2's VGG losses (vgg: caffe)")
            net = CaffeVGG19(self.layers)
            if path is None:
                gen_state = torch.random.get_rng_state()
                torch.manual_seed(settings.seed)  # seeded random init, labelled untrained
                net = CaffeVGG19(self.layers)
                torch.random.set_rng_state(gen_state)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
                own = net.state_dict()
                # the file has all 16 convs; keep the ones up to the deepest requested block
                net.load_state_dict({k: v for k, v in state.items() if k in own}, strict=True)
            self.provenance = provenance_of(path, settings.seed)
            # Not a registered submodule: frozen, and kept out of checkpoints and optimisers.
            object.__setattr__(self, "net", net)
            self.names = {l: l for l in self.layers}
        elif source == "torchvision":
            self.names = {l: TORCHVISION_NAMES[l] for l in self.layers}
            # VGGFeatures keeps its shared weights unregistered itself
            self.net = VGGFeatures(list(self.names.values()), settings, purpose="CoCosNet v2's VGG losses")
            self.provenance = self.net.provenance
        else:
            raise ValueError(f"vgg must be 'caffe' (official vgg19_conv.pth) or 'torchvision', got {source!r}")
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True):  # always frozen in eval mode
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        if isinstance(self.net, CaffeVGG19) and self.net.mean.device != x.device:
            self.net.to(x.device)
        feats = self.net(x)
        return {l: feats[self.names[l]] for l in self.layers}
