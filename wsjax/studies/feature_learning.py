"""DASH's discrete feature-learning framework (the paper's section 4).

Shin, Lee, Kim, Yun, Lee & Yun, "DASH: Warm-Starting Neural Network Training
in Stationary Settings without Loss of Plasticity", NeurIPS 2024, section 4.
Official code: baekrok/DASH-Direction-Aware-SHrinking,
`Discrete_Feature_Learning.ipynb`. A combinatorial simulation, no network:
it explains the plasticity loss of warm starts on stationary data as noise
memorization.

Data. Each of C classes owns F features of its own. Class c's feature f
occurs with probability p[c, f] ~ U(0, p_max), sorted in descending order
(f = 0 is the most frequent). A point of class c is x in {0, 1}^F with
x_f ~ Bernoulli(p[c, f]) independently. Every experiment brings N new points,
N / C per class, and the data accumulate: experiment j (1-based) holds the
first j N / C points of each class.

Learning (one experiment), given learned features Lf (C x F, 0/1) and a set
A of candidate points (the points with non-zero gradient):

    repeat:
      count[c, f] = sum over points i of class c in A of x_i[f]
      (c*, f*)    = argmax of count over the unlearned (c, f),
                    ties to the lowest flat index c * F + f
      if count[c*, f*] < gamma: stop
      Lf[c*, f*] = 1
      A <- A minus {i of class c : sum_f x_i[f] Lf[c, f] >= tau}   (learned)

and the points still in A when it stops are memorized. A point is "learned"
(zero gradient) once it holds at least tau of its class's learned features.

Methods (the notebook's three):
  - cold ("Random"): Lf = 0 and A = every point so far, in every experiment.
  - warm: Lf, the learned points and the memorized points are all kept; only
    the new experiment's points that the kept features do not already explain
    (fewer than tau learned features) are candidates. A memorized point never
    becomes a candidate again.
  - ideal ("forget noise"): Lf and the learned points are kept, the memorized
    points are forgotten: A = every point so far that is not learned.

Test accuracy: a test point of class c is right when it holds at least tau
of class c's learned features, otherwise it is a guess, right with
probability 1 / C. `guess="expectation"` (the default here) counts such a
point as 1 / C, deterministic; `guess="draw"` draws Bernoulli(1 / C) as the
notebook does.

Recorded per (seed, experiment) and method: test accuracy, the number of
learned features, the number of points with non-zero gradient at the start
of the experiment, after the kept features have explained what they can
(the notebook's `Nzero_X`, its third panel: every point so far for cold, the
unexplained new points for warm, the unlearned points so far for ideal), and
the number of memorized points at its end (warm: all memorized so far).

Faithfulness to the notebook, and the choices made where it is ambiguous:
  - Random streams are the notebook's: `RandomState(seed)` draws class 0's
    probabilities, then all of class 0's training points, then class 1's,
    ...; `bernoulli.rvs` there and `RandomState.binomial(1, p)` here give the
    same draws. So seed s gives the notebook's training data exactly.
  - Test set: 10,000 points, 5,000 per class (the notebook's `data_num`). The
    notebook's `get_test_data(10000, C, numfeat, prob_lst[seed], C)` passes C
    as the seed, so every seed's test set comes from one stream
    (`RandomState(300)`) with that seed's probabilities; its own rule is
    `RandomState(seed * 100 + 100)`, which is used here: one separate stream
    per seed (identical to the notebook's for seed 2 when C = 2). With
    `guess="draw"` the guesses continue that stream, one draw per unexplained
    test point in the notebook's order (method, experiment, class, point), so
    methods listed in the notebook's order (cold, warm, ideal) consume it as
    the notebook does.
  - The notebook's tie-break is Python's stable sort of the flat counts in
    descending order: the lowest flat index c * F + f wins. Classes never
    interact (class c's counts depend only on class c's points and learned
    features), so the global greedy learns, per class, exactly the features a
    per-class greedy learns (argmax over f, lowest f on ties); the simulation
    runs every (seed, class) pair side by side on that basis. The tests check
    it against a plain transcription of the notebook's global loop.
  - `points` and `test_points` must be multiples of C (the notebook uses
    int(N j / C) and data_num // C silently).

Not guaranteed: ideal learning at least as many features as warm (or cold).
The greedy is path dependent; e.g. an old memorized point can tip a tie
toward a feature that then retires the points another feature needed. The
tests pin only what must hold.

Speed. The notebook's Python loops take minutes per seed. Here the default
(10 seeds, 3 methods) takes about 0.7 s of CPU time to simulate, plus about
1.2 s to draw the data with the notebook's (legacy, slower) random streams.
Every (seed, class) pair ("lane") runs side by side, and points are bits:
per lane and feature, the points that hold it are packed into 64-bit words,
as are the candidates and bit-sliced per-point counters "holds >= t learned
features" (t = 1 .. tau). Learning a feature is a few word-wise ANDs and
ORs. The greedy is lazy: within an experiment a feature's count can only
fall (candidates only retire), so stale counts are upper bounds and only the
few highest are recounted (popcounts) before each step; once the highest is
exact it is the true argmax, with the notebook's tie-break. Warm and ideal
carry the counters from one experiment to the next; cold starts over. Pure
numpy: a JAX version (vmap over lanes, `lax.while_loop`, dense count
updates of points x features per step) gave the same cold results in about
100x the CPU time, and the step count is data dependent.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional

import numpy as np

METHODS = ("cold", "warm", "ideal")
GUESSES = ("expectation", "draw")
# Memory bound of a run: about three byte copies of the training points, and
# a test set's int64 draws.
MAX_SIMULATION_BYTES = 8 * 2**30


def _f(default, help_text: str, **meta):
  return dataclasses.field(default=default, metadata={"help": help_text, **meta})


@dataclasses.dataclass(frozen=True)
class FeatureLearningConfig:
  """The notebook's parameters (its defaults).

  classes: C; features: F per class; p_max: feature probabilities are
  U(0, p_max); points: N arriving per experiment (N / C per class);
  experiments: J; gamma: occurrences needed to learn a feature; tau: learned
  features that give a point zero gradient; seeds: seeds 0 .. seeds - 1;
  test_points: test-set size per seed (test_points / C per class); methods:
  any of cold, warm, ideal; guess: "expectation" or "draw" for unexplained
  test points.
  """
  classes: int = _f(2, "C: number of classes")
  features: int = _f(50, "F: features per class")
  p_max: float = _f(0.2, "feature probabilities are drawn from U(0, p_max), in (0, 1]")
  points: int = _f(1000, "N: points arriving per experiment (a multiple of --classes)")
  experiments: int = _f(50, "J: number of experiments")
  gamma: int = _f(50, "a feature is learned once this many candidate points hold it")
  tau: int = _f(3, "a point holding this many learned features has zero gradient")
  seeds: int = _f(10, "number of seeds (0 .. seeds - 1)")
  test_points: int = _f(10000, "test points per seed (a multiple of --classes)")
  methods: tuple[str, ...] = _f(METHODS, "methods to compare: cold, warm, ideal")
  guess: str = _f("expectation", "unexplained test points: expectation (score 1/C) or draw "
                  "(Bernoulli(1/C))", choices=GUESSES)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["methods"] = list(self.methods)
    return d

  def validate(self) -> None:
    """Raises ValueError (one line) for an impossible configuration."""
    for name in ("classes", "features", "points", "experiments", "gamma", "tau", "seeds",
                 "test_points"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"feature learning: {name} must be an integer >= 1, got {value!r}")
    if not 0 < self.p_max <= 1:
      raise ValueError(f"feature learning: p_max must be in (0, 1], got {self.p_max}")
    for name in ("points", "test_points"):
      if getattr(self, name) % self.classes:
        raise ValueError(f"feature learning: {name} must be a multiple of classes "
                         f"({self.classes}), got {getattr(self, name)}")
    if not self.methods:
      raise ValueError("feature learning: no methods given; choose from cold, warm, ideal")
    for m in self.methods:
      check_method(m)
    if len(set(self.methods)) != len(self.methods):
      raise ValueError(f"feature learning: methods repeat: {', '.join(self.methods)}")
    if self.tau > self.features:
      raise ValueError(f"feature learning: tau ({self.tau}) must be <= features ({self.features}), "
                       "or no point could ever be learned")
    if self.guess not in GUESSES:
      raise ValueError(f"feature learning: unknown guess {self.guess!r}; use expectation or draw")
    need = (3 * self.seeds * self.points * self.experiments + 9 * self.test_points) * self.features
    if need > MAX_SIMULATION_BYTES:
      raise ValueError(f"feature learning: the simulation needs about {need / 2**30:.1f} GiB "
                       f"(limit {MAX_SIMULATION_BYTES // 2**30} GiB); lower seeds, points, "
                       "experiments, test_points or features")


def check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"feature learning: unknown method {method!r}; choose from {', '.join(METHODS)}")


# ----------------------------------------------------------------------------- data


def sample_train_set(config: FeatureLearningConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The notebook's `get_train_data`: probabilities (C, F) and points (C, J N / C, F).

  `RandomState(seed)`; per class in turn: p = sort(p_max U(0, 1)^F)
  descending, then the class's J N / C points, x_f ~ Bernoulli(p_f).
  """
  rng = np.random.RandomState(seed)
  per_class = config.experiments * config.points // config.classes
  probs = np.empty((config.classes, config.features))
  points = np.empty((config.classes, per_class, config.features), bool)
  for c in range(config.classes):
    probs[c] = np.sort(config.p_max * rng.rand(config.features))[::-1]
    points[c] = rng.binomial(1, probs[c], size=(per_class, config.features))
  return probs, points


