"""Progress bars on stderr (rich), fed by the library's callbacks.

:class:`Bars` is the one base: a rich display started and stopped as a context manager.
:class:`TrainProgress` follows the training engine (and the purifier trainer),
:class:`EvalProgress` the evaluation, :class:`PipelineProgress` the pipeline's stages (and the
training inside them); :func:`load_data` shows a download bar while a named dataset is fetched.

When stderr is not a terminal (a log file, a pipe), a live bar would print nothing until it
stops: the bars then write plain progress lines instead, at most one every
:data:`PLAIN_INTERVAL` seconds (a stage's own messages always). ``--quiet`` shows neither.
"""

from __future__ import annotations

import time
from typing import Any

from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from advedge.cli.output import Output, is_quiet

__all__ = [
    "PLAIN_INTERVAL",
    "Bars",
    "EvalProgress",
    "PipelineProgress",
    "TrainProgress",
    "load_data",
]

#: Seconds between two plain progress lines (stderr not a terminal) of the same task.
PLAIN_INTERVAL = 30.0


def _now() -> float:
    """The clock of the plain lines' rate limit (seconds)."""
    return time.monotonic()


def load_data(spec: str, output: Output) -> Any:
    """Load a dataset, showing a download progress bar (stderr) if a named one is fetched."""
    from advedge.data import load_dataset

    state: dict[str, Any] = {}

    def on_bytes(done: int, total: int | None) -> None:
        if "bar" not in state:
            bar = Progress(
                *Progress.get_default_columns(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=output.err,
                disable=is_quiet(),
            )
            bar.start()
            state["bar"] = bar
            state["task"] = bar.add_task(f"downloading {spec}", total=total)
        state["bar"].update(state["task"], completed=done, total=total)

    try:
        return load_dataset(spec, progress=on_bytes)
    finally:
        if "bar" in state:
            state["bar"].stop()


class Bars:
    """A rich progress display on stderr, usable as a context manager."""

    def __init__(self, output: Output, *, remaining: bool) -> None:
        columns: list[Any] = [
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        ]
        if remaining:
            columns.append(TimeRemainingColumn())
        columns.append(TextColumn("{task.fields[status]}"))
        quiet = is_quiet()
        #: stderr is not a terminal: plain lines (:meth:`line`) instead of a live bar
        self.plain = not quiet and not output.err.is_terminal
        self.progress = Progress(*columns, console=output.err, disable=quiet or self.plain)
        self.err = output.err
        self._last_line = -PLAIN_INTERVAL

    def line(self, text: str, *, force: bool = False) -> None:
        """Write ``text`` as a plain progress line when stderr is not a terminal: always with
        ``force``, else only :data:`PLAIN_INTERVAL` seconds after the previous one."""
        now = _now()
        if self.plain and (force or now - self._last_line >= PLAIN_INTERVAL):
            self._last_line = now
            self.err.print(text, highlight=False, markup=False)

    def __enter__(self) -> Any:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


class TrainProgress(Bars):
    """Epoch and batch bars for the training engine's callbacks."""

    def __init__(
        self,
        output: Output,
        *,
        batch_status: str = "loss {loss:.4f} acc {acc:.1%}",
        epoch_status: str = "clean {test_clean_acc:.1%} pgd {test_pgd_acc:.1%}",
    ) -> None:
        super().__init__(output, remaining=True)
        self.epoch_task: Any = None
        self.batch_task: Any = None
        self.batch_status = batch_status
        self.epoch_status = epoch_status

    def on_train_start(self, *, start_epoch: int, epochs: int, batches_per_epoch: int) -> None:
        self.epoch_task = self.progress.add_task(
            "epochs", total=epochs, completed=start_epoch, status=""
        )
        self.batch_task = self.progress.add_task("batches", total=batches_per_epoch, status="")

    def on_batch_end(self, *, epoch: int, batch: int, loss: float, acc: float) -> None:
        self.progress.update(
            self.batch_task,
            completed=batch + 1,
            description=f"epoch {epoch + 1}",
            status=self.batch_status.format(loss=loss, acc=acc),
        )
        total = self.progress.tasks[self.batch_task].total if self.batch_task is not None else None
        self.line(f"epoch {epoch + 1}: batch {batch + 1}/{total}")

    def on_eval_start(self, *, epoch: int) -> None:
        self.progress.update(self.batch_task, status="scoring held-out batch (clean, PGD)")

    def on_epoch_end(self, row: dict[str, float]) -> None:
        self.progress.update(
            self.epoch_task,
            completed=int(row["epoch"]),
            status=self.epoch_status.format(**row),
        )
        self.progress.reset(self.batch_task)


class EvalProgress(Bars):
    """Per-attack bars with the running robust accuracy."""

    def __init__(self, output: Output) -> None:
        super().__init__(output, remaining=False)
        self.tasks: dict[str, Any] = {}

    def on_attack_start(self, name: str, n_todo: int) -> None:
        self.tasks[name] = self.progress.add_task(name, total=max(n_todo, 1), status="")

    def on_batch_end(self, name: str, n_done: int, running_acc: float) -> None:
        self.progress.update(self.tasks[name], completed=n_done, status=f"robust {running_acc:.1%}")
        total = self.progress.tasks[self.tasks[name]].total
        self.line(f"{name}: {n_done}/{total} attacked, robust so far {running_acc:.1%}")

    def on_examples(self, name: str, idx: Any, x_adv: Any) -> None:
        """The attacked batch's adversarial images: nothing to show."""

    def on_attack_end(self, name: str, result: dict[str, Any]) -> None:
        self.progress.update(
            self.tasks[name],
            completed=self.progress.tasks[self.tasks[name]].total,
            status=f"robust {result['robust_acc']:.1%}",
        )


class PipelineProgress(Bars):
    """One bar over the stages; the status shows the current stage's epoch and batch."""

    def __init__(self, output: Output, stages: tuple[str, ...]) -> None:
        super().__init__(output, remaining=False)
        self.stages = stages
        self.task = self.progress.add_task("pipeline", total=len(stages), status="")
        self.stage = ""
        self.epochs = 0
        self.batches = 0
        self.started = False

    def __enter__(self) -> Any:
        # shown with the first stage, after every option and the data are checked: a refused
        # pipeline prints its one error line and nothing else
        return self

    def __exit__(self, *exc: object) -> None:
        if self.started:
            self.progress.stop()

    def on_stage(self, stage: str, message: str) -> None:
        if not self.started:
            self.progress.start()
            self.started = True
        if stage != self.stage:
            if self.stage:
                self.progress.advance(self.task)
            self.stage = stage
        self.progress.update(self.task, description=f"pipeline: {stage}", status=message[:70])
        self.line(f"pipeline: {stage}: {message}", force=True)

    def finish(self) -> None:
        self.progress.update(self.task, completed=len(self.stages), status="done")

    # training-engine hooks (teacher, student, purifier)
    def on_train_start(self, *, start_epoch: int, epochs: int, batches_per_epoch: int) -> None:
        self.epochs, self.batches = epochs, batches_per_epoch

    def on_batch_end(
        self, *, epoch: int, batch: int, loss: float = 0.0, acc: float = 0.0, **_: Any
    ) -> None:
        self._status(f"epoch {epoch + 1}/{self.epochs} batch {batch + 1}/{self.batches}")

    def on_eval_start(self, *, epoch: int) -> None:
        self._status(f"epoch {epoch + 1}/{self.epochs}: held-out eval")

    def on_epoch_end(self, row: dict[str, float]) -> None:
        self._status(f"epoch {int(row.get('epoch', 0))}/{self.epochs} done")

    def _status(self, text: str) -> None:
        self.progress.update(self.task, status=text)
        self.line(f"pipeline: {self.stage}: {text}")
