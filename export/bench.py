"""``advedge bench``: latency and robust accuracy measured on the deployed artifact itself.

For each artifact (an ``.engine``, an ``.onnx`` or a checkpoint, each run by its runner, see
:mod:`advedge.export.runners`) and each batch size:

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
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
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

import advedge
from advedge.errors import DataError, ExportError, UsageError
from advedge.utils import atomic_write_text, sha256_file, to_jsonable

from .runners import BACKENDS, open_runner

__all__ = ["BenchOptions", "environment_manifest", "run_bench"]

SCHEMA = "advedge.bench/1"
TRANSFER_SCHEMA = "advedge.transfer-set/1"
CV_WARN = 0.15


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

    def validate(self) -> None:
        if not self.artifacts:
            raise UsageError("give at least one --artifact")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise UsageError(f"batch sizes must be positive, got {self.batch_sizes}")
        if self.warmup < 0 or self.iters < 1 or self.n < 1:
            raise UsageError("--warmup must be >= 0, --iters and --n >= 1")
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise UsageError(f"unknown backend {self.backend!r}", "choose " + ", ".join(BACKENDS))
        if self.robust and self.model is None and self.transfer_set is None:
            raise UsageError(
                "--robust needs --model (the FP32 checkpoint the transfer set is crafted on)",
                "add --purifier too for fused artifacts",
            )


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


def load_transfer_set(
    path: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """Load and verify a transfer set.

    Raises:
        ExportError: missing, unreadable or tampered file (sha256 mismatch).
    """
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            x, y = z["x"], z["y"]
            advs = {k: z[f"adv_{k}"] for k in meta["attacks"]}
            stored = str(z["sha256"])
    except FileNotFoundError:
        raise ExportError(f"transfer set not found: {p}") from None
    except Exception as exc:
        raise ExportError(f"unreadable transfer set {p}: {type(exc).__name__}: {exc}") from None
    if _array_sha(x, y, *(advs[k] for k in sorted(advs))) != stored:
        raise ExportError(f"transfer set {p} does not match its sha256 (modified or corrupt)")
    return x, y, advs, {**meta, "sha256": stored}


def _source_key(source: Any) -> str:
    return json.dumps(source, sort_keys=True)


def craft_transfer_set(
    opts: BenchOptions,
    x: np.ndarray,
    y: np.ndarray,
    fused: bool,
    out_dir: Path,
    say: Callable[[str], None],
) -> tuple[Path, dict[str, Any]]:
    """PGD-20 and APGD-CE on the FP32 PyTorch model (or purifier + model); cached by source."""
    from advedge.checkpoint import load_model, resolve_checkpoint

    torch = __import__("torch")
    from advedge.attacks import PGD
    from advedge.attacks.apgd import APGD

    ckpt = resolve_checkpoint(str(opts.model))
    source: Any = sha256_file(ckpt)
    model = load_model(ckpt)
    if fused:
        from advedge.purifier import load_purifier
        from advedge.purifier.checkpoint import resolve_purifier
        from advedge.purifier.evaluate import Purified

        pfile = resolve_purifier(str(opts.purifier))
        source = {"purifier": sha256_file(pfile), "classifier": source}
        model = Purified(load_purifier(pfile), model).eval()
    key = hashlib.sha256(_source_key(source).encode()).hexdigest()[:12]
    path = out_dir / f"transfer-{key}-n{len(y)}.npz"
    if path.is_file():
        _, _, _, meta = load_transfer_set(path)
        if meta.get("source_sha256") == source and meta.get("n") == len(y):
            return path, meta
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
        "n": len(y),
        "crafted_on": "fp32 pytorch",
    }
    save_transfer_set(path, x, y, advs, meta)
    return path, load_transfer_set(path)[3]


def _predict(runner: Any, x: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([runner.run(x[i : i + batch]) for i in range(0, len(x), batch)]).argmax(1)


def query_attack(
    runner: Any, x: np.ndarray, y: np.ndarray, *, eps: float, n_queries: int, seed: int
) -> np.ndarray:
    """Square (L∞, margin loss) against the runner itself; returns per-example correctness."""
    torch = __import__("torch")
    from advedge.attacks.square import Square

    attack = Square(runner, eps=eps, n_queries=n_queries, seed=seed, numpy_model=True)
    adv = attack(torch.from_numpy(x), torch.from_numpy(y)).detach().numpy()
    return _predict(runner, adv.astype(np.float32), 256) == y


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


def run_bench(opts: BenchOptions, *, status: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the benchmark described in the module docstring; returns the ``bench.json`` document.

    Raises:
        UsageError: bad options.
        ExportError: a missing or unknown artifact, data of another shape, a transfer set made
            for another model.
        MissingDependencyError: a backend that cannot run here (exit 3).
    """
    from advedge.data import load_dataset, stratified_subset

    say = status or (lambda m: None)
    opts.validate()
    runners = [(Path(a), open_runner(a, backend=opts.backend)) for a in opts.artifacts]
    try:
        ds = load_dataset(opts.data, download=False)
    except DataError as exc:
        raise DataError(exc.message, "pass --data DIR with a test split") from None
    test = stratified_subset(ds.test, opts.n, opts.seed)
    test = test.subset(np.random.default_rng(opts.seed).permutation(len(test)))
    x = np.ascontiguousarray(test.x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    y = test.y.astype(np.int64)
    for path, runner in runners:
        want = _input_shape(runner.metadata())
        if want and list(x.shape[1:]) != want:
            raise ExportError(
                f"the data's images are {list(x.shape[1:])} but {path.name} takes {want}",
                "pass the dataset the model was trained on",
            )
    out_dir = Path(opts.out) if opts.out else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    transfer: dict[bool, tuple[Path, dict[str, Any]]] = {}
    results = []
    for path, runner in runners:
        meta = runner.metadata()
        entry: dict[str, Any] = {
            "artifact": str(path),
            "name": path.name,
            "backend": meta["backend"],
            "device": meta.get("device"),
            "precision": meta.get("precision"),
            "bytes": meta["bytes"],
            "kind": (meta.get("artifact_metadata") or {}).get("kind")
            or ((meta.get("artifact_metadata") or {}).get("artifact") or {}).get("kind")
            or "classifier",
            "latency": [],
        }
        lo, hi = (
            getattr(getattr(runner, "inner", None), "min_batch", 1),
            getattr(getattr(runner, "inner", None), "max_batch", None),
        )
        for b in opts.batch_sizes:
            if b < lo or (hi is not None and b > hi):
                entry["latency"].append(
                    {"batch": b, "skipped": f"outside the engine's profile {lo}-{hi}"}
                )
                continue
            say(f"{path.name}: timing batch {b} ({opts.warmup} warm-up, {opts.iters} timed)")
            entry["latency"].append(
                measure_latency(runner, x, b, warmup=opts.warmup, iters=opts.iters)
            )
        step = max(b for b in [*opts.batch_sizes, 1] if b >= lo and (hi is None or b <= hi))
        clean_ok = _predict(runner, x, step) == y
        entry["clean_acc"] = float(clean_ok.mean())
        entry["n"] = len(y)
        if opts.robust:
            entry["robust"] = _robust(
                opts,
                path,
                runner,
                meta,
                x,
                y,
                clean_ok,
                step,
                transfer,
                opts.transfer_set,
                out_dir,
                say,
            )
        results.append(entry)
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
    if out_dir is not None:
        atomic_write_text(out_dir / "bench.json", json.dumps(to_jsonable(doc), indent=2) + "\n")
        atomic_write_text(out_dir / "bench.csv", _csv(results))
    return doc


def _robust(
    opts: BenchOptions,
    path: Path,
    runner: Any,
    meta: dict[str, Any],
    x: np.ndarray,
    y: np.ndarray,
    clean_ok: np.ndarray,
    step: int,
    transfer: dict[bool, tuple[Path, dict[str, Any]]],
    transfer_set: str | None,
    out_dir: Path | None,
    say: Callable[[str], None],
) -> dict[str, Any]:
    source = _artifact_source(meta, path)
    fused = isinstance(source, dict)
    if transfer_set is not None:
        tpath = Path(transfer_set)
        tmeta = load_transfer_set(tpath)[3]
    else:
        if fused and opts.purifier is None:
            raise UsageError(f"{path.name} is a fused purifier + classifier: pass --purifier too")
        if fused not in transfer:
            transfer[fused] = craft_transfer_set(opts, x, y, fused, out_dir or Path("."), say)
        tpath, tmeta = transfer[fused]
    if source is not None and tmeta.get("source_sha256") != source:
        raise ExportError(
            f"the transfer set {tpath.name} was crafted on another model than {path.name}",
            "its recorded source sha256 differs from the artifact's; craft it on the artifact's parent",
        )
    tx, ty, advs, _ = load_transfer_set(tpath)
    if len(ty) != len(y) or not np.array_equal(ty, y) or not np.array_equal(tx, x):
        raise ExportError(
            f"the transfer set {tpath.name} holds other images than this run's test images",
            "use the same --data, --n and --seed",
        )
    attacks: list[dict[str, Any]] = []
    worst = clean_ok.copy()
    # crafted on this very FP32 PyTorch model, the "transfer" set is a white-box attack on it
    white_box = meta["backend"].startswith("torch") and source == tmeta.get("source_sha256")
    for name, adv in advs.items():
        ok = _predict(runner, adv, step) == y
        worst &= ok
        attacks.append(
            {
                "name": name,
                "kind": "white-box" if white_box else "transfer",
                "crafted_on": "fp32 pytorch",
                "n": len(y),
                "robust_acc": float(ok.mean()),
            }
        )
    result: dict[str, Any] = {
        "source_sha256": source,
        "white_box": white_box,
        "transfer_set": {"path": str(tpath), "sha256": tmeta["sha256"]},
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
    say(f"{path.name}: Square ({opts.n_queries} queries) on the artifact itself, {q} images")
    t0 = time.perf_counter()
    ok_q = query_attack(
        runner, x[:q], y[:q], eps=opts.eps, n_queries=opts.n_queries, seed=opts.seed
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
