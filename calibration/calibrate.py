"""``advedge calibrate``: quantise an existing FP32 ONNX file to Q/DQ INT8, all or nothing.

The command's Python API is :func:`calibrate_file`. Torch-free at import; torch is imported only
to craft the adversarial share of a calibration set (``mix_adv``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advedge.calibration.quantize import (
    QuantizeOptions,
    QuantizeResult,
    check_method,
    check_target,
    quantize_artifact,
)
from advedge.calibration.sets import (
    CalibrationSet,
    build_calibration_set,
    calibration_source,
    check_fits,
    load_calibration_set,
    save_calibration_set,
)
from advedge.export._deps import quiet_onnxruntime, require
from advedge.export.graph import (
    check_onnx,
    graph_input,
    load_onnx_graph,
    read_onnx_metadata,
    sidecar_path,
    write_sidecar,
)

from advedge.errors import ExportError, UsageError, os_error
from advedge.locks import output_lock
from advedge.outputs import StagedFiles, check_out_file

__all__ = ["calibrate_file", "glob_escape", "install_files"]

logger = logging.getLogger(__name__)


@dataclass
class _Source:
    """The calibration data, checked before anything is created: a saved set, or a dataset
    (and the model its adversarial share is crafted on) to draw the set from under the lock."""

    calib: CalibrationSet | None = None
    dataset: Any = None
    model: Any = None


def calibrate_file(
    onnx_path: str | os.PathLike[str],
    data: str,
    out: str | os.PathLike[str],
    *,
    method: str = "entropy",
    n: int = 512,
    mix_adv: float = 0.0,
    model: str | None = None,
    eps: float = 8 / 255,
    batch_size: int = 32,
    keep_fp32: str = "auto",
    save_set: str | os.PathLike[str] | None = None,
    cache_dir: str | None = None,
    target: str = "tensorrt",
    seed: int = 0,
    status: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``advedge calibrate``: quantise an existing FP32 ONNX to QDQ INT8, all or nothing.

    Order: the options, the paths (``--onnx`` exists and passes the checker; ``--out`` and
    ``--save-set`` are files that can be written: not under a file, their folders writable),
    the data (a saved set: loaded and verified; a data directory: loaded, its training split
    large enough, its images of the model's shape) and the checkpoint of ``--mix-adv`` are all
    checked before anything is created. Then the output lock of ``out`` is held (a second
    writer is refused at once), the set is built and the model quantised in a temporary
    folder of the system. Only then is the parent folder of ``out`` (and of ``save_set``)
    created and the QDQ file, its sidecar and the optional saved set copied beside their
    destinations and renamed into place together; a failure at any step (a full disk
    included: ``cannot write PATH: the disk is full``) leaves no file and no new folder behind,
    and an earlier ``out`` intact.

    Returns:
        The ``advedge.calibrate/1`` payload (also the sidecar's ``calibration``).

    Raises:
        UsageError: bad options or paths (checked before any work), ``out`` equal to the
            source, under a file or a folder.
        OutputLockedError: another process is writing ``out``.
        AdvedgeError: a folder that is read-only or not writable, or a full disk.
        ExportError, DataError, CheckpointError: as :func:`advedge.calibration.quantize_qdq`,
            :func:`advedge.data.load_dataset` and :func:`advedge.checkpoint.load_model`.
    """
    say = status or (lambda msg: logger.info(msg))
    onnx_path, out = Path(onnx_path), Path(out)
    options = QuantizeOptions(method, batch_size, keep_fp32, cache_dir, target)
    set_path = _check_request(
        onnx_path, out, options, n=n, mix_adv=mix_adv, model=model, save_set=save_set
    )
    require("onnx", purpose="advedge calibrate")

    with quiet_onnxruntime():
        check_onnx(onnx_path)
        meta = read_onnx_metadata(onnx_path)
        want = _onnx_image_shape(onnx_path)
        source = _check_source(data, want, n=n, batch_size=batch_size, mix_adv=mix_adv, model=model)
        with output_lock(out):
            _remove_stale_temps(out)
            calib = source.calib
            if calib is None:
                say(f"building the calibration set: {n} training images, {mix_adv:.0%} adversarial")
                calib = build_calibration_set(
                    source.dataset, n=n, seed=seed, mix_adv=mix_adv, model=source.model, eps=eps
                )
                check_fits(calib, want, batch_size)
            return _quantize_and_install(onnx_path, out, calib, options, meta, set_path)


