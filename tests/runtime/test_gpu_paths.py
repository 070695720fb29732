"""The GPU-side defects of issue 16 that can be shown on a CPU: each test fails without its fix.

ONNX Runtime's provider fallback and labels, the TensorRT provider's options, the shape policy
of the compile and CUDA-graph runners, bench's warm-up, the transfer set's device, FP16 clamping,
and the training engine's DDP + compile, cuDNN and process-group set-up. What needs a GPU is
marked ``gpu`` (``benchmarks/gpu_check.py`` runs those on the device).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from advedge.export.graph import read_onnx_metadata, set_onnx_metadata
from advedge.export.runtime import onnxruntime as ortmod
from advedge.export.runtime.onnxruntime import OrtRunner, trt_provider_options
from advedge.export.runtime.torch import MAX_SHAPES, TorchRunner, bucket
from onnx import helper, numpy_helper

from advedge.errors import MissingDependencyError, UsageError
from tests.fakes.artifacts import classifier_artifacts, tiny_classifier


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return classifier_artifacts(tmp_path_factory.mktemp("gpu_paths"))[1]


def _with_precision(src: Path, dst: Path, precision: str) -> Path:
    model = onnx.load(str(src))
    set_onnx_metadata(model, {**read_onnx_metadata(model), "precision": precision})
    onnx.save_model(model, str(dst))
    return dst


# ---------------------------------------------------------------- ONNX Runtime: what really runs
def test_a_provider_that_did_not_start_is_refused_not_run_on_the_cpu(fp32):
    # This CPU build lists no CUDA provider, so ONNX Runtime starts the session on the CPU
    # provider with a warning that advedge's log level hides: exactly the silent fallback of a
    # CUDA provider whose libraries fail to load on a GPU machine.
    with pytest.raises(MissingDependencyError, match="could not start CUDAExecutionProvider"):
        OrtRunner(fp32, providers=["CUDAExecutionProvider"])
    assert OrtRunner(fp32).session.get_providers() == ["CPUExecutionProvider"]


def test_an_int8_qdq_graph_is_labelled_by_the_arithmetic_that_runs(fp32, tmp_path):
    int8 = _with_precision(fp32, tmp_path / "a.int8.onnx", "int8")
    fused = OrtRunner(int8)  # CPU, level all: Q/DQ pairs fused into int8 kernels
    assert (fused.info.precision, fused.info.stored_precision) == ("int8", None)
    plain = OrtRunner(int8, optimization="basic")  # computed as written: dequantise, float op
    assert (plain.info.precision, plain.info.stored_precision) == ("int8-simulated", "int8")
    cuda = OrtRunner(int8)
    cuda.providers = ["CUDAExecutionProvider"]  # what the CUDA provider computes: FP32 convs
    assert cuda.describe().precision == "int8-simulated"
    assert cuda.describe().backend == "onnxruntime-cuda"
    trt = OrtRunner(int8)
    trt.providers = ["TensorrtExecutionProvider"]
    assert trt.describe().precision == "int8"
    assert OrtRunner(fp32, optimization="basic").info.precision == "fp32"


def test_the_tensorrt_provider_gets_a_profile_caches_and_the_int8_flag(fp32, tmp_path):
    int8 = _with_precision(fp32, tmp_path / "a.int8.onnx", "int8")
    opts = trt_provider_options(int8, [8, 1, 32], cache_dir=tmp_path / "cache")
    name = onnx.load(str(fp32)).graph.input[0].name
    assert opts["trt_profile_min_shapes"] == f"{name}:1x3x32x32"
    assert opts["trt_profile_opt_shapes"] == f"{name}:32x3x32x32"
    assert opts["trt_profile_max_shapes"] == f"{name}:32x3x32x32"
    assert opts["trt_engine_cache_enable"] == "True"
    assert opts["trt_engine_cache_path"] == str(tmp_path / "cache")
    assert opts["trt_timing_cache_enable"] == "True"
    assert opts["trt_int8_enable"] == "True" and "trt_fp16_enable" not in opts
    assert (tmp_path / "cache").is_dir()
    fp16 = _with_precision(fp32, tmp_path / "a.fp16.onnx", "fp16")
    opts16 = trt_provider_options(fp16, None, cache_dir=tmp_path / "cache")
    assert opts16["trt_fp16_enable"] == "True" and "trt_int8_enable" not in opts16
    assert opts16["trt_profile_max_shapes"].endswith(":256x3x32x32")  # the default: eval's 256


def test_open_onnx_hands_the_options_to_the_provider_it_asked_for(fp32, monkeypatch, tmp_path):
    import onnxruntime

    seen = {}

    def fake_runner(path, *, providers, provider_options, threads):
        seen.update(providers=providers, options=provider_options)
        raise RuntimeError("stop here")

    monkeypatch.setenv("ADVEDGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(
        onnxruntime,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"],
    )
    monkeypatch.setattr(ortmod, "OrtRunner", fake_runner)
    with pytest.raises(RuntimeError, match="stop here"):
        ortmod.open_onnx(fp32, "onnxruntime-trt", device="cuda:1", batch_sizes=[1, 4])
    assert seen["providers"] == ["TensorrtExecutionProvider"]
    (opts,) = seen["options"]
    assert opts["device_id"] == 1 and opts["trt_profile_max_shapes"].endswith(":4x3x32x32")
    assert opts["trt_engine_cache_path"] == str(tmp_path / "ort-trt")


# ------------------------------------------------------- torch-compile and CUDA graphs: shapes
class _Counting(torch.nn.Module):
    """A classifier that counts the batch sizes it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_classifier()
        self.sizes: list[int] = []

    def forward(self, x):
        self.sizes.append(int(x.shape[0]))
        return self.net(x)


