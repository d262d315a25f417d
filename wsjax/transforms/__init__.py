"""Warm-start transforms, optax-style.

Each transform is an `optax.GradientTransformation` whose `update(updates,
state, params)` returns parameter deltas: `optax.apply_updates(params, deltas)`
is the transformed parameters (see `base` for how they compose). They work on
Linen variable trees and Flax NNX states alike (`groups` classifies leaves by
structure alone).
"""
from wsjax.transforms.base import PRNGState
from wsjax.transforms.base import apply_transform
from wsjax.transforms.baselines import l2_init_penalty
from wsjax.transforms.baselines import reset_layers
from wsjax.transforms.dash import dash
from wsjax.transforms.dash import dash_cosines
from wsjax.transforms.dash import dash_gradient
from wsjax.transforms.groups import classify
from wsjax.transforms.rewind import gaussian_noise
from wsjax.transforms.rewind import random_reinit
from wsjax.transforms.rewind import shuffle_weights
from wsjax.transforms.rewind import sign_preserving_reinit
from wsjax.transforms.shrink_perturb import gaussian_shrink_perturb
from wsjax.transforms.shrink_perturb import shrink_perturb

__all__ = [
    "PRNGState",
    "apply_transform",
    "classify",
    "dash",
    "dash_cosines",
    "dash_gradient",
    "gaussian_noise",
    "gaussian_shrink_perturb",
    "l2_init_penalty",
    "random_reinit",
    "reset_layers",
    "shrink_perturb",
    "shuffle_weights",
    "sign_preserving_reinit",
]
