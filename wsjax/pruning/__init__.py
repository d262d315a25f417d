"""Pruning: masks, global magnitude pruning (IMP), the random-pruning control.

    mask = ones_mask(params, "resnet20")                   # dense, level 0
    mask = global_magnitude_prune(final_params, mask, 0.2) # next level's mask
    params = apply_mask(rewound_params, mask)              # exact zeros
    sparsity_report(mask)["overall"]["density"]           # 0.8

See `wsjax.pruning.masks` for the mask representation and which leaves each
model prunes (open_lth's rules), `wsjax.pruning.prune` for the pruning rules,
and `wsjax.transforms.rewind` for perturbations of the weights at the rewind
point.
"""
from wsjax.pruning.masks import PRUNE_HEAD_MODELS
from wsjax.pruning.masks import apply_mask
from wsjax.pruning.masks import density
from wsjax.pruning.masks import ones_mask
from wsjax.pruning.masks import prunable
from wsjax.pruning.masks import sparsity_report
from wsjax.pruning.prune import global_magnitude_prune
from wsjax.pruning.prune import prune_count
from wsjax.pruning.prune import random_prune_like

__all__ = [
    "PRUNE_HEAD_MODELS",
    "apply_mask",
    "density",
    "global_magnitude_prune",
    "ones_mask",
    "prunable",
    "prune_count",
    "random_prune_like",
    "sparsity_report",
]
