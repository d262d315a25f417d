"""The methods a staged study compares, by name.

A method is a warm-start policy (how a stage begins, see
`wsjax.train.policies`) plus, optionally, a loss penalty with its reference
(`l2_init`). `--methods` in the experiment programs names them:

* `cold`, `warm`, `warm_rm`: see `wsjax.train.policies`.
* `shrink_perturb`: Ash & Adams (2020): `theta <- shrink*theta + perturb*theta_fresh`
  on every parameter, BatchNorm statistics fresh, a new optimizer (their code).
* `sp`: the DASH code's baseline: `w <- 0.3 w + N(0, 0.01^2)` on conv/dense
  weights and biases; optimizer and BatchNorm statistics kept.
* `dash`: Shin et al. (2024): the EMA of chunk gradients over the buffer in
  eval mode, then `W_group *= clip(cos(W_group, -g), lambda, 1)`; optimizer and
  BatchNorm statistics kept (official code).
* `reset`: re-initialize the classifier (`head`) layer, the rest kept.
* `l2_init`: warm, plus `coef * (sum_l ||W_l - W_l^0||)^2` in the loss
  (the official code's form), `W^0` the run's initialization.

Every stage-0 start is the fresh init (or a `--warm_start_from` source,
which the policy then transforms like any previous stage's result).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wsjax import parallel
from wsjax import transforms as T
from wsjax.train import policies


class UnknownMethodError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class MethodParams:
  """Hyperparameters of the methods (flags of the experiment programs)."""
  opt_state: str = "default"         # after a warm-type policy: keep | reset the optimizer state
  bn_stats: str = "default"          # after a warm-type policy: keep | reset BatchNorm statistics
  shrink: float = 0.4                # shrink_perturb (Ash & Adams defaults)
  perturb: float = 0.1
  sp_shrink: float = 0.3             # sp (DASH code defaults)
  sp_sigma: float = 0.01
  dash_lambda: float = 0.3
  dash_alpha: float = 0.3
  dash_granularity: str = "kernel_slice"
  dash_max_batch: int = 512          # examples per gradient batch: bounds memory; 512 was fastest on CPU
  reset_layers: tuple = ("head",)
  l2_init_coef: float = 1e-2

  def validate(self) -> None:
    for name in ("shrink", "perturb", "sp_shrink", "dash_lambda", "dash_alpha"):
      v = getattr(self, name)
      if not 0 <= v <= 1:
        raise ValueError(f"--{name} must be in [0, 1], got {v}")
    if self.sp_sigma < 0:
      raise ValueError(f"--sp_sigma must be >= 0, got {self.sp_sigma}")
    if self.l2_init_coef < 0:
      raise ValueError(f"--l2_init_coef must be >= 0, got {self.l2_init_coef}")
    if self.dash_granularity not in ("kernel_slice", "unit"):
      raise ValueError(f"--dash_granularity must be kernel_slice or unit, got {self.dash_granularity!r}")
    for name in ("opt_state", "bn_stats"):
      if getattr(self, name) not in ("default", "keep", "reset"):
        raise ValueError(f"--{name} must be default, keep or reset, got {getattr(self, name)!r}")
    if self.dash_max_batch < 1:
      raise ValueError(f"--dash_max_batch must be >= 1, got {self.dash_max_batch}")


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  name: str
  prepare: Callable[[Any, policies.StageContext, MethodParams], Any]
  description: str
  penalty: Optional[Callable] = None            # penalty(params, reg) added to the loss
  make_reg: Optional[Callable] = None           # (states, MethodParams) -> reg tree (seed-stacked)


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
  _REGISTRY[spec.name] = spec
  return spec


def method_params_from_flags(flag_values) -> MethodParams:
  """`MethodParams` from absl flags of the same names (those defined)."""
  kwargs = {}
  for f in dataclasses.fields(MethodParams):
    if f.name in flag_values:
      value = flag_values[f.name].value
      kwargs[f.name] = tuple(value) if isinstance(value, list) else value
  return MethodParams(**kwargs)


def get_method(name: str) -> MethodSpec:
  if name not in _REGISTRY:
    raise UnknownMethodError(f"unknown method {name!r}; choose from {', '.join(_REGISTRY)}")
  return _REGISTRY[name]


def known_methods() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def prepare_stage(spec: MethodSpec, prev, ctx: policies.StageContext, hp: MethodParams):
  """The method's policy, then the optimizer-state and BatchNorm-statistics
  policies (`hp.opt_state`, `hp.bn_stats`: keep | reset; "default" leaves
  the method's own choice) for every start that continues a previous model."""
  state = spec.prepare(prev, ctx, hp)
  if prev is None or spec.name == "cold":
    return state
  if hp.opt_state == "reset":
    state = policies.reset_opt_states(state, ctx.tx)
  elif hp.opt_state == "keep":
    state = state.replace(opt_state=prev.opt_state, step=prev.step)
  if hp.bn_stats == "reset" and jax.tree.leaves(state.batch_stats):
    state = state.replace(batch_stats=ctx.fresh().batch_stats)
  elif hp.bn_stats == "keep":
    state = state.replace(batch_stats=prev.batch_stats)
  return state


register(MethodSpec("cold", lambda prev, ctx, hp: policies.cold(prev, ctx),
                    "fresh init and optimizer every stage"))
register(MethodSpec("warm", lambda prev, ctx, hp: policies.warm(prev, ctx),
                    "keep params, BatchNorm statistics and (flag) optimizer state"))
register(MethodSpec("warm_rm", lambda prev, ctx, hp: policies.warm_rm(prev, ctx),
                    "keep the model, reset the optimizer"))


def _policy_keys(ctx: policies.StageContext, salt: int) -> jax.Array:
  """Per-seed keys for a policy's random draws: a function of (seed, stage)."""
  from wsjax.train.state import seed_keys
  return seed_keys(ctx.seeds, ctx.stage, salt)


# Each policy's computation is one jitted, seed-vmapped function, compiled once
# per (hyperparameters, shapes) and reused by every stage.

@functools.partial(jax.jit, static_argnames=("shrink", "perturb"))
def _mix_with_fresh(params, fresh_params, *, shrink, perturb):
  def one(p, f):
    return T.apply_transform(T.shrink_perturb(shrink, perturb, init_fn=lambda key: f), p)
  return jax.vmap(one)(params, fresh_params)


def _shrink_perturb(prev, ctx, hp: MethodParams):
  fresh = ctx.fresh()
  if prev is None:
    return fresh
  params = _mix_with_fresh(prev.params, fresh.params, shrink=hp.shrink, perturb=hp.perturb)
  return fresh.replace(params=params, opt_state=policies.vmapped_opt_init(ctx.tx)(params))


@functools.partial(jax.jit, static_argnames=("shrink", "sigma"))
def _gaussian_perturb(params, keys, *, shrink, sigma):
  def one(p, key):
    return T.apply_transform(T.gaussian_shrink_perturb(shrink, sigma, seed=key), p)
  return jax.vmap(one)(params, keys)


def _gaussian_sp(prev, ctx, hp: MethodParams):
  if prev is None:
    return ctx.fresh()
  params = _gaussian_perturb(prev.params, _policy_keys(ctx, 11), shrink=hp.sp_shrink,
                            sigma=hp.sp_sigma)
  return prev.replace(params=params)


@functools.partial(jax.jit, static_argnames=("names",))
def _reset_named(params, fresh_params, *, names):
  def one(p, f):
    return T.apply_transform(T.reset_layers(names, init_fn=lambda key: f), p)
  return jax.vmap(one)(params, fresh_params)


def _reset(prev, ctx, hp: MethodParams):
  fresh = ctx.fresh()
  if prev is None:
    return fresh
  return prev.replace(params=_reset_named(prev.params, fresh.params, names=tuple(hp.reset_layers)))


@functools.partial(jax.jit, static_argnames=("model", "max_batch", "mesh"))
def _chunk_gradient_ema(params, batch_stats, x, y, chunk_indices, chunk_mask, alpha, *,
                        model, max_batch, mesh):
  """Per seed: DASH's EMA of chunk gradients, model in eval mode; seeds
  spread over the `seeds` axis of `mesh`."""
  def one(p, bs):
    def loss_fn(pp, xb, yb):
      variables = {"params": pp, **({"batch_stats": bs} if bs else {})}
      logits = model.apply(variables, xb, train=False)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    return T.dash_gradient(loss_fn, p, x, y, chunk_indices, alpha=alpha, max_batch=max_batch,
                           chunk_mask=chunk_mask)
  params, batch_stats = parallel.over_seeds((params, batch_stats), mesh)
  return parallel.gathered(jax.vmap(one)(params, batch_stats), mesh)


def _seed_mesh(ctx: policies.StageContext):
  """The stepper's (seeds, data) mesh; without a stepper, plain data parallelism."""
  return ctx.stepper.mesh if ctx.stepper is not None else parallel.seed_data_mesh(1)


def dash_signal(states, ctx: policies.StageContext, hp: MethodParams):
  """The EMA of per-chunk gradients over the buffer (eval mode), per seed.

  Equal chunks (DASH's framework) are one scan over a chunk axis padded to
  the schedule's final length (padding rows masked, first), so every stage
  reuses one compiled program. Unequal arrivals (two_phase, online) run the
  same EMA (from zeros) one arrival at a time.
  """
  arrivals = [np.asarray(a, np.int32) for a in ctx.arrivals]
  grads = functools.partial(_chunk_gradient_ema, states.params, states.batch_stats,
                            ctx.data_x, ctx.data_y, model=ctx.model,
                            max_batch=hp.dash_max_batch, mesh=_seed_mesh(ctx))
  if len({len(a) for a in arrivals}) == 1:
    rows = max(ctx.n_stages, len(arrivals))
    pad = rows - len(arrivals)
    idx = np.concatenate([np.zeros((pad, len(arrivals[0])), np.int32), np.stack(arrivals)])
    mask = np.arange(rows) >= pad
    return grads(idx, mask, np.float32(hp.dash_alpha))
  a = hp.dash_alpha
  g = jax.tree.map(jnp.zeros_like, states.params)
  for chunk in arrivals:
    gc = grads(chunk[None], np.ones(1, bool), np.float32(1.0))
    g = jax.tree.map(lambda m, c: (1 - a) * m + a * c, g, gc)
  return g


@functools.partial(jax.jit, static_argnames=("lam", "granularity"))
def _dash_shrink(params, grads, *, lam, granularity):
  tx = T.dash(lam, granularity=granularity)
  return jax.vmap(lambda p, g: T.apply_transform(tx, p, g))(params, grads)


def _dash(prev, ctx, hp: MethodParams):
  if prev is None:
    return ctx.fresh()
  grads = dash_signal(prev, ctx, hp)
  return prev.replace(params=_dash_shrink(prev.params, grads, lam=hp.dash_lambda,
                                          granularity=hp.dash_granularity))


def _l2_penalty(params, reg):
  return T.l2_init_penalty(params, reg["init"], coef=reg["coef"])


def _l2_reg(states, hp: MethodParams):
  """The penalty's reference: each seed's parameters when the run started."""
  coef = hp.l2_init_coef
  return {"init": jax.tree.map(lambda x: x.copy(), states.params),
          "coef": jnp.full(jax.tree.leaves(states.params)[0].shape[:1], coef, jnp.float32)}


register(MethodSpec("shrink_perturb", _shrink_perturb,
                    "Ash & Adams: shrink*theta + perturb*fresh init, fresh BN stats and optimizer"))
register(MethodSpec("sp", _gaussian_sp, "DASH code's sp: 0.3*w + N(0, 0.01^2) on weights and biases"))
register(MethodSpec("dash", _dash, "DASH: shrink by cosine with the buffer's gradient EMA"))
register(MethodSpec("reset", _reset, "re-initialize the classifier layer"))
register(MethodSpec("l2_init", lambda prev, ctx, hp: policies.warm(prev, ctx), "warm + l2 to the initialization",
                    penalty=_l2_penalty, make_reg=_l2_reg))
