"""``advedge export``: checkpoint(s) -> checked ONNX (+ FP16 / QDQ INT8) -> optional engine.

For each artifact (a classifier; a purifier and a classifier side by side; or both fused into one
graph, purifier -> classifier, one input, logits out):

1. export the FP32 ONNX (opset 18, dynamic batch, constants folded, full checker);
2. the parity gate against PyTorch on real test images, clean and adversarial (PGD-20 crafted
   on the FP32 PyTorch model being exported; for a purifier alone, on its classifier);
3. another precision: the converter of :data:`~advedge.export.precisions.PRECISIONS` (FP16 with
   FP32 I/O; INT8: build or load the calibration set, quantise to symmetric QDQ), check, gate,
   then the on-the-spot accuracy report (:func:`advedge.export.gates.accuracy_report`): clean
   and transfer-robust accuracy of FP32 vs the new precision under ONNX Runtime, with a loud
   warning (also written into the sidecar) when it loses more than ``max_drop`` points;
4. with ``trt``: a strongly typed TensorRT engine from that ONNX.

Everything is written into a hidden staging folder inside ``out`` and moved into place only when
every step has passed: a failure leaves no partial artifact, and earlier artifacts in ``out`` are
replaced only by complete new ones. ``out`` itself is created only when the first file is staged.
Before any work, ``out`` is checked (not under a file, writable), the output lock
(:func:`advedge.locks.output_lock`) is taken, so a second writer is refused at once, and what
``out`` already holds is checked (:func:`advedge.export.artifacts.check_existing`: no folder
ever holds a mix of two models' artifacts of one name). Staging folders left by an export that
was killed are removed by the next export into ``out``. ONNX Runtime's log lines and numpy's
warnings are logged at debug, so an error stays one line; a full disk is reported as ``cannot
write PATH: the disk is full``. torch is imported inside the functions.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from advedge.calibration import (
    CalibrationSet,
    QuantizeOptions,
    build_calibration_set,
    check_fits,
    has_legacy_calibrator,
    load_calibration_set,
)
from advedge.calibration.quantize import check_method, check_target
from advedge.export._deps import quiet_onnxruntime, require
from advedge.export.artifacts import check_existing, remove_stale_staging, staging, write_error
from advedge.export.gates import (
    ParityImages,
    accuracy_report,
    artifact_entry,
    gate_onnx,
    gate_runner,
    summary,
)
from advedge.export.graph import read_onnx_metadata, sidecar_path, write_sidecar
from advedge.export.onnx_export import DEFAULT_OPSET, SUPPORTED_OPSETS, export_onnx
from advedge.export.precisions import PRECISIONS, Conversion
from advedge.export.targets import (
    AdversarialExamples,
    ExportTarget,
    load_targets,
    load_test_images,
    with_calibration_default,
)

from advedge.errors import UsageError
from advedge.locks import output_lock
from advedge.outputs import check_out, check_out_file, install
from advedge.utils import sha256_file

__all__ = [
    "PRECISIONS",
    "TRT_CALIBRATORS",
    "AdversarialExamples",
    "ExportOptions",
    "ExportReport",
    "export_artifacts",
]

logger = logging.getLogger(__name__)

#: ``--trt-calibrator``: the explicit Q/DQ ONNX, or TensorRT 10's implicit calibrators.
TRT_CALIBRATORS = ("qdq", "legacy-entropy", "legacy-minmax")


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
        """Refuse bad option values before any work (exit code 2).

        The precision's own rules (what it needs, which options it accepts) come from
        :data:`~advedge.export.precisions.PRECISIONS`.

        Raises:
            UsageError: the first bad value, in one line.
        """
        if self.precision not in PRECISIONS:
            raise UsageError(
                f"precision {self.precision!r} is not available for ONNX artifacts",
                _choose(PRECISIONS),
            )
        precision = PRECISIONS[self.precision]
        check_method(self.calib_method)
        if self.trt_calibrator not in TRT_CALIBRATORS:
            raise UsageError(
                f"unknown TensorRT calibrator {self.trt_calibrator!r}", _choose(TRT_CALIBRATORS)
            )
        if self.trt_calibrator != "qdq" and (not precision.legacy_calibrator or not self.trt):
            legacy = " or ".join(n for n, p in PRECISIONS.items() if p.legacy_calibrator)
            raise UsageError(f"a legacy calibrator needs --precision {legacy} and --trt")
        check_target(self.int8_target)
        if self.int8_target != "tensorrt" and self.trt:
            raise UsageError(
                "--int8-target onnxruntime-cpu cannot be built into a TensorRT engine",
                "TensorRT needs symmetric int8 Q/DQ: use --int8-target tensorrt with --trt",
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
        if self.opset not in SUPPORTED_OPSETS:
            raise UsageError(
                f"opset {self.opset} is not supported",
                f"use {SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1} "
                f"(default {DEFAULT_OPSET})",
            )

    def quantize_options(self) -> QuantizeOptions:
        """The options of the INT8 quantisation (``--calib-method`` ... ``--int8-target``)."""
        return QuantizeOptions(
            self.calib_method, self.calib_batch, self.keep_fp32, self.cache_dir, self.int8_target
        )

    def builds_calibration_set(self) -> bool:
        """Whether the export draws a calibration set from a data directory (and saves it)."""
        return PRECISIONS[self.precision].needs_calibration and not str(self.calib_data).endswith(
            ".npz"
        )

    def test_data(self) -> str | None:
        """The test images' source: ``--data``, else a ``--calib-data`` folder, else None (the
        dataset the checkpoint records)."""
        if self.data is None and self.calib_data and Path(self.calib_data).is_dir():
            return self.calib_data
        return self.data


def _choose(names: Iterable[str]) -> str:
    """``"choose a, b or c"``."""
    *first, last = list(names)
    return f"choose {', '.join(first)} or {last}" if first else f"choose {last}"


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
        """The ``advedge.export/1`` JSON document."""
        return {
            "schema": "advedge.export/1",
            "out": str(self.out),
            "artifacts": self.artifacts,
            "warnings": self.warnings,
            "removed": self.removed,
            "seconds": round(self.seconds, 2),
        }


def export_artifacts(
    opts: ExportOptions,
    *,
    status: Callable[[str], None] | None = None,
    examples: AdversarialExamples | None = None,
) -> ExportReport:
    """Run the export described in the module docstring; returns what was written.

    Order: the options, the dependencies and ``out`` are checked first (``out`` not under a
    file, its folder writable); then the output lock of ``out`` is taken and held to the end
    (a second export into the same ``out`` is refused at once), staging folders a killed
    export left in ``out`` are removed, the checkpoints are loaded and what ``out`` already
    holds is checked (:func:`advedge.export.artifacts.check_existing` states the rules); only
    then come the test images, the calibration set, the attack, the export and the gates.
    ``out`` is created when the first file is staged.

    Without ``overwrite`` a conflict with what ``out`` holds refuses the export before any
    work. Once every new artifact is staged (under temporary names in ``out``) and has passed
    its gates, the new files are renamed into place in a row (a rename that fails undoes the
    ones done); only then are the conflicting files that no new file replaced deleted
    (``overwrite``; listed in :attr:`ExportReport.removed`).

    Args:
        opts: The options.
        status: Called with one-line progress messages (default: logged at info).
        examples: The PGD examples of earlier exports by the same caller, reused when the
            model, images and attack are the same (``advedge pipeline`` exports one model at
            two precisions); None: crafted for this export only.

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
    backend = _check_tensorrt(opts) if opts.trt else None
    out = check_out(opts.out)
    if opts.timing_cache:
        check_out_file(opts.timing_cache, option="--timing-cache")
    opts = with_calibration_default(opts, say)  # cheap: the checkpoint's records only

    with quiet_onnxruntime(), output_lock(out):
        if examples is None:
            examples = AdversarialExamples()
        report = _export_locked(opts, out, say, backend, examples)
    report.seconds = time.perf_counter() - start
    return report


