"""Tests of building `fashion_mnist` offline from its original IDX files.

Small IDX files in the real format (written here with struct + gzip, not with
the reader under test) stand in for the real ones; the real files (Debian's
`dataset-fashion-mnist`) are checked too when installed. The datasets are
prepared for real, by tfds, in temporary data dirs.
"""
import gzip
import json
import logging
import os
import pathlib
import shutil
import socket
import struct
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import hashing
from tensorflow_datasets.image_classification import mnist as tfds_mnist

import wsjax.data as wd
from wsjax.data import builders, datasets

N_TRAIN, N_TEST = 50, 20
SYSTEM_DIR = pathlib.Path(datasets.FASHION_MNIST_SYSTEM_DIR)
IDX_NAMES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def _idx_bytes(array, type_code):
  """`array` in the IDX format: magic 00 00 type ndim, big-endian sizes, data."""
  big_endian = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4",
                0x0D: ">f4", 0x0E: ">f8"}[type_code]
  header = bytes([0, 0, type_code, array.ndim])
  header += b"".join(struct.pack(">I", n) for n in array.shape)
  return header + np.ascontiguousarray(array, big_endian).tobytes()


def _write_gz(path, data):
  with gzip.open(path, "wb") as f:
    f.write(data)


def _fake_split(n, seed):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, size=n).astype(np.uint8)
  return images, labels


def _write_fashion_mnist(directory, splits):
  """Writes {'train': (images, labels), 'test': ...} as the four IDX .gz files."""
  os.makedirs(directory, exist_ok=True)
  for split, (images, labels) in splits.items():
    prefix = "train" if split == "train" else "t10k"
    _write_gz(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz"),
              _idx_bytes(images, 0x08))
    _write_gz(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz"),
              _idx_bytes(labels, 0x08))


def _tfds_order(split, n):
  """Example indices in tfds' record order: ascending md5(split salt, key)."""
  hasher = hashing.Hasher(split)
  return np.array(sorted(range(n), key=hasher.hash_key))


def _records(data_dir, split, indices=None):
  """(images uint8 (N, 28, 28, 1), labels) of records `indices` (default: all)
  of a prepared split, read with tfds (not load_dataset)."""
  source = tfds.data_source("fashion_mnist", data_dir=data_dir, download=False)[split]
  if indices is None:
    indices = range(len(source))
  records = source.__getitems__(list(indices))
  return (np.stack([r["image"] for r in records]),
          np.array([r["label"] for r in records]))


def _pixels(ds_x):
  """Undoes the normalization of `load_dataset`: uint8 pixel values."""
  mean, std = datasets.IMAGE_STATS["fashion_mnist"]
  pixels = np.rint((ds_x * np.float32(std) + np.float32(mean)) * 255)
  assert pixels.min() >= 0 and pixels.max() <= 255
  return pixels.astype(np.uint8)


@pytest.fixture(scope="module")
def fake_splits():
  return {"train": _fake_split(N_TRAIN, 0), "test": _fake_split(N_TEST, 1)}


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory, fake_splits):
  directory = str(tmp_path_factory.mktemp("fashion_mnist_idx"))
  _write_fashion_mnist(directory, fake_splits)
  return directory


@pytest.fixture(scope="module")
def built(tmp_path_factory, idx_dir):
  """fashion_mnist built by load_dataset from `idx_dir` into a fresh data dir,
  with every network connection refused (and recorded)."""
  data_dir = str(tmp_path_factory.mktemp("tfds_fashion"))
  attempts = []

  def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError("network access in a test")

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket, "getaddrinfo", refuse)
    ds = wd.load_dataset("fashion_mnist", data_dir, source_dir=idx_dir)
  return ds, data_dir, attempts


# --------------------------------------------------------------------------
# IDX reading


