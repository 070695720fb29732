"""One writer per output: an exclusive lock beside every run directory or output file.

Every command that writes (train, distill, purifier train, export, calibrate, bench, report,
pipeline) holds :func:`output_lock` on its ``--out`` for as long as it writes. The lock is a file
beside the output, ``PARENT/.NAME.lock`` (see :func:`lock_path`), so it never creates the
output folder itself (a failed
command leaves no empty folder). It holds one JSON line naming the holder (pid, host, command,
start time), and it is taken with ``flock``: the kernel releases it when its holder exits, so a
lock left by a process killed with ``kill -9`` is stale and the next writer takes it over without
a rule based on time or pid. A second writer is refused at once with
:class:`OutputLockedError`, naming the holder.

Under ``torchrun`` only rank 0 writes, so only rank 0 takes the lock. A process may take the same
lock again while it holds it (the pipeline's stages call the commands' own functions).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from advedge.errors import AdvedgeError, os_error

__all__ = ["OutputLockedError", "lock_path", "output_lock"]

_held: dict[Path, int] = {}  # lock file -> nesting depth, in this process


class OutputLockedError(AdvedgeError):
    """Another live process is writing the same output: exit code 1."""


def lock_path(out: str | os.PathLike[str]) -> Path:
    """The lock file of output ``out`` (absolute): ``PARENT/.NAME.lock``.

    An output folder that exists and can be written inside a parent that cannot (a shared,
    read-only scratch folder) holds its lock itself, as ``OUT/.advedge.lock``. Every writer
    finds the same file: the choice depends only on the parent's permissions.
    """
    p = Path(os.path.abspath(out))
    if p.is_dir() and not os.access(p.parent, os.W_OK) and os.access(p, os.W_OK):
        return p / ".advedge.lock"
    return p.parent / f".{p.name}.lock"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the exclusive write lock of ``out`` (a run directory or an output file).

    Parent folders that have to be made for the lock file are removed again on release when
    they are still empty, so a command that fails leaves nothing behind.

    Raises:
        OutputLockedError: another live process holds the lock.
        AdvedgeError: the lock cannot be written (read-only or missing permission).
    """
    if _rank() != 0:
        yield
        return
    path = lock_path(out)
    if path in _held:
        _held[path] += 1
        try:
            yield
        finally:
            _held[path] -= 1
        return
    made = _make_parents(path.parent, out)
    fd = None
    try:
        fd = _acquire(path, out)
        _held[path] = 1
        try:
            yield
        finally:
            del _held[path]
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        if fd is not None:
            os.close(fd)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _make_parents(folder: Path, out: object) -> list[Path]:
    """Create ``folder`` and missing parents; return the ones created, outermost first."""
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise AdvedgeError(f"cannot write {out}: {p} is a file, not a folder")
    made = []
    for q in reversed(missing):
        try:
            q.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            for r in reversed(made):
                with contextlib.suppress(OSError):
                    r.rmdir()
            raise os_error(exc, out) from None
        made.append(q)
    return made


def _acquire(path: Path, out: object) -> int:
    import fcntl

    for _ in range(50):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise os_error(exc, out) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise OutputLockedError(
                    f"{out} is being written by another advedge process ({holder})",
                    "wait for it to finish, or choose another --out",
                ) from None
            raise os_error(exc, out) from None
        # The holder we waited on may have unlinked the file between our open and our lock:
        # then we hold a lock on a file nobody else can see; try again on the current one.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv)),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        return fd
    raise OutputLockedError(f"could not take the lock {path}", "another process keeps replacing it")


def _read_holder(fd: int) -> str:
    try:
        rec = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
        return f"pid {rec.get('pid')} on {rec.get('host')}, since {rec.get('since')}"
    except (OSError, ValueError, AttributeError):
        return "holder unknown"
