"""``advedge bench``: latency and robust accuracy measured on the deployed artifact itself.

For each artifact (an ``.engine``, an ``.onnx`` or a checkpoint, each run by its runner, see
:mod:`advedge.export.runtime.runners`) and each batch size:

- latency: ``warmup`` untimed calls, then ``iters`` timed calls on real test images; mean, p50,
  p90 and p99 in ms, the coefficient of variation ``cv = std / mean`` (a warning above 0.15: the
  machine was busy or throttling), throughput ``batch / mean`` in images/s, and for runners that
  separate them the host-to-device, compute and device-to-host shares;
- size on disk and clean accuracy on ``n`` test images, computed by the artifact.

With ``robust``:

(a) **transfer**: PGD-20 and APGD-CE examples crafted once on the FP32 PyTorch model the artifact
    was exported from (for a fused artifact, on the FP32 purifier + classifier end to end),
    saved as ``transfer-<sha>.npz`` with their sha256 and the source checkpoint's sha256, so a
    device without torch evaluates the same set; a set made for another model is refused;
(b) **query**: the Square attack run against the artifact's runner directly (no gradients);
(c) the per-example worst case over clean-correct, transfer and query: the headline. It is
    taken over the images the query attack ran on (all ``n`` by default; ``query_n`` restricts
    the query attack, and the headline, to the first ``query_n``).

Transfer examples overstate the robustness of a quantised artifact (they were crafted at another
precision); the query attack does not have that gap. Everything is written to ``bench.json``
(``schema: advedge.bench/1``) and ``bench.csv``, with an environment manifest.

Checked before the first timed call or crafted attack (:func:`run_bench`): every option's range
(batch sizes up to ``MAX_BATCH`` and what half the available memory holds: their host input
arrays on every backend, their activations too on a runner that computes on the host, ``--iters``,
``--warmup``, ``--n``, ``--query-n``, ``--n-queries``), ``--out`` (not a file, not under one,
writable, no earlier ``bench.json`` without ``--overwrite``; locked while written, created by its
first file, emptied of what the run made if it fails, except a crafted transfer set, which is
complete once written and reused by the next run; ``bench.json`` and ``bench.csv`` are staged
and renamed into place together, so an earlier pair stays whole until the new pair replaces it),
``--model`` and ``--purifier``, each
artifact (float32 NCHW input, no Loop/Scan/If: their run time is data and cannot be bounded, so
they are refused rather than timed out; batch sizes its graph or engine takes; logits on every
test image finite and one per class of the data) and the transfer set. A transfer set is checked
wherever it is read (:func:`load_transfer_set`): its sha256, then what it holds
(:func:`validate_transfer_set`: finite images in [0, 1], every adversarial image within eps of
its clean one, labels in range, consistent counts, not every image left clean).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from advedge.export.runtime.runners import BACKENDS, open_runner

import advedge
from advedge.errors import AdvedgeError, DataError, ExportError, UsageError, os_error
from advedge.locks import output_lock
from advedge.outputs import (
    Leftovers,
    StagedFiles,
    check_out,
    held_logs,
    quiet_warnings,
    refuse_overwrite,
)
from advedge.utils import available_memory, sha256_file, to_jsonable

__all__ = [
    "BenchOptions",
    "environment_manifest",
    "load_transfer_set",
    "run_bench",
    "validate_transfer_set",
]

logger = logging.getLogger(__name__)

SCHEMA = "advedge.bench/1"
TRANSFER_SCHEMA = "advedge.transfer-set/1"
CV_WARN = 0.15
OUTPUTS = ("bench.json", "bench.csv")

# Sane limits, checked before anything is loaded or allocated. A batch of 4096 CIFAR images is
# 50 MB of input; ImageNet-sized ones 2.5 GB. --iters/--warmup bound the time a run can take,
# --n and --n-queries the memory and time of the accuracy and attack passes.
MAX_BATCH = 4096
MAX_WARMUP = 10_000
MAX_ITERS = 100_000
MAX_N = 100_000
MAX_QUERIES = 100_000
# Memory one image of a batch takes in flight on a runner that computes on the host (ONNX
# Runtime's CPU provider, PyTorch on the CPU): its input times this factor, a generous bound on
# a classifier's activations (a ResNet-18 on 32x32 inputs needs about 40x its input). A batch
# whose estimate exceeds half the available memory is refused before it runs. GPU backends keep
# activations in device memory: for them only the host input arrays are bounded.
ACTIVATION_FACTOR = 64
# Host copies of one timing batch whatever the backend: measure_latency's concatenation and its
# contiguous slice, and the runner's own float32 copy of the input.
HOST_BATCH_COPIES = 3
# Transfer sets hold the attacks' float32 images as they came out (never rounded to uint8), so
# the eps-ball check allows float rounding only.
TRANSFER_TOL = 1e-6


@dataclass
class BenchOptions:
    """Every option of ``advedge bench``."""

    artifacts: list[str]
    data: str
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8, 32, 128])
    warmup: int = 50
    iters: int = 500
    robust: bool = False
    n: int = 1000
    query_n: int | None = None  # None: every one of the n images
    n_queries: int = 1000
    eps: float = 8 / 255
    model: str | None = None
    purifier: str | None = None
    backend: str = "auto"
    out: str | None = None
    seed: int = 0
    transfer_set: str | None = None
    overwrite: bool = False  # replace an earlier bench.json / bench.csv in out

    def validate(self) -> None:
        """Check every option's value and range (nothing is read or run).

        Raises:
            UsageError: a value out of range or options that do not go together.
        """
        if not self.artifacts:
            raise UsageError("give at least one --artifact")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise UsageError(f"batch sizes must be positive, got {self.batch_sizes}")
        if max(self.batch_sizes) > MAX_BATCH:
            raise UsageError(
                f"batch size {max(self.batch_sizes)} is above the limit of {MAX_BATCH}",
                "choose smaller --batch-sizes",
            )
        _bounded("--warmup", self.warmup, 0, MAX_WARMUP)
        _bounded("--iters", self.iters, 1, MAX_ITERS)
        _bounded("--n", self.n, 1, MAX_N)
        if self.query_n is not None:
            _bounded("--query-n", self.query_n, 1, MAX_N)
        _bounded("--n-queries", self.n_queries, 1, MAX_QUERIES)
        _bounded("--seed", self.seed, 0, 2**32 - 1)
        if not (math.isfinite(self.eps) and 0.0 < self.eps <= 1.0):
            raise UsageError(f"--eps must lie in (0, 1], got {self.eps}")
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise UsageError(f"unknown backend {self.backend!r}", "choose " + ", ".join(BACKENDS))
        if self.robust and self.model is None and self.transfer_set is None:
            raise UsageError(
                "--robust needs --model (the FP32 checkpoint the transfer set is crafted on)",
                "add --purifier too for fused artifacts",
            )


def _bounded(flag: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        raise UsageError(f"{flag} must lie in [{lo}, {hi}], got {value}")


# ------------------------------------------------------------------------------ environment
def _read(cmd: list[str], timeout: float = 5.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_manifest() -> dict[str, Any]:
    """The machine a benchmark ran on: CPU, GPU and compute capability, library and driver
    versions, and on a Jetson the power mode, the clocks and a tegrastats sample."""
    env: dict[str, Any] = {
        "advedge": advedge.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
    }
    for mod in ("torch", "onnxruntime", "tensorrt"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    env["gpu"] = env["compute_capability"] = env["cuda"] = None
    try:
        import torch

        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability(0))
    except Exception:
        pass
    smi = _read(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"])
    env["driver"] = smi.split(",")[-1].strip() if smi else None
    if env["gpu"] is None and smi:
        env["gpu"] = smi.split(",")[0].strip()
    jetson = Path("/etc/nv_tegra_release").is_file()
    env["jetson"] = jetson
    if jetson:
        env["nvpmodel"] = _read(["nvpmodel", "-q"])
        env["jetson_clocks"] = _read(["jetson_clocks", "--show"])
        env["tegrastats"] = _read(["timeout", "2", "tegrastats", "--interval", "500"], timeout=4)
    return env


# ------------------------------------------------------------------------------ latency
def latency_stats(times_s: Sequence[float], batch: int) -> dict[str, float]:
    """mean/p50/p90/p99 in ms, the coefficient of variation and images/s from per-call times."""
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    mean = float(ms.mean())
    return {
        "mean_ms": round(mean, 4),
        "p50_ms": round(float(np.percentile(ms, 50)), 4),
        "p90_ms": round(float(np.percentile(ms, 90)), 4),
        "p99_ms": round(float(np.percentile(ms, 99)), 4),
        "cv": round(float(ms.std() / mean) if mean > 0 else 0.0, 4),
        "images_per_s": round(batch / (mean / 1e3), 2) if mean > 0 else 0.0,
        "iters": len(ms),
    }


def measure_latency(
    runner: Any, x: np.ndarray, batch: int, *, warmup: int, iters: int
) -> dict[str, Any]:
    """Time ``runner.timed`` on a batch of real images; stages averaged where the runner splits them."""
    reps = -(-batch // len(x))
    xb = np.ascontiguousarray(np.concatenate([x] * reps)[:batch])
    for _ in range(warmup):
        runner.run(xb)
    totals: list[float] = []
    stages: dict[str, list[float]] = {}
    for _ in range(iters):
        _, times = runner.timed(xb)
        totals.append(times["total_s"])
        for k, v in times.items():
            if k != "total_s":
                stages.setdefault(k, []).append(v)
    out: dict[str, Any] = {"batch": batch, **latency_stats(totals, batch)}
    out["stages_ms"] = {
        k.removesuffix("_s"): round(1e3 * statistics.fmean(v), 4) for k, v in stages.items()
    }
    if out["cv"] > CV_WARN:
        out["warning"] = (
            f"high variation (cv {out['cv']:.2f} > {CV_WARN}): the machine was busy or throttling"
        )
    return out


# ------------------------------------------------------------------------------ transfer sets
def _array_sha(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def save_transfer_set(
    path: Path, x: np.ndarray, y: np.ndarray, advs: dict[str, np.ndarray], meta: dict[str, Any]
) -> str:
    """npz (no pickles) with the clean images, labels, one array per attack and a sha256."""
    names = sorted(advs)
    sha = _array_sha(x, y, *(advs[k] for k in names))
    buf = io.BytesIO()
    np.savez(
        buf,
        x=x,
        y=y,
        **{f"adv_{k}": advs[k] for k in names},
        meta=np.array(json.dumps({**meta, "attacks": names})),
        sha256=np.array(sha),
    )
    from advedge.utils import atomic_write_bytes

    atomic_write_bytes(path, buf.getvalue())
    return sha


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_transfer_set(
    path: str | os.PathLike[str], *, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """Load a transfer set, verify its sha256 and check what it holds
    (:func:`validate_transfer_set`): every place that reads a set goes through here.

    Returns:
        ``(x, y, advs, meta)``; ``meta`` gains ``sha256`` and ``unperturbed`` (per attack, the
        images it left equal to the clean ones).

    Raises:
        ExportError: a missing, unreadable, tampered (sha256 mismatch) or invalid set.
    """
    p = Path(path)
    if not p.is_file():
        raise ExportError(
            f"transfer set not found: {p}" if not p.exists() else f"transfer set {p} is not a file"
        )
    try:
        with contextlib.ExitStack() as stack:
            z = np.load(p, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ExportError(f"transfer set {p} is not an npz archive (a single array)")
            stack.enter_context(z)
            missing = sorted({"x", "y", "meta", "sha256"} - set(z.files))
            if missing:
                raise ExportError(
                    f"transfer set {p} lacks {', '.join(missing)}: not an advedge transfer set"
                )
            meta = json.loads(str(z["meta"]))
            attacks = meta.get("attacks") if isinstance(meta, dict) else None
            if not (
                isinstance(attacks, list)
                and attacks
                and all(isinstance(a, str) and a for a in attacks)
            ):
                raise ExportError(f"transfer set {p}: its meta names no attacks")
            missing = sorted(f"adv_{a}" for a in attacks if f"adv_{a}" not in z.files)
            if missing:
                raise ExportError(f"transfer set {p} lacks {', '.join(missing)}")
            x, y = z["x"], z["y"]
            advs = {a: z[f"adv_{a}"] for a in attacks}
            stored = str(z["sha256"])
    except AdvedgeError:
        raise
    except Exception as exc:  # a truncated zip, not a zip, pickled or malformed arrays
        raise ExportError(f"unreadable transfer set {p}: {_first_line(exc)}") from None
    for a in (x, y, *advs.values()):
        if a.dtype.hasobject or a.dtype.kind not in "biuf":
            raise ExportError(f"transfer set {p} holds {a.dtype} arrays, not images and labels")
    if _array_sha(x, y, *(advs[k] for k in sorted(advs))) != stored:
        raise ExportError(f"transfer set {p} does not match its sha256 (modified or corrupt)")
    unperturbed = validate_transfer_set(x, y, advs, meta, where=p, num_classes=num_classes)
    return x, y, advs, {**meta, "sha256": stored, "unperturbed": unperturbed}


def validate_transfer_set(
    x: np.ndarray,
    y: np.ndarray,
    advs: dict[str, np.ndarray],
    meta: dict[str, Any],
    *,
    where: object,
    num_classes: int | None = None,
) -> dict[str, int]:
    """Check that a transfer set is what it says, whatever its sha256 says (a sha256 proves only
    that nobody changed the file after it was recomputed).

    - ``x`` float32 ``[N, C, H, W]``, ``y`` integer ``[N]``, every attack's images the shape and
      dtype of ``x``; ``meta["n"]`` (when recorded) equal to ``N``;
    - every image, clean and adversarial, finite and in [0, 1];
    - every adversarial image within ``eps`` of its clean image in the L-inf norm (the only norm
      bench crafts), plus ``TRANSFER_TOL`` of float rounding (sets are stored in float32 as the
      attacks produced them, never rounded to uint8);
    - labels in ``[0, num_classes)`` (``num_classes`` given, else recorded in the set);
    - not trivially clean: a set whose every attack left every image unchanged holds no
      adversarial example and is refused. One attack may leave images unchanged (APGD returns
      the images the source model already gets wrong as they are); the counts are returned and
      bench records them beside each attack.

    Returns:
        Per attack, the number of images equal to their clean image.

    Raises:
        ExportError: the first problem found, naming the set and how many images it concerns.
    """

    def bad(problem: str) -> ExportError:
        return ExportError(
            f"transfer set {where}: {problem}",
            "craft it again with advedge bench --robust --model",
        )

    if meta.get("schema") != TRANSFER_SCHEMA:
        raise bad(f"schema {meta.get('schema')!r}, not {TRANSFER_SCHEMA}")
    norm = str(meta.get("norm", "linf")).lower()
    if norm != "linf":
        raise bad(f"norm {norm!r}: bench crafts and checks L-inf sets only")
    eps = meta.get("eps")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps <= 1.0:
        raise bad(f"eps {eps!r} is not a budget in (0, 1]")
    if x.ndim != 4 or x.dtype != np.float32 or len(x) == 0:
        raise bad(f"clean images are {x.dtype} {list(x.shape)}, not float32 [N, C, H, W]")
    n = len(x)
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != n:
        raise bad(f"labels are {y.dtype} {list(y.shape)}, not integers [{n}]")
    if meta.get("n") is not None and meta.get("n") != n:
        raise bad(f"it records n = {meta.get('n')} but holds {n} images")
    recorded = meta.get("num_classes")
    classes = num_classes if num_classes is not None else recorded
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        classes = None  # neither given nor recorded: labels are checked for >= 0 only
    out_of_range = int(((y < 0) | (y >= classes)).sum()) if classes else int((y < 0).sum())
    if out_of_range:
        raise bad(f"{out_of_range} of {n} labels lie outside [0, {classes or 'classes'})")
    for name, images in (("clean", x), *advs.items()):
        if images.shape != x.shape or images.dtype != np.float32:
            raise bad(
                f"{name} images are {images.dtype} {list(images.shape)}, "
                f"not float32 {list(x.shape)}"
            )
        flat = images.reshape(n, -1)
        k = int((~np.isfinite(flat)).any(axis=1).sum())
        if k:
            raise bad(f"{k} of {n} {name} images hold NaN or inf")
        k = int(((flat < 0.0) | (flat > 1.0)).any(axis=1).sum())
        if k:
            raise bad(f"{k} of {n} {name} images leave the pixel range [0, 1]")
    unperturbed = {}
    clean = x.reshape(n, -1)
    for name, images in advs.items():
        dist = np.abs(images.reshape(n, -1) - clean).max(axis=1)
        k = int((dist > eps + TRANSFER_TOL).sum())
        if k:
            raise bad(
                f"{k} of {n} {name} images lie outside the eps ball "
                f"(L-inf up to {float(dist.max()):.4g} > eps {eps:.4g})"
            )
        unperturbed[name] = int((dist == 0.0).sum())
    if all(k == n for k in unperturbed.values()):
        raise bad("every adversarial image equals its clean image: not a transfer set")
    return unperturbed


def _source_key(source: Any) -> str:
    return json.dumps(source, sort_keys=True)


def _model_source(opts: BenchOptions, fused: bool) -> tuple[Any, Path, Path | None]:
    """The checkpoint(s) a set is crafted on: ``(source sha256, --model file, --purifier file)``.

    Raises:
        MissingDependencyError: no torch to craft with.
        CheckpointError: a --model or --purifier that is missing or not an advedge checkpoint
            of the right kind.
        UsageError: a fused artifact without --purifier.
    """
    from advedge.export._deps import require

    require("torch", purpose="crafting the transfer set (--robust --model)")
    from advedge.checkpoint import read_metadata, resolve_checkpoint
    from advedge.errors import CheckpointError
    from advedge.purifier.checkpoint import ARCHITECTURE, resolve_purifier

    ckpt = resolve_checkpoint(str(opts.model))
    if read_metadata(ckpt).get("architecture") == ARCHITECTURE:
        raise CheckpointError(
            f"--model {opts.model} is a purifier, not a classifier", "pass it as --purifier"
        )
    source: Any = sha256_file(ckpt)
    if not fused:
        return source, ckpt, None
    if opts.purifier is None:
        raise UsageError("fused purifier + classifier artifacts need --purifier to craft on")
    pfile = resolve_purifier(str(opts.purifier))
    if read_metadata(pfile).get("architecture") != ARCHITECTURE:
        raise CheckpointError(f"--purifier {opts.purifier} is not a purifier checkpoint")
    return {"purifier": sha256_file(pfile), "classifier": source}, ckpt, pfile


def _transfer_path(out_dir: Path, source: Any, opts: BenchOptions, x: np.ndarray) -> Path:
    """The cache file of a set: named by its source model, eps, seed and images."""
    key = {"source": source, "eps": opts.eps, "seed": opts.seed, "images": _array_sha(x)}
    digest = hashlib.sha256(_source_key(key).encode()).hexdigest()[:12]
    return out_dir / f"transfer-{digest}-n{len(x)}.npz"


def craft_transfer_set(
    opts: BenchOptions,
    x: np.ndarray,
    y: np.ndarray,
    fused: bool,
    path: Path,
    say: Callable[[str], None],
) -> tuple[Path, dict[str, Any]]:
    """PGD-20 and APGD-CE on the FP32 PyTorch model (or purifier + model), saved at ``path``."""
    torch = __import__("torch")
    from advedge.attacks import PGD
    from advedge.attacks.apgd import APGD
    from advedge.checkpoint import load_model

    source, ckpt, pfile = _model_source(opts, fused)
    model = load_model(ckpt)
    if fused:
        from advedge.models.purified import Purified
        from advedge.purifier import load_purifier

        model = Purified(load_purifier(pfile), model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(opts.seed)
    attacks = {
        "pgd20": PGD(model, eps=opts.eps, steps=20, generator=gen),
        "apgd-ce": APGD(model, eps=opts.eps, n_iter=50, loss="ce", seed=opts.seed),
    }
    advs = {}
    for name, attack in attacks.items():
        say(f"crafting the transfer set: {name} on the FP32 PyTorch model ({len(y)} images)")
        parts = []
        for i in range(0, len(y), 128):
            xb, yb = torch.from_numpy(x[i : i + 128]), torch.from_numpy(y[i : i + 128])
            parts.append(attack(xb, yb).detach().numpy().astype(np.float32))
        advs[name] = np.concatenate(parts)
    meta = {
        "schema": TRANSFER_SCHEMA,
        "source_sha256": source,
        "fused": fused,
        "eps": opts.eps,
        "norm": "linf",
        "n": len(y),
        "crafted_on": "fp32 pytorch",
    }
    sha = save_transfer_set(path, x, y, advs, meta)
    return path, {**meta, "attacks": sorted(advs), "sha256": sha}


class _Feed:
    """An artifact's runner fed batches it takes, every output checked.

    Chunks of ``step`` images; a last chunk smaller than the runner's smallest batch (a fixed
    batch ONNX, an engine's profile) is padded with copies of its last image and the padding's
    outputs dropped. Every output must be ``[batch, num_classes]`` and finite.
    """

    def __init__(self, runner: Any, name: str, step: int, lo: int, num_classes: int) -> None:
        self.runner, self.name, self.step, self.lo = runner, name, step, lo
        self.num_classes = num_classes

    def run(self, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.zeros((0, self.num_classes), np.float32)
        outs = []
        for i in range(0, len(x), self.step):
            xb = np.ascontiguousarray(x[i : i + self.step], dtype=np.float32)
            k = len(xb)
            if k < self.lo:
                xb = np.concatenate([xb, np.repeat(xb[-1:], self.lo - k, axis=0)])
            out = np.asarray(self.runner.run(xb))
            if out.ndim != 2 or out.shape[0] != len(xb):
                raise ExportError(
                    f"{self.name} returned {list(out.shape)} for {len(xb)} images, "
                    "not [batch, classes] logits"
                )
            outs.append(out[:k])
        logits = np.concatenate(outs).astype(np.float32, copy=False)
        if logits.shape[1] != self.num_classes:
            raise ExportError(
                f"{self.name} scores {logits.shape[1]} classes but the data has {self.num_classes}",
                "pass the dataset the model was trained on",
            )
        k = int((~np.isfinite(logits)).any(axis=1).sum())
        if k:
            raise ExportError(
                f"{self.name} returned non-finite logits (NaN or inf) for {k} of {len(x)} images",
                "the artifact is broken; export it again",
            )
        return logits

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.run(x).argmax(1)


def query_attack(
    runner: Any, x: np.ndarray, y: np.ndarray, *, eps: float, n_queries: int, seed: int
) -> np.ndarray:
    """Square (L∞, margin loss) against the runner itself; returns per-example correctness."""
    torch = __import__("torch")
    from advedge.attacks.square import Square

    attack = Square(runner, eps=eps, n_queries=n_queries, seed=seed, numpy_model=True)
    adv = attack(torch.from_numpy(x), torch.from_numpy(y)).detach().numpy()
    return np.asarray(runner.run(adv.astype(np.float32))).argmax(1) == y


def _artifact_source(meta: dict[str, Any], path: Path) -> Any:
    """The sha256 (or {purifier, classifier} sha256s) of the checkpoint an artifact came from."""
    art = meta.get("artifact_metadata") or {}
    if "source_sha256" in art:
        return art["source_sha256"]
    if isinstance(art.get("artifact"), dict):  # an engine's sidecar
        return art["artifact"].get("source_sha256")
    if art.get("format") == "advedge.model/1":  # a checkpoint is its own source
        p = path / "model.safetensors" if path.is_dir() else path
        return sha256_file(p)
    return None


def _input_shape(meta: dict[str, Any]) -> list[int] | None:
    art = meta.get("artifact_metadata") or {}
    shape = art.get("input_shape") or (art.get("artifact") or {}).get("input_shape")
    return list(shape) if shape else None


def _computes_on_host(meta: dict[str, Any]) -> bool:
    """Whether an artifact's runner computes in host memory: ONNX Runtime's CPU provider and
    PyTorch on the CPU. TensorRT, ONNX Runtime's CUDA/TensorRT providers and PyTorch on a GPU
    hold their activations in device memory."""
    backend = str(meta.get("backend") or "")
    if backend == "onnxruntime":
        return True
    if backend in ("torch", "torch-compile"):
        return str(meta.get("device") or "cpu").startswith("cpu")
    return False


def _memory_budget() -> tuple[int, int] | None:
    """``(available, budget)``: the bytes available now and the half a run may use."""
    avail = available_memory()
    return None if avail is None else (avail, avail // 2)


def _check_memory(opts: BenchOptions, image_shape: Sequence[int], n: int) -> None:
    """Refuse an image count or batch whose host arrays cannot fit, before loading them.

    Every backend holds ``n`` test images (and with ``robust`` the attacks' copies) and a
    timing batch's input arrays in host memory; what a backend needs for activations is
    checked per artifact (:func:`_check_activations`), where its device is known.
    """
    mem = _memory_budget()
    if mem is None:
        return
    avail, budget = mem
    per_image = 4 * math.prod(image_shape)
    gib = 1024**3
    batch = max(opts.batch_sizes)
    if batch * per_image * HOST_BATCH_COPIES > budget:
        raise UsageError(
            f"batch size {batch} of {list(image_shape)} images needs about "
            f"{batch * per_image * HOST_BATCH_COPIES / gib:.1f} GiB of host input arrays, more "
            f"than half of the {avail / gib:.1f} GiB available",
            "choose smaller --batch-sizes",
        )
    copies = 5 if opts.robust else 2  # images, a timing batch; two attacks and Square's copy
    if n * per_image * copies > budget:
        raise UsageError(
            f"--n {n} images of {list(image_shape)} need about {n * per_image * copies / gib:.1f} "
            f"GiB, more than half of the {avail / gib:.1f} GiB available",
            "choose a smaller --n",
        )


def _check_activations(art: _Art, image_shape: Sequence[int]) -> None:
    """Refuse a batch whose activations cannot fit in host memory, before it runs: only for
    runners that compute on the host (:func:`_computes_on_host`); a GPU backend's activations
    live in device memory, which the runner's own allocation reports."""
    if not _computes_on_host(art.meta):
        return
    mem = _memory_budget()
    if mem is None:
        return
    avail, budget = mem
    need = art.step * 4 * math.prod(image_shape) * ACTIVATION_FACTOR
    if need > budget:
        gib = 1024**3
        raise UsageError(
            f"batch size {art.step} of {list(image_shape)} images needs about "
            f"{need / gib:.1f} GiB on {art.meta.get('backend')} ({art.meta.get('device') or 'cpu'}), "
            f"more than half of the {avail / gib:.1f} GiB available",
            "choose smaller --batch-sizes",
        )


# ------------------------------------------------------------------------------ the run
@dataclass
class _Art:
    """One artifact: its runner, metadata, batch limits and what the checks found."""

    path: Path
    runner: Any
    meta: dict[str, Any]
    lo: int = 1
    hi: int | None = None
    step: int = 1
    feed: Any = None
    clean_ok: Any = None
    source: Any = None

    @property
    def fused(self) -> bool:
        return isinstance(self.source, dict)

    def fits(self, b: int) -> bool:
        return b >= self.lo and (self.hi is None or b <= self.hi)


@dataclass
class _Set:
    """A transfer set held in memory, checked against this run's images."""

    path: Path | None
    x: np.ndarray
    y: np.ndarray
    advs: dict[str, np.ndarray]
    meta: dict[str, Any]


def run_bench(opts: BenchOptions, *, status: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark described in the module docstring; returns the ``bench.json`` document.

    Every option, input and output is checked before the first timed call or crafted attack:
    the options' ranges, ``out`` (a file, under a file, not writable, an earlier bench.json
    without ``overwrite``), the --model and --purifier checkpoints, each artifact (its input
    type, batch dimension and control flow; its logits on every test image: finite and one per
    class of the data) and the transfer set. ``out`` is locked while the run writes, created
    only by its first file, and a failed run leaves nothing behind but a transfer set it
    crafted (complete once written; the next run checks and reuses it).

    Raises:
        UsageError: bad options, or an --out that is a file.
        ExportError: a missing, unknown or broken artifact, data of another shape or class count,
            a transfer set that is invalid or made for another model or other images.
        CheckpointError: a --model or --purifier that is not a checkpoint.
        OutputLockedError: another process writes the same --out.
        MissingDependencyError: a backend that cannot run here (exit 3).
    """
    say = status or (lambda m: None)
    with quiet_warnings():
        opts.validate()
        out_dir = check_out(opts.out) if opts.out else None
        with output_lock(out_dir) if out_dir is not None else contextlib.nullcontext():
            if out_dir is not None:
                refuse_overwrite(out_dir, OUTPUTS, opts.overwrite)
            made = Leftovers(out_dir)  # the folders this run creates, removed when empty
            try:
                return _run(opts, out_dir, say)
            except BaseException:
                made.remove()
                raise


@dataclass
class _Plan:
    """What the checks found: the test images, the artifacts, the transfer sets to use or
    craft."""

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    arts: list[_Art]
    sets: dict[bool, _Set]
    to_craft: dict[bool, Path]


def _check(opts: BenchOptions, out_dir: Path | None) -> _Plan:
    """Every input before any work: checkpoints, data, transfer set, artifacts and their logits."""
    from advedge.data import load_dataset, stratified_subset

    sources: dict[bool, Any] = {}  # fused or not -> the source sha256 a set is crafted on

    def source_of(fused: bool) -> Any:
        if fused not in sources:
            sources[fused] = _model_source(opts, fused)[0]
        return sources[fused]

    if opts.robust and opts.transfer_set is None:
        source_of(False)  # --model exists and is a classifier checkpoint
    try:
        ds = load_dataset(opts.data, download=False)
    except DataError as exc:
        raise DataError(exc.message, "pass --data DIR with a test split") from None
    num_classes = int(ds.num_classes)
    test = stratified_subset(ds.test, opts.n, opts.seed)
    _check_memory(opts, test.x.shape[1:], len(test))
    test = test.subset(np.random.default_rng(opts.seed).permutation(len(test)))
    x = np.ascontiguousarray(test.x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    y = test.y.astype(np.int64)
    given = None
    if opts.robust and opts.transfer_set is not None:
        tpath = Path(opts.transfer_set)
        given = _Set(tpath, *load_transfer_set(tpath, num_classes=num_classes))
        _check_set_fits(given, x, y, opts)

    arts = [_open(a, opts, x) for a in opts.artifacts]
    for art in arts:  # before any batch runs on it
        _check_activations(art, x.shape[1:])
    for art in arts:  # every artifact on every test image: shapes, classes, finite logits
        art.feed = _Feed(art.runner, art.path.name, art.step, art.lo, num_classes)
        art.clean_ok = art.feed.predict(x) == y

    sets: dict[bool, _Set] = {}
    to_craft: dict[bool, Path] = {}
    if opts.robust:
        for art in arts:
            if given is not None:
                want = given.meta.get("source_sha256")
                if art.source is not None and want != art.source:
                    raise ExportError(
                        f"the transfer set {given.path.name} was crafted on another model "
                        f"than {art.path.name}",
                        "its recorded source sha256 differs from the artifact's; craft it on "
                        "the artifact's parent",
                    )
                sets[art.fused] = given
                continue
            if art.fused and opts.purifier is None:
                raise UsageError(
                    f"{art.path.name} is a fused purifier + classifier: pass --purifier too"
                )
            source = source_of(art.fused)
            if art.source is not None and art.source != source:
                raise ExportError(
                    f"{art.path.name} was not exported from --model {opts.model}"
                    + (f" and --purifier {opts.purifier}" if art.fused else ""),
                    "the sha256 its metadata records differs; pass the checkpoint it came from",
                )
            if art.fused in sets or art.fused in to_craft:
                continue
            path = _transfer_path(out_dir or Path("."), source, opts, x)
            cached = _cached_set(path, x, y, opts, num_classes, source)
            if cached is not None:
                sets[art.fused] = cached
            else:
                to_craft[art.fused] = path

    return _Plan(x, y, num_classes, arts, sets, to_craft)


def _run(opts: BenchOptions, out_dir: Path | None, say: Callable[[str], None]) -> dict[str, Any]:
    with held_logs():  # a refused run prints its error only, not the checks' progress
        plan = _check(opts, out_dir)
    x, y, num_classes, arts = plan.x, plan.y, plan.num_classes, plan.arts
    sets, to_craft = plan.sets, plan.to_craft
    results = []
    for art in arts:
        results.append(_time(art, opts, x, say))
    for fused, path in to_craft.items():
        # not a leftover: a set is complete once its atomic write finished, and it is costly;
        # a later failure (or Ctrl-C) keeps it for the next run, which checks it on load
        craft_transfer_set(opts, x, y, fused, path, say)
        tx, ty, advs, tmeta = load_transfer_set(path, num_classes=num_classes)
        sets[fused] = _Set(path, tx, ty, advs, tmeta)
    for art, entry in zip(arts, results, strict=True):
        entry["clean_acc"] = float(art.clean_ok.mean())
        entry["n"] = len(y)
        if opts.robust:
            entry["robust"] = _robust(opts, art, x, y, sets[art.fused], say)
    doc = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment_manifest(),
        "settings": {k: v for k, v in vars(opts).items() if k != "artifacts"},
        "data": {"path": str(opts.data), "split": "test", "n": len(y)},
        "results": results,
        "warnings": [
            f"{r['name']} batch {lat['batch']}: {lat['warning']}"
            for r in results
            for lat in r["latency"]
            if lat.get("warning")
        ],
    }
    if out_dir is not None:  # both staged, then renamed together: never a new CSV, old JSON
        try:
            with StagedFiles() as files:
                files.write_text(out_dir / "bench.csv", _csv(results))
                files.write_text(
                    out_dir / "bench.json", json.dumps(to_jsonable(doc), indent=2) + "\n"
                )
                files.install()
        except OSError as exc:
            raise os_error(exc, out_dir) from None
    return doc


def _open(artifact: str, opts: BenchOptions, x: np.ndarray) -> _Art:
    """Open an artifact's runner and check its input and batch sizes against this run."""
    path = Path(artifact)
    runner = open_runner(artifact, backend=opts.backend)
    meta = runner.metadata()
    want = _input_shape(meta)
    inner = getattr(runner, "inner", None)
    graph_shape = list(getattr(inner, "input_shape", None) or [])[1:]
    if want and list(x.shape[1:]) != list(want):
        raise ExportError(
            f"the data's images are {list(x.shape[1:])} but {path.name} takes {list(want)}",
            "pass the dataset the model was trained on",
        )
    if len(graph_shape) == 3 and any(
        isinstance(d, int) and d != have for d, have in zip(graph_shape, x.shape[1:], strict=True)
    ):
        raise ExportError(
            f"the data's images are {list(x.shape[1:])} but {path.name} takes {graph_shape}",
            "pass the dataset the model was trained on",
        )
    art = _Art(path, runner, meta, source=_artifact_source(meta, path))
    art.lo = int(getattr(inner, "min_batch", 1) or 1)
    art.hi = getattr(inner, "max_batch", None)
    fitting = [b for b in opts.batch_sizes if art.fits(b)]
    if not fitting:
        span = f"{art.lo}" if art.hi == art.lo else f"{art.lo}-{art.hi or 'any'}"
        raise UsageError(
            f"{path.name} takes batches of {span} only; none of --batch-sizes "
            f"{','.join(map(str, opts.batch_sizes))} fits",
            f"pass --batch-sizes {art.lo}",
        )
    art.step = max(fitting)
    return art


def _time(
    art: _Art, opts: BenchOptions, x: np.ndarray, say: Callable[[str], None]
) -> dict[str, Any]:
    meta = art.meta
    kind = (
        (meta.get("artifact_metadata") or {}).get("kind")
        or ((meta.get("artifact_metadata") or {}).get("artifact") or {}).get("kind")
        or "classifier"
    )
    entry: dict[str, Any] = {
        "artifact": str(art.path),
        "name": art.path.name,
        "backend": meta["backend"],
        "device": meta.get("device"),
        "precision": meta.get("precision"),
        "bytes": meta["bytes"],
        "kind": kind,
        "latency": [],
    }
    where = "the engine's profile" if meta["backend"] == "tensorrt" else "the graph's batch size"
    for b in opts.batch_sizes:
        if not art.fits(b):
            entry["latency"].append({"batch": b, "skipped": f"outside {where} {art.lo}-{art.hi}"})
            continue
        say(f"{art.path.name}: timing batch {b} ({opts.warmup} warm-up, {opts.iters} timed)")
        entry["latency"].append(
            measure_latency(art.runner, x, b, warmup=opts.warmup, iters=opts.iters)
        )
    return entry


def _check_set_fits(tset: _Set, x: np.ndarray, y: np.ndarray, opts: BenchOptions) -> None:
    """A set made for this run: the same eps and the very test images and labels."""
    name = tset.path.name if tset.path is not None else "in memory"
    if abs(float(tset.meta["eps"]) - opts.eps) > 1e-9:
        raise ExportError(
            f"the transfer set {name} was crafted at eps {tset.meta['eps']:.6g}, "
            f"this run measures eps {opts.eps:.6g}",
            "pass the --eps it was crafted at, or craft a set at this eps",
        )
    if len(tset.y) != len(y) or not np.array_equal(tset.y, y) or not np.array_equal(tset.x, x):
        raise ExportError(
            f"the transfer set {name} holds other images than this run's test images",
            "use the same --data, --n and --seed",
        )


def _cached_set(
    path: Path,
    x: np.ndarray,
    y: np.ndarray,
    opts: BenchOptions,
    num_classes: int,
    source: Any,
) -> _Set | None:
    """A set crafted earlier into --out for this very run, or None (then it is crafted again).

    A cached set is checked like any other; one that fails the checks is an error, not a miss.
    """
    if not path.is_file():
        return None
    tset = _Set(path, *load_transfer_set(path, num_classes=num_classes))
    if tset.meta.get("source_sha256") != source:
        return None
    try:
        _check_set_fits(tset, x, y, opts)
    except ExportError:
        return None
    return tset


def _robust(
    opts: BenchOptions,
    art: _Art,
    x: np.ndarray,
    y: np.ndarray,
    tset: _Set,
    say: Callable[[str], None],
) -> dict[str, Any]:
    source, tmeta = art.source, tset.meta
    attacks: list[dict[str, Any]] = []
    worst = art.clean_ok.copy()
    # crafted on this very FP32 PyTorch model, the "transfer" set is a white-box attack on it
    white_box = art.meta["backend"].startswith("torch") and source == tmeta.get("source_sha256")
    for name, adv in tset.advs.items():
        ok = art.feed.predict(adv) == y
        worst &= ok
        attacks.append(
            {
                "name": name,
                "kind": "white-box" if white_box else "transfer",
                "crafted_on": "fp32 pytorch",
                "n": len(y),
                "unperturbed": tmeta["unperturbed"][name],
                "robust_acc": float(ok.mean()),
            }
        )
    result: dict[str, Any] = {
        "source_sha256": source,
        "white_box": white_box,
        "transfer_set": {
            "path": None if tset.path is None else str(tset.path),
            "sha256": tmeta["sha256"],
        },
        "attacks": attacks,
        "worst_case_transfer_acc": float(worst.mean()),
    }
    q = len(y) if opts.query_n is None else min(opts.query_n, len(y))
    try:
        __import__("torch")
    except ImportError:
        result["query"] = "skipped: the Square attack needs torch on this machine"
        result["worst_case_acc"] = result["worst_case_transfer_acc"]
        result["worst_case_n"] = len(y)
        return result
    say(f"{art.path.name}: Square ({opts.n_queries} queries) on the artifact itself, {q} images")
    t0 = time.perf_counter()
    ok_q = query_attack(
        art.feed, x[:q], y[:q], eps=opts.eps, n_queries=opts.n_queries, seed=opts.seed
    )
    attacks.append(
        {
            "name": "square",
            "kind": "query",
            "n_queries": opts.n_queries,
            "n": q,
            "robust_acc": float(ok_q.mean()),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    )
    # the headline: per example, over clean, every transfer attack and the query attack
    result["worst_case_acc"] = float((worst[:q] & ok_q).mean())
    result["worst_case_n"] = q
    return result


def _csv(results: list[dict[str, Any]]) -> str:
    cols = [
        "artifact",
        "backend",
        "precision",
        "bytes",
        "batch",
        "mean_ms",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "cv",
        "images_per_s",
        "clean_acc",
        "worst_case_acc",
    ]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in results:
        for lat in r["latency"]:
            w.writerow(
                {**r, **lat, "worst_case_acc": (r.get("robust") or {}).get("worst_case_acc")}
            )
    return buf.getvalue()
