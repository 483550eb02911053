"""CoCosNet's official per-dataset recipes: the options each official training command sets.

Source: the microsoft/CoCosNet README commands (reference/methods.md 1.1 and 2.1). Options every
command sets (--PONO --PONO_C --use_attention --vgg_normal_correct) are already the defaults;
epochs (--niter/--niter_decay) are the sweep's ``train.steps`` with ``lr_decay_start: 0.5``.
A sweep applies these with ``recipe: official`` (the default); its own ``options``, ``recipes``
and variants override them.

A recipe holds method options (bare keys) and, where the official command samples its training
exemplars differently from our dataset default, dataset options as dotted keys
``dataset.options.<key>`` -- all of those are in ``DATASET_OPTIONS`` below:
* ADE20K, CelebA-HQ (mask and edge): retrieved exemplars (``ade20k_ref.txt`` / ``celebahq_ref.txt``,
  easy or hard entry), replaced by a self-reference with probability 0.3 in the method
  (``--real_reference_probability 0.7``): ``train_exemplars: ref_list``.
* DeepFashion: same-person pairs only (``--real_reference_probability 0 --video_like``):
  ``train_exemplars: self_pair`` with ``pseudo_pair: exemplar``, ``self_ref_probability: 1``.
"""
from __future__ import annotations

from typing import Any, Dict

# Dataset options of the official commands (dotted recipe keys, applied to the trial's dataset).
DATASET_OPTIONS: Dict[str, Dict[str, Any]] = {
    "ade20k": {"dataset.options.train_exemplars": "ref_list"},
    "celebahq": {"dataset.options.train_exemplars": "ref_list"},
    "deepfashion": {"dataset.options.train_exemplars": "self_pair"},
}

# --adaptor_kernel 4 --warp_bilinear --fm_ratio 1.0 --which_perceptual 4_2 --weight_perceptual 0.001
# (adaptor_kernel 4 is in the README's CelebA-HQ, CelebA-HQ edge and DeepFashion *test* commands
# only, but the released models were trained with it: loading them needs it.)
_FACES_AND_FASHION: Dict[str, Any] = {
    "adaptor_kernel": 4, "warp_bilinear": True, "lambda_feat_vgg": 10.0,  # --lambda_vgg 10 x --fm_ratio 1.0
    "perc_layer": "relu4_2", "lambda_perc": 0.001,
}
_CELEBAHQ_EDGE: Dict[str, Any] = {**_FACES_AND_FASHION, "maskmix": True, "lambda_cycle": 1.0}  # --warp_cycle_w 1

_METHOD_OPTIONS: Dict[str, Dict[str, Any]] = {
    # --maskmix --weight_mask 100 --warp_mask_losstype direct
    "ade20k": {"maskmix": True, "lambda_mask": 100.0},
    # ... plus --warp_cycle_w 0.1
    "celebahq-mask": {**_FACES_AND_FASHION, "maskmix": True, "lambda_mask": 100.0, "lambda_cycle": 0.1},
    "celebahq-edge": _CELEBAHQ_EDGE,
    "celebahq-edge_landmarks": _CELEBAHQ_EDGE,  # the same task with landmark-drawn edges
    # --warp_patch --warp_self_w 100 --no_flip --real_reference_probability 0 --video_like
    # (DeepFashion-HD: the v2 paper retrained v1 the same way)
    "deepfashion": {**_FACES_AND_FASHION, "warp_patch": True, "lambda_warp_self": 100.0, "pseudo_flip": False,
                    "pseudo_pair": "exemplar", "self_ref_probability": 1.0},
}

RECIPES: Dict[str, Dict[str, Any]] = {
    key: {**DATASET_OPTIONS.get(key, {}), **_METHOD_OPTIONS.get(key, {})}
    for key in {**DATASET_OPTIONS, **_METHOD_OPTIONS}
}
