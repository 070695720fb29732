"""Where advedge's TensorRT-form INT8 graph puts its Q/DQ pairs, next to NVIDIA ModelOpt's.

TensorRT fuses a convolution with its bias, batch norm, ReLU/Clip and a residual Add, and wants
Q/DQ on the inputs of Conv/Gemm/MatMul and on the residual input of such an Add only; NVIDIA
ModelOpt's ONNX PTQ (``modelopt.onnx.quantization.quantize``) is TensorRT's own tool for
placing them. For each model of advedge's registry (random weights: the placement does not
depend on them; ``purified_<model>`` puts an untrained purifier in front, and advedge's FP32
nodes, its output head and the last linear layer, are passed to ModelOpt too) this script

1. exports the FP32 ONNX with advedge's ``export_onnx``;
2. quantises it three ways on the same calibration images (minmax ranges, ModelOpt's ``max``):
   advedge's ``tensorrt`` target (``quantize_qdq``); ONNX Runtime's default placement with the
   same symmetric options (what advedge placed before the TensorRT placement, the ``ort
   default`` column); and, when ModelOpt is reachable, ModelOpt (``high_precision_dtype=fp32``
   so that the graphs differ only in Q/DQ; its ``[onnx]`` extra pulls onnxruntime-gpu and
   cupy, so it runs in its own virtualenv: ``--modelopt-python /path/to/venv/bin/python``,
   or in this interpreter when it imports ``modelopt``);
3. prints, per model, the Q/DQ pair counts and, edge by edge (quantised tensor -> consumer
   node input), what one graph quantises and the other does not, and the largest relative
   difference between the scales of the edges both quantise.

With ``--checkpoint RUN`` (repeatable) it also measures clean accuracy on the CIFAR-10 test set
of the trained model in FP32, INT8 with ONNX Runtime's default placement and INT8 with
advedge's TensorRT placement (entropy calibration on ``--calib-n`` stratified training images,
as ``advedge export`` does; INT8 run with basic graph optimisations only, i.e. exact fake
quantisation, the arithmetic TensorRT performs).

    python benchmarks/qdq_placement.py --modelopt-python /tmp/mo/bin/python \
        --checkpoint runs/distill_medium/resnet8_natural

Writes ``benchmarks/results/qdq_placement{tag}.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from _common import DATA, stamp, write_results

MODELS = ("resnet8", "resnet18", "mobilenetv2")

_MODELOPT_JOB = r"""
import json, sys, time, numpy as np
import modelopt, onnxruntime
import modelopt.onnx.quantization as moq
job = json.loads(sys.argv[1])
x = np.load(job["calib"])
out = {"modelopt": modelopt.__version__, "onnxruntime": onnxruntime.__version__, "seconds": {}}
for src, dst, exclude in job["models"]:
    t0 = time.perf_counter()
    moq.quantize(src, quantize_mode="int8", calibration_data=x, calibration_method="max",
                 calibration_eps=["cpu"], output_path=dst, high_precision_dtype="fp32",
                 nodes_to_exclude=exclude, log_level="ERROR")
    out["seconds"][src] = round(time.perf_counter() - t0, 2)
print("MODELOPT_RESULT " + json.dumps(out))
"""


# --------------------------------------------------------------------------------------------
# Placement of a Q/DQ graph
# --------------------------------------------------------------------------------------------


def placement(path: Path) -> dict[tuple[str, str, int], np.ndarray]:
    """Every quantised edge of a Q/DQ ONNX file: ``(tensor, consumer node, input index)`` ->
    the scale of the Q/DQ pair on it (``tensor`` is the FP32 tensor the pair quantises)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    edges: dict[tuple[str, str, int], np.ndarray] = {}
    for node in graph.node:
        for index, tensor in enumerate(node.input):
            dq = producer.get(tensor)
            if dq is None or dq.op_type != "DequantizeLinear" or node.op_type == "QuantizeLinear":
                continue
            q = producer.get(dq.input[0])
            source = q.input[0] if q is not None and q.op_type == "QuantizeLinear" else dq.input[0]
            scale = inits.get(dq.input[1])
            value = numpy_helper.to_array(scale) if scale is not None else np.array(np.nan)
            edges[(source, node.name, index)] = value.astype(np.float64)
    return edges


