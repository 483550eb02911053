"""Multi-scale spectral-norm PatchGAN discriminator (pix2pixHD / SPADE ``MultiscaleDiscriminator``),
with CoCosNet's two changes as keyword options: 4x4 convs padded by 1 and a SAGAN self-attention
block on the input of the last strided-conv group (``--use_attention``)."""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from methods.common.attention import Attention


class NLayerDiscriminator(nn.Module):
    """PatchGAN with ``n_layers`` strided convs; returns every intermediate feature map (for feature
    matching) with the patch logits last. The attention block's output is not among them (official:
    it only transforms the input of ``model{n_layers - 1}``)."""

    def __init__(self, in_nc: int, ndf: int = 64, n_layers: int = 4, padding: int = 2, use_attention: bool = False):
        super().__init__()
        # padding: 2 in SPADE (padw = ceil((4 - 1) / 2)), 1 in CoCosNet and CoCosNet v2 (int((4 - 1) / 2)).
        kw, pad = 4, padding
        layers = [nn.Sequential(nn.Conv2d(in_nc, ndf, kw, 2, pad), nn.LeakyReLU(0.2))]
        nf = ndf
        self.attn = None
        for n in range(1, n_layers):
            prev, nf = nf, min(nf * 2, 8 * ndf)
            stride = 1 if n == n_layers - 1 else 2
            if use_attention and n == n_layers - 1:
                # Official: built for this group's input and applied before "model3", which is the
                # same layer for the n_layers_D = 4 of every command.
                self.attn = Attention(prev, use_sn=True)
            layers.append(nn.Sequential(
                # no bias: the affine-free instance norm cancels it (official get_nonspade_norm_layer drops it)
                spectral_norm(nn.Conv2d(prev, nf, kw, stride, pad, bias=False)),
                nn.InstanceNorm2d(nf, affine=False), nn.LeakyReLU(0.2)))
        layers.append(nn.Sequential(nn.Conv2d(nf, 1, kw, 1, pad)))
        self.layers = nn.ModuleList(layers)
        self.attn_at = n_layers - 1  # index of the layer whose input the attention block transforms

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        feats = []
        for i, layer in enumerate(self.layers):
            if self.attn is not None and i == self.attn_at:
                x = self.attn(x)
            x = layer(x)
            feats.append(x)
        return feats


class MultiscaleDiscriminator(nn.Module):
    """``num_d`` PatchGANs on the input downsampled by 1, 2, 4 ..."""

    def __init__(self, in_nc: int, ndf: int = 64, n_layers: int = 4, num_d: int = 2, padding: int = 2,
                 use_attention: bool = False):
        super().__init__()
        self.nets = nn.ModuleList([NLayerDiscriminator(in_nc, ndf, n_layers, padding, use_attention)
                                   for _ in range(num_d)])

    def forward(self, x: torch.Tensor) -> List[List[torch.Tensor]]:
        out = []
        for i, net in enumerate(self.nets):
            if i:
                x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)
            out.append(net(x))
        return out
