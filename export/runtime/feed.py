"""An artifact's runner as the accuracy and attack passes of ``advedge bench`` use it: fed batches
it takes, every output checked (:class:`Feed`), and the Square query attack run against it
(:func:`query_attack`, the only attack that needs no gradients and no FP32 parent).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from advedge.errors import ExportError

__all__ = ["Feed", "query_attack"]


class Feed:
    """An artifact's runner fed batches it takes, every output checked.

    Chunks of ``step`` images; a last chunk smaller than the runner's smallest batch (a fixed
    batch ONNX, an engine's profile) is padded with copies of its last image and the padding's
    outputs dropped. Every output must be ``[batch, num_classes]`` and finite.
    """

    def __init__(self, runner: Any, name: str, step: int, lo: int, num_classes: int) -> None:
        self.runner, self.name, self.step, self.lo = runner, name, step, lo
        self.num_classes = num_classes

    def run(self, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return np.zeros((0, self.num_classes), np.float32)
        outs = []
        for i in range(0, len(x), self.step):
            xb = np.ascontiguousarray(x[i : i + self.step], dtype=np.float32)
            k = len(xb)
            if k < self.lo:
                xb = np.concatenate([xb, np.repeat(xb[-1:], self.lo - k, axis=0)])
            out = np.asarray(self.runner.run(xb))
            if out.ndim != 2 or out.shape[0] != len(xb):
                raise ExportError(
                    f"{self.name} returned {list(out.shape)} for {len(xb)} images, "
                    "not [batch, classes] logits"
                )
            outs.append(out[:k])
        logits = np.concatenate(outs).astype(np.float32, copy=False)
        if logits.shape[1] != self.num_classes:
            raise ExportError(
                f"{self.name} scores {logits.shape[1]} classes but the data has {self.num_classes}",
                "pass the dataset the model was trained on",
            )
        k = int((~np.isfinite(logits)).any(axis=1).sum())
        if k:
            raise ExportError(
                f"{self.name} returned non-finite logits (NaN or inf) for {k} of {len(x)} images",
                "the artifact is broken; export it again",
            )
        return logits

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.run(x).argmax(1)


def query_attack(
    runner: Any, x: np.ndarray, y: np.ndarray, *, eps: float, n_queries: int, seed: int
) -> np.ndarray:
    """Square (L∞, margin loss) against the runner itself; returns per-example correctness."""
    torch = __import__("torch")
    from advedge.attacks.square import Square

    attack = Square(runner, eps=eps, n_queries=n_queries, seed=seed, numpy_model=True)
    adv = attack(torch.from_numpy(x), torch.from_numpy(y)).detach().numpy()
    return np.asarray(runner.run(adv.astype(np.float32))).argmax(1) == y
