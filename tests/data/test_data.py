"""Tests for advedge.data: formats, validation, subsets, augmentation, batching, downloads."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import io
import os
import pickle
import socket
import struct
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DistributedSampler

from advedge import data
from advedge.data import (
    NAMED_DATASETS,
    BatchLoader,
    ImageArrays,
    RemoteFile,
    augment_batch,
    detect_format,
    load_dataset,
    stratified_subset,
    to_tensor,
    verify_checksum,
)
from advedge.errors import DataError, UsageError

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
HAS_CIFAR10 = (SHARED_DATA / "cifar10" / "test.npz").is_file()
HAS_MNIST = (SHARED_DATA / "mnist" / "test.npz").is_file()


# --------------------------------------------------------------------------------------------
# Helpers that write small synthetic datasets
# --------------------------------------------------------------------------------------------


def _images(n: int, h: int = 8, w: int = 8, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def _write_npz(path: Path, x: np.ndarray, y: np.ndarray, **extra: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y, **extra)


def _cifar_rows(x_nhwc: np.ndarray) -> np.ndarray:
    """NHWC images -> the official [N, 3*H*W] row-major CHW rows."""
    return x_nhwc.transpose(0, 3, 1, 2).reshape(len(x_nhwc), -1).copy()


def _write_pickle(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=4))


def _write_cifar10(
    folder: Path, train: list[tuple[np.ndarray, np.ndarray]], test: tuple[np.ndarray, np.ndarray]
) -> list[str]:
    names = [f"class{i}" for i in range(10)]
    for k, (x, y) in enumerate(train, start=1):
        batch = {b"batch_label": b"training batch", b"labels": [int(v) for v in y]}
        batch[b"data"] = _cifar_rows(x)
        batch[b"filenames"] = [f"{i}.png".encode() for i in range(len(x))]
        _write_pickle(folder / f"data_batch_{k}", batch)
    x, y = test
    _write_pickle(
        folder / "test_batch",
        {b"batch_label": b"testing batch", b"labels": [int(v) for v in y], b"data": _cifar_rows(x)},
    )
    meta = {b"label_names": [n.encode() for n in names], b"num_cases_per_batch": len(y)}
    _write_pickle(folder / "batches.meta", meta)
    return names


def _py2_pickle_batch(rows: np.ndarray, labels: list[int]) -> bytes:
    """Bytes of {'data': rows, 'labels': labels} as Python 2's cPickle (protocol 2) wrote them.

    The official batches were written this way: byte strings are ``SHORT_BINSTRING``/``BINSTRING``
    and the array reconstructor is ``numpy.core.multiarray._reconstruct``.
    """

    def short(text: bytes) -> bytes:
        return b"U" + bytes([len(text)]) + text

    n, width = rows.shape
    raw = rows.tobytes()
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n"
        + b"cnumpy\nndarray\n"
        + b"K\x00\x85"
        + short(b"b")
        + b"\x87R"
        + b"(K\x01M"
        + struct.pack("<H", n)
        + b"M"
        + struct.pack("<H", width)
        + b"\x86"
        + b"cnumpy\ndtype\n"
        + short(b"u1")
        + b"K\x00K\x01\x87R"
        + b"(K\x03"
        + short(b"|")
        + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
        + b"\x89T"
        + struct.pack("<I", len(raw))
        + raw
        + b"tb"
    )
    label_list = b"](" + b"".join(b"K" + bytes([v]) for v in labels) + b"e"
    return b"\x80\x02}(" + short(b"data") + array + short(b"labels") + label_list + b"u."


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path)


def _idx_gz(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# npz format
# --------------------------------------------------------------------------------------------


def test_npz_shards_join_in_natural_order(tmp_path: Path) -> None:
    root = tmp_path / "shards"
    for k in range(12):  # train-0 .. train-11: lexicographic order would put train-10 second
        _write_npz(root / f"train-{k}.npz", _images(2, seed=k), np.full(2, k % 10, np.int64))
    _write_npz(root / "test.npz", _images(3, seed=99), np.array([0, 1, 2]))
    ds = load_dataset(root)
    assert ds.format == "npz" and ds.name == "shards" and ds.root == root
    assert ds.train is not None and len(ds.train) == 24
    assert ds.train.y.tolist() == [k % 10 for k in range(12) for _ in range(2)]
    np.testing.assert_array_equal(ds.train.x[20:22], _images(2, seed=10))
    assert ds.num_classes == 10 and ds.class_names == tuple(str(i) for i in range(10))
    assert ds.input_shape == (3, 8, 8) and ds.train.x.dtype == np.uint8


def test_npz_single_train_file_with_class_names(tmp_path: Path) -> None:
    names = np.array(["cat", "dog", "frog"])
    x_train, x_test = _images(6, seed=1), _images(4, seed=2)
    _write_npz(tmp_path / "train.npz", x_train, np.array([0, 1, 2, 0, 1, 2]), class_names=names)
    _write_npz(tmp_path / "test.npz", x_test, np.array([2, 2, 1, 0]), class_names=names)
    assert detect_format(tmp_path) == "npz"
    ds = load_dataset(tmp_path)
    assert ds.class_names == ("cat", "dog", "frog") and ds.num_classes == 3
    assert ds.train is not None
    np.testing.assert_array_equal(ds.train.x, x_train)
    np.testing.assert_array_equal(ds.test.x, x_test)
    assert ds.test.y.dtype == np.int64 and ds.test.y.tolist() == [2, 2, 1, 0]


def test_npz_test_split_only_has_no_train(tmp_path: Path) -> None:
    _write_npz(tmp_path / "test.npz", _images(4), np.array([0, 1, 0, 1]))
    ds = load_dataset(tmp_path)
    assert ds.train is None and len(ds.test) == 4 and ds.num_classes == 2


def test_grayscale_npz_gets_one_channel(tmp_path: Path) -> None:
    x = _images(5, 28, 28, 1)[..., 0]
    _write_npz(tmp_path / "train.npz", x, np.arange(5))
    _write_npz(tmp_path / "test.npz", x[:2], np.arange(2))
    ds = load_dataset(tmp_path)
    assert ds.channels == 1 and ds.input_shape == (1, 28, 28)
    assert ds.train is not None and ds.train.x.shape == (5, 28, 28, 1)
    np.testing.assert_array_equal(ds.train.x[..., 0], x)


def test_float_x_in_unit_range_is_rounded_to_uint8(tmp_path: Path) -> None:
    x = np.array([0.0, 0.5, 1.0, 0.2], dtype=np.float32).reshape(1, 2, 2, 1)
    _write_npz(tmp_path / "test.npz", x, np.array([0]))
    ds = load_dataset(tmp_path)
    assert ds.test.x.dtype == np.uint8
    assert ds.test.x.reshape(-1).tolist() == [0, 128, 255, 51]


def test_nan_float_x_is_refused_with_file_and_count(tmp_path: Path) -> None:
    x = np.full((2, 4, 4, 3), 0.5, dtype=np.float32)
    x[0, 0, 0, :] = np.nan
    x[1, 1, 1, 0] = np.inf
    _write_npz(tmp_path / "test.npz", x, np.array([0, 1]))
    with pytest.raises(DataError, match=r"test\.npz: x contains 4 NaN or Inf values"):
        load_dataset(tmp_path)


def test_float_x_outside_unit_range_is_refused(tmp_path: Path) -> None:
    _write_npz(tmp_path / "test.npz", np.full((2, 4, 4, 3), 200.0), np.array([0, 1]))
    with pytest.raises(DataError, match=r"outside \[0, 1\]"):
        load_dataset(tmp_path)


def test_nchw_npz_gets_a_transpose_hint(tmp_path: Path) -> None:
    _write_npz(tmp_path / "test.npz", np.zeros((2, 3, 8, 8), np.uint8), np.array([0, 1]))
    with pytest.raises(DataError, match="NCHW"):
        load_dataset(tmp_path)


# --------------------------------------------------------------------------------------------
# CIFAR python batches
# --------------------------------------------------------------------------------------------


def test_cifar10_python_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    train = [(_images(4, 32, 32, seed=k), np.array([k, 1, 2, 3])) for k in range(1, 3)]
    test = (_images(3, 32, 32, seed=9), np.array([9, 8, 7]))
    names = _write_cifar10(folder, train, test)
    # row-major CHW: pixel (r, c) of channel ch is byte ch*1024 + r*32 + c of the row
    assert _cifar_rows(test[0])[1, 2 * 1024 + 5 * 32 + 7] == test[0][1, 5, 7, 2]
    for root in (folder, tmp_path):  # the batch folder itself, or the folder that contains it
        assert detect_format(root) == "cifar-python"
        ds = load_dataset(root)
        assert ds.format == "cifar-python" and ds.class_names == tuple(names)
        assert ds.train is not None and len(ds.train) == 8 and ds.input_shape == (3, 32, 32)
        np.testing.assert_array_equal(ds.train.x, np.concatenate([train[0][0], train[1][0]]))
        assert ds.train.y.tolist() == [1, 1, 2, 3, 2, 1, 2, 3]
        np.testing.assert_array_equal(ds.test.x, test[0])
        assert ds.test.y.tolist() == [9, 8, 7]


def test_cifar10_batches_written_by_python2_load(tmp_path: Path) -> None:
    x = _images(3, 32, 32, seed=4)
    (tmp_path / "test_batch").write_bytes(_py2_pickle_batch(_cifar_rows(x), [4, 0, 9]))
    (tmp_path / "data_batch_1").write_bytes(_py2_pickle_batch(_cifar_rows(x[::-1]), [9, 0, 4]))
    ds = load_dataset(tmp_path)
    np.testing.assert_array_equal(ds.test.x, x)
    assert ds.train is not None
    np.testing.assert_array_equal(ds.train.x, x[::-1])
    assert ds.test.y.tolist() == [4, 0, 9] and ds.num_classes == 10


def test_cifar100_python_layout_uses_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    x_train, x_test = _images(5, 32, 32, seed=1), _images(2, 32, 32, seed=2)
    fine = [f"fine{i:02d}" for i in range(100)]
    _write_pickle(
        folder / "train",
        {
            b"data": _cifar_rows(x_train),
            b"fine_labels": [99, 0, 5, 42, 7],
            b"coarse_labels": [0] * 5,
        },
    )
    _write_pickle(
        folder / "test",
        {b"data": _cifar_rows(x_test), b"fine_labels": [3, 98], b"coarse_labels": [19, 1]},
    )
    _write_pickle(
        folder / "meta",
        {b"fine_label_names": [n.encode() for n in fine], b"coarse_label_names": [b"c"] * 20},
    )
    ds = load_dataset(tmp_path)
    assert ds.format == "cifar-python" and ds.num_classes == 100 and ds.class_names[42] == "fine42"
    assert ds.train is not None and ds.train.y.tolist() == [99, 0, 5, 42, 7]
    np.testing.assert_array_equal(ds.test.x, x_test)


class _OpenFilePayload:
    """Unpickling this object calls ``open(path, "w")``, which creates the file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    # the payload is live: a plain pickle.loads creates its file
    probe = tmp_path / "probe-created"
    pickle.loads(pickle.dumps(_OpenFilePayload(probe))).close()
    assert probe.exists()

    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar"
    _write_cifar10(folder, [], (_images(2, 32, 32), np.array([0, 1])))
    batch = {b"data": _cifar_rows(_images(2, 32, 32)), b"labels": _OpenFilePayload(marker)}
    _write_pickle(folder / "test_batch", batch)
    with pytest.raises(DataError, match=r"refusing to unpickle .*test_batch.*io\.open"):
        load_dataset(folder)
    assert not marker.exists()


