"""The warm-start methods as stage policies, on a real (tiny) staged study."""
import jax
import numpy as np
import pytest

from wsjax import parallel
from wsjax.core.state import seed_keys
from wsjax.studies import methods
from wsjax.studies.common import DataConfig, ModelConfig, RunnerConfig
from wsjax.studies.staged import StagedConfig, StagedStudy


@pytest.fixture(scope="module")
def study(data_dir, tmp_path_factory):
  cfg = StagedConfig(model=ModelConfig(channels=4), data=DataConfig(data_dir=data_dir,
                                                                    batch_size=64),
                     seeds=2, threshold=0, max_epochs=1, diagnostics=False, methods=("cold",))
  return StagedStudy(cfg, str(tmp_path_factory.mktemp("w")), RunnerConfig(progress=False))


def _trained(study):
  """A 'previous stage' state: fresh params moved away, non-zero optimizer state."""
  s = study.setting.fresh_states(0, 0)
  params = jax.tree.map(lambda x: x + 0.05, s.params)
  opt = jax.tree.map(lambda x: x + 1 if np.issubdtype(x.dtype, np.floating) else x, s.opt_state)
  return s.replace(params=params, opt_state=opt)


def _host(tree):
  return jax.tree.map(np.asarray, parallel.to_host(tree))


def _leaves(t):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])


def _opt_is_fresh(state, fresh) -> bool:
  return all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.opt_state),
                                                   jax.tree.leaves(fresh.opt_state))
             if np.issubdtype(np.asarray(a).dtype, np.floating))


@pytest.mark.parametrize("name", methods.known_methods())
def test_every_method_prepares_a_stage(study, name):
  method = study.cfg.method(name)
  prev = _trained(study)
  before = _host(prev)
  state = methods.prepare_stage(method, prev, study.context(1))
  after = _host(state)
  fresh = _host(study.setting.fresh_states(1, 0))
  p_prev, p_new, p_fresh = _leaves(before.params), _leaves(after.params), _leaves(fresh.params)
  # the transforms' own fresh draws: init_variables(sub), `_, sub = split(key)`,
  # the key a function of (seed, stage, the method's salt)
  drawn = {salt: _host(jax.vmap(lambda k: study.setting.init_variables(
      jax.random.split(k)[1])["params"])(seed_keys(study.setting.seeds, 1, salt)))
           for salt in (13, 17)}
  if name == "cold":
    np.testing.assert_array_equal(p_new, p_fresh)
  elif name in ("warm", "warm_rm", "l2_init"):
    np.testing.assert_array_equal(p_new, p_prev)
  elif name == "shrink_perturb":
    np.testing.assert_allclose(p_new, 0.4 * p_prev + 0.1 * _leaves(drawn[13]), rtol=1e-5,
                               atol=1e-6)
  elif name == "sp":
    noise = p_new - 0.3 * p_prev  # conv/dense weights and biases: all leaves of conv1d
    assert 0.005 < noise.std() < 0.015 and abs(noise.mean()) < 0.002
  elif name == "dash":
    ratio = p_new / np.where(p_prev == 0, 1, p_prev)
    assert np.all(ratio[p_prev != 0] >= 0.3 - 1e-6) and np.all(ratio[p_prev != 0] <= 1 + 1e-6)
    assert np.any(ratio[p_prev != 0] < 0.999)
  elif name == "reset":
    head_new = _leaves(after.params["head"])
    # exact up to the last bit: a reset is applied as a delta (optax.apply_updates)
    np.testing.assert_allclose(head_new, _leaves(drawn[17]["head"]), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(_leaves(after.params["conv1"]), _leaves(before.params["conv1"]))
  # the optimizer state: kept by the DASH code's methods, fresh for cold, warm_rm, S&P
  fresh_opt = name in ("cold", "warm_rm", "shrink_perturb")
  assert _opt_is_fresh(after, fresh if name == "cold" else _host(
      state.replace(opt_state=jax.vmap(study.setting.tx.init)(state.params)))) == fresh_opt


@pytest.mark.parametrize("opt_state,fresh", [("reset", True), ("keep", False)])
def test_optimizer_state_policy_overrides_the_method(study, opt_state, fresh):
  for name in ("warm", "shrink_perturb"):
    state = methods.prepare_stage(study.cfg.method(name), _trained(study), study.context(1),
                                  opt_state=opt_state)
    reset = _host(state.replace(opt_state=jax.vmap(study.setting.tx.init)(state.params)))
    assert _opt_is_fresh(_host(state), reset) == fresh


def test_bad_method_values_are_refused():
  with pytest.raises(ValueError, match="--dash_lambda"):
    StagedConfig(dash=methods.Dash(lam=2.0), methods=("dash",)).validate()
  with pytest.raises(ValueError, match="--shrink must be in"):
    StagedConfig(shrink_perturb=methods.ShrinkPerturb(shrink=1.5),
                 methods=("shrink_perturb",)).validate()
  with pytest.raises(methods.UnknownMethodError, match="unknown method"):
    methods.check_method("magic")


def test_a_model_without_sown_activations_gets_diagnostics_without_dead_relus(data_dir, tmp_path):
  """logreg sows no ReLU activations: the study still records norms and DASH
  cosines (it used to crash with KeyError: 'activations')."""
  cfg = StagedConfig(model=ModelConfig(name="logreg"), data=DataConfig(data_dir=data_dir,
                                                                       batch_size=64),
                     seeds=2, threshold=0, max_epochs=1, methods=("cold", "dash"))
  out = StagedStudy(cfg, str(tmp_path), RunnerConfig(progress=False)).run()
  for m in out["methods"].values():
    for stage in m["stages"]:
      assert "dead_relu" not in stage and len(stage["param_norm"]) == 2
      assert sum(stage["dash_cosine_hist"]["overall"]) > 0
