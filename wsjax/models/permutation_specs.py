"""Permutation specs beside the models: which permutation acts on which axis.

Hidden units of a network can be permuted without changing its function
(Ainsworth, Hayase & Srinivasa, "Git Re-Basin", ICLR 2023; code
samuela/git-re-basin, ``src/weight_matching.py``). A permutation spec says,
for every leaf of a model's variables (params AND batch_stats, named with
``wsjax.tree``: "conv1/kernel", "batch_stats/bn1/mean"), one entry per axis:

- ``None``: the axis is not permuted (the input axis of the first layer, the
  output axis of ``head``, a conv kernel's spatial axes);
- a permutation's name (a ``str``): the axis indexes that permutation's units;
- ``Flattened(perm, outer, inner)``: the axis is a flattened block of shape
  ``(outer, n, inner)`` (row-major) whose middle factor the permutation
  ``perm`` (of size n) acts on. A Dense layer after ``flatten`` of an NHWC
  (NWC) feature map of ``s`` positions and ``n`` channels sees rows indexed
  ``position * n + channel``: ``Flattened(perm, outer=s)``. A permutation
  ``p`` of the channels then acts on that axis as the Kronecker-structured
  permutation ``I_s (x) p``: row ``l * n + c`` of the permuted kernel is row
  ``l * n + p[c]`` of the original. (PyTorch flattens NCHW, channel-major:
  that would be ``Flattened(perm, inner=s)``.)

A permutation is named after the layer whose output units it permutes
("dense1", "conv3", "layer2_0/conv1"); a ResNet's residual stream, written
by several layers, is "stage{s}". Biases, BatchNorm scale/offset and
running mean/var move with their units. ResNets (git-re-basin's
``resnet20_permutation_spec`` logic): the residual stream of a stage shares
one permutation (identity shortcuts tie the stem and every block output to
it); a block's 1x1 ``shortcut_conv`` maps the previous stage's stream to the
next; the inner units of every block (``conv1``/``bn1``) have their own.

The specs read the model's options (widths, depth, flatten size) from the
variables' shapes, so ``permutation_spec(name, variables)`` fits any width,
depth or input size; it checks that the spec names exactly the variables'
leaves, with one entry per axis. Use ``wsjax.transfer.PermutationSpec`` to
apply permutations and match weights.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Union

import numpy as np

from wsjax import tree
from wsjax.models.layers import HEAD
from wsjax.models.registry import KNOWN_MODELS, VARIABLE_COLLECTIONS


@dataclasses.dataclass(frozen=True)
class Flattened:
  """An axis of size ``outer * n * inner``, read as ``(outer, n, inner)``, on
  whose middle factor the permutation named `perm` (of size n) acts."""
  perm: str
  outer: int = 1
  inner: int = 1

  def __post_init__(self):
    if not isinstance(self.perm, str) or not self.perm:
      raise ValueError(f"Flattened needs a permutation name, got {self.perm!r}")
    if self.outer < 1 or self.inner < 1:
      raise ValueError(f"Flattened({self.perm!r}) needs outer, inner >= 1, "
                       f"got {self.outer}, {self.inner}")


AxisEntry = Union[str, Flattened, None]
Axes = dict[str, tuple[AxisEntry, ...]]

_STATS = VARIABLE_COLLECTIONS[1]  # "batch_stats"


def norm_entries(name: str, perm: AxisEntry) -> Axes:
  """A BatchNorm layer's scale, offset and running mean/var, all on `perm`."""
  return {f"{name}/scale": (perm,), f"{name}/bias": (perm,),
          f"{_STATS}/{name}/mean": (perm,), f"{_STATS}/{name}/var": (perm,)}


def layer_entries(shapes: dict[str, tuple[int, ...]], name: str, p_in: AxisEntry,
                  p_out: AxisEntry) -> Axes:
  """A Dense ``(in, out)`` or Conv ``(*spatial, in, out)`` layer: its kernel
  (spatial axes unpermuted) and, if it has one, its bias on `p_out`."""
  rank = len(shapes[f"{name}/kernel"])
  axes = {f"{name}/kernel": (None,) * (rank - 2) + (p_in, p_out)}
  if f"{name}/bias" in shapes:
    axes[f"{name}/bias"] = (p_out,)
  return axes