def _export_locked(
    opts: ExportOptions,
    out: Path,
    say: Callable[[str], None],
    backend: Any,
    examples: AdversarialExamples,
) -> ExportReport:
    """The export, under the output lock of ``out`` (see :func:`export_artifacts`)."""
    remove_stale_staging(out, say)
    targets, meta = load_targets(opts.model, opts.purifier, fuse=opts.fuse, eps=opts.eps)
    for t in targets:
        t.overrides = {"max_abs": opts.parity_max_abs, "min_agree": opts.parity_min_agree}
    stale = check_existing(
        out, targets, writes_calibration_set=opts.builds_calibration_set(), overwrite=opts.overwrite
    )
    job = _Export(
        opts,
        out,
        eps=float(opts.eps if opts.eps is not None else (meta.get("eps") or 8 / 255)),
        input_shape=list(meta.get("input_shape") or []),
        report=ExportReport(out=out),
        say=say,
        backend=backend,
        examples=examples,
    )
    # the cheap inputs first: a wrong --data fails before the calibration set is built
    n = max(opts.parity_n, opts.report_n)
    say(f"loading test images for the parity gate ({n})")
    job.x, job.y = load_test_images(opts.test_data(), meta, n=n, seed=opts.seed)
    if PRECISIONS[opts.precision].needs_calibration:
        job.calib = _calibration_set(job, targets)
    try:
        _stage_and_install(job, targets, stale)
    except OSError as exc:  # a full disk, a folder made read-only meanwhile
        raise write_error(exc, out) from None
    return job.report


