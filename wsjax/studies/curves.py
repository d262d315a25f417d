"""Mode-connecting curves between stored solutions, trained through the core.

Garipov, Izmailov, Podoprikhin, Vetrov & Wilson, "Loss Surfaces, Mode
Connectivity, and Fast Ensembling of DNNs", NeurIPS 2018 (code:
timgaripov/dnn-mode-connectivity, `train.py`, `eval_curve.py`), the tool
Gotmare, Keskar, Xiong & Socher (ICLR 2019; PAPERS.md section 4) use to ask
whether SGDR's iterates sit in distinct minima. Between R pairs of solutions
of one model, `theta_a^r` and `theta_b^r`, R curves train side by side as
replicas of one compiled program:

1. Start (`curve_states`): every curve's middle bends evenly spaced on the
   segment (`wsjax.analysis.curves.Curve.init`), the endpoints
   `inputs["endpoints"]` (a per-replica input of the program, never trained).
2. Training (`train_curves`): the core's `CurveTask`: per step and curve one
   `t ~ U(0, 1)` from the replica's key, the loss

       CE(f(phi(t)); batch) + 0.5 wd ||phi(t)||^2,

   the optimizer's own weight decay off, SGD with momentum and the reference's
   schedule (`wsjax.schedules.mode_connectivity_schedule`: constant for 50%
   of training, linear decay to 1% at 90%, then 1%; set per epoch as the
   reference does). Default budget: as many epochs as one endpoint's
   training. The curves are one stored run (`wsjax.core.store`): a finished
   one is loaded, an interrupted one resumes from its checkpoint.
3. Evaluation (`evaluate_curves`, `evaluate_lines`), at `points` evenly
   spaced t (61, as `eval_curve.py`), both on the curve and on the straight
   line between the same endpoints: at every t the BatchNorm statistics are
   recomputed with one pass over the training inputs (in train-batch-size
   batches; `wsjax.analysis.batchnorm`), then train loss and error, test loss
   and error on the whole splits. The points are replicas of one program
   (`chunk` of them at a time, the last chunk padded). Barriers
   (`wsjax.analysis.interpolation.barrier`): `max_t f(t) - (f(0) + f(1)) / 2`.

Differences from the reference code: the endpoints are always fixed (its
README's commands fix them too); the loss's l2 term is reported apart from
the cross-entropy (its "train loss" includes it); one t per step is drawn
per curve from the core's per-step key instead of `np.random`; the
BatchNorm recompute weighs batches equally (PyTorch `momentum=None`) rather
than by size, which differs only for a partial last batch.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from wsjax import config as config_lib
from wsjax import parallel
from wsjax import results as results_lib
from wsjax import schedules
from wsjax import tree as wtree
from wsjax.analysis import curves as curves_lib
from wsjax.analysis import interpolation
from wsjax.core import store as store_lib
from wsjax.core.data import TrainData
from wsjax.core.hooks import Progress
from wsjax.core.loop import Until
from wsjax.core.optim import OptimizerConfig, scale_by_step_schedule
from wsjax.core.program import Program
from wsjax.core.runner import train_run
from wsjax.core.state import TrainState, seed_keys
from wsjax.core.task import CurveTask
from wsjax.studies.common import DataConfig, ModelConfig, RunnerConfig, Setting, _f

CURVE_SALT = 3       # the curves' data stream: TrainData(salt=(CURVE_SALT,))
CURVE_KEY_SALT = 3   # the curves' PRNG keys: seed_keys(seeds, CURVE_KEY_SALT)
METRICS = interpolation.METRICS  # train_loss, train_error, test_loss, test_error


# ---- configuration ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CurveConfig:
  """How a curve is trained and evaluated (flags `--curve_*` in the programs)."""
  kind: str = _f(curves_lib.BEZIER, "curve family: bezier or polychain",
                 choices=curves_lib.KINDS)
  bends: int = _f(curves_lib.DEFAULT_BENDS, "bends, the two endpoints included (3: one "
                  "trainable middle bend)")
  lr: float = _f(0.015, "curve training: peak learning rate of SGD (the reference's VGG-16 "
                 "curves: 0.015)")
  momentum: float = _f(0.9, "curve training: SGD momentum")
  weight_decay: float = _f(5e-4, "curve training: wd of the 0.5 wd ||phi(t)||^2 term")
  epochs: int = _f(0, "curve training epochs (0: as many as one endpoint's training)")
  points: int = _f(curves_lib.EVALUATION_POINTS, "evaluation points t, evenly spaced in [0, 1]")
  chunk: int = _f(curves_lib.EVALUATION_POINTS, "points evaluated together as replicas of one "
                  "program (lower it to save memory)", operational=True)

  def validate(self) -> None:
    curves_lib.Curve(self.kind, self.bends)  # checks kind and bends
    if self.bends < 3:
      raise ValueError(f"--curve_bends must be >= 3 (a curve needs a trainable middle bend), "
                       f"got {self.bends}")
    if not self.lr > 0:
      raise ValueError(f"--curve_lr must be positive, got {self.lr}")
    if not 0 <= self.momentum < 1:
      raise ValueError(f"--curve_momentum must be in [0, 1), got {self.momentum}")
    if self.weight_decay < 0:
      raise ValueError(f"--curve_weight_decay must be >= 0, got {self.weight_decay}")
    if self.epochs < 0:
      raise ValueError(f"--curve_epochs must be >= 0 (0: the endpoints' budget), got {self.epochs}")
    if self.points < 2:
      raise ValueError(f"--curve_points must be >= 2 (t = 0 and t = 1), got {self.points}")
    if self.chunk < 1:
      raise ValueError(f"--curve_chunk must be >= 1, got {self.chunk}")

  @property
  def curve(self) -> curves_lib.Curve:
    return curves_lib.Curve(self.kind, self.bends)

  def spec(self) -> dict:
    """What decides a curve's training (its kind and bends always named)."""
    return {"kind": self.kind, "bends": self.bends, **config_lib.nondefault(self)}


