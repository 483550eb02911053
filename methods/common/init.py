"""The official weight initialisation of SPADE, CoCosNet and CoCosNet v2 (``BaseNetwork.init_weights``),
including the quirk of the path the published models were trained on.

Official ``init_weights(init_type, gain)``: BatchNorm2d scales ~ N(1, gain) and shifts 0; every
module whose class name contains ``Conv`` or ``Linear`` and has a ``weight`` gets ``init_type``
(xavier: ``xavier_normal_(gain)``, normal: N(0, gain), kaiming, orthogonal, xavier_uniform,
none = torch's ``reset_parameters``) written into ``m.weight.data``, and its bias set to 0.

The GPU quirk: ``define_*`` calls ``net.cuda()`` *before* ``init_weights``. For a layer wrapped in
(the old hook-based) ``spectral_norm``, ``m.weight`` is then a plain attribute still pointing at the
CPU tensor from construction time -- ``.cuda()`` moved ``weight_orig`` to new storage -- so the
initialisation is written into a stale copy and every spectral-norm weight keeps torch's default
(kaiming-uniform) init; only its bias is zeroed. On CPU the write goes through (``weight`` and
``weight_orig`` share storage), 29x smaller. The published models and released weights were
trained on GPUs, so ``spectral_norm_keeps_default=True`` (the GPU path) is the default here.
"""
from __future__ import annotations

from torch import nn
from torch.nn import init


def is_spectral_norm(m: nn.Module) -> bool:
    return hasattr(m, "weight_orig")


def official_init(net: nn.Module, init_type: str = "xavier", gain: float = 0.02,
                  spectral_norm_keeps_default: bool = True) -> None:
    """``BaseNetwork.init_weights`` on ``net`` (see the module docstring for the GPU-path quirk)."""
    if init_type not in ("normal", "xavier", "xavier_uniform", "kaiming", "orthogonal", "none"):
        raise ValueError(f"initialization method {init_type!r} is not implemented "
                         "(normal, xavier, xavier_uniform, kaiming, orthogonal, none)")
    for m in net.modules():
        name = type(m).__name__
        if "BatchNorm2d" in name:
            if getattr(m, "weight", None) is not None:
                init.normal_(m.weight.data, 1.0, gain)
            if getattr(m, "bias", None) is not None:
                init.constant_(m.bias.data, 0.0)
            continue
        if not (hasattr(m, "weight") and ("Conv" in name or "Linear" in name)):
            continue
        if not (spectral_norm_keeps_default and is_spectral_norm(m)):
            weight = m.weight_orig if is_spectral_norm(m) else m.weight
            if init_type == "normal":
                init.normal_(weight.data, 0.0, gain)
            elif init_type == "xavier":
                init.xavier_normal_(weight.data, gain=gain)
            elif init_type == "xavier_uniform":
                init.xavier_uniform_(weight.data, gain=1.0)
            elif init_type == "kaiming":
                init.kaiming_normal_(weight.data, a=0, mode="fan_in")
            elif init_type == "orthogonal":
                init.orthogonal_(weight.data, gain=gain)
            else:
                m.reset_parameters()
        if getattr(m, "bias", None) is not None:
            init.constant_(m.bias.data, 0.0)
