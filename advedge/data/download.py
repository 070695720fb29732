"""Downloads of the named datasets: where each comes from, fetching with checksums, conversion.

Each named dataset is a :class:`NamedSource`: its files (URL, checksum, size) and a converter
that turns the verified downloads into a directory in one of the recognised formats. Nothing
here touches the network until :func:`download_files` is called.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np

from advedge.data.formats import LOOKED_FOR
from advedge.data.messages import one_line
from advedge.errors import DataError, UsageError
from advedge.utils import atomic_path, sha256_file

logger = logging.getLogger(__name__)

__all__ = [
    "DOWNLOAD_TIMEOUT_S",
    "NAMED_DATASETS",
    "NamedSource",
    "ProgressCallback",
    "RemoteFile",
    "data_dir",
    "download_files",
    "verify_checksum",
]

ProgressCallback = Callable[[int, int | None], None]
"""``progress(bytes_done, bytes_total_or_None)``, called while a named dataset downloads."""

DOWNLOAD_TIMEOUT_S = 60.0

_CHUNK = 1 << 16


class RemoteFile(NamedTuple):
    """One file of a named dataset.

    Attributes:
        url: Where to download it.
        filename: The name to save it under.
        checksum: ``("sha256", hex)`` or, where no published sha256 exists, ``("md5", hex)``.
        size: Its size in bytes, if known (checked, and used for the progress total).
    """

    url: str
    filename: str
    checksum: tuple[str, str]
    size: int | None = None


@dataclass(frozen=True)
class NamedSource:
    """Where a named dataset comes from and how its downloads become a dataset directory.

    Attributes:
        files: The files to download and verify.
        converter: ``converter(download_dir, dataset_dir)`` turns the verified downloads into a
            directory in one of the recognised formats.
        description: One line for logs and help.
    """

    files: tuple[RemoteFile, ...]
    converter: Callable[[Path, Path], None]
    description: str = ""


def data_dir() -> Path:
    """Return the directory named datasets live in: ``$ADVEDGE_DATA`` or ``~/.cache/advedge``."""
    env = os.environ.get("ADVEDGE_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "advedge"


def verify_checksum(path: Path | str | os.PathLike[str], checksum: tuple[str, str]) -> None:
    """Check a file against ``("sha256", hex)`` or ``("md5", hex)``.

    Raises:
        DataError: if the digest differs.
        UsageError: for an algorithm other than sha256 or md5.
    """
    algorithm, expected = checksum[0].lower(), checksum[1].lower()
    if algorithm == "sha256":
        actual = sha256_file(path)
    elif algorithm == "md5":
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        actual = digest.hexdigest()
    else:
        raise UsageError(f"unknown checksum algorithm {algorithm!r}", "use sha256 or md5")
    if actual != expected:
        raise DataError(
            f"checksum mismatch for {Path(path).name}: expected {algorithm} {expected}, "
            f"got {actual}",
            "the download is corrupt or was altered; try again later",
        )


def download_files(
    name: str, source: NamedSource, raw: Path, target: Path, progress: ProgressCallback | None
) -> None:
    """Download every file of ``source`` into ``raw``, checking its size and checksum.

    Args:
        name: The dataset's name, for messages.
        source: What to download.
        raw: The folder to download into.
        target: Where the dataset will live, named in messages as the place to put it by hand.
        progress: Called as ``progress(bytes_done, bytes_total_or_None)`` over all files.

    Raises:
        DataError: if a download fails, is cut off or does not match its checksum.
        OSError: if a downloaded file cannot be read back.
    """
    sizes = [f.size for f in source.files]
    total = sum(s for s in sizes if s is not None) if None not in sizes else None
    done = 0
    for remote in source.files:
        dest = raw / remote.filename
        done = _fetch(remote, dest, name, target, done, total, progress)
        if remote.size is not None and dest.stat().st_size != remote.size:
            raise DataError(
                f"download of {remote.filename} is {dest.stat().st_size} bytes, "
                f"expected {remote.size}",
                "the download was cut off; try again",
            )
        verify_checksum(dest, remote.checksum)
        logger.info("verified %s (%s)", remote.filename, remote.checksum[0])


def _fetch(
    remote: RemoteFile,
    dest: Path,
    name: str,
    target: Path,
    done: int,
    total: int | None,
    progress: ProgressCallback | None,
) -> int:
    """Stream ``remote.url`` into ``dest``; return the running byte count over all files."""
    from advedge import __version__

    logger.info("downloading %s to %s", remote.url, dest)
    request = urllib.request.Request(remote.url, headers={"User-Agent": f"advedge/{__version__}"})
    try:
        with (
            urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response,
            open(dest, "wb") as fh,
        ):
            if total is None:
                length = response.headers.get("Content-Length")
                total = done + int(length) if length and length.isdigit() else None
            if progress is not None:
                progress(done, total)
            while chunk := response.read(_CHUNK):
                fh.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
    except urllib.error.HTTPError as exc:
        raise DataError(
            f"could not download dataset {name!r}: {remote.url} answered HTTP {exc.code}; "
            f"put the dataset in {target} yourself",
            f"accepted formats: {LOOKED_FOR}",
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise DataError(
            f"could not download dataset {name!r} from {remote.url} ({one_line(reason)}); "
            f"put the dataset in {target} yourself",
            f"accepted formats: {LOOKED_FOR}",
        ) from None
    return done


def _safe_extract(archive: Path, dest: Path) -> None:
    """Extract a tar archive, refusing absolute paths, ``..`` and links."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                parts = PurePosixPath(member.name).parts
                if member.name.startswith(("/", "\\")) or ".." in parts or ":" in member.name:
                    raise DataError(
                        f"refusing to extract {archive.name}: member {member.name!r} escapes "
                        "the target directory",
                        "the archive is not the official one",
                    )
                if not (member.isfile() or member.isdir()):
                    raise DataError(
                        f"refusing to extract {archive.name}: member {member.name!r} is a link "
                        "or device",
                        "the archive is not the official one",
                    )
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python without extraction filters
                tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot extract {archive.name}: {one_line(exc)}") from None


