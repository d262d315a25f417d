"""Tests of wsjax.data: local tfds builders, load_dataset, schedules, batching,
augmentation. Datasets are prepared for real in a temporary data dir."""
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from mnist1d.data import get_dataset_args, make_dataset
from sklearn.datasets import load_digits

import wsjax.data as wd
from wsjax.data import builders, datasets


# --------------------------------------------------------------------------
# Datasets


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def mnist1d_reference():
  """The mnist1d package's own canonical dataset."""
  return make_dataset(get_dataset_args())


@pytest.fixture(scope="module")
def mnist1d_prepared(data_dir):
  """Prepares mnist1d with the real tfds builder, as array_record.

  Returns whether the global `numpy.random` state was left as it was (the
  mnist1d generator reseeds it; the builder restores it).
  """
  np.random.seed(7)
  expected = np.random.random()
  np.random.seed(7)
  builder = tfds.builder("mnist1d", data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=builders.LOCAL_DOWNLOAD_CONFIG)
  return np.random.random() == expected


def test_mnist1d_builder_matches_package_generator(
    data_dir, mnist1d_prepared, mnist1d_reference):
  ref = mnist1d_reference
  sources = tfds.data_source("mnist1d", data_dir=data_dir, download=False)
  assert sources["train"].dataset_info.file_format.value == "array_record"
  assert len(sources["train"]) == 4000 and len(sources["test"]) == 1000
  for split, x_key, y_key in [("train", "x", "y"), ("test", "x_test", "y_test")]:
    records = sources[split].__getitems__(list(range(len(sources[split]))))
    x = np.stack([r["x"] for r in records])
    y = np.array([r["label"] for r in records])
    assert x.shape == (len(ref[y_key]), 40) and x.dtype == np.float32
    np.testing.assert_array_equal(x, ref[x_key].astype(np.float32))
    np.testing.assert_array_equal(y, ref[y_key])
  first = sources["train"][0]
  np.testing.assert_array_equal(first["x"], ref["x"][0].astype(np.float32))
  assert first["label"] == ref["y"][0]


def test_mnist1d_builder_restores_global_rng(mnist1d_prepared):
  assert mnist1d_prepared


def test_mnist1d_generation_restores_global_random_states():
  random.seed(3)
  np.random.seed(3)
  expected = (random.random(), np.random.random())
  random.seed(3)
  np.random.seed(3)
  tfds.builder("mnist1d", data_dir="/nonexistent")._split_generators(None)
  assert (random.random(), np.random.random()) == expected


def test_mnist1d_large_config_args():
  builder = tfds.builder("mnist1d/large", data_dir="/nonexistent")
  assert builder.builder_config.name == "large"
  args, canonical = vars(builder.dataset_args()), vars(get_dataset_args())
  assert args.pop("num_samples") == 50000
  canonical.pop("num_samples")
  assert args == canonical and args["seed"] == 42 and args["train_split"] == 0.8
  assert vars(tfds.builder("mnist1d", data_dir="/nonexistent").dataset_args()) \
      == vars(get_dataset_args())


