"""The VGG19 features CoCosNet's losses use: relu1_2, relu2_2, relu3_2, relu4_2, relu5_2.

The official code (``VGG19_feature_color_torchversion`` + ``models/vgg19_conv.pth``) runs a
Caffe-converted VGG19: input [-1, 1] -> [0, 1] (``--vgg_normal_correct``, set in every command),
RGB -> BGR, minus the Caffe mean (0.4076, 0.4580, 0.4850), times 255. That file is not on any
stable URL (CoCosNet issue #43; the same filename ships in the Deep-Exemplar-based-Video-
Colorization release zip), so it is looked up locally only (never downloaded). ``kind="caffe"``
uses it; ``kind="torchvision"`` (the default) uses the torchvision ImageNet VGG19 via
``methods.common.vgg`` with ImageNet mean/std normalisation instead -- same architecture and
layers, different weights and input scaling, so loss magnitudes differ from the official run.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from methods.base import BackboneSettings
from methods.common.vgg import VGGFeatures
from methods.common.weights import find_weights, provenance_of

LAYERS = ("relu1_2", "relu2_2", "relu3_2", "relu4_2", "relu5_2")  # official r12, r22, r32, r42, r52
CAFFE_FILE = "vgg19_conv.pth"
# Shown in the missing-file message only (a zip that contains the file; never fetched).
CAFFE_HINT_URL = ("https://github.com/zhangmozhe/Deep-Exemplar-based-Video-Colorization/releases/download/"
                  "v1.0/colorization_checkpoint.zip (contains vgg19_conv.pth; CoCosNet's README links a "
                  "Google Drive copy)")
CAFFE_MEAN_BGR = (0.40760392, 0.45795686, 0.48501961)
_CONVS = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3", "conv3_4",
          "conv4_1", "conv4_2", "conv4_3", "conv4_4", "conv5_1", "conv5_2")  # up to relu5_2


class CaffeVGG19(nn.Module):
    """The convs of the official ``VGG19_feature_color_torchversion`` (same parameter names, so the
    official ``vgg19_conv.pth`` loads with ``strict=False``: conv5_3/5_4 are not needed)."""

    def __init__(self):
        super().__init__()
        chans = {"1": (3, 64), "2": (64, 128), "3": (128, 256), "4": (256, 512), "5": (512, 512)}
        for name in _CONVS:
            block, idx = name[4], name[6]
            cin = chans[block][0] if idx == "1" else chans[block][1]
            self.add_module(name, nn.Conv2d(cin, chans[block][1], 3, padding=1))
        self.register_buffer("mean", torch.tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        h = ((x + 1) / 2).flip(1)  # [-1,1] RGB -> [0,1] BGR
        h = (h - self.mean) * 255
        out = []
        for name in _CONVS:
            if name.endswith("_1") and name != "conv1_1":
                h = F.max_pool2d(h, 2)
            h = F.relu(getattr(self, name)(h))
            if name in ("conv1_2", "conv2_2", "conv3_2", "conv4_2", "conv5_2"):
                out.append(h)
        return out


_CACHE: Dict[Tuple[str, int], Tuple[CaffeVGG19, str]] = {}


def _caffe_vgg(path: Optional[Path], seed: int) -> Tuple[CaffeVGG19, str]:
    """The frozen Caffe VGG19 (shared per process: callers must not modify it) and its provenance."""
    key = (str(path), seed)
    if key not in _CACHE:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)  # seeded random init when untrained (labelled so)
        net = CaffeVGG19()
        torch.random.set_rng_state(state)
        if path is not None:
            weights = torch.load(path, map_location="cpu", weights_only=True)
            missing = [k for k in net.state_dict() if k not in weights]
            if missing:
                raise ValueError(f"{path} is not the official vgg19_conv.pth: missing {missing[:4]}")
            net.load_state_dict({k: v for k, v in weights.items() if k in net.state_dict()})
        _CACHE[key] = (net, provenance_of(path, seed))
    return _CACHE[key]


class CoCosNetVGG(nn.Module):
    """Frozen VGG19 returning ``[relu1_2, relu2_2, relu3_2, relu4_2, relu5_2]``; ``provenance`` set."""

    def __init__(self, settings: BackboneSettings, kind: str = "torchvision"):
        super().__init__()
        self.kind = kind
        if kind == "torchvision":
            net = VGGFeatures(LAYERS, settings, purpose="CoCosNet's VGG losses")
            self.provenance = net.provenance
        elif kind == "caffe":
            local = dataclasses.replace(settings, download=False)  # no stable URL: local lookup only
            path = find_weights(CAFFE_FILE, CAFFE_HINT_URL, local, "CoCosNet's VGG losses (vgg: caffe)")
            net, self.provenance = _caffe_vgg(path, settings.seed)
        else:
            raise ValueError(f"cocosnet: vgg must be 'torchvision' or 'caffe', got {kind!r}")
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        if kind == "torchvision":
            # VGGFeatures keeps its (shared, frozen) convs out of state_dict itself; registering it
            # only lets .to(device) move its normalisation buffers.
            self.tv = net
        else:
            # Not registered: frozen weights stay out of checkpoints; moved lazily in forward.
            object.__setattr__(self, "_caffe", net)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if self.kind == "caffe":
            net = self._caffe
            if net.conv1_1.weight.device != x.device:
                net.to(x.device)
            return net(x)
        feats = self.tv(x)
        return [feats[k] for k in LAYERS]
