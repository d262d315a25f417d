"""The methods a staged study compares: each a small dataclass of its own knobs.

A method is a warm-start policy (how a stage begins from the previous
stage's final state), optionally with a loss penalty and its reference
(`l2_init`). Every stage-0 start is the fresh initialization, or a
`--warm_start_from` source, which the policy then transforms like any
previous stage's result.

* `cold`: a fresh initialization and optimizer every stage (Ash & Adams'
  "random init" arm; DASH's `cold`).
* `warm`: keep params, BatchNorm statistics and optimizer state (DASH's
  `warm`); `warm_rm`: keep the model, reset the optimizer (DASH's `warm_rm`).
* `shrink_perturb`: Ash & Adams (2020): `theta <- shrink*theta +
  perturb*theta_fresh` on every parameter, BatchNorm statistics fresh, a new
  optimizer (their code).
* `sp`: the DASH code's baseline: `w <- 0.3 w + N(0, 0.01^2)` on conv/dense
  weights and biases; optimizer and BatchNorm statistics kept.
* `dash`: Shin et al. (2024): the EMA of chunk gradients over the buffer in
  eval mode, then `W_group *= clip(cos(W_group, -g), lambda, 1)`; optimizer
  and BatchNorm statistics kept (official code).
* `reset`: re-initialize the named layers (the classifier `head`).
* `l2_init`: warm, plus `coef * (sum_l ||W_l - W_l^0||)^2` in the loss (the
  official code's form), `W^0` the method's stage-0 start.

Every policy's computation is one jitted, replica-vmapped function, compiled
once per (hyperparameters, shapes) and reused by every stage.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wsjax import parallel
from wsjax import transforms as T
from wsjax.core.state import seed_keys
from wsjax.core.task import Classification, Task


class UnknownMethodError(ValueError):
  pass


@dataclasses.dataclass
class StageContext:
  """What a policy may read when preparing stage `stage`."""
  stage: int
  seeds: tuple[int, ...]
  tx: Any                          # the optax optimizer
  fresh: Callable[[], Any]         # fresh replica-stacked states for this stage
  data_x: jax.Array                # the whole training set (replicated)
  data_y: jax.Array
  arrivals: list[np.ndarray]       # indices that arrived at each stage <= `stage`
  n_stages: int                    # stages in the whole schedule
  model: Any
  init_variables: Any = None       # key -> a fresh draw of the model's variables
  mesh: Any = None                 # the (replicas, data) mesh of the study's programs


@functools.lru_cache(maxsize=None)
def vmapped_opt_init(tx):
  """`tx.init` over a leading replica axis, jitted once per optimizer; the
  result replicated like every state (so the block program sees one layout)."""
  return jax.jit(jax.vmap(tx.init), out_shardings=parallel.replicated())


def reset_opt_states(states, tx):
  """A fresh optimizer state for every replica's current params."""
  return states.replace(opt_state=vmapped_opt_init(tx)(states.params))


def _keys(ctx: StageContext, salt: int) -> jax.Array:
  """Per-replica keys for a policy's random draws: a function of (seed, stage)."""
  return seed_keys(ctx.seeds, ctx.stage, salt)


def _field(default, help_text: str, flag: str | None = None, **more):
  meta = {"help": help_text, **more}
  if flag:
    meta["flag"] = flag
  return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Method:
  """A warm-start policy. Subclasses set `name` and override `continue_from`."""
  name = "method"
  description = ""
  continues = True    # whether later stages continue the previous model (not cold)

  def validate(self) -> None:
    pass

  def task(self) -> Task:
    """The training task (a penalty's task for l2_init)."""
    return Classification()

  def make_reference(self, states) -> Any:
    """The task's per-replica inputs made from the stage-0 start ({} if none)."""
    del states
    return {}

  def prepare(self, prev, ctx: StageContext):
    """The stage's starting state: the fresh one when there is nothing to continue."""
    if prev is None:
      return ctx.fresh()
    return self.continue_from(prev, ctx)

  def continue_from(self, prev, ctx: StageContext):
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Cold(Method):
  name = "cold"
  description = "fresh init and optimizer every stage"
  continues = False

  def prepare(self, prev, ctx):
    del prev
    return ctx.fresh()


@dataclasses.dataclass(frozen=True)
class Warm(Method):
  name = "warm"
  description = "keep params, BatchNorm statistics and optimizer state"

  def continue_from(self, prev, ctx):
    return prev


@dataclasses.dataclass(frozen=True)
class WarmRM(Method):
  name = "warm_rm"
  description = "keep the model, reset the optimizer"

  def continue_from(self, prev, ctx):
    return reset_opt_states(prev, ctx.tx)


