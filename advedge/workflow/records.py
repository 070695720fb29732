"""A stage's record (``.pipeline/<stage>.json``), its key, and the data's content key."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from advedge.utils import atomic_write_text, sha256_file, to_jsonable

__all__ = ["READS", "SUPERSEDED", "StageRecord", "data_key", "stage_inputs", "stage_key"]


def stage_key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(to_jsonable(obj), sort_keys=True).encode()).hexdigest()


# The stages whose outputs each stage reads: their files' sha256 enter its key.
READS: dict[str, tuple[str, ...]] = {
    "teacher": (),
    "student": ("teacher",),
    "purifier": ("student",),
    "export": ("student", "purifier"),
    "qat": ("teacher", "student", "export"),
    "bench": ("student", "purifier", "export", "qat"),
    "report": ("teacher", "student", "purifier", "bench"),
}
SUPERSEDED = ".superseded"


class StageRecord:
    """One stage's record (``.pipeline/<name>.json``), key and folder.

    Recorded outputs are paths relative to the pipeline's folder, so a moved or copied
    ``--out`` stays up to date.
    """

    def __init__(self, root: Path, name: str, config: dict[str, Any], inputs: dict[str, str]):
        self.root, self.name = root, name
        self.config = config
        self.inputs = inputs
        self.key = stage_key({"stage": name, "config": config, "inputs": inputs})
        self.record_path = root / ".pipeline" / f"{name}.json"
        self.dir = root / name
        self.superseded = root / SUPERSEDED / name

    def record(self) -> dict[str, Any] | None:
        try:
            rec = json.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    def done(self) -> bool:
        """Finished with this key, and every recorded output is still there."""
        rec = self.record()
        return (
            rec is not None
            and rec.get("hash") == self.key
            and rec.get("status", "finished") == "finished"
            and all((self.root / o).exists() for o in rec.get("outputs", []))
        )

    def resumable(self) -> bool:
        """A run of this very key was cut short: its folder is continued, not set aside."""
        rec = self.record()
        return rec is not None and rec.get("hash") == self.key and rec.get("status") == "running"

    def set_aside(self) -> bool:
        """Move the folder of another key (or of unknown origin) into ``.superseded/``.

        A finished folder becomes ``.superseded/<name>`` (the older finished copy there, which
        it had itself replaced, is deleted only once the move is done); any other folder goes
        to its own ``.superseded/<name>.partial-<time>``, so nothing is ever overwritten.

        Returns:
            True when something was set aside.
        """
        if not self.dir.exists():
            return False
        rec = self.record()
        finished = rec is not None and rec.get("status", "finished") == "finished"
        self.superseded.parent.mkdir(parents=True, exist_ok=True)
        if not finished:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            target = self.superseded.with_name(f"{self.name}.partial-{stamp}-{os.getpid()}")
            os.replace(self.dir, target)
            return True
        older = None
        if self.superseded.exists():
            older = self.superseded.with_name(f"{self.name}.older-{os.getpid()}")
            os.replace(self.superseded, older)
        os.replace(self.dir, self.superseded)
        if rec is not None:
            atomic_write_text(self.superseded / ".record.json", json.dumps(rec, indent=2) + "\n")
        if older is not None:
            shutil.rmtree(older)
        return True

    def start(self) -> None:
        self._write({"status": "running"})

    def finish(self, outputs: list[Path], seconds: float, summary: dict[str, Any]) -> None:
        self._write(
            {
                "status": "finished",
                "outputs": [os.path.relpath(o, self.root) for o in outputs],
                "seconds": round(seconds, 1),
                "summary": summary,
            }
        )
        # the replacement exists now: the superseded copies may go
        for old in self.superseded.parent.glob(f"{self.name}*"):
            if old.name == self.name or old.name.startswith(f"{self.name}."):
                shutil.rmtree(old)

    def _write(self, fields: dict[str, Any]) -> None:
        rec = {"stage": self.name, "hash": self.key, "config": self.config, "inputs": self.inputs}
        atomic_write_text(
            self.record_path, json.dumps(to_jsonable({**rec, **fields}), indent=2) + "\n"
        )


def stage_inputs(
    root: Path, name: str, data_key: str, stages: tuple[str, ...] | None = None
) -> dict[str, str]:
    """sha256 of every file ``name`` reads: the data's key and the upstream stages' files (of
    those among ``stages``, the stages the pipeline runs; all when None)."""
    inputs = {"data": data_key}
    for up in READS[name]:
        if stages is not None and up not in stages:
            continue
        for f in sorted((root / up).rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                inputs[str(f.relative_to(root))] = sha256_file(f)
    return inputs


def data_key(path: Path) -> str:
    """A content key of a dataset folder: sha256 over its files' names, sizes and contents."""
    import hashlib

    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    for f in files:
        h.update(f"{f.relative_to(path) if f != path else f.name}\0{f.stat().st_size}\0".encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()
