"""tfds builders for the datasets wsjax prepares locally: `mnist1d`, `digits`,
and `fashion_mnist` from its original IDX files.

Importing this module registers `mnist1d` and `digits` with
tensorflow-datasets, so `tfds.data_source('mnist1d', data_dir=...)` and
`tfds.builder('digits', ...)` find them by name. `FashionMnistFromIdx` is not
registered: it is tfds' own `fashion_mnist` builder with only its source of
examples replaced (local IDX files instead of a download), so what it writes
is read back by tfds' registered `fashion_mnist` builder. All three are
prepared from local sources only (no download, no TensorFlow) by tfds' own
pipeline: the examples are numpy arrays and PIL images (which tfds
PNG-encodes with PIL), serialized as `tf.train.Example` protos by tfds'
bundled protobuf definitions, and written as array_record files in the
standard tfds layout
(`<data_dir>/<name>[/<config>]/<version>/<name>-<split>.array_record-*` next
to `dataset_info.json` and `features.json`):

  builder = Mnist1d(data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare(download_config=LOCAL_DOWNLOAD_CONFIG)
  train = builder.as_data_source(split='train')   # random access by index

`Mnist1d` and `Digits` set `disable_shuffling=True`, so record `i` of a split
is the `i`-th example the generator yields. `FashionMnistFromIdx` keeps tfds'
setting for `fashion_mnist` (shuffled: records sorted by an md5 hash of their
keys, salted with the split name) and tfds' keys, so its records come in the
same order as those of `tfds build fashion_mnist`.

This module also silences tfds' "OpenCV is not installed" warning (see
`OpenCvWarningFilter`).
"""
from __future__ import annotations

import dataclasses
import gzip
import inspect
import logging
import os
import random
import zlib

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.image_classification import mnist as tfds_mnist

# Preparation never looks for a pre-built copy on Google Cloud Storage.
LOCAL_DOWNLOAD_CONFIG = tfds.download.DownloadConfig(try_download_gcs=False)

# digits split: a permutation of the 1,797 examples drawn with
# `np.random.default_rng(DIGITS_SPLIT_SEED)`; its last DIGITS_NUM_TEST entries
# are the test split, the others the train split, each in permutation order.
DIGITS_SPLIT_SEED = 0
DIGITS_NUM_TEST = 360


def digits_split() -> tuple[np.ndarray, np.ndarray]:
  """Indices into `sklearn.datasets.load_digits()` of the (train, test) splits.

  A permutation of range(1797) from `np.random.default_rng(0)`; train is its
  first 1,437 entries, test its last 360, both in permutation order (the order
  of the records in the prepared splits).
  """
  from sklearn.datasets import load_digits
  n = len(load_digits().target)
  perm = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(n)
  return perm[:-DIGITS_NUM_TEST], perm[-DIGITS_NUM_TEST:]


def _code_path(cls) -> epath.Path:
  """The file that defines builder `cls`: tfds' own fallback for `code_path`.

  tfds 4.9.x computes `code_path` of a builder defined inside a package through
  `importlib_resources`, which it does not install on Python >= 3.9
  (tensorflow/datasets#11212); the builders here override it with the
  `inspect.getfile` path that tfds falls back to.
  """
  return epath.Path(inspect.getfile(cls))


@dataclasses.dataclass(kw_only=True)
class Mnist1dConfig(tfds.core.BuilderConfig):
  """A `mnist1d` configuration: the package's canonical arguments except
  `num_samples` (the total of train and test examples; 80% are train)."""
  num_samples: int = 5000


