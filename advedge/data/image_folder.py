"""The image-folder format: ``train/<class>/*.png`` (optional) and ``test/<class>/*.png``.

The classes are the union of the class folders of both splits, sorted by name; their label is
their position. Every image must have the size and mode (L or RGB) of the first one read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from advedge.data.formats import IMAGE_EXTENSIONS, RawSplit, class_dirs, natural_key
from advedge.data.messages import one_line, read_error
from advedge.errors import DataError

__all__ = ["read_image_folder"]


def read_image_folder(path: Path) -> tuple[RawSplit | None, RawSplit | None]:
    """Read the ``(train, test)`` splits of an image-folder directory; a missing one is None.

    Raises:
        DataError: for an image that cannot be decoded or differs from the first in size or mode.
    """
    class_names = tuple(sorted({d.name for s in ("train", "test") for d in class_dirs(path / s)}))
    reference: dict[str, Any] = {}
    splits = []
    for split in ("train", "test"):
        split_dir = path / split
        splits.append(
            _read_image_split(split_dir, class_names, reference) if split_dir.is_dir() else None
        )
    return splits[0], splits[1]


def _read_image_split(
    split_dir: Path, class_names: tuple[str, ...], reference: dict[str, Any]
) -> RawSplit:
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        files = sorted(
            (p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS),
            key=natural_key,
        )
        for file in files:
            pixels, mode = _read_image(file)
            if not reference:
                reference.update(shape=pixels.shape, mode=mode, file=file)
            elif pixels.shape != reference["shape"]:
                raise DataError(
                    f"image {file} is {_describe_image(pixels.shape, mode)} but "
                    f"{reference['file']} is {_describe_image(reference['shape'], reference['mode'])}",
                    "all images must have the same size and mode (L or RGB)",
                )
            images.append(pixels)
            labels.append(label)
    if not images:
        raise DataError(
            f"{split_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})",
            "put images in <split>/<class>/",
        )
    return RawSplit(
        np.stack(images).astype(np.uint8, copy=False),
        np.asarray(labels, dtype=np.int64),
        class_names,
        str(split_dir),
    )


def _read_image(file: Path) -> tuple[np.ndarray, str]:
    """Decode one image as ``(pixels HWC, "L" | "RGB")``; any other mode is converted to RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(file) as img:
            img.load()
            mode = "L" if img.mode == "L" else "RGB"
            pixels = np.asarray(img.convert(mode) if img.mode != mode else img)
    except OSError as exc:
        if exc.errno is not None:  # the operating system's: permission, ...
            raise read_error(exc, file) from None
        raise DataError(
            f"cannot read image {file}: {one_line(exc)}",
            "the file is corrupt or not an image; remove or replace it",
        ) from None
    except Image.DecompressionBombError as exc:
        raise DataError(
            f"refusing to decode image {file}: {one_line(exc)}",
            "the image is far larger than any classifier input; resize it",
        ) from None
    except (ValueError, SyntaxError, UnidentifiedImageError) as exc:
        raise DataError(
            f"cannot read image {file}: {one_line(exc)}",
            "the file is corrupt or not an image; remove or replace it",
        ) from None
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return pixels, mode


def _describe_image(shape: tuple[int, ...], mode: str) -> str:
    return f"{shape[1]}x{shape[0]} {mode}"