def qdq_pairs(path: Path) -> int:
    """QuantizeLinear nodes that feed a DequantizeLinear."""
    import onnx

    graph = onnx.load(str(path)).graph
    readers = Counter(i for n in graph.node if n.op_type == "DequantizeLinear" for i in n.input)
    return sum(1 for n in graph.node if n.op_type == "QuantizeLinear" and readers[n.output[0]])


def compare(ours: dict, theirs: dict, fp32: Path) -> dict[str, Any]:
    """Edge-by-edge difference of two placements, named after the FP32 graph's nodes."""
    import onnx

    graph = onnx.load(str(fp32)).graph
    ops = {n.name: n.op_type for n in graph.node}
    made_by = {o: f"{n.op_type} {n.name}" for n in graph.node for o in n.output}

    def label(edge: tuple[str, str, int]) -> str:
        tensor, node, index = edge
        source = made_by.get(tensor, "weight" if tensor not in made_by else tensor)
        return f"{source} -> {ops.get(node, '?')} {node} [input {index}]"

    both = sorted(set(ours) & set(theirs))
    rel = [
        float(np.max(np.abs(ours[e] - theirs[e]) / np.maximum(np.abs(theirs[e]), 1e-12)))
        for e in both
        if ours[e].shape == theirs[e].shape
    ]
    return {
        "edges_both": len(both),
        "only_advedge": [label(e) for e in sorted(set(ours) - set(theirs))],
        "only_other": [label(e) for e in sorted(set(theirs) - set(ours))],
        "max_rel_scale_diff": max(rel) if rel else None,
    }


def between_conv_and_activation(path: Path) -> int:
    """ReLU/Clip nodes fed through a Q/DQ pair straight from a Conv or Add."""
    import onnx

    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    count = 0
    for node in graph.node:
        if node.op_type not in ("Relu", "Clip"):
            continue
        dq = producer.get(node.input[0])
        q = producer.get(dq.input[0]) if dq is not None else None
        src = producer.get(q.input[0]) if q is not None else None
        if dq is not None and dq.op_type == "DequantizeLinear" and src is not None:
            count += src.op_type in ("Conv", "Add")
    return count


# --------------------------------------------------------------------------------------------
# The three quantisers
# --------------------------------------------------------------------------------------------


