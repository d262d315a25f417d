"""In-memory datasets: whole train and test splits as normalized numpy arrays.

`load_dataset(name)` reads every record of both splits of a tfds dataset in
array_record format (`tfds.data_source`, no TensorFlow) into host memory and
normalizes the inputs. The datasets wsjax studies are small enough to live in
memory (CIFAR-10 train is 50,000 x 32 x 32 x 3 float32 = 614 MB); batches are
then gathered by index on device.

Names (`KNOWN_DATASETS`):

  mnist1d        MNIST-1D, 4,000 train / 1,000 test, x (40, 1)   [local]
  mnist1d_large  MNIST-1D large, 40,000 / 10,000, x (40, 1)      [local]
  digits         sklearn digits, 1,437 / 360, x (8, 8, 1)       [local]
  cifar10        50,000 / 10,000, x (32, 32, 3)                 [tfds catalog]
  cifar100       50,000 / 10,000, x (32, 32, 3), fine labels    [tfds catalog]
  svhn_cropped   73,257 / 26,032, x (32, 32, 3)                 [tfds catalog]
  mnist          60,000 / 10,000, x (28, 28, 1)                 [tfds catalog]
  fashion_mnist  60,000 / 10,000, x (28, 28, 1)      [tfds catalog or IDX files]

Local datasets are built by the builders in `wsjax.data.builders` the first
time they are loaded from a data dir (in seconds, with no network) and read
from there afterwards. Catalog datasets must already be prepared in
array_record format in the data dir; otherwise `DatasetNotPreparedError` says
how to prepare them. `fashion_mnist` is the exception: when it is not
prepared in the data dir, it is built there (tfds' own `fashion_mnist`: same
name, version, splits and features, see `builders.FashionMnistFromIdx`) from
the dataset's four original IDX files, found in the first of

  1. the `source_dir` argument of `load_dataset`,
  2. the directory named by $WSJAX_FASHION_MNIST_DIR,
  3. /usr/share/datasets/fashion-mnist/ (Debian's `dataset-fashion-mnist`),

that is given (1, 2) or exists (3). A given directory without the four files
is an error; so is no directory at all.

The data dir is the `data_dir` argument, else the environment variable
`TFDS_DATA_DIR`, else `~/tensorflow_datasets`.

Normalization (x is float32 in every case):

  mnist1d*   as generated: the generator standardizes all signals to mean 0,
             std 1 (over train and test together); kept as is.
  digits     pixel / 16, then (x - DIGITS_MEAN) / DIGITS_STD, the mean and
             std of the train split after the division.
  images     pixel / 255, then (x - mean) / std per channel with the usual
             constants of each dataset (`IMAGE_STATS`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from wsjax.data import builders

# Mean and std of the digits train split after dividing pixels by 16.
DIGITS_MEAN = 0.30544660
DIGITS_STD = 0.37603684

# Per-channel (mean, std) of pixels / 255, the constants in common use.
IMAGE_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn_cropped": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}

# wsjax name -> tfds name (with config) of the local datasets.
_LOCAL = {
    "mnist1d": "mnist1d/default",
    "mnist1d_large": "mnist1d/large",
    "digits": "digits",
}

KNOWN_DATASETS: tuple[str, ...] = tuple(_LOCAL) + tuple(IMAGE_STATS)

# Where `load_dataset` looks for the original Fashion-MNIST files when
# `source_dir` is not given: the directory this variable names, else
# FASHION_MNIST_SYSTEM_DIR (where Debian's `dataset-fashion-mnist` puts them).
FASHION_MNIST_DIR_ENV = "WSJAX_FASHION_MNIST_DIR"
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"


class UnknownDatasetError(ValueError):
  """A dataset name that `load_dataset` does not know."""


class DatasetNotPreparedError(ValueError):
  """A tfds catalog dataset that is not prepared (as array_record) in the data
  dir; `load_dataset` never downloads."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train and test splits of a dataset, in host memory.

  x_train, x_test: float32 inputs, normalized (see the module docstring);
    (N, 40, 1) for MNIST-1D (N, width, channels), (N, H, W, C) for images.
  y_train, y_test: int32 class labels, shape (N,).
  The arrays are read-only: `load_dataset` shares them between callers.
  """
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int

  @property
  def input_shape(self) -> tuple[int, ...]:
    """The shape of one example, e.g. (40, 1) or (32, 32, 3)."""
    return tuple(self.x_train.shape[1:])


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> str:
  """`data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets; absolute."""
  if data_dir is None:
    data_dir = os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *,
                 source_dir: str | os.PathLike | None = None) -> Dataset:
  """Loads dataset `name` (one of `KNOWN_DATASETS`) from `data_dir` into memory.

  Local datasets (mnist1d, mnist1d_large, digits) are prepared in the data dir
  on first use; so is `fashion_mnist`, from its original IDX files in
  `source_dir` (else $WSJAX_FASHION_MNIST_DIR, else
  /usr/share/datasets/fashion-mnist/), when it is not prepared there already
  (see the module docstring). `source_dir` is used for nothing else: it is
  ignored for the other datasets and once `fashion_mnist` is prepared.
  Results are cached per process on (name, resolved data dir), so repeated
  calls return the same `Dataset` object.

  Raises:
    UnknownDatasetError: `name` is not in `KNOWN_DATASETS`.
    DatasetNotPreparedError: a catalog dataset is missing from the data dir
      (for `fashion_mnist`: and its original files were not found).
    ValueError: the original Fashion-MNIST files are malformed.
  """
  if name not in KNOWN_DATASETS:
    raise UnknownDatasetError(
        f"unknown dataset {name!r}; known datasets: "
        f"{', '.join(KNOWN_DATASETS)}")
  data_dir = resolve_data_dir(data_dir)
  try:
    return _load_cached(name, data_dir)
  except DatasetNotPreparedError:
    if name != "fashion_mnist":
      raise
  _prepare_fashion_mnist(data_dir, source_dir)
  return _load_cached(name, data_dir)


@functools.lru_cache(maxsize=None)
def _load_cached(name: str, data_dir: str) -> Dataset:
  if name in _LOCAL:
    splits = _read_local(name, data_dir)
  else:
    splits = _read_catalog(name, data_dir)
  return _make_dataset(name, splits)


def _read_local(name: str, data_dir: str):
  """Prepares local dataset `name` if needed; returns its two data sources."""
  def builder():
    return tfds.builder(_LOCAL[name], data_dir=data_dir, file_format="array_record")
  b = builder()
  if not b.is_prepared():
    with _exclusive(os.path.join(data_dir, f".{name}.build.lock")):
      b = builder()  # another process may have built it while we waited
      if not b.is_prepared():
        b.download_and_prepare(download_config=builders.LOCAL_DOWNLOAD_CONFIG)
  return b.as_data_source(split=["train", "test"])


@contextlib.contextmanager
def _exclusive(lock_path: str):
  """An exclusive lock on a file: processes sharing a data dir (the processes
  of one multi-process run, two runs started together) build a dataset one
  at a time; without it they race on tfds's final rename and one fails."""
  os.makedirs(os.path.dirname(lock_path), exist_ok=True)
  with open(lock_path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _not_prepared(name: str, data_dir: str, builder) -> DatasetNotPreparedError:
  return DatasetNotPreparedError(
      f"dataset {name!r} is not prepared in array_record format in data dir "
      f"{data_dir} (looked for {builder.data_dir}); on a machine with network "
      f"access and tensorflow, run `tfds build {name} --data_dir={data_dir} "
      f"--file_format=array_record` (or build it elsewhere and copy its "
      f"{name}/ folder into the data dir)")


