"""ONNX files: the full checker, safe external data, metadata props and the JSON sidecar.

Every artifact advedge writes is an ONNX file plus a JSON sidecar beside it
(``resnet8.int8.onnx`` -> ``resnet8.int8.json``) holding the same metadata as the file's
``metadata_props``: architecture, classes, input shape, eps, precision, the source checkpoint's
sha256 and the advedge version, and whatever the step that wrote it measured (parity, the INT8
accuracy report). Torch-free; ``onnx`` is imported inside the functions.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from advedge.export._deps import require

from advedge.errors import ExportError, UsageError, did_you_mean
from advedge.utils import atomic_write_text, to_jsonable

__all__ = [
    "METADATA_KEYS",
    "check_external_data",
    "check_onnx",
    "constants_to_initializers",
    "graph_input",
    "load_onnx_graph",
    "read_onnx_metadata",
    "read_sidecar",
    "set_onnx_metadata",
    "sidecar_path",
    "unfolded_clip_bounds",
    "write_sidecar",
]

#: The metadata every exported ONNX carries (as ``metadata_props``, values JSON-encoded).
METADATA_KEYS = (
    "kind",
    "architecture",
    "classes",
    "input_shape",
    "eps",
    "precision",
    "source_sha256",
    "advedge_version",
)


def sidecar_path(onnx_path: str | os.PathLike[str]) -> Path:
    """``dir/name.fp32.onnx`` -> ``dir/name.fp32.json``."""
    return Path(onnx_path).with_suffix(".json")


def write_sidecar(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write a JSON sidecar atomically; returns its path."""
    path = Path(path)
    atomic_write_text(path, json.dumps(to_jsonable(data), indent=2, sort_keys=True) + "\n")
    return path