def test_load_mnist1d(data_dir, mnist1d_prepared, mnist1d_reference):
  ds = wd.load_dataset("mnist1d", data_dir)
  assert ds.name == "mnist1d" and ds.num_classes == 10
  assert ds.x_train.shape == (4000, 40, 1) and ds.x_test.shape == (1000, 40, 1)
  assert ds.input_shape == (40, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  np.testing.assert_array_equal(
      ds.x_train[:, :, 0], mnist1d_reference["x"].astype(np.float32))
  np.testing.assert_array_equal(ds.y_test, mnist1d_reference["y_test"])
  # Cached per process, and read-only so the cache cannot be corrupted.
  assert wd.load_dataset("mnist1d", data_dir) is ds
  with pytest.raises(ValueError):
    ds.x_train[0, 0, 0] = 1.0


def test_digits_split_and_normalization(data_dir):
  ds = wd.load_dataset("digits", data_dir)
  assert ds.x_train.shape == (1437, 8, 8, 1) and ds.x_test.shape == (360, 8, 8, 1)
  assert ds.input_shape == (8, 8, 1) and ds.num_classes == 10
  assert ds.y_train.dtype == np.int32 and ds.x_train.dtype == np.float32
  # The documented split: permutation from default_rng(0), last 360 are test.
  digits = load_digits()
  perm = np.random.default_rng(0).permutation(1797)
  train, test = perm[:-360], perm[-360:]
  np.testing.assert_array_equal(ds.y_train, digits.target[train])
  np.testing.assert_array_equal(ds.y_test, digits.target[test])
  pixels = digits.images[test][..., None] / 16.0
  np.testing.assert_allclose(
      ds.x_test, (pixels - datasets.DIGITS_MEAN) / datasets.DIGITS_STD,
      atol=1e-5)
  # Normalized with the train split's own statistics.
  assert abs(ds.x_train.mean()) < 1e-5
  assert abs(ds.x_train.std() - 1.0) < 1e-5


def test_data_dir_from_environment(data_dir, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
  assert wd.load_dataset("digits") is wd.load_dataset("digits", data_dir)
  monkeypatch.delenv("TFDS_DATA_DIR")
  assert datasets.resolve_data_dir().endswith("tensorflow_datasets")


def test_unknown_dataset():
  with pytest.raises(wd.UnknownDatasetError) as err:
    wd.load_dataset("imagenet_tiny", "/nonexistent")
  assert isinstance(err.value, ValueError)
  message = str(err.value)
  assert "imagenet_tiny" in message and "\n" not in message
  assert all(name in message for name in wd.KNOWN_DATASETS)


# --------------------------------------------------------------------------
# Schedules


def _check_partition(schedule, n_total):
  """Stages are cumulative prefixes, new parts disjoint, union of size n_total."""
  assert len(schedule.stages) == len(schedule.new) == schedule.num_stages
  prev = np.zeros(0, np.int64)
  for stage, new in zip(schedule.stages, schedule.new):
    assert stage.dtype == np.int64 and new.dtype == np.int64
    np.testing.assert_array_equal(stage, np.concatenate([prev, new]))
    assert len(new) > 0
    prev = stage
  everything = np.concatenate(schedule.new)
  assert len(np.unique(everything)) == len(everything) == n_total


def test_two_phase():
  s = wd.two_phase(100, 0.3, seed=0)
  assert s.num_stages == 2
  assert [len(x) for x in s.stages] == [30, 100]
  _check_partition(s, 100)
  np.testing.assert_array_equal(np.sort(s.stages[1]), np.arange(100))
  single = wd.two_phase(100, 1.0, seed=0)
  assert single.num_stages == 1 and len(single.stages[0]) == 100
  np.testing.assert_array_equal(np.sort(single.stages[0]), np.arange(100))
  assert len(wd.two_phase(10, 0.01, seed=0).stages[0]) == 1  # At least one.


def test_online():
  s = wd.online(10, 3, seed=1)
  assert [len(x) for x in s.new] == [3, 3, 3, 1]
  assert [len(x) for x in s.stages] == [3, 6, 9, 10]
  _check_partition(s, 10)
  assert wd.online(10, 20, seed=1).num_stages == 1


def test_chunks_drop_remainder():
  s = wd.chunks(103, 4, seed=2)
  assert [len(x) for x in s.new] == [25] * 4
  assert [len(x) for x in s.stages] == [25, 50, 75, 100]
  _check_partition(s, 100)
  assert set(s.stages[-1]) < set(range(103))


def test_schedules_deterministic_and_seeded():
  for kind, kw in [("two_phase", dict(fraction=0.5)),
                   ("online", dict(chunk_size=7)),
                   ("chunks", dict(n_chunks=5))]:
    a = wd.make_schedule(kind, 50, 3, **kw)
    b = wd.make_schedule(kind, 50, 3, **kw)
    c = wd.make_schedule(kind, 50, 4, **kw)
    for x, y in zip(a.stages, b.stages):
      np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.new[0], c.new[0])
  direct = wd.chunks(50, 5, seed=3)
  np.testing.assert_array_equal(
      wd.make_schedule("chunks", 50, 3, n_chunks=5).new[2], direct.new[2])


@pytest.mark.parametrize("make, match", [
    (lambda: wd.two_phase(10, 0.0, 0), "fraction"),
    (lambda: wd.two_phase(10, 1.5, 0), "fraction"),
    (lambda: wd.two_phase(10, float("nan"), 0), "fraction"),
    (lambda: wd.online(10, 0, 0), "chunk_size"),
    (lambda: wd.online(10, -2, 0), "chunk_size"),
    (lambda: wd.chunks(10, 0, 0), "n_chunks"),
    (lambda: wd.chunks(10, 11, 0), "n_chunks"),
    (lambda: wd.online(0, 1, 0), "n_train"),
    (lambda: wd.online(10, 1, -1), "seed"),
    (lambda: wd.make_schedule("cyclic", 10, 0), "cyclic"),
])
def test_schedules_reject_bad_values(make, match):
  with pytest.raises(ValueError, match=match):
    make()


# --------------------------------------------------------------------------
# Batching


def test_epoch_batches_shape_and_coverage():
  buffer = np.arange(1000, 1010)
  batches = wd.epoch_batches(buffer, 4, seed=0, stage=0, epoch=0)
  assert batches.shape == (3, 4) and batches.dtype == np.int64
  assert wd.steps_per_epoch(10, 4) == 3 and wd.steps_per_epoch(8, 4) == 2
  flat = batches.reshape(-1)
  np.testing.assert_array_equal(np.sort(flat[:10]), buffer)  # A permutation,
  np.testing.assert_array_equal(flat[10:], flat[:2])  # then wraps around.


def test_epoch_batches_pure_function_of_seed_stage_epoch():
  buffer = np.arange(64)
  ref = wd.epoch_batches(buffer, 8, seed=1, stage=2, epoch=3)
  np.testing.assert_array_equal(
      ref, wd.epoch_batches(buffer, 8, seed=1, stage=2, epoch=3))
  np.testing.assert_array_equal(
      ref.reshape(-1), buffer[np.random.default_rng([1, 2, 3]).permutation(64)])
  for other in [(0, 2, 3), (1, 0, 3), (1, 2, 4)]:
    assert not np.array_equal(ref, wd.epoch_batches(buffer, 8, *other))


def test_epoch_batches_errors():
  with pytest.raises(ValueError, match="larger than the buffer"):
    wd.epoch_batches(np.arange(3), 4, 0, 0, 0)
  with pytest.raises(ValueError, match="batch_size"):
    wd.epoch_batches(np.arange(3), 0, 0, 0, 0)
  with pytest.raises(ValueError, match="1-D"):
    wd.epoch_batches(np.zeros((2, 2), int), 1, 0, 0, 0)


# --------------------------------------------------------------------------
# Augmentation


def _shifted(image, dy, dx):
  """image translated by (dy, dx) with zero fill: out[r, c] = in[r+dy, c+dx]."""
  h, w, _ = image.shape
  out = np.zeros_like(image)
  rows = slice(max(0, -dy), min(h, h - dy))
  cols = slice(max(0, -dx), min(w, w - dx))
  src_rows = slice(max(0, dy), min(h, h + dy))
  src_cols = slice(max(0, dx), min(w, w + dx))
  out[rows, cols] = image[src_rows, src_cols]
  return out


def test_augment_flip_only():
  x = jax.random.uniform(jax.random.PRNGKey(0), (64, 6, 5, 3)) + 1.0
  out = np.asarray(wd.augment_images(jax.random.PRNGKey(1), x, crop_padding=0))
  x = np.asarray(x)
  flipped = [np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, x)]
  same = [np.array_equal(o, xi) for o, xi in zip(out, x)]
  assert all(f or s for f, s in zip(flipped, same))
  assert 10 < sum(flipped) < 54  # About half of 64.


