"""Output files and folders of advedge's commands: checked before any work, written all or nothing.

- :func:`check_out` (an output folder) and :func:`check_out_file` (an output file) refuse a path
  that cannot be written before any work starts, with a real write probe (permissions, read-only
  mounts and immutable folders all show), and create nothing;
- :func:`refuse_overwrite` refuses to replace earlier outputs without ``--overwrite``;
- :class:`StagedFiles` writes a command's new files under temporary names beside their
  destinations, then :func:`install` renames them all in a row (undoing the ones done if a
  rename fails) and only afterwards removes stale names that are not among the new ones: a
  failure before the renames leaves the earlier complete set of files as it was;
- :class:`Leftovers` and :func:`make_folders`: folders (and files) a failed command made are
  removed again;
- :func:`quiet_warnings` and :func:`held_logs`: a command's stderr holds its own lines only.

Low level and torch-free: imports only :mod:`advedge.errors` and :mod:`advedge.utils` (never
:mod:`advedge.locks`, which may build on this module).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from advedge.errors import AdvedgeError, UsageError, os_error
from advedge.utils import current_umask

__all__ = [
    "Leftovers",
    "StagedFiles",
    "check_out",
    "check_out_file",
    "held_logs",
    "install",
    "make_folders",
    "quiet_warnings",
    "refuse_overwrite",
]

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ checks
def _nearest_existing(path: Path) -> Path:
    """``path`` or the nearest of its parents that exists (a broken symlink counts)."""
    base = path
    while not os.path.lexists(base) and base.parent != base:
        base = base.parent
    return base


def _probe(folder: Path, shown: Path) -> None:
    """Create and remove a file in ``folder``: a real write, not a permission-bit guess."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".advedge-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise os_error(exc, shown) from None


def check_out(out: str | os.PathLike[str], *, option: str = "--out") -> Path:
    """Refuse an output folder that is a file, lies under a file or cannot be written.

    The folder itself is probed when it exists, else the nearest parent that exists (which
    will hold the folders made for it). Nothing is created: the folder is made when its first
    file is written.

    Raises:
        UsageError: ``out`` is a file, or one of its parents is (exit 2).
        AdvedgeError: the folder (or the nearest one that exists) cannot be written (exit 1),
            named by :func:`advedge.errors.os_error`.
    """
    p = Path(out)
    if os.path.lexists(p) and not p.is_dir():
        raise UsageError(f"{option} {p} is a file, not a folder", f"choose a folder for {option}")
    return _probe_under(p, p, option)


def _probe_under(folder: Path, p: Path, option: str) -> Path:
    """Probe the nearest existing folder of ``folder`` with a real write; refuse a file there."""
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise UsageError(
            f"{option} {p} lies under {base}, which is a file, not a folder",
            f"choose another {option}",
        )
    _probe(base, p)
    return p


def check_out_file(path: str | os.PathLike[str], *, option: str = "--out") -> Path:
    """Refuse an output file that is a folder, lies under a file or cannot be written.

    The nearest existing folder of ``path``'s parent is probed with a real write: it holds the
    file's temporary, its lock and the folders made for it. Nothing is created.

    Raises:
        UsageError: ``path`` is a folder, or one of its parents is a file (exit 2).
        AdvedgeError: the folder that would hold it cannot be written (exit 1).
    """
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{option} {p} is a folder", "name the file to write")
    return _probe_under(p.parent, p, option)


def refuse_overwrite(out: Path, names: Sequence[str], overwrite: bool) -> None:
    """Refuse to replace an earlier output file in ``out`` unless ``overwrite`` is set.

    Raises:
        UsageError: one of the names is a folder.
        AdvedgeError: one of them exists and ``overwrite`` is false (exit 1).
    """
    for name in names:
        f = out / name
        if f.is_dir():
            raise UsageError(f"{f} is a folder, not a file", "choose another --out")
        if (f.exists() or f.is_symlink()) and not overwrite:
            raise AdvedgeError(
                f"{f} exists: refusing to overwrite it",
                "pass --overwrite to replace it, or choose another --out",
            )


