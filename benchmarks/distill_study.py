"""The distillation study: one robust teacher, ten students at equal budget, honest evaluation.

One configuration end to end, through advedge's own API (the engine behind ``advedge train`` and
``advedge distill``, and the evaluation behind ``advedge eval``):

1. a robust teacher (PGD-AT);
2. students trained by ``natural``, ``pgd-at``, ``trades`` (no teacher) and ``kd``, ``dd``,
   ``ard``, ``iad``, ``rslad``, ``adaad``, ``add`` (from the teacher), all with the same
   epochs, data, inner-attack steps, batch size and learning-rate schedule;
3. each evaluated on the CIFAR-10 test split: clean, PGD-20 and CW-20 (each its own number, on
   ``eval_n`` images), the ``standard`` suite (APGD-CE, APGD-T, Square 5000 queries, cascaded,
   on the first ``suite_n`` images), and the per-example worst case over all five attacks on
   those ``suite_n`` images.

``--sweep`` instead trains ADD over its grid (tau in {1, 2, 4} x alpha in {5/6, 0.9}) next to
RSLAD, from the same teacher and budget, and scores clean, PGD-20 and CW-20.

Scales:

* ``mini`` (this 2-core CPU, about an hour): teacher ResNet-20 (12 epochs), students ResNet-8
  (8 epochs), a stratified 4,000-image subset of the CIFAR-10 training set, batch 64, SGD lr
  0.1 cosine, PGD-5 inner attacks (eps 8/255, step 2/255); evaluation on 1,000 test images,
  the standard suite on 200.
* ``full`` (a GPU): teacher ResNet-18 and students MobileNetV2 and ResNet-18 on all 50,000
  images, PGD-10, batch 128; see :data:`SCALES` for the epochs.

Runs live in ``--runs`` (default ``runs/distill_<scale>``); rerunning the script resumes every
unfinished run and reuses every finished run and evaluation, so an interrupted study continues
where it stopped. Results: ``results/distill_<scale>.{json,md}`` (or ``distill_sweep_<scale>``).

    python benchmarks/distill_study.py --scale mini [--sweep] [--only rslad,add]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import DATA, RESULTS, stamp, write_results

from advedge.checkpoint import MODEL_FILE, STATE_FILE, load_model
from advedge.config import load_yaml
from advedge.data import ImageArrays, load_dataset, stratified_subset
from advedge.evaluation import build_suite, evaluate
from advedge.models import count_parameters, mflops
from advedge.report.analysis import mcnemar_exact
from advedge.stats import wilson_interval
from advedge.training.distillation import ADD
from advedge.training.engine import TrainConfig, train
from advedge.training.inputs import training_split
from advedge.utils import atomic_write_text, resolve_device, sha256_file

STUDENT_METHODS = ("natural", "pgd-at", "trades", "kd", "dd", "ard", "iad", "rslad", "adaad", "add")
TEACHERLESS = ("natural", "pgd-at", "trades")
SWEEP = [(tau, alpha) for tau in (1.0, 2.0, 4.0) for alpha in (5 / 6, 0.9)]
EPS = 8 / 255
ADD_MIX = float(ADD.default_mix or 5 / 6)


@dataclasses.dataclass(frozen=True)
class Scale:
    """One study configuration (see the module docstring)."""

    teacher: str
    teacher_epochs: int
    teacher_method: str
    teacher_subset: int | None
    teacher_batch_size: int
    students: tuple[str, ...]
    epochs: int
    subset: int | None
    steps: int
    batch_size: int
    lr: float
    eval_n: int
    suite_n: int
    methods: tuple[str, ...] = STUDENT_METHODS
    teacher_suite_n: int | None = None  # None: suite_n


SCALES = {
    "mini": Scale(
        teacher="resnet20",
        teacher_epochs=12,
        teacher_method="pgd-at",
        teacher_subset=4000,
        teacher_batch_size=64,
        students=("resnet8",),
        epochs=8,
        subset=4000,
        steps=5,
        batch_size=64,
        lr=0.1,
        eval_n=1000,
        suite_n=200,
    ),
    "medium": Scale(
        teacher="resnet20",
        teacher_epochs=10,
        teacher_method="fgsm-rs",
        teacher_subset=None,
        teacher_batch_size=128,
        students=("resnet8",),
        epochs=8,
        subset=4000,
        steps=5,
        batch_size=64,
        lr=0.1,
        eval_n=1000,
        suite_n=1000,
        # The nine: defensive distillation is known to fall to CW (see mini).
        methods=tuple(m for m in STUDENT_METHODS if m != "dd"),
    ),
    "full": Scale(
        teacher="resnet18",
        teacher_epochs=100,
        teacher_method="pgd-at",
        teacher_subset=None,
        teacher_batch_size=128,
        students=("mobilenetv2", "resnet18"),
        epochs=100,
        subset=None,
        steps=10,
        batch_size=128,
        lr=0.1,
        eval_n=10000,
        suite_n=1000,
    ),
}


def _fmt(tau: float, alpha: float) -> str:
    return f"t{tau:g}_a{alpha:.3f}"


class Study:
    """Trains and evaluates the runs of one scale, reusing whatever is already finished."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        scale = SCALES[args.scale]
        overrides = {
            k: getattr(args, k)
            for k in ("epochs", "teacher_epochs", "subset", "eval_n", "suite_n", "teacher_suite_n")
            if getattr(args, k) is not None
        }
        self.scale = dataclasses.replace(scale, **overrides)
        self.runs = Path(args.runs or f"runs/distill_{args.scale}")
        self.device = resolve_device(args.device)
        self.dataset = load_dataset(args.data)
        self.log = logging.getLogger("distill_study")

    # ------------------------------------------------------------------------- training
    def _config(self, name: str, model: str, method: str, epochs: int, **kw: Any) -> TrainConfig:
        s = self.scale
        return TrainConfig(
            data=str(self.args.data),
            model=model,
            method=method,
            epochs=epochs,
            out=str(self.runs / name),
            eps=EPS,
            alpha=2 / 255,
            steps=s.steps,
            batch_size=s.batch_size,
            lr=s.lr,
            subset=s.subset,
            seed=self.args.seed,
            device=self.args.device,
            eval_n=256,
            # The budget is the study's, the same for every method: epochs, data, attack steps
            # and step, batch, peak lr and a cosine schedule. Everything else (weight decay,
            # the attack's BN mode and random start, tau, mix, the KL reduction) is each
            # method's official default.
            schedule="cosine",
            **kw,
        )

    def _train(self, cfg: TrainConfig) -> dict[str, Any]:
        t0 = time.perf_counter()
        metrics = self._finished(cfg)
        if metrics is None:  # train (or resume); a finished run is only read, never locked
            result = train(cfg, resume=True, dataset=self.dataset)
            metrics = result.metrics
            self.log.warning(
                "trained %s (%d epochs) in %.0f s",
                cfg.out,
                result.epochs_run,
                time.perf_counter() - t0,
            )
        resolved = load_yaml(Path(cfg.out) / "config.yaml").get("resolved", {})
        return {
            "run": cfg.out,
            "train_seconds": round(sum(r["seconds"] for r in metrics), 1),
            "last_epoch": metrics[-1],
            "settings": {
                "weight_decay": cfg.weight_decay,
                "lr": cfg.lr,
                "schedule": cfg.schedule,
                "batch_size": cfg.batch_size,
                "epochs": cfg.epochs,
                "subset": cfg.subset,
                "kl_reduction": cfg.kl_reduction if cfg.teacher else None,
                **resolved.get("method_settings", {}),
            },
        }

    @staticmethod
    def _finished(cfg: TrainConfig) -> list[dict[str, float]] | None:
        """The metrics rows of a run that trained all ``cfg.epochs`` with ``cfg``'s options."""
        run = Path(cfg.out)
        try:
            state = torch.load(run / STATE_FILE, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError):
            return None
        if state.get("fingerprint") != cfg.fingerprint() or int(state["epoch"]) != cfg.epochs:
            return None
        if not (run / MODEL_FILE).exists():
            return None
        return [dict(r) for r in state.get("metrics", [])]

    def teacher(self) -> tuple[Path, dict[str, Any]]:
        s = self.scale
        method = s.teacher_method
        name = f"teacher_{s.teacher}_{method}"
        cfg = self._config(name, s.teacher, method, s.teacher_epochs)
        cfg = dataclasses.replace(
            cfg,
            subset=s.teacher_subset,
            batch_size=s.teacher_batch_size,
            # FGSM-RS steps 1.25 * eps (the engine's default for it), not the PGD step.
            alpha=None if method == "fgsm-rs" else cfg.alpha,
            # The teachers were trained before attack_bn existed, with eval-mode attacks.
            attack_bn="eval",
        )
        info = self._train(cfg)
        return self.runs / name, info

    def student(
        self,
        model: str,
        method: str,
        teacher: Path,
        tau: float | None = None,
        alpha: float | None = None,
    ) -> tuple[Path, dict[str, Any]]:
        if method == "add" and (tau, alpha) in ((None, None), (1.0, 5 / 6)):
            # ADD's (tau 1, mix 5/6) point trains bit for bit as RSLAD (the test
            # test_add_at_its_defaults_trains_bit_for_bit_as_rslad): reuse that run.
            run, info = self.student(model, "rslad", teacher)
            return run, {**info, "same_run_as": "rslad"}
        name = f"{model}_{method}"
        kw: dict[str, Any] = {}
        if method not in TEACHERLESS:
            kw = {"teacher": str(teacher)}
        if tau is not None:
            name += "_" + _fmt(tau, alpha if alpha is not None else 5 / 6)
            kw.update(temperature=tau, mix_alpha=alpha)
        info = self._train(self._config(name, model, method, self.scale.epochs, **kw))
        return self.runs / name, info

    def supplement(self, *, train_missing: bool) -> list[dict[str, Any]]:
        """RSLAD with ``kl_reduction="batchmean"`` (advedge's KL before issue 15, 10x the
        official loss), scored like every student. It shows what the official reduction's
        smaller loss costs at this short budget. Empty when not trained and not asked to."""
        model = self.scale.students[0]
        name = f"{model}_rslad_batchmean"
        teacher = self.runs / f"teacher_{self.scale.teacher}_{self.scale.teacher_method}"
        cfg = self._config(
            name, model, "rslad", self.scale.epochs, teacher=str(teacher), kl_reduction="batchmean"
        )
        if not train_missing and self._finished(cfg) is None:
            return []
        info = self._train(cfg)
        label = "rslad (--kl-reduction batchmean)"
        return [self._row("student", model, label, self.runs / name, info)]

    # ----------------------------------------------------------------------- evaluation
    def evaluate(self, run: Path, *, standard: bool, suite_n: int | None = None) -> dict[str, Any]:
        """Clean, PGD-20, CW-20 (and the standard suite, the worst case); cached in the run."""
        s = dataclasses.replace(self.scale, suite_n=suite_n or self.scale.suite_n)
        key = {"eval_n": s.eval_n, "suite_n": s.suite_n if standard else 0, "seed": 0, "v": 2}
        cache = run / "study_eval.json"
        if cache.exists():
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                return cached
        model = load_model(run / MODEL_FILE, device=self.device).eval()
        test = self.dataset.test
        common = {"eps": EPS, "device": self.device, "batch_size": 250, "seed": 0}
        quick = evaluate(
            model,
            test,
            build_suite("quick", model, eps=EPS, steps=20),
            n=s.eval_n,
            cascade=False,
            flags_n=100,
            suite="quick",
            **common,
        )
        by_name = {a["name"]: a for a in quick["attacks"]}
        out: dict[str, Any] = {
            "key": key,
            "model_sha256": sha256_file(run / MODEL_FILE),
            "clean": quick["clean_acc"],
            "pgd20": by_name["pgd"]["robust_acc"],
            "cw20": by_name["cw"]["robust_acc"],
            "flags_triggered": quick["flags_triggered"],
            "quick_seconds": quick["seconds"],
        }
        if standard:
            std = evaluate(
                model,
                test,
                build_suite("standard", model, eps=EPS),
                n=s.suite_n,
                cascade=True,
                flags_n=0,
                suite="standard",
                **common,
            )
            worst = np.asarray(std.per_example["clean"], dtype=bool).copy()
            for per in (quick.per_example, std.per_example):
                for flags in per.values():
                    worst &= np.asarray(flags, dtype=bool)[: s.suite_n]
            broke = [a["name"] for a in std["attacks"] if a["n_broken"] > 0]
            out.update(
                # Per test image (in order): robust under all five attacks, for McNemar tests.
                worst_flags="".join("1" if f else "0" for f in worst),
                standard=std["worst_case_acc"],
                standard_attacks={a["name"]: a["robust_acc"] for a in std["attacks"]},
                clean_suite_n=std["clean_acc"],
                worst_case=float(worst.mean()),
                worst_case_attacks=[
                    *(n for n in ("pgd", "cw") if by_name[n]["n_broken"] > 0),
                    *broke,
                ],
                standard_seconds=std["seconds"],
            )
        atomic_write_text(cache, json.dumps(out, indent=2) + "\n")
        return out

    def describe(self, run: Path) -> dict[str, Any]:
        model = load_model(run / MODEL_FILE)
        return {
            "params_m": round(count_parameters(model) / 1e6, 3),
            "mflops": round(mflops(model), 1),
        }

    # ---------------------------------------------------------------------------- runs
    def run_study(self) -> None:
        s = self.scale
        only = set(self.args.only.split(",")) if self.args.only else set(s.methods)
        unknown = only - set(s.methods)
        if unknown:
            raise SystemExit(f"unknown method(s) in --only: {', '.join(sorted(unknown))}")
        started = time.perf_counter()
        rows = []
        teacher = self.runs / "no-teacher"
        need_teacher = bool(only - set(TEACHERLESS))
        if need_teacher:  # the teacher is trained (and scored, last) only when needed
            teacher, tinfo = self.teacher()
        for model in s.students:
            for method in s.methods:
                if method not in only:
                    continue
                if method == "add":  # named by its settings, so the sweep's run is reused
                    run, info = self.student(model, "add", teacher, ADD.default_tau, ADD_MIX)
                    info.update(temperature=ADD.default_tau, alpha=round(ADD_MIX, 4))
                else:
                    run, info = self.student(model, method, teacher)
                rows.append(self._row("student", model, method, run, info))
        if need_teacher and not self.args.no_teacher_eval:
            rows.insert(0, self._row("teacher", s.teacher, s.teacher_method, teacher, tinfo))
        if need_teacher:
            rows += self.supplement(train_missing=False)
        self._write(f"distill_{self.args.scale}", rows, started, standard=True)

    def run_sweep(self) -> None:
        """ADD's grid next to RSLAD, scored and selected on a validation split (not the test)."""
        s = self.scale
        started = time.perf_counter()
        teacher, tinfo = self.teacher()
        val = self.validation()
        rows = [self._val_row("teacher", s.teacher, s.teacher_method, teacher, tinfo, val)]
        for model in s.students:
            run, info = self.student(model, "rslad", teacher)
            rows.append(self._val_row("student", model, "rslad", run, info, val))
            for tau, alpha in SWEEP:
                run, info = self.student(model, "add", teacher, tau, alpha)
                row = self._val_row("student", model, "add", run, info, val)
                row.update(temperature=tau, alpha=round(alpha, 4))
                rows.append(row)
        adds = [r for r in rows if r["method"] == "add"]
        best = select_add(adds, ADD.default_tau, ADD_MIX)
        self._write_sweep(rows, started, len(val), best)

    def validation(self) -> ImageArrays:
        """``n_val`` training images outside the students' subset (stratified, seed 1).

        The students never train on them; the teacher, trained on the full split, has seen
        them. Selection happens here, so the test images stay for reporting only.
        """
        train = self.dataset.train
        assert train is not None
        chosen = training_split(self.dataset, self.scale.subset, self.args.seed)
        taken = {img.tobytes() for img in chosen.x}
        rest = train.subset([i for i in range(len(train)) if train.x[i].tobytes() not in taken])
        return stratified_subset(rest, self.args.n_val, seed=1)

    def evaluate_val(self, run: Path, val: ImageArrays) -> dict[str, Any]:
        """Clean, PGD-20 and CW-20 on the validation split; cached in the run."""
        key = {"n_val": len(val), "seed": 0, "subset": self.scale.subset, "v": 2}
        cache = run / "study_val.json"
        if cache.exists():
            cached = json.loads(cache.read_text())
            if cached.get("key") == key:
                return cached
        model = load_model(run / MODEL_FILE, device=self.device).eval()
        res = evaluate(
            model,
            val,
            build_suite("quick", model, eps=EPS, steps=20),
            n=len(val),
            cascade=False,
            flags_n=0,
            suite="quick",
            eps=EPS,
            device=self.device,
            batch_size=250,
            seed=0,
        )
        per = res.per_example
        worst = np.asarray(per["clean"], bool) & np.asarray(per["pgd"], bool)
        worst &= np.asarray(per["cw"], bool)
        by_name = {a["name"]: a for a in res["attacks"]}
        out = {
            "key": key,
            "val_clean": res["clean_acc"],
            "val_pgd20": by_name["pgd"]["robust_acc"],
            "val_cw20": by_name["cw"]["robust_acc"],
            "val_worst": float(worst.mean()),
            "val_worst_flags": "".join("1" if f else "0" for f in worst),
        }
        atomic_write_text(cache, json.dumps(out, indent=2) + "\n")
        return out

    def _val_row(
        self,
        role: str,
        model: str,
        method: str,
        run: Path,
        info: dict[str, Any],
        val: ImageArrays,
    ) -> dict[str, Any]:
        scores = self.evaluate_val(run, val)
        self.log.warning(
            "%s %s (validation): clean %.3f PGD-20 %.3f CW-20 %.3f worst %.3f",
            model,
            method,
            scores["val_clean"],
            scores["val_pgd20"],
            scores["val_cw20"],
            scores["val_worst"],
        )
        return {"role": role, "model": model, "method": method, **info, **scores}

    def _write_sweep(
        self, rows: list[dict[str, Any]], started: float, n_val: int, best: dict[str, Any]
    ) -> None:
        name = f"distill_sweep_{self.args.scale}"
        payload = {
            "benchmark": name,
            **stamp(),
            "scale": self.args.scale,
            "settings": {
                **dataclasses.asdict(self.scale),
                "n_val": n_val,
                "validation": "n_val stratified training images outside the students' subset "
                "(seed 1); clean, PGD-20 and CW-20, worst = robust to both",
                "selection": "max validation worst case, then clean accuracy",
            },
            "selected": {
                "temperature": best["temperature"],
                "alpha": best["alpha"],
                **best["selection"],
            },
            "wall_seconds": round(time.perf_counter() - started, 1),
            "rows": rows,
        }
        table = []
        for r in rows:
            label = r["method"]
            if "temperature" in r:
                label += f" (tau {r['temperature']:g}, alpha {r['alpha']:.3f})"
            lo, hi = wilson_interval(round(r["val_worst"] * n_val), n_val)
            table.append(
                {
                    "model": r["model"] + (" (teacher)" if r["role"] == "teacher" else ""),
                    "method": label + (" **selected**" if r.get("selected") else ""),
                    "val clean": f"{r['val_clean']:.3f}",
                    "val PGD-20": f"{r['val_pgd20']:.3f}",
                    "val CW-20": f"{r['val_cw20']:.3f}",
                    "val worst [95% CI]": f"{r['val_worst']:.3f} [{lo:.3f}, {hi:.3f}]",
                    "train min": f"{r['train_seconds'] / 60:.1f}",
                }
            )
        sel = best["selection"]
        kept = (best["temperature"], best["alpha"]) != (
            sel["best"]["temperature"],
            sel["best"]["alpha"],
        )
        notes = [
            f"Selection on the validation split: the best setting is tau "
            f"{sel['best']['temperature']:g}, alpha {sel['best']['alpha']:.3f}; against the "
            f"default it is robust on {sel['best_only_robust']} images the default is not and "
            f"the default on {sel['default_only_robust']} it is not (exact McNemar p = "
            f"{sel['p_value']:.3g}). Rule: {sel['rule']}. "
            + ("The default stays." if kept or best is None else "It becomes the default.")
        ]
        path = write_results(
            name, payload, table, list(table[0]), Path(self.args.results), notes=notes
        )
        print(path.read_text())

    def _row(
        self,
        role: str,
        model: str,
        method: str,
        run: Path,
        info: dict[str, Any],
        *,
        standard: bool = True,
    ) -> dict[str, Any]:
        suite_n = self.scale.teacher_suite_n if role == "teacher" else None
        scores = self.evaluate(run, standard=standard, suite_n=suite_n)
        self.log.warning(
            "%s %s: clean %.3f PGD-20 %.3f CW-20 %.3f%s",
            model,
            method,
            scores["clean"],
            scores["pgd20"],
            scores["cw20"],
            f" worst {scores['worst_case']:.3f}" if "worst_case" in scores else "",
        )
        return {
            "role": role,
            "model": model,
            "method": method,
            **info,
            **scores,
            **self.describe(run),
        }

    def _write(
        self,
        name: str,
        rows: list[dict[str, Any]],
        started: float,
        *,
        standard: bool,
    ) -> None:
        s = self.scale
        payload = {
            "benchmark": name,
            **stamp(),
            "scale": self.args.scale,
            "settings": {
                **dataclasses.asdict(s),
                "data": str(self.args.data),
                "eps": EPS,
                "step": 2 / 255,
                "schedule": "cosine",
                "augment": True,
                "seed": self.args.seed,
                "device": str(self.device),
                "budget": "the same for every student: epochs, subset, attack steps and step, "
                "batch, peak lr, cosine schedule; everything else is each method's official "
                "default (advedge.training.official)",
                "eval": "clean / PGD-20 / CW-20 on the first eval_n test images; "
                + (
                    "standard suite cascaded on the first suite_n; worst case per example over "
                    "all five attacks on those suite_n"
                    if standard
                    else "no standard suite"
                ),
            },
            "wall_seconds": round(time.perf_counter() - started, 1),
            "rows": rows,
        }
        notes: list[str] = []
        if standard:
            payload["mcnemar"] = pairwise_mcnemar(rows)
            notes = ordering_notes(rows, payload["mcnemar"])
        table = [table_row(r, standard) for r in rows]
        columns = ["model", "method", "clean", "PGD-20", "CW-20"]
        if standard:
            columns += ["APGD-CE", "APGD-T", "Square", "worst case [95% CI]", "broken by"]
        columns += ["train min", "weight decay", "attack BN", "params M", "sha256"]
        path = write_results(name, payload, table, columns, Path(self.args.results), notes=notes)
        print(path.read_text())


