"""``advedge bench``: latency and robust accuracy measured on the deployed artifact itself.

For each artifact (an ``.engine``, an ``.onnx`` or a checkpoint, each run by its runner, see
:mod:`advedge.export.runtime.base`) and each batch size:

- latency: ``warmup`` untimed calls, then ``iters`` timed calls on real test images; mean, p50,
  p90 and p99 in ms, the coefficient of variation ``cv = std / mean`` (a warning above 0.15: the
  machine was busy or throttling), throughput ``batch / mean`` in images/s, and for runners that
  separate them the host-to-device, compute and device-to-host shares;
- size on disk and clean accuracy on ``n`` test images, computed by the artifact.

The test images are the first ``n`` of the test split in their official order, the images
``advedge eval --n`` takes.

With ``robust`` (details in :mod:`~advedge.export.runtime.robust` and
:mod:`~advedge.export.runtime.craft`):

(a) **transfer**: the attacks of ``advedge eval --suite standard`` (APGD-CE, APGD-T, Square; as
    eval runs them) and CW-20, crafted once on the FP32 PyTorch model the artifact was exported
    from (for a fused artifact, on the FP32 purifier + classifier end to end), every attack's
    examples saved as ``transfer-<sha>.npz`` with their sha256 and the source checkpoint's
    sha256, so a device without torch evaluates the same set; a set made for another model is
    refused;
(b) **white-box-artifact** (ONNX artifacts; ``white_box_artifact``, on by default): APGD-CE
    and APGD-T on a differentiable replica of the artifact's own graph (straight-through
    rounding), checked against the artifact first, every example scored on the artifact
    (:mod:`~advedge.export.runtime.whitebox`);
(c) **query**: the Square attack (5000 queries by default, AutoAttack's budget) run against
    the artifact's runner directly (no gradients), on the images still robust;
(d) the per-example worst case over clean-correct, transfer, white-box-artifact and query: the
    headline, over the first ``query_n`` images (all ``n`` by default). On the FP32 parent it
    is never above ``eval --suite standard``'s on the same images.

Transfer examples overstate the robustness of a quantised artifact (they were crafted at another
precision); the white-box-artifact and query attacks do not have that gap. Every accuracy
carries its 95% Wilson interval. Everything is written to ``bench.json`` (``schema:
advedge.bench/2``, with the threat model, one ``label`` per artifact and the per-example flags)
and ``bench.csv``, with an environment manifest.

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
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from advedge.export.runtime.base import BACKENDS, Runner, RunnerInfo, open_runner
from advedge.export.runtime.environment import environment_manifest
from advedge.export.runtime.feed import Feed
from advedge.export.runtime.labels import artifact_label, unique_labels
from advedge.export.runtime.latency import measure_latency
from advedge.export.runtime.records import bench_csv
from advedge.export.runtime.robust import flags_text, interval, measure_robust, threat_model
from advedge.export.runtime.threads import (
    MAX_THREADS,
    apply_threads,
    busy_warning,
    load_average,
    reset_threads,
)
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

SCHEMA = "advedge.bench/2"
OUTPUTS = ("bench.json", "bench.csv")

# Sane limits, checked before anything is loaded or allocated. A batch of 4096 CIFAR images is
# 50 MB of input; ImageNet-sized ones 2.5 GB. --iters/--warmup bound the time a run can take,
# --n and --n-queries the memory and time of the accuracy and attack passes.
MAX_BATCH = 4096
MAX_WARMUP = 10_000
MAX_ITERS = 100_000
MAX_N = 100_000
MAX_QUERIES = 100_000
MAX_ITER = 10_000
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
    n_queries: int = 5000  # AutoAttack's and advedge eval's budget
    n_iter: int = 100  # APGD-CE's iterations, APGD-T's per target class (eval's default)
    eps: float = 8 / 255
    model: str | None = None
    purifier: str | None = None
    backend: str = "auto"
    out: str | None = None
    seed: int = 0
    transfer_set: str | None = None
    overwrite: bool = False  # replace an earlier bench.json / bench.csv in out
    threads: int | None = None  # intra-op threads of torch and ONNX Runtime (None: the default)
    white_box_artifact: bool = True  # with robust: APGD on each ONNX artifact's own replica
    device: str = "auto"  # PyTorch backends and the transfer set's crafting; GPU providers' index

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
        # at least one: the first call at a batch size compiles, captures a graph or builds an
        # engine (torch-compile, torch-cudagraph, onnxruntime-trt), which must not be timed
        _bounded("--warmup", self.warmup, 1, MAX_WARMUP)
        _bounded("--iters", self.iters, 1, MAX_ITERS)
        _bounded("--n", self.n, 1, MAX_N)
        if self.query_n is not None:
            _bounded("--query-n", self.query_n, 1, MAX_N)
        _bounded("--n-queries", self.n_queries, 1, MAX_QUERIES)
        _bounded("--n-iter", self.n_iter, 1, MAX_ITER)
        if self.threads is not None:
            _bounded("--threads", self.threads, 1, MAX_THREADS)
        _bounded("--seed", self.seed, 0, 2**32 - 1)
        if not (math.isfinite(self.eps) and 0.0 < self.eps <= 1.0):
            raise UsageError(f"--eps must lie in (0, 1], got {self.eps}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device).strip().lower()):
            raise UsageError(f"unknown device {self.device!r}", "use auto, cpu, cuda or cuda:N")
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
    # images and a timing batch; with robust, the four attacks' arrays, the crafting's
    # working copy, Square's and the white-box attacks' two
    copies = 10 if opts.robust else 2
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
    label: str = ""  # its one human name (labels.artifact_label)

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
                with _threads(opts.threads) as applied:
                    return _run(opts, out_dir, say, applied)
            except BaseException:
                made.remove()
                raise


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[dict[str, Any]]:
    """:func:`~advedge.export.runtime.threads.apply_threads` for the run, torch's own thread
    count and the ONNX Runtime setting restored after it (a caller's process keeps its own)."""
    try:
        import torch

        before: int | None = torch.get_num_threads()
    except ImportError:
        torch, before = None, None
    try:
        yield apply_threads(n)
    finally:
        reset_threads()
        if torch is not None and before is not None:
            torch.set_num_threads(before)


@dataclass
class _Plan:
    """What the checks found: the test images, the artifacts, the transfer sets to use or
    craft."""

    test: Any  # the ImageArrays the attacks read (uint8, as advedge eval reads them)
    x: np.ndarray
    y: np.ndarray
    num_classes: int
    arts: list[_Art]
    sets: dict[bool, TransferSet] = field(default_factory=dict)
    to_craft: dict[bool, Path] = field(default_factory=dict)


def _test_images(opts: BenchOptions) -> tuple[Any, np.ndarray, np.ndarray, int]:
    """The first ``n`` test images in their official order, as ``advedge eval --n`` takes them:
    the split's subset, the images as float32 NCHW in [0, 1], the labels and the class count."""
    from advedge.data import load_dataset

    try:
        ds = load_dataset(opts.data, download=False)
    except DataError as exc:
        raise DataError(exc.message, "pass --data DIR with a test split") from None
    n = min(opts.n, len(ds.test))
    _check_memory(opts, ds.test.x.shape[1:], n)
    test = ds.test.subset(np.arange(n))
    x = np.ascontiguousarray(test.x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
    return test, x, test.y.astype(np.int64), int(ds.num_classes)


def _check(opts: BenchOptions, out_dir: Path | None) -> _Plan:
    """Every input before any work: checkpoints, data, transfer set, artifacts and their logits."""
    sources: dict[bool, Any] = {}  # fused or not -> the source sha256 a set is crafted on

    def source_of(fused: bool) -> Any:
        if fused not in sources:
            sources[fused] = model_source(opts, fused)[0]
        return sources[fused]

    if opts.robust and opts.transfer_set is None:
        source_of(False)  # --model exists and is a classifier checkpoint
    test, x, y, num_classes = _test_images(opts)
    given = None
    if opts.robust and opts.transfer_set is not None:
        given = TransferSet.load(Path(opts.transfer_set), num_classes=num_classes)
        check_set_fits(given, x, y, opts)

    plan = _Plan(test, x, y, num_classes, [_open(a, opts, x) for a in opts.artifacts])
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


def _run(
    opts: BenchOptions, out_dir: Path | None, say: Callable[[str], None], threads: dict[str, Any]
) -> dict[str, Any]:
    load_before = load_average()
    with held_logs():  # a refused run prints its error only, not the checks' progress
        plan = _check(opts, out_dir)
    x, y = plan.x, plan.y
    labels = [artifact_label(a.info, a.path.stem) for a in plan.arts]
    for art, label in zip(
        plan.arts, unique_labels(labels, [a.path.name for a in plan.arts]), strict=True
    ):
        art.label = label
    results = [_time(art, opts, x, say) for art in plan.arts]
    for fused, path in plan.to_craft.items():
        # not a leftover: a set is complete once its atomic write finished, and it is costly;
        # a later failure (or Ctrl-C) keeps it for the next run, which checks it on load
        craft_transfer_set(opts, plan.test, fused, path, say)
        plan.sets[fused] = TransferSet.load(path, num_classes=plan.num_classes)
    for art, entry in zip(plan.arts, results, strict=True):
        entry["clean_acc"] = float(art.clean_ok.mean())
        entry["clean_acc_ci95"] = interval(art.clean_ok)
        entry["clean_flags"] = flags_text(art.clean_ok)
        entry["n"] = len(y)
        if opts.robust:
            tset = plan.sets[art.fused]
            entry["robust"] = measure_robust(opts, art, x, y, tset, say, test=plan.test)
        if getattr(art.runner, "shapes", None) and art.runner.shapes():
            entry["shapes"] = art.runner.shapes()  # compiled / captured batches, padded calls
    given = next(iter(plan.sets.values())) if opts.transfer_set is not None else None
    load = {"before": load_before, "after": load_average()}
    busy = busy_warning(
        load["before"], threads["threads"], threads["cpus_available"], after=load["after"]
    )
    doc = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment_manifest(),
        "settings": {k: v for k, v in vars(opts).items() if k != "artifacts"},
        "data": {"path": str(opts.data), "split": "test", "n": len(y), "order": "official"},
        "threat_model": (
            threat_model(opts, len(y), plan.num_classes, given) if opts.robust else None
        ),
        "threads": threads,
        "load_average": load,
        "results": results,
        "warnings": [busy] * (busy is not None)
        + [
            f"{r['label']} batch {lat['batch']}: {lat['warning']}"
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
            files.write_text(out_dir / "bench.csv", bench_csv(results))
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
    runner = open_runner(
        artifact, backend=opts.backend, device=opts.device, batch_sizes=opts.batch_sizes
    )
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
        "label": art.label,
        "model": getattr(info, "model", None),
        "backend": info.backend,
        "device": info.device,
        "precision": info.precision,
        **({"artifact_precision": info.stored_precision} if info.stored_precision else {}),
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
        say(f"{art.label}: timing batch {b} ({opts.warmup} warm-up, {opts.iters} timed)")
        entry["latency"].append(
            measure_latency(art.runner, x, b, warmup=opts.warmup, iters=opts.iters)
        )
    return entry
