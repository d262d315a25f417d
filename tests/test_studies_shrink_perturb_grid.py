"""The shrink-and-perturb grid study in-process, on a tiny MLP on MNIST-1D:
the vmapped mix against a hand computation and against the staged study's
own shrink_perturb method, grid cells against the same cells trained one
by one, per-replica stopping, stored runs reused, one-line config errors."""
import dataclasses

import jax
import numpy as np
import pytest

from wsjax import parallel
from wsjax.core.data import TrainData
from wsjax.core.loop import Until, train
from wsjax.core.optim import OptimizerConfig
from wsjax.core.state import seed_keys
from wsjax.studies import methods
from wsjax.studies import shrink_perturb_grid as G
from wsjax.studies.common import DataConfig, ModelConfig, RunnerConfig

SHRINKS = (0.0, 0.4, 1.0)
PERTURBS = (0.0, 0.1, 1.0)
SEEDS = 2
EPOCHS = 2
SPE = (32, 63)  # steps per epoch at batch 64: 2,000 then 4,000 examples


def _cfg(data_dir, **changes):
  base = dict(model=ModelConfig(name="mlp", widths=(16,)),
              data=DataConfig(data_dir=data_dir, batch_size=64),
              optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.9),
              shrinks=SHRINKS, perturbs=PERTURBS, seeds=SEEDS, threshold=0,
              max_epochs=EPOCHS)
  return G.GridConfig(**{**base, **changes})


RUNNER = RunnerConfig(block_steps=16, progress=False, seed_devices=1)


def _host(tree):
  return jax.tree.map(np.asarray, parallel.to_host(tree))


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
  """A 3 x 3 grid of 2 seeds, both stages a fixed 2 epochs, and its workdir."""
  workdir = str(tmp_path_factory.mktemp("grid"))
  study = G.GridStudy(_cfg(data_dir), workdir, RUNNER, log=lambda s: None)
  return study, study.run(), workdir


def _stage1_final(study, out):
  return study.store.run(study.stage1_spec()).load_snapshot("final", study.setting.template())


def test_the_start_of_every_cell_is_shrink_theta_plus_perturb_fresh(finished):
  """Replica c * S + i starts from s_c * theta_i + p_c * fresh_i (by hand,
  to float rounding), with the stage's fresh BatchNorm statistics and key
  and a new optimizer state; (1, 0) keeps theta exactly; and a cell is the
  staged study's own shrink_perturb method, to 1 ulp (its factors are
  compile-time constants, the grid's traced values: XLA fuses the
  multiply-adds differently)."""
  study, out, _ = finished
  s = study.setting
  prev = _stage1_final(study, out)
  start = _host(study.start_states(prev))
  prev_h = _host(prev)
  fresh = _host(s.fresh_states(1, 0))
  draws = _host(jax.vmap(lambda k: s.init_variables(jax.random.split(k)[1])["params"])(
      seed_keys(s.seeds, 1, G.SP_KEY_SALT)))
  cells = study.cfg.cells
  assert len(cells) == 9 and np.asarray(start.step).shape == (9 * SEEDS,)
  for c, (shrink, perturb) in enumerate(cells):
    for i in range(SEEDS):
      r = c * SEEDS + i
      for got, theta, f in zip(jax.tree.leaves(start.params), jax.tree.leaves(prev_h.params),
                               jax.tree.leaves(draws)):
        want = shrink * theta[i] + perturb * f[i]
        np.testing.assert_allclose(got[r], want, rtol=1e-6, atol=1e-7)
        if (shrink, perturb) == (1.0, 0.0):
          np.testing.assert_array_equal(got[r], theta[i])
      np.testing.assert_array_equal(start.rng[r], fresh.rng[i])
  for leaf in jax.tree.leaves(start.opt_state):  # a new optimizer: zero momentum
    if np.issubdtype(leaf.dtype, np.floating):
      assert not leaf.any()
  # the staged study's method, one cell at a time: the same start
  ctx = methods.StageContext(stage=1, seeds=s.seeds, tx=s.tx, fresh=lambda: s.fresh_states(1, 0),
                             data_x=s.x_train, data_y=s.y_train,
                             arrivals=study.schedule.new, n_stages=2, model=s.model,
                             init_variables=s.init_variables, mesh=s.mesh)
  for shrink, perturb in [(0.4, 0.1), (0.0, 1.0)]:
    alone = _host(methods.ShrinkPerturb(shrink=shrink, perturb=perturb).continue_from(prev, ctx))
    c = cells.index((shrink, perturb))
    rows = slice(c * SEEDS, (c + 1) * SEEDS)
    jax.tree.map(lambda a, b, rows=rows: np.testing.assert_allclose(a[rows], b, rtol=2e-7,
                                                                        atol=1e-9),
                 start.params, alone.params)
    jax.tree.map(lambda a, b, rows=rows: np.testing.assert_array_equal(a[rows], b),
                 start.opt_state, alone.opt_state)


