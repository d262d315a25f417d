"""Altered pre-training data (blur, rotations, random labels) by hand."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsjax.data import alter


def test_blur_image_nearest_by_hand():
  x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  x = np.concatenate([x, -2 * x], axis=-1)  # two channels, blurred apart
  out = np.asarray(alter.blur(x, 2))
  assert out.shape == x.shape and out.dtype == np.float32
  # Blocks of the 4x4 ramp: [[0,1],[4,5]] -> 2.5, [[2,3],[6,7]] -> 4.5,
  # [[8,9],[12,13]] -> 10.5, [[10,11],[14,15]] -> 12.5.
  expected = np.array([[2.5, 2.5, 4.5, 4.5],
                       [2.5, 2.5, 4.5, 4.5],
                       [10.5, 10.5, 12.5, 12.5],
                       [10.5, 10.5, 12.5, 12.5]], np.float32)
  np.testing.assert_allclose(out[0, :, :, 0], expected)
  np.testing.assert_allclose(out[0, :, :, 1], -2 * expected)
  np.testing.assert_allclose(alter.blur(out, 2), out)  # idempotent
  np.testing.assert_allclose(alter.blur(x, 1), x)
  np.testing.assert_allclose(alter.blur(x, 4)[0, :, :, 0], np.full((4, 4), 7.5))


def test_blur_signal_by_hand():
  x = np.array([[[1.0], [2.0], [6.0], [0.0], [3.0], [3.0]]], np.float32)
  np.testing.assert_allclose(np.asarray(alter.blur(x, 3))[0, :, 0],
                             [3, 3, 3, 2, 2, 2])
  # Linear upsampling, half-pixel centers, clamped edges: block means [a, b]
  # = [1.5, 3] of length 4 -> [a, 0.75a + 0.25b, 0.25a + 0.75b, b].
  y = np.array([[[1.0], [2.0], [4.0], [2.0]]], np.float32)
  np.testing.assert_allclose(np.asarray(alter.blur(y, 2, "linear"))[0, :, 0],
                             [1.5, 1.875, 2.625, 3.0], atol=1e-6)
  u8 = np.array([[[1], [2]]], np.uint8)
  out = alter.blur(u8, 2)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out[0, :, 0], [1.5, 1.5])


def test_blur_errors():
  with pytest.raises(ValueError, match=r"factor 3 does not divide the size 4.*\[1, 2, 4\]"):
    alter.blur(np.zeros((1, 4, 4, 1)), 3)
  with pytest.raises(ValueError, match="positive int"):
    alter.blur(np.zeros((1, 4, 4, 1)), 0)
  with pytest.raises(ValueError, match="images"):
    alter.blur(np.zeros((4, 4)), 2)
  with pytest.raises(ValueError, match="upsample"):
    alter.blur(np.zeros((1, 4, 1)), 2, "cubic")


def test_rotations_are_exact_and_labelled():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 3, 3, 2)).astype(np.float32)  # no symmetries
  out, k = alter.rotate_batch(jax.random.PRNGKey(0), x)
  out, k = np.asarray(out), np.asarray(k)
  assert out.shape == x.shape and k.shape == (64,) and k.dtype == np.int32
  assert set(k.tolist()) == {0, 1, 2, 3}
  for i in range(64):
    np.testing.assert_array_equal(out[i], np.rot90(x[i], k[i], axes=(0, 1)))
    for other in set(range(4)) - {int(k[i])}:  # the label is the only match
      assert not np.array_equal(out[i], np.rot90(x[i], other, axes=(0, 1)))
  # A function of the key: the same key repeats, another differs.
  out2, k2 = alter.rotate_batch(jax.random.PRNGKey(0), x)
  np.testing.assert_array_equal(k2, k)
  _, k3 = alter.rotate_batch(jax.random.PRNGKey(1), x)
  assert not np.array_equal(k3, k)
  jitted = jax.jit(alter.rotate_batch)(jax.random.PRNGKey(0), x)
  np.testing.assert_array_equal(jitted[0], out)


def test_rotation_errors():
  with pytest.raises(ValueError, match="rotation needs square images; got 3x4"):
    alter.rotate_batch(jax.random.PRNGKey(0), np.zeros((2, 3, 4, 1)))
  with pytest.raises(ValueError, match="rotation pre-training needs image data"):
    alter.rotate_batch(jax.random.PRNGKey(0), np.zeros((2, 40, 1)))


def test_random_labels_fraction():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 10, size=1000).astype(np.int64)
  original = y.copy()
  new = alter.random_labels(y, 0.3, 10, seed=5)
  np.testing.assert_array_equal(y, original)  # a new array, y untouched
  which = alter.relabeled_indices(1000, 0.3, seed=5)
  assert new.dtype == y.dtype and len(which) == 300
  assert len(np.unique(which)) == 300
  others = np.setdiff1d(np.arange(1000), which)
  np.testing.assert_array_equal(new[others], y[others])  # untouched
  changed = int(np.sum(new != y))
  # Replaced labels coincide with the true one w.p. 1/10: ~270 change
  # (binomial sd 5.2).
  assert 245 <= changed <= 295, changed
  assert new.min() >= 0 and new.max() <= 9
  np.testing.assert_array_equal(alter.random_labels(y, 0.3, 10, seed=5), new)
  assert not np.array_equal(alter.random_labels(y, 0.3, 10, seed=6), new)
  np.testing.assert_array_equal(alter.random_labels(y, 0.0, 10, seed=5), y)
  full = alter.random_labels(y, 1.0, 10, seed=5)
  assert 860 <= int(np.sum(full != y)) <= 940  # 900 +- 9.5
  with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
    alter.random_labels(y, 1.5, 10, seed=0)
  with pytest.raises(ValueError, match="num_classes"):
    alter.random_labels(y, 0.5, 0, seed=0)
