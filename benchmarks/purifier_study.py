"""The purifier study: how much a purifier G adds to a natural and to a robust classifier.

For each of two classifiers on real CIFAR-10 (a naturally trained one and an adversarially
trained or distilled one), and for no purifier and each of ``ipcm``, ``ape-gan`` and ``hgd``
trained against it, it measures through advedge's own API (``advedge purifier train`` and
``advedge eval --purifier``):

* clean accuracy with and without G;
* grey-box robust accuracy (PGD-20 and CW-20 crafted on f alone, then purified);
* adaptive white-box robust accuracy (the same attacks through f . G, plus BPDA-PGD);
* the per-example worst case over all of them;
* the latency G adds on this machine's CPU (batch 1 and batch 128, median of repeated runs,
  f alone against f . G in the same process).

Scale ``mini`` (this 2-core CPU, about half an hour): ResNet-8 classifiers trained on a
stratified 4,000-image subset (8 epochs; PGD-5 adversarial training for the robust one unless
``--robust`` names a run, e.g. a distilled student), purifiers of width 16 trained 3 epochs on
the same subset, evaluation on the first 500 test images. ``full`` (a GPU): the 50,000 images,
20 purifier epochs, 10,000 test images.

    python benchmarks/purifier_study.py --scale mini [--robust RUN_DIR] [--natural RUN_DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import DATA, RESULTS, stamp, write_results

from advedge.checkpoint import load_model, read_metadata
from advedge.data import load_dataset
from advedge.evaluation import evaluate_checkpoint
from advedge.models import count_parameters, mflops
from advedge.models.purified import Purified
from advedge.purifier import load_purifier
from advedge.purifier.train import PurifierConfig, train_purifier
from advedge.training.engine import TrainConfig, train
from advedge.utils import atomic_write_text, resolve_device

PURIFIERS = ("ipcm", "ape-gan", "hgd")


@dataclasses.dataclass(frozen=True)
class Scale:
    subset: int | None
    clf_epochs: int
    clf_steps: int
    purifier_epochs: int
    purifier_steps: int
    width: int
    eval_n: int


SCALES = {
    "mini": Scale(
        subset=4000,
        clf_epochs=8,
        clf_steps=5,
        purifier_epochs=3,
        purifier_steps=5,
        width=16,
        eval_n=500,
    ),
    "full": Scale(
        subset=None,
        clf_epochs=100,
        clf_steps=10,
        purifier_epochs=20,
        purifier_steps=10,
        width=16,
        eval_n=10000,
    ),
}


def _latency(model: torch.nn.Module, batch: int, device: torch.device, repeats: int) -> float:
    """Median seconds of one forward pass on a batch of ``batch`` random images."""
    x = torch.rand(batch, 3, 32, 32, device=device)
    times = []
    with torch.no_grad():
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Study:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scale = SCALES[args.scale]
        self.runs = Path(args.runs or f"runs/purifier_{args.scale}")
        self.device = resolve_device(args.device)
        self.dataset = load_dataset(args.data)
        self.log = logging.getLogger("purifier_study")

    def classifier(self, kind: str, given: str | None) -> Path:
        if given:
            return Path(given)
        s = self.scale
        out = self.runs / f"resnet8_{kind}"
        train(
            TrainConfig(
                data=str(self.args.data),
                model="resnet8",
                method="natural" if kind == "natural" else "pgd-at",
                epochs=s.clf_epochs,
                out=str(out),
                steps=s.clf_steps,
                alpha=2 / 255,
                batch_size=64,
                subset=s.subset,
                device=self.args.device,
            ),
            resume=True,
            dataset=self.dataset,
        )
        return out

    def purifier(self, clf: Path, tag: str, method: str) -> Path:
        s = self.scale
        out = self.runs / f"purifier_{tag}_{method}"
        t0 = time.perf_counter()
        result = train_purifier(
            PurifierConfig(
                classifier=str(clf),
                data=str(self.args.data),
                method=method,
                epochs=s.purifier_epochs,
                out=str(out),
                steps=s.purifier_steps,
                width=s.width,
                batch_size=64,
                subset=s.subset,
                device=self.args.device,
            ),
            resume=True,
            dataset=self.dataset,
        )
        if result.epochs_run:
            self.log.warning("trained %s in %.0f s", out, time.perf_counter() - t0)
        return out

    def evaluate(self, clf: Path, purifier: Path | None, cache: Path) -> dict[str, Any]:
        key = {"n": self.scale.eval_n, "purifier": str(purifier), "clf": str(clf)}
        if cache.exists():
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                return cached
        res = evaluate_checkpoint(
            clf,
            self.dataset,
            attacks=["pgd", "cw"],
            steps=20,
            n=self.scale.eval_n,
            batch_size=250,
            device=self.args.device,
            flags_n=100,
            purifier=purifier,
        )
        by = {e["name"]: e["robust_acc"] for e in res["attacks"]}
        out = {
            "key": key,
            "clean": res["clean_acc"],
            "clean_no_g": res.get("clean_acc_no_purifier", res["clean_acc"]),
            "attacks": by,
            "worst_case": res["worst_case_acc"],
            "worst_by_setting": res.get(
                "worst_case_by_setting", {"white-box": res["worst_case_acc"]}
            ),
            "flags_triggered": res["flags_triggered"],
        }
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache, json.dumps(out, indent=2) + "\n")
        return out

    def run(self) -> None:
        started = time.perf_counter()
        rows = []
        for tag, given in (("natural", self.args.natural), ("robust", self.args.robust)):
            clf = self.classifier(tag, given)
            meta = read_metadata(clf)
            f = load_model(clf, device=self.device).eval()
            t_f = {b: _latency(f, b, self.device, self.args.repeats) for b in (1, 128)}
            base = self.evaluate(clf, None, self.runs / "evals" / f"{tag}_none.json")
            rows.append(self._row(tag, meta, "none", base, None, t_f, t_f))
            for method in PURIFIERS:
                pur = self.purifier(clf, tag, method)
                res = self.evaluate(clf, pur, self.runs / "evals" / f"{tag}_{method}.json")
                gen = load_purifier(pur, device=self.device)
                composed = Purified(gen, f).eval()
                t_fg = {b: _latency(composed, b, self.device, self.args.repeats) for b in (1, 128)}
                rows.append(self._row(tag, meta, method, res, gen, t_f, t_fg))
        self._write(rows, started)

    def _row(self, tag, meta, method, res, gen, t_f, t_fg) -> dict[str, Any]:
        att = res["attacks"]
        row = {
            "classifier": f"{meta['architecture']} {meta.get('method')}",
            "classifier_kind": tag,
            "purifier": method,
            "clean_no_g": res["clean_no_g"],
            "clean": res["clean"],
            "greybox_pgd": att.get("pgd-greybox"),
            "greybox_cw": att.get("cw-greybox"),
            "adaptive_pgd": att.get("pgd-adaptive", att.get("pgd")),
            "adaptive_cw": att.get("cw-adaptive", att.get("cw")),
            "bpda_pgd": att.get("pgd-bpda"),
            "worst_greybox": res["worst_by_setting"].get("grey-box"),
            "worst_case": res["worst_case"],
            "flags_triggered": res["flags_triggered"],
            "latency_ms_b1": round(1000 * t_fg[1], 3),
            "added_ms_b1": round(1000 * (t_fg[1] - t_f[1]), 3),
            "added_ms_per_image_b128": round(1000 * (t_fg[128] - t_f[128]) / 128, 4),
            "latency_ratio_b128": round(t_fg[128] / t_f[128], 2),
        }
        if gen is not None:
            row.update(
                g_params_m=round(count_parameters(gen) / 1e6, 3), g_mflops=round(mflops(gen), 1)
            )
        self.log.warning("%s + %s: %s", tag, method, {k: row[k] for k in ("clean", "worst_case")})
        return row

    def _write(self, rows: list[dict[str, Any]], started: float) -> None:
        def pct(v: Any) -> str:
            return "—" if v is None else f"{v:.3f}"

        table = [
            {
                "classifier": r["classifier"],
                "purifier": r["purifier"],
                "clean (no G)": pct(r["clean_no_g"]),
                "clean via G": pct(r["clean"]),
                "grey-box PGD": pct(r["greybox_pgd"]),
                "grey-box CW": pct(r["greybox_cw"]),
                "adaptive PGD": pct(r["adaptive_pgd"]),
                "adaptive CW": pct(r["adaptive_cw"]),
                "BPDA PGD": pct(r["bpda_pgd"]),
                "worst case": f"**{r['worst_case']:.3f}**",
                "added ms (b=1)": r["added_ms_b1"],
                "f∘G / f time (b=128)": r["latency_ratio_b128"],
            }
            for r in rows
        ]
        payload = {
            "benchmark": f"purifier_{self.args.scale}",
            **stamp(),
            "settings": {
                **dataclasses.asdict(self.scale),
                "data": str(self.args.data),
                "eps": 8 / 255,
                "attacks": "PGD-20 and CW-20 (step 2/255), grey-box and adaptive, plus BPDA-PGD-20",
                "latency": f"CPU forward, median of {self.args.repeats} runs, random input",
                "device": str(self.device),
            },
            "wall_seconds": round(time.perf_counter() - started, 1),
            "rows": rows,
        }
        path = write_results(
            f"purifier_{self.args.scale}", payload, table, list(table[0]), Path(self.args.results)
        )
        print(path.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="mini")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--runs", help="where runs live (default runs/purifier_<scale>)")
    parser.add_argument("--natural", help="a naturally trained classifier run (else trained)")
    parser.add_argument("--robust", help="a robust classifier run (else PGD-AT is trained)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--subset", type=int)
    parser.add_argument("--clf-epochs", type=int)
    parser.add_argument("--purifier-epochs", type=int)
    parser.add_argument("--eval-n", type=int)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    study = Study(args)
    overrides = {
        k: getattr(args, k)
        for k in ("subset", "clf_epochs", "purifier_epochs", "eval_n")
        if getattr(args, k) is not None
    }
    study.scale = dataclasses.replace(study.scale, **overrides)
    study.run()


if __name__ == "__main__":
    main()
