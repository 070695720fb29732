"""The folder of an export: staging inside it, and what it already holds.

An export stages its files in a hidden folder inside ``out`` (:func:`staging`) and moves them
into place only when every step has passed. Before any work, what ``out`` holds is checked
against what the export would write (:func:`check_existing`, which states the rules): no
folder ever holds a mix of two models' artifacts of one name.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from advedge.export.graph import read_onnx_metadata
from advedge.export.precisions import PRECISIONS
from advedge.export.targets import ExportTarget

from advedge.errors import AdvedgeError, ExportError, os_error

__all__ = ["STAGING_PREFIX", "check_existing", "remove_stale_staging", "staging", "write_error"]

STAGING_PREFIX = ".advedge-export-"


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A hidden folder in ``out``; removed whatever happens (moved-out files survive).

    ``out`` is created here, when the first file is about to be staged; on failure it is
    removed again if this export created it and it is still empty.
    """
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    ok = False
    try:
        yield stage
        ok = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not ok and created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty: never removes earlier work


def remove_stale_staging(out: Path, say: Callable[[str], None]) -> None:
    """Remove the staging folders a killed export left in ``out``; call it under the lock.

    Only an export holding the output lock of ``out`` stages there, so under the lock every
    staging folder in ``out`` is a leftover. An ``out`` that held nothing but leftovers was
    made by the killed export: it is removed too (and made again with the first file).
    """
    if not out.is_dir():
        return
    stale = [
        p
        for p in out.iterdir()
        if p.name.startswith(STAGING_PREFIX) and p.is_dir() and not p.is_symlink()
    ]
    for folder in stale:
        shutil.rmtree(folder, ignore_errors=True)
    if stale:
        say(f"removed {len(stale)} staging folder(s) left in {out} by an export that was killed")
        if not any(out.iterdir()):
            with contextlib.suppress(OSError):
                out.rmdir()


def write_error(exc: OSError, out: Path) -> AdvedgeError:
    """One line for an OSError while staging or installing: names the final file when known."""
    where: Path = out
    name = exc.filename
    if isinstance(name, (str, os.PathLike)) and name:
        p = Path(os.fsdecode(name))
        staged = [part for part in p.parts if part.startswith(STAGING_PREFIX)]
        if staged:
            where = out if p.name.startswith(STAGING_PREFIX) else out / _final_name(p.name)
        else:
            where = p
    return os_error(exc, where)


def _final_name(name: str) -> str:
    """An atomic write's temporary -> the file it becomes.

    ``.tiny_cnn.fp32.onnx.k2j4x8.tmp`` -> ``tiny_cnn.fp32.onnx``.
    """
    if name.startswith(".") and name.endswith(".tmp"):
        inner = name[1:-4]
        return inner.rsplit(".", 1)[0] if "." in inner else inner
    return name.lstrip(".")


# ------------------------------------------------------------------------------ what out holds
# An artifact of name family NAME: NAME.<precision>[-variant].<rest>, e.g. tiny_cnn.fp32.onnx,
# tiny_cnn.int8-ortcpu.json, tiny_cnn.int8.trt10.3.sm87.b1-64.engine (+ .layers.json, .json).
_PRECISION_TAG = re.compile(rf"({'|'.join(PRECISIONS)})(-[a-z0-9]+)?\.")
_UNIT_SUFFIXES = (".layers.json", ".onnx", ".engine", ".json")


@dataclass
class _Unit:
    """One artifact already in ``out``: ``STEM.onnx`` or ``STEM.engine`` with its sidecar."""

    stem: str
    files: list[Path]
    source: Any  # the recorded source_sha256 (str, dict) or None when unknown


def _source_of(data: Any) -> Any:
    if not isinstance(data, dict):
        return None
    src = data.get("source_sha256")
    if src is None and isinstance(data.get("artifact"), dict):
        src = data["artifact"].get("source_sha256")  # an engine's sidecar
    return src


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def _unit_source(out: Path, stem: str) -> tuple[Any, Any]:
    """(source_sha256, the sidecar's data) of artifact ``stem`` in ``out``."""
    data = _read_json(out / f"{stem}.json") if (out / f"{stem}.json").is_file() else None
    src = _source_of(data)
    if src is None and (out / f"{stem}.onnx").is_file():
        try:
            src = read_onnx_metadata(out / f"{stem}.onnx").get("source_sha256")
        except Exception:  # not a readable ONNX: unknown origin
            src = None
    return src, data


def _key(source: Any) -> str | None:
    return None if source is None else json.dumps(source, sort_keys=True)


def _hashes(source: Any, data: Any = None) -> set[str]:
    """The checkpoint hashes an artifact comes from (a fused one: purifier and classifier)."""
    found = set()
    if isinstance(source, str):
        found.add(source)
    elif isinstance(source, dict):
        found |= {v for v in source.values() if isinstance(v, str)}
    if isinstance(data, dict) and isinstance(data.get("classifier_sha256"), str):
        found.add(data["classifier_sha256"])  # a purifier made for that classifier
    return found


