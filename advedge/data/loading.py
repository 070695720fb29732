"""Loading a dataset: a directory in any of the three formats, or a named dataset from the cache
(downloaded there, checksum-verified and moved into place atomically, when missing).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path

from advedge.data.arrays import Dataset
from advedge.data.cifar import read_cifar_dir
from advedge.data.download import (
    NAMED_DATASETS,
    NamedSource,
    ProgressCallback,
    data_dir,
    download_files,
)
from advedge.data.formats import LOOKED_FOR, assemble, detect_format
from advedge.data.image_folder import read_image_folder
from advedge.data.messages import one_line, read_error
from advedge.data.npz import read_npz_dir
from advedge.errors import DataError, did_you_mean

logger = logging.getLogger(__name__)

#: The dataset folders this process has reported loading (each is reported once, then at debug).
_REPORTED: set[str] = set()

__all__ = ["load_dataset", "load_directory"]


def load_dataset(
    spec: str | os.PathLike[str],
    *,
    download: bool = True,
    progress: ProgressCallback | None = None,
) -> Dataset:
    """Load a dataset from a directory or by name.

    A ``spec`` that is an existing path is loaded from there, whatever its name. Otherwise
    ``cifar10``, ``cifar100`` and ``mnist`` resolve to ``$ADVEDGE_DATA/<name>`` (default
    ``~/.cache/advedge/<name>``); if no dataset is there yet and ``download`` is true, it is
    downloaded from the official source, checksum-verified and moved into place atomically.

    Args:
        spec: A dataset directory, or one of the names in :data:`NAMED_DATASETS`.
        download: Whether a missing named dataset may be downloaded.
        progress: Called as ``progress(bytes_done, bytes_total_or_None)`` while downloading.

    Returns:
        The dataset, validated: both splits non-empty, labels in range, one image shape.

    Raises:
        DataError: if the directory is missing, empty, of unknown format or invalid, or a named
            dataset cannot be downloaded (the message then names the directory to put it in).
    """
    path = Path(spec).expanduser()
    try:
        exists = path.exists()
    except OSError as exc:  # e.g. a parent folder that may not be searched
        raise read_error(exc, path) from None
    if exists:
        return load_directory(path, name=path.resolve().name)
    key = str(spec).strip().lower()
    if key in NAMED_DATASETS:
        return _load_named(key, download=download, progress=progress)
    if os.sep in str(spec) or "/" in str(spec):
        hint = "check the path; give a directory of npz shards, CIFAR batches or class folders"
    else:
        hint = f"not a named dataset either: {did_you_mean(key, NAMED_DATASETS)}"
    raise DataError(f"dataset directory not found: {path}", hint)


def load_directory(path: Path, *, name: str) -> Dataset:
    """Load and validate the dataset in directory ``path``, whatever its format.

    Args:
        path: The dataset directory.
        name: The name the dataset gets.

    Returns:
        The validated dataset.

    Raises:
        DataError: if the directory cannot be read, is of no known format, or is invalid.
    """
    try:
        if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
            raise DataError(
                f"cannot read {path}: permission denied",
                "check the folder's permissions (it needs read and execute: chmod u+rx)",
            )
        fmt = detect_format(path)
        if fmt == "npz":
            train, test = read_npz_dir(path)
        elif fmt == "cifar-python":
            train, test = read_cifar_dir(path)
        else:
            train, test = read_image_folder(path)
    except OSError as exc:  # a file or folder of the dataset that cannot be read
        raise read_error(exc, path) from None
    dataset = assemble(name, path, fmt, train, test)
    key = os.path.realpath(path)
    level = logging.DEBUG if key in _REPORTED else logging.INFO
    _REPORTED.add(key)
    logger.log(
        level,
        "loaded %s from %s (%s): %d train / %d test images, %d classes, shape %s",
        name,
        path,
        fmt,
        0 if dataset.train is None else len(dataset.train),
        len(dataset.test),
        dataset.num_classes,
        dataset.input_shape,
    )
    return dataset


def _load_named(name: str, *, download: bool, progress: ProgressCallback | None) -> Dataset:
    target = data_dir() / name
    if target.is_dir() and any(not p.name.startswith(".") for p in target.iterdir()):
        return load_directory(target, name=name)
    if not download:
        raise DataError(
            f"dataset {name!r} is not in {target}",
            f"allow the download, or put it there as one of: {LOOKED_FOR}",
        )
    return _download_named(name, NAMED_DATASETS[name], target, progress)


def _download_named(
    name: str, source: NamedSource, target: Path, progress: ProgressCallback | None
) -> Dataset:
    """Download, verify and convert into a temporary directory, then rename it onto ``target``."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f".{name}-download-", dir=target.parent))
    except OSError as exc:
        raise DataError(
            f"cannot create the dataset cache {target.parent}: {one_line(exc)}",
            "set ADVEDGE_DATA to a writable directory",
        ) from None
    try:
        raw = workdir / "raw"
        staged = workdir / name
        raw.mkdir()
        staged.mkdir()
        download_files(name, source, raw, target, progress)
        source.converter(raw, staged)
        dataset = load_directory(staged, name=name)
        try:
            os.rename(staged, target)  # atomic; also replaces an empty directory on POSIX
        except OSError:
            if target.is_dir() and not any(target.iterdir()):
                target.rmdir()
                os.rename(staged, target)
            else:
                raise
        logger.info("%s is ready in %s", name, target)
        return dataclasses.replace(dataset, root=target)
    except OSError as exc:
        raise DataError(
            f"could not prepare {name} in {target}: {one_line(exc)}",
            "check that the directory is writable and has space",
        ) from None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