def _read_catalog(name: str, data_dir: str):
  """Data sources of the train and test splits of a prepared catalog dataset."""
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise _not_prepared(name, data_dir, builder)
  try:
    return builder.as_data_source(split=["train", "test"])
  except NotImplementedError as e:  # Prepared, but not as array_record.
    raise _not_prepared(name, data_dir, builder) from e


def fashion_mnist_source_dir(source_dir: str | os.PathLike | None = None,
                             data_dir: str | None = None) -> str:
  """The directory to build `fashion_mnist` from (absolute): `source_dir`,
  else $WSJAX_FASHION_MNIST_DIR, else /usr/share/datasets/fashion-mnist/.

  Raises DatasetNotPreparedError (one line, saying how to get the files) if
  the directory chosen lacks any of the four IDX files; `data_dir` (the data
  dir where the dataset is not prepared) only completes that message.
  """
  if source_dir is not None:
    directory, origin = os.fspath(source_dir), "source directory"
  elif os.environ.get(FASHION_MNIST_DIR_ENV):
    directory = os.environ[FASHION_MNIST_DIR_ENV]
    origin = f"${FASHION_MNIST_DIR_ENV} directory"
  else:
    directory, origin = FASHION_MNIST_SYSTEM_DIR, None
  directory = os.path.abspath(os.path.expanduser(directory))
  missing = builders.missing_fashion_mnist_files(directory)
  if not missing:
    return directory
  if origin is None and not os.path.isdir(directory):
    where = (f"its original IDX files are not in {directory} (and neither "
             f"--fashion_mnist_dir nor ${FASHION_MNIST_DIR_ENV} names another "
             f"directory)")
  else:
    where = (f"the {origin or 'directory'} {directory} lacks "
             f"{', '.join(missing)}")
  data_dir = resolve_data_dir(data_dir)
  raise DatasetNotPreparedError(
      f"dataset 'fashion_mnist' is not prepared in data dir {data_dir} and "
      f"{where}; install them with `apt-get install dataset-fashion-mnist` "
      f"(Debian, Ubuntu), or download the four IDX files "
      f"(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
      f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) from "
      f"{FASHION_MNIST_HOMEPAGE} into a directory and name it with "
      f"--fashion_mnist_dir or ${FASHION_MNIST_DIR_ENV}, or run `tfds build "
      f"fashion_mnist --data_dir={data_dir} --file_format=array_record` on a "
      f"machine with network access and tensorflow")


