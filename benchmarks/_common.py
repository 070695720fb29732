"""Shared plumbing of the throughput benchmarks: timing, machine description, result files."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advedge.utils import atomic_write_text, environment

# Both can be moved (benchmarks/gpu_check.py does, on a machine that has only the working tree
# and writes where its results travel back from).
RESULTS = Path(
    os.environ.get("ADVEDGE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results"
)
DATA = Path(
    os.environ.get("ADVEDGE_BENCH_DATA")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn: Callable[[], Any], *, warmup: int, iters: int, device: torch.device) -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` calls, synchronising the device each time."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def reference_pgd_examples(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
) -> torch.Tensor:
    """Plain fp32 eager L-inf PGD from a uniform random start: the benchmarks' baseline attack."""
    import torch.nn.functional as F

    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    return x_adv


def summarise(times: list[float], batch: int) -> dict[str, float]:
    med = statistics.median(times)
    return {
        "median_s": round(med, 5),
        "mean_s": round(statistics.fmean(times), 5),
        "images_per_s": round(batch / med, 2),
        "iters": len(times),
    }


def cifar_batch(batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, str]:
    """A real CIFAR-10 test batch when ../shared/data is present, else seeded random images."""
    path = DATA / "test.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as z:
            x = torch.from_numpy(z["x"][:batch]).permute(0, 3, 1, 2).float() / 255
            y = torch.from_numpy(z["y"][:batch]).long()
        source = "cifar10 test"
    else:
        g = torch.Generator().manual_seed(0)
        x = torch.rand(batch, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        source = "random"
    return x.to(device), y.to(device), source


def write_results(
    name: str,
    payload: dict[str, Any],
    rows: list[dict[str, Any]],
    columns: list[str],
    directory: Path = RESULTS,
    *,
    notes: list[str] | None = None,
) -> Path:
    """Write ``<directory>/<name>.json`` and ``.md`` (a table naming the machine, then ``notes``,
    Markdown lines)."""
    env = payload["environment"]
    machine = env.get("gpu") or env.get("processor")
    lines = [
        f"# {name}",
        "",
        f"Machine: {machine} ({env.get('cpu_count')} CPUs, torch {env.get('torch')}, "
        f"{'CUDA ' + str(env.get('cuda')) if env.get('gpu') else 'CPU only'}), {payload['created']}.",
        "",
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    lines.append("")
    if notes:
        lines += [*notes, ""]
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    atomic_write_text(directory / f"{name}.md", "\n".join(lines))
    return directory / f"{name}.md"


def base_parser(description: str, *, batch_size: int, iters: int) -> argparse.ArgumentParser:
    """The options every throughput benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--iters", type=int, default=iters)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile advedge's model")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    return parser


def eval_parser(description: str, *, n: int, batch_size: int) -> argparse.ArgumentParser:
    """The options every evaluation benchmark takes: images, batch size, device, tag."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--n", type=int, default=n)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    return parser


def compare(
    benchmark: str,
    *,
    reference: Callable[[], Any],
    engine: Callable[[], Any],
    engine_label: str,
    args: argparse.Namespace,
    device: torch.device,
    settings: dict[str, Any],
) -> float:
    """Time ``reference`` and ``engine`` in alternating rounds, write results, return the ratio.

    Alternating keeps drift in machine load from favouring either side. The goal is 1x on CPU
    and 3x on a GPU (advedge's engine images/s over the reference's).
    """
    time_it(reference, warmup=args.warmup, iters=0, device=device)
    time_it(engine, warmup=args.warmup, iters=0, device=device)
    ref_t: list[float] = []
    eng_t: list[float] = []
    for _ in range(args.iters):
        ref_t += time_it(reference, warmup=0, iters=1, device=device)
        eng_t += time_it(engine, warmup=0, iters=1, device=device)
    ref = summarise(ref_t, args.batch_size)
    eng = summarise(eng_t, args.batch_size)
    ratio = round(eng["images_per_s"] / ref["images_per_s"], 3)
    goal = 3.0 if device.type == "cuda" else 1.0
    payload = {
        "benchmark": benchmark,
        **stamp(),
        "settings": {
            "model": args.model,
            "batch_size": args.batch_size,
            "device": str(device),
            "compile": args.compile,
            "engine_autocast": "bf16" if device.type == "cuda" else "off",
            **settings,
        },
        "reference": ref,
        "advedge": eng,
        "speedup": ratio,
        "goal": goal,
    }
    rows = [
        {
            "side": "reference (fp32 eager)",
            "images/s": ref["images_per_s"],
            "median s": ref["median_s"],
        },
        {"side": engine_label, "images/s": eng["images_per_s"], "median s": eng["median_s"]},
        {"side": "ratio", "images/s": f"{ratio}x (goal >= {goal}x)", "median s": ""},
    ]
    name = f"{benchmark}_{device.type}_{args.model}{args.tag}"
    write_results(name, payload, rows, ["side", "images/s", "median s"])
    print(
        f"{benchmark} {args.model} bs={args.batch_size} {device}: reference "
        f"{ref['images_per_s']} img/s, advedge {eng['images_per_s']} img/s, ratio {ratio}x"
    )
    return ratio


def stamp() -> dict[str, Any]:
    import datetime as dt

    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
    }


def publish(
    name: str, payload: dict[str, Any], rows: list[dict[str, Any]], columns: list[str], goals: Any
) -> Path:
    """Write the results (see :func:`write_results`), then print the table and the goals."""
    path = write_results(name, payload, rows, columns, directory=RESULTS)
    print(path.read_text())
    print(json.dumps(goals, indent=1))
    return path