def curve_optimizer(cfg: CurveConfig, total_steps: int,
                    steps_per_epoch: int) -> optax.GradientTransformationExtraArgs:
  """SGD with momentum (no weight decay: the loss has it) and the reference's
  curve schedule read at the global step, set once per epoch."""
  def schedule(step, lr):
    return schedules.mode_connectivity_schedule(lr, total_steps, steps_per_epoch)(step)
  parts = [optax.trace(decay=cfg.momentum, nesterov=False)] if cfg.momentum else []
  parts.append(scale_by_step_schedule(cfg.lr, schedule))
  return optax.chain(*parts)


# ---- endpoints ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Endpoints:
  """R solutions of one model, one per curve: `variables` is
  `{"params": ..., ["batch_stats": ...]}` with a leading replica axis (host
  arrays), `origin` a JSON-able description of where each came from (it
  names the curve run)."""
  variables: dict
  origin: Any

  @property
  def count(self) -> int:
    return int(np.shape(jax.tree.leaves(self.variables["params"])[0])[0])

  def take(self, rows: Sequence[int], origin: Any) -> "Endpoints":
    """The replicas `rows` (any order, repeats allowed) with a new origin."""
    idx = np.asarray(rows, np.int64)
    return Endpoints(jax.tree.map(lambda x: np.asarray(x)[idx], self.variables), origin)


def concat(parts: Sequence[Endpoints]) -> Endpoints:
  """Endpoints of several groups side by side (replica axis concatenated)."""
  variables = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]),
                           *[p.variables for p in parts])
  return Endpoints(variables, [p.origin for p in parts])


def check_same_model(start: Endpoints, end: Endpoints, where: str = "") -> None:
  """One line naming every path where the two endpoints' parameters differ."""
  problems = wtree.mismatches(_one(start.variables["params"]), _one(end.variables["params"]),
                              expected_label="start", found_label="end")
  if problems:
    raise ValueError(f"the curve's endpoints{where} are different models: " + "; ".join(problems))


def _one(tree):
  return jax.tree.map(lambda x: np.zeros(np.shape(x)[1:], np.int8), tree)