def ort_default(fp32: Path, out: Path, calib: np.ndarray, method: str) -> None:
    """ONNX Runtime's own placement with the symmetric options of the ``tensorrt`` target (what
    advedge wrote before its TensorRT placement): every op type, outputs quantised too."""
    import onnx
    from advedge.calibration import name_unnamed_nodes, select_fp32_nodes
    from advedge.export._deps import quiet_onnxruntime
    from onnxruntime import quantization as ortq
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(ortq.CalibrationDataReader):
        def __init__(self, name: str) -> None:
            self.batches = iter([{name: calib[i : i + 32]} for i in range(0, len(calib), 32)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as tmp, quiet_onnxruntime(capture_prints=True):
        model = onnx.load(str(fp32))
        name_unnamed_nodes(model)
        onnx.save(model, f"{tmp}/named.onnx")
        quant_pre_process(f"{tmp}/named.onnx", f"{tmp}/pre.onnx")
        pre = onnx.load(f"{tmp}/pre.onnx")
        ortq.quantize_static(
            f"{tmp}/pre.onnx",
            str(out),
            Reader(pre.graph.input[0].name),
            quant_format=ortq.QuantFormat.QDQ,
            per_channel=True,
            activation_type=ortq.QuantType.QInt8,
            weight_type=ortq.QuantType.QInt8,
            calibrate_method=getattr(ortq.CalibrationMethod, _ORT_METHODS[method]),
            nodes_to_exclude=select_fp32_nodes(pre, "auto"),
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": False,
                "AddQDQPairToWeight": True,
            },
        )


_ORT_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def run_modelopt(python: str | None, jobs: list[tuple], calib: Path) -> dict | str:
    """Quantise ``jobs`` (FP32 file, output file, nodes kept FP32) with ModelOpt; its result
    dict, or why it could not run (a string)."""
    if python is None and importlib.util.find_spec("modelopt") is None:
        return (
            "ModelOpt is not importable here: skipped (install nvidia-modelopt[onnx] in its "
            "own virtualenv and pass --modelopt-python)"
        )
    models = [[str(a), str(b), list(c)] for a, b, c in jobs]
    job = json.dumps({"calib": str(calib), "models": models})
    cmd = [python or sys.executable, "-c", _MODELOPT_JOB, job]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("MODELOPT_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return f"ModelOpt failed (exit {proc.returncode}): {' | '.join(tail)}"


# --------------------------------------------------------------------------------------------
# The studies
# --------------------------------------------------------------------------------------------


def placement_study(args: argparse.Namespace, tmp: Path) -> tuple[list[dict], dict | str]:
    """Export each model, quantise it three ways and compare the placements."""
    import torch
    from advedge.calibration import build_calibration_set, quantize_qdq
    from advedge.export.onnx_export import export_onnx

    calib = build_calibration_set(args.data, n=args.placement_calib_n, seed=0)
    images = calib.as_float()
    np.save(tmp / "calib.npy", images)
    rows, jobs = [], []
    for name in args.models:
        torch.manual_seed(0)
        fp32 = export_onnx(_build(name), tmp / f"{name}.onnx", input_shape=(3, 32, 32))
        t0 = time.perf_counter()
        res = quantize_qdq(
            fp32, tmp / f"{name}.advedge.onnx", calib, method="minmax", use_cache=False
        )
        seconds = time.perf_counter() - t0
        ort_default(fp32, tmp / f"{name}.ort.onnx", images, "minmax")
        jobs.append((fp32, tmp / f"{name}.modelopt.onnx", res.excluded_nodes))
        rows.append(
            {
                "model": name,
                "advedge_seconds": round(seconds, 2),
                "advedge_excluded": res.excluded_nodes,
            }
        )
    modelopt = run_modelopt(args.modelopt_python, jobs, tmp / "calib.npy")
    for row, (fp32, mo_path, _) in zip(rows, jobs, strict=True):
        ours, ort = tmp / f"{row['model']}.advedge.onnx", tmp / f"{row['model']}.ort.onnx"
        row.update(
            {
                "pairs_advedge": qdq_pairs(ours),
                "pairs_ort_default": qdq_pairs(ort),
                "act_after_qdq_advedge": between_conv_and_activation(ours),
                "act_after_qdq_ort_default": between_conv_and_activation(ort),
                "activations": sum(1 for n in _nodes(fp32) if n in ("Relu", "Clip")),
            }
        )
        if isinstance(modelopt, dict):
            row["pairs_modelopt"] = qdq_pairs(mo_path)
            row["act_after_qdq_modelopt"] = between_conv_and_activation(mo_path)
            row["modelopt_seconds"] = modelopt["seconds"].get(str(fp32))
            row["vs_modelopt"] = compare(placement(ours), placement(mo_path), fp32)
        row["vs_ort_default"] = compare(placement(ours), placement(ort), fp32)
    return rows, modelopt


def _build(name: str) -> Any:
    """A model of advedge's registry, or ``purified_<name>``: an untrained IPCM purifier
    (eps_r 10/255) fused in front of it, as ``advedge export`` writes a purified classifier."""
    from advedge.models import create_model

    if not name.startswith("purified_"):
        return create_model(name)
    from advedge.models.purified import Purified
    from advedge.purifier.networks import Generator

    return Purified(Generator(eps_r=10 / 255), create_model(name.removeprefix("purified_")))


def _nodes(path: Path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node]


def accuracy_study(args: argparse.Namespace, tmp: Path) -> list[dict]:
    """FP32 vs INT8 (ORT default placement, advedge's TensorRT placement) clean accuracy."""
    from advedge.calibration import build_calibration_set, quantize_qdq
    from advedge.export.onnx_export import export_onnx

    from advedge.checkpoint import load_model

    with np.load(args.data / "test.npz") as z:
        x = z["x"][: args.n].transpose(0, 3, 1, 2).astype(np.float32) / 255
        y = z["y"][: args.n]
    calib = build_calibration_set(args.data, n=args.calib_n, seed=0)
    rows = []
    for run in args.checkpoint:
        model = load_model(run)
        tag = Path(run).name
        fp32 = export_onnx(model, tmp / f"{tag}.onnx", input_shape=(3, 32, 32))
        trt = tmp / f"{tag}.trt.onnx"
        quantize_qdq(fp32, trt, calib, method=args.method, use_cache=False)
        ort = tmp / f"{tag}.ort.onnx"
        ort_default(fp32, ort, calib.as_float(), args.method)
        acc = {k: _accuracy(p, x, y) for k, p in (("fp32", fp32), ("ort", ort), ("trt", trt))}
        rows.append(
            {
                "checkpoint": str(run),
                "arch": model.arch,
                "n": len(y),
                "calibration": f"{args.method} on {args.calib_n} stratified training images",
                "fp32": acc["fp32"],
                "int8_ort_default": acc["ort"],
                "int8_trt_placement": acc["trt"],
                "drop_points_ort_default": round(100 * (acc["fp32"] - acc["ort"]), 2),
                "drop_points_trt_placement": round(100 * (acc["fp32"] - acc["trt"]), 2),
            }
        )
    return rows


def _accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy under ONNX Runtime's CPU provider, basic optimisations only (Q/DQ stay
    float ops: exact fake quantisation)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    pred = np.concatenate(
        [sess.run(None, {name: x[i : i + 256]})[0].argmax(1) for i in range(0, len(x), 256)]
    )
    return round(float((pred == y).mean()), 4)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def print_diff(row: dict) -> None:
    print(
        f"\n== {row['model']}: Q/DQ pairs advedge {row['pairs_advedge']}, ModelOpt "
        f"{row.get('pairs_modelopt', 'n/a')}, ONNX Runtime default {row['pairs_ort_default']}"
    )
    diff = row.get("vs_modelopt")
    if diff is None:
        print("   (ModelOpt not run)")
        return
    print(
        f"   edges quantised by both: {diff['edges_both']}, largest relative scale "
        f"difference {diff['max_rel_scale_diff']}"
    )
    for edge in diff["only_advedge"]:
        print(f"   only advedge:  {edge}")
    for edge in diff["only_other"]:
        print(f"   only ModelOpt: {edge}")
    if not diff["only_advedge"] and not diff["only_other"]:
        print("   same placement, edge by edge")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument(
        "--modelopt-python", default=None, help="python of a virtualenv with nvidia-modelopt[onnx]"
    )
    parser.add_argument("--data", type=Path, default=DATA, help="CIFAR-10 npz folder")
    parser.add_argument("--placement-calib-n", type=int, default=64)
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        help="trained run for the accuracy check (repeatable)",
    )
    parser.add_argument("--n", type=int, default=10000, help="test images for accuracy")
    parser.add_argument("--calib-n", type=int, default=512)
    parser.add_argument("--method", default="entropy", help="calibration of the accuracy check")
    parser.add_argument("--tag", default="")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    with tempfile.TemporaryDirectory(prefix="qdq-placement-") as tmp_name:
        rows, modelopt = placement_study(args, Path(tmp_name))
        accuracy = accuracy_study(args, Path(tmp_name)) if args.checkpoint else []
    for row in rows:
        print_diff(row)
    if isinstance(modelopt, str):
        print(f"\n{modelopt}")
    payload = {
        "benchmark": "qdq_placement",
        **stamp(),
        "settings": {
            "models": args.models,
            "placement_calib_n": args.placement_calib_n,
            "placement_method": "minmax",
            "accuracy_method": args.method,
            "calib_n": args.calib_n,
            "n": args.n,
        },
        "modelopt": modelopt,
        "placement": rows,
        "accuracy": accuracy,
    }
    write_results(
        f"qdq_placement{args.tag}",
        payload,
        _table(rows),
        _COLUMNS,
        notes=_notes(rows, modelopt, accuracy),
    )
    return 0


