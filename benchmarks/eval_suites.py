"""Quick and standard evaluation suites on real CIFAR-10 for one trained model, as a table.

Runs ``advedge eval --suite quick`` and ``--suite standard`` (through the same Python API) on the
first ``--n`` test images and writes ``results/eval_suites_<tag>.{json,md}``: every attack with
its kind and (cumulative) robust accuracy, the per-example worst case, the sanity flags and the
seconds per 100 examples. On an honestly trained model, expect standard <= quick, with APGD-T and
Square adding little.

    python benchmarks/eval_suites.py --model RUN_DIR [--n 1000] [--tag resnet8_pgdat]
"""

from __future__ import annotations

import logging

from _common import DATA, eval_parser, stamp, write_results

from advedge.checkpoint import read_metadata
from advedge.data import load_dataset
from advedge.evaluation import evaluate_checkpoint


def main() -> None:
    parser = eval_parser(__doc__.splitlines()[0], n=1000, batch_size=250)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = load_dataset(DATA)
    meta = read_metadata(args.model)
    runs = {}
    rows = []
    for suite in ("quick", "standard"):
        res = evaluate_checkpoint(
            args.model, data, suite=suite, n=args.n, batch_size=args.batch_size, device=args.device
        )
        runs[suite] = res
        for entry in res["attacks"]:
            rows.append(
                {
                    "suite": suite,
                    "attack": entry["name"],
                    "kind": entry["kind"],
                    "robust acc": f"{entry['robust_acc']:.4f}"
                    + (" (cum.)" if entry["cumulative"] else ""),
                    "broke": entry["n_broken"],
                    "seconds": entry["seconds"],
                }
            )
        rows.append(
            {
                "suite": suite,
                "attack": "**worst case**",
                "kind": "per-example",
                "robust acc": f"**{res['worst_case_acc']:.4f}**",
                "broke": "",
                "seconds": f"{res['attack_seconds_per_100']} s / 100 examples",
            }
        )
        rows.append(
            {
                "suite": suite,
                "attack": "flags",
                "kind": "",
                "robust acc": ", ".join(res["flags_triggered"]) or "none triggered",
                "broke": "",
                "seconds": "",
            }
        )
    clean = runs["quick"]["clean_acc"]
    payload = {
        "benchmark": "eval_suites",
        **stamp(),
        "model": {k: meta.get(k) for k in ("architecture", "method", "eps", "dataset", "epochs")},
        "n_examples": args.n,
        "clean_acc": clean,
        "quick_worst_case": runs["quick"]["worst_case_acc"],
        "standard_worst_case": runs["standard"]["worst_case_acc"],
        "runs": runs,
    }
    name = f"eval_suites_{args.tag or meta.get('architecture')}"
    write_results(
        name, payload, rows, ["suite", "attack", "kind", "robust acc", "broke", "seconds"]
    )
    print(
        f"clean {clean:.4f}  quick {payload['quick_worst_case']:.4f}  "
        f"standard {payload['standard_worst_case']:.4f}"
    )


if __name__ == "__main__":
    main()