def select_add(
    adds: list[dict[str, Any]], tau: float, mix: float, level: float = 0.05
) -> dict[str, Any]:
    """The ADD setting to keep as the default, chosen on the validation split.

    The best setting (validation worst case, then clean accuracy) replaces the current default
    ``(tau, mix)`` only if an exact McNemar test on the validation images finds it better at
    ``level``; otherwise the default stays. Marks the chosen row ``selected`` and records the
    test in its ``selection``.
    """
    best = max(adds, key=lambda r: (r["val_worst"], r["val_clean"]))
    default = next(r for r in adds if (r["temperature"], r["alpha"]) == (tau, round(mix, 4)))
    fb, fd = best["val_worst_flags"], default["val_worst_flags"]
    only_best = sum(a == "1" and b == "0" for a, b in zip(fb, fd, strict=True))
    only_default = sum(a == "0" and b == "1" for a, b in zip(fb, fd, strict=True))
    p = mcnemar_exact(only_best, only_default)
    chosen = best if best is not default and p < level else default
    chosen["selected"] = True
    chosen["selection"] = {
        "best": {"temperature": best["temperature"], "alpha": best["alpha"]},
        "best_only_robust": only_best,
        "default_only_robust": only_default,
        "p_value": p,
        "rule": f"the best replaces the default (tau {tau:g}, alpha {mix:.4f}) only if p < {level}",
    }
    return chosen