def test_truncated_cifar_batch_is_a_data_error(tmp_path: Path) -> None:
    _write_cifar10(tmp_path, [], (_images(2, 32, 32), np.array([0, 1])))
    blob = (tmp_path / "test_batch").read_bytes()
    (tmp_path / "test_batch").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="cannot read CIFAR batch"):
        load_dataset(tmp_path)


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------


def test_image_folder_rgb(tmp_path: Path) -> None:
    pixels = _images(6, 8, 8, 3, seed=5)
    for i, (split, cls) in enumerate(
        [("train", "dog"), ("train", "cat"), ("train", "dog"), ("test", "cat"), ("test", "dog")]
    ):
        _write_png(tmp_path / split / cls / f"{i}.png", pixels[i])
    assert detect_format(tmp_path) == "image-folder"
    ds = load_dataset(tmp_path)
    assert ds.format == "image-folder" and ds.class_names == ("cat", "dog")
    assert ds.input_shape == (3, 8, 8)
    assert ds.train is not None and ds.train.y.tolist() == [0, 1, 1]  # cat/1, dog/0, dog/2
    np.testing.assert_array_equal(ds.train.x, pixels[[1, 0, 2]])
    np.testing.assert_array_equal(ds.test.x, pixels[[3, 4]])


def test_image_folder_grayscale_keeps_one_channel(tmp_path: Path) -> None:
    pixels = _images(3, 6, 5, 1, seed=6)
    for i in range(3):
        _write_png(tmp_path / "test" / str(i % 2) / f"{i}.png", pixels[i])
    ds = load_dataset(tmp_path)
    assert ds.train is None and ds.channels == 1 and ds.input_shape == (1, 6, 5)
    np.testing.assert_array_equal(ds.test.x, pixels[[0, 2, 1]])


