"""DDP under torchrun: real 2-process gloo jobs on CPU (a tiny model, a few batches)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from advedge.checkpoint import load_model, read_metadata
from advedge.config import load_yaml
from advedge.distributed import init_distributed, parameters_agree, rank_and_world
from advedge.errors import UsageError

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)

_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    from advedge.distributed import rank_and_world
    from advedge.training.engine import TrainConfig, train

    data, out, dumps = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    common = dict(data=data, model="tiny_cnn", method="pgd-at", out=out, batch_size=16,
                  steps=1, eval_n=16, eval_steps=1, device="cpu")
    for epochs, resume in ((1, False), (2, True)):
        result = train(TrainConfig(epochs=epochs, **common), resume=resume)
        rank, world = rank_and_world()
        assert world == 2, world
        state = {k: v.cpu() for k, v in result.model.state_dict().items()}
        torch.save(state, dumps / f"epoch{epochs}-rank{rank}.pt")
    """
)


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    return subprocess.run(
        [*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_two_gloo_ranks_train_resume_and_end_identical(tmp_path, tiny_npz_data):
    script = tmp_path / "job.py"
    script.write_text(_SCRIPT)
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    out = tmp_path / "run"
    proc = _torchrun([str(script), str(tiny_npz_data), str(out), str(dumps)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for epochs in (1, 2):
        r0 = torch.load(dumps / f"epoch{epochs}-rank0.pt", weights_only=True)
        r1 = torch.load(dumps / f"epoch{epochs}-rank1.pt", weights_only=True)
        assert r0.keys() == r1.keys()
        assert all(torch.equal(r0[k], r1[k]) for k in r0), f"ranks differ after epoch {epochs}"
    # Training moved the weights between epoch 1 and the resumed epoch 2.
    e1 = torch.load(dumps / "epoch1-rank0.pt", weights_only=True)
    assert any(not torch.equal(e1[k], r0[k]) for k in r0 if k.endswith("weight"))
    # Rank 0 wrote one run: it loads, holds the ranks' weights and records both epochs.
    saved = load_model(out).state_dict()
    assert all(torch.equal(saved[k], r0[k]) for k in r0)
    rows = (out / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[-1].startswith("2,")
    cfg = load_yaml(out / "config.yaml")
    assert cfg["resolved"]["world_size"] == 2
    assert read_metadata(out)["epochs"] == 2
    assert not list(out.glob(".*.tmp"))


def test_distill_cli_under_torchrun_reports_once(tmp_path, tiny_npz_data):
    from conftest import argv, train_tiny

    teacher = train_tiny(tiny_npz_data, tmp_path / "teacher")
    out = tmp_path / "student"
    args = argv("-m", "advedge", "distill", teacher=teacher, student="tiny_cnn", method="rslad")
    args += argv(data=tiny_npz_data, epochs=1, out=out, batch_size=32, steps=1, eval_n=16)
    proc = _torchrun([*args, "--device", "cpu", "--json"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(proc.stdout)  # one JSON document: only rank 0 reported
    assert payload["method"] == "rslad" and payload["final"]["epoch"] == 1
    assert load_yaml(out / "config.yaml")["resolved"]["world_size"] == 2
    meta = read_metadata(out)
    assert meta["teacher"]["architecture"] == "tiny_cnn"
    assert load_model(out).num_classes == 10


def test_world_size_without_torchrun_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UsageError, match="torchrun"):
        init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(UsageError, match="WORLD_SIZE"):
        init_distributed("cpu")


def test_single_process_helpers_are_no_ops():
    assert rank_and_world() == (0, 1)
    assert init_distributed("cpu") is False
    assert parameters_agree(torch.nn.Linear(2, 2))


# --- Section 1 of the reliability issue: a rank must never abort at teardown. -------------------
# The root cause: gloo's worker thread frees its reference to a collective's tensor a moment after
# the call returns; when Python had already dropped the tensor and the interpreter was finalising,
# that free needed the GIL and the rank aborted ("terminate called without an active exception").


def _fake_collective(held: list, release_after_s: float | None):
    """A test double of a backend worker: the result is ready when the call returns, but the
    worker thread keeps a reference to the tensor for ``release_after_s`` more (forever: None)."""
    import threading

    def collective(tensor, *args, **kwargs):
        # An autograd node that saved the tensor holds a C++ reference to it, as a worker does.
        held.append(torch.ones_like(tensor, requires_grad=True) * tensor)
        if release_after_s is not None:
            threading.Timer(release_after_s, held.clear).start()

    return collective


@pytest.mark.parametrize("name", ["all_reduce", "broadcast"])
def test_collective_returns_only_after_the_backend_let_go_of_its_tensor(monkeypatch, name):
    from advedge import distributed

    held: list = []
    monkeypatch.setattr(torch.distributed, name, _fake_collective(held, 0.2))
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 2))
    t = torch.zeros(3)
    before = t._use_count()
    assert getattr(distributed, name)(t) is t
    assert t._use_count() == before and not held


def test_collective_gives_up_waiting_with_a_warning(monkeypatch, caplog):
    from advedge import distributed

    held: list = []
    monkeypatch.setattr(torch.distributed, "all_reduce", _fake_collective(held, None))
    monkeypatch.setattr(distributed, "rank_and_world", lambda: (0, 2))
    monkeypatch.setattr(distributed, "_RELEASE_TIMEOUT_S", 0.05)
    # the CLI's logging set-up (run by earlier tests) stops advedge's records at its own handler
    monkeypatch.setattr(logging.getLogger("advedge"), "propagate", True)
    with caplog.at_level("WARNING", logger="advedge.distributed"):
        distributed.all_reduce(torch.zeros(2))
    assert held and "still holds a tensor" in caplog.text


def test_every_collective_goes_through_the_settling_helpers():
    """A plain torch.distributed collective anywhere else would bring the teardown abort back."""
    import re

    root = Path(__file__).resolve().parents[2]
    pattern = re.compile(
        r"\b(dist|distributed|torch\.distributed)\.(all_reduce|broadcast|reduce|all_gather"
        r"|all_gather_object|broadcast_object_list|gather|scatter|reduce_scatter|all_to_all)\b"
    )
    offenders = [
        f"{path.relative_to(root)}:{i}"
        for folder in ("advedge", "export", "calibration")
        for path in (root / folder).rglob("*.py")
        if path.name != "distributed.py"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders
