"""Images/s of a PGD-10 adversarial-training step: advedge's engine vs a plain reference loop.

Both sides run the same model, batch, data and PGD-10 (eps 8/255, step 2/255, random start)
inner maximisation followed by one SGD step, in the same process, alternating. The reference
is the loop research code usually writes: fp32, eager, NCHW, ``torch.autograd.grad`` for the
input gradient. advedge's side is :func:`advedge.engine.training_step` with the engine's own
device settings (on CUDA: bf16 autocast, channels_last, optionally torch.compile).

    python benchmarks/train_throughput.py [--model resnet18] [--batch-size 128] [--iters 5]
"""

from __future__ import annotations

import argparse
import logging

import torch
import torch.nn.functional as F
from _common import cifar_batch, stamp, summarise, time_it, write_results

from advedge.engine import autocast_context, prepare_model, training_step
from advedge.models import create_model
from advedge.objectives import build_method

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 10


def reference_step(model, optimizer, x, y):
    """Plain fp32 eager PGD-10 adversarial-training step (the comparison baseline)."""
    model.eval()
    x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
    for _ in range(STEPS):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = x_adv.detach() + ALPHA * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
    model.train()
    loss = F.cross_entropy(model(x_adv), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile advedge's model")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from advedge.utils import resolve_device

    device = resolve_device(args.device)
    x, y, source = cifar_batch(args.batch_size, device)

    torch.manual_seed(0)
    ref_model = create_model(args.model).to(device)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    torch.manual_seed(0)
    model, channels_last = prepare_model(create_model(args.model), device)
    x_engine = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    run_model = torch.compile(model) if args.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    method = build_method("pgd-at", eps=EPS, alpha=ALPHA, steps=STEPS)
    autocast = autocast_context(device, "auto")
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    model.train()

    def engine():
        training_step(method, run_model, x_engine, y, opt, scaler, autocast)

    def reference():
        reference_step(ref_model, ref_opt, x, y)

    ref_t, eng_t = [], []
    # Alternate rounds so drift in machine load hits both sides alike.
    time_it(reference, warmup=args.warmup, iters=0, device=device)
    time_it(engine, warmup=args.warmup, iters=0, device=device)
    for _ in range(args.iters):
        ref_t += time_it(reference, warmup=0, iters=1, device=device)
        eng_t += time_it(engine, warmup=0, iters=1, device=device)
    ref = summarise(ref_t, args.batch_size)
    eng = summarise(eng_t, args.batch_size)
    ratio = round(eng["images_per_s"] / ref["images_per_s"], 3)
    payload = {
        "benchmark": "train_throughput",
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
    name = f"train_throughput_{device.type}_{args.model}{args.tag}"
    rows = [
        {
            "side": "reference (fp32 eager)",
            "images/s": ref["images_per_s"],
            "median s/step": ref["median_s"],
        },
        {
            "side": "advedge engine",
            "images/s": eng["images_per_s"],
            "median s/step": eng["median_s"],
        },
        {
            "side": "ratio",
            "images/s": f"{ratio}x (goal >= {payload['goal']}x)",
            "median s/step": "",
        },
    ]
    write_results(name, payload, rows, ["side", "images/s", "median s/step"])
    print(
        f"{args.model} bs={args.batch_size} {device}: reference {ref['images_per_s']} img/s, "
        f"advedge {eng['images_per_s']} img/s, ratio {ratio}x"
    )


if __name__ == "__main__":
    main()