def parse_endpoint(ref: str, what: str = "curve endpoint") -> tuple[str, Optional[int]]:
  """`RUN@SNAPSHOT[:REPLICA]` -> (`RUN@SNAPSHOT`, replica index or None)."""
  m = re.fullmatch(r"(.+?)(?::(\d+))?", ref.strip())
  if not m or not m.group(1):
    raise ValueError(f"malformed {what} {ref!r}; write RUN@SNAPSHOT[:REPLICA]")
  return m.group(1), None if m.group(2) is None else int(m.group(2))


def stored_shapes(source: str, keys: Sequence[str], store: Optional[store_lib.RunStore] = None,
                  *, what: str = "curve endpoint"):
  """(run, snapshot, replicas, one replica's zero trees of `keys`) of a
  stored snapshot `RUN@SNAPSHOT`, read from its metadata (no arrays)."""
  from wsjax.studies import sources
  try:
    run, snapshot = sources.resolve(source, store)
  except store_lib.StoreError as e:
    raise store_lib.StoreError(str(e).replace("warm-start source", what)) from None
  where = f"{run.dir}@{snapshot}"
  meta = sources._as_dict(run.snapshot_metadata(snapshot))
  is_array = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")  # noqa: E731
  stored = {k: meta.get(k) or {} for k in keys}
  sizes = {tuple(m.shape)[:1] for m in jax.tree.leaves(stored, is_leaf=is_array)}
  if len(sizes) != 1 or not next(iter(sizes)):
    raise ValueError(f"{what} {where} is not a replica-stacked wsjax state")
  one = jax.tree.map(lambda m: np.zeros(tuple(m.shape)[1:], np.int8), stored, is_leaf=is_array)
  return run, snapshot, next(iter(sizes))[0], one


def load_endpoint(ref: str, expected: dict, store: Optional[store_lib.RunStore] = None, *,
                  what: str = "curve endpoint") -> tuple[Endpoints, store_lib.Run, str]:
  """A stored snapshot as curve endpoints: every replica, or the one named.

  `expected`: one replica's `{"params", ["batch_stats"]}` of the model the
  curve trains (shapes only); `what` names the snapshot in errors. Raises a
  one-line ValueError naming every mismatched path, a missing run or
  snapshot, or a replica out of range."""
  from wsjax.studies import sources
  source, replica = parse_endpoint(ref, what)
  run, snapshot, n, one = stored_shapes(source, list(expected), store, what=what)
  where = f"{run.dir}@{snapshot}"
  problems = wtree.mismatches(expected, one, expected_label="model", found_label="endpoint")
  if problems:
    raise ValueError(f"{what} {where} does not fit the model (pass its --model options): "
                     + "; ".join(problems))
  if replica is not None and not 0 <= replica < n:
    raise ValueError(f"{what} {ref}: replica {replica} out of range; {where} has "
                     f"{n} replicas (0..{n - 1})")
  variables, _ = sources.load_source(source, expected, n, default_store=store)
  rows = list(range(n)) if replica is None else [replica]
  origin = {"run": f"run_{run.hash}", "snapshot": snapshot, "replicas": rows}
  return Endpoints(variables, origin).take(rows, origin), run, snapshot


def snapshot_steps(run: store_lib.Run, snapshot: str) -> Optional[int]:
  """How many steps of training a stored snapshot holds (`step_<k>`: k;
  `final`: the run's end step), or None when unknown."""
  m = re.fullmatch(r"step_(\d+)", snapshot)
  if m:
    return int(m.group(1))
  if snapshot == "final" and run.done:
    step = run.result().get("step")
    return int(step) if step is not None else None
  return None


# ---- training ---------------------------------------------------------------------
def _stack_endpoints(start: Endpoints, end: Endpoints):
  """params with a bend axis of 2 after the replica axis: (R, 2, ...)."""
  return jax.tree.map(lambda a, b: np.stack([np.asarray(a), np.asarray(b)], axis=1),
                      start.variables["params"], end.variables["params"])