def _label(r: dict[str, Any]) -> str:
    label = r["method"]
    if "temperature" in r:
        label += f" (tau {r['temperature']:g}, alpha {r['alpha']:.3f})"
    return label


def table_row(r: dict[str, Any], standard: bool) -> dict[str, Any]:
    """One Markdown row of the study table."""
    settings = r.get("settings", {})
    entry = {
        "model": r["model"] + (" (teacher)" if r["role"] == "teacher" else ""),
        "method": _label(r),
        "clean": f"{r['clean']:.3f}",
        "PGD-20": f"{r['pgd20']:.3f}",
        "CW-20": f"{r['cw20']:.3f}",
        "train min": f"{r['train_seconds'] / 60:.1f}",
        "weight decay": f"{settings.get('weight_decay', '')}",
        "attack BN": settings.get("attack_bn", ""),
        "params M": r["params_m"],
        "sha256": r.get("model_sha256", "")[:12],
    }
    if standard:
        flags = r["worst_flags"]
        lo, hi = wilson_interval(flags.count("1"), len(flags))
        attacks = r["standard_attacks"]
        entry.update(
            {
                "APGD-CE": f"{attacks.get('apgd-ce', float('nan')):.3f}",
                "APGD-T": f"{attacks.get('apgd-t', float('nan')):.3f}",
                "Square": f"{attacks.get('square', float('nan')):.3f}",
                "worst case [95% CI]": f"**{r['worst_case']:.3f}** [{lo:.3f}, {hi:.3f}]",
                "broken by": ", ".join(r["worst_case_attacks"]),
            }
        )
    return entry


