"""The model registry: models by name, and helpers to initialize and count them.

``get_model(name, num_classes, **options)`` builds a Flax Linen module;
``init_variables`` / ``make_init_fn`` draw its variables, ``{'params': ...}``
plus ``'batch_stats'`` for models with BatchNorm. Every model takes the option
``init`` (an init scheme of ``wsjax.models.initializers``: ``"torch"``,
``"kaiming_normal"`` or ``"flax"``), stored on the module as ``init_scheme``
(a field named ``init`` would hide ``nn.Module.init``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from wsjax.models import initializers
from wsjax.models.cnn import CNN
from wsjax.models.conv8 import Conv8
from wsjax.models.resnet import ResNet18, ResNet20
from wsjax.models.simple import MLP, Conv1D, LogisticRegression
from wsjax.models.vgg import VGG


class UnknownModelError(ValueError):
  """A model name that is not in the registry."""


# name -> (module class, options fixed by the name)
_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "logreg": (LogisticRegression, {}),
    "mlp": (MLP, {}),
    "conv1d": (Conv1D, {}),
    "cnn": (CNN, {}),
    "resnet18": (ResNet18, {}),
    "resnet20": (ResNet20, {}),
    "conv8": (Conv8, {}),
    **{f"vgg{d}{'_bn' if bn else ''}": (VGG, {"depth": d, "batch_norm": bn})
       for bn in (False, True) for d in (11, 13, 16)},
}

KNOWN_MODELS: tuple[str, ...] = tuple(_REGISTRY)

# Collections a model's variables consist of; 'activations' (sown ReLU
# outputs) is only produced on request.
VARIABLE_COLLECTIONS = ("params", "batch_stats")


def model_options(name: str) -> tuple[str, ...]:
  """The keyword options `get_model(name, ...)` accepts, besides num_classes."""
  cls, fixed = _lookup(name)
  fields = [f.name for f in dataclasses.fields(cls) if f.init]
  names = [n for n in fields
           if n not in ("num_classes", "parent", "name", "init_scheme") and n not in fixed]
  return tuple(names) + ("init",)


def _lookup(name: str):
  if name not in _REGISTRY:
    raise UnknownModelError(
        f"unknown model {name!r}; known models: {', '.join(KNOWN_MODELS)}")
  return _REGISTRY[name]


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds the registered model `name` with `num_classes` outputs.

  Options (`kwargs`) are the module's fields, e.g. ``widths`` (mlp, cnn),
  ``channels`` (conv1d, cnn), ``width`` (resnets, conv8), ``last_pool``
  (conv8), ``dtype`` (the compute dtype of resnets, vggs, conv8 and cnn:
  "float32" or "bfloat16"), ``custom_grad`` (conv1d, cnn: False for
  forward-mode autodiff through the output, see `layers.patch_matmul`), and
  ``init`` for every model.
  Raises UnknownModelError (a ValueError) for an unknown name and ValueError
  for an unknown option or init scheme.
  """
  cls, fixed = _lookup(name)
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  allowed = model_options(name)
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise ValueError(f"model {name!r} has no option {', '.join(unknown)}; "
                     f"its options: {', '.join(allowed)}")
  if "init" in kwargs:
    kwargs["init_scheme"] = initializers.check_scheme(kwargs.pop("init"))
  if "dtype" in kwargs:
    kwargs["dtype"] = compute_dtype(kwargs["dtype"])
  return cls(num_classes=num_classes, **fixed, **kwargs)


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def compute_dtype(name) -> Any:
  """The jnp dtype of a compute-dtype option ("float32", "bfloat16", "float16")."""
  key = name if isinstance(name, str) else jnp.dtype(name).name
  if key not in COMPUTE_DTYPES:
    raise ValueError(f"unknown compute dtype {name!r}; choose from {', '.join(COMPUTE_DTYPES)}")
  return jnp.dtype(key).type


def init_variables(model: nn.Module, key: jax.Array,
                   input_shape: Sequence[int]) -> dict:
  """Draws `model`'s variables for inputs of per-example shape `input_shape`.

  Returns ``{'params': ...}``, plus ``'batch_stats'`` (running mean 0, var 1)
  if the model has BatchNorm. Initializes with one example in eval mode;
  traceable, so it can be jitted or vmapped over keys.
  """
  x = jnp.zeros((1, *input_shape), jnp.float32)
  variables = model.init({"params": key}, x, train=False,
                         mutable=VARIABLE_COLLECTIONS)
  return {k: v for k, v in variables.items() if k in VARIABLE_COLLECTIONS}


def make_init_fn(model: nn.Module,
                 input_shape: Sequence[int]) -> Callable[[jax.Array], dict]:
  """A pure ``key -> variables`` function drawing fresh initializations.

  For shrink-and-perturb's fresh draws (Ash & Adams, 2020), cold starts and
  seeds side by side: ``jax.jit(make_init_fn(m, s))`` or
  ``jax.vmap(make_init_fn(m, s))(keys)``.
  """
  return functools.partial(init_variables, model, input_shape=tuple(input_shape))


def count_params(params) -> int:
  """The number of scalars in a pytree of arrays (or ShapeDtypeStructs)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))
