"""wsjax data: tfds datasets in memory, arrival schedules, batching, augmentation.

Importing this package registers the local tfds builders `mnist1d` and
`digits` (see `wsjax.data.builders`).
"""
from wsjax.data import builders
from wsjax.data.augment import augment_images
from wsjax.data.batching import epoch_batches, steps_per_epoch
from wsjax.data.datasets import (
    KNOWN_DATASETS,
    Dataset,
    DatasetNotPreparedError,
    UnknownDatasetError,
    load_dataset,
)
from wsjax.data.schedules import Schedule, chunks, make_schedule, online, two_phase

__all__ = [
    "Dataset",
    "load_dataset",
    "DatasetNotPreparedError",
    "UnknownDatasetError",
    "KNOWN_DATASETS",
    "Schedule",
    "two_phase",
    "online",
    "chunks",
    "make_schedule",
    "epoch_batches",
    "steps_per_epoch",
    "augment_images",
]
