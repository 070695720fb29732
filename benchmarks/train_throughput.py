"""Images/s of one training step: advedge's engine vs a plain reference loop.

``--method pgd-at`` (default): PGD-10 adversarial training. ``--method rslad`` or ``add``: an
adversarial distillation step with a frozen ``--teacher`` (random weights: speed does not
depend on them). Both sides run the same models, batch, data and PGD-10 (eps 8/255, step
2/255) inner maximisation followed by one SGD step, in the same process, alternating. The
reference is the loop research code usually writes: fp32, eager, NCHW, ``torch.autograd.grad``
for the input gradient, the teacher's logits computed once under no_grad. advedge's side is
:func:`advedge.training.engine.training_step` with the engine's own device settings (on CUDA: bf16
autocast, channels_last, optionally torch.compile).

    python benchmarks/train_throughput.py [--model resnet18] [--method rslad --teacher resnet18]
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from _common import base_parser, cifar_batch, compare, reference_pgd_examples

from advedge.models import create_model
from advedge.training.device import prepare_model
from advedge.training.distillation import build_distill_method
from advedge.training.engine import training_step
from advedge.training.objectives import build_method
from advedge.utils import autocast_context, resolve_device

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 10


def reference_step(model, optimizer, x, y):
    """Plain fp32 eager PGD-10 adversarial-training step (the comparison baseline)."""
    model.eval()
    x_adv = reference_pgd_examples(model, x, y, eps=EPS, alpha=ALPHA, steps=STEPS)
    model.train()
    loss = F.cross_entropy(model(x_adv), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def reference_distill_step(model, teacher, optimizer, x, tau, alpha):
    """Plain fp32 eager RSLAD/ADD step (RSLAD is ``tau = 1, alpha = 5/6``).

    Inner: PGD-10 on ``KL(p_T || softmax(S(x')/tau))`` from ``x + 0.001 N(0, I)``; outer:
    ``tau^2 * (alpha * KL(p_T || S(x')/tau) + (1 - alpha) * KL(p_T || S(x)/tau))``.
    """
    with torch.no_grad():
        p_t = F.softmax(teacher(x) / tau, 1)
    model.eval()
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)
    for _ in range(STEPS):
        x_adv.requires_grad_(True)
        loss = F.kl_div(F.log_softmax(model(x_adv) / tau, 1), p_t, reduction="sum")
        (grad,) = torch.autograd.grad(loss, [x_adv])
        x_adv = x_adv.detach() + ALPHA * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
    model.train()
    kl_adv = F.kl_div(F.log_softmax(model(x_adv) / tau, 1), p_t, reduction="batchmean")
    kl_nat = F.kl_div(F.log_softmax(model(x) / tau, 1), p_t, reduction="batchmean")
    loss = tau**2 * (alpha * kl_adv + (1 - alpha) * kl_nat)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0], batch_size=128, iters=5)
    parser.add_argument("--method", default="pgd-at", choices=["pgd-at", "rslad", "add"])
    parser.add_argument("--teacher", default="resnet18", help="teacher architecture")
    parser.add_argument("--temperature", type=float, default=4.0, help="ADD's tau")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = resolve_device(args.device)
    x, y, source = cifar_batch(args.batch_size, device)

    torch.manual_seed(0)
    ref_model = create_model(args.model).to(device)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    torch.manual_seed(0)
    model, channels_last = prepare_model(create_model(args.model), device, probe_input=x)
    x_engine = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    run_model = torch.compile(model) if args.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    autocast = autocast_context(device, "auto")
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    model.train()
    settings = {
        "method": args.method,
        "steps": STEPS,
        "eps": EPS,
        "alpha": ALPHA,
        "data": source,
        "engine_channels_last": channels_last,
    }
    if args.method == "pgd-at":
        method = build_method("pgd-at", eps=EPS, alpha=ALPHA, steps=STEPS)

        def reference() -> None:
            reference_step(ref_model, ref_opt, x, y)
    else:
        torch.manual_seed(1)
        teacher = create_model(args.teacher).to(device).eval()
        engine_teacher, _ = prepare_model(create_model(args.teacher), device, probe_input=x)
        engine_teacher.load_state_dict(teacher.state_dict())
        tau, mix = (1.0, 5 / 6) if args.method == "rslad" else (args.temperature, 5 / 6)
        method = build_distill_method(
            args.method,
            teacher=engine_teacher,
            eps=EPS,
            alpha=ALPHA,
            steps=STEPS,
            **({"tau": tau, "mix": mix} if args.method == "add" else {}),
        )
        settings.update(teacher=args.teacher, temperature=tau, mix_alpha=mix)
        args.tag = f"_{args.method}{args.tag}"

        def reference() -> None:
            reference_distill_step(ref_model, teacher, ref_opt, x, tau, mix)

    compare(
        "train_throughput",
        reference=reference,
        engine=lambda: training_step(method, run_model, x_engine, y, opt, scaler, autocast),
        engine_label=f"advedge engine ({args.method} step)",
        args=args,
        device=device,
        settings=settings,
    )


if __name__ == "__main__":
    main()
