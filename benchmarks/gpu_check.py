"""One call on a GPU machine verifies and measures everything GPU-side.

Prepared here (CPU), run there (one NVIDIA GPU, torch with CUDA, onnx, onnxruntime's CPU build;
no TensorRT, no pip, no internet; only the working tree travels)::

    python benchmarks/gpu_check.py --prepare             # here: the payload (real CIFAR-10
                                                         # images and a trained student)
    python benchmarks/gpu_check.py --out "$OUT"          # there: every step below
    python benchmarks/gpu_check.py --dry-run --out /tmp/x  # here: the same plumbing on the CPU

The payload (``benchmarks/gpu_payload/``, about 18 MB) is ignored by git, so the device call
must carry it: ``run(command="python3 benchmarks/gpu_check.py --out $OUT", carry=
["benchmarks/gpu_payload"], timeout_s=600)``. The lent H200's image (device library, KINDS.md)
has python3 3.12 with torch 2.11, onnx, onnxruntime 1.30, safetensors, pyyaml, pillow, typer,
rich and pytest: everything these steps import (onnxconverter-common, for FP16 export only, is
not there and not used).

The steps, in order, each under its own time limit, each writing its part of
``gpu_check.json`` and ``gpu_check.md`` as it finishes (a timeout keeps what ran):

1. ``environment``: torch, CUDA, cuDNN, the GPU and its compute capability, the driver, ONNX
   Runtime and its providers.
2. ``doctor``: ``advedge doctor --json``.
3. ``latency``: batch-1 latency of the ``torch``, ``torch-compile`` and ``torch-cudagraph``
   runners on the student against the launch floor (the replay of a one-kernel CUDA graph and
   a synchronise; goal: the CUDA-graph runner's compute within 2x of it), and the purifier's
   added latency (generator + classifier vs classifier, batch 1 and 128).
4. ``train``: a PGD-AT training step, bf16 + channels_last + torch.compile (advedge's engine)
   vs the plain fp32 eager loop (``train_throughput.py``; goal >= 3x).
5. ``pgd20``: PGD-20 evaluation vs the plain reference loop (``attack_throughput.py``; goal
   >= 3x).
6. ``bench``: ``advedge export`` of the student, then ``advedge bench --backend torch-cudagraph
   --robust`` on it (the transfer set crafted on the GPU) and the FP32 ONNX on ONNX Runtime.
7. ``gpu_tests``: the ``gpu``-marked tests (``pytest -m gpu``).

Without an install (``pip install -e .`` needs pip), :mod:`_bootstrap` maps ``export/`` and
``calibration/`` into ``advedge`` for this process and its subprocesses.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _bootstrap  # noqa: E402

_bootstrap.install()

ROOT = _bootstrap.ROOT
PAYLOAD = HERE / "gpu_payload"  # ignored by git; carried to the device
SHARED = ROOT.parent / "shared" / "data" / "cifar10"
N_TRAIN, N_TEST = 4000, 2000  # 24 MB of uint8 images: well inside the 64 MiB the tree may carry

#: Step name -> seconds it may take (the whole run is planned for about six minutes).
LIMITS = {
    "environment": 30,
    "doctor": 90,
    "latency": 90,
    "train": 90,
    "pgd20": 75,
    "bench": 150,
    "gpu_tests": 120,
}


# --------------------------------------------------------------------------------- preparing
def prepare(student: Path | None) -> Path:
    """Write the payload: ``data/{train,test}.npz`` (the first N_TRAIN training and N_TEST test
    images of the real CIFAR-10) and ``student/`` (a trained classifier run directory)."""
    import numpy as np

    data = PAYLOAD / "data"
    data.mkdir(parents=True, exist_ok=True)
    with np.load(SHARED / "train-0.npz") as z:
        np.savez(
            data / "train.npz",
            **{
                k: z[k][:N_TRAIN] if k != "class_names" else z[k] for k in ("x", "y", "class_names")
            },
        )
    with np.load(SHARED / "test.npz") as z:
        np.savez(
            data / "test.npz",
            **{k: z[k][:N_TEST] if k != "class_names" else z[k] for k in ("x", "y", "class_names")},
        )
    if student is not None:
        dst = PAYLOAD / "student"
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir()
        for name in ("model.safetensors", "config.yaml"):
            if (student / name).is_file():
                shutil.copy2(student / name, dst / name)
    return PAYLOAD


# --------------------------------------------------------------------------------- the record
class Record:
    """``gpu_check.json`` and ``.md`` in ``out``, rewritten after every step."""

    def __init__(self, out: Path) -> None:
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.doc: dict[str, Any] = {
            "benchmark": "gpu_check",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "steps": {},
        }

    def step(self, name: str, fn: Callable[[], dict[str, Any]], deadline: float) -> None:
        left = deadline - time.monotonic()
        if left < 20:
            self.doc["steps"][name] = {"status": "skipped", "reason": "out of time"}
            self.write()
            return
        t0 = time.monotonic()
        print(f"== {name}", flush=True)
        try:
            part = {"status": "ok", **fn()}
        except Exception as exc:  # a step that breaks is recorded; the next one still runs
            part = {
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}"[:500],
                "traceback": traceback.format_exc()[-2000:],
            }
        part["seconds"] = round(time.monotonic() - t0, 1)
        self.doc["steps"][name] = part
        self.write()
        print(json.dumps({k: v for k, v in part.items() if k != "traceback"}, default=str)[:1500])

    def write(self) -> None:
        (self.out / "gpu_check.json").write_text(json.dumps(self.doc, indent=2, default=str) + "\n")
        (self.out / "gpu_check.md").write_text(markdown(self.doc))


def markdown(doc: dict[str, Any]) -> str:
    """The one-page summary: the machine, then one line per step with its headline figures."""
    steps = doc["steps"]
    env = steps.get("environment", {})
    lines = [
        "# gpu_check",
        "",
        f"Machine: {env.get('gpu', '?')} (cc {env.get('capability', '?')}), driver "
        f"{env.get('driver', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, "
        f"cuDNN {env.get('cudnn', '?')}; {doc['created']}.",
        "",
        "| step | status | seconds | headline |",
        "| --- | --- | --- | --- |",
    ]
    for name, part in steps.items():
        lines.append(
            f"| {name} | {part.get('status')} | {part.get('seconds', '')} | "
            f"{str(part.get('headline') or part.get('error') or part.get('reason') or '')[:300]} |"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- helpers
def _env(site: Path, out: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")])
    env["ADVEDGE_BENCH_DATA"] = str(PAYLOAD / "data")
    env["ADVEDGE_BENCH_RESULTS"] = str(out)
    env["ADVEDGE_CACHE_DIR"] = str(out / "cache")
    return env


def _run(cmd: list[str], env: dict[str, str], limit: float) -> subprocess.CompletedProcess[str]:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(
        cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=limit, check=False
    )


def _tail(text: str, n: int = 1500) -> str:
    return text[-n:] if text else ""


# --------------------------------------------------------------------------------- the steps
def environment() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        out["gpu_count"] = torch.cuda.device_count()
    try:
        smi = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=driver_version,clocks.sm,power.draw",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        out["driver"] = smi.stdout.strip().split(",")[0] if smi.returncode == 0 else None
        out["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        out["driver"] = None
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
        out["ort_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        out["onnxruntime"] = None
    out["headline"] = f"{out.get('gpu')} cc {out.get('capability')}, torch {out['torch']}"
    return out


def doctor(env: dict[str, str]) -> dict[str, Any]:
    res = _run([sys.executable, "-m", "advedge", "doctor", "--json"], env, LIMITS["doctor"])
    try:
        report = json.loads(res.stdout)
    except json.JSONDecodeError:
        report = None
    checks = (report or {}).get("checks") or []
    counts: dict[str, int] = {}
    for c in checks:
        counts[str(c.get("status"))] = counts.get(str(c.get("status")), 0) + 1
    return {
        "returncode": res.returncode,
        "report": report,
        "stderr": _tail(res.stderr),
        "stdout": None if report else _tail(res.stdout),
        "headline": f"exit {res.returncode}; " + ", ".join(f"{v} {k}" for k, v in counts.items()),
    }


def _student(device: Any) -> tuple[Any, str]:
    """The carried student, else a resnet8 with random weights (latency does not depend on
    them)."""
    from advedge.checkpoint import load_model
    from advedge.models import create_model

    path = PAYLOAD / "student"
    if (path / "model.safetensors").is_file():
        return load_model(path, device=device).eval(), str(path)
    return create_model("resnet8", num_classes=10).to(device).eval(), "resnet8 (random weights)"


def launch_floor(torch: Any, iters: int = 2000) -> float:
    """Seconds of one replay of a one-kernel CUDA graph plus a synchronise: the least any
    runner's GPU call can take."""
    x = torch.zeros(1, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        x.add_(1)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        x.add_(1)
    for _ in range(100):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def _median_stage(runner: Any, x: Any, iters: int) -> dict[str, float]:
    for _ in range(20):
        runner.timed(x)
    rows = [runner.timed(x)[1] for _ in range(iters)]
    return {
        k: round(1e6 * sorted(r[k] for r in rows)[len(rows) // 2], 1)
        for k in ("h2d_s", "compute_s", "d2h_s", "total_s")
    }


@dataclass(frozen=True)
class Plan:
    """Where and how big: the GPU run, or a CPU dry run of the same plumbing (``--dry-run``:
    tiny sizes, no CUDA graphs, for testing the script here)."""

    device: str = "cuda"
    model: str = "resnet18"  # the throughput steps' model
    train_batch: int = 256
    attack_batch: int = 512
    iters: int = 6
    latency_iters: int = 300
    bench: tuple[str, ...] = (
        "--n", "500", "--query-n", "200", "--n-queries", "500", "--n-iter", "20",
        "--batch-sizes", "1,32,256", "--warmup", "20", "--iters", "200",
    )  # fmt: skip

    @property
    def gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def modes(self) -> tuple[str, ...]:
        return ("eager", "compile", "cudagraph") if self.gpu else ("eager", "compile")


DRY_RUN = Plan(
    device="cpu",
    model="resnet8",
    train_batch=16,
    attack_batch=16,
    iters=1,
    latency_iters=5,
    bench=("--n", "24", "--query-n", "6", "--n-queries", "10", "--n-iter", "2",
           "--batch-sizes", "1,8", "--warmup", "1", "--iters", "3"),
)  # fmt: skip


def latency(plan: Plan) -> dict[str, Any]:
    import numpy as np
    import torch
    from advedge.export.runtime.torch import TorchRunner

    from advedge.models.purified import Purified
    from advedge.purifier.networks import Generator

    model, source = _student(plan.device)
    floor_us = round(1e6 * launch_floor(torch), 1) if plan.gpu else None
    x1 = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    x128 = np.random.default_rng(0).random((128, 3, 32, 32), dtype=np.float32)
    runners: dict[str, Any] = {}
    for mode in plan.modes:
        runner = TorchRunner(model, device=plan.device, mode=mode)
        runners[mode] = {"batch1_us": _median_stage(runner, x1, plan.latency_iters)}
    best = plan.modes[-1]
    fastest = runners[best]["batch1_us"]["compute_s"]
    gen = Generator(in_channels=3, eps_r=1.25 * 8 / 255)  # the purifier default: 1.25 eps
    purified = Purified(gen.to(plan.device).eval(), model).eval()
    purifier: dict[str, Any] = {}
    for mode in ("eager", best):
        for name, x in (("batch1", x1), ("batch128", x128)):
            alone = _median_stage(
                TorchRunner(model, device=plan.device, mode=mode), x, plan.latency_iters
            )
            both = _median_stage(
                TorchRunner(purified, device=plan.device, mode=mode), x, plan.latency_iters
            )
            purifier[f"{mode}_{name}_us"] = {
                "classifier": alone["compute_s"],
                "purifier+classifier": both["compute_s"],
                "added": round(both["compute_s"] - alone["compute_s"], 1),
            }
    ratio = round(fastest / floor_us, 2) if floor_us else None
    return {
        "model": source,
        "launch_floor_us": floor_us,
        "runners": runners,
        f"{best}_compute_over_floor": ratio,
        "goal": "cudagraph compute within 2x of the launch floor",
        "purifier": purifier,
        "headline": (
            f"floor {floor_us} us; batch-1 compute "
            + ", ".join(f"{m} {r['batch1_us']['compute_s']} us" for m, r in runners.items())
            + f" ({ratio}x floor, goal <= 2x); purifier adds "
            f"{purifier[f'{best}_batch1_us']['added']} us at batch 1 ({best})"
        ),
    }


def _throughput(
    script: str, args: list[str], env: dict[str, str], out: Path, name: str, limit: int
) -> dict[str, Any]:
    res = _run([sys.executable, str(HERE / script), *args], env, limit)
    result = out / f"{name}.json"
    if res.returncode != 0 or not result.is_file():
        raise RuntimeError(f"{script} exit {res.returncode}: {_tail(res.stderr, 600)}")
    payload = json.loads(result.read_text())
    return {
        "result": payload,
        "headline": f"{payload['advedge']['images_per_s']} vs "
        f"{payload['reference']['images_per_s']} img/s: {payload['speedup']}x "
        f"(goal >= {payload['goal']}x)",
    }


def _throughput_args(plan: Plan, batch: int, warmup: int) -> list[str]:
    return [
        "--device", plan.device, "--model", plan.model, "--batch-size", str(batch),
        "--iters", str(plan.iters), "--warmup", str(warmup), "--tag", "_gpu_check",
    ]  # fmt: skip


def train(plan: Plan, env: dict[str, str], out: Path) -> dict[str, Any]:
    """bf16 + channels_last + compile PGD-AT steps vs the fp32 eager loop."""
    args = [*_throughput_args(plan, plan.train_batch, 3), "--compile"]
    name = f"train_throughput_{plan.device.split(':')[0]}_{plan.model}_gpu_check"
    return _throughput("train_throughput.py", args, env, out, name, LIMITS["train"])


def pgd20(plan: Plan, env: dict[str, str], out: Path) -> dict[str, Any]:
    """advedge's PGD-20 evaluation vs the plain reference loop."""
    args = _throughput_args(plan, plan.attack_batch, 2)
    name = f"attack_throughput_{plan.device.split(':')[0]}_{plan.model}_gpu_check"
    return _throughput("attack_throughput.py", args, env, out, name, LIMITS["pgd20"])


def bench(plan: Plan, env: dict[str, str], out: Path) -> dict[str, Any]:
    """advedge export of the student, then bench --robust on torch-cudagraph and the ONNX."""
    student = PAYLOAD / "student"
    if not (student / "model.safetensors").is_file():
        raise RuntimeError("no student in the payload: run --prepare --student RUN first")
    work = out / "bench_work"
    shutil.rmtree(work, ignore_errors=True)
    adv = [sys.executable, "-m", "advedge"]
    res = _run(
        [*adv, "export", "--model", str(student), "--out", str(work / "export"),
         "--data", str(PAYLOAD / "data"), "--json"],
        env,
        90,
    )  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"export exit {res.returncode}: {_tail(res.stderr, 600)}")
    onnx = sorted((work / "export").rglob("*.fp32.onnx"))
    common = [
        "--data", str(PAYLOAD / "data"), "--robust", "--model", str(student), *plan.bench,
        "--device", plan.device, "--json",
    ]  # fmt: skip
    backend = "torch-cudagraph" if plan.gpu else "torch"
    res = _run(
        [*adv, "bench", "--artifact", str(student), "--backend", backend, *common,
         "--out", str(work / backend)],
        env,
        100,
    )  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"bench exit {res.returncode}: {_tail(res.stderr, 600)}")
    doc = json.loads((work / backend / "bench.json").read_text())
    parts: dict[str, Any] = {backend: doc}
    if onnx:
        res = _run(
            [*adv, "bench", "--artifact", str(onnx[0]), *common, "--out", str(work / "ort")],
            env,
            60,
        )
        parts["onnxruntime"] = (
            json.loads((work / "ort" / "bench.json").read_text())
            if res.returncode == 0
            else _tail(res.stderr, 600)
        )
    r = doc["results"][0]
    lat = {x["batch"]: x.get("p50_ms") for x in r["latency"]}
    return {
        "bench": parts,
        "headline": f"{backend}: clean {r['clean_acc']:.3f}, worst case "
        f"{(r.get('robust') or {}).get('worst_case_acc')}, p50 ms by batch {lat}, "
        f"shapes {r.get('shapes')}",
    }


def gpu_tests(env: dict[str, str]) -> dict[str, Any]:
    res = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=-ra",
            "-m",
            "gpu",
            "tests",
        ],
        env,
        LIMITS["gpu_tests"],
    )
    last = [ln for ln in res.stdout.splitlines() if ln.strip()][-1:] or [""]
    return {"returncode": res.returncode, "output": _tail(res.stdout, 4000), "headline": last[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepare", action="store_true", help="write the payload (here, on CPU)")
    parser.add_argument("--student", type=Path, help="--prepare: the trained run to carry")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="where results go")
    parser.add_argument("--budget", type=float, default=540, help="seconds for all steps")
    parser.add_argument("--only", nargs="*", help="run these steps only")
    parser.add_argument(
        "--dry-run", action="store_true", help="the same steps on the CPU, tiny (tests the script)"
    )
    args = parser.parse_args()
    if args.prepare:
        print(prepare(args.student))
        return 0
    plan = DRY_RUN if args.dry_run else Plan()
    deadline = time.monotonic() + args.budget
    out = args.out
    record = Record(out)
    env = _env(_bootstrap.site_dir(folder=out / "site"), out)
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "environment": environment,
        "doctor": lambda: doctor(env),
        "latency": lambda: latency(plan),
        "train": lambda: train(plan, env, out),
        "pgd20": lambda: pgd20(plan, env, out),
        "bench": lambda: bench(plan, env, out),
        "gpu_tests": lambda: gpu_tests(env),
    }
    for name, fn in steps.items():
        if args.only and name not in args.only:
            continue
        record.step(name, fn, deadline)
    failed = [n for n, p in record.doc["steps"].items() if p["status"] != "ok"]
    print("failed or skipped:", failed or "none")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