@functools.partial(jax.jit, static_argnames=("shrink", "perturb", "init_variables"))
def _shrink_perturb(params, keys, *, shrink, perturb, init_variables):
  """Per replica: `T.shrink_perturb` with the model's own initializer and the
  replica's key (the fresh draw is `init_variables(sub)`, `sub` from the key)."""
  def one(p, key):
    tx = T.shrink_perturb(shrink, perturb, init_fn=lambda k: init_variables(k)["params"], key=key)
    return T.apply_transform(tx, p)
  return jax.vmap(one)(params, keys)


@dataclasses.dataclass(frozen=True)
class ShrinkPerturb(Method):
  """Ash & Adams (2020): shrink*theta + perturb*fresh, fresh BN stats and optimizer."""
  name = "shrink_perturb"
  description = "Ash & Adams: shrink*theta + perturb*fresh init, fresh BN stats and optimizer"
  shrink: float = _field(0.4, "shrink_perturb: factor on the current parameters (Ash & Adams)")
  perturb: float = _field(0.1, "shrink_perturb: factor on a fresh initialization")

  def validate(self):
    _unit("shrink", self.shrink)
    _unit("perturb", self.perturb)

  def continue_from(self, prev, ctx):
    params = _shrink_perturb(prev.params, _keys(ctx, 13), shrink=self.shrink,
                             perturb=self.perturb, init_variables=ctx.init_variables)
    fresh = ctx.fresh()  # fresh BatchNorm statistics and a new optimizer, as their code
    return fresh.replace(params=params, opt_state=vmapped_opt_init(ctx.tx)(params))


@functools.partial(jax.jit, static_argnames=("shrink", "sigma"))
def _gaussian_perturb(params, keys, *, shrink, sigma):
  def one(p, key):
    return T.apply_transform(T.gaussian_shrink_perturb(shrink, sigma, key=key), p)
  return jax.vmap(one)(params, keys)


@dataclasses.dataclass(frozen=True)
class SP(Method):
  """The DASH code's `sp`: shrink, then isotropic Gaussian noise."""
  name = "sp"
  description = "DASH code's sp: 0.3*w + N(0, 0.01^2) on weights and biases"
  shrink: float = _field(0.3, "sp: shrink factor (DASH code)", flag="sp_shrink")
  sigma: float = _field(0.01, "sp: std of the Gaussian noise", flag="sp_sigma")

  def validate(self):
    _unit("sp_shrink", self.shrink)
    if self.sigma < 0:
      raise ValueError(f"--sp_sigma must be >= 0, got {self.sigma}")

  def continue_from(self, prev, ctx):
    params = _gaussian_perturb(prev.params, _keys(ctx, 11), shrink=self.shrink, sigma=self.sigma)
    return prev.replace(params=params)


@functools.partial(jax.jit, static_argnames=("names", "init_variables"))
def _reset_named(params, keys, *, names, init_variables):
  def one(p, key):
    tx = T.reset_layers(names, init_fn=lambda k: init_variables(k)["params"], key=key)
    return T.apply_transform(tx, p)
  return jax.vmap(one)(params, keys)


@dataclasses.dataclass(frozen=True)
class Reset(Method):
  name = "reset"
  description = "re-initialize the classifier layer"
  layers: tuple[str, ...] = _field(("head",), "reset: layer names to re-initialize",
                                   flag="reset_layers")

  def validate(self):
    if not self.layers:
      raise ValueError("--reset_layers names no layer")

  def continue_from(self, prev, ctx):
    return prev.replace(params=_reset_named(prev.params, _keys(ctx, 17), names=tuple(self.layers),
                                            init_variables=ctx.init_variables))


@functools.partial(jax.jit, static_argnames=("model", "max_batch", "mesh"))
def _chunk_gradient_ema(params, batch_stats, x, y, chunk_indices, chunk_mask, alpha, *,
                        model, max_batch, mesh):
  """Per replica: DASH's EMA of chunk gradients, model in eval mode; replicas
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


@functools.partial(jax.jit, static_argnames=("lam", "granularity"))
def _dash_shrink(params, grads, *, lam, granularity):
  tx = T.dash(lam, granularity=granularity)
  return jax.vmap(lambda p, g: T.apply_transform(tx, p, grads=g))(params, grads)


@dataclasses.dataclass(frozen=True)
class Dash(Method):
  """Shin et al. (2024): shrink by the cosine with the buffer's gradient EMA."""
  name = "dash"
  description = "DASH: shrink by cosine with the buffer's gradient EMA"
  lam: float = _field(0.3, "dash: lower clip of the shrink factor", flag="dash_lambda")
  alpha: float = _field(0.3, "dash: EMA weight of the newest chunk's gradient", flag="dash_alpha")
  granularity: str = _field("kernel_slice", "dash: kernel_slice (code) or unit (paper text)",
                            flag="dash_granularity", choices=("kernel_slice", "unit"))
  max_batch: int = _field(512, "dash: examples per gradient batch (the result is the same up "
                          "to rounding)", flag="dash_max_batch", operational=True)

  def validate(self):
    _unit("dash_lambda", self.lam)
    _unit("dash_alpha", self.alpha)
    if self.granularity not in ("kernel_slice", "unit"):
      raise ValueError(f"--dash_granularity must be kernel_slice or unit, got {self.granularity!r}")
    if self.max_batch < 1:
      raise ValueError(f"--dash_max_batch must be >= 1, got {self.max_batch}")

  def signal(self, states, ctx: StageContext):
    return dash_signal(states, ctx, self.alpha, self.max_batch)

  def continue_from(self, prev, ctx):
    grads = self.signal(prev, ctx)
    return prev.replace(params=_dash_shrink(prev.params, grads, lam=self.lam,
                                            granularity=self.granularity))