# ------------------------------------------------------------------------------ folders
def make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones made, outermost first.

    On a failure the folders made so far are removed again before the error propagates.
    """
    missing = []
    p = Path(folder)
    while not p.exists() and p.parent != p:
        missing.append(p)
        p = p.parent
    made: list[Path] = []
    for q in reversed(missing):
        try:
            q.mkdir()
        except FileExistsError:
            continue
        except OSError:
            for r in reversed(made):
                with contextlib.suppress(OSError):
                    r.rmdir()
            raise
        made.append(q)
    return made


class Leftovers:
    """The files and folders a command created, removed again when it fails.

    Folders are the ones missing when this was made (from ``out`` up); they are removed only
    when empty, so nothing the command did not create is touched.
    """

    def __init__(self, out: Path | None) -> None:
        self.files: list[Path] = []
        self.dirs: list[Path] = []
        p = out
        while p is not None and not p.exists() and p.parent != p:
            self.dirs.append(p)
            p = p.parent

    def new(self, path: Path) -> Path:
        """Register ``path`` as created by this command when it does not exist yet."""
        if not path.exists() and path not in self.files:
            self.files.append(path)
        return path

    def remove(self) -> None:
        for f in self.files:
            with contextlib.suppress(OSError):
                f.unlink()
        for d in self.dirs:  # innermost first
            with contextlib.suppress(OSError):
                d.rmdir()


# ------------------------------------------------------------------------------ all or nothing
def _backup(dst: Path) -> Path | None:
    """A hard link to the file at ``dst`` under a hidden temporary name, or None (nothing
    there, or a file system without hard links)."""
    if not os.path.lexists(dst) or dst.is_dir():
        return None
    for _ in range(100):
        name = dst.parent / f".{dst.name}.{os.urandom(4).hex()}.tmp"
        try:
            os.link(dst, name, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError as exc:  # no hard links here: no undo for this file
            logger.debug("cannot keep %s to undo an install (%s)", dst, exc)
            return None
        return name
    return None


def install(pairs: Sequence[tuple[Path, Path]], stale: Iterable[Path] = ()) -> list[Path]:
    """Rename every ``(temporary, destination)`` pair in a row, then remove ``stale`` files.

    Each temporary must lie in its destination's folder (or one on the same file system), so
    each rename is atomic. Before the first rename, every destination that exists is kept
    under a hidden hard link; if a rename fails, the renames done are undone (earlier files
    put back, new ones removed) and the error propagates, so a reader sees the earlier set or
    the new one. Only after every rename are the ``stale`` files that are not among the
    destinations removed.

    Returns:
        The stale files that were removed.

    Raises:
        OSError: the rename that failed (after the undo).
    """
    existed = {dst: os.path.lexists(dst) for _, dst in pairs}
    backups: dict[Path, Path | None] = {}
    done: list[Path] = []
    try:
        for _, dst in pairs:
            backups[dst] = _backup(dst)
        try:
            for tmp, dst in pairs:
                os.replace(tmp, dst)
                done.append(dst)
        except BaseException:
            for dst in reversed(done):
                with contextlib.suppress(OSError):
                    old = backups.get(dst)
                    if old is not None:
                        os.replace(old, dst)  # the earlier file, back in place
                    elif not existed[dst]:
                        dst.unlink()  # a new name: gone again
            raise
    finally:
        for old in backups.values():
            if old is not None:
                with contextlib.suppress(OSError):
                    old.unlink()
    new = {os.path.abspath(dst) for _, dst in pairs}
    removed = []
    for path in stale:
        if os.path.abspath(path) in new or not os.path.lexists(path):
            continue
        path.unlink()
        removed.append(path)
    return removed


class StagedFiles:
    """New output files, written under temporary names beside their destinations and then put
    in place together by :meth:`install`.

    Used as a context manager: when the body fails (or :meth:`install` was never called), every
    temporary and every folder made for them is removed again, so earlier outputs stay as they
    were and nothing new is left behind.
    """

    def __init__(self) -> None:
        self.pairs: list[tuple[Path, Path]] = []
        self.made: list[Path] = []
        self.installed = False

    def path(self, dst: Path) -> Path:
        """A new empty temporary file beside ``dst`` (its folder made when missing), to be
        renamed onto ``dst`` by :meth:`install`."""
        dst = Path(dst)
        self.drop(dst)
        self.made += make_folders(dst.parent)
        fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
        os.close(fd)
        tmp = Path(name)
        self.pairs.append((tmp, dst))
        return tmp

    def write_bytes(self, dst: Path, data: bytes) -> Path:
        """Stage ``data`` as the new content of ``dst``; returns the temporary."""
        tmp = self.path(dst)
        tmp.write_bytes(data)
        return tmp

    def write_text(self, dst: Path, text: str) -> Path:
        """Stage ``text`` (UTF-8) as the new content of ``dst``; returns the temporary."""
        return self.write_bytes(dst, text.encode("utf-8"))

    def copy(self, src: Path, dst: Path) -> Path:
        """Stage a copy of ``src`` (possibly on another file system) as ``dst``."""
        import shutil

        tmp = self.path(dst)
        shutil.copyfile(src, tmp)
        return tmp

    def drop(self, dst: Path) -> None:
        """Forget a staged ``dst`` (its temporary is removed)."""
        keep = []
        for tmp, d in self.pairs:
            if d == Path(dst):
                with contextlib.suppress(OSError):
                    tmp.unlink()
            else:
                keep.append((tmp, d))
        self.pairs = keep

    def install(self, stale: Iterable[Path] = ()) -> list[Path]:
        """Flush every temporary to disk, give it the permissions a plain ``open()`` would and
        rename them all onto their destinations (see :func:`install`); then remove the
        ``stale`` files that are not among them. Returns the stale files removed."""
        mode = 0o666 & ~current_umask()
        for tmp, _ in self.pairs:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, mode)
        removed = install(self.pairs, stale)
        self.installed = True
        return removed

    def discard(self) -> None:
        """Remove every temporary and, when empty, every folder made for them."""
        for tmp, _ in self.pairs:
            with contextlib.suppress(OSError):
                tmp.unlink()
        self.pairs = []
        for folder in reversed(self.made):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty
        self.made = []

    def __enter__(self) -> StagedFiles:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.installed:
            self.discard()


# ------------------------------------------------------------------------------ quiet
@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """Send Python warnings (NumPy, Matplotlib, ...) to advedge's logger at debug level while
    the body runs: a command's stderr holds its own lines only, an error exactly one."""
    log = logging.getLogger("advedge")

    def show(message: Any, category: Any, filename: str, lineno: int, *_: Any) -> None:
        log.debug("%s: %s (%s:%s)", category.__name__, message, filename, lineno)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


@contextlib.contextmanager
def held_logs() -> Iterator[None]:
    """Hold back what advedge logs (e.g. "loaded data from ...") while the body runs: emitted
    after it succeeds, dropped when it fails, so a refused command prints one line."""
    root = logging.getLogger("advedge")
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    handlers = list(root.handlers)
    for h in handlers:
        h.addFilter(hold)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(hold)
    seen: set[int] = set()
    for record in held:  # once per record, to the handlers it was meant for
        if id(record) in seen:
            continue
        seen.add(id(record))
        for h in handlers:
            if record.levelno >= h.level:
                h.handle(record)
