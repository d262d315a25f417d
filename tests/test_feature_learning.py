"""DASH's discrete feature-learning framework (wsjax.studies.feature_learning).

The fast, bit-packed, lane-batched simulation is checked against a direct
transcription of the official notebook (baekrok/DASH-Direction-Aware-
SHrinking, Discrete_Feature_Learning.ipynb, cells 2-4): plain Python loops,
one seed, the global (class, feature) greedy with its stable sort, scipy's
`bernoulli.rvs` for the data, the test set and the guesses.
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from scipy.stats import bernoulli

from conftest import run_cli
from wsjax.studies import feature_learning as fl

METHODS = ("cold", "warm", "ideal")


def notebook(seed, *, classes, features, p_max, points, experiments, gamma, tau, test_points):
  """The notebook's simulation for one seed, as written there (methods 0, 1, 2 =
  cold "Random", warm, ideal), with the test-set seed its `get_test_data` means
  (seed * 100 + 100) and both guesses: the expectation 1/C, and
  `bernoulli.rvs(1/C)` continuing the test stream in the notebook's order."""
  C, F, N, J = classes, features, points, experiments
  rng = np.random.RandomState(seed)
  n_c = N * J // C
  X = np.zeros((C, F, n_c))
  prob = []
  for c in range(C):
    p = np.sort(p_max * rng.rand(F))[::-1]
    prob.append(p)
    for i in range(n_c):
      X[c, :, i] = bernoulli.rvs(p, random_state=rng)
  learn_f = np.zeros((J, C, F, 3))
  learn_x = np.zeros((J, C, n_c, 3))
  memorize_x = np.zeros((J, C, n_c, 3))
  nzero_x = np.zeros((J, 3))
  start = np.zeros((J, C, n_c, 3), bool)      # nzero_idx once training starts

  def zero_gradient(j, m, nzero_idx):
    for c in range(C):
      for i in nzero_idx[c]:
        idx = np.where(X[c, :, i] == 1)[0]
        if np.sum(learn_f[j, c, idx, m]) >= tau:
          learn_x[j, c, i, m] = 1
      learned_idx = np.where(learn_x[j, c, :, m] == 1)[0]
      nzero_idx[c] = sorted(set(nzero_idx[c]) - set(learned_idx))

  def train(j, m, nzero_idx):
    for c in range(C):
      start[j, c, nzero_idx[c], m] = True
    while True:
      fcount = np.zeros((C, F))
      for c in range(C):
        fcount[c] = np.sum(X[c, :, nzero_idx[c]], axis=0)
      flat = fcount.flatten()
      order = sorted(range(C * F), key=lambda k: flat[k], reverse=True)   # stable
      if all(fcount[learn_f[j, :, :, m] == 0] < gamma):
        break
      for k in order:
        c, f = k // F, k % F
        if learn_f[j, c, f, m] == 1:
          continue
        if fcount[c, f] >= gamma:
          learn_f[j, c, f, m] = 1
          zero_gradient(j, m, nzero_idx)
          break
    for c in range(C):
      memorize_x[j, c, nzero_idx[c], m] = 1

  for j in range(J):                                      # method 1: cold
    nzero_x[j, 0] = N * (j + 1)
    train(j, 0, [list(range(N * (j + 1) // C)) for _ in range(C)])
  for m in (1, 2):                                        # methods 2, 3: warm, ideal
    for j in range(J):
      first = N * j // C if m == 1 else 0
      nzero_idx = [list(range(first, N * (j + 1) // C)) for _ in range(C)]
      if j >= 1:
        learn_f[j, :, :, m] = learn_f[j - 1, :, :, m]
        learn_x[j, :, :, m] = learn_x[j - 1, :, :, m]
        if m == 1:
          memorize_x[j, :, :, m] = memorize_x[j - 1, :, :, m]
      zero_gradient(j, m, nzero_idx)
      nzero_x[j, m] = sum(len(ix) for ix in nzero_idx)
      train(j, m, nzero_idx)

  test_rng = np.random.RandomState(seed * 100 + 100)
  T = np.zeros((C, F, test_points // C))
  for c in range(C):
    for i in range(test_points // C):
      T[c, :, i] = bernoulli.rvs(prob[c], random_state=test_rng)
  acc = {"expectation": np.zeros((J, 3)), "draw": np.zeros((J, 3))}
  for m in range(3):
    for j in range(J):
      expected = drawn = 0
      for c in range(C):
        for data in T[c].T:
          if np.sum(data * learn_f[j, c, :, m]) >= tau:
            expected += 1
            drawn += 1
          else:
            expected += 1 / C
            drawn += bernoulli.rvs(1 / C, random_state=test_rng)
      acc["expectation"][j, m] = expected / test_points
      acc["draw"][j, m] = drawn / test_points
  return {"points": X.transpose(0, 2, 1) == 1, "prob": np.array(prob), "learn_f": learn_f == 1,
          "learn_x": learn_x == 1, "memorize_x": memorize_x == 1, "nzero_x": nzero_x,
          "start": start, "acc": acc}


CASES = {
    # the brief's small case: blocks of 20 points (one padded word)
    "small": dict(classes=2, features=8, p_max=0.2, points=40, experiments=4, gamma=5, tau=2,
                  test_points=60),
    # three classes, tau = 1, p_max > 1/2 (the binomial's other branch)
    "three_classes": dict(classes=3, features=6, p_max=0.6, points=30, experiments=5, gamma=4,
                          tau=1, test_points=30),
    # blocks of 100 points: two words, the second padded
    "two_words": dict(classes=2, features=10, p_max=0.5, points=200, experiments=3, gamma=12,
                      tau=2, test_points=40),
    # blocks of exactly 64 points, tau = 3
    "whole_word": dict(classes=2, features=7, p_max=0.9, points=128, experiments=3, gamma=20,
                       tau=3, test_points=40),
}
SEEDS = 3


def _train_points(config):
  return np.stack([fl.sample_train_set(config, s)[1] for s in range(config.seeds)])


def _arrived(config):
  """(J, P) bool: the points of a class that have arrived by experiment j."""
  n = config.points // config.classes
  total = n * config.experiments
  return np.arange(total)[None, :] < (np.arange(1, config.experiments + 1) * n)[:, None]


@pytest.mark.parametrize("name", list(CASES))
def test_equals_the_notebook(name):
  case = CASES[name]
  config = fl.FeatureLearningConfig(seeds=SEEDS, **case)
  points = _train_points(config)
  sims = {m: fl.simulate(points, m, experiments=config.experiments, gamma=config.gamma,
                         tau=config.tau, record_masks=True) for m in METHODS}
  accuracy = {g: fl.run(dataclasses.replace(config, guess=g)) for g in fl.GUESSES}
  arrived = _arrived(config)[:, None, :]
  for s in range(SEEDS):
    ref = notebook(s, **case)
    np.testing.assert_array_equal(points[s], ref["points"])
    np.testing.assert_array_equal(accuracy["draw"]["probabilities"][s], ref["prob"])
    for k, m in enumerate(METHODS):
      r = sims[m]
      np.testing.assert_array_equal(r["learned_feature_mask"][s], ref["learn_f"][..., k], err_msg=m)
      np.testing.assert_array_equal(r["memorized_mask"][s], ref["memorize_x"][..., k], err_msg=m)
      np.testing.assert_array_equal(arrived & ~r["memorized_mask"][s], ref["learn_x"][..., k],
                                    err_msg=m)
      np.testing.assert_array_equal(r["active_mask"][s], ref["start"][..., k], err_msg=m)
      np.testing.assert_array_equal(r["active_points"][s], ref["nzero_x"][:, k], err_msg=m)
      np.testing.assert_array_equal(r["memorized_points"][s], ref["memorize_x"][..., k].sum((1, 2)))
      np.testing.assert_array_equal(r["learned_features"][s], ref["learn_f"][..., k].sum((1, 2)))
      for g in fl.GUESSES:
        np.testing.assert_allclose(accuracy[g]["methods"][m]["test_accuracy"][s], ref["acc"][g][:, k],
                                   rtol=0, atol=1e-12, err_msg=f"{m} {g}")
  # The comparison discriminates: the methods do differ here.
  assert not np.array_equal(sims["warm"]["learned_feature_mask"], sims["cold"]["learned_feature_mask"])


def _one_lane(rows, gamma, tau):
  """simulate() on one class of one seed, a single experiment."""
  points = np.asarray(rows, bool)[None, None]
  return fl.simulate(points, "cold", experiments=1, gamma=gamma, tau=tau, record_masks=True)


def test_ties_go_to_the_lowest_feature_index():
  # Both features are held by both points (count 2 = gamma): feature 0 wins the
  # tie, and with tau = 1 both points retire, so feature 1 is never learned.
  r = _one_lane([[1, 1], [1, 1]], gamma=2, tau=1)
  np.testing.assert_array_equal(r["learned_feature_mask"][0, 0, 0], [True, False])
  np.testing.assert_array_equal(r["memorized_mask"][0, 0, 0], [False, False])
  # A third point holding feature 1 breaks the tie the other way.
  r = _one_lane([[1, 1], [1, 1], [0, 1]], gamma=2, tau=1)
  np.testing.assert_array_equal(r["learned_feature_mask"][0, 0, 0], [False, True])
  # tau = 2, all counts 2: feature 0, then feature 1 (tied with 2) retires the
  # first two points, and feature 2 is left with one holder. (Feature 2 first
  # would have left feature 1 with one holder instead.)
  r = _one_lane([[1, 1, 1], [1, 1, 0], [0, 0, 1]], gamma=2, tau=2)
  np.testing.assert_array_equal(r["learned_feature_mask"][0, 0, 0], [True, True, False])
  np.testing.assert_array_equal(r["memorized_mask"][0, 0, 0], [False, False, True])


def test_test_accuracy_by_hand():
  learned = np.zeros((2, 2, 3), bool)            # (experiments, classes, features)
  learned[0, 0, [0, 1]] = True
  learned[0, 1, [2]] = True
  learned[1, 0, [0, 1]] = True
  learned[1, 1, [1, 2]] = True
  test = np.array([[[1, 1, 0], [1, 0, 1]],       # class 0: 2 learned; 1 learned (both experiments)
                   [[0, 1, 1], [1, 1, 1]]], bool)  # class 1: 1, 1 (experiment 0); 2, 2 (experiment 1)
  acc = fl.test_accuracy(learned, test, tau=2)
  np.testing.assert_allclose(acc, [(1 + 0.5 + 0.5 + 0.5) / 4, (1 + 0.5 + 1 + 1) / 4])
  # draw: one Bernoulli(1/2) per unexplained point, in (experiment, class, point) order
  reference = np.random.RandomState(7)
  d = [bernoulli.rvs(0.5, random_state=reference) for _ in range(4)]
  acc = fl.test_accuracy(learned, test, tau=2, guess="draw", rng=np.random.RandomState(7))
  np.testing.assert_allclose(acc, [(1 + d[0] + d[1] + d[2]) / 4, (1 + d[3] + 1 + 1) / 4])


INVARIANT_CONFIG = fl.FeatureLearningConfig(classes=2, features=12, p_max=0.4, points=100,
                                            experiments=6, gamma=8, tau=2, seeds=3)


@pytest.fixture(scope="module")
def invariant_runs():
  config = INVARIANT_CONFIG
  points = _train_points(config)
  sims = {m: fl.simulate(points, m, experiments=config.experiments, gamma=config.gamma,
                         tau=config.tau, record_masks=True) for m in METHODS}
  return config, points, sims


def _held(points, learned):
  """(S, C, P): learned features each point holds; learned (S, C, F)."""
  return np.einsum("scpf,scf->scp", points.astype(np.int64), learned.astype(np.int64))


def test_every_experiment_ends_at_the_greedys_fixed_point(invariant_runs):
  config, points, sims = invariant_runs
  arrived = _arrived(config)
  n = config.points // config.classes
  for m, r in sims.items():
    np.testing.assert_array_equal(r["learned_features"], r["learned_feature_mask"].sum((2, 3)))
    np.testing.assert_array_equal(r["active_points"], r["active_mask"].sum((2, 3)))
    np.testing.assert_array_equal(r["memorized_points"], r["memorized_mask"].sum((2, 3)))
    for j in range(config.experiments):
      learned = r["learned_feature_mask"][:, j]
      memorized = r["memorized_mask"][:, j]
      assert not (memorized & ~arrived[j]).any()
      # The candidates left at the end: this experiment's memorized points.
      left = memorized.copy()
      if m == "warm":
        left[..., :j * n] = False
      counts = np.einsum("scp,scpf->scf", left.astype(np.int64), points)
      assert (counts[~learned] < config.gamma).all(), (m, j)
      held = _held(points, learned)
      assert (held[left] < config.tau).all(), (m, j)
      # A point not memorized is learned: it holds >= tau learned features
      # (features are never unlearned, so this holds for warm's old points too).
      assert (held[arrived[j] & ~memorized] >= config.tau).all(), (m, j)
      if m != "warm":   # warm's old memorized points are never looked at again
        assert (held[memorized] < config.tau).all(), (m, j)


def test_candidates_at_the_start_of_each_experiment(invariant_runs):
  config, points, sims = invariant_runs
  arrived = _arrived(config)
  n = config.points // config.classes
  for j in range(config.experiments):
    np.testing.assert_array_equal(sims["cold"]["active_mask"][:, j],
                                  np.broadcast_to(arrived[j], sims["cold"]["active_mask"][:, j].shape))
    np.testing.assert_array_equal(sims["cold"]["active_points"][:, j], (j + 1) * config.points)
    for m in ("warm", "ideal"):
      before = (sims[m]["learned_feature_mask"][:, j - 1] if j else
                np.zeros_like(sims[m]["learned_feature_mask"][:, 0]))
      unexplained = _held(points, before) < config.tau
      candidates = unexplained & arrived[j]
      if m == "warm":     # only the new points
        candidates[..., :j * n] = False
      np.testing.assert_array_equal(sims[m]["active_mask"][:, j], candidates, err_msg=f"{m} {j}")


def test_warm_and_ideal_keep_what_they_learned(invariant_runs):
  config, points, sims = invariant_runs
  arrived = _arrived(config)
  for m in ("warm", "ideal"):
    f = sims[m]["learned_feature_mask"]
    assert (f[:, :-1] <= f[:, 1:]).all(), m
    learned_points = arrived[None, :, None] & ~sims[m]["memorized_mask"]
    assert (learned_points[:, :-1] <= learned_points[:, 1:]).all(), m
  memorized = sims["warm"]["memorized_mask"]      # warm never forgets a memorized point
  assert (memorized[:, :-1] <= memorized[:, 1:]).all()
  assert (np.diff(sims["warm"]["memorized_points"], axis=1) >= 0).all()


def test_cold_depends_only_on_the_data_so_far(invariant_runs):
  config, points, sims = invariant_runs
  n = config.points // config.classes
  for j in (0, 2, config.experiments - 1):
    prefix = fl.simulate(points[:, :, :(j + 1) * n], "cold", experiments=j + 1,
                         gamma=config.gamma, tau=config.tau, record_masks=True)
    np.testing.assert_array_equal(prefix["learned_feature_mask"][:, -1],
                                  sims["cold"]["learned_feature_mask"][:, j])
    np.testing.assert_array_equal(prefix["memorized_mask"][:, -1],
                                  sims["cold"]["memorized_mask"][:, j, :, :(j + 1) * n])


def test_seeds_side_by_side_equal_one_by_one(invariant_runs):
  config, points, sims = invariant_runs
  for m in METHODS:
    for s in range(config.seeds):
      alone = fl.simulate(points[s:s + 1], m, experiments=config.experiments, gamma=config.gamma,
                          tau=config.tau, record_masks=True)
      for key, value in alone.items():
        np.testing.assert_array_equal(value[0], sims[m][key][s], err_msg=f"{m} {key}")


@pytest.mark.parametrize("recount", [1, INVARIANT_CONFIG.features])
def test_lazy_recounting_changes_nothing(invariant_runs, monkeypatch, recount):
  # recount=1: the laziest greedy; recount=F: every count exact before every step.
  config, points, sims = invariant_runs
  monkeypatch.setattr(fl, "RECOUNT", recount)
  for m in METHODS:
    r = fl.simulate(points, m, experiments=config.experiments, gamma=config.gamma, tau=config.tau,
                    record_masks=True)
    for key, value in r.items():
      np.testing.assert_array_equal(value, sims[m][key], err_msg=f"{m} {key}")


def test_run_summary_and_plot(tmp_path):
  config = fl.FeatureLearningConfig(classes=2, features=10, p_max=0.4, points=60, experiments=5,
                                    gamma=6, tau=2, seeds=2, test_points=40, methods=("warm", "cold"))
  calls = []
  out = fl.run(config, on_experiment=lambda m, j: calls.append((m, j)))
  assert calls == [(m, j) for m in ("warm", "cold") for j in range(5)]
  assert list(out["methods"]) == ["warm", "cold"]
  for r in out["methods"].values():
    for key in fl.SERIES:
      assert r[key].shape == (2, 5)
  summary = fl.summarize(out)
  acc = out["methods"]["cold"]["test_accuracy"]
  assert summary["cold"]["final_test_accuracy"]["per_seed"] == pytest.approx(list(acc[:, -1]))
  assert summary["cold"]["mean_test_accuracy"]["mean"] == pytest.approx(acc.mean())
  record = fl.to_json(out)
  assert json.loads(json.dumps(record))["methods"]["warm"]["learned_features"] == \
      out["methods"]["warm"]["learned_features"].tolist()
  fl.plot(out, str(tmp_path / "fl.png"))
  with open(tmp_path / "fl.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("change, words", [
    (dict(points=0), "points"), (dict(points=41), "multiple of classes"),
    (dict(test_points=3), "multiple of classes"), (dict(p_max=0.0), "p_max"),
    (dict(p_max=1.5), "p_max"), (dict(tau=0), "tau"), (dict(tau=51), "tau"),
    (dict(gamma=0), "gamma"), (dict(seeds=0), "seeds"), (dict(classes=0), "classes"),
    (dict(methods=()), "no methods"), (dict(methods=("cold", "hot")), "unknown method"),
    (dict(methods=("cold", "cold")), "repeat"), (dict(guess="coin"), "guess"),
    (dict(experiments=10**6), "GiB")])
def test_config_errors_are_one_line(change, words):
  with pytest.raises(ValueError, match=words) as e:
    fl.FeatureLearningConfig(**change).validate()
  assert "\n" not in str(e.value)


def test_program_end_to_end(tmp_path):
  workdir = tmp_path / "fl"
  p = run_cli("experiments.feature_learning", "--classes=2", "--features=10", "--p_max=0.4",
              "--points=60", "--experiments=4", "--gamma=6", "--tau=2", "--seeds=2",
              "--test_points=40", "--guess=draw", f"--workdir={workdir}", "--noprogress",
              timeout=300)
  assert p.returncode == 0, p.stderr
  for m in METHODS:
    assert any(line.startswith(m) for line in p.stdout.splitlines()), p.stdout
  with open(workdir / "results.json") as f:
    out = json.load(f)
  assert out["config"]["points"] == 60 and out["guess"] == "draw"
  assert list(out["methods"]) == list(METHODS)
  for m in METHODS:
    for key in fl.SERIES:
      assert np.asarray(out["methods"][m][key]).shape == (2, 4)
    assert out["summary"][m]["final_test_accuracy"]["per_seed"] == \
        [a[-1] for a in out["methods"][m]["test_accuracy"]]
  assert np.asarray(out["methods"]["cold"]["active_points"]).tolist() == [[60, 120, 180, 240]] * 2
  with open(workdir / "feature_learning.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flag", ["--p_max=1.5", "--guess=coin"])
def test_program_bad_flag_is_one_line_and_exit_2(tmp_path, flag):
  p = run_cli("experiments.feature_learning", flag, f"--workdir={tmp_path / 'x'}", "--noprogress",
              timeout=300)
  assert p.returncode == 2, (p.stdout, p.stderr)
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
  assert not os.path.exists(tmp_path / "x" / "results.json")
