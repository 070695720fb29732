"""``advedge bench``: latency and robust accuracy measured on the deployed artifact itself.

For each artifact (an ``.engine``, an ``.onnx`` or a checkpoint, each run by its runner, see
:mod:`advedge.export.runtime.base`) and each batch size:

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
wherever it is read (:mod:`~advedge.export.runtime.transfer`): its sha256, then what it holds
(finite images in [0, 1], every adversarial image within eps of its clean one, labels in range,
consistent counts, not every image left clean).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from advedge.export.runtime.base import BACKENDS, Runner, RunnerInfo, open_runner
from advedge.export.runtime.environment import environment_manifest
from advedge.export.runtime.feed import Feed, query_attack
from advedge.export.runtime.latency import measure_latency
from advedge.export.runtime.transfer import (
    TransferSet,
    cached_set,
    check_set_fits,
    craft_transfer_set,
    model_source,
    transfer_path,
)

from advedge.errors import DataError, ExportError, UsageError, os_error
from advedge.locks import output_lock
from advedge.outputs import (
    Leftovers,
    StagedFiles,
    check_out,
    held_logs,
    quiet_warnings,
    refuse_overwrite,
)
from advedge.utils import available_memory, to_jsonable

__all__ = ["BenchOptions", "run_bench"]

SCHEMA = "advedge.bench/1"
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
    runners that compute on the host (``RunnerInfo.host_compute``: ONNX Runtime's CPU provider,
    PyTorch on the CPU); a GPU backend's activations live in device memory, which the runner's
    own allocation reports."""
    if not art.info.host_compute:
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
            f"{need / gib:.1f} GiB on {art.info.backend} ({art.info.device or 'cpu'}), "
            f"more than half of the {avail / gib:.1f} GiB available",
            "choose smaller --batch-sizes",
        )


# ------------------------------------------------------------------------------ the run
@dataclass
class _Art:
    """One artifact: its runner, what the runner says about it and what the checks found."""

    path: Path
    runner: Runner | None
    info: RunnerInfo
    step: int = 1
    feed: Any = None
    clean_ok: Any = None

    @property
    def lo(self) -> int:
        return self.info.batch_range[0]

    @property
    def hi(self) -> int | None:
        return self.info.batch_range[1]

    @property
    def source(self) -> Any:
        return self.info.source_sha256

    @property
    def fused(self) -> bool:
        return isinstance(self.source, dict)

    def fits(self, b: int) -> bool:
        return b >= self.lo and (self.hi is None or b <= self.hi)


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
    sets: dict[bool, TransferSet] = field(default_factory=dict)
    to_craft: dict[bool, Path] = field(default_factory=dict)


