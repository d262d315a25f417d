"""Git Re-Basin weight matching, for one pair of trees or a sum over pairs.

Ainsworth, Hayase & Srinivasa, "Git Re-Basin: Merging Models modulo
Permutation Symmetries", ICLR 2023 (samuela/git-re-basin,
``src/weight_matching.py``, ``weight_matching``); generalized to several
pairs as Chijiwa, "Transferring Learning Trajectories of Neural Networks",
ICLR 2024 (dchiji-ntt/learning-transfer, ``utils/weight_matching.py``,
``WeightMatching.solve``) uses it for gradient matching (GMT/FGMT).

Objective: find permutations pi (one per permutation of the spec) maximizing

    L(pi) = sum_i <A_i, pi(B_i)>      (sum over pairs i and over leaves)

i.e. making ``pi(B_i)`` close to ``A_i`` in squared distance (the norms do
not depend on pi). With one pair (A, B) = (params_a, params_b) this is
weight matching; GMT passes trees of gradients, one pair per trajectory
point. ``apply_permutation(spec, perms, params_b)`` is then the matched b.

Algorithm (coordinate descent, as the reference): start from the identity
(or `init_perms`); each sweep visits the permutations in a random order; for
permutation P, holding the others fixed, L is linear in P:

    L = sum_{j,k} C[j, k] [P[j] == k] + const,
    C = sum_i sum_{(leaf, axis) in P} A_i[leaf](axis as rows, flattened)
                                      @ (B_i[leaf] with every OTHER perm applied,
                                         same axis as rows)^T

so the best P is ``linear_sum_assignment(C, maximize=True)``. C is built on
the device by one jitted function per permutation (compiled once per spec
and shapes), then moved to the host for SciPy's solver. A sweep with no gain
above `tol` ends the search (tol 1e-7 as learning-transfer's ``wm_epsilon``;
git-re-basin uses 1e-12), as does `max_sweeps` (100 in both).

Differences from the references, on purpose:
- the visiting order is seeded: sweep s uses ``jax.random.permutation(
  fold_in(key, s), number of permutations)`` over the sorted names (the
  references use unseeded ``random.shuffle``, or ``hash()``-seeded keys);
- a permutation is replaced only when the assignment strictly improves its
  linear objective (the references always replace it, which can wander
  among ties); L never decreases;
- leaves that enter the objective: by default the spec'd parameters, NOT
  BatchNorm running statistics ("batch_stats/..." leaves, which the
  references do not match either; they are permuted along with their units
  by ``apply_permutation``). Pass `include` to choose.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment

from wsjax import tree
from wsjax.transfer.permutation import (
    PermutationSpec, Perms, check_perms, identity_perms, permute_leaf, unit_rows)

Include = Callable[[str], bool]


def is_parameter(name: str) -> bool:
  """The default `include`: every leaf but BatchNorm running statistics."""
  return not name.startswith("batch_stats/")


@dataclasses.dataclass(frozen=True)
class MatchInfo:
  """What a `weight_matching` run did.

  Attributes:
    sweeps: sweeps run (each visits every permutation once).
    converged: True if the last sweep gained nothing above `tol` (False: it
      stopped at `max_sweeps`).
    objective: L before the first sweep, then after each sweep
      (``len == sweeps + 1``); non-decreasing. L is linear in the permutation
      being solved (the others fixed), so an accepted update changes it by
      exactly the assignment's gain, ``C[rows, new].sum() - C[rows, old].sum()``:
      the values after each sweep are tracked so, and only the first and the
      last are evaluated in full (the last replaces the tracked value).
    order: the permutation names in the order each sweep visited them.
    cost_s: seconds building cost matrices (device compute and the copy to
      the host, compilation included).
    assign_s: seconds in ``linear_sum_assignment``.
    objective_s: seconds evaluating L in full (before and after the search).
  """
  sweeps: int
  converged: bool
  objective: tuple[float, ...]
  order: tuple[tuple[str, ...], ...]
  cost_s: float
  assign_s: float
  objective_s: float


def stack_pairs(pairs: Sequence[tuple[Any, Any]]) -> tuple[Any, Any]:
  """``[(a_1, b_1), ..., (a_k, b_k)]`` -> ``(a, b)`` with a leading pair axis
  of size k on every leaf: the input of ``weight_matching(..., stacked=True)``.

  The objective sums over the pair axis, so appending all-zero pairs changes
  nothing: pad a growing list (FGMT's cache) to a fixed length to keep one
  compiled cost function."""
  if not pairs:
    raise ValueError("stack_pairs needs at least one (a, b) pair")
  a = jax.tree.map(lambda *xs: jnp.stack(xs), *[p[0] for p in pairs])
  b = jax.tree.map(lambda *xs: jnp.stack(xs), *[p[1] for p in pairs])
  return a, b


def _matched_leaves(spec: PermutationSpec, params_a, params_b, stacked: bool,
                    include: Include | None) -> tuple[dict, dict]:
  """The included leaves of both trees as ``{name: array}``, checked
  against the spec and against each other."""
  leading = 1 if stacked else 0
  spec.check(params_a, leading)
  spec.check(params_b, leading)
  a, b = tree.to_dict(params_a), tree.to_dict(params_b)
  if a.keys() != b.keys():
    raise ValueError(f"params_a and params_b have different leaves: "
                     f"{sorted(a.keys() ^ b.keys())[:8]}")
  bad = [n for n in a if np.shape(a[n]) != np.shape(b[n])]
  if bad:
    raise ValueError(f"params_a and params_b differ in shape at {bad[:8]}")
  if stacked:
    counts = {np.shape(x)[0] if np.ndim(x) else None for x in [*a.values(), *b.values()]}
    if len(counts) != 1 or None in counts:
      raise ValueError("stacked=True needs the same leading pair axis on every leaf, "
                       f"got sizes {sorted(c for c in counts if c is not None)}")
  include = include or is_parameter
  names = [n for n in a if include(n)]
  return {n: jnp.asarray(a[n]) for n in names}, {n: jnp.asarray(b[n]) for n in names}


def _precision_dot(x, y):
  return jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("spec", "perm", "leaves", "leading"))
def _cost(spec: PermutationSpec, perm: str, leaves: tuple[tuple[str, int], ...],
          leading: int, perms: Mapping[str, jax.Array], a: Mapping[str, jax.Array],
          b: Mapping[str, jax.Array]) -> jax.Array:
  n = spec.sizes[perm]
  total = None
  for leaf, axis in leaves:
    entry = spec.axes[leaf][axis]
    wb = permute_leaf(b[leaf], spec.axes[leaf], perms, skip_axis=axis, leading=leading)
    wa = a[leaf]
    if leading:  # the pair axis becomes columns: summed in the product
      wa, wb = jnp.moveaxis(wa, 0, -1), jnp.moveaxis(wb, 0, -1)
    dtype = jnp.promote_types(wa.dtype, jnp.float32)
    term = _precision_dot(unit_rows(wa.astype(dtype), axis, entry, n),
                          unit_rows(wb.astype(dtype), axis, entry, n))
    total = term if total is None else total + term
  return total


@functools.partial(jax.jit, static_argnames=("spec", "leading"))
def _objective(spec: PermutationSpec, leading: int, perms: Mapping[str, jax.Array],
               a: Mapping[str, jax.Array], b: Mapping[str, jax.Array]) -> jax.Array:
  total = jnp.zeros((), jnp.float32)
  for leaf in a:
    wb = permute_leaf(b[leaf], spec.axes[leaf], perms, leading=leading)
    dtype = jnp.promote_types(a[leaf].dtype, jnp.float32)
    total = total + jnp.vdot(a[leaf].astype(dtype), wb.astype(dtype),
                             precision=jax.lax.Precision.HIGHEST)
  return total


def _groups(spec: PermutationSpec, names: Sequence[str]):
  """Per permutation: its (leaf, axis) pairs among the included leaves, and
  the other permutations those leaves need."""
  included = set(names)
  groups = {}
  for p, axes in spec.perms.items():
    leaves = tuple((leaf, axis) for leaf, axis in axes if leaf in included)
    others = sorted({e if isinstance(e, str) else e.perm
                     for leaf, _ in leaves for e in spec.axes[leaf] if e is not None} - {p})
    groups[p] = (leaves, tuple(others))
  return groups


def cost_matrix(spec: PermutationSpec, perm: str, perms: Mapping[str, jax.Array],
                params_a, params_b, *, stacked: bool = False,
                include: Include | None = None) -> jax.Array:
  """The ``(n, n)`` matrix C of permutation `perm` given the others in
  `perms`: ``L = sum_j C[j, perms[perm][j]] + (terms without perm)``; see
  the module docstring. Mostly for tests and inspection."""
  check_perms(spec, perms)
  a, b = _matched_leaves(spec, params_a, params_b, stacked, include)
  leaves, others = _groups(spec, list(a))[perm]
  if not leaves:
    return jnp.zeros((spec.sizes[perm],) * 2, jnp.float32)
  sub = [leaf for leaf, _ in leaves]
  return _cost(spec, perm, leaves, int(stacked), {o: perms[o] for o in others},
               {n: a[n] for n in sub}, {n: b[n] for n in sub})


def matching_objective(spec: PermutationSpec, perms: Mapping[str, jax.Array], params_a,
                       params_b, *, stacked: bool = False,
                       include: Include | None = None) -> jax.Array:
  """``L(perms) = sum_i <A_i, perms(B_i)>`` over the included leaves (and
  over the pair axis if `stacked`)."""
  check_perms(spec, perms)
  a, b = _matched_leaves(spec, params_a, params_b, stacked, include)
  return _objective(spec, int(stacked), dict(perms), a, b)


def _check_init(spec: PermutationSpec, init_perms) -> Perms:
  if init_perms is None:
    return identity_perms(spec)
  check_perms(spec, init_perms)
  for name, p in init_perms.items():
    if not np.array_equal(np.sort(np.asarray(p)), np.arange(spec.sizes[name])):
      raise ValueError(f"init_perms[{name!r}] is not a permutation of 0..{spec.sizes[name] - 1}")
  return {name: jnp.asarray(p, jnp.int32) for name, p in init_perms.items()}


def weight_matching(spec: PermutationSpec, params_a, params_b, *, key: jax.Array,
                    max_sweeps: int = 100, tol: float = 1e-7,
                    init_perms: Mapping[str, Any] | None = None, stacked: bool = False,
                    include: Include | None = None) -> tuple[Perms, MatchInfo]:
  """Permutations of `params_b` that make it close to `params_a`.

  Args:
    spec: the permutation spec (``PermutationSpec.for_model(name, variables)``).
    params_a: the target tree (params, variables, gradients: any tree whose
      leaves are in the spec; spec'd leaves it lacks are skipped).
    params_b: the tree to permute, same leaves and shapes as `params_a`.
    key: PRNG key of the visiting order (sweep s: ``fold_in(key, s)``).
    max_sweeps: at most this many sweeps (each visits every permutation).
    tol: a sweep in which no permutation gained more than `tol` in L ends
      the search (absolute, like both references).
    init_perms: start here instead of the identity.
    stacked: the leaves of both trees carry a leading pair axis (see
      ``stack_pairs``) and L sums over it: maximize ``sum_i <A_i, pi(B_i)>``.
    include: ``name -> bool``, the leaves that enter L (default
      ``is_parameter``: all but "batch_stats/..." leaves).

  Returns:
    ``(perms, info)``: ``{name: int32 index array}`` such that
    ``apply_permutation(spec, perms, params_b)`` matches `params_a`, and a
    ``MatchInfo``.
  """
  if max_sweeps < 0 or tol < 0:
    raise ValueError(f"max_sweeps and tol must be >= 0, got {max_sweeps}, {tol}")
  a, b = _matched_leaves(spec, params_a, params_b, stacked, include)
  perms = _check_init(spec, init_perms)
  host = {p: np.asarray(v) for p, v in perms.items()}
  leading = int(stacked)
  groups = _groups(spec, list(a))
  names = sorted(spec.sizes)
  cost_s = assign_s = objective_s = 0.0

  def objective():
    nonlocal objective_s
    t0 = time.perf_counter()
    value = float(_objective(spec, leading, perms, a, b))
    objective_s += time.perf_counter() - t0
    return value

  history, orders = [objective()], []
  tracked = history[0]
  converged = False
  for sweep in range(max_sweeps):
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, sweep), len(names)))
    orders.append(tuple(names[i] for i in order))
    progress = False
    for p in orders[-1]:
      leaves, others = groups[p]
      if not leaves:  # no included leaf touches p: it cannot change L
        continue
      t0 = time.perf_counter()
      sub = [leaf for leaf, _ in leaves]
      c = _cost(spec, p, leaves, leading, {o: perms[o] for o in others},
                {n: a[n] for n in sub}, {n: b[n] for n in sub})
      c = np.asarray(c, np.float64)
      t1 = time.perf_counter()
      rows, cols = linear_sum_assignment(c, maximize=True)
      assign_s += time.perf_counter() - t1
      cost_s += t1 - t0
      old = c[rows, host[p]].sum()
      new = c[rows, cols].sum()
      if new > old:
        host[p] = cols.astype(np.int32)
        perms[p] = jnp.asarray(host[p])
        tracked += float(new - old)
      progress = progress or new > old + tol
    history.append(tracked)
    if not progress:
      converged = True
      break
  if orders:  # the tracked value, rounding aside; report the exact one
    history[-1] = objective()
  info = MatchInfo(sweeps=len(orders), converged=converged, objective=tuple(history),
                   order=tuple(orders), cost_s=cost_s, assign_s=assign_s,
                   objective_s=objective_s)
  return perms, info