class Mnist1d(tfds.core.GeneratorBasedBuilder):
  """MNIST-1D (Greydanus & Kobak, 2020): 1-D signals of 40 points in 10 classes.

  Generated with the `mnist1d` package's own generator,
  `mnist1d.data.make_dataset(get_dataset_args())` with the canonical arguments
  (seed 42, 40-point signals, 80/20 train/test split), only `num_samples`
  changing by config:

    default: num_samples=5000  -> 4,000 train / 1,000 test (the benchmark)
    large:   num_samples=50000 -> 40,000 train / 10,000 test

  Records keep the generator's order: record i of `train` is `x[i], y[i]`, of
  `test` is `x_test[i], y_test[i]`. `x` is float32 (40,) as standardized by the
  generator (mean 0, std 1 over all examples), `label` the class index. The
  generator reseeds the global `random` and `numpy.random` state; the builder
  restores both afterwards.
  """

  name = "mnist1d"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Generated with mnist1d.data.make_dataset."}
  BUILDER_CONFIGS = [
      Mnist1dConfig(
          name="default", num_samples=5000,
          description="Canonical MNIST-1D: 4,000 train / 1,000 test."),
      Mnist1dConfig(
          name="large", num_samples=50000,
          description="MNIST-1D with num_samples=50000: 40,000 train / "
          "10,000 test."),
  ]

  code_path = tfds.core.utils.classproperty(classmethod(_code_path))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "x": tfds.features.Tensor(shape=(40,), dtype=np.float32),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("x", "label"),
        disable_shuffling=True,
        homepage="https://github.com/greydanus/mnist1d",
        citation=(
            "@article{greydanus2020scaling, title={Scaling down deep "
            "learning}, author={Greydanus, Sam and Kobak, Dmitry}, "
            "journal={arXiv preprint arXiv:2011.14439}, year={2020}}"),
    )

  def dataset_args(self):
    """The arguments passed to `make_dataset`: canonical but `num_samples`."""
    from mnist1d.data import get_dataset_args
    args = get_dataset_args()
    args.num_samples = self.builder_config.num_samples
    return args

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    from mnist1d.data import make_dataset
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
      data = make_dataset(self.dataset_args())
    finally:
      random.setstate(py_state)
      np.random.set_state(np_state)
    return {
        "train": self._generate_examples(data["x"], data["y"]),
        "test": self._generate_examples(data["x_test"], data["y_test"]),
    }

  def _generate_examples(self, x, y):
    x = np.asarray(x, np.float32)
    for i, (xi, yi) in enumerate(zip(x, y)):
      yield i, {"x": xi, "label": int(yi)}


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits (UCI optdigits test set), 10 classes.

  Read from the copy bundled with scikit-learn (`sklearn.datasets.load_digits`,
  no download): 1,797 grayscale images `image` of shape (8, 8, 1), uint8 pixel
  values 0..16 (stored as PNG), and `label` the digit. The split is fixed by
  `digits_split()`: a permutation of the 1,797 examples from
  `np.random.default_rng(0)`; the last 360 are `test`, the first 1,437
  `train`, records in permutation order.
  """

  name = "digits"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "From sklearn.datasets.load_digits; seed-0 split."}

  code_path = tfds.core.utils.classproperty(classmethod(_code_path))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = digits.images.astype(np.uint8)  # Integral values 0..16.
    train, test = digits_split()
    return {
        "train": self._generate_examples(images[train], digits.target[train]),
        "test": self._generate_examples(images[test], digits.target[test]),
    }

  def _generate_examples(self, images, labels):
    from PIL import Image
    for i, (image, label) in enumerate(zip(images, labels)):
      # A PIL image is PNG-encoded by PIL; a numpy one would need TensorFlow.
      yield i, {"image": Image.fromarray(image), "label": int(label)}


# --------------------------------------------------------------------------
# IDX files (the format of MNIST and Fashion-MNIST)

# IDX type code (third byte of the magic number) -> big-endian numpy dtype.
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4",
              0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """The array stored in IDX file `path` (gzip-compressed if it ends in .gz).

  The IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/, the format
  of the MNIST and Fashion-MNIST files): a 4-byte magic number `0x00 0x00 T
  D` (T the element type, a key of `IDX_DTYPES`; D the number of dimensions),
  then D big-endian uint32 sizes, then the prod(sizes) elements, big-endian,
  in C order. The file must hold exactly that many bytes.

  Returns the array in native byte order. Raises ValueError (one line naming
  the file) if the file is not readable, not IDX, or truncated or too long.
  """
  path = os.fspath(path)
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise ValueError(f"cannot read IDX file {path}: {e}") from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
    raise ValueError(
        f"{path} is not an IDX file: its magic number is {data[:4].hex()}, "
        f"not 0000TTDD with a known type TT")
  dtype, ndim = np.dtype(IDX_DTYPES[data[2]]), data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise ValueError(f"IDX file {path} ends inside its header")
  shape = tuple(int(n) for n in np.frombuffer(data, ">u4", ndim, offset=4))
  size = header + int(np.prod(shape)) * dtype.itemsize
  if len(data) != size:
    raise ValueError(
        f"IDX file {path} has {len(data)} bytes but its header (shape "
        f"{shape}, dtype {dtype}) makes {size}: truncated or corrupted")
  array = np.frombuffer(data, dtype, offset=header).reshape(shape)
  return array.astype(dtype.newbyteorder("="))


# --------------------------------------------------------------------------
# Fashion-MNIST from its original files

# The four original files (https://github.com/zalandoresearch/fashion-mnist),
# per split: (images, labels). Each may be gzip-compressed (`<name>.gz`, as
# distributed) or not (`<name>`).
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx_file(directory: str | os.PathLike, name: str) -> str | None:
  """`directory/name.gz`, else `directory/name`, else None."""
  for candidate in (f"{name}.gz", name):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  return None


def missing_fashion_mnist_files(directory: str | os.PathLike) -> list[str]:
  """The names (`<name>.gz`) of the four Fashion-MNIST files not in `directory`."""
  return [f"{name}.gz" for pair in FASHION_MNIST_FILES.values() for name in pair
          if _find_idx_file(directory, name) is None]


def read_fashion_mnist_split(
    directory: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The (images, labels) of `split` ('train' or 'test') from the IDX files.

  images: uint8 (N, 28, 28); labels: uint8 (N,) in 0..9. N is the count in the
  files' headers (60,000 train and 10,000 test in the real dataset; any N is
  accepted, so small files in the same format work too). Raises ValueError if
  a file is missing or malformed, or the two files disagree.
  """
  images_name, labels_name = FASHION_MNIST_FILES[split]
  paths = [_find_idx_file(directory, name) for name in (images_name, labels_name)]
  if None in paths:
    raise ValueError(
        f"Fashion-MNIST files missing in {directory}: "
        f"{', '.join(missing_fashion_mnist_files(directory))}")
  images, labels = read_idx(paths[0]), read_idx(paths[1])
  if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
    raise ValueError(
        f"{paths[0]} holds {images.dtype} {images.shape}, not uint8 images "
        f"(N, 28, 28)")
  if labels.dtype != np.uint8 or labels.shape != images.shape[:1]:
    raise ValueError(
        f"{paths[1]} holds {labels.dtype} {labels.shape}, not uint8 labels "
        f"({len(images)},) to match {paths[0]}")
  if labels.size and labels.max() >= 10:
    raise ValueError(f"{paths[1]} has label {labels.max()}; classes are 0..9")
  return images, labels