def _test_images(opts: BenchOptions) -> tuple[np.ndarray, np.ndarray, int]:
    """The ``n`` test images (float32 NCHW in [0, 1], in a seeded order), labels, class count."""
    from advedge.data import load_dataset, stratified_subset

    try:
        ds = load_dataset(opts.data, download=False)
    except DataError as exc:
        raise DataError(exc.message, "pass --data DIR with a test split") from None
    test = stratified_subset(ds.test, opts.n, opts.seed)
    _check_memory(opts, test.x.shape[1:], len(test))
    test = test.subset(np.random.default_rng(opts.seed).permutation(len(test)))
    x = np.ascontiguousarray(test.x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    return x, test.y.astype(np.int64), int(ds.num_classes)


def _check(opts: BenchOptions, out_dir: Path | None) -> _Plan:
    """Every input before any work: checkpoints, data, transfer set, artifacts and their logits."""
    sources: dict[bool, Any] = {}  # fused or not -> the source sha256 a set is crafted on

    def source_of(fused: bool) -> Any:
        if fused not in sources:
            sources[fused] = model_source(opts, fused)[0]
        return sources[fused]

    if opts.robust and opts.transfer_set is None:
        source_of(False)  # --model exists and is a classifier checkpoint
    x, y, num_classes = _test_images(opts)
    given = None
    if opts.robust and opts.transfer_set is not None:
        given = TransferSet.load(Path(opts.transfer_set), num_classes=num_classes)
        check_set_fits(given, x, y, opts)

    plan = _Plan(x, y, num_classes, [_open(a, opts, x) for a in opts.artifacts])
    for art in plan.arts:  # before any batch runs on it
        _check_activations(art, x.shape[1:])
    for art in plan.arts:  # every artifact on every test image: shapes, classes, finite logits
        art.feed = Feed(art.runner, art.path.name, art.step, art.lo, num_classes)
        art.clean_ok = art.feed.predict(x) == y
    if opts.robust:
        for art in plan.arts:
            if given is not None:
                _check_given_set(given, art)
                plan.sets[art.fused] = given
            else:
                _plan_set(plan, art, opts, source_of(art.fused), out_dir)
    return plan


def _check_given_set(given: TransferSet, art: _Art) -> None:
    """A --transfer-set crafted on the artifact's parent (where the artifact records one)."""
    want = given.meta.get("source_sha256")
    if art.source is not None and want != art.source:
        raise ExportError(
            f"the transfer set {given.path.name} was crafted on another model than {art.path.name}",
            "its recorded source sha256 differs from the artifact's; craft it on "
            "the artifact's parent",
        )


def _plan_set(
    plan: _Plan, art: _Art, opts: BenchOptions, source: Any, out_dir: Path | None
) -> None:
    """The set an artifact is attacked with: one cached in ``out_dir``, or one to craft on
    ``source`` (the artifact must have been exported from it)."""
    if art.fused and opts.purifier is None:
        raise UsageError(f"{art.path.name} is a fused purifier + classifier: pass --purifier too")
    if art.source is not None and art.source != source:
        raise ExportError(
            f"{art.path.name} was not exported from --model {opts.model}"
            + (f" and --purifier {opts.purifier}" if art.fused else ""),
            "the sha256 its metadata records differs; pass the checkpoint it came from",
        )
    if art.fused in plan.sets or art.fused in plan.to_craft:
        return
    path = transfer_path(out_dir or Path("."), source, opts, plan.x)
    cached = cached_set(path, plan.x, plan.y, opts, plan.num_classes, source)
    if cached is not None:
        plan.sets[art.fused] = cached
    else:
        plan.to_craft[art.fused] = path


def _run(opts: BenchOptions, out_dir: Path | None, say: Callable[[str], None]) -> dict[str, Any]:
    with held_logs():  # a refused run prints its error only, not the checks' progress
        plan = _check(opts, out_dir)
    x, y = plan.x, plan.y
    results = [_time(art, opts, x, say) for art in plan.arts]
    for fused, path in plan.to_craft.items():
        # not a leftover: a set is complete once its atomic write finished, and it is costly;
        # a later failure (or Ctrl-C) keeps it for the next run, which checks it on load
        craft_transfer_set(opts, x, y, fused, path, say)
        plan.sets[fused] = TransferSet.load(path, num_classes=plan.num_classes)
    for art, entry in zip(plan.arts, results, strict=True):
        entry["clean_acc"] = float(art.clean_ok.mean())
        entry["n"] = len(y)
        if opts.robust:
            entry["robust"] = _robust(opts, art, x, y, plan.sets[art.fused], say)
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
        _write(out_dir, results, doc)
    return doc


def _write(out_dir: Path, results: list[dict[str, Any]], doc: dict[str, Any]) -> None:
    """bench.csv and bench.json, both staged then renamed together: never a new CSV beside an
    old JSON."""
    try:
        with StagedFiles() as files:
            files.write_text(out_dir / "bench.csv", _csv(results))
            files.write_text(out_dir / "bench.json", json.dumps(to_jsonable(doc), indent=2) + "\n")
            files.install()
    except OSError as exc:
        raise os_error(exc, out_dir) from None


def _check_image_shape(info: RunnerInfo, x: np.ndarray, name: str) -> None:
    """The data's images have the shape the artifact records and the one its graph declares."""
    have = list(x.shape[1:])
    graph = list(info.graph_input_shape)
    if info.input_shape and have != list(info.input_shape):
        takes = list(info.input_shape)
    elif len(graph) == 3 and any(
        isinstance(d, int) and d != h for d, h in zip(graph, have, strict=True)
    ):
        takes = graph
    else:
        return
    raise ExportError(
        f"the data's images are {have} but {name} takes {takes}",
        "pass the dataset the model was trained on",
    )


def _open(artifact: str, opts: BenchOptions, x: np.ndarray) -> _Art:
    """Open an artifact's runner and check its input and batch sizes against this run."""
    path = Path(artifact)
    runner = open_runner(artifact, backend=opts.backend)
    _check_image_shape(runner.info, x, path.name)
    art = _Art(path, runner, runner.info)
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
    info = art.info
    entry: dict[str, Any] = {
        "artifact": str(art.path),
        "name": art.path.name,
        "backend": info.backend,
        "device": info.device,
        "precision": info.precision,
        "bytes": info.size_bytes,
        "kind": info.kind,
        "latency": [],
    }
    for b in opts.batch_sizes:
        if not art.fits(b):
            entry["latency"].append(
                {"batch": b, "skipped": f"outside {info.batch_range_source} {art.lo}-{art.hi}"}
            )
            continue
        say(f"{art.path.name}: timing batch {b} ({opts.warmup} warm-up, {opts.iters} timed)")
        entry["latency"].append(
            measure_latency(art.runner, x, b, warmup=opts.warmup, iters=opts.iters)
        )
    return entry


def _robust(
    opts: BenchOptions,
    art: _Art,
    x: np.ndarray,
    y: np.ndarray,
    tset: TransferSet,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """The transfer attacks' and the query attack's accuracy on the artifact, and the per-example
    worst case over them and the clean images."""
    result, worst = _transfer_results(art, y, tset)
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
    result["attacks"].append(
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


def _transfer_results(
    art: _Art, y: np.ndarray, tset: TransferSet
) -> tuple[dict[str, Any], np.ndarray]:
    """Each transfer attack's accuracy, and per example whether it survived clean and all."""
    source, tmeta = art.source, tset.meta
    attacks: list[dict[str, Any]] = []
    worst = art.clean_ok.copy()
    # crafted on this very FP32 PyTorch model, the "transfer" set is a white-box attack on it
    white_box = art.info.gradients and source == tmeta.get("source_sha256")
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
    return result, worst


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
