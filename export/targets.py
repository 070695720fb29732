"""What ``advedge export`` exports and checks it on: the targets, the test images and the PGD
examples.

A target is one graph to export: a classifier; a purifier beside its classifier; or both fused
into one graph (purifier -> classifier, one input, logits out). The parity gate and the accuracy
report run on shuffled test images and on PGD examples crafted on the FP32 PyTorch model
(for a purifier alone, on its classifier). torch is imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from advedge.export._deps import require

import advedge
from advedge.errors import DataError, ExportError, UsageError
from advedge.utils import sha256_file

__all__ = [
    "AdversarialExamples",
    "ExportTarget",
    "default_calibration_data",
    "load_targets",
    "load_test_images",
    "with_calibration_default",
]


@dataclass
class ExportTarget:
    """One graph to export, with the metadata its artifacts carry."""

    name: str
    kind: str  # classifier, purifier, fused
    module: Any
    output: str  # logits or pixels
    metadata: dict[str, Any]
    attack_module: Any  # what the adversarial inputs are crafted on
    classifier: Any  # torch classifier (labels for pixel outputs)
    overrides: dict[str, Any] = field(default_factory=dict)  # parity tolerance from the CLI

    @property
    def crafted_on(self) -> Any:
        """The checkpoint hash(es) of the model its adversarial examples are crafted on."""
        if self.kind == "purifier":
            return self.metadata["classifier_sha256"]
        return self.metadata["source_sha256"]


def _frozen(module: Any) -> Any:
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_targets(
    model: str, purifier: str | None, *, fuse: bool, eps: float | None
) -> tuple[list[ExportTarget], dict[str, Any]]:
    """The targets of an export and the classifier checkpoint's metadata.

    Args:
        model: The classifier's checkpoint or run directory.
        purifier: The purifier's, or None.
        fuse: Export the purifier in front of the classifier as one graph.
        eps: The attack budget to record; None: the checkpoint's (else 8/255).

    Raises:
        CheckpointError: a checkpoint that cannot be loaded, or a purifier that does not fit.
    """
    from advedge.checkpoint import load_model, resolve_checkpoint

    ckpt = resolve_checkpoint(model)
    classifier = _frozen(load_model(ckpt))
    meta = dict(classifier.checkpoint_metadata)
    arch = meta["architecture"]
    common = {
        "classes": meta.get("class_names") or int(meta.get("num_classes") or 0),
        "input_shape": meta.get("input_shape"),
        "eps": eps if eps is not None else (meta.get("eps") or 8 / 255),
        "dataset": meta.get("dataset"),
        "advedge_version": advedge.__version__,
    }
    cls_meta = {
        **common,
        "kind": "classifier",
        "architecture": arch,
        "method": meta.get("method"),
        "source_sha256": sha256_file(ckpt),
    }
    alone = ExportTarget(arch, "classifier", classifier, "logits", cls_meta, classifier, classifier)
    if not purifier:
        return [alone], meta
    return _purifier_targets(purifier, classifier, meta, common, alone, fuse=fuse), meta


def _purifier_targets(
    purifier: str,
    classifier: Any,
    meta: dict[str, Any],
    common: dict[str, Any],
    alone: ExportTarget,
    *,
    fuse: bool,
) -> list[ExportTarget]:
    from advedge.models.purified import Purified
    from advedge.purifier import load_purifier
    from advedge.purifier.checkpoint import check_purifier_fits, resolve_purifier

    pfile = resolve_purifier(purifier)
    gen = _frozen(load_purifier(pfile))
    check_purifier_fits(gen, meta, str(pfile))
    gmeta = dict(gen.checkpoint_metadata)
    pur_sha = sha256_file(pfile)
    if fuse:
        fused = Purified(gen, classifier).eval()
        fmeta = {
            **common,
            "kind": "fused",
            "architecture": f"purifier-generator+{meta['architecture']}",
            "method": f"{gmeta.get('method')}+{meta.get('method')}",
            "eps_r": gmeta.get("eps_r"),
            "source_sha256": {
                "purifier": pur_sha,
                "classifier": alone.metadata["source_sha256"],
            },
        }
        name = f"{meta['architecture']}-purified"
        return [ExportTarget(name, "fused", fused, "logits", fmeta, fused, classifier)]
    pur_meta = {
        **common,
        "kind": "purifier",
        "architecture": "purifier-generator",
        "method": gmeta.get("method"),
        "eps_r": gmeta.get("eps_r"),
        "source_sha256": pur_sha,
        "classifier_sha256": alone.metadata["source_sha256"],
    }
    pur = ExportTarget("purifier", "purifier", gen, "pixels", pur_meta, classifier, classifier)
    return [alone, pur]


def with_calibration_default(opts: Any, say: Callable[[str], None]) -> Any:
    """``opts`` (export options), with ``calib_data`` defaulted when the precision calibrates
    and none was given: see :func:`default_calibration_data`; ``say`` tells the user so."""
    from advedge.export.precisions import PRECISIONS

    if not PRECISIONS[opts.precision].needs_calibration or opts.calib_data:
        return opts
    data = default_calibration_data(opts.model)
    say(
        f"calibrating on {opts.calib_n} images of the training split of {data}, "
        "the dataset the checkpoint records"
    )
    return dataclasses.replace(opts, calib_data=data)


def default_calibration_data(model: str) -> str:
    """``--calib-data``'s default: the dataset the checkpoint was trained on.

    Its folder as the run's ``config.yaml`` records it (``resolved.dataset.root``), else the
    dataset name of the checkpoint's metadata (a folder of that name, or the named dataset in
    advedge's data cache). Calibration draws from its training split only, never its test split.
    Cheap: no images are read.

    Raises:
        CheckpointError: no readable checkpoint at ``model``.
        UsageError: the checkpoint records no dataset.
        DataError: the dataset it records is not on this machine.
    """
    from pathlib import Path

    from advedge.checkpoint import read_metadata, resolve_checkpoint
    from advedge.config import load_yaml
    from advedge.data import NAMED_DATASETS, data_dir

    hint = "pass --calib-data DIR (a data directory or a saved calibration .npz)"
    name = read_metadata(model).get("dataset")
    config = resolve_checkpoint(model).parent / "config.yaml"
    root = None
    if config.is_file():
        try:
            root = (load_yaml(config).get("resolved") or {}).get("dataset", {}).get("root")
        except (UsageError, AttributeError):  # not advedge's config: use the name
            root = None
    if not root and not name:
        raise UsageError("int8 needs calibration data and the checkpoint records no dataset", hint)
    if root and Path(root).is_dir():
        return str(root)
    if name and (Path(name).is_dir() or (name in NAMED_DATASETS and (data_dir() / name).is_dir())):
        return str(name)  # what load_dataset finds: a folder here, or the cached named dataset
    raise DataError(
        f"the dataset the checkpoint records ({root or name}) is not on this machine; "
        "int8 needs calibration data",
        hint,
    )


def load_test_images(
    source: str | None,
    meta: dict[str, Any],
    *,
    n: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` test images (float NCHW in [0, 1], shuffled) and their labels.

    Args:
        source: The data directory or name; None: the dataset the checkpoint records.
        meta: The classifier checkpoint's metadata (its ``input_shape`` and ``dataset``).
        n: How many images (stratified over the classes).
        seed: Seed of the choice and of the order.

    Raises:
        UsageError: no data given or recorded.
        DataError, ExportError: data that cannot be loaded, or images of another shape.
    """
    from advedge.data import load_dataset, stratified_subset

    if source is None:
        source = meta.get("dataset")
    if not source:
        raise UsageError("no test data for the parity gate", "pass --data DIR")
    try:
        ds = load_dataset(source, download=False)
    except DataError as exc:
        raise DataError(
            f"{exc.message} (test images are needed for the parity gate)", "pass --data DIR"
        ) from None
    want = list(meta.get("input_shape") or [])
    if want and list(ds.input_shape) != want:
        raise ExportError(
            f"the data's images are {list(ds.input_shape)} but the model takes {want}"
        )
    test = stratified_subset(ds.test, n, seed)
    # stratified_subset keeps the split's order (class by class in an image folder): shuffle, so
    # that any prefix (the parity images, the report images) covers every class
    order = np.random.default_rng(seed).permutation(len(test))
    test = test.subset(order)
    x = test.x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return np.ascontiguousarray(x), test.y.astype(np.int64)


