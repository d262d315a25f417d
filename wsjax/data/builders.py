"""tfds builders for the datasets wsjax generates locally: `mnist1d`, `digits`.

Importing this module registers both builders with tensorflow-datasets, so
`tfds.data_source('mnist1d', data_dir=...)` and `tfds.builder('digits', ...)`
find them by name. Both are prepared from local sources only (no download, no
TensorFlow) by tfds' own pipeline: the examples are numpy arrays and PIL
images (which tfds PNG-encodes with PIL), serialized as `tf.train.Example`
protos by tfds' bundled protobuf definitions, and written as array_record
files in the standard tfds layout
(`<data_dir>/<name>[/<config>]/<version>/<name>-<split>.array_record-*` next
to `dataset_info.json` and `features.json`):

  builder = Mnist1d(data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare(download_config=LOCAL_DOWNLOAD_CONFIG)
  train = builder.as_data_source(split='train')   # random access by index

Both builders set `disable_shuffling=True`, so record `i` of a split is the
`i`-th example the generator yields (tfds would otherwise reorder records by a
hash of their keys).
"""
from __future__ import annotations

import dataclasses
import inspect
import random

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

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
