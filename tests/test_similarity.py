"""CCA, SVCCA, PWCCA and linear CKA against NumPy float64 hand computations."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from wsjax.analysis import similarity as S


# ---------------------------------------------------------------------------
# NumPy float64 transcriptions of the math (the references).

def centre(a):
  return a - a.mean(axis=0, keepdims=True)


def inv_sqrt(cov):
  """Symmetric inverse square root through an explicit eigendecomposition."""
  w, v = np.linalg.eigh(cov)
  return v @ np.diag(w ** -0.5) @ v.T


def hand_cca(x, y):
  """Canonical correlations, weights: Sxx^-1/2 Sxy Syy^-1/2 = U diag(rho) V^T."""
  xc, yc = centre(x), centre(y)
  n = x.shape[0]
  sxx, syy, sxy = xc.T @ xc / (n - 1), yc.T @ yc / (n - 1), xc.T @ yc / (n - 1)
  ix, iy = inv_sqrt(sxx), inv_sqrt(syy)
  u, rho, vt = np.linalg.svd(ix @ sxy @ iy, full_matrices=False)
  return rho, ix @ u, iy @ vt.T


def hand_pwcca(x, y):
  """Morcos et al. (2018): alpha_i = sum_j |<h_i, x_j>| with h_i the unit-norm
  CCA vectors of x and x_j the raw activations of x's neuron j."""
  rho, a, _ = hand_cca(x, y)
  h = centre(x) @ a
  h = h / np.linalg.norm(h, axis=0)
  alpha = np.abs(h.T @ x).sum(axis=1)
  return np.sum(alpha * rho) / np.sum(alpha), alpha / alpha.sum()


def hand_cka(x, y):
  xc, yc = centre(x), centre(y)
  return (np.linalg.norm(yc.T @ xc) ** 2
          / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))


def brute_force_unbiased_hsic(k, l_):
  """Song et al. (2012) as a U-statistic over ordered 4-tuples of distinct
  indices: E[k_ij l_ij] + E[k_ij] E[l_qr] - 2 E[k_ij l_iq]."""
  n = k.shape[0]
  total = 0.0
  count = 0
  for i, j, q, r in itertools.permutations(range(n), 4):
    total += k[i, j] * l_[i, j] + k[i, j] * l_[q, r] - 2 * k[i, j] * l_[i, q]
    count += 1
  return total / count


def related_pair(rng, n=300, p=6, q=8, noise=0.7):
  """Two activation sets that share some of their directions."""
  z = rng.normal(size=(n, 4))
  x = z @ rng.normal(size=(4, p)) + noise * rng.normal(size=(n, p)) + 3.0
  y = z @ rng.normal(size=(4, q)) + noise * rng.normal(size=(n, q)) - 1.0
  return x, y


@pytest.fixture
def rng():
  return np.random.default_rng(0)


# ---------------------------------------------------------------------------
# CCA.

def test_cca_matches_hand_computation_and_principal_angles(rng):
  x, y = related_pair(rng)
  rho, _, _ = hand_cca(x, y)
  # Independent check of the reference: cosines of the principal angles
  # between the centred column spaces are the canonical correlations.
  angles = np.sort(np.cos(scipy.linalg.subspace_angles(centre(x), centre(y))))[::-1]
  np.testing.assert_allclose(rho, angles, atol=1e-10)

  exact = S.cca(x, y, epsilon=0.0, dtype="float64")
  np.testing.assert_allclose(exact.correlations, rho, atol=1e-10)
  assert int(exact.count) == 6 and int(exact.rank_x) == 6 and int(exact.rank_y) == 8
  np.testing.assert_allclose(exact.mean, rho.mean(), atol=1e-10)

  default = S.cca(x, y)  # float32, epsilon 1e-6
  assert default.correlations.dtype == jnp.float32
  np.testing.assert_allclose(default.correlations, rho, atol=2e-4)
  assert np.all(np.diff(np.asarray(default.correlations)) <= 1e-6)  # descending


def test_cca_weights_give_unit_variance_variates_that_correlate_by_rho(rng):
  x, y = related_pair(rng)
  result = S.cca(x, y, epsilon=0.0, dtype="float64")
  hx = centre(x) @ result.x_weights
  hy = centre(y) @ result.y_weights
  n = x.shape[0]
  np.testing.assert_allclose(hx.T @ hx / (n - 1), np.eye(6), atol=1e-9)
  np.testing.assert_allclose(hy.T @ hy / (n - 1), np.eye(6), atol=1e-9)
  np.testing.assert_allclose(hx.T @ hy / (n - 1), np.diag(result.correlations), atol=1e-9)