def curve_states(curve: curves_lib.Curve, tx, endpoints, batch_stats, keys) -> TrainState:
  """Fresh curve states, one per replica: params = the middle bends evenly
  spaced on the segment `(R, n - 2, ...)`, the running statistics of the
  start (recomputed before any evaluation), a fresh optimizer, step 0.
  `endpoints`: `(R, 2, ...)` params; `keys`: (R, 2) raw keys."""
  def one(ends, stats, key):
    start = jax.tree.map(lambda e: e[0], ends)
    end = jax.tree.map(lambda e: e[1], ends)
    middle, _ = curve.init(start, end)
    return TrainState(params=middle, batch_stats=stats, opt_state=tx.init(middle),
                      step=jnp.zeros((), jnp.int32), rng=key, hparams={})
  return jax.vmap(one)(endpoints, batch_stats, keys)


class CurveTrainer:
  """Trains and evaluates curves for one model on one dataset (a `Setting`'s
  model, data and batch size; its runner's block length and checkpoint
  cadence)."""

  def __init__(self, setting: Setting, store: store_lib.RunStore, base_spec: dict, *,
               log: Callable[[str], None] = print, progress: bool = False):
    self.setting = setting
    self.store = store
    self.base_spec = base_spec
    self.log = log
    self.progress = progress

  @property
  def data(self) -> TrainData:
    s = self.setting
    return TrainData(s.x_train, s.y_train, np.arange(len(s.dataset.y_train)),
                     s.data_cfg.batch_size, salt=(CURVE_SALT,))

  def default_steps(self, endpoint_steps: Optional[int], cfg: CurveConfig) -> int:
    """The curve's training steps: `cfg.epochs` epochs, or (0) the
    endpoints' training rounded up to whole epochs."""
    per_epoch = self.data.steps_per_epoch
    if cfg.epochs:
      return cfg.epochs * per_epoch
    if not endpoint_steps:
      raise ValueError("the endpoints' training length is unknown (not a step_<k> or final "
                       "snapshot); pass --curve_epochs")
    return -(-int(endpoint_steps) // per_epoch) * per_epoch

  def train(self, start: Endpoints, end: Endpoints, cfg: CurveConfig, total_steps: int,
            seeds: Sequence[int], *, label: str = "curves", bar=None) -> dict:
    """Trains (or loads, or resumes) curve r from `start[r]` to `end[r]` for
    every r, then evaluates them and the lines (kept in the run's result).

    Returns the run's result: `ts`, `curve` and `line` (`{metric: (R, P)}`
    lists), `barriers` (`{"curve"|"line": {metric: (R,)}}`), the loop
    position and `run`."""
    cfg.validate()
    check_same_model(start, end)
    if start.count != end.count or start.count != len(seeds):
      raise ValueError(f"{start.count} start and {end.count} end points for {len(seeds)} curves; "
                       "give one of each per curve")
    s = self.setting
    curve = cfg.curve
    data = self.data
    n = len(seeds)
    tx = curve_optimizer(cfg, total_steps, data.steps_per_epoch)
    devices = s.runner.seed_devices or parallel.default_seed_devices(n)
    program = Program(s.model, tx, CurveTask(curve, cfg.weight_decay),
                      batch_size=s.data_cfg.batch_size, block_steps=s.runner.block_steps,
                      replica_devices=devices, replica_chunk=s.runner.chunk())
    ends = _stack_endpoints(start, end)
    stats = start.variables.get("batch_stats") or {}
    keys = np.asarray(seed_keys(seeds, CURVE_KEY_SALT))
    build = jax.jit(lambda e, b, k: curve_states(curve, tx, e, b, k),
                    out_shardings=parallel.replicated())
    template = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                            jax.eval_shape(build, ends, stats, keys))
    spec = {**self.base_spec, "protocol": "curve", "curve": cfg.spec(),
            "steps": int(total_steps), "batch_size": s.data_cfg.batch_size,
            "endpoints": {"start": start.origin, "end": end.origin},
            "seeds": [int(x) for x in seeds]}
    spec["curve"].pop("points", None)  # evaluation only: kept in the result below
    run = self.store.run(spec, label=label)
    inputs = lambda: {"endpoints": parallel.put_replicated(ends)}  # noqa: E731
    _, result = train_run(
        run, start_states=lambda: build(ends, stats, keys), template=template, program=program,
        data=data, until=Until.steps(total_steps), data_seeds=seeds, start=0, inputs=inputs,
        hooks=[Progress(bar, label)], checkpoint_every=s.runner.checkpoint_every,
        label=f"[{label}] ", log=self.log,
        extra_result=lambda states: self._evaluate(curve, states, start, end, cfg))
    if result["reused"]:
      self.log(f"[{label}] reusing finished run run_{run.hash}")
    if result.get("points") != cfg.points:  # another evaluation of a finished run
      middle = run.load_snapshot("final", template).params
      result.update(self._evaluate(curve, None, start, end, cfg, middle=middle))
      run.update_result(**{k: result[k] for k in ("points", "ts", "curve", "line", "barriers")})
    return result

  def _evaluate(self, curve, states, start: Endpoints, end: Endpoints, cfg: CurveConfig,
                middle=None) -> dict:
    s = self.setting
    if middle is None:
      middle = parallel.to_host(states.params)
    ts = np.asarray(curves_lib.evaluation_ts(cfg.points))
    splits = (s.x_train, s.y_train, s.x_test, s.y_test)
    options = {"chunk": cfg.chunk, "bn_batch_size": s.data_cfg.batch_size}
    on_curve = evaluate_curves(s.model, curve, middle, _stack_endpoints(start, end), splits, ts,
                               **options)
    on_line = evaluate_lines(s.model, start.variables["params"], end.variables["params"],
                             splits, ts, **options)
    return {"points": int(cfg.points), "ts": ts.tolist(),
            "curve": {m: v.tolist() for m, v in on_curve.items()},
            "line": {m: v.tolist() for m, v in on_line.items()},
            "barriers": {"curve": {m: np.asarray(interpolation.barrier(v)).tolist()
                                   for m, v in on_curve.items()},
                         "line": {m: np.asarray(interpolation.barrier(v)).tolist()
                                  for m, v in on_line.items()}}}