def _convert_cifar(raw: Path, out: Path) -> None:
    """Extract the official CIFAR tarball; the result is a ``cifar-python`` directory."""
    for archive in sorted(raw.glob("*.tar.gz")):
        _safe_extract(archive, out)


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes (MNIST's format)."""
    try:
        with gzip.open(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot decompress {path.name}: {one_line(exc)}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path.name} is not an IDX file of unsigned bytes")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + math.prod(dims):
        raise DataError(f"{path.name}: {len(data) - header} data bytes for dimensions {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _convert_mnist(raw: Path, out: Path) -> None:
    """Turn the four MNIST IDX files into ``train.npz`` and ``test.npz``."""
    names = np.array([str(i) for i in range(10)])
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x = _read_idx(raw / f"{prefix}-images-idx3-ubyte.gz")
        y = _read_idx(raw / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"MNIST {split}: images {x.shape} do not match labels {y.shape}")
        with atomic_path(out / f"{split}.npz") as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, x=x, y=y, class_names=names)


# Checksums: every sha256 below is the published one, found identically in several independent
# public sources (TensorFlow/Keras ``cifar10.load_data``/``cifar100.load_data`` use the two CIFAR
# values as ``file_hash``; torchvision's prototype datasets list the CIFAR-100 one; many MNIST
# loaders list the four MNIST ones). No md5 fallback was needed. The sizes are the official ones.
_CIFAR_BASE = "https://www.cs.toronto.edu/~kriz/"
_MNIST_BASE = "https://ossci-datasets.s3.amazonaws.com/mnist/"

NAMED_DATASETS: dict[str, NamedSource] = {
    "cifar10": NamedSource(
        files=(
            RemoteFile(
                _CIFAR_BASE + "cifar-10-python.tar.gz",
                "cifar-10-python.tar.gz",
                ("sha256", "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"),
                170_498_071,
            ),
        ),
        converter=_convert_cifar,
        description="CIFAR-10: 60,000 32x32 RGB images in 10 classes (Krizhevsky, 2009)",
    ),
    "cifar100": NamedSource(
        files=(
            RemoteFile(
                _CIFAR_BASE + "cifar-100-python.tar.gz",
                "cifar-100-python.tar.gz",
                ("sha256", "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"),
                169_001_437,
            ),
        ),
        converter=_convert_cifar,
        description="CIFAR-100: 60,000 32x32 RGB images in 100 fine classes (Krizhevsky, 2009)",
    ),
    "mnist": NamedSource(
        files=(
            RemoteFile(
                _MNIST_BASE + "train-images-idx3-ubyte.gz",
                "train-images-idx3-ubyte.gz",
                ("sha256", "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
                9_912_422,
            ),
            RemoteFile(
                _MNIST_BASE + "train-labels-idx1-ubyte.gz",
                "train-labels-idx1-ubyte.gz",
                ("sha256", "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
                28_881,
            ),
            RemoteFile(
                _MNIST_BASE + "t10k-images-idx3-ubyte.gz",
                "t10k-images-idx3-ubyte.gz",
                ("sha256", "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
                1_648_877,
            ),
            RemoteFile(
                _MNIST_BASE + "t10k-labels-idx1-ubyte.gz",
                "t10k-labels-idx1-ubyte.gz",
                ("sha256", "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
                4_542,
            ),
        ),
        converter=_convert_mnist,
        description="MNIST: 70,000 28x28 grayscale digits (LeCun et al., 1998)",
    ),
}