@pytest.mark.parametrize("array, type_code", [
    (np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4), 0x08),
    (np.array([-3, 0, 7], np.int8), 0x09),
    (np.array([[-300, 2], [1, 32000]], np.int16), 0x0B),
    (np.array([-(2**31), 2**31 - 1, 5], np.int32), 0x0C),
    (np.array([[1.5, -2.25]], np.float32), 0x0D),
    (np.array([np.pi], np.float64), 0x0E),
])
@pytest.mark.parametrize("compressed", [True, False])
def test_read_idx(tmp_path, array, type_code, compressed):
  data = _idx_bytes(array, type_code)
  path = tmp_path / ("a.idx.gz" if compressed else "a.idx")
  if compressed:
    _write_gz(path, data)
  else:
    path.write_bytes(data)
  out = builders.read_idx(path)
  assert out.dtype == array.dtype and out.dtype.isnative
  np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("data, match", [
    (b"\x00\x01\x08\x01" + struct.pack(">I", 1) + b"\x05", "magic number"),
    (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x05", "magic number"),
    (b"\x00\x00", "magic number"),
    (b"\x00\x00\x08\x02" + struct.pack(">I", 3), "header"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"\x01\x02", "truncated"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x01\x02", "truncated"),
])
def test_read_idx_rejects_malformed_files(tmp_path, data, match):
  path = tmp_path / "bad.gz"
  _write_gz(path, data)
  with pytest.raises(ValueError, match=match) as err:
    builders.read_idx(path)
  assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_read_idx_rejects_a_broken_gzip_file(tmp_path):
  path = tmp_path / "labels.gz"
  path.write_bytes(b"not gzip at all")
  with pytest.raises(ValueError, match="cannot read IDX file"):
    builders.read_idx(path)


def test_read_split_checks_the_files_agree(tmp_path):
  images, labels = _fake_split(6, 3)
  _write_fashion_mnist(tmp_path, {"train": (images, labels[:5])})
  with pytest.raises(ValueError, match="labels"):
    builders.read_fashion_mnist_split(tmp_path, "train")
  _write_fashion_mnist(tmp_path, {"train": (images, labels + 10)})
  with pytest.raises(ValueError, match="label 1[0-9]"):
    builders.read_fashion_mnist_split(tmp_path, "train")
  _write_fashion_mnist(tmp_path, {"train": (images[:, :27], labels)})
  with pytest.raises(ValueError, match="28, 28"):
    builders.read_fashion_mnist_split(tmp_path, "train")
  # Uncompressed files are found as well.
  _write_fashion_mnist(tmp_path, {"train": (images, labels)})
  for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"]:
    gz = tmp_path / f"{name}.gz"
    (tmp_path / name).write_bytes(gzip.decompress(gz.read_bytes()))
    gz.unlink()
  got_images, got_labels = builders.read_fashion_mnist_split(tmp_path, "train")
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)


# --------------------------------------------------------------------------
# Building from (small) IDX files


def test_built_splits_and_dtypes(built, fake_splits):
  ds, _, _ = built
  assert ds.name == "fashion_mnist" and ds.num_classes == 10
  assert ds.x_train.shape == (N_TRAIN, 28, 28, 1)
  assert ds.x_test.shape == (N_TEST, 28, 28, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  for y, split in [(ds.y_train, "train"), (ds.y_test, "test")]:
    labels = fake_splits[split][1]
    np.testing.assert_array_equal(
        np.bincount(y, minlength=10), np.bincount(labels, minlength=10))


def test_built_examples_equal_the_idx_files(built, fake_splits):
  ds, data_dir, _ = built
  for split, x, y in [("train", ds.x_train, ds.y_train),
                      ("test", ds.x_test, ds.y_test)]:
    images, labels = fake_splits[split]
    stored_images, stored_labels = _records(data_dir, split)
    assert stored_images.dtype == np.uint8
    assert stored_images.shape == (len(images), 28, 28, 1)
    # As multisets of (image bytes, label) ...
    assert sorted(zip([i.tobytes() for i in stored_images], stored_labels)) \
        == sorted(zip([i.tobytes() for i in images], labels))
    # ... and by key: record j is example order[j], in tfds' shuffled order.
    order = _tfds_order(split, len(images))
    assert not np.array_equal(order, np.arange(len(images)))
    np.testing.assert_array_equal(stored_images[..., 0], images[order])
    np.testing.assert_array_equal(stored_labels, labels[order])
    # load_dataset reads the records in that order and normalizes them.
    np.testing.assert_array_equal(_pixels(x)[..., 0], images[order])
    np.testing.assert_array_equal(y, labels[order])
    mean, std = datasets.IMAGE_STATS["fashion_mnist"]
    np.testing.assert_allclose(
        x[..., 0], (images[order] / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)


def test_built_dataset_is_tfds_fashion_mnist(built, tmp_path):
  _, data_dir, _ = built
  builder = tfds.builder("fashion_mnist", data_dir=data_dir)
  assert type(builder) is tfds_mnist.FashionMNIST  # tfds' registered builder.
  assert builder.is_prepared()
  assert builder.info.file_format.value == "array_record"
  assert builder.info.splits["train"].num_examples == N_TRAIN
  assert builder.info.splits["test"].num_examples == N_TEST
  reference = tfds.builder("fashion_mnist", data_dir=str(tmp_path))  # Unprepared.
  assert not reference.is_prepared()
  assert str(builder.version) == str(reference.version) == "3.0.1"
  assert builder.data_path == pathlib.Path(data_dir, "fashion_mnist", "3.0.1")
  assert repr(builder.info.features) == repr(reference.info.features)
  assert builder.info.features.to_json() == reference.info.features.to_json()
  assert builder.info.features["label"].names \
      == reference.info.features["label"].names
  assert builder.info.features["label"].names[9] == "Ankle boot"
  built_proto, reference_proto = builder.info.as_proto, reference.info.as_proto
  for field in ["name", "version", "description", "citation", "module_name",
                "supervised_keys", "location", "disable_shuffling"]:
    assert getattr(built_proto, field) == getattr(reference_proto, field), field


def test_build_is_offline_and_without_tensorflow(built):
  _, _, attempts = built
  assert attempts == []
  assert "tensorflow" not in sys.modules


def test_second_load_does_not_rebuild(built, tmp_path):
  ds, data_dir, _ = built
  files = sorted(pathlib.Path(data_dir).rglob("*"))
  stamps = [(f, f.stat().st_ino, f.stat().st_mtime_ns) for f in files]
  # Another path to the same data dir: not served by load_dataset's cache.
  # The source directory does not exist, so a rebuild would fail.
  alias = tmp_path / "alias"
  alias.symlink_to(data_dir)
  again = wd.load_dataset("fashion_mnist", alias, source_dir=tmp_path / "none")
  assert again is not ds
  np.testing.assert_array_equal(again.x_train, ds.x_train)
  np.testing.assert_array_equal(again.y_test, ds.y_test)
  assert sorted(pathlib.Path(data_dir).rglob("*")) == files
  assert [(f, f.stat().st_ino, f.stat().st_mtime_ns) for f in files] == stamps
  assert wd.load_dataset("fashion_mnist", data_dir) is ds  # Cached.


def test_files_found_through_environment(idx_dir, fake_splits, tmp_path,
                                         monkeypatch):
  monkeypatch.setenv(datasets.FASHION_MNIST_DIR_ENV, idx_dir)
  ds = wd.load_dataset("fashion_mnist", tmp_path / "data")
  np.testing.assert_array_equal(
      np.sort(ds.y_test), np.sort(fake_splits["test"][1]))
  assert len(ds.y_train) == N_TRAIN


def test_source_directory_search_order(idx_dir, tmp_path, monkeypatch):
  empty = tmp_path / "empty"
  empty.mkdir()
  monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", idx_dir)
  monkeypatch.delenv(datasets.FASHION_MNIST_DIR_ENV, raising=False)
  assert datasets.fashion_mnist_source_dir() == idx_dir  # The system dir.
  monkeypatch.setenv(datasets.FASHION_MNIST_DIR_ENV, str(empty))
  with pytest.raises(wd.DatasetNotPreparedError, match="WSJAX_FASHION_MNIST_DIR"):
    datasets.fashion_mnist_source_dir()  # The variable wins over the system.
  assert datasets.fashion_mnist_source_dir(idx_dir) == idx_dir  # The argument.
  monkeypatch.setenv(datasets.FASHION_MNIST_DIR_ENV, idx_dir)
  with pytest.raises(wd.DatasetNotPreparedError, match="source directory"):
    datasets.fashion_mnist_source_dir(empty)


def test_missing_files_error(tmp_path, monkeypatch):
  data_dir = tmp_path / "data"
  monkeypatch.delenv(datasets.FASHION_MNIST_DIR_ENV, raising=False)
  monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR",
                      str(tmp_path / "no-such-dir"))
  with pytest.raises(wd.DatasetNotPreparedError) as err:
    wd.load_dataset("fashion_mnist", data_dir)
  message = str(err.value)
  assert isinstance(err.value, ValueError) and "\n" not in message
  assert "apt-get install dataset-fashion-mnist" in message
  assert str(tmp_path / "no-such-dir") in message and str(data_dir) in message
  assert "https://github.com/zalandoresearch/fashion-mnist" in message
  assert "--fashion_mnist_dir" in message and "$WSJAX_FASHION_MNIST_DIR" in message
  assert all(name in message for name in IDX_NAMES)
  assert "tfds build fashion_mnist" in message
  assert not list(tmp_path.rglob("*.array_record*"))


def test_incomplete_source_directory_names_missing_files(
    idx_dir, tmp_path):
  partial = tmp_path / "partial"
  partial.mkdir()
  for name in IDX_NAMES[:3]:
    (partial / name).write_bytes((pathlib.Path(idx_dir) / name).read_bytes())
  with pytest.raises(wd.DatasetNotPreparedError) as err:
    wd.load_dataset("fashion_mnist", tmp_path / "data", source_dir=partial)
  message = str(err.value)
  assert f"source directory {partial} lacks {IDX_NAMES[3]};" in message
  assert "apt-get install dataset-fashion-mnist" in message
  assert not list(tmp_path.rglob("*.array_record*"))


def test_prepared_in_another_format_is_not_rebuilt(built, tmp_path, idx_dir):
  """fashion_mnist prepared as tfrecord: the catalog error, no build over it."""
  _, data_dir, _ = built
  copy = tmp_path / "tfrecord"
  shutil.copytree(pathlib.Path(data_dir) / "fashion_mnist", copy / "fashion_mnist")
  info_path = copy / "fashion_mnist" / "3.0.1" / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  files = sorted(copy.rglob("*"))
  with pytest.raises(wd.DatasetNotPreparedError, match="array_record") as err:
    wd.load_dataset("fashion_mnist", copy, source_dir=idx_dir)
  assert "\n" not in str(err.value)
  assert sorted(copy.rglob("*")) == files


def test_processes_building_one_data_dir_at_once_all_succeed(idx_dir, tmp_path):
  """Processes sharing an empty data dir: one builds, the others wait and read."""
  code = ("import sys, numpy as np; from wsjax.data import load_dataset; "
          "ds = load_dataset('fashion_mnist', sys.argv[1], source_dir=sys.argv[2]); "
          "print(len(ds.y_train), float(np.asarray(ds.x_train).sum()))")
  procs = [subprocess.Popen(
      [sys.executable, "-c", code, str(tmp_path), idx_dir],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-2000:]
  lines = {out.strip().splitlines()[-1] for out, _ in outs}  # tfds also prints.
  assert len(lines) == 1 and lines.pop().startswith(f"{N_TRAIN} ")


# --------------------------------------------------------------------------
# The real files


@pytest.mark.skipif(
    bool(builders.missing_fashion_mnist_files(SYSTEM_DIR)),
    reason=f"Fashion-MNIST files not installed in {SYSTEM_DIR} "
    "(apt-get install dataset-fashion-mnist)")
def test_build_from_the_real_files(tmp_path, monkeypatch):
  monkeypatch.delenv(datasets.FASHION_MNIST_DIR_ENV, raising=False)
  ds = wd.load_dataset("fashion_mnist", tmp_path)
  assert ds.x_train.shape == (60000, 28, 28, 1)
  assert ds.x_test.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(ds.y_train), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(ds.y_test), [1000] * 10)
  for split, x, y in [("train", ds.x_train, ds.y_train),
                      ("test", ds.x_test, ds.y_test)]:
    images, labels = builders.read_fashion_mnist_split(SYSTEM_DIR, split)
    order = _tfds_order(split, len(labels))
    np.testing.assert_array_equal(y, labels[order])
    np.testing.assert_array_equal(_pixels(x)[..., 0], images[order])
    few = [0, 1, 2, len(order) - 1]
    stored_images, stored_labels = _records(str(tmp_path), split, few)
    np.testing.assert_array_equal(stored_images[..., 0], images[order[few]])
    np.testing.assert_array_equal(stored_labels, labels[order[few]])
  # The usual normalization constants fit the train split.
  assert abs(float(ds.x_train.mean())) < 1e-2
  assert abs(float(ds.x_train.std()) - 1.0) < 1e-2


# --------------------------------------------------------------------------
# tfds' "OpenCV is not installed" warning


def test_opencv_warning_filter_drops_only_that_warning():
  drop = builders.OpenCvWarningFilter()

  def record(level, msg, *args):
    return logging.LogRecord("absl", level, __file__, 1, msg, args, None)

  assert not drop.filter(record(
      logging.WARNING, "OpenCV is not installed. We recommend using OpenCV "
      "because it is faster according to our benchmarks. Defaulting to PIL "
      "to decode images..."))
  assert drop.filter(record(logging.WARNING, "Variant folder %s has no %s",
                            "x", "dataset_info.json"))
  assert drop.filter(record(logging.ERROR, "OpenCV is not installed. We "
                            "recommend using OpenCV, says an error"))
  from absl import logging as absl_logging
  assert sum(isinstance(f, builders.OpenCvWarningFilter)
             for f in absl_logging.get_absl_logger().filters) == 1
  builders.silence_opencv_warning()  # Idempotent.
  assert sum(isinstance(f, builders.OpenCvWarningFilter)
             for f in absl_logging.get_absl_logger().filters) == 1


def _run(code, *args):
  result = subprocess.run([sys.executable, "-c", code, *map(str, args)],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stderr


_DECODE_PNG = (
    "import io, numpy as np, tensorflow_datasets as tfds; from PIL import Image; "
    "buf = io.BytesIO(); Image.fromarray(np.zeros((2, 2), np.uint8)).save(buf, 'PNG'); "
    "tfds.features.Image(shape=(2, 2, 1)).decode_example_np(buf.getvalue()); ")


def test_importing_wsjax_data_silences_the_opencv_warning(data_dir):
  pytest.importorskip("PIL")
  try:
    import cv2  # noqa: F401
    pytest.skip("OpenCV is installed: tfds does not warn")
  except ImportError:
    pass
  # tfds warns when it decodes an image with PIL ...
  assert "OpenCV is not installed" in _run(_DECODE_PNG)
  # ... but not once wsjax.data is imported; other warnings still show.
  stderr = _run(
      "import sys; import wsjax.data; from absl import logging; "
      "wsjax.data.load_dataset('digits', sys.argv[1]); " + _DECODE_PNG +
      "logging.warning('another warning')", data_dir)
  assert "OpenCV" not in stderr
  assert "another warning" in stderr