def _units(out: Path) -> dict[str, _Unit]:
    """Every artifact unit in ``out`` (top level, hidden files skipped), by stem."""
    units: dict[str, _Unit] = {}
    if not out.is_dir():
        return units
    for f in sorted(out.iterdir()):
        if f.name.startswith(".") or not f.is_file() or f.name.endswith(".calib.cache"):
            continue
        suffix = next((x for x in _UNIT_SUFFIXES if f.name.endswith(x)), None)
        if suffix is None:
            continue
        stem = f.name[: -len(suffix)]
        units.setdefault(stem, _Unit(stem, [], None)).files.append(f)
    for unit in units.values():
        unit.source, _ = _unit_source(out, unit.stem)
    return units


def _family(stem: str, name: str) -> bool:
    """Whether artifact ``stem`` belongs to name family ``name`` (``tiny_cnn.int8`` -> yes)."""
    return stem.startswith(f"{name}.") and bool(_PRECISION_TAG.match(stem[len(name) + 1 :] + "."))


def _family_conflicts(
    units: dict[str, _Unit], targets: list[ExportTarget]
) -> tuple[list[Path], set[str], bool]:
    """The files of this export's name families from another origin, the stems of those
    families, and whether one of them is of this export's origin."""
    stale: list[Path] = []
    claimed: set[str] = set()
    same_source = False
    for t in targets:
        key = _key(t.metadata["source_sha256"])
        for stem, unit in units.items():
            if not _family(stem, t.name):
                continue
            claimed.add(stem)
            if unit.source is not None and _key(unit.source) == key:
                same_source = True  # the same model: refreshed or kept, never a mix
                continue
            stale += unit.files
    return stale, claimed, same_source


def check_existing(
    out: Path, targets: list[ExportTarget], *, writes_calibration_set: bool, overwrite: bool
) -> list[Path]:
    """Refuse an ``out`` whose artifacts would mix with this export's.

    Artifacts are grouped by *name family*: the files ``NAME.<precision>...`` (``.onnx``,
    ``.engine``, ``.layers.json`` and their ``.json`` sidecar) of one target ``NAME``
    (``tiny_cnn``, ``purifier``, ``tiny_cnn-purified``). The origin of an artifact is the
    ``source_sha256`` its sidecar records (an engine's: ``artifact.source_sha256``; without a
    readable sidecar, the ONNX file's own metadata).

    * An artifact of one of this export's families whose origin equals the target's (the same
      checkpoint(s)) is no conflict: the files this export writes replace it, the others stay.
      So the same model can be exported into one folder at several precisions (``fp32`` and
      ``int8``, then ``fp16``, as ``advedge pipeline`` does).
    * An artifact of one of this export's families from another origin, or of unknown origin
      (no sidecar, no metadata), is a conflict: the folder would hold one model's
      ``tiny_cnn.fp32.onnx`` beside another's ``tiny_cnn.int8.onnx``.
    * An advedge artifact of another family is a conflict when it shares no checkpoint with
      this export (another model lives in ``out``); a purifier made for this classifier, or a
      fused graph containing it, is not. Files that record no origin are not looked at.
    * ``calibration.npz``, when this export would write one, is a conflict unless ``out``
      holds an artifact of this export's origin (it then belongs to this model's exports).
    * Hidden files, ``timing.cache`` and legacy ``*.calib.cache`` files (keyed by content)
      are never conflicts.

    With ``overwrite``, once every new artifact is staged and has passed its gates, the
    conflicting artifacts of this export's families that no new file replaced are deleted
    (after the new files are in place), so a finished export leaves no family holding files
    of two origins; artifacts of other families are left as they are (their sidecars name
    their origin).

    Args:
        out: The export's folder.
        targets: What the export writes.
        writes_calibration_set: The export writes ``calibration.npz`` (a set built from data).
        overwrite: ``--overwrite``: conflicts are replaced rather than refused.

    Returns:
        The files to remove once the new artifacts are staged and verified (only with
        ``overwrite``: the conflicting artifacts of this export's name families).

    Raises:
        ExportError: a conflict, without ``overwrite``; the message names the files.
    """
    units = _units(out)
    ours = {_key(t.metadata["source_sha256"]) for t in targets}
    mine: set[str] = set()
    for t in targets:
        mine |= _hashes(t.metadata["source_sha256"], t.metadata)
    stale, claimed, same_source = _family_conflicts(units, targets)
    conflicts = list(stale)
    for stem, unit in units.items():
        if stem in claimed or unit.source is None:
            continue  # not an advedge artifact of a known source: not this export's business
        if _key(unit.source) in ours:
            same_source = True
            continue
        _, data = _unit_source(out, stem)
        if not _hashes(unit.source, data) & mine:
            conflicts += unit.files  # another model altogether lives in out
    calib = out / "calibration.npz"
    if writes_calibration_set and calib.is_file() and not same_source:
        conflicts.append(calib)  # would be replaced, and belongs to no artifact of this model
    if not conflicts:
        return []
    if overwrite:
        return stale
    names = sorted({p.name for p in conflicts})
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    raise ExportError(
        f"{out} already holds artifacts of another model (or of unknown origin): {shown}",
        "pass --overwrite to replace that model's files of these names, or choose another --out",
    )