# ---- evaluation -------------------------------------------------------------------
def _rows(tree, r):
  return jax.tree.map(lambda x: x[r], tree)


@functools.lru_cache(maxsize=None)
def _curve_points(curve: curves_lib.Curve):
  @jax.jit
  def points(middle, endpoints, which, ts):
    return jax.vmap(lambda r, t: curve.phi(_rows(middle, r), _rows(endpoints, r), t))(which, ts)
  return points


@jax.jit
def _line_points(start, end, which, ts):
  def one(r, t):
    return jax.tree.map(lambda a, b: ((1 - t) * a[r] + t * b[r]).astype(a.dtype), start, end)
  return jax.vmap(one)(which, ts)


def evaluate_points(model, make_points: Callable[[np.ndarray, np.ndarray], Any], n_paths: int,
                    ts, splits, *, chunk: int = curves_lib.EVALUATION_POINTS,
                    bn_batch_size: int = 128) -> dict[str, np.ndarray]:
  """`{metric: (n_paths, P)}` at every t of every path, BatchNorm statistics
  recomputed at each point from the training inputs.

  `make_points(which, ts)` returns the params of the points (path `which[i]`
  at `ts[i]`) stacked on a leading axis; they are built and evaluated
  `chunk` at a time as replicas of one program (the last chunk padded by
  repeating its last point). `splits`: (x_train, y_train, x_test, y_test)."""
  ts = np.asarray(ts, np.float32)
  which = np.repeat(np.arange(n_paths), len(ts)).astype(np.int32)
  flat_ts = np.tile(ts, n_paths)
  total = len(flat_ts)
  chunk = min(int(chunk), total)
  n_chunks = -(-total // chunk)
  index = np.minimum(np.arange(n_chunks * chunk), total - 1)
  out = {m: [] for m in METRICS}
  for c in range(n_chunks):
    idx = index[c * chunk:(c + 1) * chunk]
    params = make_points(which[idx], flat_ts[idx])
    res = interpolation.evaluate_path(model, params, *splits, recompute_bn=True,
                                      bn_batch_size=bn_batch_size, chunk_size=chunk)
    for m in METRICS:
      out[m].append(np.asarray(res[m], np.float64))
  return {m: np.concatenate(v)[:total].reshape(n_paths, len(ts)) for m, v in out.items()}


def evaluate_curves(model, curve: curves_lib.Curve, middle, endpoints, splits, ts, *,
                    chunk: int = curves_lib.EVALUATION_POINTS,
                    bn_batch_size: int = 128) -> dict[str, np.ndarray]:
  """Train/test loss and error along R curves: `middle` (R, n - 2, ...) and
  `endpoints` (R, 2, ...) params; `{metric: (R, P)}`."""
  middle = jax.tree.map(jnp.asarray, middle)
  endpoints = jax.tree.map(jnp.asarray, endpoints)
  n = int(np.shape(jax.tree.leaves(endpoints)[0])[0])
  points = _curve_points(curve)
  return evaluate_points(model, lambda w, t: points(middle, endpoints, w, t), n, ts, splits,
                         chunk=chunk, bn_batch_size=bn_batch_size)


def evaluate_lines(model, start, end, splits, ts, *, chunk: int = curves_lib.EVALUATION_POINTS,
                   bn_batch_size: int = 128) -> dict[str, np.ndarray]:
  """Train/test loss and error along the R straight lines
  `(1 - t) start[r] + t end[r]` (params with a replica axis); `{metric: (R, P)}`."""
  start = jax.tree.map(jnp.asarray, start)
  end = jax.tree.map(jnp.asarray, end)
  n = int(np.shape(jax.tree.leaves(start)[0])[0])
  return evaluate_points(model, lambda w, t: _line_points(start, end, w, t), n, ts, splits,
                         chunk=chunk, bn_batch_size=bn_batch_size)


def chord_barrier(values, ts) -> np.ndarray:
  """`max_t f(t) - ((1 - t) f(0) + t f(1))` along each path (`values`
  `(paths, P)` at `ts`): how far a path rises above the chord between its
  endpoints' values. Unlike `interpolation.barrier` (the max minus the MEAN
  of the ends), it is 0 for a path that goes monotonically from a worse
  endpoint to a better one, e.g. between an early and a late SGDR iterate,
  where the barrier is half the gap between the ends whatever the path."""
  v = np.asarray(values, np.float64)
  t = np.asarray(ts, np.float64)
  chord = (1 - t) * v[:, :1] + t * v[:, -1:]
  return (v - chord).max(1)


def path_summary(values: dict, ts) -> dict:
  """Mean +- std over paths of their barriers (as `interpolation.barrier`,
  and above the chord, `chord_barrier`), largest test error and train
  loss, and the mean path; `values`: `{metric: (paths, P)}` at `ts`."""
  values = {m: np.asarray(values[m], np.float64) for m in METRICS}
  return {"barrier": {m: results_lib.summary(np.asarray(interpolation.barrier(values[m])))
                      for m in METRICS},
          "chord_barrier": {m: results_lib.summary(chord_barrier(values[m], ts)) for m in METRICS},
          "max_test_error": results_lib.summary(values["test_error"].max(1)),
          "max_train_loss": results_lib.summary(values["train_loss"].max(1)),
          "mean_path": {m: values[m].mean(0).tolist() for m in METRICS}}


def summarize(result: dict, rows: Optional[Sequence[int]] = None) -> dict:
  """`path_summary` of the curves and of the lines `rows` (default all) of
  a `CurveTrainer.train` result, and the endpoints' test error."""
  pick = (lambda v: v) if rows is None else (lambda v: v[list(rows)])
  out = {path: path_summary({m: pick(np.asarray(result[path][m])) for m in METRICS},
                            result["ts"])
         for path in ("curve", "line")}
  ends = pick(np.asarray(result["curve"]["test_error"], np.float64))
  out["endpoint_test_error"] = results_lib.summary(np.concatenate([ends[:, 0], ends[:, -1]]))
  return out


# ---- the curves program's study ------------------------------------------------------
ENDPOINT_OPTIMIZER = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                                     schedule="cosine")


