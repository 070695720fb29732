"""Images/s of PGD-20 evaluation: advedge's attack vs a plain reference loop.

Both sides attack the same model and batch with PGD-20 (eps 8/255, step 2/255, random start)
and score the result, in one process, alternating. The reference is the usual research loop
(fp32, eager, NCHW); advedge runs :class:`advedge.attacks.PGD` under the evaluation's device
settings (on CUDA: bf16 autocast and channels_last, optionally torch.compile).

    python benchmarks/attack_throughput.py [--model resnet18] [--batch-size 256] [--iters 3]
"""

from __future__ import annotations

import logging

import torch
from _common import base_parser, cifar_batch, compare, reference_pgd_examples

from advedge.attacks import PGD
from advedge.models import create_model
from advedge.training.device import prepare_model
from advedge.utils import autocast_context, resolve_device

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 20


def reference_pgd(model, x, y):
    """Plain fp32 eager PGD-20 followed by scoring (the comparison baseline)."""
    x_adv = reference_pgd_examples(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS)
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean()


def main() -> None:
    args = base_parser(__doc__.splitlines()[0], batch_size=256, iters=3).parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    x, y, source = cifar_batch(args.batch_size, device)
    torch.manual_seed(0)
    ref_model = create_model(args.model).to(device).eval()
    torch.manual_seed(0)
    model, channels_last = prepare_model(create_model(args.model), device, probe_input=x)
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

    compare(
        "attack_throughput",
        reference=lambda: reference_pgd(ref_model, x, y),
        engine=engine,
        engine_label="advedge PGD-20",
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