def _check_request(
    onnx_path: Path,
    out: Path,
    options: QuantizeOptions,
    *,
    n: int,
    mix_adv: float,
    model: str | None,
    save_set: str | os.PathLike[str] | None,
) -> Path | None:
    """The options and the paths, before anything is read; returns the ``--save-set`` path."""
    check_method(options.method)
    check_target(options.target)
    if mix_adv > 0 and model is None:
        raise UsageError("--mix-adv needs --model (the FP32 model the examples are crafted on)")
    if not 0.0 <= mix_adv <= 1.0:
        raise UsageError(f"--mix-adv must be in [0, 1], got {mix_adv}")
    for name, value in (("--n", n), ("--batch-size", options.batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    if out.suffix != ".onnx":
        raise UsageError(f"--out must name a .onnx file, got {out}")
    if not onnx_path.is_file():
        raise UsageError(f"--onnx {onnx_path} does not exist")
    if out.resolve() == onnx_path.resolve():
        raise UsageError("--out is the FP32 source itself", "write the INT8 model to another file")
    check_out_file(out)
    return None if save_set is None else _check_save_set(Path(save_set))


def _check_save_set(path: Path) -> Path:
    """``--save-set``: a .npz file that can be written."""
    if path.suffix != ".npz":
        raise UsageError(f"--save-set must name a .npz file, got {path}")
    check_out_file(path, option="--save-set")
    return path


def _check_source(
    data: str, want: list[Any], *, n: int, batch_size: int, mix_adv: float, model: str | None
) -> _Source:
    """The calibration data (and the ``--mix-adv`` checkpoint), before anything is created."""
    if data.endswith(".npz"):
        calib = load_calibration_set(data)
        check_fits(calib, want, batch_size)
        return _Source(calib=calib)
    from advedge.data import load_dataset

    dataset = load_dataset(data, download=False)
    _check_calibration_source(dataset, want, n=n, batch_size=batch_size)
    torch_model = None
    if model is not None and mix_adv > 0:
        from advedge.checkpoint import load_model

        torch_model = load_model(model)
    return _Source(dataset=dataset, model=torch_model)


def _quantize_and_install(
    onnx_path: Path,
    out: Path,
    calib: CalibrationSet,
    options: QuantizeOptions,
    meta: dict[str, Any],
    set_path: Path | None,
) -> dict[str, Any]:
    """Quantise away from ``out`` (its folder appears only with the file), then install the
    model, its sidecar and the optional saved set together."""
    with tempfile.TemporaryDirectory(prefix="advedge-calibrate-") as tmp_name:
        tmp = Path(tmp_name)
        staged = tmp / out.name
        result = quantize_artifact(onnx_path, staged, calib, options, meta)
        payload = _payload(onnx_path, out, staged, calib, options, result)
        side = write_sidecar(
            tmp / sidecar_path(out).name,
            {**meta, "precision": "int8", "int8_target": options.target, "calibration": payload},
        )
        files = [(staged, out), (side, sidecar_path(out))]
        if set_path is not None:
            files.append((save_calibration_set(calib, tmp / "set.npz"), set_path))
        install_files(files)
    return payload


def _payload(
    onnx_path: Path,
    out: Path,
    staged: Path,
    calib: CalibrationSet,
    options: QuantizeOptions,
    result: QuantizeResult,
) -> dict[str, Any]:
    return {
        "schema": "advedge.calibrate/1",
        "onnx": str(out),
        "source_onnx": str(onnx_path),
        "bytes": staged.stat().st_size,
        "target": options.target,
        "method": result.method,
        "n": len(calib),
        "calib_sha256": result.calib_sha256,
        "model_sha256": result.model_sha256,
        "fp32_nodes": list(result.excluded_nodes),
        "qdq_pairs": result.n_qdq_pairs,
        "cache": None if result.cache_path is None else str(result.cache_path),
        "cache_hit": result.cache_hit,
        "seconds": round(result.seconds, 2),
    }


def _onnx_image_shape(path: Path) -> list[Any]:
    """``[C, H, W]`` of the model's image input (symbolic axes as names or None)."""
    _, dims = graph_input(load_onnx_graph(path), None)
    return dims[1:]


def _check_calibration_source(dataset: Any, want: list[Any], *, n: int, batch_size: int) -> None:
    """What :func:`~advedge.calibration.build_calibration_set` and
    :func:`~advedge.calibration.check_fits` would refuse, known before the set is drawn."""
    calibration_source(dataset, n, option="--n")
    have = list(dataset.input_shape)
    fits = len(want) == 3 and all(
        not isinstance(w, int) or w <= 0 or w == h for w, h in zip(want, have, strict=True)
    )
    if not fits:
        raise ExportError(
            f"calibration images are {have} (C, H, W) but the model takes {want}",
            "build the calibration set from the dataset the model was trained on",
        )
    if n < batch_size:
        raise ExportError(
            f"calibration set of {n} images is smaller than the batch {batch_size}",
            "use a smaller batch size or a larger calibration set",
        )


def _remove_stale_temps(out: Path) -> None:
    """Under ``out``'s lock: remove the temporary files a killed writer left beside ``out``."""
    for dst in (out, sidecar_path(out)):
        if not dst.parent.is_dir():
            continue
        for tmp in dst.parent.glob(f".{glob_escape(dst.name)}.*.tmp"):
            with contextlib.suppress(OSError):
                if tmp.is_file() and not tmp.is_symlink():
                    tmp.unlink()


def glob_escape(name: str) -> str:
    """``name`` with glob's special characters escaped."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def install_files(files: list[tuple[Path, Path]]) -> None:
    """Put staged files in place, all or nothing: ``[(staged, destination), ...]``.

    Each staged file (possibly on another file system) is first copied to a temporary file
    beside its destination, creating missing folders; only when every copy is complete are
    they renamed onto their destinations in a row (:func:`advedge.outputs.install`: a rename
    that fails undoes the ones done). On any failure no destination is changed, every
    temporary file and every folder made here is removed, and the error names the destination
    (``cannot write PATH: the disk is full``).

    Raises:
        AdvedgeError: an OSError while writing (via :func:`advedge.errors.os_error`).
    """
    with StagedFiles() as staged:
        for src, dst in files:
            try:
                staged.copy(src, dst)
            except OSError as exc:
                raise os_error(exc, dst) from None
        try:
            staged.install()
        except OSError as exc:  # name the destination, not its temporary
            dest = {os.fspath(tmp): dst for tmp, dst in staged.pairs}
            where = dest.get(os.fspath(exc.filename or ""), files[0][1])
            raise os_error(exc, where) from None