@dataclasses.dataclass(frozen=True)
class CurvesConfig:
  """A curve between two stored solutions (`start`, `end`), or, without
  them, between pairs of endpoints the study trains itself (seeds 2i and
  2i + 1 of one run)."""
  experiment: str = dataclasses.field(default="curves", metadata={"flag": False})
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = ENDPOINT_OPTIMIZER
  curve: CurveConfig = dataclasses.field(default=CurveConfig(lr=0.05),
                                         metadata={"prefix": "curve_"})
  start: Optional[str] = _f(None, "the curve's start: a stored snapshot RUN@SNAPSHOT[:REPLICA] "
                            "(every replica, or the one named); default: train endpoints")
  end: Optional[str] = _f(None, "the curve's end, as --start (replica r of --start is joined "
                          "to replica r of --end; a single replica is broadcast)")
  pairs: int = _f(3, "without --start/--end: pairs of endpoints trained (2 x pairs seeds, one run)")
  seed_offset: int = _f(0, "first seed")
  epochs: int = _f(40, "without --start/--end: the endpoints' training epochs")

  def validate(self) -> None:
    self.optimizer.validate()
    self.data.validate()
    self.curve.validate()
    if (self.start is None) != (self.end is None):
      raise ValueError("give both --start and --end (stored snapshots RUN@SNAPSHOT), or neither "
                       "to train the endpoints")
    if self.pairs < 1:
      raise ValueError(f"--pairs must be >= 1, got {self.pairs}")
    if self.seed_offset < 0:
      raise ValueError(f"--seed_offset must be >= 0, got {self.seed_offset}")
    if self.epochs < 1:
      raise ValueError(f"--epochs must be >= 1, got {self.epochs}")

  @property
  def endpoint_seeds(self) -> tuple[int, ...]:
    return tuple(range(self.seed_offset, self.seed_offset + 2 * self.pairs))