def test_compile_is_static_per_batch_size(monkeypatch):
    calls = []

    def fake_compile(module, **kw):
        calls.append(kw)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    TorchRunner(tiny_classifier(), mode="compile")
    # dynamic=None would recompile the second batch size to dynamic-shape kernels and time
    # every later size on those
    assert calls == [{"dynamic": False}]


def test_timed_runs_the_exact_batch_and_other_calls_reuse_a_few_padded_shapes():
    module = _Counting()
    runner = TorchRunner(module, mode="compile")
    runner.fn = module  # the shape policy, without compiling on a 2-core CI machine
    x = np.random.default_rng(0).random((300, 3, 32, 32), dtype=np.float32)
    ref = module.net(torch.from_numpy(x)).detach().numpy()
    out, _ = runner.timed(x[:7])
    assert module.sizes == [7]  # a latency is always the latency of that batch
    np.testing.assert_allclose(out, ref[:7], atol=1e-5)
    module.sizes.clear()
    # Square's shrinking batches: each size once, as an attack cascade calls them
    for n in range(300, 0, -1):
        np.testing.assert_allclose(runner(x[:n]), ref[:n], atol=1e-5)
    shapes = set(module.sizes)
    assert shapes <= {7} | {bucket(n) for n in range(1, 301)}
    assert len(runner.shapes()["prepared_batches"]) <= MAX_SHAPES
    assert runner.shapes()["padded_calls"] > 250


def test_a_runner_never_prepares_more_than_its_shape_limit():
    module = _Counting()
    runner = TorchRunner(module, mode="compile")
    runner.fn = module
    x = np.zeros((MAX_SHAPES + 5, 3, 32, 32), dtype=np.float32)
    for n in range(1, MAX_SHAPES + 1):
        runner.timed(x[:n])  # exact sizes up to the limit
    assert len(runner.shapes()["prepared_batches"]) == MAX_SHAPES
    runner(x[:5])  # a size it holds: fine
    with pytest.raises(Exception, match=f"already holds {MAX_SHAPES}"):
        runner.timed(x[: MAX_SHAPES + 3])


def test_eager_runs_every_size_as_given():
    module = _Counting()
    runner = TorchRunner(module)
    x = np.zeros((5, 3, 32, 32), dtype=np.float32)
    runner(x[:3])
    runner.timed(x[:5])
    assert module.sizes == [3, 5] and runner.shapes() == {}


