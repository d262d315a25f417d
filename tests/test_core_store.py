"""Content-addressed runs: reused when finished, renamed when a result-
determining field changes, resumed after a stop, trained once by two
processes at once; non-default hashing; named snapshots."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from wsjax import config as config_lib
from wsjax import parallel
from wsjax.core import hooks as hooks_lib
from wsjax.core.data import TrainData
from wsjax.core.loop import Hook, Preempted, Until
from wsjax.core.runner import train_run
from wsjax.core.store import RunStore, spec_hash

from conftest import REPO, toy_setting


def _train(store, s, spec, end=30, **kw):
  data = TrainData(s.x_train, s.y_train, np.arange(640), 64)
  return train_run(store.run(spec, label="test"), start_states=lambda: s.fresh_states(0),
                   template=s.template(), program=s.program(), data=data, until=Until.steps(end),
                   data_seeds=s.seeds, log=lambda m: None, **kw)


def _leaves(states):
  return [np.asarray(x) for x in jax.tree.leaves(parallel.to_host(states))]


def test_a_finished_run_is_loaded_and_a_changed_field_makes_a_new_run(data_dir, tmp_path):
  s = toy_setting(data_dir)
  store = RunStore(tmp_path / "runs")
  spec = {"what": "toy", "lr": 0.05}
  first, r1 = _train(store, s, spec, snapshot_steps=[10, 20])
  assert not r1["reused"] and r1["steps"] == [30, 30]
  again, r2 = _train(store, s, spec)
  assert r2["reused"] and r2["run"] == r1["run"]
  for a, b in zip(_leaves(first), _leaves(again)):
    np.testing.assert_array_equal(a, b)
  run = store.run(spec)
  assert run.done and run.snapshots() == ["final", "init", "step_10", "step_20"]
  assert not os.path.exists(os.path.join(run.dir, "checkpoints"))
  # any snapshot loads; step_10 is the state after 10 steps
  at10 = run.load_snapshot("step_10", s.template())
  assert np.asarray(at10.step).tolist() == [10, 10]
  other, r3 = _train(store, s, {**spec, "lr": 0.1})
  assert not r3["reused"] and r3["run"] != r1["run"]
  assert len(store.runs()) == 2 and {r["status"] for r in store.runs()} == {"done"}


def test_nondefault_hashing_renames_nothing_when_a_default_field_is_added():
  @dataclasses.dataclass(frozen=True)
  class Old:
    lr: float = 0.1
    momentum: float = 0.9

  @dataclasses.dataclass(frozen=True)
  class New:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False  # a new field, with its default
    block: int = dataclasses.field(default=32, metadata={"operational": True})

  old, new = config_lib.nondefault(Old(lr=0.5)), config_lib.nondefault(New(lr=0.5, block=8))
  assert old == new == {"lr": 0.5}
  assert spec_hash(old) == spec_hash(new)
  assert spec_hash({"lr": 0.5}) != spec_hash({"lr": 0.25})


class _StopAfter(Hook):
  def __init__(self, step):
    self.step = step

  def on_block(self, loop):
    if loop.step >= self.step:
      hooks_lib.request_stop()


def test_a_stopped_run_resumes_to_the_uninterrupted_result(data_dir, tmp_path):
  """...and its records too: the checkpoint hook runs after the caller's
  hooks at a boundary, so an evaluation made there is in the checkpoint."""
  s = toy_setting(data_dir)
  test = {"test": (s.x_test, s.y_test)}
  whole, r_whole = _train(RunStore(tmp_path / "a"), s, {"x": 1}, end=40,
                          hooks=[hooks_lib.EvaluateEvery(9, test)])
  store = RunStore(tmp_path / "b")
  try:
    with pytest.raises(Preempted):
      _train(store, s, {"x": 1}, end=40, hooks=[_StopAfter(13), hooks_lib.EvaluateEvery(9, test)])
  finally:
    hooks_lib.clear_stop()
  run = store.run({"x": 1})
  # requested at the end of the block ending at 18, seen there by the checkpoint hook
  assert not run.done and run.latest_checkpoint() == 18
  resumed, result = _train(store, s, {"x": 1}, end=40, hooks=[hooks_lib.EvaluateEvery(9, test)])
  assert not result["reused"] and result["steps"] == [40, 40]
  for a, b in zip(_leaves(whole), _leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  steps = [e["step"] for e in r_whole["records"]["eval"]]
  assert 18 in steps  # an evaluation at the checkpoint's boundary
  assert result["records"]["eval"] == r_whole["records"]["eval"]


_SAME_RUN = textwrap.dedent("""
    import json, sys, numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import toy_setting
    from wsjax.core.data import TrainData
    from wsjax.core.loop import Until
    from wsjax.core.runner import train_run
    from wsjax.core.store import RunStore
    s = toy_setting({data_dir!r})
    data = TrainData(s.x_train, s.y_train, np.arange(640), 64)
    trained = []
    def start():
        trained.append(True)
        return s.fresh_states(0)
    _, result = train_run(RunStore({store!r}).run({{"same": "run"}}), start_states=start,
                          template=s.template(), program=s.program(), data=data,
                          until=Until.steps(300), data_seeds=s.seeds, log=lambda m: None)
    print(json.dumps({{"trained": bool(trained), "reused": result["reused"],
                      "run": result["run"]}}))
    """)


def test_two_processes_asking_for_the_same_run_train_it_once(data_dir, tmp_path):
  code = _SAME_RUN.format(tests=os.path.join(REPO, "tests"), data_dir=data_dir,
                          store=str(tmp_path / "runs"))
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    outs.append(json.loads(out.strip().splitlines()[-1]))
  assert sorted(o["trained"] for o in outs) == [False, True]
  assert sorted(o["reused"] for o in outs) == [False, True]
  assert outs[0]["run"] == outs[1]["run"]
