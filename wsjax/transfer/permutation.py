"""Permutations of hidden units: the spec type, applying, inverting, composing.

Convention (Git Re-Basin's, samuela/git-re-basin ``src/weight_matching.py``,
``get_permuted_param``): a permutation ``perm`` (an int array, a rearrangement
of ``0 .. n-1``) acts on every axis that the spec assigns to it by

    P(w)[..., i, ...] = w[..., perm[i], ...],   i.e.  P(w) = w.take(perm, axis)

so unit i of the permuted network is unit ``perm[i]`` of the original. An
axis entry ``Flattened(perm, outer, inner)`` (see
``wsjax.models.permutation_specs``) reads the axis as ``(outer, n, inner)``
and takes along the middle factor: element ``(o, i, r)`` of the result is
element ``(o, perm[i], r)`` of the original (a Kronecker-structured
permutation ``I_outer (x) perm (x) I_inner`` of the flat axis).

Applying the same permutations to every leaf that touches a unit (incoming
kernel columns, bias, BatchNorm scale/offset/mean/var, outgoing kernel rows)
leaves the network's function unchanged. Applying ``perms`` and then
``second`` is applying ``compose(perms, second)``; ``invert(perms)`` undoes
``perms``. Everything numeric is jit- and vmap-friendly (``jnp.take`` with
index arrays); the spec is static data (hashable, usable as a static arg).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from wsjax import tree
from wsjax.models import permutation_specs
from wsjax.models.permutation_specs import AxisEntry, Flattened

Perms = dict[str, jax.Array]


def as_flattened(entry: AxisEntry) -> Flattened | None:
  """An axis entry as ``Flattened`` (a plain name is ``Flattened(name)``)."""
  if entry is None or isinstance(entry, Flattened):
    return entry
  if isinstance(entry, str):
    return Flattened(entry)
  raise ValueError(f"a permutation spec entry must be None, a name or Flattened, got {entry!r}")


@dataclasses.dataclass(frozen=True, eq=False)
class PermutationSpec:
  """Which permutation acts on which axis of which leaf, and the sizes.

  Attributes:
    axes: ``{leaf name: (entry per axis)}``, entries None, a permutation name
      or ``Flattened``; leaf names as ``wsjax.tree`` names them.
    sizes: ``{permutation name: number of units}``.
    perms: derived, ``{permutation name: ((leaf name, axis), ...)}``: the axes
      each permutation acts on, in the order of `axes`.

  A permutation may act on at most one axis of a leaf (else matching it is
  not a linear assignment problem). Build one with ``for_model`` (a registered
  model) or ``from_tree`` (your own axes, sizes read from shapes).
  """
  axes: Mapping[str, tuple[AxisEntry, ...]]
  sizes: Mapping[str, int]
  perms: Mapping[str, tuple[tuple[str, int], ...]] = dataclasses.field(init=False)

  def __post_init__(self):
    axes = {str(k): tuple(v) for k, v in self.axes.items()}
    perms: dict[str, list[tuple[str, int]]] = {}
    for leaf, entries in axes.items():
      seen = set()
      for axis, entry in enumerate(entries):
        flat = as_flattened(entry)
        if flat is None:
          continue
        if flat.perm in seen:
          raise ValueError(f"permutation {flat.perm!r} acts on two axes of {leaf}; "
                           "a permutation may act on one axis per leaf")
        seen.add(flat.perm)
        perms.setdefault(flat.perm, []).append((leaf, axis))
    sizes = {str(k): int(v) for k, v in self.sizes.items()}
    if perms.keys() != sizes.keys():
      missing = sorted(perms.keys() - sizes.keys())
      extra = sorted(sizes.keys() - perms.keys())
      raise ValueError(f"permutation sizes do not match the spec: no size for {missing}, "
                       f"sizes of unused {extra}")
    if any(n < 1 for n in sizes.values()):
      raise ValueError(f"permutation sizes must be positive, got {sizes}")
    object.__setattr__(self, "axes", axes)
    object.__setattr__(self, "sizes", sizes)
    object.__setattr__(self, "perms", {p: tuple(v) for p, v in perms.items()})
    object.__setattr__(self, "_key", (tuple(axes.items()), tuple(sorted(sizes.items()))))
    object.__setattr__(self, "_hash", hash(self._key))

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return isinstance(other, PermutationSpec) and (
        self is other or (self._hash == other._hash and self._key == other._key))

  @classmethod
  def from_tree(cls, axes: Mapping[str, tuple[AxisEntry, ...]], variables) -> PermutationSpec:
    """A spec from `axes` with sizes read from the shapes of `variables`;
    raises ValueError listing every leaf and axis that disagrees."""
    shapes = permutation_specs.leaf_shapes(variables)
    sizes: dict[str, int] = {}
    problems = []
    for leaf, entries in axes.items():
      if leaf not in shapes:
        continue
      if len(entries) != len(shapes[leaf]):
        problems.append(f"{leaf}: {len(entries)} entries for shape {shapes[leaf]}")
        continue
      for axis, entry in enumerate(entries):
        flat = as_flattened(entry)
        if flat is None:
          continue
        length = shapes[leaf][axis]
        n, rest = divmod(length, flat.outer * flat.inner)
        if rest or n < 1:
          problems.append(f"{leaf} axis {axis}: size {length} is not "
                          f"{flat.outer} x n x {flat.inner}")
        elif sizes.setdefault(flat.perm, n) != n:
          problems.append(f"{leaf} axis {axis}: {flat.perm} has {n} units here, "
                          f"{sizes[flat.perm]} elsewhere")
    if problems:
      raise ValueError(f"permutation spec does not fit the variables: {'; '.join(problems)}")
    missing = {flat.perm for entries in axes.values() for e in entries
               if (flat := as_flattened(e)) is not None} - sizes.keys()
    if missing:
      raise ValueError(f"permutation spec does not fit the variables: no leaf of "
                       f"{', '.join(sorted(missing))} is in them")
    return cls(axes, sizes)

  @classmethod
  def for_model(cls, model_name: str, variables) -> PermutationSpec:
    """The spec of registered model `model_name` (``wsjax.models.
    permutation_spec``) with sizes from `variables` (arrays or shapes)."""
    return cls.from_tree(permutation_specs.permutation_spec(model_name, variables), variables)

  def check(self, tree_, leading: int = 0) -> None:
    """Raises ValueError unless every leaf of `tree_` is in the spec with
    axis sizes that fit it; `leading` extra axes come first in every leaf."""
    problems = []
    for name, leaf in tree.named_leaves(tree_):
      shape = tuple(np.shape(leaf))[leading:]
      if name not in self.axes:
        problems.append(f"{name}: not in the spec")
        continue
      entries = self.axes[name]
      if len(entries) != len(shape):
        problems.append(f"{name}: {len(entries)} spec entries for shape {shape}")
        continue
      for axis, entry in enumerate(entries):
        flat = as_flattened(entry)
        if flat is not None and shape[axis] != flat.outer * self.sizes[flat.perm] * flat.inner:
          problems.append(f"{name} axis {axis}: size {shape[axis]}, spec "
                          f"{flat.outer} x {self.sizes[flat.perm]} x {flat.inner}")
    if problems:
      shown = problems[:8] + ([f"... {len(problems) - 8} more"] if len(problems) > 8 else [])
      raise ValueError(f"tree does not fit the permutation spec: {'; '.join(shown)}")


def check_perms(spec: PermutationSpec, perms: Mapping[str, Any]) -> None:
  """Raises ValueError unless `perms` has exactly the spec's permutations,
  each an index vector of the right length (checked on shapes only, so it
  works under jit)."""
  if set(perms) != set(spec.sizes):
    missing = sorted(set(spec.sizes) - set(perms))
    extra = sorted(set(perms) - set(spec.sizes))
    raise ValueError(f"perms do not match the spec: missing {missing}, unknown {extra}")
  for name, p in perms.items():
    if tuple(np.shape(p)) != (spec.sizes[name],):
      raise ValueError(f"perm {name!r} has shape {tuple(np.shape(p))}, the spec needs "
                       f"({spec.sizes[name]},)")


def permute_axis(w: jax.Array, perm: jax.Array, axis: int, entry: AxisEntry) -> jax.Array:
  """``w`` with `perm` taken along `axis` as `entry` describes it (a plain
  axis, or the middle factor of a ``Flattened`` one)."""
  flat = as_flattened(entry)
  if flat.outer == 1 and flat.inner == 1:
    return jnp.take(w, perm, axis=axis)
  shape = w.shape
  split = shape[:axis] + (flat.outer, perm.shape[0], flat.inner) + shape[axis + 1:]
  return jnp.take(w.reshape(split), perm, axis=axis + 1).reshape(shape)


def permute_leaf(w: jax.Array, entries: tuple[AxisEntry, ...], perms: Mapping[str, jax.Array],
                 skip_axis: int | None = None, leading: int = 0) -> jax.Array:
  """One leaf with every permuted axis permuted, except `skip_axis`;
  `leading` unpermuted axes come before the spec's axes."""
  for axis, entry in enumerate(entries):
    if entry is not None and axis != skip_axis:
      w = permute_axis(w, perms[as_flattened(entry).perm], axis + leading, entry)
  return w