def _pgd(
    module: Any, x: np.ndarray, y: np.ndarray, *, eps: float, steps: int, seed: int
) -> np.ndarray:
    """PGD-``steps`` (L∞, step 2.5·eps/steps, uniform start) on the FP32 PyTorch module."""
    torch = require("torch", purpose="crafting adversarial examples")
    from advedge.attacks import PGD

    gen = torch.Generator().manual_seed(seed)
    attack = PGD(module, eps=eps, steps=steps, generator=gen)
    out = []
    for i in range(0, len(x), 128):
        xb = torch.from_numpy(x[i : i + 128])
        yb = torch.from_numpy(y[i : i + 128])
        out.append(attack(xb, yb).detach().numpy())
    return np.concatenate(out).astype(np.float32)


class AdversarialExamples:
    """PGD examples, crafted once per attacked model, images and attack.

    Keyed by what they were crafted on (the checkpoint hashes), eps, steps, seed and the images,
    so a purifier beside its classifier, or a second export of the same model at another
    precision by the same caller (``advedge pipeline`` exports int8, then fp16), reuses them.
    The caller owns the object; it keeps the ``keep`` most recent entries.
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._memo: dict[Any, np.ndarray] = {}

    def get(
        self,
        target: ExportTarget,
        x: np.ndarray,
        y: np.ndarray,
        *,
        eps: float,
        steps: int,
        seed: int,
        say: Any = None,
    ) -> np.ndarray:
        """The PGD-``steps`` examples of ``(x, y)`` for ``target``; crafted when not known."""
        key = (
            json.dumps(target.crafted_on, sort_keys=True),
            eps,
            steps,
            seed,
            hashlib.sha256(x.tobytes()).hexdigest(),
        )
        if key not in self._memo:
            if say is not None:
                on = target.metadata["architecture"] if target.kind != "purifier" else "classifier"
                say(f"crafting PGD-{steps} examples on the FP32 {on} ({len(y)} images)")
            self._memo[key] = _pgd(target.attack_module, x, y, eps=eps, steps=steps, seed=seed)
            while len(self._memo) > self.keep:
                self._memo.pop(next(iter(self._memo)))
        return self._memo[key]