def _check_tensorrt(opts: ExportOptions) -> Any:
    """TensorRT, a GPU and a buffer library, before any work; returns the CUDA backend."""
    from advedge.export.tensorrt import BatchProfile, cuda_backend, load_tensorrt

    BatchProfile(opts.min_batch, opts.opt_batch, opts.max_batch)
    trt_mod = load_tensorrt()
    backend = cuda_backend()  # no GPU or no buffer library: fail now, not after the export
    if opts.trt_calibrator != "qdq" and not has_legacy_calibrator(trt_mod):
        raise UsageError(
            f"TensorRT {trt_mod.__version__} has no implicit INT8 calibrator (removed in 11)",
            "use --trt-calibrator qdq (the explicit Q/DQ ONNX)",
        )
    return backend


@dataclass
class _Export:
    """One export under way: its options and what its steps share."""

    opts: ExportOptions
    out: Path
    eps: float
    input_shape: list[int]
    report: ExportReport
    say: Callable[[str], None]
    backend: Any
    examples: AdversarialExamples
    x: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    y: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    calib: CalibrationSet | None = None
    stage: Path = Path()

    @property
    def stage_timing(self) -> Path:
        """The TensorRT timing cache while staged."""
        return self.stage / ".timing.cache"


def _calibration_set(job: _Export, targets: list[ExportTarget]) -> CalibrationSet:
    """The calibration set: loaded from a saved .npz, or drawn from a data directory."""
    opts = job.opts
    src = Path(str(opts.calib_data))
    if src.suffix == ".npz":
        calib = load_calibration_set(src)
        job.say(f"calibration set {src} ({len(calib)} images, sha256 {calib.sha256[:12]})")
    else:
        job.say(
            f"building the calibration set: {opts.calib_n} training images, "
            f"{opts.calib_mix_adv:.0%} adversarial"
        )
        calib = build_calibration_set(
            src,
            download=False,
            n=opts.calib_n,
            seed=opts.seed,
            mix_adv=opts.calib_mix_adv,
            model=targets[0].attack_module if opts.calib_mix_adv > 0 else None,
            eps=job.eps,
        )
    check_fits(calib, job.input_shape, opts.calib_batch)
    return calib


