"""What a QAT run starts from: the student checkpoint and its PTQ INT8 Q/DQ file.

The PTQ file fixes everything QAT does not train: the Q/DQ placement (TensorRT's, as
:func:`~advedge.calibration.nodes.trt_placement` chooses it), the batch norms folded into the
convolutions by ONNX Runtime's pre-processing, and the calibrated activation scales. It is either
exported here by ``advedge export``'s own pipeline (:func:`export_ptq`), or given (``--ptq``),
checked to be the student's symmetric INT8 file and copied into the run directory, so that a
resumed run reads exactly the file the run started from (its sha256 is in ``state.pt``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from advedge.checkpoint import read_metadata, resolve_checkpoint
from advedge.errors import ExportError, UsageError
from advedge.export.graph import read_onnx_metadata, sidecar_path
from advedge.utils import atomic_path, sha256_file

__all__ = ["PTQ_DIR", "check_ptq", "export_ptq", "prepare_ptq", "student_record"]

#: The run directory's folder for the PTQ file QAT starts from.
PTQ_DIR = "ptq"


def student_record(path: str) -> dict[str, Any]:
    """The student checkpoint's path, sha256, architecture, method and eps.

    Raises:
        CheckpointError: no readable advedge checkpoint at ``path``.
    """
    ckpt = resolve_checkpoint(path)
    meta = read_metadata(ckpt)
    return {
        "path": str(ckpt),
        "sha256": sha256_file(ckpt),
        "architecture": meta.get("architecture"),
        "method": meta.get("method"),
        "eps": meta.get("eps"),
    }


def check_ptq(path: Path, student: dict[str, Any]) -> dict[str, Any]:
    """Refuse a ``--ptq`` file that is not the student's classifier in symmetric INT8 Q/DQ (the
    TensorRT form); returns its metadata.

    Raises:
        UsageError: a missing file, another precision or target, or another model's file.
    """
    if not path.is_file():
        raise UsageError(f"--ptq {path} does not exist", "export the student with --precision int8")
    try:
        meta = read_onnx_metadata(path)
    except Exception as exc:
        raise UsageError(
            f"--ptq {path} is not a readable ONNX file ({type(exc).__name__})"
        ) from None
    if meta.get("precision") != "int8" or meta.get("quantisation"):
        raise UsageError(
            f"--ptq {path.name} is not a PTQ INT8 file (precision {meta.get('precision')!r})",
            "give the .int8.onnx of advedge export --precision int8",
        )
    if meta.get("int8_target", "tensorrt") != "tensorrt":
        raise UsageError(
            f"--ptq {path.name} is the {meta.get('int8_target')} form",
            "QAT writes TensorRT's symmetric form: export with --int8-target tensorrt",
        )
    if meta.get("kind", "classifier") != "classifier":
        raise UsageError(f"--ptq {path.name} is a {meta.get('kind')} artifact, not a classifier")
    if meta.get("source_sha256") != student["sha256"]:
        raise UsageError(
            f"--ptq {path.name} was exported from another checkpoint than --student",
            "export the student itself, or leave out --ptq to export it here",
        )
    return meta


def export_ptq(config: Any, folder: Path, say: Callable[[str], None]) -> Path:
    """Export the student to INT8 (TensorRT form) into ``folder`` with ``advedge export``'s own
    pipeline and the run's calibration options; returns the ``.int8.onnx``."""
    from advedge.export.exporter import ExportOptions, export_artifacts

    options = ExportOptions(
        model=config.student,
        out=str(folder),
        precision="int8",
        data=config.data,
        calib_data=config.data,
        calib_n=config.calib_n,
        calib_method=config.calib_method,
        calib_mix_adv=config.calib_mix_adv,
        seed=config.seed,
        overwrite=True,  # the run's own folder, under its lock: a cut-short export is redone
    )
    report = export_artifacts(options, status=lambda m: say(f"PTQ export: {m}"))
    paths = [Path(a["path"]) for a in report.artifacts if a["precision"] == "int8"]
    if len(paths) != 1:
        raise ExportError(f"the PTQ export wrote {len(paths)} INT8 files, expected one")
    return paths[0]


def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def prepare_ptq(
    config: Any,
    out: Path,
    student: dict[str, Any],
    state: dict[str, Any] | None,
    say: Callable[[str], None],
) -> Path:
    """The PTQ file of the run in ``out``: the one a resumed run started from (checked by
    sha256), else ``config.ptq`` copied into ``out/ptq``, else a new export there.

    Raises:
        UsageError: a resumed run whose PTQ file is missing or changed; a bad ``--ptq``.
    """
    if state is not None:
        record = state.get("ptq") or {}
        path = out / str(record.get("file", ""))
        if not record or not path.is_file() or sha256_file(path) != record.get("sha256"):
            raise UsageError(
                f"cannot resume {out}: the PTQ file it started from is missing or changed",
                "choose another --out to start anew",
            )
        return path
    folder = out / PTQ_DIR
    if config.ptq is None:
        say(f"exporting the student to INT8 (calibration: {config.calib_method})")
        return export_ptq(config, folder, say)
    src = Path(config.ptq)
    check_ptq(src, student)
    say(f"starting from {src}")
    _copy(src, folder / src.name)
    if sidecar_path(src).is_file():
        _copy(sidecar_path(src), folder / sidecar_path(src).name)
    return folder / src.name
