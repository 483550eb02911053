"""SPADE building blocks (Park et al. 2019), shared by SPADE, CoCosNet and CoCosNet v2.

``SPADE`` normalises activations with a parameter-free norm and modulates them with a scale and
bias predicted from a spatial conditioning map. The parameter-free norm is configurable because
the methods differ: SPADE uses (sync) batch norm, CoCosNet uses *positional* normalisation
(per-pixel mean/std across channels) so the warped exemplar's spatial statistics survive.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm


class PositionalNorm2d(nn.Module):
    """Normalise each pixel across channels (Li et al., "Positional Normalization"), as the official
    ``PositionalNorm2d``: the *unbiased* variance across channels (``x.var(dim=1)``) plus ``eps``
    (1e-5 in CoCosNet and MIDMs, 1e-8 in CoCosNet v2)."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        std = (x.var(dim=1, keepdim=True) + self.eps).sqrt()
        return (x - mean) / std


def param_free_norm(kind: str, channels: int, pono_eps: float = 1e-5) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels, affine=False)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False)
    if kind == "positional":
        return PositionalNorm2d(pono_eps)
    raise ValueError(f"unknown parameter-free norm {kind!r}; choose batch, instance or positional")


class PaddedConv2d(nn.Conv2d):
    """A stride-1 "same" convolution whose border is ``zeros`` or ``reflect`` (reflect-101, as
    ``nn.ReflectionPad2d``). A map no larger than the pad cannot be reflected -- the 1x1 head of
    a tiny-scale generator -- so there the border value is repeated (the only one there is)."""

    def __init__(self, cin: int, cout: int, kernel: int, padding: str = "zeros", bias: bool = True):
        if padding not in ("zeros", "reflect"):
            raise ValueError(f"padding must be 'zeros' or 'reflect', got {padding!r}")
        super().__init__(cin, cout, kernel, padding=kernel // 2 if padding == "zeros" else 0, bias=bias)
        self.border = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.border == "zeros":
            return super().forward(x)
        p = self.kernel_size[0] // 2
        return super().forward(F.pad(x, (p, p, p, p), mode="reflect" if min(x.shape[-2:]) > p else "replicate"))


class SPADE(nn.Module):
    """Spatially-adaptive denormalisation: norm(x) * (1 + gamma(seg)) + beta(seg)."""

    def __init__(self, norm_nc: int, label_nc: int, hidden: int = 128, norm: str = "batch", kernel: int = 3,
                 padding: str = "zeros", pono_eps: float = 1e-5):
        super().__init__()
        self.norm = param_free_norm(norm, norm_nc, pono_eps)
        conv = lambda cin, cout: PaddedConv2d(cin, cout, kernel, padding)  # noqa: E731
        self.shared = nn.Sequential(conv(label_nc, hidden), nn.ReLU())
        self.gamma = conv(hidden, norm_nc)
        self.beta = conv(hidden, norm_nc)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        seg = F.interpolate(seg, size=x.shape[2:], mode="nearest")
        h = self.shared(seg)
        return self.norm(x) * (1 + self.gamma(h)) + self.beta(h)


class SPADEResBlock(nn.Module):
    """Residual block with SPADE norms and spectral-norm convolutions (SPADE's ``SPADEResnetBlock``).

    ``padding`` of every 3x3 conv, the SPADE MLPs' included: ``zeros`` in SPADE, ``reflect`` in
    CoCosNet's ``architecture.py`` (ReflectionPad2d(1) + conv, which v2 and MIDMs reuse).
    """

    def __init__(self, fin: int, fout: int, label_nc: int, hidden: int = 128, norm: str = "batch",
                 use_spectral: bool = True, padding: str = "zeros", pono_eps: float = 1e-5):
        super().__init__()
        fmid = min(fin, fout)
        self.learned_shortcut = fin != fout
        sn = spectral_norm if use_spectral else (lambda m: m)
        self.conv_0 = sn(PaddedConv2d(fin, fmid, 3, padding))
        self.conv_1 = sn(PaddedConv2d(fmid, fout, 3, padding))
        self.norm_0 = SPADE(fin, label_nc, hidden, norm, padding=padding, pono_eps=pono_eps)
        self.norm_1 = SPADE(fmid, label_nc, hidden, norm, padding=padding, pono_eps=pono_eps)
        if self.learned_shortcut:
            self.conv_s = sn(nn.Conv2d(fin, fout, 1, bias=False))
            self.norm_s = SPADE(fin, label_nc, hidden, norm, padding=padding, pono_eps=pono_eps)

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        xs = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 2e-1))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 2e-1))
        return xs + dx


class SPADEDecoder(nn.Module):
    """SPADE's generator after its ``fc`` (official ``SPADEGenerator``), with the official block
    names: ``head_0``, ``G_middle_0``, ``G_middle_1``, ``up_0`` .. ``up_3`` (+ ``up_4``) and
    ``conv_img``; channels 16, 16, 16, 8, 4, 2, 1 (, 1/2) x ngf; nearest x2 upsampling; every SPADE
    block zero-padded with spectral-norm convs; ``tanh(conv_img(leaky_relu(x, 0.2)))`` at the end.

    ``num_upsampling_layers`` (official option): ``normal`` upsamples 5 times (the input map is
    1/32 of the output), ``more`` 6 (one more between the middle blocks), ``most`` 7 (also
    ``up_4``, to ngf/2 channels, at the end).
    """

    UPSAMPLINGS = {"normal": 5, "more": 6, "most": 7}

    def __init__(self, ngf: int, label_nc: int, num_upsampling_layers: str = "normal", hidden: int = 128,
                 norm: str = "batch"):
        super().__init__()
        self.downsampling(num_upsampling_layers)  # raises on an unknown mode
        self.mode = num_upsampling_layers
        block = lambda fin, fout: SPADEResBlock(fin, fout, label_nc, hidden, norm)  # noqa: E731
        self.head_0 = block(16 * ngf, 16 * ngf)
        self.G_middle_0 = block(16 * ngf, 16 * ngf)
        self.G_middle_1 = block(16 * ngf, 16 * ngf)
        self.up_0 = block(16 * ngf, 8 * ngf)
        self.up_1 = block(8 * ngf, 4 * ngf)
        self.up_2 = block(4 * ngf, 2 * ngf)
        self.up_3 = block(2 * ngf, ngf)
        final_nc = ngf
        if self.mode == "most":
            self.up_4 = block(ngf, ngf // 2)
            final_nc = ngf // 2
        self.conv_img = nn.Conv2d(final_nc, 3, 3, padding=1)

    @classmethod
    def downsampling(cls, num_upsampling_layers: str) -> int:
        """How much smaller than the output the input map is (2 ** upsamplings)."""
        if num_upsampling_layers not in cls.UPSAMPLINGS:
            raise ValueError(f"num_upsampling_layers must be one of {sorted(cls.UPSAMPLINGS)}, "
                             f"got {num_upsampling_layers!r}")
        return 2 ** cls.UPSAMPLINGS[num_upsampling_layers]

    @staticmethod
    def up(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest")

    def forward(self, x: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        x = self.G_middle_0(self.up(self.head_0(x, seg)), seg)
        if self.mode in ("more", "most"):
            x = self.up(x)
        x = self.G_middle_1(x, seg)
        for block in (self.up_0, self.up_1, self.up_2, self.up_3) + ((self.up_4,) if self.mode == "most" else ()):
            x = block(self.up(x), seg)
        return torch.tanh(self.conv_img(F.leaky_relu(x, 2e-1)))