def test_cca_of_a_set_with_itself_is_one(rng):
  x, _ = related_pair(rng)
  result = S.cca(x, x)
  assert int(result.count) == 6
  np.testing.assert_allclose(result.correlations, 1.0, atol=1e-4)
  np.testing.assert_allclose(result.mean, 1.0, atol=1e-4)


def test_cca_of_independent_noise_is_small(rng):
  n = 4000
  x, y = rng.normal(size=(n, 4)), rng.normal(size=(n, 5))
  result = S.cca(x, y)
  # Under independence the top correlation is about (sqrt(p) + sqrt(q)) / sqrt(n) = 0.067.
  assert float(result.correlations[0]) < 0.12
  assert float(result.mean) < 0.08
  # ... while a dependent pair of the same size is far from it.
  assert float(S.cca(x, np.concatenate([x[:, :2], y[:, 2:]], 1)).correlations[1]) > 0.99


def test_cca_is_invariant_to_invertible_linear_maps(rng):
  x, y = related_pair(rng)
  a = rng.normal(size=(6, 6)) + 3 * np.eye(6)
  b = rng.normal(size=(8, 8)) + 3 * np.eye(8)
  assert np.linalg.cond(a) < 50 and np.linalg.cond(b) < 50
  base = S.cca(x, y, epsilon=0.0, dtype="float64").correlations
  mapped = S.cca(x @ a + 5.0, y @ b, epsilon=0.0, dtype="float64").correlations
  np.testing.assert_allclose(mapped, base, atol=1e-10)
  np.testing.assert_allclose(S.cca(x @ a, y @ b, epsilon=0.0).correlations, base, atol=2e-4)  # float32
  # The regularized CCA is exactly invariant to the scale of either side
  # (epsilon is relative to the largest variance) and to orthogonal maps.
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  regularized = S.cca(x, y, epsilon=1e-3, dtype="float64").correlations
  assert np.max(np.abs(regularized - base)) > 1e-5  # epsilon does shrink them
  for xm, ym in ((1e4 * x, 1e-3 * y), (x @ q, y)):
    np.testing.assert_allclose(S.cca(xm, ym, epsilon=1e-3, dtype="float64").correlations, regularized,
                               atol=1e-10)


def test_cca_drops_dead_and_dependent_neurons(rng):
  x, y = related_pair(rng)
  dead = np.full((x.shape[0], 1), 0.5)  # a constant (dead) neuron
  dependent = x[:, :1] - 2 * x[:, 1:2]  # a linear combination of two others
  wide = np.concatenate([x[:, :3], dead, dependent, x[:, 3:]], 1)
  rho, _, _ = hand_cca(x, y)
  # epsilon: 1e-12 in float64 (dropping the dependent neuron's ~1e-16
  # eigenvalue, too small to shift the others), the default 1e-6 in float32.
  for dtype, epsilon, tol in (("float64", 1e-12, 1e-9), ("float32", 1e-6, 2e-4)):
    result = S.cca(wide, y, epsilon=epsilon, dtype=dtype)
    assert int(result.rank_x) == 6 and int(result.count) == 6
    np.testing.assert_allclose(result.correlations[:6], rho, atol=tol)
    np.testing.assert_allclose(result.correlations[6:], 0.0)
    np.testing.assert_allclose(result.mean, rho.mean(), atol=tol)  # over the 6 pairs, not 7
  # A constant side: nothing to correlate.
  flat = S.cca(np.ones_like(x), y)
  assert int(flat.count) == 0 and float(flat.mean) == 0.0
  np.testing.assert_allclose(flat.correlations, 0.0)


_VMAPPED_CCA = """
import json, sys, numpy as np, jax
sys.path.insert(0, {tests!r})
from test_similarity import related_pair
from wsjax.analysis import similarity as S
xs = np.stack([related_pair(np.random.default_rng(s))[0] for s in range(3)]).astype(np.float32)
ys = np.stack([related_pair(np.random.default_rng(s))[1] for s in range(3)]).astype(np.float32)
batched = jax.jit(jax.vmap(lambda a, b: S.cca(a, b).mean))(xs, ys)
one_by_one = [float(S.cca(a, b).mean) for a, b in zip(xs, ys)]
print(json.dumps({{"batched": np.asarray(batched).tolist(), "one_by_one": one_by_one}}))
"""


