"""``advedge export``: checkpoint(s) -> checked ONNX (+ FP16 / QDQ INT8) -> optional engine.

For each artifact (a classifier; a purifier and a classifier side by side; or both fused into one
graph, purifier -> classifier, one input, logits out):

1. export the FP32 ONNX (opset 18, dynamic batch, constants folded, full checker);
2. the parity gate against PyTorch on real test images, clean and adversarial (PGD-20 crafted
   on the FP32 PyTorch model being exported; for a purifier alone, on its classifier);
3. FP16: convert with onnxconverter-common (FP32 I/O), check, gate;
   INT8: build (or load) the calibration set, quantise to symmetric QDQ, check, gate, then the
   on-the-spot accuracy report: clean and transfer-robust accuracy of FP32 vs INT8 under ONNX
   Runtime, with a loud warning (also written into the sidecar) when INT8 loses more than
   ``max_drop`` points;
4. with ``trt``: a strongly typed TensorRT engine from that ONNX.

Everything is written into a hidden staging folder inside ``out`` and moved into place only when
every step has passed: a failure leaves no partial artifact, and earlier artifacts in ``out`` are
replaced only by complete new ones. ``out`` itself is created only when the first file is staged.
Before any work, ``out`` is checked (not under a file, writable), the output lock
(:func:`advedge.locks.output_lock`) is taken, so a second writer is refused at once, and what
``out`` already holds is checked against what the export would write (see
:func:`export_artifacts`: no folder ever holds a mix of two models' artifacts of one name).
Staging folders left by an export that was killed are removed by the next export into ``out``.
ONNX Runtime's log lines and numpy's warnings are logged at debug, not printed, so an error stays
one line; a full disk is reported as ``cannot write PATH: the disk is full``. torch is imported
inside the functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from advedge.export._deps import require
from advedge.export.graph import (
    check_onnx,
    graph_input,
    read_onnx_metadata,
    set_onnx_metadata,
    sidecar_path,
    write_sidecar,
)
from advedge.export.parity import TOLERANCES, Tolerance, compare_outputs, gate
from advedge.export.runtime import OrtRunner, TorchRunner, quiet_onnxruntime

import advedge
from advedge.errors import AdvedgeError, DataError, ExportError, UsageError, os_error
from advedge.locks import output_lock
from advedge.outputs import StagedFiles, check_out, check_out_file, install
from advedge.utils import sha256_file

__all__ = ["PRECISIONS", "TRT_CALIBRATORS", "ExportOptions", "export_artifacts"]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
# PGD examples of recent exports in this process, keyed by what they were crafted on
_ADV_MEMO: dict[Any, np.ndarray] = {}
TRT_CALIBRATORS = ("qdq", "legacy-entropy", "legacy-minmax")
CALIB_METHODS = ("entropy", "minmax", "percentile")


@dataclass
class ExportOptions:
    """Every option of ``advedge export`` (see its ``--help``)."""

    model: str
    out: str
    purifier: str | None = None
    fuse: bool = False
    precision: str = "fp32"
    data: str | None = None
    calib_data: str | None = None
    calib_n: int = 512
    calib_method: str = "entropy"
    calib_mix_adv: float = 0.0
    calib_batch: int = 32
    keep_fp32: str = "auto"
    opset: int = 18
    parity_n: int = 256
    report_n: int = 500
    max_drop: float = 2.0
    attack_steps: int = 20
    eps: float | None = None
    seed: int = 0
    trt: bool = False
    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 64
    workspace_mib: int = 1024
    timing_cache: str | None = None
    trt_calibrator: str = "qdq"
    cache_dir: str | None = None
    int8_target: str = "tensorrt"
    parity_min_agree: float | None = None
    parity_max_abs: float | None = None
    overwrite: bool = False

    def validate(self) -> None:
        """Refuse bad option values before any work (exit code 2)."""
        if self.precision not in PRECISIONS:
            raise UsageError(
                f"precision {self.precision!r} is not available for ONNX artifacts",
                "choose fp32, fp16 or int8",
            )
        if self.calib_method not in CALIB_METHODS:
            raise UsageError(
                f"unknown calibration method {self.calib_method!r}",
                "choose entropy, minmax or percentile",
            )
        if self.trt_calibrator not in TRT_CALIBRATORS:
            raise UsageError(
                f"unknown TensorRT calibrator {self.trt_calibrator!r}",
                "choose qdq, legacy-entropy or legacy-minmax",
            )
        if self.trt_calibrator != "qdq" and (self.precision != "int8" or not self.trt):
            raise UsageError("a legacy calibrator needs --precision int8 and --trt")
        if self.int8_target not in ("tensorrt", "onnxruntime-cpu"):
            raise UsageError(
                f"unknown INT8 target {self.int8_target!r}", "choose tensorrt or onnxruntime-cpu"
            )
        if self.int8_target != "tensorrt" and self.trt:
            raise UsageError(
                "--int8-target onnxruntime-cpu cannot be built into a TensorRT engine",
                "TensorRT needs symmetric int8 Q/DQ: use --int8-target tensorrt with --trt",
            )
        if self.precision == "int8" and not self.calib_data:
            raise UsageError(
                "int8 needs calibration data",
                "pass --calib-data DIR (a data directory or a saved calibration .npz)",
            )
        if self.fuse and not self.purifier:
            raise UsageError("--fuse needs --purifier")
        if not 0.0 <= self.calib_mix_adv <= 1.0:
            raise UsageError(f"--calib-mix-adv must be in [0, 1], got {self.calib_mix_adv}")
        for name in ("calib_n", "calib_batch", "parity_n", "report_n", "attack_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_drop < 0:
            raise UsageError("--max-drop must be >= 0")
        if self.parity_min_agree is not None and not 0 <= self.parity_min_agree <= 1:
            raise UsageError(f"--parity-min-agree must be in [0, 1], got {self.parity_min_agree}")
        if self.parity_max_abs is not None and not self.parity_max_abs > 0:
            raise UsageError(f"--parity-max-abs must be > 0, got {self.parity_max_abs}")
        from advedge.export.onnx_export import DEFAULT_OPSET, SUPPORTED_OPSETS

        if self.opset not in SUPPORTED_OPSETS:
            raise UsageError(
                f"opset {self.opset} is not supported",
                f"use {SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1} (default {DEFAULT_OPSET})",
            )


@dataclass
class _Target:
    name: str
    kind: str  # classifier, purifier, fused
    module: Any
    output: str  # logits or pixels
    metadata: dict[str, Any]
    attack_module: Any  # what the adversarial inputs are crafted on
    classifier: Any  # torch classifier (labels for pixel outputs)
    overrides: dict[str, Any] = field(default_factory=dict)  # parity tolerance from the CLI


@dataclass
class ExportReport:
    """What ``advedge export`` wrote and measured."""

    out: Path
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # another model's files of this export's names that --overwrite deleted (not replaced)
    removed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "advedge.export/1",
            "out": str(self.out),
            "artifacts": self.artifacts,
            "warnings": self.warnings,
            "removed": self.removed,
            "seconds": round(self.seconds, 2),
        }


STAGING_PREFIX = ".advedge-export-"


@contextlib.contextmanager
def _staging(out: Path) -> Iterator[Path]:
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


def _remove_stale_staging(out: Path, say: Callable[[str], None]) -> None:
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


def _write_error(exc: OSError, out: Path) -> AdvedgeError:
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
_PRECISION_TAG = re.compile(r"(fp32|fp16|int8)(-[a-z0-9]+)?\.")
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


def _check_existing(out: Path, targets: list[_Target], opts: ExportOptions) -> list[Path]:
    """Refuse an ``out`` whose artifacts would mix with this export's; see export_artifacts.

    Returns the files to remove once the new artifacts are staged and verified (only with
    ``--overwrite``: the conflicting artifacts of this export's name families).
    """
    units = _units(out)
    ours = {_key(t.metadata["source_sha256"]) for t in targets}
    mine: set[str] = set()
    for t in targets:
        mine |= _hashes(t.metadata["source_sha256"], t.metadata)
    conflicts: list[Path] = []
    stale: list[Path] = []
    same_source = False
    claimed: set[str] = set()
    for t in targets:
        key = _key(t.metadata["source_sha256"])
        for stem, unit in units.items():
            if not _family(stem, t.name):
                continue
            claimed.add(stem)
            if unit.source is not None and _key(unit.source) == key:
                same_source = True  # the same model: refreshed or kept, never a mix
                continue
            conflicts += unit.files
            stale += unit.files
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
    if (
        opts.precision == "int8"
        and not str(opts.calib_data).endswith(".npz")
        and calib.is_file()
        and not same_source
    ):
        conflicts.append(calib)  # would be replaced, and belongs to no artifact of this model
    if not conflicts:
        return []
    if opts.overwrite:
        return stale
    names = sorted({p.name for p in conflicts})
    shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    raise ExportError(
        f"{out} already holds artifacts of another model (or of unknown origin): {shown}",
        "pass --overwrite to replace that model's files of these names, or choose another --out",
    )


def _load_targets(opts: ExportOptions) -> tuple[list[_Target], dict[str, Any]]:
    from advedge.checkpoint import load_model, resolve_checkpoint
    from advedge.models.purified import Purified
    from advedge.purifier import load_purifier
    from advedge.purifier.checkpoint import check_purifier_fits, resolve_purifier

    ckpt = resolve_checkpoint(opts.model)
    model = load_model(ckpt)
    for p in model.parameters():
        p.requires_grad_(False)
    meta = dict(model.checkpoint_metadata)
    arch = meta["architecture"]
    common = {
        "classes": meta.get("class_names") or int(meta.get("num_classes") or 0),
        "input_shape": meta.get("input_shape"),
        "eps": opts.eps if opts.eps is not None else (meta.get("eps") or 8 / 255),
        "dataset": meta.get("dataset"),
        "advedge_version": advedge.__version__,
    }
    cls_meta = {
        **common,
        "kind": "classifier",
        "architecture": arch,
        "method": meta.get("method"),
        "source_sha256": sha256_file(ckpt),
    }
    if not opts.purifier:
        return [_Target(arch, "classifier", model, "logits", cls_meta, model, model)], meta
    pfile = resolve_purifier(opts.purifier)
    gen = load_purifier(pfile)
    for p in gen.parameters():
        p.requires_grad_(False)
    check_purifier_fits(gen, meta, str(pfile))
    gmeta = dict(gen.checkpoint_metadata)
    pur_meta = {
        **common,
        "kind": "purifier",
        "architecture": "purifier-generator",
        "method": gmeta.get("method"),
        "eps_r": gmeta.get("eps_r"),
        "source_sha256": sha256_file(pfile),
        "classifier_sha256": cls_meta["source_sha256"],
    }
    if opts.fuse:
        fused = Purified(gen, model).eval()
        fmeta = {
            **common,
            "kind": "fused",
            "architecture": f"purifier-generator+{arch}",
            "method": f"{gmeta.get('method')}+{meta.get('method')}",
            "eps_r": gmeta.get("eps_r"),
            "source_sha256": {
                "purifier": pur_meta["source_sha256"],
                "classifier": cls_meta["source_sha256"],
            },
        }
        return [_Target(f"{arch}-purified", "fused", fused, "logits", fmeta, fused, model)], meta
    return [
        _Target(arch, "classifier", model, "logits", cls_meta, model, model),
        _Target("purifier", "purifier", gen, "pixels", pur_meta, model, model),
    ], meta


def _load_test_images(opts: ExportOptions, meta: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    from advedge.data import load_dataset, stratified_subset

    source = opts.data
    if source is None and opts.calib_data and Path(opts.calib_data).is_dir():
        source = opts.calib_data
    if source is None:
        source = meta.get("dataset")
    if not source:
        raise UsageError("no test data for the parity gate", "pass --data DIR")
    try:
        ds = load_dataset(source, download=False)
    except DataError as exc:
        raise DataError(
            f"{exc.message} (test images are needed for the parity gate)", "pass --data DIR"
        ) from None
    want = list(meta.get("input_shape") or [])
    if want and list(ds.input_shape) != want:
        raise ExportError(
            f"the data's images are {list(ds.input_shape)} but the model takes {want}"
        )
    test = stratified_subset(ds.test, max(opts.parity_n, opts.report_n), opts.seed)
    # stratified_subset keeps the split's order (class by class in an image folder): shuffle, so
    # that any prefix (the parity images, the report images) covers every class
    order = np.random.default_rng(opts.seed).permutation(len(test))
    test = test.subset(order)
    x = test.x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return np.ascontiguousarray(x), test.y.astype(np.int64)


def _pgd(
    module: Any, x: np.ndarray, y: np.ndarray, *, eps: float, steps: int, seed: int
) -> np.ndarray:
    """PGD-``steps`` (L∞, step 2.5·eps/steps, uniform start) on the FP32 PyTorch module."""
    torch = require("torch", purpose="crafting adversarial examples")
    from advedge.attacks import PGD

    gen = torch.Generator().manual_seed(seed)
    attack = PGD(module, eps=eps, steps=steps, generator=gen)
    out = []
    for i in range(0, len(x), 128):
        xb = torch.from_numpy(x[i : i + 128])
        yb = torch.from_numpy(y[i : i + 128])
        out.append(attack(xb, yb).detach().numpy())
    return np.concatenate(out).astype(np.float32)


def _labels(classifier: Any, x: np.ndarray) -> np.ndarray:
    return TorchRunner(classifier).run(x, 256).argmax(axis=1)


def _parity(
    target: _Target,
    onnx_path: Path,
    precision: str,
    inputs: dict[str, np.ndarray],
    ref: dict[str, np.ndarray],
    ref_labels: dict[str, np.ndarray],
) -> dict[str, Any]:
    # INT8 parity checks the Q/DQ arithmetic as written (ONNX Runtime's basic level), which is
    # what TensorRT computes; ONNX Runtime's fused x86 int8 kernels are the report's business.
    runner = OrtRunner(onnx_path, optimization="basic" if precision == "int8" else "all")
    return _gate_runner(target, runner, onnx_path.name, precision, inputs, ref, ref_labels)


def _gate_runner(
    target: _Target,
    runner: Any,
    artifact: str,
    precision: str,
    inputs: dict[str, np.ndarray],
    ref: dict[str, np.ndarray],
    ref_labels: dict[str, np.ndarray],
) -> dict[str, Any]:
    figures = {}
    for kind, x in inputs.items():
        cand = runner.run(x, 256)
        if target.output == "pixels":
            figures[kind] = compare_outputs(
                ref[kind],
                cand,
                reference_labels=ref_labels[kind],
                candidate_labels=_labels(target.classifier, cand),
            )
        else:
            figures[kind] = compare_outputs(ref[kind], cand)
    n = len(next(iter(inputs.values())))
    base = TOLERANCES[precision]
    max_logits, max_pixels, min_agree = base.max_abs_logits, base.max_abs_pixels, base.min_agreement
    eps_r = target.metadata.get("eps_r")
    if target.output == "pixels" and eps_r:
        # the purifier's whole correction is bounded by eps_r: a pixel tolerance near eps_r would
        # pass a purifier that does nothing, so it is capped at eps_r / 2
        max_pixels = min(max_pixels, 0.5 * float(eps_r))
    if target.overrides.get("max_abs") is not None:
        max_logits = max_pixels = float(target.overrides["max_abs"])
    if target.overrides.get("min_agree") is not None:
        min_agree = float(target.overrides["min_agree"])
    tolerance = Tolerance(max_logits, max_pixels, min_agree)
    return gate(
        figures,
        precision=precision,
        output=target.output,
        n=n,
        artifact=artifact,
        tolerance=tolerance,
    ).to_dict()


def _accuracy_report(
    fp32_path: Path,
    low_path: Path,
    precision: str,
    x: np.ndarray,
    y: np.ndarray,
    x_adv: np.ndarray,
    *,
    max_drop: float,
    attack: dict[str, Any],
) -> dict[str, Any]:
    """Clean and transfer-robust accuracy of FP32 vs the low-precision artifact (ONNX Runtime).

    ``accuracy[precision]`` is what an ONNX Runtime CPU session runs by default (for INT8: its
    fused int8 kernels). For INT8, ``accuracy["int8_reference"]`` is the Q/DQ arithmetic as
    written (ONNX Runtime's basic optimisation level), which is what TensorRT reproduces; the
    two differ where ONNX Runtime's x86 kernels saturate. The warning fires when either loses
    more than ``max_drop`` points of clean accuracy.
    """
    runs = [("fp32", fp32_path, "all"), (precision, low_path, "all")]
    if precision == "int8":
        runs.append(("int8_reference", low_path, "basic"))
    acc = {}
    for label, path, level in runs:
        runner = OrtRunner(path, optimization=level)
        acc[label] = {
            "clean_acc": float(np.mean(runner.run(x, 256).argmax(1) == y)),
            "transfer_robust_acc": float(np.mean(runner.run(x_adv, 256).argmax(1) == y)),
        }
    drops = {
        label: {
            "clean": round(100 * (acc["fp32"]["clean_acc"] - a["clean_acc"]), 2),
            "transfer_robust": round(
                100 * (acc["fp32"]["transfer_robust_acc"] - a["transfer_robust_acc"]), 2
            ),
        }
        for label, a in acc.items()
        if label != "fp32"
    }
    report = {
        "runtime": "onnxruntime-cpu",
        "n": len(y),
        "accuracy": acc,
        "drop_points": drops[precision],
        "drop_points_by_run": drops,
        "max_drop_points": max_drop,
        "transfer_attack": {**attack, "kind": "transfer", "crafted_on": "fp32 pytorch model"},
        "warning": None,
    }
    lost = [
        f"{label} loses {d[kind]:.1f} points of {kind.replace('_', ' ')} accuracy"
        for label, d in drops.items()
        for kind in ("clean", "transfer_robust")
        if d[kind] > max_drop
    ]
    if lost:
        report["warning"] = (
            "; ".join(lost) + f" against fp32 (limit {max_drop:g}); try another "
            "--calib-method, a larger --calib-n, --calib-mix-adv or --keep-fp32"
        )
    return report


def _artifact_entry(path: Path, kind: str, precision: str, **extra: Any) -> dict[str, Any]:
    return {
        "path": path.name,
        "kind": kind,
        "precision": precision,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        **extra,
    }


def export_artifacts(
    opts: ExportOptions, *, status: Callable[[str], None] | None = None
) -> ExportReport:
    """Run the export described in the module docstring; returns what was written.

    Order: the options, the dependencies and ``out`` are checked first (``out`` not under a
    file, its folder writable); then the output lock of ``out`` is taken and held to the end
    (a second export into the same ``out`` is refused at once), staging folders a killed
    export left in ``out`` are removed, the checkpoints are loaded and what ``out`` already
    holds is checked (below); only then come the test images, the calibration set, the
    attack, the export and the gates. ``out`` is created when the first file is staged.

    **What ``out`` may already hold.** Artifacts are grouped by *name family*: the files
    ``NAME.<precision>...`` (``.onnx``, ``.engine``, ``.layers.json`` and their ``.json``
    sidecar) of one target ``NAME`` (``tiny_cnn``, ``purifier``, ``tiny_cnn-purified``). The
    origin of an artifact is the ``source_sha256`` its sidecar records (an engine's:
    ``artifact.source_sha256``; without a readable sidecar, the ONNX file's own metadata).

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

    Without ``overwrite`` any conflict refuses the export before any work (ExportError, exit
    code 1) naming the files. With ``overwrite`` the export runs; once every new artifact is
    staged (under temporary names in ``out``) and has passed its gates, the new files are
    renamed into place in a row (a rename that fails undoes the ones done, so ``out`` keeps
    its earlier files), and only then are the conflicting artifacts of this export's families
    that no new file replaced deleted, so a finished export leaves no family holding files of
    two origins (artifacts of other families are left as they are; their sidecars name their
    origin). The deleted files are listed in :attr:`ExportReport.removed`.

    Raises:
        UsageError: bad options, ``out`` a file or under a file (before any work).
        OutputLockedError: another process is writing ``out``.
        AdvedgeError: ``out`` cannot be written (read-only, no permission: before any work) or
            the disk filled up while writing (``cannot write PATH: the disk is full``); no
            partial file is left and earlier artifacts are intact.
        MissingDependencyError: onnx/onnxruntime, or TensorRT with ``trt``, not installed
            (checked before any work).
        CheckpointError, DataError, ExportError (incl. ParityError, conflicts with what ``out``
            holds): nothing is written.
    """
    say = status or (lambda msg: logger.info(msg))
    start = time.perf_counter()
    opts.validate()
    for mod in ("onnx", "onnxruntime", "onnxscript"):
        require(mod, purpose="advedge export")
    trt_mod = None
    backend = None
    if opts.trt:
        from advedge.export.tensorrt import BatchProfile, has_legacy_calibrator, load_tensorrt

        BatchProfile(opts.min_batch, opts.opt_batch, opts.max_batch)
        trt_mod = load_tensorrt()
        from advedge.export.tensorrt import cuda_backend

        backend = cuda_backend()  # no GPU or no buffer library: fail now, not after the export
        if opts.trt_calibrator != "qdq" and not has_legacy_calibrator(trt_mod):
            raise UsageError(
                f"TensorRT {trt_mod.__version__} has no implicit INT8 calibrator (removed in 11)",
                "use --trt-calibrator qdq (the explicit Q/DQ ONNX)",
            )
    out = check_out(opts.out)
    if opts.timing_cache:
        check_out_file(opts.timing_cache, option="--timing-cache")

    with quiet_onnxruntime(), output_lock(out):
        _remove_stale_staging(out, say)
        targets, meta = _load_targets(opts)
        for t in targets:
            t.overrides = {"max_abs": opts.parity_max_abs, "min_agree": opts.parity_min_agree}
        eps = float(opts.eps if opts.eps is not None else (meta.get("eps") or 8 / 255))
        input_shape = list(meta.get("input_shape") or [])
        stale = _check_existing(out, targets, opts)

        # the cheap inputs first: a wrong --data fails before the calibration set is built
        say(f"loading test images for the parity gate ({max(opts.parity_n, opts.report_n)})")
        x, y = _load_test_images(opts, meta)
        calib = None
        if opts.precision == "int8":
            calib = _calibration_set(opts, targets, eps, input_shape, say)

        report = ExportReport(out=out)
        try:
            _stage_and_install(
                opts,
                out,
                targets,
                x,
                y,
                eps=eps,
                input_shape=input_shape,
                calib=calib,
                report=report,
                say=say,
                backend=backend,
                stale=stale,
            )
        except OSError as exc:  # a full disk, a folder made read-only meanwhile
            raise _write_error(exc, out) from None
    report.seconds = time.perf_counter() - start
    return report


def _stage_and_install(
    opts: ExportOptions,
    out: Path,
    targets: list[_Target],
    x: np.ndarray,
    y: np.ndarray,
    *,
    eps: float,
    input_shape: list[int],
    calib: Any,
    report: ExportReport,
    say: Callable[[str], None],
    backend: Any,
    stale: list[Path],
) -> None:
    """Stage every artifact and gate it; then move the new files into ``out`` and remove the
    ``stale`` files that no new file replaced."""
    attack = {"name": "pgd", "eps": eps, "steps": opts.attack_steps, "norm": "Linf", "n": len(y)}
    timing = Path(opts.timing_cache) if opts.timing_cache else out / "timing.cache"
    with _staging(out) as stage:
        written: list[Path] = []
        adv_cache: dict[Any, np.ndarray] = {}
        stage_timing = stage / ".timing.cache"
        if opts.trt and timing.is_file():
            shutil.copyfile(timing, stage_timing)
        for target in targets:
            # the attacked model's checkpoints, the images and the attack: a second export of the
            # same model in this process (another precision) reuses the examples
            crafted_on = (
                target.metadata["source_sha256"]
                if target.kind != "purifier"
                else target.metadata["classifier_sha256"]
            )
            key = (
                json.dumps(crafted_on, sort_keys=True),
                eps,
                opts.attack_steps,
                opts.seed,
                hashlib.sha256(x.tobytes()).hexdigest(),
            )
            if key in _ADV_MEMO:
                adv_cache[key] = _ADV_MEMO[key]
            if key not in adv_cache:
                say(
                    f"crafting PGD-{opts.attack_steps} examples on the FP32 {target.metadata['architecture'] if target.kind != 'purifier' else 'classifier'} ({len(y)} images)"
                )
                adv_cache[key] = _pgd(
                    target.attack_module, x, y, eps=eps, steps=opts.attack_steps, seed=opts.seed
                )
                _ADV_MEMO[key] = adv_cache[key]
                while len(_ADV_MEMO) > 4:
                    _ADV_MEMO.pop(next(iter(_ADV_MEMO)))
            x_adv = adv_cache[key]
            # x is shuffled (seeded), so the first parity_n images cover every class
            inputs = {"clean": x[: opts.parity_n], "adversarial": x_adv[: opts.parity_n]}
            torch_runner = TorchRunner(target.module)
            ref = {k: torch_runner.run(v, 256) for k, v in inputs.items()}
            ref_labels = (
                {k: _labels(target.classifier, v) for k, v in ref.items()}
                if target.output == "pixels"
                else {}
            )

            say(f"exporting {target.name} (fp32, opset {opts.opset})")
            fp32 = stage / f"{target.name}.fp32.onnx"
            from advedge.export.onnx_export import export_onnx

            export_onnx(
                target.module,
                fp32,
                input_shape=input_shape,
                output_name="purified" if target.output == "pixels" else "logits",
                opset=opts.opset,
                metadata={**target.metadata, "precision": "fp32"},
            )
            parity32 = _parity(target, fp32, "fp32", inputs, ref, ref_labels)
            say(f"parity fp32 ok: {_fmt(parity32)}")
            files = [(fp32, "fp32", {"parity": parity32})]
            final = fp32
            if opts.precision == "fp16":
                from advedge.export.fp16 import convert_fp16

                final = convert_fp16(fp32, stage / f"{target.name}.fp16.onnx")
                files.append(
                    (
                        final,
                        "fp16",
                        {"parity": _parity(target, final, "fp16", inputs, ref, ref_labels)},
                    )
                )
                say(f"parity fp16 ok: {_fmt(files[-1][2]['parity'])}")
            elif opts.precision == "int8":
                final, extra = _quantize(opts, target, fp32, stage, calib)
                extra["parity"] = _parity(target, final, "int8", inputs, ref, ref_labels)
                say(f"parity int8 ok: {_fmt(extra['parity'])}")
                files.append((final, "int8", extra))
            if opts.precision != "fp32" and target.output == "logits":
                n_rep = min(opts.report_n, len(y))
                say(f"accuracy report {opts.precision} vs fp32 on {n_rep} test images")
                acc = _accuracy_report(
                    fp32,
                    final,
                    opts.precision,
                    x[:n_rep],
                    y[:n_rep],
                    x_adv[:n_rep],
                    max_drop=opts.max_drop,
                    attack={**attack, "n": n_rep},
                )
                files[-1][2]["accuracy_report"] = acc
                if acc["warning"]:
                    report.warnings.append(f"{target.name}: {acc['warning']}")
            for path, precision, extra in files:
                side = {
                    **read_onnx_metadata(path),
                    "file": path.name,
                    "sha256": sha256_file(path),
                    **extra,
                }
                if extra.get("accuracy_report", {}).get("warning"):
                    side["accuracy_warning"] = extra["accuracy_report"]["warning"]
                write_sidecar(sidecar_path(path), side)
                written += [path, sidecar_path(path)]
                report.artifacts.append(
                    _artifact_entry(
                        path,
                        target.kind,
                        precision,
                        **{
                            k: v
                            for k, v in extra.items()
                            if k in ("parity", "accuracy_report", "calibration")
                        },
                    )
                )
            if opts.trt:
                written += _build_trt(
                    opts,
                    target,
                    final,
                    fp32,
                    stage,
                    calib,
                    report,
                    say,
                    backend=backend,
                    timing=stage_timing,
                    parity_inputs=(inputs, ref, ref_labels),
                )
        if calib is not None and not str(opts.calib_data).endswith(".npz"):
            written.append(stage / "calibration.npz")
        # everything is staged (in out, under temporary names) and has passed its gates: only
        # now may anything in out change. Every new file is renamed into place in a row (undone
        # if a rename fails, so out keeps its earlier files); only then are the stale files
        # that no new file replaced removed.
        pairs = [(path, out / path.name) for path in written if path.exists()]
        removed = install(pairs, [path for path in stale if path.is_file()])
        report.removed += [path.name for path in removed]
        if report.removed:
            say(f"removed another model's {', '.join(report.removed)} (--overwrite)")
        if opts.trt and stage_timing.is_file():
            timing.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage_timing, timing)
        for entry in report.artifacts:
            entry["path"] = str(out / entry["path"])


def _fmt(parity: dict[str, Any]) -> str:
    return "; ".join(
        f"{k} max|Δ| {v['max_abs']:.2g}, agree {100 * v['agreement']:.1f}%"
        for k, v in parity["figures"].items()
    )


def _calibration_set(
    opts: ExportOptions,
    targets: list[_Target],
    eps: float,
    input_shape: list[int],
    say: Callable[[str], None],
) -> Any:
    from advedge.calibration import build_calibration_set, check_fits, load_calibration_set

    src = Path(str(opts.calib_data))
    if src.suffix == ".npz":
        calib = load_calibration_set(src)
        say(f"calibration set {src} ({len(calib)} images, sha256 {calib.sha256[:12]})")
    else:
        say(
            f"building the calibration set: {opts.calib_n} training images, {opts.calib_mix_adv:.0%} adversarial"
        )
        calib = build_calibration_set(
            src,
            download=False,
            n=opts.calib_n,
            seed=opts.seed,
            mix_adv=opts.calib_mix_adv,
            model=targets[0].attack_module if opts.calib_mix_adv > 0 else None,
            eps=eps,
        )
    check_fits(calib, input_shape, opts.calib_batch)
    return calib


def _quantize(
    opts: ExportOptions, target: _Target, fp32: Path, stage: Path, calib: Any
) -> tuple[Path, dict[str, Any]]:
    from advedge.calibration import quantize_qdq, save_calibration_set

    onnx = require("onnx", purpose="INT8 quantisation")
    if not (stage / "calibration.npz").exists() and not str(opts.calib_data).endswith(".npz"):
        save_calibration_set(calib, stage / "calibration.npz")
    cpu = opts.int8_target == "onnxruntime-cpu"
    int8 = stage / f"{target.name}.{'int8-ortcpu' if cpu else 'int8'}.onnx"
    keep: Any = opts.keep_fp32
    if keep not in ("auto", "none"):
        keep = [s for s in keep.split(",") if s]
    result = quantize_qdq(
        fp32,
        int8,
        calib,
        method=opts.calib_method,
        batch_size=opts.calib_batch,
        keep_fp32=keep,
        cache_dir=opts.cache_dir,
        target=opts.int8_target,
    )
    model = onnx.load(str(int8))
    set_onnx_metadata(
        model, {**read_onnx_metadata(fp32), "precision": "int8", "int8_target": opts.int8_target}
    )
    onnx.save_model(model, str(int8))
    check_onnx(int8)
    extra = {
        "calibration": {
            "method": result.method,
            "n": len(calib),
            "calib_sha256": result.calib_sha256,
            "mix_adv": calib.meta.get("mix_adv"),
            "fp32_nodes": list(result.excluded_nodes),
            "qdq_pairs": result.n_qdq_pairs,
            "cache": str(result.cache_path) if result.cache_path else None,
            "cache_hit": result.cache_hit,
            "target": opts.int8_target,
            "symmetric": not cpu,
            "per_channel_weights": True,
        }
    }
    return int8, extra


def _build_trt(
    opts: ExportOptions,
    target: _Target,
    final: Path,
    fp32: Path,
    stage: Path,
    calib: Any,
    report: ExportReport,
    say: Callable[[str], None],
    *,
    backend: Any,
    timing: Path,
    parity_inputs: tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]],
) -> list[Path]:
    """Build the engine, then gate it like the ONNX: the engine itself runs the parity images."""
    from advedge.export.tensorrt import BatchProfile, TrtRunner, build_engine, load_tensorrt

    trt = load_tensorrt()
    profile = BatchProfile(opts.min_batch, opts.opt_batch, opts.max_batch)
    calibrator = None
    precision = opts.precision
    source = final
    cache_file = None
    if opts.trt_calibrator != "qdq":
        from advedge.calibration import make_legacy_calibrator

        method = opts.trt_calibrator.split("-", 1)[1]
        # keyed by the model and the set, so a cache is reused only for what it was made from
        cache_name = (
            f"{target.name}.{sha256_file(fp32)[:12]}-{calib.sha256[:12]}.{method}.calib.cache"
        )
        cache_file = stage / cache_name
        if (Path(opts.out) / cache_name).is_file():
            shutil.copyfile(Path(opts.out) / cache_name, cache_file)
        calibrator = make_legacy_calibrator(
            trt,
            calib,
            method=method,
            cache_file=cache_file,
            batch_size=opts.calib_batch,
            alloc=backend.alloc,
            copy_to_device=backend.to_device,
        )
        precision, source = "int8-legacy", fp32
    say(
        f"building the TensorRT {trt.__version__} engine for {target.name} ({precision}, "
        f"batch {profile.min_batch}-{profile.max_batch})"
    )
    build = build_engine(
        source,
        stage,
        name=target.name,
        precision=precision,
        profile=profile,
        workspace_mib=opts.workspace_mib,
        timing_cache=timing,
        legacy_calibrator=calibrator,
        backend=backend,
    )
    inputs, ref, ref_labels = parity_inputs
    runner = TrtRunner(build.engine, backend=backend)
    parity = _gate_runner(
        target,
        runner,
        build.engine.name,
        "int8" if precision.startswith("int8") else precision,
        inputs,
        ref,
        ref_labels,
    )
    say(f"parity of the engine ok: {_fmt(parity)}")
    build.info["parity"] = parity
    # what the engine computes, for bench and report: the ONNX metadata it was built from
    build.info["artifact"] = {
        k: target.metadata.get(k)
        for k in (
            "kind",
            "architecture",
            "classes",
            "input_shape",
            "eps",
            "source_sha256",
            "method",
        )
    }
    write_sidecar(build.sidecar, build.info)
    report.artifacts.append(
        _artifact_entry(build.engine, target.kind, precision, engine=build.info, parity=parity)
    )
    paths = [build.engine, build.layers, build.sidecar]
    if cache_file is not None and cache_file.is_file():
        paths.append(cache_file)
    return paths


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

    Raises:
        UsageError: bad options or paths (checked before any work), ``out`` equal to the
            source, under a file or a folder.
        OutputLockedError: another process is writing ``out``.
        AdvedgeError: a folder that is read-only or not writable, or a full disk.
        ExportError, DataError, CheckpointError: as :func:`advedge.calibration.quantize_qdq`,
            :func:`advedge.data.load_dataset` and :func:`advedge.checkpoint.load_model`.
    """
    from advedge.calibration import (
        build_calibration_set,
        check_fits,
        load_calibration_set,
        quantize_qdq,
    )
    from advedge.calibration import save_calibration_set as save_set_fn
    from advedge.calibration.quantize import TARGETS

    say = status or (lambda msg: logger.info(msg))
    onnx_path, out = Path(onnx_path), Path(out)
    if method not in CALIB_METHODS:
        raise UsageError(
            f"unknown calibration method {method!r}", "choose entropy, minmax or percentile"
        )
    if target not in TARGETS:
        raise UsageError(f"unknown INT8 target {target!r}", "choose tensorrt or onnxruntime-cpu")
    if mix_adv > 0 and model is None:
        raise UsageError("--mix-adv needs --model (the FP32 model the examples are crafted on)")
    if not 0.0 <= mix_adv <= 1.0:
        raise UsageError(f"--mix-adv must be in [0, 1], got {mix_adv}")
    for name, value in (("--n", n), ("--batch-size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    if out.suffix != ".onnx":
        raise UsageError(f"--out must name a .onnx file, got {out}")
    if not onnx_path.is_file():
        raise UsageError(f"--onnx {onnx_path} does not exist")
    if out.resolve() == onnx_path.resolve():
        raise UsageError("--out is the FP32 source itself", "write the INT8 model to another file")
    check_out_file(out)
    set_path = None if save_set is None else Path(save_set)
    if set_path is not None:
        if set_path.suffix != ".npz":
            raise UsageError(f"--save-set must name a .npz file, got {set_path}")
        check_out_file(set_path, option="--save-set")
    onnx = require("onnx", purpose="advedge calibrate")
    keep: Any = (
        keep_fp32 if keep_fp32 in ("auto", "none") else [s for s in keep_fp32.split(",") if s]
    )

    with quiet_onnxruntime():
        check_onnx(onnx_path)
        meta = read_onnx_metadata(onnx_path)
        want = _onnx_image_shape(onnx, onnx_path)
        # the data, before anything is created
        calib = dataset = torch_model = None
        if data.endswith(".npz"):
            calib = load_calibration_set(data)
            check_fits(calib, want, batch_size)
        else:
            from advedge.data import load_dataset

            dataset = load_dataset(data, download=False)
            _check_calibration_source(dataset, want, n=n, batch_size=batch_size)
            if model is not None and mix_adv > 0:
                from advedge.checkpoint import load_model

                torch_model = load_model(model)

        with output_lock(out):
            _remove_stale_temps(out)
            if calib is None:
                say(f"building the calibration set: {n} training images, {mix_adv:.0%} adversarial")
                calib = build_calibration_set(
                    dataset, n=n, seed=seed, mix_adv=mix_adv, model=torch_model, eps=eps
                )
                check_fits(calib, want, batch_size)
            # everything is computed away from out: its folder appears only with the file
            with tempfile.TemporaryDirectory(prefix="advedge-calibrate-") as tmp_name:
                tmp = Path(tmp_name)
                staged = tmp / out.name
                result = quantize_qdq(
                    onnx_path,
                    staged,
                    calib,
                    method=method,
                    batch_size=batch_size,
                    keep_fp32=keep,
                    cache_dir=cache_dir,
                    target=target,
                )
                quantized = onnx.load(str(staged))
                set_onnx_metadata(quantized, {**meta, "precision": "int8", "int8_target": target})
                onnx.save_model(quantized, str(staged))
                check_onnx(staged)
                payload = {
                    "schema": "advedge.calibrate/1",
                    "onnx": str(out),
                    "source_onnx": str(onnx_path),
                    "bytes": staged.stat().st_size,
                    "target": target,
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
                side = write_sidecar(
                    tmp / sidecar_path(out).name,
                    {**meta, "precision": "int8", "int8_target": target, "calibration": payload},
                )
                files = [(staged, out), (side, sidecar_path(out))]
                if set_path is not None:
                    files.append((save_set_fn(calib, tmp / "set.npz"), set_path))
                install_files(files)
    return payload


def _onnx_image_shape(onnx: Any, path: Path) -> list[Any]:
    """``[C, H, W]`` of the model's image input (symbolic axes as names or None)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # check_onnx read it already; a race or a huge file
        raise ExportError(f"{path} is not a readable ONNX file ({type(exc).__name__})") from None
    _, dims = graph_input(model, None)
    return dims[1:]


def _check_calibration_source(dataset: Any, want: list[Any], *, n: int, batch_size: int) -> None:
    """What :func:`~advedge.calibration.build_calibration_set` and
    :func:`~advedge.calibration.check_fits` would refuse, known before the set is drawn."""
    from advedge.calibration.sets import calibration_source

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