@pytest.mark.gpu
def test_cuda_graphs_share_one_pool_and_stay_few_under_shrinking_batches():
    runner = TorchRunner(tiny_classifier(), device="cuda", mode="cudagraph")
    x = np.random.default_rng(0).random((256, 3, 32, 32), dtype=np.float32)
    ref = tiny_classifier()(torch.from_numpy(x)).detach().numpy()
    runner(x)
    torch.cuda.synchronize()
    base = torch.cuda.memory_reserved()
    for n in range(256, 0, -1):
        np.testing.assert_allclose(runner(x[:n]), ref[:n], atol=1e-4)
    assert len(runner._graphs) <= 9  # 256, 128, ..., 1
    assert torch.cuda.memory_reserved() - base < 64 * 2**20


# ------------------------------------------------------------------------ bench
def test_bench_refuses_no_warm_up(tiny_npz_data, fp32):
    from advedge.export.runtime.bench import BenchOptions

    with pytest.raises(UsageError, match=r"--warmup must lie in \[1,"):
        BenchOptions([str(fp32)], str(tiny_npz_data), warmup=0).validate()
    with pytest.raises(UsageError, match="unknown device"):
        BenchOptions([str(fp32)], str(tiny_npz_data), device="gpu0").validate()
    BenchOptions([str(fp32)], str(tiny_npz_data), warmup=1, device="cuda:1").validate()


def test_warm_up_takes_the_timed_path_at_the_timed_size():
    from advedge.export.runtime.latency import measure_latency

    module = _Counting()
    runner = TorchRunner(module, mode="compile")
    runner.fn = module
    x = np.zeros((3, 3, 32, 32), dtype=np.float32)
    runner(np.zeros((8, 3, 32, 32), dtype=np.float32))  # an earlier untimed call prepared 8
    module.sizes.clear()
    measure_latency(runner, x, 7, warmup=2, iters=3)
    # warm-up at 7 (not at the prepared 8 that run() would reuse), so the timed calls never
    # compile: every call is the timed size
    assert module.sizes == [7] * 5


def test_the_transfer_set_is_crafted_where_the_model_is(monkeypatch):
    from advedge.export.runtime import craft

    import advedge.evaluation.core as core

    seen = []

    original = core.EvalSettings.run

    def spy(self, model, data, attacks):
        seen.append(torch.device(self.device))
        return original(self, model, data, attacks)

    monkeypatch.setattr(core.EvalSettings, "run", spy)
    from advedge.data import ImageArrays

    rng = np.random.default_rng(0)
    test = ImageArrays(
        x=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
        y=np.arange(4, dtype=np.int64) % 10,
        class_names=tuple(str(i) for i in range(10)),
    )
    model = tiny_classifier()
    recipe = craft.Recipe(eps=8 / 255, n_iter=1, n_queries=2, cw_steps=1)
    advs, _, _ = craft.craft_examples(model, test, recipe, lambda s: None)
    assert seen == [torch.device("cpu")] * 2 and set(advs) >= {"cw", "apgd-ce"}


# ------------------------------------------------------------------------ FP16 clamping
def _linear_onnx(path: Path, weight: np.ndarray) -> Path:
    w = numpy_helper.from_array(weight.astype(np.float32), "W")
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, weight.shape[0]])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, weight.shape[1]])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save_model(model, str(path))
    return path


def test_fp16_conversion_says_when_it_clamped(tmp_path):
    from advedge.export.fp16 import convert_fp16

    weight = np.ones((4, 2))
    weight[0, 0], weight[1, 1], weight[2, 0] = 2e4, -3e4, 1e-9
    src = _linear_onnx(tmp_path / "w.onnx", weight)
    # a handler on the module's own logger: the CLI's logging set-up (run by earlier tests in the
    # same process) may stop advedge's records from reaching the root logger caplog listens on
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    log = logging.getLogger("advedge.export.fp16")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING)  # whatever an earlier test left on the advedge logger
    try:
        dst = convert_fp16(src, tmp_path / "w.fp16.onnx")
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    meta = read_onnx_metadata(dst)
    assert meta["fp16_clamped"] == {"above": 2, "below": 1, "tensors": ["W"]}
    assert any("2 weight values at or above 10000 clamped" in r.getMessage() for r in records)
    clean = _linear_onnx(tmp_path / "c.onnx", np.ones((4, 2)))
    assert "fp16_clamped" not in read_onnx_metadata(convert_fp16(clean, tmp_path / "c16.onnx"))