def _stage_and_install(job: _Export, targets: list[ExportTarget], stale: list[Path]) -> None:
    """Stage every artifact and gate it; then move the new files into ``out`` and remove the
    ``stale`` files that no new file replaced."""
    opts, out = job.opts, job.out
    timing = Path(opts.timing_cache) if opts.timing_cache else out / "timing.cache"
    with staging(out) as job.stage:
        written: list[Path] = []
        if opts.trt and timing.is_file():
            shutil.copyfile(timing, job.stage_timing)
        for target in targets:
            written += _export_target(job, target)
        if job.calib is not None and opts.builds_calibration_set():
            written.append(job.stage / "calibration.npz")
        # everything is staged (in out, under temporary names) and has passed its gates: only
        # now may anything in out change. Every new file is renamed into place in a row (undone
        # if a rename fails, so out keeps its earlier files); only then are the stale files
        # that no new file replaced removed.
        pairs = [(path, out / path.name) for path in written if path.exists()]
        removed = install(pairs, [path for path in stale if path.is_file()])
        job.report.removed += [path.name for path in removed]
        if job.report.removed:
            job.say(f"removed another model's {', '.join(job.report.removed)} (--overwrite)")
        if opts.trt and job.stage_timing.is_file():
            timing.parent.mkdir(parents=True, exist_ok=True)
            os.replace(job.stage_timing, timing)
        for entry in job.report.artifacts:
            entry["path"] = str(out / entry["path"])


def _export_target(job: _Export, target: ExportTarget) -> list[Path]:
    """Export, convert and gate one target in the staging folder; returns the files staged."""
    opts, x, y = job.opts, job.x, job.y
    x_adv = job.examples.get(
        target, x, y, eps=job.eps, steps=opts.attack_steps, seed=opts.seed, say=job.say
    )
    # x is shuffled (seeded), so the first parity_n images cover every class
    images = ParityImages.of(
        target, {"clean": x[: opts.parity_n], "adversarial": x_adv[: opts.parity_n]}
    )
    job.say(f"exporting {target.name} (fp32, opset {opts.opset})")
    fp32 = job.stage / f"{target.name}.fp32.onnx"
    export_onnx(
        target.module,
        fp32,
        input_shape=job.input_shape,
        output_name="purified" if target.output == "pixels" else "logits",
        opset=opts.opset,
        metadata={**target.metadata, "precision": "fp32"},
    )
    parity32 = gate_onnx(target, fp32, "fp32", images)
    job.say(f"parity fp32 ok: {summary(parity32)}")
    files = [(fp32, "fp32", {"parity": parity32})]
    final = fp32
    precision = PRECISIONS[opts.precision]
    if precision.convert is not None:
        final, extra = precision.convert(
            Conversion(
                fp32,
                job.stage,
                target.name,
                job.calib,
                opts.quantize_options(),
                save_set=opts.builds_calibration_set(),
            )
        )
        if extra.get("warning"):
            job.report.warnings.append(f"{target.name}: {extra.pop('warning')}")
        extra["parity"] = gate_onnx(target, final, opts.precision, images)
        job.say(f"parity {opts.precision} ok: {summary(extra['parity'])}")
        files.append((final, opts.precision, extra))
        if target.output == "logits":
            _report_accuracy(job, target, fp32, final, x_adv, extra)
    written = _write_sidecars(job, target, files)
    if opts.trt:
        written += _build_trt(job, target, final, fp32, images)
    return written


def _report_accuracy(
    job: _Export,
    target: ExportTarget,
    fp32: Path,
    final: Path,
    x_adv: np.ndarray,
    extra: dict[str, Any],
) -> None:
    """The accuracy report of the converted artifact vs FP32, into ``extra`` (and a warning)."""
    opts = job.opts
    n_rep = min(opts.report_n, len(job.y))
    job.say(f"accuracy report {opts.precision} vs fp32 on {n_rep} test images")
    attack = {"name": "pgd", "eps": job.eps, "steps": opts.attack_steps, "norm": "Linf"}
    acc = accuracy_report(
        fp32,
        final,
        opts.precision,
        job.x[:n_rep],
        job.y[:n_rep],
        x_adv[:n_rep],
        max_drop=opts.max_drop,
        attack={**attack, "n": n_rep},
    )
    extra["accuracy_report"] = acc
    if acc["warning"]:
        job.report.warnings.append(f"{target.name}: {acc['warning']}")