class FashionMnistFromIdx(tfds_mnist.FashionMNIST, skip_registration=True):
  """tfds' own `fashion_mnist` builder, prepared from local IDX files.

  Fashion-MNIST (Xiao, Rasul & Vollgraf, 2017, arXiv:1708.07747): 28x28
  grayscale images of 10 kinds of clothing, 60,000 train / 10,000 test. tfds'
  builder (`tensorflow_datasets.image_classification.mnist.FashionMNIST`)
  downloads the four original IDX files and encodes its numpy images to PNG
  with TensorFlow. This subclass keeps everything of it that decides the
  prepared dataset (name, version 3.0.1, `_info`: features `image`
  Image((28, 28, 1), uint8, PNG) and `label` ClassLabel with the 10 class
  names, supervised keys, no `disable_shuffling`) and replaces only where
  the examples come from: the IDX files in `source_dir` (see
  `FASHION_MNIST_FILES`; Debian's `dataset-fashion-mnist` installs them in
  /usr/share/datasets/fashion-mnist/), read with `read_idx` and handed to
  tfds as PIL images, which tfds PNG-encodes with PIL, without TensorFlow.
  Split sizes are those in the files' headers.

  Like tfds' generator, example `i` of a split (the `i`-th image and label of
  its files) has key `i`, so records are written in tfds' order (sorted by
  the split-salted md5 of the key). A data dir prepared this way reads like
  one prepared by `tfds build fashion_mnist`: the same path
  (`fashion_mnist/3.0.1/`), `features.json` and label names, the same
  `dataset_info.json` fields that describe the data (name, version,
  description, citation, homepage, module name, supervised keys, split
  names and sizes), the same record order and decoded values. What may
  differ: the PNG bytes (PIL's encoder, not TensorFlow's), hence the splits'
  byte counts, and the download size (not recorded: nothing is downloaded).

  Preparing never downloads: pass `download_config=LOCAL_DOWNLOAD_CONFIG`
  to `download_and_prepare` so tfds does not look for a copy on GCS either.
  """

  name = "fashion_mnist"

  code_path = tfds.core.utils.classproperty(classmethod(_code_path))

  def __init__(self, *, source_dir: str | os.PathLike, **kwargs):
    self.source_dir = os.fspath(source_dir)
    # Recorded in dataset_info.json as `moduleName`: that of tfds' builder,
    # as tfds' read-only builder does (`tfds.builder_from_directory`).
    self.__module__ = tfds_mnist.FashionMNIST.__module__
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing is downloaded.
    return {split: self._generate_examples(split) for split in FASHION_MNIST_FILES}

  def _generate_examples(self, split):
    from PIL import Image
    images, labels = read_fashion_mnist_split(self.source_dir, split)
    for i, (image, label) in enumerate(zip(images, labels)):
      # A PIL image is PNG-encoded by PIL; a numpy one would need TensorFlow.
      yield i, {"image": Image.fromarray(image), "label": int(label)}


# --------------------------------------------------------------------------
# tfds' "OpenCV is not installed" warning


class OpenCvWarningFilter(logging.Filter):
  """Drops tfds' warning that OpenCV is not installed, and nothing else.

  `tfds.features.Image.decode_example_np` (tfds 4.9.x,
  `core/features/image_feature.py`) decodes a PNG with OpenCV when `cv2` is
  importable and otherwise with PIL, and in that case logs once per process,
  through absl's logger, "OpenCV is not installed. We recommend using OpenCV
  because it is faster according to our benchmarks. Defaulting to PIL to
  decode images...". wsjax decodes with PIL on purpose (small images, read
  once into memory; no OpenCV dependency), so the warning is noise.
  """

  MESSAGE_PREFIX = "OpenCV is not installed. We recommend using OpenCV"

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno == logging.WARNING
                and record.getMessage().startswith(self.MESSAGE_PREFIX))


def silence_opencv_warning() -> None:
  """Adds an `OpenCvWarningFilter` to absl's logger (once)."""
  from absl import logging as absl_logging
  logger = absl_logging.get_absl_logger()
  if not any(isinstance(f, OpenCvWarningFilter) for f in logger.filters):
    logger.addFilter(OpenCvWarningFilter())


silence_opencv_warning()