def dash_signal(states, ctx: StageContext, alpha: float, max_batch: int = 512):
  """The EMA of per-chunk gradients over the buffer (eval mode), per replica.

  Equal chunks (DASH's framework) are one scan over a chunk axis padded to
  the schedule's final length (padding rows masked, first), so every stage
  reuses one compiled program. Unequal arrivals (two_phase, online) run the
  same EMA (from zeros) one arrival at a time.
  """
  arrivals = [np.asarray(a, np.int32) for a in ctx.arrivals]
  mesh = ctx.mesh if ctx.mesh is not None else parallel.seed_data_mesh(1)
  grads = functools.partial(_chunk_gradient_ema, states.params, states.batch_stats,
                            ctx.data_x, ctx.data_y, model=ctx.model,
                            max_batch=max_batch, mesh=mesh)
  if len({len(a) for a in arrivals}) == 1:
    rows = max(ctx.n_stages, len(arrivals))
    pad = rows - len(arrivals)
    idx = np.concatenate([np.zeros((pad, len(arrivals[0])), np.int32), np.stack(arrivals)])
    mask = np.arange(rows) >= pad
    return grads(idx, mask, np.float32(alpha))
  g = jax.tree.map(jnp.zeros_like, states.params)
  for chunk in arrivals:
    gc = grads(chunk[None], np.ones(1, bool), np.float32(1.0))
    g = jax.tree.map(lambda m, c: (1 - alpha) * m + alpha * c, g, gc)
  return g


def _l2_penalty(params, reg):
  return T.l2_init_penalty(params, reg["init"], coef=reg["coef"])


@dataclasses.dataclass(frozen=True)
class L2Init(Method):
  """Warm, plus the DASH code's L2-to-initialization penalty."""
  name = "l2_init"
  description = "warm + l2 to the initialization"
  coef: float = _field(1e-2, "l2_init: penalty coefficient", flag="l2_init_coef")

  def validate(self):
    if self.coef < 0:
      raise ValueError(f"--l2_init_coef must be >= 0, got {self.coef}")

  def task(self) -> Task:
    return Classification(penalty=_l2_penalty)

  def make_reference(self, states):
    """The penalty's reference: each replica's parameters when the run started."""
    return {"penalty": {"init": jax.tree.map(lambda x: x.copy(), states.params),
                        "coef": jnp.full(jax.tree.leaves(states.params)[0].shape[:1],
                                         self.coef, jnp.float32)}}

  def continue_from(self, prev, ctx):
    return prev


def _unit(flag: str, value: float) -> None:
  if not 0 <= value <= 1:
    raise ValueError(f"--{flag} must be in [0, 1], got {value}")


METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Cold, Warm, WarmRM, ShrinkPerturb, SP, Reset, Dash, L2Init)}


def known_methods() -> tuple[str, ...]:
  return tuple(METHODS)


def check_method(name: str) -> type[Method]:
  if name not in METHODS:
    raise UnknownMethodError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
  return METHODS[name]


def prepare_stage(method: Method, prev, ctx: StageContext, *, opt_state: str = "default",
                  bn_stats: str = "default"):
  """The method's policy, then the optimizer-state and BatchNorm-statistics
  policies (`opt_state`, `bn_stats`: keep | reset; "default" leaves the
  method's own choice) for every start that continues a previous model."""
  state = method.prepare(prev, ctx)
  if prev is None or not method.continues:
    return state
  if opt_state == "reset":
    state = reset_opt_states(state, ctx.tx)
  elif opt_state == "keep":
    state = state.replace(opt_state=prev.opt_state)
  if bn_stats == "reset" and jax.tree.leaves(state.batch_stats):
    state = state.replace(batch_stats=ctx.fresh().batch_stats)
  elif bn_stats == "keep":
    state = state.replace(batch_stats=prev.batch_stats)
  return state