def _write_sidecars(
    job: _Export, target: ExportTarget, files: list[tuple[Path, str, dict[str, Any]]]
) -> list[Path]:
    """Write each ONNX file's sidecar and its report entry; returns the files and sidecars."""
    written: list[Path] = []
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
        shown = {
            k: v for k, v in extra.items() if k in ("parity", "accuracy_report", "calibration")
        }
        job.report.artifacts.append(artifact_entry(path, target.kind, precision, **shown))
    return written


def _build_trt(
    job: _Export, target: ExportTarget, final: Path, fp32: Path, images: ParityImages
) -> list[Path]:
    """Build the engine, then gate it like the ONNX: the engine itself runs the parity images."""
    from advedge.export.runtime.tensorrt import TrtRunner
    from advedge.export.tensorrt import BatchProfile, build_engine, load_tensorrt

    opts = job.opts
    trt = load_tensorrt()
    profile = BatchProfile(opts.min_batch, opts.opt_batch, opts.max_batch)
    calibrator, cache_file = None, None
    precision, source = opts.precision, final
    if opts.trt_calibrator != "qdq":
        calibrator, cache_file = _legacy_calibrator(job, target, fp32, trt)
        precision, source = f"{opts.precision}-legacy", fp32
    job.say(
        f"building the TensorRT {trt.__version__} engine for {target.name} ({precision}, "
        f"batch {profile.min_batch}-{profile.max_batch})"
    )
    build = build_engine(
        source,
        job.stage,
        name=target.name,
        precision=precision,
        profile=profile,
        workspace_mib=opts.workspace_mib,
        timing_cache=job.stage_timing,
        legacy_calibrator=calibrator,
        backend=job.backend,
    )
    runner = TrtRunner(build.engine, backend=job.backend)
    parity = gate_runner(target, runner, build.engine.name, opts.precision, images)
    job.say(f"parity of the engine ok: {summary(parity)}")
    build.info["parity"] = parity
    # what the engine computes, for bench and report: the ONNX metadata it was built from
    build.info["artifact"] = {k: target.metadata.get(k) for k in _ENGINE_ARTIFACT_KEYS}
    write_sidecar(build.sidecar, build.info)
    job.report.artifacts.append(
        artifact_entry(build.engine, target.kind, precision, engine=build.info, parity=parity)
    )
    paths = [build.engine, build.layers, build.sidecar]
    if cache_file is not None and cache_file.is_file():
        paths.append(cache_file)
    return paths


#: The ONNX metadata an engine's sidecar records under ``artifact``.
_ENGINE_ARTIFACT_KEYS = (
    "kind",
    "architecture",
    "classes",
    "input_shape",
    "eps",
    "source_sha256",
    "method",
)


def _legacy_calibrator(
    job: _Export, target: ExportTarget, fp32: Path, trt: Any
) -> tuple[Any, Path]:
    """TensorRT 10's implicit calibrator on the calibration set, and its cache file (staged;
    an earlier one in ``out`` of the same model and set is reused)."""
    from advedge.calibration import make_legacy_calibrator

    opts = job.opts
    if job.calib is None:
        raise ValueError("a legacy calibrator needs the calibration set")
    method = opts.trt_calibrator.split("-", 1)[1]
    # keyed by the model and the set, so a cache is reused only for what it was made from
    cache_name = (
        f"{target.name}.{sha256_file(fp32)[:12]}-{job.calib.sha256[:12]}.{method}.calib.cache"
    )
    cache_file = job.stage / cache_name
    if (job.out / cache_name).is_file():
        shutil.copyfile(job.out / cache_name, cache_file)
    calibrator = make_legacy_calibrator(
        trt,
        job.calib,
        method=method,
        cache_file=cache_file,
        batch_size=opts.calib_batch,
        alloc=job.backend.alloc,
        copy_to_device=job.backend.to_device,
    )
    return calibrator, cache_file
