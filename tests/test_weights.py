"""Pretrained weights: found by name in the weights dir, hashed for provenance, never faked."""
from __future__ import annotations

import hashlib

import pytest
import torch

from methods.base import BackboneSettings
from methods.common.vgg import VGG19_FILE, VGGFeatures
from methods.common.weights import MissingWeightsError, find_weights


def test_weights_file_is_loaded_and_hashed(tmp_path):
    from torchvision.models import vgg19

    torch.manual_seed(3)
    model = vgg19(weights=None)
    path = tmp_path / VGG19_FILE
    torch.save(model.state_dict(), path)
    feats = VGGFeatures(["relu1_2", "relu3_2"], BackboneSettings(weights_dir=str(tmp_path), download=False))
    assert feats.provenance == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = model.features[:4]((((x + 1) / 2) - mean) / std)  # relu1_2 = output of index 3
    assert torch.allclose(feats(x)["relu1_2"], expected, atol=1e-5)


def test_missing_weights_name_file_url_and_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(MissingWeightsError) as exc:
        find_weights("x.pth", "https://example.invalid/x.pth", BackboneSettings(weights_dir=str(tmp_path),
                                                                                  download=False), "unit test")
    msg = str(exc.value)
    assert "'x.pth'" in msg and "https://example.invalid/x.pth" in msg and str(tmp_path) in msg
    assert "allow_untrained_backbones: true" in msg
    assert find_weights("x.pth", "u", BackboneSettings(weights_dir=str(tmp_path), download=False,
                                                        allow_untrained=True), "t") is None


def test_untrained_backbones_are_seeded_and_labelled():
    a = VGGFeatures(["relu2_2"], BackboneSettings(allow_untrained=True, download=False, seed=1))
    b = VGGFeatures(["relu2_2"], BackboneSettings(allow_untrained=True, download=False, seed=2))
    assert a.provenance == "untrained(seed=1)" and b.provenance == "untrained(seed=2)"
    x = torch.rand(1, 3, 16, 16)
    assert not torch.allclose(a(x)["relu2_2"], b(x)["relu2_2"])