def test_cca_vmaps_and_jits_in_float32():
  """In a subprocess with a time limit: on XLA:CPU (jax 0.10.2) a program of
  vmapped `eigh` calls can hang with every thread idle (why `batched_similarity`
  loops over pairs on CPU); a hang here skips with that reason instead of
  hanging the suite."""
  import json
  import os
  import subprocess
  import sys
  tests = os.path.dirname(os.path.abspath(__file__))
  try:
    p = subprocess.run([sys.executable, "-c", _VMAPPED_CCA.format(tests=tests)], capture_output=True,
                       text=True, timeout=240, cwd=os.path.dirname(tests))
  except subprocess.TimeoutExpired:
    pytest.skip("vmapped eigh hung on XLA:CPU (known jaxlib issue; the library loops on CPU)")
  assert p.returncode == 0, p.stderr[-2000:]
  out = json.loads(p.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(out["batched"], out["one_by_one"], atol=1e-5)


# ---------------------------------------------------------------------------
# SVCCA.

def known_spectrum(rng, n, variances):
  """Centred (n, p) activations whose covariance has exactly these
  eigenvalues (up to a factor), in a random basis."""
  p = len(variances)
  q, _ = np.linalg.qr(centre(rng.normal(size=(n, p))))  # orthonormal, mean-zero columns
  rotation, _ = np.linalg.qr(rng.normal(size=(p, p)))
  return q @ np.diag(np.sqrt(variances)) @ rotation.T


def test_svcca_keep_fraction_selects_the_top_directions_by_hand(rng):
  n = 400
  variances = np.array([50, 25, 12, 6, 4, 2, 1], float)   # cumulative 0.5 .75 .87 .93 .97 .99 1
  x = known_spectrum(rng, n, variances)
  y = x @ rng.normal(size=(7, 7)) + 0.5 * rng.normal(size=(n, 7))
  cumulative = np.cumsum(np.sort(np.linalg.eigvalsh(np.cov(x.T)))[::-1])
  cumulative /= cumulative[-1]
  for keep, expected in ((0.6, 2), (0.8, 3), (0.9, 4), (0.95, 5)):
    by_hand = int(np.argmax(cumulative >= keep)) + 1
    assert by_hand == expected
    result = S.svcca(x, y, keep=keep, dtype="float64")
    assert int(result.rank_x) == expected
    # SVCCA by hand: project each side onto its top directions (SVD of the
    # centred activations, as svcca's tutorials), then CCA of the projections.
    dy = int(result.rank_y)
    cy = np.cumsum(np.linalg.svd(centre(y), compute_uv=False) ** 2)
    assert dy == int(np.argmax(cy / cy[-1] >= keep)) + 1
    _, _, vx = np.linalg.svd(centre(x), full_matrices=False)
    _, _, vy = np.linalg.svd(centre(y), full_matrices=False)
    rho, _, _ = hand_cca(centre(x) @ vx[:expected].T, centre(y) @ vy[:dy].T)
    k = min(expected, dy)
    np.testing.assert_allclose(result.correlations[:k], rho[:k], atol=1e-5)
    np.testing.assert_allclose(result.mean, rho.mean(), atol=1e-5)
    np.testing.assert_allclose(S.svcca(x, y, keep=keep).mean, rho.mean(), atol=2e-4)  # float32


def test_svcca_keep_count_and_bad_keep(rng):
  x, y = related_pair(rng)
  result = S.svcca(x, y, keep=3, epsilon=0.0, dtype="float64")
  assert int(result.rank_x) == 3 and int(result.rank_y) == 3 and int(result.count) == 3
  _, _, vx = np.linalg.svd(centre(x), full_matrices=False)
  _, _, vy = np.linalg.svd(centre(y), full_matrices=False)
  rho, _, _ = hand_cca(centre(x) @ vx[:3].T, centre(y) @ vy[:3].T)
  np.testing.assert_allclose(result.correlations[:3], rho, atol=1e-6)
  # keep=1.0 keeps everything: plain CCA.
  np.testing.assert_allclose(S.svcca(x, y, keep=1.0).correlations, S.cca(x, y).correlations, atol=1e-6)
  for bad in (0, 7, 0.0, 1.5, -0.5, True, "all"):
    with pytest.raises(ValueError, match="keep"):
      S.svcca(x, y, keep=bad)
  with pytest.raises(ValueError, match="keep between 1 and 4"):  # 4 datapoints
    S.svcca(x[:4], y[:4], keep=5)


# ---------------------------------------------------------------------------
# PWCCA.

@pytest.mark.parametrize("p,q", [(6, 8), (8, 6)])
def test_pwcca_matches_numpy_transcription_of_the_paper(rng, p, q):
  x, y = related_pair(rng, p=p, q=q)
  expected, weights = hand_pwcca(x, y)
  exact = S.pwcca(x, y, epsilon=0.0, dtype="float64")
  np.testing.assert_allclose(exact.similarity, expected, atol=1e-10)
  np.testing.assert_allclose(exact.weights, weights, atol=1e-10)
  np.testing.assert_allclose(np.sum(exact.weights), 1.0, atol=1e-12)
  np.testing.assert_allclose(S.pwcca(x, y).similarity, expected, atol=2e-4)  # float32
  # Weighted by x: not symmetric, and differs from the plain mean.
  assert abs(float(S.pwcca(y, x).similarity) - expected) > 1e-3
  assert abs(float(S.cca(x, y).mean) - expected) > 1e-3


def test_pwcca_of_a_set_with_itself_is_one_and_ignores_dead_neurons(rng):
  x, y = related_pair(rng)
  np.testing.assert_allclose(S.pwcca(x, x).similarity, 1.0, atol=1e-4)
  wide = np.concatenate([x, np.zeros((x.shape[0], 2))], 1)
  expected, _ = hand_pwcca(x, y)
  result = S.pwcca(wide, y, dtype="float64")
  np.testing.assert_allclose(result.similarity, expected, atol=1e-5)
  np.testing.assert_allclose(result.weights[6:], 0.0)


# ---------------------------------------------------------------------------
# CKA.

@pytest.mark.parametrize("n", [40, 9])  # feature-space and Gram-matrix branches
def test_linear_cka_matches_hand_computation(rng, n):
  x, y = related_pair(rng, n=n)
  expected = hand_cka(x, y)
  np.testing.assert_allclose(S.linear_cka(x, y, dtype="float64"), expected, atol=1e-12)
  np.testing.assert_allclose(S.linear_cka(x, y), expected, atol=1e-5)
  np.testing.assert_allclose(S.linear_cka(x, x), 1.0, atol=1e-6)


def test_linear_cka_invariances(rng):
  x, y = related_pair(rng)
  base = hand_cka(x, y)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  np.testing.assert_allclose(S.linear_cka(3.7 * x @ q + 2.0, y, dtype="float64"), base, atol=1e-12)
  np.testing.assert_allclose(S.linear_cka(x, 0.01 * y), base, atol=1e-5)
  # Not invariant to an arbitrary invertible map (CCA is).
  a = np.diag([10.0, 1, 1, 1, 1, 0.1]) @ (rng.normal(size=(6, 6)) + 3 * np.eye(6))
  assert abs(float(S.linear_cka(x @ a, y)) - base) > 0.01
  np.testing.assert_allclose(S.cca(x @ a, y, epsilon=0.0, dtype="float64").mean, hand_cca(x, y)[0].mean(),
                             atol=1e-5)
  assert float(S.linear_cka(np.ones_like(x), y)) == 0.0


def test_debiased_cka_matches_brute_force_unbiased_hsic(rng):
  x, y = related_pair(rng, n=7, p=3, q=4)
  k, l_ = x @ x.T, y @ y.T  # raw (uncentred) features: HSIC_1 is unchanged by centring
  expected = brute_force_unbiased_hsic(k, l_) / np.sqrt(
      brute_force_unbiased_hsic(k, k) * brute_force_unbiased_hsic(l_, l_))
  np.testing.assert_allclose(S.linear_cka_debiased(x, y, dtype="float64"), expected, atol=1e-12)
  np.testing.assert_allclose(S.linear_cka_debiased(x, y), expected, atol=1e-4)
  # Debiasing lowers CKA between unrelated wide representations.
  a, b = rng.normal(size=(30, 60)), rng.normal(size=(30, 60))
  assert float(S.linear_cka_debiased(a, b)) < 0.5 * float(S.linear_cka(a, b))
  with pytest.raises(ValueError, match="at least 4 datapoints"):
    S.linear_cka_debiased(x[:3], y[:3])


# ---------------------------------------------------------------------------
# Conv activations, precision, batching, errors.

def test_activation_matrix_positions_and_pool(rng):
  a = rng.normal(size=(2, 3, 4, 5))
  positions = S.activation_matrix(a, "positions")
  assert positions.shape == (24, 5)
  np.testing.assert_allclose(positions[4 * 1 + 2], a[0, 1, 2])  # example 0, row 1, column 2
  np.testing.assert_allclose(S.activation_matrix(a, "pool"), a.mean(axis=(1, 2)), rtol=1e-6)
  np.testing.assert_allclose(S.activation_matrix(a[:, 0], "pool"), a[:, 0].mean(axis=1), rtol=1e-6)
  np.testing.assert_allclose(S.activation_matrix(a[:, 0, 0]), a[:, 0, 0])
  with pytest.raises(ValueError, match="unknown spatial mode"):
    S.activation_matrix(a, "flatten")


def test_float64_is_scoped_and_more_accurate(rng):
  assert not jax.config.jax_enable_x64
  x, y = related_pair(rng)
  rho, _, _ = hand_cca(x, y)
  result = S.cca(x, y, epsilon=0.0, dtype=np.float64)
  assert isinstance(result.correlations, np.ndarray) and result.correlations.dtype == np.float64
  assert np.max(np.abs(result.correlations - rho)) < 1e-10
  assert np.max(np.abs(np.asarray(S.cca(x, y, epsilon=0.0).correlations) - rho)) > 1e-9
  assert not jax.config.jax_enable_x64  # the global flag is untouched
  assert jnp.zeros(1).dtype == jnp.float32
  for measure in ("cca", "cka"):
    assert np.asarray(S.similarity(measure, x, y, dtype="float64")).dtype == np.float64
  assert not jax.config.jax_enable_x64
  with pytest.raises(ValueError, match="outside jit"):
    jax.jit(lambda a, b: S.linear_cka(a, b, dtype="float64"))(x, y)


def test_similarity_and_batched_similarity_agree_with_the_functions(rng):
  pairs = [related_pair(np.random.default_rng(s)) for s in range(6)]
  xs = np.stack([p[0] for p in pairs]).reshape(2, 3, 300, 6)
  ys = np.stack([p[1] for p in pairs]).reshape(2, 3, 300, 8)
  x, y = pairs[0]
  direct = {"cca": lambda a, b: S.cca(a, b).mean, "svcca": lambda a, b: S.svcca(a, b, keep=0.9).mean,
            "pwcca": lambda a, b: S.pwcca(a, b).similarity, "cka": S.linear_cka,
            "cka_debiased": S.linear_cka_debiased}
  options = {"svcca": {"keep": 0.9}}
  for measure in S.MEASURES:
    opts = options.get(measure, {})
    np.testing.assert_allclose(S.similarity(measure, x, y, **opts), direct[measure](x, y), atol=1e-6)
    batched = S.batched_similarity(measure, xs, ys, **opts)
    assert batched.shape == (2, 3)
    one_by_one = [float(direct[measure](a, b)) for a, b in pairs]
    np.testing.assert_allclose(np.ravel(batched), one_by_one, atol=1e-5)
    if measure == "cka_debiased":  # chunks of 4 vmapped pairs: a loop of 2, the last one short
      chunked = S.batched_similarity(measure, xs, ys, chunk_size=4, **opts)
      np.testing.assert_allclose(chunked, batched, atol=1e-6)
  exact = S.batched_similarity("cka", xs, ys, dtype="float64")
  assert exact.dtype == np.float64
  np.testing.assert_allclose(exact[0, 0], hand_cka(x, y), atol=1e-12)


def test_bad_inputs_raise_one_line_value_errors(rng):
  x, y = related_pair(rng)
  cases = [
      (lambda: S.cca(x[:, 0], y), "must be a \\(datapoints, neurons\\) matrix"),
      (lambda: S.linear_cka(x.reshape(300, 2, 3, 1), y), "activation_matrix"),
      (lambda: S.cca(x, y[:-1]), "same datapoints"),
      (lambda: S.cca(x[:1], y[:1]), "at least 2 datapoints"),
      (lambda: S.cca(x, y, dtype="bfloat16"), "dtype must be"),
      (lambda: S.cca(x, y, epsilon=-1.0), "epsilon"),
      (lambda: S.similarity("svd", x, y), "unknown similarity measure 'svd'"),
      (lambda: S.similarity("cka", x, y, epsilon=1e-3), "cka has no option epsilon"),
      (lambda: S.batched_similarity("cca", x, y[None]), "same batch axes"),
      (lambda: S.batched_similarity("cca", x[None], y[None], chunk_size=0), "chunk_size"),
      (lambda: S.batched_similarity("svcca", x[None], y[None], keep=99), "keep between 1 and 6"),
  ]
  for call, message in cases:
    with pytest.raises(ValueError, match=message) as info:
      call()
    assert "\n" not in str(info.value)