def test_stream(seed: int) -> np.random.RandomState:
  """The test set's random stream: `RandomState(seed * 100 + 100)` (see the module doc)."""
  return np.random.RandomState(seed * 100 + 100)


def sample_points(rng: np.random.RandomState, probabilities: np.ndarray, per_class: int) -> np.ndarray:
  """(C, per_class, F) bool: per class in turn, x_f ~ Bernoulli(p[c, f])."""
  probabilities = np.asarray(probabilities, np.float64)
  return np.stack([rng.binomial(1, p, size=(per_class, p.shape[0])).astype(bool)
                   for p in probabilities])


# ----------------------------------------------------------------------------- learning

WORD = 64     # points per packed word
RECOUNT = 8   # stale feature counts recounted at once per lane


def _pack(bits: np.ndarray) -> np.ndarray:
  """Packs the last axis (a multiple of 64 long) into uint64 words, point b of
  word w at bit b (little-endian bit order; only `_unpack` reads it back)."""
  packed = np.packbits(bits, axis=-1, bitorder="little")
  return np.ascontiguousarray(packed).view(np.uint64)


def _unpack(words: np.ndarray) -> np.ndarray:
  return np.unpackbits(np.ascontiguousarray(words).view(np.uint8), axis=-1,
                       bitorder="little").astype(bool)


