"""wsjax models: Flax Linen modules and a registry by name.

    model = get_model("resnet18", num_classes=10, width=16)   # init="torch"
    variables = init_variables(model, key, (32, 32, 3))      # params, batch_stats
    logits = model.apply(variables, x)                       # eval mode
    logits, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])
    _, acts = model.apply(variables, x, mutable=["activations"])  # ReLU outputs

Models (``KNOWN_MODELS``): ``logreg``, ``mlp``, ``conv1d``, ``resnet18``,
``resnet20``, ``conv8``, ``vgg11``/``13``/``16`` and their ``_bn`` variants.
Inputs are NHWC (NWC for ``conv1d``), logits float32. Kernels keep output
units on the last axis; a module with a ``kernel`` leaf is a Dense/Conv layer,
BatchNorm modules have ``scale``/``bias`` and no kernel; the classifier is ``head``.

Init schemes (``init=`` option; see ``wsjax.models.initializers``): ``"torch"``
(PyTorch defaults: Ash & Adams, DASH; the default except for resnet20),
``"kaiming_normal"`` (open_lth; resnet20's default), ``"flax"``.

Permutation specs (``permutation_spec(name, variables)``, for the models in
``SPEC_MODELS``): which permutation of hidden units acts on which axis of
every leaf; see ``wsjax.models.permutation_specs`` and ``wsjax.transfer``.
"""
from wsjax.models.conv8 import Conv8
from wsjax.models.initializers import INIT_SCHEMES
from wsjax.models.layers import HEAD
from wsjax.models.registry import (
    KNOWN_MODELS,
    UnknownModelError,
    count_params,
    get_model,
    init_variables,
    make_init_fn,
    model_options,
)
from wsjax.models.permutation_specs import SPEC_MODELS, Flattened, permutation_spec
from wsjax.models.resnet import CifarResNet, ResNet18, ResNet20
from wsjax.models.simple import MLP, Conv1D, LogisticRegression
from wsjax.models.vgg import VGG

__all__ = [
    "CifarResNet", "Conv1D", "Conv8", "Flattened", "HEAD", "INIT_SCHEMES",
    "KNOWN_MODELS", "LogisticRegression", "MLP", "ResNet18", "ResNet20",
    "SPEC_MODELS", "UnknownModelError", "VGG", "count_params", "get_model",
    "init_variables", "make_init_fn", "model_options", "permutation_spec",
]