def pairwise_mcnemar(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Exact McNemar test of every pair of rows on their per-image worst-case outcomes."""
    out = []
    for i, a in enumerate(rows):
        for b in rows[i + 1 :]:
            n = min(len(a["worst_flags"]), len(b["worst_flags"]))  # the same first n images
            fa, fb = a["worst_flags"][:n], b["worst_flags"][:n]
            only_a = sum(x == "1" and y == "0" for x, y in zip(fa, fb, strict=True))
            only_b = sum(x == "0" and y == "1" for x, y in zip(fa, fb, strict=True))
            out.append(
                {
                    "a": _key(a),
                    "b": _key(b),
                    "n": n,
                    "a_acc": fa.count("1") / n,
                    "b_acc": fb.count("1") / n,
                    "only_a_robust": only_a,
                    "only_b_robust": only_b,
                    "p_value": mcnemar_exact(only_a, only_b),
                }
            )
    return out


def _key(r: dict[str, Any]) -> str:
    return ("teacher " if r["role"] == "teacher" else "") + r["method"]


ORDERING = (("add", "rslad"), ("rslad", "pgd-at"), ("pgd-at", "natural"))
"""The study's question: does ADD >= RSLAD > PGD-AT student > natural hold?"""


def ordering_notes(rows: list[dict[str, Any]], tests: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: the ordering claims and every distilled student against PGD-AT."""
    by_pair = {(t["a"], t["b"]): t for t in tests}
    by_pair.update({(t["b"], t["a"]): _swap(t) for t in tests})
    students = [r["method"] for r in rows if r["role"] == "student"]
    pairs = [p for p in ORDERING if p[0] in students and p[1] in students]
    pairs += [
        (m, "pgd-at")
        for m in students
        if m not in ("pgd-at", "natural") and (m, "pgd-at") not in pairs and "pgd-at" in students
    ]
    teacher = next((_key(r) for r in rows if r["role"] == "teacher"), None)
    if teacher and "pgd-at" in students:
        pairs.insert(0, (teacher, "pgd-at"))
    lines = [
        "Paired comparisons on the worst case (exact McNemar test on the same images; "
        "p < 0.05 means the difference is beyond chance):",
        "",
        "| A | B | images | A worst | B worst | A - B | only A robust | only B robust | p |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for a, b in pairs:
        t = by_pair[(a, b)]
        lines.append(
            f"| {a} | {b} | {t['n']} | {t['a_acc']:.3f} | {t['b_acc']:.3f} | "
            f"{t['a_acc'] - t['b_acc']:+.3f} | {t['only_a_robust']} | {t['only_b_robust']} | "
            f"{t['p_value']:.3g} |"
        )
    return lines


def _swap(t: dict[str, Any]) -> dict[str, Any]:
    return {
        "a": t["b"],
        "b": t["a"],
        "n": t["n"],
        "a_acc": t["b_acc"],
        "b_acc": t["a_acc"],
        "only_a_robust": t["only_b_robust"],
        "only_b_robust": t["only_a_robust"],
        "p_value": t["p_value"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="mini")
    parser.add_argument("--sweep", action="store_true", help="ADD's (tau, alpha) grid vs RSLAD")
    parser.add_argument("--only", help="comma-separated student methods to run")
    parser.add_argument("--teacher-only", action="store_true", help="train the teacher and stop")
    parser.add_argument(
        "--supplement", action="store_true", help="train and score RSLAD with batchmean KL"
    )
    parser.add_argument(
        "--score-teacher", action="store_true", help="evaluate the teacher (cached) and stop"
    )
    parser.add_argument(
        "--no-teacher-eval", action="store_true", help="leave the teacher unscored (a partial run)"
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--runs", help="where the runs live (default runs/distill_<scale>)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=str(RESULTS), help="where results are written")
    parser.add_argument("--epochs", type=int, help="override the scale's student epochs")
    parser.add_argument("--teacher-epochs", type=int, help="override the teacher's epochs")
    parser.add_argument("--subset", type=int, help="override the training subset")
    parser.add_argument("--eval-n", type=int, help="override the evaluation size")
    parser.add_argument("--suite-n", type=int, help="override the standard suite's size")
    parser.add_argument("--n-val", type=int, default=1000, help="validation images (--sweep)")
    parser.add_argument("--teacher-suite-n", type=int, help="the teacher's standard-suite size")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    study = Study(args)
    if args.teacher_only:
        study.teacher()
    elif args.supplement:
        study.supplement(train_missing=True)
    elif args.score_teacher:
        teacher, info = study.teacher()
        s = study.scale
        study._row("teacher", s.teacher, s.teacher_method, teacher, info)
    elif args.sweep:
        study.run_sweep()
    else:
        study.run_study()


if __name__ == "__main__":
    main()
