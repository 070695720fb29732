"""advedge.outputs: output checks with a real write probe and all-or-nothing installs."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from advedge import outputs
from advedge.errors import AdvedgeError, UsageError
from advedge.outputs import StagedFiles, check_out, check_out_file, install


def test_outputs_imports_neither_torch_nor_the_locks():
    code = (
        "import sys, advedge.outputs; "
        "bad = [m for m in ('torch', 'advedge.locks') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_check_out_file_refuses_a_folder_a_file_parent_and_creates_nothing(tmp_path):
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(UsageError, match="is a folder"):
        check_out_file(tmp_path / "dir.onnx")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match=r"lies under .*file, which is a file"):
        check_out_file(tmp_path / "file" / "sub" / "q.onnx", option="--save-set")
    assert (
        check_out_file(tmp_path / "new" / "sub" / "q.onnx") == tmp_path / "new" / "sub" / "q.onnx"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.onnx", "file"]


def test_check_out_refuses_a_file_and_a_file_parent(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_out(tmp_path / "file")
    with pytest.raises(UsageError, match="lies under"):
        check_out(tmp_path / "file" / "out")
    assert check_out(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_the_write_probe_is_a_real_write(tmp_path, read_only):
    ro = tmp_path / "ro"
    read_only(ro)
    for check, path in (
        (check_out, ro),
        (check_out, ro / "new" / "out"),
        (check_out_file, ro / "q.onnx"),
        (check_out_file, ro / "sub" / "q.onnx"),
    ):
        with pytest.raises(AdvedgeError, match=f"cannot write {path}"):
            check(path)
    assert list(ro.iterdir()) == []


def _pair(folder: Path, name: str, text: str) -> tuple[Path, Path]:
    tmp = folder / f".{name}.new.tmp"
    tmp.write_text(text)
    return tmp, folder / name


def test_install_renames_in_a_row_then_removes_only_stale_names_not_replaced(tmp_path):
    for name in ("a", "b", "stale"):
        (tmp_path / name).write_text(f"old {name}")
    pairs = [_pair(tmp_path, "a", "new a"), _pair(tmp_path, "c", "new c")]
    removed = install(pairs, stale=[tmp_path / "a", tmp_path / "stale", tmp_path / "gone"])
    assert removed == [tmp_path / "stale"]
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        "a": "new a",
        "b": "old b",
        "c": "new c",
    }


def test_a_failed_rename_undoes_the_ones_done_and_removes_nothing(tmp_path, monkeypatch):
    for name in ("a", "b", "stale"):
        (tmp_path / name).write_text(f"old {name}")
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    pairs = [_pair(tmp_path, n, f"new {n}") for n in ("a", "new", "b")]
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "b" and Path(src).name.endswith(".new.tmp"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output error"):
        install(pairs, stale=[tmp_path / "stale"])
    after = {p.name: p.read_text() for p in tmp_path.iterdir() if not p.name.endswith(".tmp")}
    assert after == before  # a back, the new name gone, stale kept
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".a.")]  # no backup left


def test_staged_files_leave_nothing_when_the_body_fails(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(RuntimeError), StagedFiles() as staged:
        staged.write_text(out / "one.json", "{}")
        staged.write_bytes(out / "two.bin", b"\0")
        raise RuntimeError("before the renames")
    assert list(tmp_path.iterdir()) == []


def test_staged_files_install_with_plain_open_permissions(tmp_path):
    out = tmp_path / "out"
    with StagedFiles() as staged:
        staged.write_text(out / "one.json", "{}")
        tmp = staged.path(out / "dropped.png")
        assert tmp.exists()
        staged.drop(out / "dropped.png")
        staged.install()
    assert sorted(p.name for p in out.iterdir()) == ["one.json"]
    mode = (out / "one.json").stat().st_mode & 0o777
    assert mode == 0o666 & ~outputs.current_umask()