@pytest.mark.parametrize("odd", ["size", "mode"])
def test_image_folder_mismatch_names_the_file(tmp_path: Path, odd: str) -> None:
    _write_png(tmp_path / "test" / "a" / "0.png", _images(1, 8, 8)[0])
    odd_pixels = _images(1, 9, 8)[0] if odd == "size" else _images(1, 8, 8, 1)[0]
    _write_png(tmp_path / "test" / "b" / "odd.png", odd_pixels)
    with pytest.raises(DataError, match=r"odd\.png"):
        load_dataset(tmp_path)


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    _write_png(tmp_path / "test" / "a" / "0.png", _images(1)[0])
    (tmp_path / "test" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match=r"broken\.png"):
        load_dataset(tmp_path)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_missing_directory_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="dataset directory not found") as info:
        load_dataset(missing)
    assert str(missing) in str(info.value)


def test_misspelt_dataset_name_suggests_the_right_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="did you mean 'cifar10'"):
        load_dataset("cifar01")


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty"):
        load_dataset(tmp_path)


def test_unknown_format_lists_what_it_looked_for(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError) as info:
        detect_format(tmp_path)
    message = str(info.value)
    for expected in ("npz", "test.npz", "cifar-python", "data_batch_1", "image-folder"):
        assert expected in message
    assert "\n" not in message


