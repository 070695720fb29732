"""Image-classification datasets: loading, validation, subsets, augmentation and batching.

Three on-disk formats are auto-detected in a directory:

* ``npz``: ``train-*.npz`` shards (joined in natural order) or ``train.npz``, plus ``test.npz``;
  keys ``x`` (uint8 NHWC, or ``[N, H, W]`` grayscale), ``y`` (int64), optional ``class_names``.
* ``cifar-python``: the official CIFAR-10 (``data_batch_1..5``, ``test_batch``,
  ``batches.meta``) or CIFAR-100 (``train``, ``test``, ``meta``) python batches, or the directory
  that contains ``cifar-10-batches-py/`` or ``cifar-100-python/``. They are pickles, read with an
  unpickler that refuses every global except numpy's array reconstruction.
* ``image-folder``: ``train/<class>/*.png`` (optional) and ``test/<class>/*.png``.

The named datasets ``cifar10``, ``cifar100`` and ``mnist`` live in ``$ADVEDGE_DATA/<name>``
(default ``~/.cache/advedge/<name>``) and are downloaded there, checksum-verified, when missing.

Images are held as uint8 NHWC numpy arrays (:class:`ImageArrays`) and only become float NCHW
tensors in [0, 1] batch by batch (:class:`BatchLoader`), on the training device.

The modules, lowest first: :mod:`~advedge.data.messages` (one-line error messages),
:mod:`~advedge.data.arrays` (the in-memory types and subsets),
:mod:`~advedge.data.formats` (detection, bounds and validation shared by the readers),
:mod:`~advedge.data.npz`, :mod:`~advedge.data.cifar` and :mod:`~advedge.data.image_folder` (one
reader per format), :mod:`~advedge.data.download` (the named datasets' sources and downloads),
:mod:`~advedge.data.loading` (:func:`load_dataset`) and :mod:`~advedge.data.loader` (tensors and
batching; the only module that uses torch, imported where it is used).
"""

from advedge.data.arrays import Dataset, ImageArrays, stratified_subset
from advedge.data.download import (
    NAMED_DATASETS,
    NamedSource,
    ProgressCallback,
    RemoteFile,
    data_dir,
    verify_checksum,
)
from advedge.data.formats import (
    FORMATS,
    IMAGE_EXTENSIONS,
    MAX_ARRAY_ELEMENTS,
    MAX_CLASSES,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
    detect_format,
)
from advedge.data.loader import BatchLoader, augment_batch, to_tensor
from advedge.data.loading import load_dataset

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "MAX_ARRAY_ELEMENTS",
    "MAX_CLASSES",
    "MAX_IMAGE_SIZE",
    "MIN_IMAGE_SIZE",
    "NAMED_DATASETS",
    "BatchLoader",
    "Dataset",
    "ImageArrays",
    "NamedSource",
    "ProgressCallback",
    "RemoteFile",
    "augment_batch",
    "data_dir",
    "detect_format",
    "load_dataset",
    "stratified_subset",
    "to_tensor",
    "verify_checksum",
]
