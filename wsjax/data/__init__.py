"""wsjax data: tfds datasets in memory, arrival schedules, batching, augmentation.

Importing this package registers the local tfds builders `mnist1d` and
`digits` (see `wsjax.data.builders`); `fashion_mnist` is built from its
original IDX files when they are found (see `wsjax.data.datasets`).
"""
from wsjax.data import builders
from wsjax.data.augment import augment_images
from wsjax.data.batching import epoch_batches, epoch_order, steps_per_epoch
from wsjax.data.datasets import (
    FASHION_MNIST_DIR_ENV,
    KNOWN_DATASETS,
    Dataset,
    DatasetNotPreparedError,
    UnknownDatasetError,
    fashion_mnist_source_dir,
    load_dataset,
)
from wsjax.data.schedules import Schedule, chunks, make_schedule, online, two_phase

__all__ = [
    "builders",
    "Dataset",
    "load_dataset",
    "fashion_mnist_source_dir",
    "FASHION_MNIST_DIR_ENV",
    "DatasetNotPreparedError",
    "UnknownDatasetError",
    "KNOWN_DATASETS",
    "Schedule",
    "two_phase",
    "online",
    "chunks",
    "make_schedule",
    "epoch_batches",
    "epoch_order",
    "steps_per_epoch",
    "augment_images",
]
