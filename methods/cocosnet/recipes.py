"""CoCosNet's official per-dataset recipes: the options each official training command sets.

Source: the microsoft/CoCosNet README commands (reference/methods.md 1.1 and 2.1). Options every
command sets (--PONO --PONO_C --use_attention --vgg_normal_correct) are already the defaults;
epochs (--niter/--niter_decay) are the sweep's ``train.steps`` with ``lr_decay_start: 0.5``.
A sweep applies these with ``recipe: official`` (the default); its own ``options``, ``recipes``
and variants override them.

Not expressible as method options, so left to the sweep's dataset entry: DeepFashion's command
trains on same-person pairs only (``--real_reference_probability 0 --video_like``), which here is
``datasets: [{name: deepfashion, options: {train_exemplars: self_pair}}]`` with method options
``{pseudo_pair: exemplar, self_ref_probability: 1.0}``.
"""
from __future__ import annotations

from typing import Any, Dict

# --adaptor_kernel 4 --warp_bilinear --fm_ratio 1.0 --which_perceptual 4_2 --weight_perceptual 0.001
# (adaptor_kernel 4 is in the README's CelebA-HQ edge *test* command only, but the released models
# were trained with it: loading them needs it.)
_FACES_AND_FASHION: Dict[str, Any] = {
    "adaptor_kernel": 4, "warp_bilinear": True, "lambda_feat_vgg": 10.0,  # --lambda_vgg 10 x --fm_ratio 1.0
    "perc_layer": "relu4_2", "lambda_perc": 0.001,
}
_CELEBAHQ_EDGE: Dict[str, Any] = {**_FACES_AND_FASHION, "maskmix": True, "lambda_cycle": 1.0}  # --warp_cycle_w 1

RECIPES: Dict[str, Dict[str, Any]] = {
    # --maskmix --weight_mask 100 --warp_mask_losstype direct
    "ade20k": {"maskmix": True, "lambda_mask": 100.0},
    # ... plus --warp_cycle_w 0.1
    "celebahq-mask": {**_FACES_AND_FASHION, "maskmix": True, "lambda_mask": 100.0, "lambda_cycle": 0.1},
    "celebahq-edge": _CELEBAHQ_EDGE,
    "celebahq-edge_landmarks": _CELEBAHQ_EDGE,  # the same task with landmark-drawn edges
    # --warp_patch --warp_self_w 100 --no_flip (DeepFashion-HD: the v2 paper retrained v1 the same way)
    "deepfashion": {**_FACES_AND_FASHION, "warp_patch": True, "lambda_warp_self": 100.0, "distort_flip": False},
}