def test_augment_crop_is_a_zero_padded_shift():
  p = 2
  x = np.asarray(jax.random.uniform(jax.random.PRNGKey(0), (32, 7, 7, 2))) + 1.0
  out = np.asarray(wd.augment_images(
      jax.random.PRNGKey(3), jnp.asarray(x), crop_padding=p, flip=False))
  assert out.shape == x.shape and out.dtype == x.dtype
  shifts = []
  for o, xi in zip(out, x):
    found = [(dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1)
             if np.array_equal(o, _shifted(xi, dy, dx))]
    assert len(found) == 1
    shifts.append(found[0])
  assert len(set(shifts)) > 5  # Per-example offsets, not one for the batch.


def test_augment_jit_and_determinism():
  x = jnp.arange(2 * 8 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 8, 3)
  key = jax.random.PRNGKey(5)
  jitted = jax.jit(wd.augment_images, static_argnames=("crop_padding", "flip"))
  np.testing.assert_array_equal(jitted(key, x), wd.augment_images(key, x))
  np.testing.assert_array_equal(
      wd.augment_images(key, x, crop_padding=0, flip=False), x)


def test_augment_rejects_non_images():
  with pytest.raises(ValueError, match="NHWC"):
    wd.augment_images(jax.random.PRNGKey(0), jnp.zeros((4, 40, 1)))
  with pytest.raises(ValueError, match="crop_padding"):
    wd.augment_images(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)), -1)


def test_processes_building_one_data_dir_at_once_all_succeed(tmp_path):
  """The processes of a multi-process run (or two runs) start on an empty
  data dir together: one builds, the others wait for it and read the same data."""
  import subprocess
  import sys
  code = ("import sys, numpy as np; from wsjax.data import load_dataset; "
          "ds = load_dataset('digits', sys.argv[1]); "
          "print(len(ds.y_train), float(np.asarray(ds.x_train).sum()))")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(3)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  assert len({out.strip().splitlines()[-1] for out, _ in outs}) == 1  # tfds also prints