def unit_rows(w: jax.Array, axis: int, entry: AxisEntry, size: int) -> jax.Array:
  """``w`` as a ``(size, -1)`` matrix whose row i gathers everything that
  belongs to unit i of the permutation on `axis` (the middle factor of a
  ``Flattened`` axis); the column order is the same for equal shapes."""
  flat = as_flattened(entry)
  shape = w.shape
  split = shape[:axis] + (flat.outer, size, flat.inner) + shape[axis + 1:]
  return jnp.moveaxis(w.reshape(split), axis + 1, 0).reshape(size, -1)


def apply_permutation(spec: PermutationSpec, perms: Mapping[str, jax.Array], variables):
  """``P(variables)``: every leaf with its permuted axes taken by `perms`.

  ``P(w)[axis] = w.take(perms[name], axis)`` on every axis the spec assigns
  to permutation `name` (the middle factor of a ``Flattened`` axis). Works on
  a Linen variables dict (params AND batch_stats), the params alone, or any
  tree of the same leaves (gradients, updates); every leaf must be in the
  spec. Jittable: ``jax.jit(functools.partial(apply_permutation, spec))``.
  """
  spec.check(variables)
  check_perms(spec, perms)
  return tree.map_named(lambda name, w: permute_leaf(w, spec.axes[name], perms), variables)