# ------------------------------------------------------------------------ training under DDP
def test_a_compiled_ddp_model_attacks_with_a_compiled_local_module(monkeypatch):
    import torch.distributed as dist

    from advedge.training.engine import Trainer
    from advedge.training.objectives import attack_view

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = tiny_classifier()
        fake = SimpleNamespace(
            world_size=2, device=torch.device("cpu"), config=SimpleNamespace(compile=True)
        )
        train_model = Trainer._wrap(fake, model)
        view = attack_view(train_model)
        assert isinstance(train_model._orig_mod, torch.nn.parallel.DistributedDataParallel)
        assert getattr(view, "_orig_mod", None) is model  # compiled, and not the DDP wrapper
    finally:
        dist.destroy_process_group()


def test_nccl_groups_are_bound_to_the_rank_gpu(monkeypatch):
    import torch.distributed as dist

    from advedge import distributed

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(var, "1" if "RANK" in var else "x")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.setdefault("set", d))
    monkeypatch.setattr("advedge.utils.resolve_device", lambda d: torch.device("cuda"))
    monkeypatch.setattr("atexit.register", lambda fn: None)
    assert distributed.init_distributed("cuda") is True
    assert seen["backend"] == "nccl" and seen["device_id"] == torch.device("cuda", 1)
    assert seen["set"] == torch.device("cuda", 1)


def test_training_on_cuda_lets_cudnn_autotune(monkeypatch):
    from advedge.training.device import prepare_model

    class Stay(torch.nn.Module):
        def to(self, *a, **kw):  # no GPU here: only the settings are checked
            return self

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    prepare_model(Stay(), torch.device("cuda"), channels_last=False)
    assert torch.backends.cudnn.benchmark is True
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    prepare_model(Stay(), torch.device("cpu"), channels_last=False)
    assert torch.backends.cudnn.benchmark is False


@pytest.mark.gpu
def test_the_transfer_set_is_crafted_on_the_gpu():
    from advedge.export.runtime import craft

    from advedge.data import ImageArrays

    rng = np.random.default_rng(0)
    test = ImageArrays(
        x=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
        y=np.arange(8, dtype=np.int64) % 10,
        class_names=tuple(str(i) for i in range(10)),
    )
    model = tiny_classifier().cuda()
    recipe = craft.Recipe(eps=8 / 255, n_iter=2, n_queries=4, cw_steps=2)
    advs, survived, _ = craft.craft_examples(model, test, recipe, lambda s: None)
    assert advs["cw"].shape == (8, 3, 32, 32) and survived.shape == (8,)


@pytest.mark.gpu
def test_compile_and_cudagraph_runners_match_eager_on_cuda():
    x = np.random.default_rng(1).random((32, 3, 32, 32), dtype=np.float32)
    eager = TorchRunner(tiny_classifier(), device="cuda")
    ref = eager.run(x)
    for mode in ("compile", "cudagraph"):
        runner = TorchRunner(tiny_classifier(), device="cuda", mode=mode)
        for n in (1, 7, 32):
            out, times = runner.timed(x[:n])
            np.testing.assert_allclose(out, ref[:n], atol=1e-3)
            assert times["compute_s"] > 0
        np.testing.assert_allclose(runner.run(x, batch_size=5), ref, atol=1e-3)
        assert set(runner.shapes()["prepared_batches"]) >= {1, 7, 32}


@pytest.mark.gpu
def test_a_bf16_channels_last_pgd_at_step_on_cuda():
    from advedge.training.device import prepare_model
    from advedge.training.engine import training_step
    from advedge.training.objectives import build_method
    from advedge.utils import autocast_context

    device = torch.device("cuda")
    model, channels_last = prepare_model(tiny_classifier().train(), device)
    assert channels_last and torch.backends.cudnn.benchmark
    x = torch.rand(16, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    before = [p.detach().clone() for p in model.parameters()]
    method = build_method("pgd-at", eps=8 / 255, alpha=2 / 255, steps=3)
    out = training_step(method, model, x, y, optimizer, scaler, autocast_context(device, "bf16"))
    assert torch.isfinite(out.loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