def test_labels_out_of_range_of_class_names(tmp_path: Path) -> None:
    names = np.array(["a", "b", "c"])
    _write_npz(tmp_path / "train.npz", _images(4), np.array([0, 3, 5, 1]), class_names=names)
    _write_npz(tmp_path / "test.npz", _images(2), np.array([0, 1]), class_names=names)
    with pytest.raises(DataError, match=r"train\.npz: 2 labels outside \[0, 3\)"):
        load_dataset(tmp_path)


def test_negative_labels(tmp_path: Path) -> None:
    _write_npz(tmp_path / "test.npz", _images(3), np.array([0, -1, 2]))
    with pytest.raises(DataError, match=r"1 labels outside \[0, 3\)"):
        load_dataset(tmp_path)


def test_train_and_test_shapes_must_match(tmp_path: Path) -> None:
    _write_npz(tmp_path / "train.npz", _images(2, 8, 8), np.array([0, 1]))
    _write_npz(tmp_path / "test.npz", _images(2, 9, 8), np.array([0, 1]))
    with pytest.raises(DataError, match="image shapes differ"):
        load_dataset(tmp_path)


def test_x_and_y_lengths_must_match(tmp_path: Path) -> None:
    _write_npz(tmp_path / "test.npz", _images(3), np.array([0, 1]))
    with pytest.raises(DataError, match="3 images but 2 labels"):
        load_dataset(tmp_path)


def test_test_split_is_required(tmp_path: Path) -> None:
    _write_npz(tmp_path / "train.npz", _images(3), np.array([0, 1, 2]))
    with pytest.raises(DataError, match="no test split"):
        load_dataset(tmp_path)


def test_truncated_npz(tmp_path: Path) -> None:
    _write_npz(tmp_path / "test.npz", _images(50), np.zeros(50, np.int64))
    blob = (tmp_path / "test.npz").read_bytes()
    (tmp_path / "test.npz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"cannot read .*test\.npz"):
        load_dataset(tmp_path)


def test_npz_object_arrays_are_refused_without_pickle(tmp_path: Path) -> None:
    y = np.array([0, 1], dtype=object)
    _write_npz(tmp_path / "test.npz", _images(2), y)
    with pytest.raises(DataError, match="pickle"):
        load_dataset(tmp_path)


# --------------------------------------------------------------------------------------------
# stratified_subset
# --------------------------------------------------------------------------------------------


def _indexed(y: list[int] | np.ndarray) -> ImageArrays:
    """Arrays whose image i holds its own index (in the first two pixels), for tracing."""
    y = np.asarray(y, dtype=np.int64)
    x = np.zeros((len(y), 2, 2, 1), np.uint8)
    x[:, 0, 0, 0] = np.arange(len(y)) % 256
    x[:, 0, 1, 0] = np.arange(len(y)) // 256
    return ImageArrays(x, y, tuple(str(i) for i in range(int(y.max()) + 1)))


def _origin(arrays: ImageArrays) -> np.ndarray:
    return arrays.x[:, 0, 0, 0].astype(np.int64) + 256 * arrays.x[:, 0, 1, 0].astype(np.int64)


def test_stratified_subset_is_deterministic_and_balanced() -> None:
    arrays = _indexed(np.repeat(np.arange(4), [40, 30, 20, 10]))
    a = stratified_subset(arrays, 22, seed=3)
    b = stratified_subset(arrays, 22, seed=3)
    c = stratified_subset(arrays, 22, seed=4)
    np.testing.assert_array_equal(_origin(a), _origin(b))
    assert not np.array_equal(_origin(a), _origin(c))
    counts = np.bincount(a.y, minlength=4)
    assert counts.sum() == 22 and counts.max() - counts.min() <= 1
    origin = _origin(a)
    assert np.all(np.diff(origin) > 0)  # original order, no repeats
    np.testing.assert_array_equal(arrays.y[origin], a.y)


def test_stratified_subset_small_class_gives_all_it_has() -> None:
    arrays = _indexed(np.repeat(np.arange(3), [50, 30, 3]))
    counts = np.bincount(stratified_subset(arrays, 40, seed=0).y, minlength=3)
    assert counts.tolist() in ([19, 18, 3], [18, 19, 3])


def test_stratified_subset_edges() -> None:
    arrays = _indexed([0, 1, 1, 2])
    assert stratified_subset(arrays, 4, seed=0) is arrays
    assert len(stratified_subset(arrays, 100, seed=0)) == 4
    with pytest.raises(UsageError):
        stratified_subset(arrays, 0, seed=0)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 25), min_size=1, max_size=6),
    fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_stratified_subset_property(sizes: list[int], fraction: float, seed: int) -> None:
    arrays = _indexed(np.repeat(np.arange(len(sizes)), sizes))
    n = max(1, round(fraction * len(arrays)))
    sub = stratified_subset(arrays, n, seed)
    origin = _origin(sub)
    assert len(sub) == n and len(np.unique(origin)) == n
    taken = np.bincount(sub.y, minlength=len(sizes))
    unsaturated = taken < np.asarray(sizes)
    assert np.all(taken[unsaturated] >= taken.max() - 1)