_COLUMNS = [
    "model",
    "Q/DQ pairs: ORT default (before)",
    "advedge (now)",
    "ModelOpt",
    "ReLU/Clip behind a Q/DQ from Conv/Add: before / now / ModelOpt",
    "edges only advedge / only ModelOpt",
    "max rel. scale diff",
]


def _table(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        diff = r.get("vs_modelopt") or {}
        out.append(
            {
                "model": r["model"],
                _COLUMNS[1]: r["pairs_ort_default"],
                _COLUMNS[2]: r["pairs_advedge"],
                _COLUMNS[3]: r.get("pairs_modelopt", "n/a"),
                _COLUMNS[4]: f"{r['act_after_qdq_ort_default']} / {r['act_after_qdq_advedge']} / "
                f"{r.get('act_after_qdq_modelopt', 'n/a')} of {r['activations']}",
                _COLUMNS[5]: f"{len(diff['only_advedge'])} / {len(diff['only_other'])}"
                if diff
                else "n/a",
                _COLUMNS[6]: "n/a"
                if not diff or diff["max_rel_scale_diff"] is None
                else f"{diff['max_rel_scale_diff']:.1e}",
            }
        )
    return out


def _notes(rows: list[dict], modelopt: dict | str, accuracy: list[dict]) -> list[str]:
    if isinstance(modelopt, dict):
        notes = [
            f"ModelOpt {modelopt['modelopt']} (ONNX PTQ, int8, max calibration, "
            f"high_precision_dtype fp32, CPU) with onnxruntime {modelopt['onnxruntime']}, "
            "in its own virtualenv; advedge's `tensorrt` target with minmax ranges, on the "
            "same calibration images. An edge is a quantised tensor feeding one input of "
            "one node."
        ]
    else:
        notes = [modelopt]
    notes.append(
        "'Before' is ONNX Runtime's own placement with the symmetric options advedge used "
        "until then (quantize_static called directly: every op type, outputs quantised), the "
        "graph advedge wrote before its TensorRT placement."
    )
    for r in rows:
        diff = r.get("vs_modelopt")
        if diff and (diff["only_advedge"] or diff["only_other"]):
            notes.append(
                f"- {r['model']}: only advedge: {diff['only_advedge'] or 'none'}; "
                f"only ModelOpt: {diff['only_other'] or 'none'}"
            )
    if accuracy:
        notes += [
            "",
            f"Clean accuracy on the CIFAR-10 test set; INT8 calibrated with "
            f"{accuracy[0]['calibration']}, run on ONNX Runtime CPU with basic optimisations "
            "(exact fake quantisation):",
            "",
            "| checkpoint | arch | n | FP32 | INT8 ORT default (before) | INT8 TensorRT "
            "placement (now) | drop before / now (points) |",
            "| --- " * 7 + "|",
        ]
        for a in accuracy:
            notes.append(
                f"| {a['checkpoint']} | {a['arch']} | {a['n']} | {a['fp32']:.4f} | "
                f"{a['int8_ort_default']:.4f} | {a['int8_trt_placement']:.4f} | "
                f"{a['drop_points_ort_default']} / {a['drop_points_trt_placement']} |"
            )
    return notes


if __name__ == "__main__":
    raise SystemExit(main())