def test_grid_cells_equal_the_same_cells_trained_one_by_one(finished):
  """Three cells trained alone (their 2 seeds only, the same start, data
  order and 2 epochs) end where the grid's replicas end: parameters to
  1e-5 (a replica inside the 18-replica program sums in another order; the
  differences measured are ~3e-7), test accuracies within one example of
  1,000. The cells continue a trained model: from a fresh start (cell
  (0, 1)) SGD with momentum amplifies the rounding difference of the two
  group sizes (measured: 1e-8 after 20 steps, 2e-3 after 40, 2e-2 after
  126 for one of the two seeds), the early-phase instability of Frankle et
  al. (2020), so that cell agrees only in distribution."""
  study, out, _ = finished
  s = study.setting
  grid_run = study.store.run(study.grid_spec(out["stage1"]["run"]))
  grid_final = _host(grid_run.load_snapshot("final", study.grid_template()))
  start = study.start_states(_stage1_final(study, out))
  program = s.program(tx=study.tx(1))
  cells = study.cfg.cells
  for cell in [(0.4, 0.1), (1.0, 0.0), (1.0, 1.0)]:
    c = cells.index(cell)
    rows = slice(c * SEEDS, (c + 1) * SEEDS)
    alone = jax.tree.map(lambda x, rows=rows: x[rows], start)
    data = TrainData(s.x_train, s.y_train, study.schedule.stages[1], 64, salt=(1,))
    alone, pos = train(alone, program, data, Until.n_epochs(EPOCHS), data_seeds=s.seeds)
    assert pos["steps"] == [EPOCHS * SPE[1]] * SEEDS
    got = _host(alone)
    for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(grid_final.params)):
      np.testing.assert_allclose(a, b[rows], rtol=1e-5, atol=1e-5)
    acc, _ = program.evaluate(alone, s.x_test, s.y_test)
    record = out["grid"]["cells"][c]
    assert (record["shrink"], record["perturb"]) == cell
    np.testing.assert_allclose(acc, record["test_acc"], atol=1.01e-3)
    assert record["steps"] == [EPOCHS * SPE[1]] * SEEDS


def test_results_per_cell_and_tables(finished):
  study, out, _ = finished
  assert set(out) == {"experiment", "config", "environment", "stage1", "grid"}
  assert out["stage1"]["steps"] == [EPOCHS * SPE[0]] * SEEDS
  grid = out["grid"]
  assert grid["shrinks"] == list(SHRINKS) and grid["perturbs"] == list(PERTURBS)
  assert [(c["shrink"], c["perturb"]) for c in grid["cells"]] == [
      (s, p) for p in PERTURBS for s in SHRINKS]
  for c in grid["cells"]:
    assert len(c["test_acc"]) == len(c["steps"]) == len(c["start_test_acc"]) == SEEDS
    assert c["final_test_acc"]["mean"] == pytest.approx(np.mean(c["test_acc"]))
    assert c["converged"] == [False, False]  # threshold 0: fixed epochs
  cells = {(c["shrink"], c["perturb"]): c for c in grid["cells"]}
  # (1, 0) starts from stage 1's model: its start is stage 1's test accuracy
  np.testing.assert_allclose(cells[(1.0, 0.0)]["start_test_acc"], out["stage1"]["test_acc"],
                             atol=1e-6)
  # the all-zero network cannot learn: every hidden unit and gradient is 0
  assert max(cells[(0.0, 0.0)]["test_acc"]) < 0.2
  assert min(cells[(1.0, 0.0)]["test_acc"]) > max(cells[(0.0, 0.0)]["test_acc"]) + 0.1
  acc = G.grid_arrays(grid, "test_acc")
  assert acc.shape == (3, 3, SEEDS)
  assert acc[0, 2].tolist() == cells[(1.0, 0.0)]["test_acc"]  # row perturb 0, column shrink 1
  table = G.grid_tables(out)
  assert "perturb \\ shrink" in table and f"{100 * np.mean(acc[0, 2]):.1f} ±" in table


def test_a_finished_study_is_loaded_not_retrained(finished):
  study, out, workdir = finished
  logs = []
  again = G.GridStudy(study.cfg, workdir, RUNNER, log=logs.append).run()
  assert again == out
  assert sum("reusing finished run" in line for line in logs) == 2