def identity_perms(spec: PermutationSpec) -> Perms:
  """``{name: arange(n)}``: the permutations that change nothing."""
  return {p: jnp.arange(n, dtype=jnp.int32) for p, n in spec.sizes.items()}


def random_perms(spec: PermutationSpec, key: jax.Array) -> Perms:
  """Uniformly random permutations, one key per permutation (split in sorted
  name order): the same key gives the same permutations."""
  names = sorted(spec.sizes)
  keys = jax.random.split(key, len(names))
  return {p: jax.random.permutation(k, spec.sizes[p]).astype(jnp.int32)
          for p, k in zip(names, keys)}


def invert(perms: Mapping[str, jax.Array]) -> Perms:
  """The inverse permutations: ``apply(invert(p), apply(p, w)) == w``
  (``inv[perm[i]] = i``, i.e. ``argsort(perm)``)."""
  return {p: jnp.argsort(v).astype(jnp.int32) for p, v in perms.items()}


def compose(first: Mapping[str, jax.Array], second: Mapping[str, jax.Array]) -> Perms:
  """Applying `first` then `second` as one: ``apply(compose(f, s), w) ==
  apply(s, apply(f, w))``, i.e. ``f[s]`` (index `first` by `second`)."""
  if set(first) != set(second):
    raise ValueError(f"compose needs the same permutations on both sides, got "
                     f"{sorted(first)} and {sorted(second)}")
  return {p: jnp.asarray(first[p])[jnp.asarray(second[p])] for p in first}
