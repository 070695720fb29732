"""advedge bench and advedge report under a red team's inputs: every option, input and output is
checked before any timing run or crafted attack, a failure leaves nothing behind and prints one
line, an earlier output is replaced only with --overwrite and one writer holds an output."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from advedge.export.runtime import bench as bench_mod
from advedge.export.runtime import robust as robust_mod
from advedge.export.runtime.base import RunnerInfo
from advedge.export.runtime.bench import BenchOptions
from advedge.export.runtime.transfer import load_transfer_set, save_transfer_set
from conftest import argv
from fakes.artifacts import classifier_artifacts
from onnx import TensorProto, helper, numpy_helper

from advedge import outputs
from advedge.cli import main
from advedge.errors import ExportError, UsageError
from advedge.locks import output_lock
from advedge.utils import sha256_file

MAIN = "import sys; from advedge.cli import main; sys.exit(main(sys.argv[1:]))"


# ------------------------------------------------------------------------------ helpers
def _onnx(
    path: Path,
    *,
    batch: int | str = "N",
    classes: int = 10,
    dtype: int = TensorProto.FLOAT,
    nan: bool = False,
    loop: bool = False,
) -> Path:
    """A small linear classifier on 3x32x32 images, written with onnx.helper.

    It holds an unused initializer, which ONNX Runtime reports as a warning (ANSI coloured, on
    stderr) unless its log severity is raised to errors.
    """
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.01, (3072, classes)).astype(np.float32), "W"),
        numpy_helper.from_array(np.full(classes, np.nan if nan else 0.0, np.float32), "b"),
        numpy_helper.from_array(np.zeros(3, np.float32), "unused"),
    ]
    nodes = []
    src = "x"
    if dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
        src = "xf"
    nodes += [
        helper.make_node("Flatten", [src], ["f"]),
        helper.make_node("MatMul", ["f", "W"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["z" if loop else "logits"]),
    ]
    if loop:  # a Loop whose trip count is 2**62 and whose condition stays true: never ends
        inits += [
            numpy_helper.from_array(np.array(2**62, np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "keep_going"),
            numpy_helper.from_array(np.array(0.0, np.float32), "v0"),
        ]
        body = helper.make_graph(
            [
                helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                helper.make_node("Identity", ["v_in"], ["v_out"]),
            ],
            "body",
            [
                helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                helper.make_tensor_value_info("v_in", TensorProto.FLOAT, []),
            ],
            [
                helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                helper.make_tensor_value_info("v_out", TensorProto.FLOAT, []),
            ],
        )
        nodes += [
            helper.make_node("Loop", ["trips", "keep_going", "v0"], ["v"], body=body),
            helper.make_node("Add", ["z", "v"], ["logits"]),
        ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", dtype, [batch, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _bench_args(artifact: Path, data: Path, out: Path | None = None, **kw: object) -> list[str]:
    opts: dict[str, object] = {
        "artifact": str(artifact),
        "data": str(data),
        "batch_sizes": "8",
        "warmup": "1",
        "iters": "1",
        "n": "16",
    }
    if out is not None:
        opts["out"] = str(out)
    opts.update(kw)
    return argv("bench", **opts)


def _robust(model: object) -> dict[str, object]:
    """The --robust flags: sets crafted on ``model`` with two APGD iterations, a two-query
    Square on two images."""
    return {"robust": True, "model": str(model), "query_n": "2", "n_queries": "2", "n_iter": "2"}


def _bench_json(
    folder: Path, *, name: str = "a.fp32.onnx", device: str = "cpu", p50: float = 1.0
) -> Path:
    """A bench directory with a hand-written bench.json of one robust row."""
    folder.mkdir(parents=True)
    doc = {
        "schema": "advedge.bench/1",
        "environment": {"cpu": device},
        "results": [
            {
                "name": name,
                "kind": "classifier",
                "precision": "fp32",
                "backend": "onnxruntime",
                "bytes": 1000,
                "clean_acc": 0.5,
                "latency": [{"batch": 1, "p50_ms": p50, "p99_ms": 2 * p50, "images_per_s": 100.0}],
                "robust": {
                    "attacks": [{"kind": "transfer"}, {"kind": "query"}],
                    "worst_case_acc": 0.1,
                    "worst_case_transfer_acc": 0.2,
                    "white_box": False,
                    "source_sha256": "abc",
                },
            }
        ],
    }
    (folder / "bench.json").write_text(json.dumps(doc))
    return folder


def _one_line(err: str) -> str:
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err!r}"
    return lines[0]


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) any timing run, crafted transfer set or query attack."""
    calls: list[str] = []

    def refuse(what: str):
        def fn(*args: object, **kwargs: object) -> None:
            calls.append(what)
            raise RuntimeError(f"{what} ran before the checks")

        return fn

    monkeypatch.setattr(bench_mod, "measure_latency", refuse("timing"))
    monkeypatch.setattr(bench_mod, "craft_transfer_set", refuse("crafting"))
    monkeypatch.setattr(robust_mod, "query_attack", refuse("query"))
    return calls