def flatten_entry(perm: str, channels: int, rows: int, layer: str) -> AxisEntry:
  """The entry of a kernel's input axis of size `rows` fed by `channels`
  units permuted by `perm`: `perm` itself when rows == channels, else the
  NHWC flatten ``Flattened(perm, outer=rows // channels)``."""
  if rows == channels:
    return perm
  if rows % channels:
    raise ValueError(f"{layer}/kernel has {rows} inputs, not a multiple of the {channels} "
                     f"units of {perm}")
  return Flattened(perm, outer=rows // channels)


def numbered(shapes: dict[str, tuple[int, ...]], prefix: str) -> list[str]:
  """Layers ``prefix1``, ``prefix2``, ... present in `shapes`, in order."""
  out = []
  while f"{prefix}{len(out) + 1}/kernel" in shapes:
    out.append(f"{prefix}{len(out) + 1}")
  return out


def chain_spec(shapes: dict[str, tuple[int, ...]], layers: list[str],
               norms: dict[str, str] | None = None) -> Axes:
  """A feed-forward chain ``layers[0] -> ... -> head``: each layer's output
  units are the permutation named after the layer and the next layer's
  input units (flattened when the next layer is a Dense after a feature
  map); ``norms[layer]`` is the BatchNorm after `layer`, if present."""
  norms = norms or {}
  axes: Axes = {}
  prev: tuple[str, int] | None = None  # (perm name, units)
  for layer in [*layers, HEAD]:
    kernel = shapes[f"{layer}/kernel"]
    p_in = None if prev is None else flatten_entry(prev[0], prev[1], kernel[-2], layer)
    p_out = None if layer == HEAD else layer
    axes.update(layer_entries(shapes, layer, p_in, p_out))
    norm = norms.get(layer)
    if norm is not None and f"{norm}/scale" in shapes:
      axes.update(norm_entries(norm, p_out))
    prev = (layer, kernel[-1])
  return axes


def mlp_spec(shapes: dict[str, tuple[int, ...]]) -> Axes:
  """``MLP``: dense1 .. denseK, head."""
  return chain_spec(shapes, numbered(shapes, "dense"))


def conv1d_spec(shapes: dict[str, tuple[int, ...]]) -> Axes:
  """``Conv1D``: conv1 .. conv3, then head on the flattened (length, channels)
  map: the head's rows are ``Flattened("conv3", outer=length)``."""
  return chain_spec(shapes, numbered(shapes, "conv"))


def vgg_spec(shapes: dict[str, tuple[int, ...]]) -> Axes:
  """``VGG`` (with or without BN): convI (+ bnI), head (1x1x512 on 32x32
  inputs: plain; larger inputs: flattened)."""
  convs = numbered(shapes, "conv")
  return chain_spec(shapes, convs, {c: "bn" + c[len("conv"):] for c in convs})


def conv8_spec(shapes: dict[str, tuple[int, ...]]) -> Axes:
  """``Conv8``: conv1 .. conv8, dense1 (flattened when ``last_pool`` leaves
  more than one position), dense2, head."""
  return chain_spec(shapes, numbered(shapes, "conv") + numbered(shapes, "dense"))


def cnn_spec(shapes: dict[str, tuple[int, ...]]) -> Axes:
  """``CNN``: conv1, conv2, dense1 .. denseK (dense1 on the flattened NHWC
  map: ``Flattened("conv2", outer=positions)``), head."""
  return chain_spec(shapes, numbered(shapes, "conv") + numbered(shapes, "dense"))


_BLOCK = re.compile(r"^layer(\d+)_(\d+)/")


def resnet_spec(shapes: dict[str, tuple[int, ...]]) -> Axes:
  """``CifarResNet`` (resnet18, resnet20): stem conv1/bn1, blocks
  ``layer{stage}_{block}`` with conv1/bn1 (own inner permutation), conv2/bn2
  (the residual stream) and, where present, shortcut_conv/shortcut_bn (from
  the previous stream to a new one), then head on the pooled stream."""
  blocks = sorted({(int(m[1]), int(m[2])) for n in shapes if (m := _BLOCK.match(n))})
  if not blocks:
    raise ValueError("no ResNet blocks (layer{stage}_{block}/...) in these variables")
  first = f"layer{blocks[0][0]}_{blocks[0][1]}"
  stream = "stage0" if f"{first}/shortcut_conv/kernel" in shapes else f"stage{blocks[0][0]}"
  axes = {**layer_entries(shapes, "conv1", None, stream), **norm_entries("bn1", stream)}
  for stage, index in blocks:
    block = f"layer{stage}_{index}"
    inner, out = f"{block}/conv1", stream
    if f"{block}/shortcut_conv/kernel" in shapes:
      out = f"stage{stage}"
      axes.update(layer_entries(shapes, f"{block}/shortcut_conv", stream, out))
      axes.update(norm_entries(f"{block}/shortcut_bn", out))
    axes.update(layer_entries(shapes, f"{block}/conv1", stream, inner))
    axes.update(norm_entries(f"{block}/bn1", inner))
    axes.update(layer_entries(shapes, f"{block}/conv2", inner, out))
    axes.update(norm_entries(f"{block}/bn2", out))
    stream = out
  axes.update(layer_entries(shapes, HEAD, stream, None))
  return axes


_BUILDERS = {"mlp": mlp_spec, "conv1d": conv1d_spec, "conv8": conv8_spec, "cnn": cnn_spec,
             "resnet18": resnet_spec, "resnet20": resnet_spec,
             **{n: vgg_spec for n in KNOWN_MODELS if n.startswith("vgg")}}

SPEC_MODELS: tuple[str, ...] = tuple(n for n in KNOWN_MODELS if n in _BUILDERS)


def leaf_shapes(variables) -> dict[str, tuple[int, ...]]:
  """``{wsjax leaf name: shape}`` of a variables tree (arrays or ShapeDtypeStructs)."""
  return {name: tuple(np.shape(leaf)) for name, leaf in tree.named_leaves(variables)}


def spec_mismatches(axes: Axes, shapes: dict[str, tuple[int, ...]]) -> list[str]:
  """Every way `axes` fails to fit leaves of `shapes`: leaves without an
  entry, entries naming no leaf, and entries with the wrong number of axes."""
  lines = [f"{n}: not in the spec" for n in sorted(shapes.keys() - axes.keys())]
  lines += [f"{n}: in the spec but not in the variables" for n in sorted(axes.keys() - shapes.keys())]
  for n in sorted(axes.keys() & shapes.keys()):
    if len(axes[n]) != len(shapes[n]):
      lines.append(f"{n}: {len(axes[n])} spec entries for shape {shapes[n]}")
  return lines


def permutation_spec(model_name: str, variables) -> Axes:
  """The permutation spec of registered model `model_name` for `variables`.

  Args:
    model_name: a registry name with a spec (``SPEC_MODELS``).
    variables: the model's variables (``{'params': ..., 'batch_stats': ...}``,
      or the params alone), arrays or ``jax.eval_shape`` structs; widths,
      depth and flatten sizes are read from their shapes.

  Returns:
    ``{leaf name: (entry per axis)}`` for exactly the leaves of `variables`
    (see the module docstring for the entries).

  Raises:
    ValueError: for a model without a spec (naming those with one), or
      variables that do not fit the model's structure.
  """
  if model_name not in _BUILDERS:
    raise ValueError(f"no permutation spec for model {model_name!r}; models with one: "
                     f"{', '.join(SPEC_MODELS)}")
  shapes = leaf_shapes(variables)
  try:
    axes = _BUILDERS[model_name](shapes)
  except KeyError as e:
    raise ValueError(f"variables do not fit model {model_name!r}: no leaf {e.args[0]}") from None
  except ValueError as e:
    raise ValueError(f"variables do not fit model {model_name!r}: {e}") from None
  if not any(n.startswith(f"{_STATS}/") for n in shapes):  # the params alone
    axes = {n: e for n, e in axes.items() if not n.startswith(f"{_STATS}/")}
  problems = spec_mismatches(axes, shapes)
  if problems:
    raise ValueError(f"variables do not fit model {model_name!r}: {'; '.join(problems)}")
  return axes