def _prepare_fashion_mnist(
    data_dir: str, source_dir: str | os.PathLike | None) -> None:
  """Builds `fashion_mnist` in `data_dir` from its IDX files unless prepared.

  Under the same lock as the local datasets, so processes sharing a data dir
  build it once.
  """
  if tfds.builder("fashion_mnist", data_dir=data_dir).is_prepared():
    return  # Prepared, but not as array_record: `_read_catalog` says so.
  directory = fashion_mnist_source_dir(source_dir, data_dir)
  with _exclusive(os.path.join(data_dir, ".fashion_mnist.build.lock")):
    if tfds.builder("fashion_mnist", data_dir=data_dir).is_prepared():
      return  # Another process built it while we waited.
    logging.info("Building fashion_mnist in %s from the IDX files in %s",
                 data_dir, directory)
    builder = builders.FashionMnistFromIdx(
        source_dir=directory, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=builders.LOCAL_DOWNLOAD_CONFIG)


def _read_split(source) -> tuple[np.ndarray, np.ndarray]:
  """All records of one split as (inputs, labels) arrays, in record order."""
  records = source.__getitems__(list(range(len(source))))
  input_key = "x" if "x" in records[0] else "image"
  x = np.stack([r[input_key] for r in records])
  y = np.asarray([r["label"] for r in records], np.int32)
  return x, y


def _normalize(name: str, x: np.ndarray) -> np.ndarray:
  """float32 normalized inputs; MNIST-1D gets a channel axis (N, 40, 1)."""
  if name in ("mnist1d", "mnist1d_large"):
    return x.astype(np.float32)[..., None]
  if name == "digits":
    mean, std, scale = DIGITS_MEAN, DIGITS_STD, 16.0
  else:
    mean, std = IMAGE_STATS[name]
    scale = 255.0
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (x.astype(np.float32) / np.float32(scale) - mean) / std


def _make_dataset(name: str, splits) -> Dataset:
  (x_train, y_train), (x_test, y_test) = map(_read_split, splits)
  num_classes = splits[0].dataset_info.features["label"].num_classes
  arrays = [_normalize(name, x_train), y_train, _normalize(name, x_test), y_test]
  for a in arrays:
    a.flags.writeable = False
  return Dataset(name, *arrays, num_classes=num_classes)