def test_each_replica_stops_at_its_own_threshold(finished):
  """The grid's start trained with a threshold (30%, at most 4 epochs):
  each replica stops at its own epoch end; the all-zero cell never gets
  there and runs to the cap, the warm cell (1, 0) stops earlier, and a
  replica's steps count only its own epochs."""
  study, out, _ = finished
  cfg = dataclasses.replace(study.cfg, threshold=0.3, max_epochs=4)
  start = study.start_states(_stage1_final(study, out))
  program = study.setting.program(tx=study.tx(1))
  states, pos = train(start, program, study.data(1), cfg.until(),
                      data_seeds=list(study.setting.seeds) * len(cfg.cells))
  acc = [float(a) for a in program.evaluate(states, study.setting.x_test,
                                            study.setting.y_test)[0]]
  records = G.cell_records(cfg, {**pos, "test_acc": acc, "start_test_acc": acc})
  cells = {(c["shrink"], c["perturb"]): c for c in records}
  zero, warm = cells[(0.0, 0.0)], cells[(1.0, 0.0)]
  assert zero["steps"] == [4 * SPE[1]] * SEEDS and zero["converged"] == [False, False]
  assert all(warm["converged"]) and max(warm["steps"]) < 4 * SPE[1]
  for c in records:
    for steps, train_acc, ok in zip(c["steps"], c["train_acc"], c["converged"]):
      assert steps % SPE[1] == 0 and ok == (train_acc >= 0.3)
      assert ok or steps == 4 * SPE[1]
  assert pos["epochs_done"] == 4


@pytest.mark.parametrize("changes,message", [
    ({"shrinks": ()}, "--shrinks is empty"),
    ({"perturbs": (0.1, 1.5)}, "--perturbs: 1.5 is outside [0, 1]"),
    ({"shrinks": (-0.1,)}, "--shrinks: -0.1 is outside [0, 1]"),
    ({"shrinks": (0.5, 0.5)}, "--shrinks repeats"),
    ({"perturbs": (float("nan"),)}, "outside [0, 1]"),
    ({"fraction": 1.0}, "--fraction must be in (0, 1)"),
    ({"seeds": 0}, "--seeds must be >= 1"),
    ({"threshold": 1.5}, "threshold must be in"),
    ({"max_epochs": 0}, "--max_epochs must be >= 1"),
])
def test_bad_configs_are_one_line_errors(data_dir, changes, message):
  with pytest.raises(ValueError) as e:
    _cfg(data_dir, **changes).validate()
  assert message in str(e.value) and "\n" not in str(e.value)


def test_a_batch_larger_than_stage_1_is_refused_before_anything_is_written(data_dir, tmp_path):
  cfg = _cfg(data_dir, fraction=0.01)  # 40 examples in stage 1
  with pytest.raises(ValueError, match="larger than stage 1's 40 examples"):
    G.GridStudy(cfg, str(tmp_path / "w"), RUNNER)
  assert not (tmp_path / "w").exists()


def test_online_panels_from_staged_results(tmp_path):
  """wsjax.plotting_online (the online protocol's two panels) on a staged
  results dict: the curves are the per-round values, the figure a PNG."""
  from wsjax import plotting_online
  results = {"methods": {
      name: {"stages": [{"n_train": n, "test_acc": [a + d, a - d], "steps": [st, st + 2 * d * 100]}
                        for n, a, st in zip((400, 800, 1200), accs, steps)]}
      for name, accs, steps, d in (("cold", (0.5, 0.6, 0.7), (300, 400, 500), 0.01),
                                   ("warm", (0.5, 0.55, 0.6), (300, 100, 80), 0.02))}}
  curves = plotting_online.online_curves(results, "warm")
  assert curves["n_train"].tolist() == [400, 800, 1200]
  np.testing.assert_allclose(curves["test_acc"], [[52, 48], [57, 53], [62, 58]])
  np.testing.assert_allclose(curves["steps"], [[300, 304], [100, 104], [80, 84]])
  path = tmp_path / "online_panels.png"
  plotting_online.plot_online_panels(results, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ValueError, match="no method 'dash' in these results; they have cold, warm"):
    plotting_online.plot_online_panels(results, str(path), methods=["cold", "dash"])


@pytest.mark.parametrize("chunk", [-1, 0, 3])
def test_replica_chunk_reaches_the_program(data_dir, tmp_path, chunk):
  """`--replica_chunk` (RunnerConfig) is the compiled program's: -1 its
  default (2 on this CPU), 0 all replicas at once. (That chunked replicas
  equal replicas all at once is tested in test_core_program.)"""
  from wsjax.core.program import default_replica_chunk
  runner = dataclasses.replace(RUNNER, replica_chunk=chunk)
  study = G.GridStudy(_cfg(data_dir), str(tmp_path), runner, log=lambda s: None)
  want = default_replica_chunk() if chunk < 0 else chunk
  assert study.setting.program(tx=study.tx(1)).replica_chunk == want
  assert default_replica_chunk() == (2 if jax.default_backend() == "cpu" else 0)