if hasattr(np, "bitwise_count"):             # numpy >= 2.0
  def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits summed over the last axis."""
    return np.bitwise_count(words).sum(axis=-1, dtype=np.int64)
else:
  _BYTE_BITS = np.array([bin(b).count("1") for b in range(256)], np.int64)

  def _popcount(words: np.ndarray) -> np.ndarray:
    """Set bits summed over the last axis."""
    as_bytes = np.ascontiguousarray(words).view(np.uint8)
    return _BYTE_BITS[as_bytes].sum(axis=-1)


class _Simulation:
  """The state of one method over every (seed, class) pair ("lane").

  Points are bits: every experiment's block of n points is padded with empty
  points to whole 64-bit words, so experiment j owns words
  [j * block, (j + 1) * block). Per lane:
    holders (lanes, F, words): the points that hold each feature;
    valid (words,): the real (not padding) points;
    active (lanes, words): the candidates (non-zero gradient);
    at_least[t - 1] (lanes, words): the points holding >= t learned features,
      t = 1 .. tau (bit-sliced counters, saturating at tau);
    learned (lanes, F): the learned features.
  """

  def __init__(self, points: np.ndarray, experiments: int, gamma: int, tau: int):
    n_lanes, total, n_features = points.shape
    self.points = points                                      # (lanes, J n, F) bool
    self.per_experiment = total // experiments
    padded = -(-self.per_experiment // WORD) * WORD
    self.block = padded // WORD                               # words per experiment
    self.gamma, self.tau = gamma, tau
    blocks = points.reshape(n_lanes, experiments, self.per_experiment, n_features)
    blocks = np.pad(blocks.transpose(0, 3, 1, 2),
                    [(0, 0), (0, 0), (0, 0), (0, padded - self.per_experiment)])
    self.holders = _pack(blocks).reshape(n_lanes, n_features, experiments * self.block)
    valid = np.zeros((experiments, padded), bool)
    valid[:, :self.per_experiment] = True
    self.valid = _pack(valid).reshape(-1)
    n_words = experiments * self.block
    self.active = np.zeros((n_lanes, n_words), np.uint64)
    self.at_least = np.zeros((tau, n_lanes, n_words), np.uint64)
    self.learned = np.zeros((n_lanes, n_features), bool)

  def words(self, j: int) -> slice:
    return slice(j * self.block, (j + 1) * self.block)

  def reset(self, upto: int) -> None:
    """Cold start on experiments [0, upto): nothing learned, every point a candidate."""
    w = slice(0, upto * self.block)
    self.learned[:] = False
    self.at_least[:, :, w] = 0
    self.active[:, w] = self.valid[w]

  def arrive(self, j: int) -> None:
    """Experiment j's points: those the learned features explain (>= tau of
    them) are learned, the others are candidates."""
    rows = self.points[:, j * self.per_experiment:(j + 1) * self.per_experiment]
    held = np.matmul(rows.astype(np.float32), self.learned.astype(np.float32)[:, :, None])[..., 0]
    pad = [(0, 0), (0, self.block * WORD - self.per_experiment)]
    w = self.words(j)
    for t in range(1, self.tau + 1):
      self.at_least[t - 1][:, w] = _pack(np.pad(held >= t, pad))
    self.active[:, w] = self.valid[w] & ~self.at_least[self.tau - 1][:, w]

  def learn(self, w: slice) -> None:
    """The greedy of one experiment over the points in words `w`.

    Lazy: feature counts only fall within an experiment (candidates only
    retire), so a stale count is an upper bound. Per lane, the unlearned
    feature with the highest stale count (lowest index on ties) is recounted;
    once the top one is exact, it is the true argmax with the notebook's
    tie-break, and it is learned if its count reaches gamma.
    """
    holders, active, at_least, learned = self.holders[:, :, w], self.active, self.at_least, self.learned
    n_lanes, n_features = learned.shape
    lanes = np.arange(n_lanes)
    few = min(RECOUNT, n_features)
    counts = _popcount(holders & active[:, None, w])          # exact at the start
    exact = np.ones((n_lanes, n_features), bool)
    while True:
      masked = np.where(learned, -1, counts)
      f = masked.argmax(axis=1)
      top = masked[lanes, f] >= self.gamma
      if not top.any():
        return
      stale = top & ~exact[lanes, f]
      if stale.any():   # recount the `few` highest stale counts of these lanes
        r = lanes[stale]
        fr = np.argsort(-masked[r], axis=1, kind="stable")[:, :few]
        counts[r[:, None], fr] = _popcount(holders[r[:, None], fr] & active[r, None, w])
        exact[r[:, None], fr] = True
        masked = np.where(learned, -1, counts)
        f = masked.argmax(axis=1)
        top = masked[lanes, f] >= self.gamma
      go = top & exact[lanes, f]
      if go.any():
        learned[lanes[go], f[go]] = True
        exact[go] = False
        new = holders[lanes, f] * go[:, None]                 # (lanes, words); 0: no step
        for t in range(self.tau - 1, 0, -1):
          at_least[t][:, w] |= at_least[t - 1][:, w] & new
        at_least[0][:, w] |= new
        active[:, w] &= ~at_least[self.tau - 1][:, w]


def simulate(points: np.ndarray, method: str, *, experiments: int, gamma: int, tau: int,
             record_masks: bool = False,
             on_experiment: Optional[Callable[[int], None]] = None) -> dict[str, np.ndarray]:
  """Runs one method over every seed, experiment by experiment.

  Args:
    points: (S, C, J n, F) bool training points (seed, class, point, feature),
      in arrival order; experiment j (0-based) adds points [j n, (j + 1) n).
    method: cold, warm or ideal.
    experiments: J.
    gamma, tau: as in the module doc.
    record_masks: also return the per-point masks (S, J, C, J n).
    on_experiment: called with j after each experiment.

  Returns:
    learned_feature_mask (S, J, C, F) bool: the learned features after
      experiment j;
    learned_features (S, J): their number;
    active_points (S, J): points with non-zero gradient at the start of
      experiment j (after the kept features explained what they can);
    memorized_points (S, J): points memorized at the end of experiment j;
    with record_masks, active_mask and memorized_mask (S, J, C, J n) bool:
      those points (a point not yet arrived is False in both).
  """
  check_method(method)
  points = np.asarray(points, bool)
  if points.ndim != 4:
    raise ValueError(f"feature learning: points must be (seeds, classes, points, features), "
                     f"got shape {points.shape}")
  n_seeds, n_classes, total, n_features = points.shape
  if experiments < 1 or total % experiments:
    raise ValueError(f"feature learning: {total} points per class do not split into "
                     f"{experiments} experiments")
  if not 1 <= tau <= n_features or gamma < 1:
    raise ValueError(f"feature learning: need 1 <= tau <= features ({n_features}) and gamma >= 1, "
                     f"got tau={tau}, gamma={gamma}")
  sim = _Simulation(points.reshape(n_seeds * n_classes, total, n_features), experiments, gamma, tau)
  memorized = np.zeros_like(sim.active)          # warm: every point memorized so far

  shape = (n_seeds, experiments)
  out = {"learned_feature_mask": np.zeros((*shape, n_classes, n_features), bool),
         "active_points": np.zeros(shape, np.int64),
         "memorized_points": np.zeros(shape, np.int64)}
  masks = {"active_mask": [], "memorized_mask": []}

  def per_seed(words):
    return _popcount(words).reshape(n_seeds, n_classes).sum(axis=1)

  def keep(name, words):
    if record_masks:
      bits = _unpack(words).reshape(n_seeds, n_classes, experiments, -1)
      masks[name].append(bits[..., :sim.per_experiment].reshape(n_seeds, n_classes, total))

  for j in range(experiments):
    if method == "cold":
      sim.reset(j + 1)
    else:
      sim.arrive(j)
    w = sim.words(j) if method == "warm" else slice(0, (j + 1) * sim.block)
    out["active_points"][:, j] = per_seed(sim.active[:, w])
    keep("active_mask", np.where(_in_range(sim.active.shape[1], w), sim.active, 0))

    sim.learn(w)

    if method == "warm":
      memorized[:, w] = sim.active[:, w]
      now_memorized = memorized
    else:
      now_memorized = np.where(_in_range(sim.active.shape[1], w), sim.active, 0)
    out["memorized_points"][:, j] = per_seed(now_memorized)
    keep("memorized_mask", now_memorized)
    out["learned_feature_mask"][:, j] = sim.learned.reshape(n_seeds, n_classes, n_features)
    if on_experiment is not None:
      on_experiment(j)
  out["learned_features"] = out["learned_feature_mask"].sum((2, 3))
  if record_masks:
    out.update({name: np.stack(m, axis=1) for name, m in masks.items()})
  return out


def _in_range(n_words: int, w: slice) -> np.ndarray:
  inside = np.zeros(n_words, bool)
  inside[w] = True
  return inside


# ----------------------------------------------------------------------------- evaluation


def test_accuracy(learned_feature_mask: np.ndarray, test_points: np.ndarray, tau: int,
                  guess: str = "expectation",
                  rng: Optional[np.random.RandomState] = None) -> np.ndarray:
  """Test accuracy of one seed after each experiment, (J,).

  A test point x of class c is right when sum_f x_f Lf[c, f] >= tau;
  otherwise it scores 1 / C ("expectation") or a Bernoulli(1 / C) draw from
  `rng` ("draw"; one draw per such point in (experiment, class, point)
  order, as the notebook's `cal_testacc`). The mean is over all test points.

  Args:
    learned_feature_mask: (J, C, F) bool.
    test_points: (C, T / C, F) bool.
  """
  if guess not in GUESSES:
    raise ValueError(f"feature learning: unknown guess {guess!r}; use expectation or draw")
  learned = np.asarray(learned_feature_mask, np.float32)
  test = np.asarray(test_points, np.float32)
  n_classes = test.shape[0]
  held = np.matmul(test[None], learned[..., None])[..., 0]        # (J, C, T / C)
  right = held >= tau
  if guess == "expectation":
    score = np.where(right, 1.0, 1.0 / n_classes)
  else:
    if rng is None:
      raise ValueError("feature learning: guess='draw' needs a random stream (rng)")
    score = right.astype(np.float64)
    score[~right] = rng.binomial(1, 1.0 / n_classes, size=int((~right).sum()))
  return score.reshape(score.shape[0], -1).mean(axis=1)


def run(config: FeatureLearningConfig,
        on_experiment: Optional[Callable[[str, int], None]] = None) -> dict:
  """The notebook's experiment: every method, every seed.

  Returns {"config", "guess", "seeds", "probabilities" (S, C, F),
  "methods": {method: {"test_accuracy", "learned_features", "active_points",
  "memorized_points": (S, J) arrays, "learned_feature_mask": (S, J, C, F)}},
  "wall_s"}. `on_experiment(method, j)` is called after each experiment.
  """
  config.validate()
  started = time.perf_counter()
  seeds = list(range(config.seeds))
  train = [sample_train_set(config, s) for s in seeds]
  probabilities = np.stack([p for p, _ in train])
  points = np.stack([x for _, x in train])
  del train
  methods = {}
  for m in config.methods:
    hook = None if on_experiment is None else (lambda j, m=m: on_experiment(m, j))
    methods[m] = simulate(points, m, experiments=config.experiments, gamma=config.gamma,
                          tau=config.tau, on_experiment=hook)
    methods[m]["test_accuracy"] = np.zeros((config.seeds, config.experiments))
  del points
  for s in seeds:
    rng = test_stream(s)
    test = sample_points(rng, probabilities[s], config.test_points // config.classes)
    for m in config.methods:    # the guesses continue the stream in method order
      methods[m]["test_accuracy"][s] = test_accuracy(
          methods[m]["learned_feature_mask"][s], test, config.tau, config.guess, rng)
  return {"config": config.to_dict(), "guess": config.guess, "seeds": seeds,
          "probabilities": probabilities, "methods": methods,
          "wall_s": time.perf_counter() - started}


SERIES = ("test_accuracy", "learned_features", "active_points", "memorized_points")
DEFINITIONS = {
    "test_accuracy": "after each experiment; a test point is right if it holds >= tau learned "
                     "features of its class, else it scores 1/C (guess=expectation) or a "
                     "Bernoulli(1/C) draw (guess=draw)",
    "learned_features": "learned (class, feature) pairs after each experiment",
    "active_points": "points with non-zero gradient at the start of each experiment, after the "
                     "kept features explained what they can (the notebook's Nzero_X)",
    "memorized_points": "points memorized at the end of each experiment (warm: all so far)",
}


def summarize(results: dict) -> dict:
  """Per method: final and mean-over-experiments test accuracy, final learned
  features, active points and memorized points, as {"mean", "std",
  "per_seed"} over seeds (std with ddof 0, as the notebook's bands)."""
  def stats(v):
    v = np.asarray(v, np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "per_seed": [float(x) for x in v]}

  out = {}
  for m, r in results["methods"].items():
    acc = np.asarray(r["test_accuracy"], np.float64)
    out[m] = {"final_test_accuracy": stats(acc[:, -1]),
              "mean_test_accuracy": stats(acc.mean(axis=1)),
              "final_learned_features": stats(np.asarray(r["learned_features"])[:, -1]),
              "final_active_points": stats(np.asarray(r["active_points"])[:, -1]),
              "final_memorized_points": stats(np.asarray(r["memorized_points"])[:, -1])}
  return out


def to_json(results: dict) -> dict:
  """`results` with lists for arrays, without the feature masks; adds the summaries."""
  methods = {m: {k: np.asarray(r[k]).tolist() for k in SERIES}
             for m, r in results["methods"].items()}
  return {"experiment": "feature_learning", "config": results["config"],
          "guess": results["guess"], "seeds": list(results["seeds"]), "definitions": DEFINITIONS,
          "probabilities": np.asarray(results["probabilities"]).tolist(),
          "methods": methods, "summary": summarize(results), "wall_s": results["wall_s"]}


COLORS = {"cold": "green", "warm": "navy", "ideal": "red"}   # the notebook's palette
LINES = {"ideal": "--"}    # ideal often equals cold: dashed, so that both show


def plot(results: dict, path: str) -> None:
  """The notebook's figure: test accuracy (%), learned features and points
  with non-zero gradient (at the start of each experiment) per experiment,
  mean over seeds with a +-1 std band (std with ddof 0, as the notebook)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from wsjax import plotting

  panels = [("test_accuracy", 100.0, "test accuracy (%)"),
            ("learned_features", 1.0, "learned features"),
            ("active_points", 1.0, "points with non-zero gradient")]
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
  for ax, (key, scale, label) in zip(axes, panels):
    for m, r in results["methods"].items():
      v = np.asarray(r[key], np.float64) * scale                  # (seeds, experiments)
      x = np.arange(1, v.shape[1] + 1)
      mean, std = v.mean(0), v.std(0)
      ax.plot(x, mean, color=COLORS.get(m), linestyle=LINES.get(m, "-"), label=m)
      ax.fill_between(x, mean - std, mean + std, color=COLORS.get(m), alpha=0.12)
    ax.set_xlabel("number of experiments")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].legend(title=f"guess: {results['guess']}")
  c = results["config"]
  fig.suptitle(f"discrete feature learning (DASH section 4): C={c['classes']}, F={c['features']}, "
               f"p_max={c['p_max']}, N={c['points']}, gamma={c['gamma']}, tau={c['tau']}, "
               f"{len(results['seeds'])} seeds")
  fig.tight_layout()
  plotting.save_figure(fig, path)
