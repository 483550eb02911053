"""ImageNet VGG19 features (torchvision layout) for perceptual losses and the VGG metrics.

Layer indices in ``torchvision.models.vgg19().features`` (printed in reference/metrics.md 3.3):
relu1_1=1, relu1_2=3, relu2_1=6, relu2_2=8, relu3_1=11, relu3_2=13, relu4_1=20, relu4_2=22,
relu5_1=29, relu5_2=31. The ReLUs are in-place, so a layer's output is read after its index.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from methods.base import BackboneSettings
from methods.common.weights import find_weights, private_rng, probing_weights, provenance_of

VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"

LAYER_INDEX = {
    "relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu2_2": 8, "relu3_1": 11, "relu3_2": 13,
    "relu3_4": 17, "relu4_1": 20, "relu4_2": 22, "relu4_4": 26, "relu5_1": 29, "relu5_2": 31,
    "relu5_4": 35,
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_CACHE: Dict[Tuple, Tuple[nn.Module, str]] = {}


def vgg19_features(state: Optional[Mapping[str, torch.Tensor]] = None) -> nn.Module:
    """torchvision's VGG19 ``features`` stack (``make_layers(cfgs["E"])``), with ``state`` loaded when
    given (torchvision's key layout: ``features.N.weight`` / ``features.N.bias``, every conv), frozen
    and in eval mode. Without ``state`` it keeps torch's construction-time init."""
    from torchvision.models.vgg import cfgs, make_layers

    features = make_layers(cfgs["E"], batch_norm=False)
    if state is not None:
        features.load_state_dict({k[len("features."):]: v for k, v in state.items() if k.startswith("features.")})
    features = features.eval()
    for p in features.parameters():
        p.requires_grad_(False)
    return features


def load_vgg19_features(settings: BackboneSettings, purpose: str = "VGG19") -> Tuple[nn.Module, str]:
    """The frozen VGG19 ``features`` stack and its provenance string.

    Shared per process (weights are 548 MB at full size): callers must not modify it.
    """
    path = find_weights(VGG19_FILE, VGG19_URL, settings, purpose)
    # On the CPU whatever the caller's default device (e.g. a network built on the meta device to
    # check a checkpoint's shapes): the cached copy must hold real weights. Only the sweep preflight
    # (probing which files are needed) builds it on the meta device, cached apart.
    device = "meta" if probing_weights() else "cpu"
    key = (str(path), settings.seed, device)
    if key not in _CACHE:
        with private_rng(), torch.device(device):  # cached per process: building must not move the global stream
            # Only the convolutional stack: the classifier (120M parameters) is never used.
            if path is None:
                features = vgg19_features()
                torch.manual_seed(settings.seed)  # seeded random init (torchvision's VGG init), labelled untrained
                for m in features.modules():
                    if isinstance(m, nn.Conv2d):
                        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                        nn.init.zeros_(m.bias)
            else:
                features = vgg19_features(torch.load(path, map_location="cpu", weights_only=True))
        _CACHE[key] = (features, provenance_of(path, settings.seed))
    return _CACHE[key]


class VGGFeatures(nn.Module):
    """Returns the requested VGG19 activations for images in [-1, 1].

    ``imagenet_normalize`` (default, what the weights were trained on and what the metrics use):
    the image is mapped to [0, 1] and normalised with the ImageNet mean/std inside. False: the
    [-1, 1] image goes in as it is (SPADE's official VGG loss does this).
    ``features``: a VGG19 ``features`` stack to use instead of the shared pretrained one (e.g. the
    weights of a parity fixture, ``vgg19_features(state)``); its provenance is ``given``.
    """

    def __init__(self, layers: Iterable[str], settings: BackboneSettings, purpose: str = "VGG19",
                 imagenet_normalize: bool = True, features: Optional[nn.Module] = None):
        super().__init__()
        self.layers: List[str] = list(layers)
        unknown = [l for l in self.layers if l not in LAYER_INDEX]
        if unknown:
            raise ValueError(f"unknown VGG19 layers {unknown}; known: {sorted(LAYER_INDEX)}")
        if features is None:
            features, self.provenance = load_vgg19_features(settings, purpose)
        else:
            self.provenance = "given"
        self.imagenet_normalize = imagenet_normalize
        last = max(LAYER_INDEX[l] for l in self.layers)
        # Not registered as a submodule: it is shared and frozen, and must stay out of checkpoints.
        object.__setattr__(self, "_features", features[: last + 1])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self._features
        if feats[0].weight.device != x.device:
            feats.to(x.device)
        h = ((x + 1) / 2 - self.mean) / self.std if self.imagenet_normalize else x
        out: Dict[str, torch.Tensor] = {}
        wanted = {LAYER_INDEX[l]: l for l in self.layers}
        for i, layer in enumerate(feats):
            h = layer(h)
            if i in wanted:
                out[wanted[i]] = h
        return out