def read_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a JSON sidecar.

    Raises:
        ExportError: missing or unreadable sidecar.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(
            f"sidecar not found: {path}", "it is written beside every artifact"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"unreadable sidecar {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ExportError(f"sidecar {path} is not a JSON object")
    return data


def set_onnx_metadata(model: Any, metadata: dict[str, Any]) -> None:
    """Replace ``model.metadata_props`` entries by ``metadata`` (values JSON-encoded)."""
    keep = [p for p in model.metadata_props if p.key not in metadata]
    del model.metadata_props[:]
    for prop in keep:
        model.metadata_props.add(key=prop.key, value=prop.value)
    for key in sorted(metadata):
        value = metadata[key]
        text = value if isinstance(value, str) else json.dumps(to_jsonable(value), sort_keys=True)
        model.metadata_props.add(key=key, value=text)


def read_onnx_metadata(model_or_path: Any) -> dict[str, Any]:
    """Decode an ONNX model's ``metadata_props`` (JSON values decoded where they parse)."""
    onnx = require("onnx", purpose="reading ONNX metadata")
    model = model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        model = onnx.load(str(model_or_path), load_external_data=False)
    out: dict[str, Any] = {}
    for prop in model.metadata_props:
        try:
            out[prop.key] = json.loads(prop.value)
        except json.JSONDecodeError:
            out[prop.key] = prop.value
    return out


def load_onnx_graph(path: str | os.PathLike[str]) -> Any:
    """The ONNX model at ``path`` without its external data (its graph, metadata, functions).

    Raises:
        ExportError: not a readable ONNX file.
    """
    onnx = require("onnx", purpose="checking an ONNX file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ExportError(
            f"{path} is not a readable ONNX file ({type(exc).__name__}: {exc})"
        ) from None


def check_external_data(path: str | os.PathLike[str]) -> None:
    """Refuse an ONNX whose external-data locations leave the model's folder.

    An ONNX file may keep tensors in side files named by a relative ``location``. A crafted file
    can point that at ``../../etc/shadow`` or an absolute path; loading it would read (and an
    export copying it would leak) files outside the artifact's folder. This checks every tensor
    before anything is loaded: initializers, node attributes (a Constant's ``value``), the
    subgraphs of If/Loop/Scan, and the same inside every ONNX local function
    (``model.functions``), which ONNX Runtime inlines and would load too.

    Raises:
        ExportError: a location that is absolute, escapes the folder (also through a symlink),
            or names a file that does not exist.
    """
    onnx = require("onnx", purpose="checking an ONNX file")
    path = Path(path)
    model = load_onnx_graph(path)
    base = path.resolve().parent
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(base):
            raise ExportError(
                f"{path}: external data of tensor {tensor.name!r} points outside its folder "
                f"({location!r})",
                "refusing to read it; external-data files must sit beside the .onnx",
            )
        if not target.is_file():
            raise ExportError(
                f"{path}: external data file {location!r} of tensor {tensor.name!r} is missing"
            )


def _all_tensors(model: Any) -> list[Any]:
    """Every TensorProto of a model: those of its main graph and of every ONNX local function
    (``model.functions``: their nodes' attributes, their default attribute values, and the
    subgraphs in them), recursively."""
    tensors = _graph_tensors(model.graph)
    for function in model.functions:
        tensors.extend(_nodes_tensors(function.node))
        for attr in function.attribute_proto:  # default values of the function's attributes
            tensors.extend(_attribute_tensors(attr))
    return tensors


def _graph_tensors(graph: Any) -> list[Any]:
    """Every TensorProto of a graph: initializers, sparse initializers and its nodes'."""
    tensors = list(graph.initializer)
    for sparse in graph.sparse_initializer:
        tensors.extend((sparse.values, sparse.indices))
    tensors.extend(_nodes_tensors(graph.node))
    return tensors


def _nodes_tensors(nodes: Any) -> list[Any]:
    tensors = []
    for node in nodes:
        for attr in node.attribute:
            tensors.extend(_attribute_tensors(attr))
    return tensors


def _attribute_tensors(attr: Any) -> list[Any]:
    """The tensors of one attribute: ``t``, ``tensors``, sparse tensors, and, recursively, the
    subgraphs ``g`` / ``graphs`` (If, Loop, Scan bodies)."""
    tensors = []
    if attr.HasField("t"):
        tensors.append(attr.t)
    tensors.extend(attr.tensors)
    if attr.HasField("sparse_tensor"):
        tensors.extend((attr.sparse_tensor.values, attr.sparse_tensor.indices))
    for sparse in attr.sparse_tensors:
        tensors.extend((sparse.values, sparse.indices))
    if attr.HasField("g"):
        tensors.extend(_graph_tensors(attr.g))
    for sub in attr.graphs:
        tensors.extend(_graph_tensors(sub))
    return tensors


def graph_input(model: Any, input_name: str | None = None) -> tuple[str, list[int | str | None]]:
    """The image input of an ONNX model: its name and ``[N, C, H, W]`` dims (a symbolic axis
    as its name, or None).

    Initializers listed as graph inputs are not inputs. With ``input_name`` None the model must
    have exactly one input.

    Raises:
        UsageError: several inputs and no ``input_name``, or no input of that name.
        ExportError: an input that is not four-dimensional.
    """
    graph = model.graph
    inits = {i.name for i in graph.initializer}
    inputs = [i for i in graph.input if i.name not in inits]
    if input_name is None:
        if len(inputs) != 1:
            raise UsageError(
                f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)})",
                "name the image input with input_name",
            )
        value = inputs[0]
    else:
        match = [i for i in inputs if i.name == input_name]
        if not match:
            raise UsageError(
                f"the model has no input named {input_name!r}",
                did_you_mean(input_name, [i.name for i in inputs]),
            )
        value = match[0]
    dims: list[int | str | None] = []
    for d in value.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or None)
    if len(dims) != 4:
        raise ExportError(
            f"model input {value.name!r} has shape {dims}; INT8 calibration needs [N, C, H, W]"
        )
    return value.name, dims


def check_onnx(path: str | os.PathLike[str]) -> None:
    """Run the external-data check, then ``onnx.checker`` with ``full_check=True``.

    The full check includes strict shape inference, so type errors between nodes fail here.

    Raises:
        ExportError: an unreadable file, unsafe external data or a checker failure (the first
            line of the checker's message is kept).
    """
    onnx = require("onnx", purpose="checking an ONNX file")
    check_external_data(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # ValidationError, InferenceError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{path} fails the ONNX checker: {first}") from None


def constants_to_initializers(model: Any) -> int:
    """Move every ``Constant`` node's tensor into the graph initializers; returns how many.

    TensorRT's ONNX parser needs Clip's min/max as initializers, not computed tensors.
    """
    onnx = require("onnx", purpose="ONNX export")
    graph = model.graph
    moved = 0
    keep = []
    for node in graph.node:
        if (
            node.op_type == "Constant"
            and len(node.attribute) == 1
            and node.attribute[0].name == "value"
        ):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            moved += 1
        else:
            keep.append(node)
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
    return moved


def unfolded_clip_bounds(model: Any) -> list[str]:
    """Names of Clip nodes whose min/max inputs are not initializers (should be empty)."""
    inits = {t.name for t in model.graph.initializer}
    bad = []
    for node in model.graph.node:
        if node.op_type == "Clip" and any(name and name not in inits for name in node.input[1:]):
            bad.append(node.name or node.output[0])
    return bad
