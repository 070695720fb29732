"""Examples/s of advedge's evaluation: PGD-20 against the plain reference loop, and the suites.

In one run, on the same model and the same real CIFAR-10 test images:

* the plain fp32 eager PGD-20 loop of ``attack_throughput.py`` (the reference), run like an
  evaluation: a clean pass over all examples, then PGD-20 on the clean-correct ones;
* advedge's ``evaluate`` with PGD-20 (attack plus per-example bookkeeping): ratio to the
  reference, goal >= 1x on CPU;
* the ``quick`` and ``standard`` suites through ``evaluate`` (cascading APGD-CE, APGD-T, Square):
  examples/s and seconds per 100 examples, and their cost relative to the reference PGD-20.

The model is trained for a few PGD-AT epochs first (a random model is broken at once and would
make the cascade trivially cheap), unless ``--model-path`` names a checkpoint.

    python benchmarks/eval_throughput.py [--arch resnet8] [--n 200] [--train-subset 2000]
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch
from _common import DATA, eval_parser, stamp, write_results
from attack_throughput import reference_pgd

from advedge.checkpoint import load_model
from advedge.data import load_dataset, to_tensor
from advedge.evaluation import build_suite, evaluate
from advedge.training.engine import TrainConfig, train
from advedge.utils import resolve_device


def main() -> None:
    parser = eval_parser(__doc__.splitlines()[0], n=200, batch_size=200)
    parser.add_argument("--arch", default="resnet8")
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--n-queries", type=int, default=5000)
    parser.add_argument("--train-subset", type=int, default=2000)
    parser.add_argument("--train-epochs", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    data = load_dataset(DATA)

    if args.model_path is None:
        out = Path(tempfile.mkdtemp()) / "run"
        t0 = time.perf_counter()
        train(
            TrainConfig(
                data=str(DATA),
                model=args.arch,
                method="pgd-at",
                epochs=args.train_epochs,
                out=str(out),
                subset=args.train_subset,
                batch_size=128,
                lr=0.05,
                eval_n=64,
                eval_steps=2,
                device=str(device),
            ),
            dataset=data,
        )
        train_seconds = time.perf_counter() - t0
        model_path = out
    else:
        train_seconds = None
        model_path = Path(args.model_path)
    model = load_model(model_path, device=device)
    n = args.n
    x = to_tensor(data.test.x[:n]).to(device)
    y = torch.as_tensor(data.test.y[:n]).to(device)
    eps = 8 / 255

    rows = []
    # The reference does the same work as advedge's evaluation: one clean pass over all n
    # examples, then the plain PGD-20 loop on the examples the model gets right (attacking an
    # example that is already misclassified is wasted work, and both sides skip it).
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.no_grad():
        right = (
            torch.cat(
                [model(x[i : i + args.batch_size]).argmax(1) for i in range(0, n, args.batch_size)]
            )
            == y
        )
    xr, yr = x[right], y[right]
    correct = 0.0
    for i in range(0, len(yr), args.batch_size):
        xb, yb = xr[i : i + args.batch_size], yr[i : i + args.batch_size]
        correct += float(reference_pgd(model, xb, yb)) * len(yb)
    ref_seconds = time.perf_counter() - t0
    rows.append(
        {
            "run": "reference: clean pass + plain PGD-20 loop",
            "robust acc": round(correct / n, 4),
            "s / 100 ex": round(100 * ref_seconds / n, 2),
            "examples/s": round(n / ref_seconds, 2),
            "cost vs reference": "1.0x",
        }
    )
    results = {}
    for label, attacks, cascade in (
        ("advedge PGD-20", build_suite("quick", model, eps=eps)[:1], False),
        ("quick suite (PGD-20, CW-20)", build_suite("quick", model, eps=eps), True),
        (
            "standard suite (APGD-CE, APGD-T, Square)",
            build_suite("standard", model, eps=eps, n_queries=args.n_queries),
            True,
        ),
    ):
        t0 = time.perf_counter()
        res = evaluate(
            model,
            data.test,
            attacks,
            eps=eps,
            n=n,
            batch_size=args.batch_size,
            device=device,
            cascade=cascade,
            flags_n=0,
        )
        seconds = time.perf_counter() - t0
        results[label] = {
            "seconds": round(seconds, 3),
            "examples_per_s": round(n / seconds, 3),
            "clean_acc": res["clean_acc"],
            "worst_case_acc": res["worst_case_acc"],
            "attacks": [
                {k: e[k] for k in ("name", "robust_acc", "n_attacked", "seconds")}
                for e in res["attacks"]
            ],
        }
        rows.append(
            {
                "run": label,
                "robust acc": round(res["worst_case_acc"], 4),
                "s / 100 ex": round(100 * seconds / n, 2),
                "examples/s": round(n / seconds, 2),
                "cost vs reference": f"{seconds / ref_seconds:.2f}x",
            }
        )
    pgd_ratio = round(ref_seconds / results["advedge PGD-20"]["seconds"], 3)
    payload = {
        "benchmark": "eval_throughput",
        **stamp(),
        "settings": {
            "arch": args.arch,
            "n": n,
            "batch_size": args.batch_size,
            "eps": eps,
            "n_queries": args.n_queries,
            "device": str(device),
            "train": {
                "subset": args.train_subset,
                "epochs": args.train_epochs,
                "method": "pgd-at",
                "seconds": train_seconds,
            },
        },
        "reference_pgd20": {"seconds": round(ref_seconds, 3), "robust_acc": correct / n},
        "runs": results,
        "pgd20_speedup": pgd_ratio,
        "goal": 3.0 if device.type == "cuda" else 1.0,
    }
    rows.append(
        {
            "run": "advedge PGD-20 / reference",
            "robust acc": "",
            "s / 100 ex": "",
            "examples/s": f"{pgd_ratio}x (goal >= {payload['goal']}x)",
            "cost vs reference": "",
        }
    )
    write_results(
        f"eval_throughput_{device.type}_{args.arch}{args.tag}",
        payload,
        rows,
        ["run", "robust acc", "s / 100 ex", "examples/s", "cost vs reference"],
    )
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