@pytest.fixture(scope="module")
def linear(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("linear")
    return {
        "ok": _onnx(root / "ok.onnx"),
        "fixed": _onnx(root / "fixed.onnx", batch=1),
        "uint8": _onnx(root / "uint8.onnx", dtype=TensorProto.UINT8),
        "nan": _onnx(root / "nan.onnx", nan=True),
        "five": _onnx(root / "five.onnx", classes=5),
        "loop": _onnx(root / "loop.onnx", loop=True),
    }


@pytest.fixture(scope="module")
def arts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny_cnn run directory and its FP32 ONNX export."""
    run, onnx_path = classifier_artifacts(tmp_path_factory.mktemp("arts"))
    return {"run": run, "onnx": onnx_path}


@pytest.fixture(scope="module")
def genuine(arts: dict[str, Path], tiny_npz_data: Path, tmp_path_factory) -> Path:
    """A bench --out holding a genuine transfer set of 16 test images (and bench.json)."""
    out = tmp_path_factory.mktemp("genuine") / "out"
    args = _bench_args(
        arts["onnx"],
        tiny_npz_data,
        out,
        **_robust(str(arts["run"])),
    )
    assert main(args) == 0
    return out


def _the_set(folder: Path) -> Path:
    (tset,) = folder.glob("transfer-*.npz")
    return tset


# ------------------------------------------------------------------------------ 1. one writer
def _refused_while_locked(out: Path, args: list[str]) -> None:
    """``advedge <args>`` in another process, while this one holds ``out``'s lock: one line."""
    with output_lock(out):
        res = subprocess.run(
            [sys.executable, "-c", MAIN, *args], capture_output=True, text=True, timeout=300
        )
    assert res.returncode == 1, res.stderr
    assert "being written by another advedge process" in _one_line(res.stderr)
    assert not out.exists()


def test_a_second_bench_writer_is_refused_with_one_line(linear, tiny_npz_data, tmp_path):
    out = tmp_path / "out"
    _refused_while_locked(out, _bench_args(linear["ok"], tiny_npz_data, out))


def test_a_second_report_writer_is_refused_with_one_line(tmp_path):
    bench = _bench_json(tmp_path / "bench")
    out = tmp_path / "report"
    _refused_while_locked(out, ["report", str(bench), "--out", str(out)])


# ------------------------------------------------------------------------------ 2. overwrite
def test_bench_refuses_to_overwrite_bench_json_without_overwrite(
    linear, tiny_npz_data, tmp_path, capsys
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "bench.json").write_text("earlier\n")
    rc = main(_bench_args(linear["ok"], tiny_npz_data, out))
    line = _one_line(capsys.readouterr().err)
    assert rc == 1 and "bench.json" in line and "--overwrite" in line
    assert (out / "bench.json").read_text() == "earlier\n"
    assert main(_bench_args(linear["ok"], tiny_npz_data, out, overwrite=True)) == 0
    assert json.loads((out / "bench.json").read_text())["schema"] == "advedge.bench/2"


def test_report_refuses_to_overwrite_report_md_without_overwrite(tmp_path, capsys):
    bench = _bench_json(tmp_path / "bench")
    out = tmp_path / "report"
    assert main(["report", str(bench), "--out", str(out)]) == 0
    capsys.readouterr()
    (out / "report.md").write_text("earlier\n")
    rc = main(["report", str(bench), "--out", str(out)])
    line = _one_line(capsys.readouterr().err)
    assert rc == 1 and "report.md" in line and "--overwrite" in line
    assert (out / "report.md").read_text() == "earlier\n"
    assert main(["report", str(bench), "--out", str(out), "--overwrite"]) == 0
    assert (out / "report.md").read_text().startswith("# advedge report")


# ------------------------------------------------------------------------------ 3. bad --out
@pytest.mark.parametrize("command", ["bench", "report"])
@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_out_that_is_a_file_or_lies_under_one_is_named_before_any_work(
    linear, tiny_npz_data, tmp_path, capsys, no_work, command, where
):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker if where == "a file" else blocker / "sub" / "out"
    if command == "bench":
        rc = main(_bench_args(linear["ok"], tiny_npz_data, out))
    else:
        rc = main(["report", str(_bench_json(tmp_path / "bench")), "--out", str(out)])
    line = _one_line(capsys.readouterr().err)
    assert rc == 2, line
    assert ("is a file" if where == "a file" else "lies under") in line and "unexpected" not in line
    assert no_work == [] and blocker.read_text() == "x"


@pytest.mark.parametrize("command", ["bench", "report"])
def test_a_read_only_out_is_named_before_any_work(
    linear, tiny_npz_data, tmp_path, capsys, no_work, command, read_only
):
    bench = _bench_json(tmp_path / "bench")
    ro = tmp_path / "ro"
    read_only(ro)
    for out in (ro, ro / "new"):
        if command == "bench":
            rc = main(_bench_args(linear["ok"], tiny_npz_data, out))
        else:
            rc = main(["report", str(bench), "--out", str(out)])
        line = _one_line(capsys.readouterr().err)
        assert rc == 1 and f"cannot write {out}" in line, line
        assert "unexpected" not in line
    assert list(ro.iterdir()) == []
    assert no_work == []


# ------------------------------------------------------------------------------ 4. bad artifacts
@pytest.mark.parametrize(
    ("kind", "code", "needle"),
    [
        ("fixed", 2, "takes batches of 1 only"),
        ("uint8", 1, "takes tensor(uint8) input"),
    ],
)
def test_a_bad_onnx_is_refused_before_any_timing(
    linear, tiny_npz_data, tmp_path, capsys, no_work, kind, code, needle
):
    out = tmp_path / "out"
    rc = main(_bench_args(linear[kind], tiny_npz_data, out))
    line = _one_line(capsys.readouterr().err)
    assert rc == code and needle in line, line
    assert no_work == [] and not out.exists()


def test_an_onnx_with_an_endless_loop_is_refused_not_run(linear, tiny_npz_data, tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-c", MAIN, *_bench_args(linear["loop"], tiny_npz_data, out)],
        capture_output=True,
        text=True,
        timeout=120,  # before the fix this never returned
    )
    line = _one_line(res.stderr)
    assert res.returncode == 1 and "control flow" in line and "Loop" in line, line
    assert not out.exists()


def test_a_fixed_batch_onnx_is_timed_at_its_batch_and_attacked(
    linear, genuine, tiny_npz_data, tmp_path, capsys
):
    rc = main(
        _bench_args(
            linear["fixed"],
            tiny_npz_data,
            batch_sizes="1,8",
            transfer_set=str(_the_set(genuine)),
            query_n="3",
            n_queries="2",
            json=True,
        )
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    (r,) = json.loads(captured.out)["results"]
    one, eight = r["latency"]
    assert one["batch"] == 1 and one["iters"] == 1
    assert eight["batch"] == 8 and "outside the graph's batch size 1-1" in eight["skipped"]
    assert r["n"] == 16 and r["robust"]["worst_case_n"] == 3


# ------------------------------------------------------------------------------ 4/5. transfer sets
def _variant(genuine: Path, tmp_path: Path, kind: str) -> Path:
    """A bad copy of the genuine set; most are re-hashed, as a forger would."""
    src = _the_set(genuine)
    dst = tmp_path / f"{kind}.npz"
    if kind == "truncated":
        data = src.read_bytes()
        dst.write_bytes(data[: len(data) // 2])
        return dst
    if kind == "not an npz":
        dst.write_bytes(b"this is not a zip archive\n" * 20)
        return dst
    with np.load(src) as z:
        arrays = {k: z[k] for k in z.files}
    if kind == "sha256 mismatch":  # edited, hash left as it was
        arrays["adv_cw"] = np.clip(arrays["adv_cw"] + 0.01, 0, 1)
        np.savez(dst, **arrays)
        return dst
    if kind == "wrong keys":
        arrays["images"] = arrays.pop("x")
        np.savez(dst, **arrays)
        return dst
    meta = json.loads(str(arrays["meta"]))
    x, y = arrays["x"], arrays["y"]
    advs = {a: arrays[f"adv_{a}"] for a in meta["attacks"]}
    if kind == "wrong shapes":
        advs["cw"] = advs["cw"][:, :, :16, :16].copy()
    elif kind == "wrong dtype":
        advs = {a: v.astype(np.float64) for a, v in advs.items()}
    elif kind == "nan":
        advs["cw"][3, 0, 0, 0] = np.nan
    elif kind == "labels out of range":
        y = y.copy()
        y[0] = 10
    elif kind == "equal to clean":
        advs = {a: x.copy() for a in advs}
    elif kind == "outside eps":
        advs["apgd-ce"] = np.clip(x + 0.1, 0, 1).astype(np.float32)
    elif kind == "scaled x300":
        advs["cw"] = (advs["cw"] * 300).astype(np.float32)
    else:
        raise AssertionError(kind)
    save_transfer_set(dst, x, y, advs, meta)  # a recomputed sha256
    return dst


BAD_SETS = [
    ("truncated", "unreadable transfer set"),
    ("not an npz", "unreadable transfer set"),
    ("wrong keys", "lacks x"),
    ("sha256 mismatch", "does not match its sha256"),
    ("wrong shapes", "not float32 [16, 3, 32, 32]"),
    ("wrong dtype", "float64"),
    ("nan", "1 of 16 cw images hold NaN or inf"),
    ("labels out of range", "1 of 16 labels lie outside [0, 10)"),
    ("equal to clean", "every adversarial image equals its clean image"),
    ("outside eps", "16 of 16 apgd-ce images lie outside the eps ball"),
    ("scaled x300", "cw images leave the pixel range [0, 1]"),
]


@pytest.mark.parametrize(("kind", "needle"), BAD_SETS, ids=[k for k, _ in BAD_SETS])
def test_a_bad_transfer_set_is_refused_before_any_timing(
    linear, genuine, tiny_npz_data, tmp_path, capsys, no_work, kind, needle
):
    tset = _variant(genuine, tmp_path, kind)
    out = tmp_path / "out"
    rc = main(
        _bench_args(
            linear["ok"], tiny_npz_data, out, transfer_set=str(tset), n_queries="2", query_n="2"
        )
    )
    line = _one_line(capsys.readouterr().err)
    assert rc == 1 and needle in line and "unexpected" not in line, line
    assert no_work == [] and not out.exists()


@pytest.mark.parametrize(("kind", "needle"), BAD_SETS[4:], ids=[k for k, _ in BAD_SETS[4:]])
def test_load_transfer_set_checks_what_a_rehashed_set_holds(genuine, tmp_path, kind, needle):
    # the labels need the data's class count; everything else is checked on the set alone
    kw = {"num_classes": 10} if kind == "labels out of range" else {}
    with pytest.raises(ExportError, match=re.escape(needle)):
        load_transfer_set(_variant(genuine, tmp_path, kind), **kw)


def test_a_cached_transfer_set_in_out_is_checked_too(
    arts, genuine, tiny_npz_data, tmp_path, capsys, no_work
):
    out = tmp_path / "out"
    shutil.copytree(genuine, out)
    before = (out / "bench.json").read_text()
    tset = _the_set(out)
    bad = _variant(genuine, tmp_path, "scaled x300")
    shutil.copyfile(bad, tset)
    rc = main(
        _bench_args(
            arts["onnx"],
            tiny_npz_data,
            out,
            **_robust(str(arts["run"])),
            overwrite=True,
        )
    )
    line = _one_line(capsys.readouterr().err)
    assert rc == 1 and "leave the pixel range" in line, line
    assert no_work == [] and (out / "bench.json").read_text() == before


# ------------------------------------------------------------------------------ 6. --robust options
@pytest.mark.parametrize(
    ("case", "code", "needle"),
    [
        ("query-n 0", 2, "--query-n must lie in"),
        ("n-queries 0", 2, "--n-queries must lie in"),
        ("model missing", 1, "checkpoint not found"),
        ("model not a checkpoint", 1, "not a readable safetensors file"),
    ],
)
def test_bad_robust_options_leave_no_transfer_set(
    arts, tiny_npz_data, tmp_path, capsys, monkeypatch, no_work, case, code, needle
):
    monkeypatch.chdir(tmp_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    kw: dict[str, object] = {
        "robust": True,
        "model": str(arts["run"]),
        "query_n": "2",
        "n_queries": "2",
    }
    if case == "query-n 0":
        kw["query_n"] = "0"
    elif case == "n-queries 0":
        kw["n_queries"] = "0"
    elif case == "model missing":
        kw["model"] = str(tmp_path / "nowhere")
    else:
        kw["model"] = str(junk)
    out = tmp_path / "out"
    rc = main(_bench_args(arts["onnx"], tiny_npz_data, out, **kw))
    line = _one_line(capsys.readouterr().err)
    assert rc == code and needle in line, line
    assert no_work == [] and not out.exists()
    assert list(tmp_path.rglob("transfer-*.npz")) == []


@pytest.mark.parametrize(
    "failure", [ExportError("the query attack broke"), KeyboardInterrupt()], ids=["error", "ctrl-c"]
)
def test_a_failure_after_crafting_keeps_the_transfer_set_for_the_next_run(
    arts, tiny_npz_data, tmp_path, capsys, monkeypatch, failure
):
    real_measure = bench_mod.measure_robust

    def broken(*args: object, **kwargs: object) -> None:
        raise failure

    monkeypatch.setattr(bench_mod, "measure_robust", broken)  # the attacks on the artifact
    out = tmp_path / "deep" / "out"
    args = _bench_args(
        arts["onnx"],
        tiny_npz_data,
        out,
        **_robust(str(arts["run"])),
    )
    rc = main(args)
    assert rc == (130 if isinstance(failure, KeyboardInterrupt) else 1)
    capsys.readouterr()
    # the crafted set is complete (written atomically) and stays: no bench files, no temporary
    tset = _the_set(out)
    assert sorted(p.name for p in out.iterdir()) == [tset.name]
    load_transfer_set(tset)
    sha = sha256_file(tset)

    # the next run checks it and reuses it: nothing is crafted again
    def no_crafting(*args: object, **kwargs: object) -> None:
        raise AssertionError("the transfer set was crafted again")

    monkeypatch.setattr(bench_mod, "craft_transfer_set", no_crafting)
    monkeypatch.setattr(bench_mod, "measure_robust", real_measure)
    assert main(args) == 0, capsys.readouterr().err
    assert sha256_file(tset) == sha
    doc = json.loads((out / "bench.json").read_text())
    assert doc["results"][0]["robust"]["transfer_set"]["path"] == str(tset)


def test_a_failure_before_crafting_leaves_no_folder(arts, tiny_npz_data, tmp_path, capsys):
    out = tmp_path / "deep" / "out"
    rc = main(
        _bench_args(
            arts["onnx"],
            tiny_npz_data,
            out,
            **_robust(str(tmp_path / "nowhere")),
        )
    )
    assert rc == 1 and "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "deep").exists()


def _files(folder: Path) -> dict[str, bytes]:
    """Every entry of ``folder`` (hidden ones included) with its content."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _fail_writing(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """A full disk while the new ``name`` is staged: after the files staged before it."""
    real = outputs.StagedFiles.write_text

    def write_text(self: outputs.StagedFiles, dst: Path, text: str) -> Path:
        if Path(dst).name == name:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(self, dst, text)

    monkeypatch.setattr(outputs.StagedFiles, "write_text", write_text)


def _fail_renaming(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """An I/O error when the new ``name`` is renamed into place: after the renames before it."""
    real = os.replace

    def replace(src: object, dst: object, *args: object, **kwargs: object) -> None:
        if Path(os.fsdecode(dst)).name == name and Path(os.fsdecode(src)).name.startswith("."):
            raise OSError(errno.EIO, os.strerror(errno.EIO), os.fsdecode(src))
        real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("fault", ["while staging", "while renaming"])
def test_bench_overwrite_replaces_csv_and_json_together_or_not_at_all(
    linear, tiny_npz_data, tmp_path, capsys, monkeypatch, fault
):
    out = tmp_path / "out"
    out.mkdir()
    (out / "bench.csv").write_text("earlier csv\n")
    (out / "bench.json").write_text("earlier json\n")
    before = _files(out)
    if fault == "while staging":
        _fail_writing(monkeypatch, "bench.json")  # the CSV is staged already
    else:
        _fail_renaming(monkeypatch, "bench.json")  # the CSV is renamed already: undone
    rc = main(_bench_args(linear["ok"], tiny_npz_data, out, overwrite=True))
    err = capsys.readouterr().err  # the progress of the work done, then the error
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 1 and f"cannot write {out}" in line, err
    assert _files(out) == before  # the earlier pair, whole; no temporary left
    monkeypatch.undo()
    assert main(_bench_args(linear["ok"], tiny_npz_data, out, overwrite=True)) == 0
    assert json.loads((out / "bench.json").read_text())["schema"] == "advedge.bench/2"
    assert (out / "bench.csv").read_text().startswith("artifact,")
    assert sorted(_files(out)) == ["bench.csv", "bench.json"]


@pytest.mark.parametrize("fault", ["while staging", "while renaming"])
def test_report_overwrite_replaces_every_file_together_or_not_at_all(
    tmp_path, capsys, monkeypatch, fault
):
    bench = _bench_json(tmp_path / "bench")
    out = tmp_path / "report"
    out.mkdir()
    for name in ("report.md", "report.json", "pareto.png", "training.png"):
        (out / name).write_text(f"earlier {name}\n")
    before = _files(out)
    if fault == "while staging":
        _fail_writing(monkeypatch, "report.md")  # the plot and report.json are staged already
    else:
        _fail_renaming(monkeypatch, "report.md")  # pareto.png and report.json renamed: undone
    rc = main(["report", str(bench), "--out", str(out), "--overwrite"])
    line = _one_line(capsys.readouterr().err)
    assert rc == 1 and f"cannot write {out}" in line, line
    assert _files(out) == before  # the earlier report, whole (training.png too); no temporary
    monkeypatch.undo()
    assert main(["report", str(bench), "--out", str(out), "--overwrite"]) == 0
    # the earlier training.png, which this report does not draw, goes only after the renames
    assert sorted(_files(out)) == ["pareto.png", "report.json", "report.md"]
    assert (out / "report.md").read_text().startswith("# advedge report")


# ------------------------------------------------------------------------------ 7. outputs
@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("nan", "nan.onnx returned non-finite logits (NaN or inf) for 16 of 16 images"),
        ("five", "five.onnx scores 5 classes but the data has 10"),
    ],
)
def test_nan_logits_and_another_class_count_are_refused(
    linear, tiny_npz_data, tmp_path, capsys, no_work, kind, needle
):
    out = tmp_path / "out"
    rc = main(_bench_args(linear[kind], tiny_npz_data, out))
    line = _one_line(capsys.readouterr().err)
    assert rc == 1 and needle in line, line
    assert no_work == [] and not out.exists()


# ------------------------------------------------------------------------------ 8. limits
def test_batch_sizes_iters_warmup_and_n_are_bounded_before_allocating(
    linear, tiny_npz_data, tmp_path, capsys, no_work, monkeypatch
):
    base = {"artifacts": ["a.onnx"], "data": "d"}
    for bad in (
        {"batch_sizes": [100_000]},
        {"iters": 10**9},
        {"warmup": 10**9},
        {"n": 10**9},
        {"query_n": 10**9},
        {"n_queries": 10**9},
    ):
        with pytest.raises(UsageError):
            BenchOptions(**base, **bad).validate()
    out = tmp_path / "out"
    rc = main(_bench_args(linear["ok"], tiny_npz_data, out, batch_sizes="1,100000"))
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and "batch size 100000 is above the limit" in line, line
    # and by the memory there is: 128 images in flight need more than half of 64 MiB
    monkeypatch.setattr(bench_mod, "available_memory", lambda: 64 * 2**20)
    rc = main(_bench_args(linear["ok"], tiny_npz_data, out, batch_sizes="128"))
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and "more than half of the 0.1 GiB available" in line, line
    assert no_work == [] and not out.exists()


@pytest.mark.parametrize(
    ("backend", "device", "host"),
    [
        ("onnxruntime", "cpu", True),
        ("torch", "cpu", True),
        ("torch-compile", "cpu", True),
        ("torch", "cuda:0", False),
        ("torch-cudagraph", "cuda:0", False),
        ("onnxruntime-cuda", "cuda", False),
        ("onnxruntime-trt", "cuda", False),
        ("tensorrt", "NVIDIA Jetson AGX Orin", False),
    ],
)
def test_activations_are_bounded_on_backends_that_compute_on_the_host_only(
    monkeypatch, backend, device, host
):
    # batch 256 of ImageNet-sized images on a machine with 8 GiB available: activations of
    # ~9.2 GiB on the host are refused; a GPU backend holds only ~0.4 GiB of host input arrays
    monkeypatch.setattr(bench_mod, "available_memory", lambda: 8 * 2**30)
    shape = [3, 224, 224]
    info = RunnerInfo(backend=backend, device=device, host_compute=host)
    art = bench_mod._Art(Path("m"), None, info, step=256)
    if host:
        with pytest.raises(UsageError, match=r"batch size 256 .* more than half of the 8\.0 GiB"):
            bench_mod._check_activations(art, shape)
    else:
        bench_mod._check_activations(art, shape)
    opts = BenchOptions(artifacts=["m"], data="d", batch_sizes=[1, 256], n=1000)
    bench_mod._check_memory(opts, shape, 1000)  # the host arrays fit, whatever the backend
    # and they are bounded for every backend: 4096 images of 224x224, three copies, ~6.9 GiB
    big = BenchOptions(artifacts=["m"], data="d", batch_sizes=[4096], n=1000)
    with pytest.raises(UsageError, match="host input arrays"):
        bench_mod._check_memory(big, shape, 1000)


def test_the_activation_bound_does_not_read_the_machine_when_memory_is_unknown(monkeypatch):
    monkeypatch.setattr(bench_mod, "available_memory", lambda: None)
    info = RunnerInfo(backend="onnxruntime", device="cpu", host_compute=True)
    art = bench_mod._Art(Path("m"), None, info, step=4096)
    bench_mod._check_activations(art, [3, 224, 224])  # nothing to compare with: no refusal


# ------------------------------------------------------------------------------ 9. Markdown
def test_report_escapes_names_written_into_markdown(tmp_path, capsys):
    evil = "evil|cell\n<script>alert(1)</script>![x](http://evil.example/x.png) $\\frac$"
    bench = _bench_json(tmp_path / "bench", name=evil, device="cpu | <b>injected</b>")
    run = tmp_path / "run|x"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,train_loss,test_clean_acc,test_pgd_acc\n1,2,0.3,0.1\n")
    out = tmp_path / "report"
    rc = main(["report", str(bench), str(run), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    md = (out / "report.md").read_text()
    for bad in ("<script", "<b>", "![", "](", "http://"):
        assert bad not in md, bad
    assert "evil\\|cell" in md and "run\\|x" in md
    # every row of a table has as many cell breaks as its header
    for block in md.split("\n\n"):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        counts = {len(re.findall(r"(?<!\\)\|", line)) for line in rows}
        assert len(counts) <= 1, block
    # the plot got the name too, as plain text (no mathtext error from the $)
    assert (out / "pareto.png").stat().st_size > 1000


# ------------------------------------------------------------------------------ 10. one line
@pytest.mark.parametrize(
    ("kind", "extra"), [("uint8", {}), ("nan", {}), ("ok", {"robust": True, "query_n": "0"})]
)
def test_a_failing_bench_prints_exactly_one_line_on_stderr(
    linear, arts, tiny_npz_data, tmp_path, capfd, kind, extra
):
    if extra.get("robust"):
        extra = {**extra, "model": str(arts["run"])}
    rc = main(_bench_args(linear[kind], tiny_npz_data, tmp_path / "out", **extra))
    err = capfd.readouterr().err  # file-descriptor level: ONNX Runtime's C++ log lines too
    assert rc in (1, 2)
    assert _one_line(err).startswith("error: ")
    assert "\x1b[" not in err


def test_warnings_of_the_report_stay_off_stderr(tmp_path):
    # a latency of 0 ms cannot be log-scaled: Matplotlib warns, twice. In a process of its own:
    # pytest would catch the warnings before they reach stderr.
    bench = _bench_json(tmp_path / "bench", p50=0.0)
    res = subprocess.run(
        [sys.executable, "-c", MAIN, "report", str(bench), "--out", str(tmp_path / "r"), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert json.loads(res.stdout)["rows"][0]["p50_b1_ms"] == 0.0
