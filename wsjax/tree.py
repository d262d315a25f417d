"""One naming of pytree paths, used everywhere in wsjax.

A leaf's name is its path's components joined by "/": dict keys, attribute
names (a `TrainState`'s `params`) and sequence indices, with two rules that
make the same layer read the same in every tree that holds it:

* a leading Linen collection name `params` is dropped when more names follow:
  `{'params': {'conv1': {'kernel': k}}}` and `{'conv1': {'kernel': k}}` both
  name `k` "conv1/kernel" (other collections keep their name:
  "batch_stats/bn1/mean");
* a Flax NNX `nnx.Variable`'s `.value` indirection is dropped, so an NNX state
  of the same layers gives the same names as the Linen tree.

Transforms (per-leaf noise keys, roles), diagnostics, checkpoint mismatch
reports, pruning masks and permutation specs all name leaves this way.

    >>> names({'params': {'conv1': {'kernel': 0, 'bias': 1}}})
    ['conv1/bias', 'conv1/kernel']
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import jax

_COLLECTIONS = ("params",)  # Linen collection names dropped from the front


def key_name(k) -> str:
  """The name of one path entry (a `jax.tree_util` key)."""
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return k.name
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_names(path: Iterable[Any]) -> tuple[str, ...]:
  """A `jax.tree_util` key path as a tuple of component names (nothing dropped)."""
  return tuple(key_name(k) for k in path)


def join(components: Iterable[str]) -> str:
  """Components -> the leaf name: "/"-joined, a leading `params` dropped
  when more components follow."""
  components = tuple(components)
  if len(components) > 1 and components[0] in _COLLECTIONS:
    components = components[1:]
  return "/".join(components)


def name(path: Iterable[Any]) -> str:
  """The wsjax name of a `jax.tree_util` key path (see the module docstring).

  NNX `Variable` values are reached through a trailing `.value` attribute key;
  pass paths from `named_leaves`, which already drops it."""
  return join(path_names(path))


def _is_variable(x) -> bool:
  try:
    from flax import nnx
  except ImportError:  # pragma: no cover
    return False
  return isinstance(x, nnx.Variable)


def named_leaves(tree, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
  """`[(name, leaf)]` in `jax.tree.leaves` order.

  An NNX `Variable` holding one array is named by its own path (its `.value`
  is not a component)."""
  def stop(x):
    return _is_variable(x) or (is_leaf is not None and is_leaf(x))
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=stop)[0]:
    if _is_variable(leaf):
      inner = jax.tree_util.tree_flatten_with_path(leaf, is_leaf=is_leaf)[0]
      for sub, value in inner:
        rest = [k for k in path_names(sub) if k != "value"]
        out.append((join(path_names(path) + tuple(rest)), value))
    else:
      out.append((name(path), leaf))
  return out


def names(tree, is_leaf: Callable[[Any], bool] | None = None) -> list[str]:
  """The names of a tree's leaves, in leaf order."""
  return [n for n, _ in named_leaves(tree, is_leaf)]


def to_dict(tree, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
  """`{name: leaf}` (names are unique within one tree)."""
  return dict(named_leaves(tree, is_leaf))


def map_named(fn: Callable[..., Any], tree, *rest, is_leaf=None):
  """`jax.tree.map` whose `fn(name, leaf, *other_leaves)` also gets the name."""
  leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=is_leaf)
  the_names = names(tree, is_leaf)
  others = [treedef.flatten_up_to(r) for r in rest]
  return treedef.unflatten([fn(n, x, *(o[i] for o in others))
                            for i, (n, x) in enumerate(zip(the_names, leaves))])


def mismatches(expected, found, expected_label: str = "model",
               found_label: str = "source") -> list[str]:
  """Every leaf name whose presence or shape differs between two trees, as
  readable lines (e.g. "conv1/kernel: source (5, 1, 8) vs model (5, 1, 16)")."""
  import numpy as np
  exp = {n: tuple(np.shape(v)) for n, v in named_leaves(expected)}
  got = {n: tuple(np.shape(v)) for n, v in named_leaves(found)}
  lines = []
  for path in sorted(exp.keys() | got.keys()):
    if path not in got:
      lines.append(f"{path}: missing in {found_label} ({expected_label} expects {exp[path]})")
    elif path not in exp:
      lines.append(f"{path}: in {found_label} {got[path]} but not in the {expected_label}")
    elif exp[path] != got[path]:
      lines.append(f"{path}: {found_label} {got[path]} vs {expected_label} {exp[path]}")
  return lines
