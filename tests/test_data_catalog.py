"""Tests of load_dataset on tfds catalog datasets, without network or TensorFlow.

A small fake copy of a catalog dataset is prepared in a temporary data dir by
the real tfds builder class (cifar10's, fashion_mnist's: same name, version,
features and on-disk array_record layout), with only its example generator
replaced by a few known images. `load_dataset` then reads it through
`tfds.data_source` as it would read the real one.

(`tfds.testing.mock_data` is not used: in tfds 4.9.10 its mocked data source
does not bind `__getitems__`, the batched read that `load_dataset` uses.)
"""
import json
import pathlib
import shutil
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.image_classification import cifar, mnist

import wsjax.data as wd
from wsjax.data import builders, datasets


def _fake_images(n, shape, seed):
  """n images of `shape` whose channel k is filled with the value v_i + k."""
  values = np.random.default_rng(seed).choice(250, size=n, replace=False)
  images = np.empty((n,) + shape, np.uint8)
  for k in range(shape[-1]):
    images[..., k] = (values + k)[:, None, None]
  labels = np.arange(n) % 10
  return images, labels


def _fake_builder(base, shape):
  """Subclass of catalog builder `base` whose splits are `_fake_images`."""
  with tfds.core.registered.skip_registration():

    class Fake(base):
      name = base.name
      # No checksums file to look up next to this test module.
      code_path = tfds.core.utils.classproperty(classmethod(lambda cls: None))

      def _split_generators(self, dl_manager):
        return {"train": self._fake(12, 0), "test": self._fake(5, 1)}

      def _fake(self, n, seed):
        images, labels = _fake_images(n, shape, seed)
        for i, (image, label) in enumerate(zip(images, labels)):
          # PIL images are PNG-encoded without TensorFlow.
          image = Image.fromarray(image[..., 0] if shape[-1] == 1 else image)
          example = {"image": image, "label": int(label)}
          if "id" in self.info.features:  # cifar10 has an id, mnist not.
            example["id"] = f"{seed}_{i}"
          yield i, example

  return Fake


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory):
  """A data dir with fake cifar10 and fashion_mnist prepared as array_record."""
  data_dir = str(tmp_path_factory.mktemp("catalog"))
  for base, shape in [(cifar.Cifar10, (32, 32, 3)),
                      (mnist.FashionMNIST, (28, 28, 1))]:
    builder = _fake_builder(base, shape)(
        data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(download_config=builders.LOCAL_DOWNLOAD_CONFIG)
  return data_dir


@pytest.mark.parametrize("name, shape", [("cifar10", (32, 32, 3)),
                                         ("fashion_mnist", (28, 28, 1))])
def test_load_catalog_dataset(catalog_dir, name, shape):
  ds = wd.load_dataset(name, catalog_dir)
  assert ds.name == name and ds.num_classes == 10 and ds.input_shape == shape
  assert ds.x_train.shape == (12,) + shape and ds.x_test.shape == (5,) + shape
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  mean, std = datasets.IMAGE_STATS[name]
  for x, y, seed in [(ds.x_train, ds.y_train, 0), (ds.x_test, ds.y_test, 1)]:
    images, labels = _fake_images(len(x), shape, seed)
    # tfds stores catalog records in hashed-key order: match by content.
    pixels = np.rint((x * np.float32(std) + np.float32(mean)) * 255)
    order = np.argsort(pixels[:, 0, 0, 0])
    expected = np.argsort(images[:, 0, 0, 0])
    np.testing.assert_array_equal(pixels[order], images[expected])
    np.testing.assert_array_equal(y[order], labels[expected])
    np.testing.assert_allclose(
        x[order], (images[expected] / 255.0 - np.float32(mean)) / std,
        rtol=1e-5, atol=1e-5)
  assert "tensorflow" not in sys.modules


def test_catalog_dataset_not_prepared(tmp_path):
  data_dir = str(tmp_path / "empty")
  with pytest.raises(wd.DatasetNotPreparedError) as err:
    wd.load_dataset("cifar100", data_dir)
  assert isinstance(err.value, ValueError)
  message = str(err.value)
  assert "\n" not in message
  assert "'cifar100'" in message and data_dir in message
  assert (f"tfds build cifar100 --data_dir={data_dir} "
          "--file_format=array_record") in message
  # Nothing was downloaded or prepared.
  assert not list(pathlib.Path(tmp_path).rglob("*.array_record*"))


def test_catalog_dataset_prepared_as_tfrecord(catalog_dir, tmp_path):
  """A dataset prepared in another format (tfrecord) reads as not prepared."""
  data_dir = tmp_path / "tfrecord"
  shutil.copytree(pathlib.Path(catalog_dir) / "cifar10", data_dir / "cifar10")
  info_path = next((data_dir / "cifar10").glob("*/dataset_info.json"))
  info = json.loads(info_path.read_text())
  assert info["fileFormat"] == "array_record"
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  with pytest.raises(wd.DatasetNotPreparedError, match="array_record"):
    wd.load_dataset("cifar10", str(data_dir))
