"""advedge.export.runtime (runners), advedge bench and advedge report (CPU; TensorRT only via the double)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from advedge.export.onnx_export import export_onnx
from advedge.export.runtime.base import RunnerInfo, artifact_kind, open_runner
from advedge.export.runtime.latency import latency_stats
from advedge.export.runtime.transfer import load_transfer_set
from conftest import argv, robust_flags, run_bench
from fakes.artifacts import classifier_artifacts, tiny_classifier

from advedge.cli import main
from advedge.errors import ExportError, MissingDependencyError, UsageError

PNG = b"\x89PNG\r\n\x1a\n"
QUICK = {"warmup": "1", "iters": "1"}  # one untimed call (the least bench takes): checks matter


def _bench_json(capsys: pytest.CaptureFixture[str], *args: object, **options: object) -> dict:
    """:func:`conftest.run_bench` with ``--json``, which must exit 0; returns the JSON it printed."""
    rc = run_bench(*args, json=True, **options)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return json.loads(captured.out)


@pytest.fixture(scope="module")
def arts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        out[f"run_{name}"], out[f"onnx_{name}"] = classifier_artifacts(root, name, seed)
    return out


def test_artifact_kind_and_backend_choice(arts, tmp_path):
    assert artifact_kind(arts["onnx_a"]) == "onnx"
    assert artifact_kind(arts["run_a"]) == "checkpoint"
    with pytest.raises(ExportError, match="not found"):
        artifact_kind(tmp_path / "nope.onnx")
    (tmp_path / "m.pt").write_bytes(b"x")
    with pytest.raises(ExportError, match=r"unknown artifact type \.pt"):
        artifact_kind(tmp_path / "m.pt")
    with pytest.raises(UsageError) as err:
        open_runner(arts["onnx_a"], backend="torch")
    assert "backend torch runs checkpoints, and a.fp32.onnx is an ONNX model" in str(err.value)
    assert "onnxruntime" in err.value.hint and "torch" not in err.value.hint
    with pytest.raises(MissingDependencyError, match="CUDAExecutionProvider"):
        open_runner(arts["onnx_a"], backend="onnxruntime-cuda")
    with pytest.raises(MissingDependencyError, match="CUDA graphs"):
        open_runner(arts["run_a"], backend="torch-cudagraph", device="cpu")


def test_torch_and_onnx_runners_agree_and_split_stages(arts):
    x = np.random.default_rng(0).random((6, 3, 32, 32), dtype=np.float32)
    t = open_runner(arts["run_a"], device="cpu")
    o = open_runner(arts["onnx_a"])
    assert np.abs(t.run(x) - o.run(x)).max() < 1e-4
    _, times = t.timed(x)
    assert {"h2d_s", "compute_s", "d2h_s", "total_s"} <= set(times)
    assert times["total_s"] >= times["compute_s"] > 0
    assert o.info.backend == "onnxruntime" and o.info.size_bytes > 0


def test_runner_info_says_where_it_computes_and_whether_it_has_gradients(arts):
    from advedge.utils import sha256_file

    t, o = open_runner(arts["run_a"], device="cpu"), open_runner(arts["onnx_a"])
    assert (t.info.backend, t.info.device, t.info.gradients, t.info.host_compute) == (
        "torch",
        "cpu",
        True,
        True,
    )
    assert (o.info.backend, o.info.device, o.info.gradients, o.info.host_compute) == (
        "onnxruntime",
        "cpu",
        False,
        True,
    )
    assert t.info.source_sha256 == o.info.source_sha256  # a checkpoint is its own source
    assert o.info.source_sha256 == sha256_file(arts["run_a"] / "model.safetensors")
    assert t.info.input_shape == o.info.input_shape == (3, 32, 32)
    assert o.info.batch_range == t.info.batch_range == (1, None)
    o.providers = ["CUDAExecutionProvider"]  # as --backend onnxruntime-cuda opens it
    assert (o.describe().backend, o.describe().host_compute) == ("onnxruntime-cuda", False)


def test_latency_stats_formulas():
    s = latency_stats([0.001, 0.002, 0.003, 0.004], batch=8)
    assert s["mean_ms"] == pytest.approx(2.5)
    assert s["p50_ms"] == pytest.approx(2.5)
    assert s["images_per_s"] == pytest.approx(8 / 0.0025)
    assert s["cv"] == pytest.approx(np.std([1, 2, 3, 4]) / 2.5, rel=1e-3)


def test_bench_cli_latency_accuracy_files(arts, tiny_npz_data, tmp_path, capsys):
    out = tmp_path / "b"
    doc = _bench_json(
        capsys,
        [arts["onnx_a"], arts["run_a"]],
        tiny_npz_data,
        batch_sizes="1,4",
        warmup="2",
        iters="5",
        n="32",
        out=str(out),
    )
    assert doc["schema"] == "advedge.bench/2" and doc["environment"]["cpu"]
    onnx_r, torch_r = doc["results"]
    assert onnx_r["backend"] == "onnxruntime" and torch_r["backend"] == "torch"
    assert onnx_r["clean_acc"] == torch_r["clean_acc"]  # the same model, run two ways
    for r in doc["results"]:
        assert [lat["batch"] for lat in r["latency"]] == [1, 4]
        for lat in r["latency"]:
            assert lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] and lat["iters"] == 5
    assert json.loads((out / "bench.json").read_text())["results"][0]["name"] == "a.fp32.onnx"
    with open(out / "bench.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4


def test_bench_robust_transfer_query_and_worst_case(arts, tiny_npz_data, tmp_path, capsys):
    out = tmp_path / "r"
    doc = _bench_json(
        capsys,
        arts["onnx_a"],
        tiny_npz_data,
        batch_sizes="8",
        warmup="1",
        iters="2",
        n="24",
        **robust_flags(arts["run_a"], 12, 30, 3),
        out=str(out),
    )
    r = doc["results"][0]
    rob = r["robust"]
    kinds = {a["name"]: a["kind"] for a in rob["attacks"]}
    # eval --suite standard's attacks and CW, crafted on the FP32 parent; APGD on the
    # artifact's replica; Square on the artifact
    assert kinds == {
        "apgd-ce": "transfer",
        "apgd-t": "transfer",
        "square": "transfer",
        "cw": "transfer",
        "apgd-ce-artifact": "white-box-artifact",
        "apgd-t-artifact": "white-box-artifact",
        "square-query": "query",
    }
    assert [a["name"] for a in rob["attacks"]][:3] == ["apgd-ce", "apgd-t", "square"]  # as run
    square = next(a for a in rob["attacks"] if a["name"] == "square-query")
    assert square["n"] == 12 and rob["worst_case_n"] == 12 and square["budget"] == "30 queries"
    assert rob["worst_case_acc"] == square["robust_acc"]  # cumulative: after everything
    assert rob["worst_case_acc"] <= rob["worst_case_transfer_acc"] <= r["clean_acc"]
    assert rob["worst_case_transfer_acc"] <= min(
        a["robust_acc"] for a in rob["attacks"] if a["kind"] == "transfer"
    )
    # every accuracy with its 95% Wilson interval around it, and the flags behind them
    for acc, ci in [
        (r["clean_acc"], r["clean_acc_ci95"]),
        (rob["worst_case_acc"], rob["worst_case_acc_ci95"]),
        *((a["robust_acc"], a["robust_acc_ci95"]) for a in rob["attacks"]),
    ]:
        assert ci[0] <= acc <= ci[1] and ci[1] - ci[0] > 0.05
    assert len(r["clean_flags"]) == 24 and r["clean_flags"].count("1") / 24 == r["clean_acc"]
    assert rob["worst_case_flags"].count("1") / 12 == rob["worst_case_acc"]
    assert all(a <= b for a, b in zip(rob["worst_case_flags"], r["clean_flags"], strict=False))
    tm = doc["threat_model"]
    assert tm["eps_text"] == "8/255" and tm["n"] == 24 and tm["query_n"] == 12
    assert [a["name"] for a in tm["transfer"]] == ["apgd-ce", "apgd-t", "square", "cw"]
    assert "apgd-t (9 target classes x 3 iterations)" in tm["summary"], tm["summary"]
    (tset,) = out.glob("transfer-*.npz")
    x, y, advs, meta = load_transfer_set(tset)
    assert list(advs) == ["apgd-ce", "apgd-t", "square", "cw"] and meta["n"] == 24
    assert meta["schema"] == "advedge.transfer-set/2" and meta["recipe"]["n_iter"] == 3
    survived = meta["source_survived"]
    assert survived.dtype == bool and survived.shape == (24,)
    for adv in advs.values():
        assert np.abs(adv - x).max() <= 8 / 255 + 1e-6
    # the first 24 test images in their official order, as advedge eval --n 24 takes them
    with np.load(tiny_npz_data / "test.npz") as z:
        np.testing.assert_array_equal(y, z["y"][:24])
    # the same set evaluated without crafting (as on a device without torch)
    again = _bench_json(
        capsys,
        arts["onnx_a"],
        tiny_npz_data,
        batch_sizes="8",
        n="24",
        transfer_set=str(tset),
        query_n="4",
        n_queries="5",
        **QUICK,
    )["results"][0]["robust"]
    assert again["worst_case_transfer_acc"] == rob["worst_case_transfer_acc"]


def test_bench_refuses_a_transfer_set_of_another_model_or_tampered(
    arts, tiny_npz_data, tmp_path, capsys
):
    out = tmp_path / "r"
    assert (
        run_bench(
            arts["onnx_a"],
            tiny_npz_data,
            batch_sizes="8",
            n="16",
            **robust_flags(arts["run_a"], 2, 2, 3),
            out=str(out),
            **QUICK,
        )
        == 0
    )
    capsys.readouterr()
    (tset,) = out.glob("transfer-*.npz")
    rc = run_bench(
        arts["onnx_b"], tiny_npz_data, n="16", batch_sizes="8", transfer_set=str(tset), **QUICK
    )
    err = capsys.readouterr().err
    assert rc == 1 and "crafted on another model" in err
    with np.load(tset) as z:
        data = {k: z[k] for k in z.files}
    data["adv_cw"] = np.clip(data["adv_cw"] + 0.01, 0, 1)
    np.savez(tmp_path / "tampered.npz", **data)
    rc = run_bench(
        arts["onnx_a"],
        tiny_npz_data,
        n="16",
        batch_sizes="8",
        transfer_set=str(tmp_path / "tampered.npz"),
        **QUICK,
    )
    assert rc == 1 and "sha256" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--artifact", "missing.onnx"], 1, "artifact not found"),
        (["--batch-sizes", "1,x"], 2, "comma-separated integers"),
        (["--robust"], 2, "--robust needs --model"),
        (["--backend", "onnxruntime-cuda"], 3, "CUDAExecutionProvider"),
    ],
)
def test_bench_bad_input(arts, tiny_npz_data, tmp_path, capsys, args, code, needle):
    base = ["bench", "--data", str(tiny_npz_data), "--out", str(tmp_path / "o")]
    if "--artifact" not in args:
        base += ["--artifact", str(arts["onnx_a"])]
    rc = main([*base, *args])
    err = capsys.readouterr().err
    assert rc == code and needle in err
    assert not (tmp_path / "o" / "bench.json").exists()


def test_bench_refuses_data_of_another_shape(arts, npz_dataset_factory, capsys):
    gray = npz_dataset_factory("gray", size=28, channels=1)
    rc = main(argv("bench", artifact=str(arts["onnx_a"]), data=str(gray)))
    err = capsys.readouterr().err
    assert rc == 1 and "[1, 28, 28]" in err and "[3, 32, 32]" in err


def test_bench_engine_through_the_tensorrt_double_times_stages(
    arts, tiny_npz_data, monkeypatch, tmp_path, capsys
):
    from advedge.export.tensorrt import BatchProfile, build_engine
    from fakes import install_fake_tensorrt

    install_fake_tensorrt(monkeypatch, version="11.2.0")
    build = build_engine(
        arts["onnx_a"], tmp_path, name="a", precision="fp32", profile=BatchProfile(1, 4, 8)
    )
    info = json.loads(build.sidecar.read_text())
    info["artifact"] = {"kind": "classifier", "input_shape": [3, 32, 32]}
    build.sidecar.write_text(json.dumps(info))
    doc = _bench_json(
        capsys, build.engine, tiny_npz_data, batch_sizes="1,8,16", warmup="1", iters="3", n="16"
    )
    r = doc["results"][0]
    assert r["backend"] == "tensorrt"
    lat = {lat["batch"]: lat for lat in r["latency"]}
    assert set(lat[1]["stages_ms"]) == {"h2d", "compute", "d2h"}
    assert "outside the engine's profile" in lat[16]["skipped"]
    onnx_acc = json.loads(json.dumps(r))["clean_acc"]
    assert 0.0 <= onnx_acc <= 1.0


def test_bench_bounds_activations_in_host_memory_only_for_host_backends(
    arts, tiny_npz_data, monkeypatch, tmp_path, capsys
):
    """Batch 256 with 64 MiB available: ~200 MB of activations on ONNX Runtime's CPU provider is
    refused before it runs; a TensorRT engine (the double) keeps its activations on the device,
    so only its ~9 MB of host input arrays count and it runs."""
    from advedge.export.runtime import bench as bench_mod
    from advedge.export.tensorrt import BatchProfile, build_engine
    from fakes import install_fake_tensorrt

    install_fake_tensorrt(monkeypatch, version="11.2.0")
    build = build_engine(
        arts["onnx_a"], tmp_path, name="a", precision="fp32", profile=BatchProfile(1, 256, 256)
    )
    monkeypatch.setattr(bench_mod, "available_memory", lambda: 64 * 2**20)
    common = {
        "data": str(tiny_npz_data),
        "batch_sizes": "256",
        "warmup": "1",
        "iters": "1",
        "n": "16",
        "json": True,
    }
    capsys.readouterr()
    assert main(argv("bench", artifact=str(build.engine), **common)) == 0, capsys.readouterr().err
    doc = json.loads(capsys.readouterr().out)
    assert doc["results"][0]["latency"][0]["batch"] == 256
    rc = main(argv("bench", artifact=str(arts["onnx_a"]), **common))
    err = capsys.readouterr().err
    assert rc == 2 and "batch size 256" in err and "on onnxruntime (cpu)" in err, err


def test_purifier_run_is_the_white_box_parent_of_fused_artifacts(
    arts, tiny_npz_data, tmp_path, capsys
):
    from advedge.models.purified import Purified
    from advedge.purifier import save_purifier
    from advedge.purifier.networks import Generator
    from advedge.utils import sha256_file

    clf = arts["run_a"] / "model.safetensors"
    torch.manual_seed(3)
    gen = Generator(3, 4, eps_r=10 / 255).eval()
    pur = tmp_path / "purifier_run"
    pur.mkdir()
    save_purifier(
        gen,
        pur / "purifier.safetensors",
        metadata={
            "input_shape": [3, 32, 32],
            "classifier": {"path": str(clf), "sha256": sha256_file(clf)},
        },
    )
    source = {"purifier": sha256_file(pur / "purifier.safetensors"), "classifier": sha256_file(clf)}
    fused = export_onnx(
        Purified(gen, tiny_classifier(0)),
        tmp_path / "fused.fp32.onnx",
        input_shape=(3, 32, 32),
        metadata={
            "kind": "fused",
            "precision": "fp32",
            "input_shape": [3, 32, 32],
            "source_sha256": source,
        },
    )
    bench = tmp_path / "bench"
    rc = run_bench(
        [pur, fused],
        tiny_npz_data,
        batch_sizes="4",
        warmup="1",
        iters="2",
        n="16",
        robust=True,
        model=str(arts["run_a"]),
        purifier=str(pur),
        n_queries="3",
        n_iter="2",
        out=str(bench),
    )
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    doc = json.loads((bench / "bench.json").read_text())
    parent, onnx_row = doc["results"]
    assert parent["kind"] == "fused" and parent["robust"]["white_box"] is True
    assert onnx_row["robust"]["white_box"] is False
    assert parent["clean_acc"] == onnx_row["clean_acc"]  # the same f(G(x)), run two ways
    assert main(["report", str(bench), "--out", str(tmp_path / "rep"), "--json"]) == 0
    (ships,) = json.loads(capsys.readouterr().out)["robustness_of_what_ships"]
    assert (
        ships["artifact"] == "fused.fp32.onnx"
        and ships["parent"] == "purifier_run"
        and ships["purifier"]
    )
    # a purifier whose classifier moved is one clear error
    (tmp_path / "moved").mkdir()
    save_purifier(
        gen,
        tmp_path / "moved" / "purifier.safetensors",
        metadata={"classifier": {"path": str(tmp_path / "gone.safetensors"), "sha256": "0"}},
    )
    rc = main(argv("bench", artifact=str(tmp_path / "moved"), data=str(tiny_npz_data)))
    assert rc == 1 and "not at" in capsys.readouterr().err


def test_one_label_per_artifact():
    from advedge.export.runtime.labels import artifact_label, unique_labels

    onnx = RunnerInfo(backend="onnxruntime", precision="int8", model="resnet8")
    fused = RunnerInfo(backend="torch", precision="fp32", kind="fused", model="resnet8")
    unknown = RunnerInfo(backend="tensorrt")
    assert artifact_label(onnx, "a.int8") == "resnet8 int8 onnxruntime"
    assert artifact_label(fused, "purifier") == "purifier+resnet8 fp32 torch"
    assert artifact_label(unknown, "m") == "m unknown-precision tensorrt"
    # two artifacts that share a label are told apart by their file names; others keep theirs
    assert unique_labels(["x", "x", "y"], ["a.onnx", "b.onnx", "c.onnx"]) == [
        "x (a.onnx)",
        "x (b.onnx)",
        "y",
    ]
