"""Images/s of a PGD-10 adversarial-training step: advedge's engine vs a plain reference loop.

Both sides run the same model, batch, data and PGD-10 (eps 8/255, step 2/255, random start)
inner maximisation followed by one SGD step, in the same process, alternating. The reference
is the loop research code usually writes: fp32, eager, NCHW, ``torch.autograd.grad`` for the
input gradient. advedge's side is :func:`advedge.engine.training_step` with the engine's own
device settings (on CUDA: bf16 autocast, channels_last, optionally torch.compile).

    python benchmarks/train_throughput.py [--model resnet18] [--batch-size 128] [--iters 5]
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from _common import base_parser, cifar_batch, compare

from advedge.engine import autocast_context, prepare_model, training_step
from advedge.models import create_model
from advedge.objectives import build_method
from advedge.utils import resolve_device

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
    args = base_parser(__doc__.splitlines()[0], batch_size=128, iters=5).parse_args()
    logging.basicConfig(level=logging.WARNING)
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

    compare(
        "train_throughput",
        reference=lambda: reference_step(ref_model, ref_opt, x, y),
        engine=lambda: training_step(method, run_model, x_engine, y, opt, scaler, autocast),
        engine_label="advedge engine (pgd-at step)",
        args=args,
        device=device,
        settings={
            "steps": STEPS,
            "eps": EPS,
            "alpha": ALPHA,
            "data": source,
            "engine_channels_last": channels_last,
        },
    )


if __name__ == "__main__":
    main()