def base_spec(model: ModelConfig, data: DataConfig) -> dict:
  """The model and the data a curve run (or an endpoint run) is about."""
  return {"model": {"name": model.name, **config_lib.nondefault(model)},
          "data": {"dataset": data.dataset, **config_lib.nondefault(data)}}


class CurvesStudy:
  """Runs a `CurvesConfig` in `workdir` (runs stored in `workdir/runs`).

  Everything the user gives is checked in the constructor, before anything
  is written: the endpoints' runs and snapshots, that they are one model and
  fit `--model`."""

  def __init__(self, cfg: CurvesConfig, workdir: str, runner: Optional[RunnerConfig] = None, *,
               log: Callable[[str], None] = print):
    cfg.validate()
    self.cfg = cfg
    self.runner = runner = runner or RunnerConfig()
    self.workdir = os.path.abspath(workdir)
    primary = jax.process_index() == 0
    self.log = log if primary else (lambda s: None)
    self.progress = runner.progress and primary
    self.store = store_lib.RunStore(os.path.join(self.workdir, "runs"))
    seeds = cfg.endpoint_seeds if cfg.start is None else (cfg.seed_offset,)
    from wsjax.data import batching
    dataset = cfg.data.load()
    per_epoch = batching.steps_per_epoch(len(dataset.y_train), cfg.data.batch_size)
    self.setting = Setting(cfg.model, cfg.data, cfg.optimizer, seeds, runner,
                           horizon=cfg.epochs * per_epoch, dataset=dataset)
    self.loaded = None
    if cfg.start is not None:
      self.loaded = self._load_endpoints()

  def _expected(self) -> dict:
    one = self.setting.one_model_template()
    out = {"params": one["params"]}
    if one["batch_stats"]:
      out["batch_stats"] = one["batch_stats"]
    return out

  def _load_endpoints(self):
    cfg = self.cfg
    expected = self._expected()
    shapes = [stored_shapes(parse_endpoint(ref)[0], ["params"], self.store)[3]["params"]
              for ref in (cfg.start, cfg.end)]
    problems = wtree.mismatches(shapes[0], shapes[1], expected_label="start", found_label="end")
    if problems:
      raise ValueError("the curve's endpoints are different models: " + "; ".join(problems))
    start, start_run, start_snap = load_endpoint(cfg.start, expected, self.store)
    end, _, _ = load_endpoint(cfg.end, expected, self.store)
    check_same_model(start, end)
    if start.count != end.count and 1 not in (start.count, end.count):
      raise ValueError(f"--start has {start.count} replicas and --end {end.count}; give the same "
                       "number, one of them a single replica (RUN@SNAPSHOT:REPLICA)")
    n = max(start.count, end.count)
    start = start if start.count == n else start.take([0] * n, start.origin)
    end = end if end.count == n else end.take([0] * n, end.origin)
    steps = snapshot_steps(start_run, start_snap)
    return start, end, steps

  def _train_endpoints(self, bar) -> tuple[Endpoints, Endpoints, int, dict]:
    cfg, s = self.cfg, self.setting
    data = TrainData(s.x_train, s.y_train, np.arange(len(s.dataset.y_train)),
                     cfg.data.batch_size)
    total = cfg.epochs * data.steps_per_epoch
    spec = {**base_spec(cfg.model, cfg.data), "protocol": "endpoints",
            "optimizer": {"name": cfg.optimizer.name, **config_lib.nondefault(cfg.optimizer)},
            "steps": total, "seeds": list(s.seeds)}
    run = self.store.run(spec, label="curves/endpoints")
    program = s.program()

    def test_acc(states):
      acc, loss = program.evaluate(states, s.x_test, s.y_test)
      return {"test_acc": [float(a) for a in acc], "test_loss": [float(v) for v in loss]}

    states, result = train_run(
        run, start_states=lambda: s.fresh_states(0), template=s.template(), program=program,
        data=data, until=Until.steps(total), data_seeds=s.seeds,
        hooks=[Progress(bar, "endpoints")], checkpoint_every=self.runner.checkpoint_every,
        label="[endpoints] ", log=self.log, extra_result=test_acc)
    if result["reused"]:
      self.log(f"[endpoints] reusing finished run run_{run.hash}")
    host = parallel.to_host(states)
    variables = {"params": host.params}
    if host.batch_stats:
      variables["batch_stats"] = host.batch_stats
    both = Endpoints(variables, None)
    first = list(range(0, 2 * cfg.pairs, 2))
    second = list(range(1, 2 * cfg.pairs, 2))
    origin = lambda rows: {"run": f"run_{run.hash}", "snapshot": "final",  # noqa: E731
                           "replicas": rows}
    info = {"run": f"run_{run.hash}", "test_acc": result["test_acc"], "steps": total}
    return both.take(first, origin(first)), both.take(second, origin(second)), total, info

  def run(self) -> dict:
    import tqdm
    cfg = self.cfg
    bar = tqdm.tqdm(total=0, desc="curves", bar_format="{desc}{postfix}",
                    disable=not self.progress, dynamic_ncols=True)
    try:
      if self.loaded is None:
        start, end, endpoint_steps, endpoints_info = self._train_endpoints(
            bar if self.progress else None)
      else:
        start, end, endpoint_steps = self.loaded
        endpoints_info = {"start": cfg.start, "end": cfg.end, "steps": endpoint_steps}
      trainer = CurveTrainer(self.setting, self.store, base_spec(cfg.model, cfg.data),
                             log=self.log, progress=self.progress)
      steps = trainer.default_steps(endpoint_steps, cfg.curve)
      seeds = [cfg.seed_offset + i for i in range(start.count)]
      result = trainer.train(start, end, cfg.curve, steps, seeds, label="curves",
                             bar=bar if self.progress else None)
    finally:
      bar.close()
    return {"experiment": cfg.experiment, "config": config_lib.to_dict(cfg),
            "environment": results_lib.environment(), "endpoints": endpoints_info,
            "curve_run": result["run"], "curve_steps": int(steps), "curves": start.count,
            "ts": result["ts"], "curve": result["curve"], "line": result["line"],
            "barriers": result["barriers"], "summary": summarize(result),
            "wall_s": float(result.get("wall_s", 0.0))}


def study_hash(cfg: CurvesConfig) -> str:
  """Names a curves study's results (every result-determining field)."""
  return store_lib.spec_hash({"study": "curves", **config_lib.nondefault(cfg)})


__all__ = ["CURVE_SALT", "CurveConfig", "CurveTrainer", "CurvesConfig", "CurvesStudy", "Endpoints",
           "base_spec", "check_same_model", "chord_barrier", "concat", "curve_optimizer", "curve_states",
           "evaluate_curves", "evaluate_lines", "evaluate_points", "load_endpoint",
           "parse_endpoint", "path_summary", "snapshot_steps", "study_hash", "summarize"]