# --------------------------------------------------------------------------------------------
# to_tensor and augment_batch
# --------------------------------------------------------------------------------------------


def test_to_tensor_layout_and_scale() -> None:
    x = _images(2, 4, 5, 3)
    t = to_tensor(x)
    assert t.shape == (2, 3, 4, 5) and t.dtype == torch.float32 and t.is_contiguous()
    assert float(t[1, 2, 3, 4]) == pytest.approx(x[1, 3, 4, 2] / 255.0)
    torch.testing.assert_close(to_tensor(torch.from_numpy(x)), t)
    with pytest.raises(UsageError):
        to_tensor(x.astype(np.float32))


def _reference_views(
    image: torch.Tensor, padding: int
) -> Iterator[tuple[int, int, bool, torch.Tensor]]:
    """Every zero-pad-then-crop view of one image, plain and mirrored (the slow reference)."""
    _, h, w = image.shape
    padded = F.pad(image, (padding, padding, padding, padding))
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy : dy + h, dx : dx + w]
            yield dy, dx, False, crop
            yield dy, dx, True, crop.flip(-1)


def test_augment_batch_outputs_are_shifted_flipped_copies() -> None:
    x = torch.rand(48, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = augment_batch(x, padding=3, generator=torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    seen = set()
    for image, result in zip(x, out, strict=True):
        matches = [
            (dy, dx, mirrored)
            for dy, dx, mirrored, view in _reference_views(image, 3)
            if torch.equal(view, result)
        ]
        assert len(matches) == 1, "each output is exactly one crop/flip of its own input"
        seen.add(matches[0])
    assert {m[2] for m in seen} == {False, True}
    assert len({m[:2] for m in seen}) >= 10  # offsets vary per sample
    again = augment_batch(x, padding=3, generator=torch.Generator().manual_seed(1))
    other = augment_batch(x, padding=3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out, again) and not torch.equal(out, other)


def test_augment_batch_zero_pads_the_borders() -> None:
    ones = torch.ones(300, 1, 8, 8)
    out = augment_batch(ones, padding=4, flip=False, generator=torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {0.0, 1.0}
    for image in out[:, 0]:
        rows = image.amax(dim=1).bool()
        cols = image.amax(dim=0).bool()
        kept_rows, kept_cols = int(rows.sum()), int(cols.sum())
        assert kept_rows >= 4 and kept_cols >= 4  # offsets never exceed the padding
        # the ones form one rectangle touching the opposite border of the zeros
        assert int(image.sum()) == kept_rows * kept_cols
        assert rows[0] or rows[-1]
        assert cols[0] or cols[-1]
    assert bool((out[:, 0, 0, :] == 0).all(dim=1).any())  # a zero top row somewhere
    assert bool((out[:, 0, -1, :] == 0).all(dim=1).any())
    assert bool((out[:, 0, :, 0] == 0).all(dim=1).any())
    assert bool((out[:, 0, :, -1] == 0).all(dim=1).any())
    assert bool((out[:, 0] == 1).all(dim=(1, 2)).any())  # and some untouched


def test_augment_batch_identity_and_flip_only() -> None:
    x = torch.rand(16, 3, 8, 8)
    assert torch.equal(augment_batch(x, padding=0, flip=False), x)
    flipped = augment_batch(x, padding=0, flip=True, generator=torch.Generator().manual_seed(0))
    is_flip = [torch.equal(o, i.flip(-1)) for o, i in zip(flipped, x, strict=True)]
    is_same = [torch.equal(o, i) for o, i in zip(flipped, x, strict=True)]
    assert all(a or b for a, b in zip(is_flip, is_same, strict=True))
    assert any(is_flip) and any(is_same)
    with pytest.raises(UsageError):
        augment_batch(x, padding=-1)


# --------------------------------------------------------------------------------------------
# BatchLoader
# --------------------------------------------------------------------------------------------


def _loader_arrays(n: int) -> ImageArrays:
    x = np.zeros((n, 4, 4, 3), np.uint8)
    x[:] = np.arange(n, dtype=np.uint8)[:, None, None, None]
    return ImageArrays(x, np.arange(n, dtype=np.int64) % 5, tuple("abcde"))


def _batch_indices(x: torch.Tensor) -> list[int]:
    return (x[:, 0, 0, 0] * 255).round().long().tolist()


def test_batch_loader_covers_every_example_once_in_order() -> None:
    arrays = _loader_arrays(23)
    loader = BatchLoader(arrays, 5, shuffle=False, augment=False)
    batches = list(loader)
    assert len(loader) == len(batches) == 5
    assert [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    seen = [i for x, _ in batches for i in _batch_indices(x)]
    assert seen == list(range(23))
    x0, y0 = batches[0]
    assert x0.dtype == torch.float32 and y0.dtype == torch.int64 and x0.shape == (5, 3, 4, 4)
    torch.testing.assert_close(x0, to_tensor(arrays.x[:5]))
    assert len(BatchLoader(arrays, 5, shuffle=False, augment=False, drop_last=True)) == 4


def test_batch_loader_shuffle_keeps_labels_with_images_and_set_epoch_changes_order() -> None:
    arrays = _loader_arrays(40)
    loader = BatchLoader(arrays, 8, shuffle=True, augment=False, seed=3)

    def epoch_order(epoch: int) -> list[int]:
        loader.set_epoch(epoch)
        order = []
        for x, y in loader:
            idx = _batch_indices(x)
            assert y.tolist() == [i % 5 for i in idx]
            order += idx
        return order

    first, again, second = epoch_order(0), epoch_order(0), epoch_order(1)
    assert sorted(first) == sorted(second) == list(range(40))
    assert first == again and first != second


def test_batch_loader_ranks_are_disjoint_and_match_distributed_sampler() -> None:
    arrays = _loader_arrays(22)
    shards = []
    for rank in range(2):
        loader = BatchLoader(
            arrays, 4, shuffle=True, augment=False, seed=5, rank=rank, world_size=2
        )
        loader.set_epoch(2)
        shards.append([i for x, _ in loader for i in _batch_indices(x)])
        sampler = DistributedSampler(range(22), num_replicas=2, rank=rank, shuffle=True, seed=5)
        sampler.set_epoch(2)
        assert shards[-1] == list(sampler)
    assert len(shards[0]) == len(shards[1]) == 11
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(22))


def test_batch_loader_pads_uneven_shards_by_wrapping() -> None:
    arrays = _loader_arrays(10)
    shards = [
        BatchLoader(arrays, 2, shuffle=False, augment=False, rank=r, world_size=3)
        .indices()
        .tolist()
        for r in range(3)
    ]
    assert shards == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]
    assert len(BatchLoader(arrays, 3, shuffle=False, augment=False, rank=0, world_size=3)) == 2
    with pytest.raises(UsageError):
        BatchLoader(arrays, 2, shuffle=False, augment=False, rank=3, world_size=3)


def test_batch_loader_augments_reproducibly() -> None:
    arrays = ImageArrays(_images(16, 8, 8), np.arange(16) % 2, ("a", "b"))
    loader = BatchLoader(arrays, 16, shuffle=False, augment=True, seed=1)
    (first, _), (again, _) = next(iter(loader)), next(iter(loader))
    loader.set_epoch(1)
    (other, _) = next(iter(loader))
    plain = to_tensor(arrays.x)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first, plain) and float(first.max()) <= 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batch_loader_on_cuda_matches_cpu() -> None:
    arrays = ImageArrays(_images(20, 8, 8), np.arange(20) % 2, ("a", "b"))
    cpu = list(BatchLoader(arrays, 8, shuffle=True, augment=False, seed=2))
    gpu = list(BatchLoader(arrays, 8, shuffle=True, augment=True, seed=2, device="cuda"))
    assert all(x.is_cuda and y.is_cuda for x, y in gpu)
    plain = list(BatchLoader(arrays, 8, shuffle=True, augment=False, seed=2, device="cuda"))
    for (xc, yc), (xg, yg) in zip(cpu, plain, strict=True):
        assert torch.equal(xc, xg.cpu()) and torch.equal(yc, yg.cpu())


# --------------------------------------------------------------------------------------------
# Named datasets: download from a local HTTP server
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Server:
    root: Path
    url: str
    requests: list[str]


@pytest.fixture
def file_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Server]:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "served"
    root.mkdir()
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield _Server(root, f"http://127.0.0.1:{server.server_address[1]}/", requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("ADVEDGE_DATA", str(path))
    return path


def _cifar10_tarball(tmp_path: Path, server: _Server) -> tuple[Path, dict[str, np.ndarray]]:
    build = tmp_path / "build" / "cifar-10-batches-py"
    arrays = {"train": _images(60, 32, 32, seed=1), "test": _images(30, 32, 32, seed=2)}
    _write_cifar10(
        build,
        [(arrays["train"][:30], np.arange(30) % 10), (arrays["train"][30:], np.arange(30) % 10)],
        (arrays["test"], np.arange(30)[::-1] % 10),
    )
    tarball = server.root / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(build, arcname="cifar-10-batches-py")
    return tarball, arrays


def _point_at(
    monkeypatch: pytest.MonkeyPatch, name: str, files: list[tuple[str, str, tuple[str, str]]]
) -> None:
    source = dataclasses.replace(NAMED_DATASETS[name], files=tuple(RemoteFile(*f) for f in files))
    monkeypatch.setitem(NAMED_DATASETS, name, source)


def test_named_cifar10_downloads_verifies_and_caches(
    tmp_path: Path, file_server: _Server, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball, arrays = _cifar10_tarball(tmp_path, file_server)
    assert tarball.stat().st_size > 3 * 65536  # several chunks, so progress is called repeatedly
    _point_at(
        monkeypatch,
        "cifar10",
        [(file_server.url + tarball.name, tarball.name, ("sha256", _sha256(tarball)))],
    )
    calls: list[tuple[int, int | None]] = []
    ds = load_dataset("cifar10", progress=lambda done, total: calls.append((done, total)))
    assert ds.name == "cifar10" and ds.format == "cifar-python" and ds.root == cache / "cifar10"
    assert ds.train is not None and len(ds.train) == 60 and len(ds.test) == 30
    np.testing.assert_array_equal(ds.train.x, arrays["train"])
    np.testing.assert_array_equal(ds.test.x, arrays["test"])
    assert ds.class_names[0] == "class0"
    done = [d for d, _ in calls]
    assert len(calls) >= 3 and done == sorted(done) and done[-1] == tarball.stat().st_size
    assert {t for _, t in calls} == {tarball.stat().st_size}
    assert len(file_server.requests) == 1
    assert sorted(p.name for p in cache.iterdir()) == ["cifar10"]  # no temporary leftovers
    assert not list((cache / "cifar10").glob("*.tar.gz"))

    again = load_dataset("cifar10")
    assert len(file_server.requests) == 1  # served from the cache
    np.testing.assert_array_equal(again.test.x, arrays["test"])


def test_wrong_checksum_leaves_nothing_behind(
    tmp_path: Path, file_server: _Server, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball, _ = _cifar10_tarball(tmp_path, file_server)
    _point_at(
        monkeypatch,
        "cifar10",
        [(file_server.url + tarball.name, tarball.name, ("sha256", "0" * 64))],
    )
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("cifar10")
    assert len(file_server.requests) == 1
    assert list(cache.iterdir()) == []


def test_unsafe_tar_member_is_refused(
    tmp_path: Path, file_server: _Server, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tarball = file_server.root / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/../../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    _point_at(
        monkeypatch,
        "cifar10",
        [(file_server.url + tarball.name, tarball.name, ("sha256", _sha256(tarball)))],
    )
    with pytest.raises(DataError, match="escapes"):
        load_dataset("cifar10")
    assert not list(tmp_path.rglob("escaped.txt"))
    assert list(cache.iterdir()) == []


def test_offline_download_names_the_cache_directory(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as sock:  # a port on which nothing listens once it is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _point_at(
        monkeypatch,
        "cifar10",
        [(f"http://127.0.0.1:{port}/c.tar.gz", "c.tar.gz", ("sha256", "0" * 64))],
    )
    with pytest.raises(DataError, match="could not download") as info:
        load_dataset("cifar10")
    assert str(cache / "cifar10") in info.value.message
    assert "npz" in str(info.value) and "image-folder" in str(info.value)
    assert list(cache.iterdir()) == []


def test_named_dataset_without_download_says_where_to_put_it(cache: Path) -> None:
    with pytest.raises(DataError, match="not in") as info:
        load_dataset("cifar100", download=False)
    assert str(cache / "cifar100") in str(info.value)


def test_named_dataset_already_in_cache_is_loaded_without_network(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_npz(cache / "cifar100" / "test.npz", _images(3), np.array([0, 1, 2]))
    _point_at(monkeypatch, "cifar100", [("http://127.0.0.1:9/x", "x", ("sha256", "0" * 64))])
    ds = load_dataset("cifar100")
    assert ds.name == "cifar100" and ds.format == "npz" and len(ds.test) == 3


def test_named_mnist_converts_idx_files(
    file_server: _Server, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    splits = {
        "train": (rng.integers(0, 256, (20, 7, 7)), rng.integers(0, 10, 20)),
        "t10k": (rng.integers(0, 256, (8, 7, 7)), rng.integers(0, 10, 8)),
    }
    files = []
    for prefix, (x, y) in splits.items():
        for kind, array in (("images-idx3", x), ("labels-idx1", y)):
            path = file_server.root / f"{prefix}-{kind}-ubyte.gz"
            path.write_bytes(_idx_gz(array))
            files.append((file_server.url + path.name, path.name, ("sha256", _sha256(path))))
    _point_at(monkeypatch, "mnist", files)
    calls: list[tuple[int, int | None]] = []
    ds = load_dataset("mnist", progress=lambda d, t: calls.append((d, t)))
    assert ds.format == "npz" and ds.channels == 1 and ds.input_shape == (1, 7, 7)
    assert ds.class_names == tuple(str(i) for i in range(10))
    assert ds.train is not None
    np.testing.assert_array_equal(ds.train.x[..., 0], splits["train"][0])
    np.testing.assert_array_equal(ds.test.y, splits["t10k"][1])
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == ["test.npz", "train.npz"]
    assert len(file_server.requests) == 4
    done = [d for d, _ in calls]
    assert done == sorted(done)  # cumulative over the four files


def test_verify_checksum_supports_sha256_and_md5(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"advedge")
    verify_checksum(path, ("sha256", hashlib.sha256(b"advedge").hexdigest()))
    verify_checksum(path, ("md5", hashlib.md5(b"advedge").hexdigest().upper()))
    with pytest.raises(DataError, match="checksum mismatch"):
        verify_checksum(path, ("md5", "0" * 32))
    with pytest.raises(UsageError):
        verify_checksum(path, ("crc32", "0"))


def test_official_sources_are_pinned() -> None:
    for name, source in NAMED_DATASETS.items():
        assert source.files, name
        for remote in source.files:
            algorithm, digest = remote.checksum
            assert remote.url.startswith("https://"), remote.url
            assert algorithm in ("sha256", "md5")
            assert len(digest) == (64 if algorithm == "sha256" else 32)
            int(digest, 16)


def test_import_does_not_touch_the_network_or_cache(tmp_path: Path) -> None:
    # an audit hook in a fresh interpreter fails on any socket or URL opened during the import
    code = (
        "import sys\n"
        "def hook(event, args):\n"
        "    if event.startswith(('socket.', 'urllib.')):\n"
        "        raise RuntimeError('network use at import: ' + event)\n"
        "sys.addaudithook(hook)\n"
        "import advedge.data\n"
        "assert advedge.data.NAMED_DATASETS\n"
    )
    env = dict(os.environ, ADVEDGE_DATA=str(tmp_path / "never"))
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[2]), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "never").exists()


# --------------------------------------------------------------------------------------------
# Real data (../shared/data), when present
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar10() -> data.Dataset:
    return load_dataset(SHARED_DATA / "cifar10")


@pytest.mark.skipif(not HAS_CIFAR10, reason="shared CIFAR-10 data not present")
def test_real_cifar10(cifar10: data.Dataset) -> None:
    assert cifar10.format == "npz" and cifar10.name == "cifar10"
    assert cifar10.train is not None and len(cifar10.train) == 50_000
    assert len(cifar10.test) == 10_000 and cifar10.num_classes == 10
    assert cifar10.input_shape == (3, 32, 32)
    assert cifar10.class_names[:3] == ("airplane", "automobile", "bird")
    first_test_labels = " ".join(str(v) for v in cifar10.test.y[:20])
    assert first_test_labels == "3 8 8 0 6 6 1 6 3 1 0 9 5 7 9 8 5 7 8 6"  # data/README.md
    assert cifar10.train.y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert cifar10.train.y[40_000:40_010].tolist() == [1, 8, 5, 1, 5, 7, 4, 3, 8, 2]
    assert np.bincount(cifar10.test.y).tolist() == [1000] * 10


@pytest.mark.skipif(not HAS_CIFAR10, reason="shared CIFAR-10 data not present")
def test_real_cifar10_subset_and_loader(cifar10: data.Dataset) -> None:
    subset = stratified_subset(cifar10.test, 500, seed=0)
    assert np.bincount(subset.y).tolist() == [50] * 10
    x, y = next(iter(BatchLoader(subset, 64, shuffle=True, augment=True)))
    assert x.shape == (64, 3, 32, 32) and y.shape == (64,)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


@pytest.mark.skipif(not HAS_MNIST, reason="shared MNIST data not present")
def test_real_mnist() -> None:
    mnist = load_dataset(SHARED_DATA / "mnist")
    assert mnist.channels == 1 and mnist.input_shape == (1, 28, 28)
    assert mnist.train is not None and len(mnist.train) == 60_000 and len(mnist.test) == 10_000
    assert mnist.test.y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
