"""Transfer sets of ``advedge bench --robust``: adversarial examples crafted once on the FP32
PyTorch model an artifact came from, stored so that a device without torch evaluates the same set.

A set is an npz archive (no pickles) with the clean images ``x``, the labels ``y``, one array
``adv_<attack>`` per attack (float32 as the attacks made them; which attacks and how they are
crafted: :mod:`~advedge.export.runtime.craft`), from version 2 the per-example worst case on the
parent as scored when crafted (``source_survived``), a JSON ``meta`` (schema, source checkpoint
sha256, eps, norm, n, the recipe and its attacks with their budgets) and the sha256 of its
arrays. Every place that reads a set goes through :func:`load_transfer_set`: its sha256, then
what it holds (:func:`validate_transfer_set`). Sets crafted into ``--out`` are named by their
source model, recipe (attacks, budgets, seed, eps) and images (:func:`transfer_path`) and reused
by the next run that matches. Version 1 sets (PGD-20 and APGD-CE, no ``source_survived``) are
still read when given as ``--transfer-set``; a cached one is never reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from advedge.export.runtime.craft import Recipe, craft_examples

from advedge.errors import AdvedgeError, ExportError, UsageError
from advedge.utils import atomic_write_bytes, sha256_file

__all__ = [
    "TRANSFER_SCHEMA",
    "TransferSet",
    "cached_set",
    "check_set_fits",
    "craft_transfer_set",
    "load_transfer_set",
    "model_source",
    "save_transfer_set",
    "transfer_path",
    "validate_transfer_set",
]

TRANSFER_SCHEMA = "advedge.transfer-set/2"
#: Every version :func:`load_transfer_set` reads.
READABLE_SCHEMAS = ("advedge.transfer-set/1", TRANSFER_SCHEMA)
# Transfer sets hold the attacks' float32 images as they came out (never rounded to uint8), so
# the eps-ball check allows float rounding only.
TRANSFER_TOL = 1e-6


class SetOptions(Protocol):
    """What crafting and matching a set reads from the bench options."""

    model: str | None  # the FP32 classifier checkpoint
    purifier: str | None  # the purifier, for fused artifacts
    eps: float
    seed: int
    n_iter: int  # APGD's iterations
    n_queries: int  # Square's queries


def recipe_of(opts: SetOptions) -> Recipe:
    """The crafting recipe these options ask for."""
    return Recipe(eps=opts.eps, seed=opts.seed, n_iter=opts.n_iter, n_queries=opts.n_queries)


def array_sha(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def save_transfer_set(
    path: Path,
    x: np.ndarray,
    y: np.ndarray,
    advs: dict[str, np.ndarray],
    meta: dict[str, Any],
    survived: np.ndarray | None = None,
) -> str:
    """npz (no pickles) with the clean images, labels, one array per attack (in the order they
    ran), the parent's per-example worst case when given, and a sha256 of them all."""
    names = list(advs)
    extra = {} if survived is None else {"source_survived": np.asarray(survived, dtype=bool)}
    sha = array_sha(x, y, *(advs[k] for k in sorted(names)), *extra.values())
    buf = io.BytesIO()
    np.savez(
        buf,
        x=x,
        y=y,
        **{f"adv_{k}": advs[k] for k in names},
        **extra,
        meta=np.array(json.dumps({**meta, "attacks": names})),
        sha256=np.array(sha),
    )
    atomic_write_bytes(path, buf.getvalue())
    return sha


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_transfer_set(
    path: str | os.PathLike[str], *, num_classes: int | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """Load a transfer set, verify its sha256 and check what it holds
    (:func:`validate_transfer_set`): every place that reads a set goes through here.

    Returns:
        ``(x, y, advs, meta)``; ``advs`` in the order the attacks ran; ``meta`` gains ``sha256``,
        ``unperturbed`` (per attack, the images it left equal to the clean ones) and
        ``source_survived`` (a version 2 set's ``[n]`` bool array, else None).

    Raises:
        ExportError: a missing, unreadable, tampered (sha256 mismatch) or invalid set.
    """
    p = Path(path)
    if not p.is_file():
        raise ExportError(
            f"transfer set not found: {p}" if not p.exists() else f"transfer set {p} is not a file"
        )
    try:
        with contextlib.ExitStack() as stack:
            z = np.load(p, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ExportError(f"transfer set {p} is not an npz archive (a single array)")
            stack.enter_context(z)
            missing = sorted({"x", "y", "meta", "sha256"} - set(z.files))
            if missing:
                raise ExportError(
                    f"transfer set {p} lacks {', '.join(missing)}: not an advedge transfer set"
                )
            meta = json.loads(str(z["meta"]))
            attacks = meta.get("attacks") if isinstance(meta, dict) else None
            if not (
                isinstance(attacks, list)
                and attacks
                and all(isinstance(a, str) and a for a in attacks)
            ):
                raise ExportError(f"transfer set {p}: its meta names no attacks")
            missing = sorted(f"adv_{a}" for a in attacks if f"adv_{a}" not in z.files)
            if missing:
                raise ExportError(f"transfer set {p} lacks {', '.join(missing)}")
            x, y = z["x"], z["y"]
            advs = {a: z[f"adv_{a}"] for a in attacks}
            survived = z["source_survived"] if "source_survived" in z.files else None
            stored = str(z["sha256"])
    except AdvedgeError:
        raise
    except Exception as exc:  # a truncated zip, not a zip, pickled or malformed arrays
        raise ExportError(f"unreadable transfer set {p}: {_first_line(exc)}") from None
    extra = () if survived is None else (survived,)
    for a in (x, y, *advs.values(), *extra):
        if a.dtype.hasobject or a.dtype.kind not in "biuf":
            raise ExportError(f"transfer set {p} holds {a.dtype} arrays, not images and labels")
    if array_sha(x, y, *(advs[k] for k in sorted(advs)), *extra) != stored:
        raise ExportError(f"transfer set {p} does not match its sha256 (modified or corrupt)")
    unperturbed = validate_transfer_set(x, y, advs, meta, where=p, num_classes=num_classes)
    if survived is not None and (survived.dtype != np.bool_ or survived.shape != y.shape):
        raise ExportError(
            f"transfer set {p}: source_survived is {survived.dtype} {list(survived.shape)}, "
            f"not bool [{len(y)}]"
        )
    meta = {**meta, "sha256": stored, "unperturbed": unperturbed}
    return x, y, advs, {**meta, "source_survived": survived}


def _image_problem(name: str, images: np.ndarray, x: np.ndarray) -> str | None:
    """What is wrong with one array of a set's images (shape and dtype of the clean ``x``,
    finite, in [0, 1]), or None."""
    n = len(x)
    if images.shape != x.shape or images.dtype != np.float32:
        return f"{name} images are {images.dtype} {list(images.shape)}, not float32 {list(x.shape)}"
    flat = images.reshape(n, -1)
    k = int((~np.isfinite(flat)).any(axis=1).sum())
    if k:
        return f"{k} of {n} {name} images hold NaN or inf"
    k = int(((flat < 0.0) | (flat > 1.0)).any(axis=1).sum())
    if k:
        return f"{k} of {n} {name} images leave the pixel range [0, 1]"
    return None


def validate_transfer_set(
    x: np.ndarray,
    y: np.ndarray,
    advs: dict[str, np.ndarray],
    meta: dict[str, Any],
    *,
    where: object,
    num_classes: int | None = None,
) -> dict[str, int]:
    """Check that a transfer set is what it says, whatever its sha256 says (a sha256 proves only
    that nobody changed the file after it was recomputed).

    - ``x`` float32 ``[N, C, H, W]``, ``y`` integer ``[N]``, every attack's images the shape and
      dtype of ``x``; ``meta["n"]`` (when recorded) equal to ``N``;
    - every image, clean and adversarial, finite and in [0, 1];
    - every adversarial image within ``eps`` of its clean image in the L-inf norm (the only norm
      bench crafts), plus ``TRANSFER_TOL`` of float rounding (sets are stored in float32 as the
      attacks produced them, never rounded to uint8);
    - labels in ``[0, num_classes)`` (``num_classes`` given, else recorded in the set);
    - not trivially clean: a set whose every attack left every image unchanged holds no
      adversarial example and is refused. One attack may leave images unchanged (APGD returns
      the images the source model already gets wrong as they are); the counts are returned and
      bench records them beside each attack.

    Returns:
        Per attack, the number of images equal to their clean image.

    Raises:
        ExportError: the first problem found, naming the set and how many images it concerns.
    """

    def bad(problem: str) -> ExportError:
        return ExportError(
            f"transfer set {where}: {problem}",
            "craft it again with advedge bench --robust --model",
        )

    if meta.get("schema") not in READABLE_SCHEMAS:
        raise bad(f"schema {meta.get('schema')!r}, not {TRANSFER_SCHEMA}")
    norm = str(meta.get("norm", "linf")).lower()
    if norm != "linf":
        raise bad(f"norm {norm!r}: bench crafts and checks L-inf sets only")
    eps = meta.get("eps")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps <= 1.0:
        raise bad(f"eps {eps!r} is not a budget in (0, 1]")
    if x.ndim != 4 or x.dtype != np.float32 or len(x) == 0:
        raise bad(f"clean images are {x.dtype} {list(x.shape)}, not float32 [N, C, H, W]")
    n = len(x)
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != n:
        raise bad(f"labels are {y.dtype} {list(y.shape)}, not integers [{n}]")
    if meta.get("n") is not None and meta.get("n") != n:
        raise bad(f"it records n = {meta.get('n')} but holds {n} images")
    recorded = meta.get("num_classes")
    classes = num_classes if num_classes is not None else recorded
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        classes = None  # neither given nor recorded: labels are checked for >= 0 only
    out_of_range = int(((y < 0) | (y >= classes)).sum()) if classes else int((y < 0).sum())
    if out_of_range:
        raise bad(f"{out_of_range} of {n} labels lie outside [0, {classes or 'classes'})")
    for name, images in (("clean", x), *advs.items()):
        problem = _image_problem(name, images, x)
        if problem:
            raise bad(problem)
    unperturbed = {}
    clean = x.reshape(n, -1)
    for name, images in advs.items():
        dist = np.abs(images.reshape(n, -1) - clean).max(axis=1)
        k = int((dist > eps + TRANSFER_TOL).sum())
        if k:
            raise bad(
                f"{k} of {n} {name} images lie outside the eps ball "
                f"(L-inf up to {float(dist.max()):.4g} > eps {eps:.4g})"
            )
        unperturbed[name] = int((dist == 0.0).sum())
    if all(k == n for k in unperturbed.values()):
        raise bad("every adversarial image equals its clean image: not a transfer set")
    return unperturbed


def model_source(opts: SetOptions, fused: bool) -> tuple[Any, Path, Path | None]:
    """The checkpoint(s) a set is crafted on: ``(source sha256, --model file, --purifier file)``.

    Raises:
        MissingDependencyError: no torch to craft with.
        CheckpointError: a --model or --purifier that is missing or not an advedge checkpoint
            of the right kind.
        UsageError: a fused artifact without --purifier.
    """
    from advedge.export._deps import require

    require("torch", purpose="crafting the transfer set (--robust --model)")
    from advedge.checkpoint import read_metadata, resolve_checkpoint
    from advedge.errors import CheckpointError
    from advedge.purifier.checkpoint import ARCHITECTURE, resolve_purifier

    ckpt = resolve_checkpoint(str(opts.model))
    if read_metadata(ckpt).get("architecture") == ARCHITECTURE:
        raise CheckpointError(
            f"--model {opts.model} is a purifier, not a classifier", "pass it as --purifier"
        )
    source: Any = sha256_file(ckpt)
    if not fused:
        return source, ckpt, None
    if opts.purifier is None:
        raise UsageError("fused purifier + classifier artifacts need --purifier to craft on")
    pfile = resolve_purifier(str(opts.purifier))
    if read_metadata(pfile).get("architecture") != ARCHITECTURE:
        raise CheckpointError(f"--purifier {opts.purifier} is not a purifier checkpoint")
    return {"purifier": sha256_file(pfile), "classifier": source}, ckpt, pfile


def transfer_path(out_dir: Path, source: Any, opts: SetOptions, x: np.ndarray) -> Path:
    """The cache file of a set: named by its source model, recipe (attacks, budgets, eps, seed)
    and images."""
    key = {"source": source, **recipe_of(opts).key(), "images": array_sha(x)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return out_dir / f"transfer-{digest}-n{len(x)}.npz"


def craft_transfer_set(
    opts: SetOptions,
    test: Any,
    fused: bool,
    path: Path,
    say: Callable[[str], None],
) -> tuple[Path, dict[str, Any]]:
    """The recipe of :mod:`~advedge.export.runtime.craft` on the FP32 PyTorch model (or
    purifier + model), saved at ``path``.

    Args:
        opts: The bench options (the checkpoints, eps, seed and budgets).
        test: The test images, an :class:`~advedge.data.ImageArrays` as eval reads them.
        fused: Craft on the purifier + classifier end to end.
        path: Where the set goes.
        say: Where progress goes.
    """
    from advedge.checkpoint import load_model
    from advedge.data import to_tensor
    from advedge.utils import resolve_device, seed_everything

    source, ckpt, pfile = model_source(opts, fused)
    device = resolve_device(getattr(opts, "device", "auto"))  # a GPU where there is one
    model = load_model(ckpt, device=device)
    if fused:
        from advedge.models.purified import Purified
        from advedge.purifier import load_purifier

        model = Purified(load_purifier(pfile, device=device), model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    recipe = recipe_of(opts)
    seed_everything(recipe.seed)  # as advedge eval does before its attacks
    advs, survived, _ = craft_examples(model, test, recipe, say)
    num_classes = len(test.class_names) or int(test.y.max()) + 1
    meta = {
        "schema": TRANSFER_SCHEMA,
        "source_sha256": source,
        "fused": fused,
        "eps": opts.eps,
        "norm": "linf",
        "n": len(test),
        "num_classes": num_classes,
        "crafted_on": "fp32 pytorch",
        "crafted_device": str(device),
        "recipe": recipe.key(),
        "budgets": {a["name"]: a["budget"] for a in recipe.attacks(num_classes)},
    }
    x = to_tensor(test.x).numpy()
    sha = save_transfer_set(path, x, test.y.astype(np.int64), advs, meta, survived)
    return path, {**meta, "attacks": list(advs), "sha256": sha}


@dataclass
class TransferSet:
    """A transfer set held in memory, checked against this run's images."""

    path: Path | None
    x: np.ndarray
    y: np.ndarray
    advs: dict[str, np.ndarray]
    meta: dict[str, Any]
    #: ``[n]`` bool: correct clean and unbroken by every attack on the parent, as scored when
    #: crafted (version 2 sets; None for version 1).
    survived: np.ndarray | None = None

    @classmethod
    def load(cls, path: Path, *, num_classes: int | None = None) -> TransferSet:
        """:func:`load_transfer_set`, kept with its path."""
        x, y, advs, meta = load_transfer_set(path, num_classes=num_classes)
        survived = meta.pop("source_survived", None)
        return cls(path, x, y, advs, meta, survived)


def check_set_fits(tset: TransferSet, x: np.ndarray, y: np.ndarray, opts: SetOptions) -> None:
    """A set made for this run: the same eps and the very test images and labels.

    Raises:
        ExportError: another eps, or other images or labels.
    """
    name = tset.path.name if tset.path is not None else "in memory"
    if abs(float(tset.meta["eps"]) - opts.eps) > 1e-9:
        raise ExportError(
            f"the transfer set {name} was crafted at eps {tset.meta['eps']:.6g}, "
            f"this run measures eps {opts.eps:.6g}",
            "pass the --eps it was crafted at, or craft a set at this eps",
        )
    if len(tset.y) != len(y) or not np.array_equal(tset.y, y) or not np.array_equal(tset.x, x):
        raise ExportError(
            f"the transfer set {name} holds other images than this run's test images",
            "use the same --data and --n (the first n test images)",
        )


def cached_set(
    path: Path,
    x: np.ndarray,
    y: np.ndarray,
    opts: SetOptions,
    num_classes: int,
    source: Any,
) -> TransferSet | None:
    """A set crafted earlier into --out for this very run, or None (then it is crafted again).

    A cached set is checked like any other; one that fails the checks is an error, not a miss.
    """
    if not path.is_file():
        return None
    tset = TransferSet.load(path, num_classes=num_classes)
    if tset.meta.get("source_sha256") != source or tset.meta.get("recipe") != recipe_of(opts).key():
        return None
    try:
        check_set_fits(tset, x, y, opts)
    except ExportError:
        return None
    return tset
