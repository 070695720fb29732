"""``advedge doctor``: prove the deploy toolchain on this machine, end to end.

1. **Versions** (:mod:`advedge.workflow.toolchain`): Python, advedge, PyTorch, CUDA, cuDNN,
   ONNX, ONNX Runtime and its providers, TensorRT, pycuda, the NVIDIA driver, the GPUs and their
   compute capability, a Jetson's power mode and clocks.
2. **Backends**: for each registered runner backend (:data:`~advedge.export.runtime.BACKENDS`),
   the artifact it runs is made from one tiny seeded classifier (``tiny_cnn``, 10 classes,
   3x32x32) in a temporary folder, the way advedge makes it (:data:`ARTIFACT_BUILDERS`: the
   checkpoint by :func:`advedge.checkpoint.save_model`, the FP32 ONNX by
   :func:`advedge.export.onnx_export.export_onnx`, the engine by
   :func:`advedge.export.tensorrt.build_engine`), opened through
   :func:`~advedge.export.runtime.open_runner`, and put through each check of
   :data:`~advedge.workflow.backend_checks.BACKEND_CHECKS` (``parity`` with PyTorch, and a
   ``timer`` that measures execution; see that module).

Each step is one line: ``ok``, ``missing`` (the backend cannot run here: its
MissingDependencyError's message and install hint) or ``failed`` (the reason, one line). A
backend that cannot be opened gets one ``load`` line and no further checks. The temporary
folder is removed at the end, whatever happened. Nothing is changed on the machine.

Adding a check is one function in :mod:`advedge.workflow.backend_checks`; adding an artifact
kind is one builder in :data:`ARTIFACT_BUILDERS`; adding a version field is one probe in
:data:`~advedge.workflow.toolchain.VERSION_PROBES`.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from advedge.errors import AdvedgeError, MissingDependencyError, UsageError, did_you_mean
from advedge.export._deps import quiet_onnxruntime, require
from advedge.export.runtime import BACKENDS, Runner, open_runner
from advedge.registry import Registry
from advedge.workflow.backend_checks import BACKEND_CHECKS, BackendJob, Outcome
from advedge.workflow.toolchain import toolchain_versions

__all__ = [
    "ARTIFACT_BUILDERS",
    "SCHEMA",
    "STATUSES",
    "CheckResult",
    "DoctorOptions",
    "check_backend",
    "run_doctor",
]

logger = logging.getLogger(__name__)

SCHEMA = "advedge.doctor/1"
#: What a check line can say.
STATUSES = ("ok", "missing", "failed")
#: The tiny classifier's image shape and classes.
SHAPE = (3, 32, 32)
CLASSES = 10
#: The precision every artifact is made in, and whose parity tolerance applies.
PRECISION = "fp32"


@dataclass
class DoctorOptions:
    """The options of ``advedge doctor`` (see its ``--help``).

    Attributes:
        device: Where the PyTorch backends run: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; the
            GPU backends (ONNX Runtime's CUDA and TensorRT providers, TensorRT) run on the CUDA
            device it names, else on their default one.
        backends: The backends to check (default: every registered one).
        n: Images for the parity and timer checks.
        repeats: Timed calls the timer check judges (after two untimed ones).
        tmp_dir: Where the temporary folder is made (default: the system's).
        seed: Seed of the tiny model's weights and of the images.
    """

    device: str = "auto"
    backends: list[str] | None = None
    n: int = 8
    repeats: int = 5
    tmp_dir: str | None = None
    seed: int = 0

    def validate(self) -> None:
        """Refuse unknown backends and bad counts (exit code 2)."""
        for name in self.backends or []:
            if name not in BACKENDS:
                raise UsageError(f"unknown backend {name!r}", did_you_mean(name, BACKENDS))
        if self.n < 1 or self.repeats < 1:
            raise UsageError("--n and the timer's repeats must be at least 1")


@dataclass
class CheckResult:
    """One line of the report: a backend, a step (``load`` or a :data:`BACKEND_CHECKS` name),
    its status (:data:`STATUSES`), a one-line detail, an install hint (``missing``) and the
    figures behind it."""

    backend: str
    check: str
    status: str
    detail: str
    hint: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


#: How each kind of artifact (:data:`~advedge.export.runtime.base.ARTIFACT_KINDS`) is made.
ARTIFACT_BUILDERS: Registry[Callable[[_Doctor], Path]] = Registry("doctor artifact")


class _Doctor:
    """The shared state of one run: the tiny model, its images and reference logits, and the
    artifacts made so far (each made once; a failure to make one is kept and raised again)."""

    def __init__(self, opts: DoctorOptions, tmp: Path, device: str) -> None:
        self.opts = opts
        self.tmp = tmp
        self.device = device
        self.x = np.random.default_rng(opts.seed).random((opts.n, *SHAPE), dtype=np.float32)
        self._model: Any = None
        self._reference: np.ndarray | None = None
        self._artifacts: dict[str, Path] = {}
        self._errors: dict[str, BaseException] = {}

    @property
    def model(self) -> Any:
        """The seeded ``tiny_cnn`` (random batch-norm statistics, so they are folded too)."""
        if self._model is None:
            torch = require("torch", purpose="advedge doctor's reference model")
            from advedge.models import create_model

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.opts.seed)
                model = create_model(
                    "tiny_cnn", num_classes=CLASSES, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3
                )
                for module in model.modules():
                    if isinstance(module, torch.nn.BatchNorm2d):
                        module.running_mean.normal_(0.0, 0.1)
                        module.running_var.uniform_(0.5, 1.5)
            self._model = model.eval()
        return self._model

    @property
    def reference(self) -> np.ndarray:
        """PyTorch's logits of the images: the model itself, eager, FP32, on the CPU."""
        if self._reference is None:
            torch = require("torch", purpose="advedge doctor's reference model")
            with torch.no_grad():
                out = self.model.to("cpu").float()(torch.from_numpy(self.x))
            self._reference = out.numpy().astype(np.float32)
        return self._reference

    def artifact(self, kind: str) -> Path:
        """The artifact of ``kind``, made on first use."""
        if kind in self._errors:
            raise self._errors[kind]
        if kind not in self._artifacts:
            try:
                self._artifacts[kind] = ARTIFACT_BUILDERS.get(kind)(self)
            except Exception as exc:
                self._errors[kind] = exc
                raise
        return self._artifacts[kind]


@ARTIFACT_BUILDERS.register("checkpoint")
def _make_checkpoint(doctor: _Doctor) -> Path:
    """A run directory holding the model, saved by advedge's checkpoint writer."""
    model = doctor.model  # first: without torch, this is the error with the install hint
    from advedge.checkpoint import save_model

    run = doctor.tmp / "doctor-run"
    run.mkdir()
    meta = {"dataset": "doctor", "eps": 8 / 255, "input_shape": list(SHAPE)}
    save_model(model, run / "model.safetensors", metadata=meta)
    return run


@ARTIFACT_BUILDERS.register("onnx")
def _make_onnx(doctor: _Doctor) -> Path:
    """The FP32 ONNX, exported by advedge's exporter with the metadata ``advedge export``
    records."""
    import advedge
    from advedge.export.onnx_export import export_onnx
    from advedge.utils import sha256_file

    checkpoint = doctor.artifact("checkpoint") / "model.safetensors"
    metadata = {
        "kind": "classifier",
        "architecture": "tiny_cnn",
        "classes": CLASSES,
        "input_shape": list(SHAPE),
        "eps": 8 / 255,
        "precision": PRECISION,
        "source_sha256": sha256_file(checkpoint),
        "advedge_version": advedge.__version__,
    }
    path = doctor.tmp / f"doctor.{PRECISION}.onnx"
    return export_onnx(doctor.model, path, input_shape=SHAPE, metadata=metadata)


@ARTIFACT_BUILDERS.register("engine")
def _make_engine(doctor: _Doctor) -> Path:
    """A strongly typed TensorRT engine built from that ONNX by advedge's builder (batch
    1-32)."""
    from advedge.export.tensorrt import BatchProfile, build_engine, load_tensorrt

    load_tensorrt()  # missing TensorRT is said before the ONNX is exported for it
    onnx_path = doctor.artifact("onnx")
    out = doctor.tmp / "engine"
    profile = BatchProfile(1, doctor.opts.n, max(32, doctor.opts.n))
    build = build_engine(onnx_path, out, name="doctor", precision=PRECISION, profile=profile)
    return build.engine


def _reason(exc: BaseException, limit: int = 300) -> str:
    """One line saying why: an advedge error's message (and hint), else the exception's type and
    the first line of its message."""
    if isinstance(exc, AdvedgeError):
        text = str(exc)
    else:
        first = (str(exc).strip().splitlines() or [""])[0]
        text = f"unexpected {type(exc).__name__}" + (f": {first}" if first else "")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _open(doctor: _Doctor, name: str) -> tuple[Runner, CheckResult]:
    """Make the backend's artifact and open it; the runner and the ``load`` line."""
    kind = BACKENDS.get(name).artifact
    start = time.perf_counter()
    path = doctor.artifact(kind)
    # --device places the PyTorch backends; a GPU backend takes it only where it names a GPU
    cuda = doctor.device.startswith("cuda")
    device = doctor.device if kind == "checkpoint" or cuda else "auto"
    runner = open_runner(path, backend=name, device=device)
    info = runner.info
    seconds = time.perf_counter() - start
    shown = f"{path.name}/" if path.is_dir() else path.name
    detail = f"{kind} {shown} on {info.device or 'its device'}, {info.precision or PRECISION}"
    data = {"artifact": path.name, "kind": kind, "device": info.device, "seconds": seconds}
    return runner, CheckResult(name, "load", "ok", detail, data=data)


def check_backend(doctor: _Doctor, name: str) -> list[CheckResult]:
    """Every line of one backend: ``load`` (missing or failed: the only line), then each check
    of :data:`BACKEND_CHECKS`."""
    try:
        runner, loaded = _open(doctor, name)
    except MissingDependencyError as exc:
        return [CheckResult(name, "load", "missing", exc.message, exc.hint)]
    except ModuleNotFoundError as exc:  # a library that advedge imports without a hint
        what = exc.name or str(exc)
        return [
            CheckResult(
                name, "load", "missing", f"{what} cannot be imported", f"pip install {what}"
            )
        ]
    except Exception as exc:
        logger.debug("doctor: %s could not be opened", name, exc_info=True)
        return [CheckResult(name, "load", "failed", _reason(exc))]
    job = BackendJob(
        name, runner, doctor.x, doctor.reference, PRECISION, doctor.device, doctor.opts.repeats
    )
    results = [loaded]
    for check_name, check in BACKEND_CHECKS.items():
        try:
            outcome = check(job)
        except MissingDependencyError as exc:
            results.append(CheckResult(name, check_name, "missing", exc.message, exc.hint))
            continue
        except Exception as exc:
            logger.debug("doctor: %s %s raised", name, check_name, exc_info=True)
            outcome = Outcome(False, _reason(exc))
        status = "ok" if outcome.ok else "failed"
        results.append(CheckResult(name, check_name, status, outcome.detail, data=outcome.data))
    return results


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def _resolve_device(device: str) -> str:
    """``--device`` as a torch device string; without torch, ``cpu`` (every backend is then
    reported missing, since the reference model needs PyTorch)."""
    try:
        require("torch", purpose="advedge doctor")
    except MissingDependencyError:
        if device not in ("auto", "cpu"):
            raise UsageError(f"--device {device} needs PyTorch, which is not installed") from None
        return "cpu"
    from advedge.utils import resolve_device

    return str(resolve_device(device))


def _summary(checks: list[CheckResult]) -> dict[str, Any]:
    counts = {s: sum(c.status == s for c in checks) for s in STATUSES}
    failed = sorted({c.backend for c in checks if c.status == "failed"})
    missing = sorted(
        {c.backend for c in checks if c.status == "missing"} - set(failed),
    )
    passed = [
        b for b in dict.fromkeys(c.backend for c in checks) if b not in failed and b not in missing
    ]
    return {**counts, "passed": passed, "failed_backends": failed, "missing_backends": missing}


def run_doctor(
    opts: DoctorOptions, *, progress: Callable[[str, int, int], None] | None = None
) -> dict[str, Any]:
    """Run every check (module docstring); the ``advedge.doctor/1`` document.

    Args:
        opts: The options.
        progress: Called with ``(message, backends done, backends in all)`` before each
            backend and once at the end.

    Returns:
        ``schema``, ``ok`` (every backend that could be opened passed every check), ``device``,
        ``versions``, ``backends``, ``checks`` (one dict per line: backend, check, status,
        detail, hint, data), ``summary`` (counts per status; passed, failed and missing
        backends) and ``seconds``.

    Raises:
        UsageError: an unknown backend, a bad count, or a ``--device`` this machine lacks.
    """
    start = time.perf_counter()
    opts.validate()
    say = progress or (lambda message, done, total: None)
    device = _resolve_device(opts.device)
    names = list(opts.backends or BACKENDS)
    say("versions", 0, len(names))
    versions = toolchain_versions()
    checks: list[CheckResult] = []
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(
            tempfile.TemporaryDirectory(prefix="advedge-doctor-", dir=opts.tmp_dir)
        )
        stack.enter_context(quiet_onnxruntime(capture_prints=True))
        doctor = _Doctor(opts, Path(tmp), device)
        for i, name in enumerate(names):
            say(name, i, len(names))
            checks += check_backend(doctor, name)
    say("done", len(names), len(names))
    summary = _summary(checks)
    return {
        "schema": SCHEMA,
        "ok": not summary["failed_backends"],
        "device": device,
        "versions": versions,
        "backends": names,
        "checks": [asdict(c) for c in checks],
        "summary": summary,
        "seconds": round(time.perf_counter() - start, 2),
    }
