"""Images/s of PGD-20 evaluation: advedge's attack vs a plain reference loop.

Both sides attack the same model and batch with PGD-20 (eps 8/255, step 2/255, random start)
and score the result, in one process, alternating. The reference is the usual research loop
(fp32, eager, NCHW); advedge runs :class:`advedge.attacks.PGD` under the evaluation's device
settings (on CUDA: bf16 autocast and channels_last, optionally torch.compile).

    python benchmarks/attack_throughput.py [--model resnet18] [--batch-size 256] [--iters 3]
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F
from _common import cifar_batch, stamp, summarise, time_it, write_results

from advedge.attacks import PGD
from advedge.engine import autocast_context, prepare_model
from advedge.models import create_model

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 20


def reference_pgd(model, x, y):
    """Plain fp32 eager PGD-20 followed by scoring (the comparison baseline)."""
    x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    for _ in range(STEPS):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = x_adv.detach() + ALPHA * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from advedge.utils import resolve_device

    device = resolve_device(args.device)
    x, y, source = cifar_batch(args.batch_size, device)
    torch.manual_seed(0)
    ref_model = create_model(args.model).to(device).eval()
    torch.manual_seed(0)
    model, channels_last = prepare_model(create_model(args.model), device)
    model.eval()
    x_engine = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    run_model = torch.compile(model) if args.compile else model
    attack = PGD(run_model, eps=EPS, alpha=ALPHA, steps=STEPS)
    autocast = autocast_context(device, "auto")

    def engine():
        with autocast():
            x_adv = attack(x_engine, y)
            with torch.no_grad():
                return (run_model(x_adv).argmax(1) == y).float().mean()

    def reference():
        return reference_pgd(ref_model, x, y)

    time_it(reference, warmup=args.warmup, iters=0, device=device)
    time_it(engine, warmup=args.warmup, iters=0, device=device)
    ref_t, eng_t = [], []
    for _ in range(args.iters):
        ref_t += time_it(reference, warmup=0, iters=1, device=device)
        eng_t += time_it(engine, warmup=0, iters=1, device=device)
    ref = summarise(ref_t, args.batch_size)
    eng = summarise(eng_t, args.batch_size)
    ratio = round(eng["images_per_s"] / ref["images_per_s"], 3)
    payload = {
        "benchmark": "attack_throughput",
        **stamp(),
        "settings": {
            "model": args.model,
            "batch_size": args.batch_size,
            "steps": STEPS,
            "eps": EPS,
            "alpha": ALPHA,
            "device": str(device),
            "data": source,
            "compile": args.compile,
            "engine_autocast": "bf16" if device.type == "cuda" else "off",
            "engine_channels_last": channels_last,
        },
        "reference": ref,
        "advedge": eng,
        "speedup": ratio,
        "goal": 3.0 if device.type == "cuda" else 1.0,
    }
    name = f"attack_throughput_{device.type}_{args.model}{args.tag}"
    rows = [
        {
            "side": "reference (fp32 eager)",
            "images/s": ref["images_per_s"],
            "median s/batch": ref["median_s"],
        },
        {"side": "advedge PGD", "images/s": eng["images_per_s"], "median s/batch": eng["median_s"]},
        {
            "side": "ratio",
            "images/s": f"{ratio}x (goal >= {payload['goal']}x)",
            "median s/batch": "",
        },
    ]
    write_results(name, payload, rows, ["side", "images/s", "median s/batch"])
    print(
        f"{args.model} bs={args.batch_size} {device}: reference {ref['images_per_s']} img/s, "
        f"advedge {eng['images_per_s']} img/s, ratio {ratio}x"
    )


if __name__ == "__main__":
    main()
