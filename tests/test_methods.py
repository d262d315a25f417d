"""The warm-start methods as stage policies, on a real (tiny) study."""
import jax
import numpy as np
import pytest

from wsjax import parallel
from wsjax.train import methods
from wsjax.train.study import Study, StudyConfig
from wsjax.train.stopping import StoppingRule


@pytest.fixture(scope="module")
def study(data_dir, tmp_path_factory):
  cfg = StudyConfig(dataset="mnist1d", data_dir=data_dir, model="conv1d",
                    model_kwargs=(("channels", 4),), seeds=2, batch_size=64,
                    stopping=StoppingRule(threshold=None, max_epochs=1), diagnostics=False,
                    methods=("cold",))
  return Study(cfg, str(tmp_path_factory.mktemp("w")), progress=False)


def _ctx(study, stage=1):
  from wsjax.train.policies import StageContext
  return StageContext(stage=stage, seeds=study.seeds, tx=study.tx,
                      fresh=lambda: study.fresh_states(stage), data_x=study.data_x,
                      data_y=study.data_y, arrivals=study.schedule.new[:stage + 1],
                      n_stages=len(study.schedule.stages), model=study.model, stepper=None)


def _trained(study):
  """A 'previous stage' state: fresh params moved away, non-zero optimizer state."""
  s = study.fresh_states(0)
  params = jax.tree.map(lambda x: x + 0.05, s.params)
  opt = jax.tree.map(lambda x: x + 1 if np.issubdtype(x.dtype, np.floating) else x, s.opt_state)
  return s.replace(params=params, opt_state=opt, step=s.step + 7)


def _host(tree):
  return jax.tree.map(np.asarray, parallel.to_host(tree))


@pytest.mark.parametrize("name", methods.known_methods())
def test_every_method_prepares_a_stage(study, name):
  spec = methods.get_method(name)
  prev = _trained(study)
  hp = methods.MethodParams()
  before = _host(prev)
  state = methods.prepare_stage(spec, prev, _ctx(study), hp)
  after = _host(state)
  fresh = _host(study.fresh_states(1))
  leaves = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  p_prev, p_new, p_fresh = leaves(before.params), leaves(after.params), leaves(fresh.params)
  if name == "cold":
    np.testing.assert_array_equal(p_new, p_fresh)
  elif name in ("warm", "warm_rm", "l2_init"):
    np.testing.assert_array_equal(p_new, p_prev)
  elif name == "shrink_perturb":
    np.testing.assert_allclose(p_new, 0.4 * p_prev + 0.1 * p_fresh, rtol=1e-5, atol=1e-6)
  elif name == "sp":
    noise = p_new - 0.3 * p_prev  # conv/dense weights and biases: all leaves of conv1d
    assert 0.005 < noise.std() < 0.015 and abs(noise.mean()) < 0.002
  elif name == "dash":
    ratio = p_new / np.where(p_prev == 0, 1, p_prev)
    assert np.all(ratio[p_prev != 0] >= 0.3 - 1e-6) and np.all(ratio[p_prev != 0] <= 1 + 1e-6)
    assert np.any(ratio[p_prev != 0] < 0.999)
  elif name == "reset":
    head_new = leaves(after.params["head"])
    # exact up to the last bit: a reset is applied as a delta (optax.apply_updates)
    np.testing.assert_allclose(head_new, leaves(fresh.params["head"]), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(leaves(after.params["conv1"]), leaves(before.params["conv1"]))
  # the optimizer state: kept by the DASH code's methods, fresh for cold, warm_rm, S&P
  step = int(np.asarray(after.step)[0])
  assert step == (0 if name in ("cold", "warm_rm", "shrink_perturb") else 7)


@pytest.mark.parametrize("opt_state,expected_step", [("reset", 0), ("keep", 7)])
def test_optimizer_state_policy_overrides_the_method(study, opt_state, expected_step):
  hp = methods.MethodParams(opt_state=opt_state)
  for name in ("warm", "shrink_perturb"):
    state = methods.prepare_stage(methods.get_method(name), _trained(study), _ctx(study), hp)
    assert int(np.asarray(state.step)[0]) == expected_step


def test_bad_policy_values_are_refused():
  with pytest.raises(ValueError, match="--bn_stats"):
    methods.MethodParams(bn_stats="maybe").validate()
  with pytest.raises(ValueError, match="--dash_lambda"):
    methods.MethodParams(dash_lambda=2.0).validate()
  with pytest.raises(methods.UnknownMethodError, match="unknown method"):
    methods.get_method("magic")
