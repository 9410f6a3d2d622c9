"""Checkpoints: bitwise round trip of model + AdamW + LambdaLR, RNG restore, keep-K, corrupt/partial/temporary folders
skipped with a reason, NaN refusal, code-carrying pickles refused, a full disk named and cleaned up after, and a
2-rank gloo save."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from hermesflow_fast.train.checkpoint import (
    CheckpointError,
    CheckpointManager,
    first_non_finite,
    is_nan_free,
)
from hermesflow_fast.train.config import TrainConfig, config_to_dict
from hermesflow_fast.train.optim import build_optimizer, warmup_cosine


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(11, 8), nn.LayerNorm(8), nn.Linear(8, 11))


def _trainer(steps=3):
    model = _model()
    opt = build_optimizer(model, TrainConfig().train)
    sched = warmup_cosine(opt, 2, 10)
    for _ in range(steps):
        _step(model, opt, sched)
    return model, opt, sched


def _step(model, opt, sched):
    ids = torch.randint(0, 11, (4, 5))
    loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)


def _equal(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _save(manager, step, model, opt=None, sched=None, **kw):
    return manager.save(step, model.state_dict(), opt.state_dict() if opt else None,
                        sched.state_dict() if sched else None, extra=kw.pop("extra", {"step": step}), **kw)


def test_round_trip_is_bitwise_and_resumes_identically(tmp_path):
    model, opt, sched = _trainer()
    manager = CheckpointManager(tmp_path / "run", keep=3)
    extra = {"data": {"epoch": 0, "position": 12}, "metrics": {"loss": 0.5}, "config": config_to_dict(TrainConfig())}
    path = manager.save(3, model.state_dict(), opt.state_dict(), sched.state_dict(), extra=extra)
    assert path == tmp_path / "run" / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors", "optimizer.pt",
                                                       "rng-rank0.safetensors", "scheduler.json", "state.json"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.pt", "rng-rank0.safetensors",
                                      "scheduler.json", "state.json"}
    assert manager.latest() == path

    loaded = manager.load(manager.latest())
    assert loaded.step == 3 and loaded.extra == extra and loaded.world_size == 1
    model2 = nn.Sequential(nn.Embedding(11, 8), nn.LayerNorm(8), nn.Linear(8, 11))
    opt2 = build_optimizer(model2, TrainConfig().train)
    sched2 = warmup_cosine(opt2, 2, 10)
    model2.load_state_dict(loaded.model_state)
    opt2.load_state_dict(loaded.optimizer_state)
    sched2.load_state_dict(loaded.scheduler_state)
    assert _equal(model.state_dict(), model2.state_dict())
    assert _equal(opt.state_dict(), opt2.state_dict())
    assert _equal(sched.state_dict(), sched2.state_dict())

    torch.manual_seed(5)
    _step(model, opt, sched)
    torch.manual_seed(5)
    _step(model2, opt2, sched2)
    assert _equal(model.state_dict(), model2.state_dict())  # the next step is identical too
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


def test_rng_restore_reproduces_the_next_draws(tmp_path):
    manager = CheckpointManager(tmp_path, keep=1)
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state
    np.random.randn()  # ... and in numpy's
    path = _save(manager, 0, _model())
    expected = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.rand(3), np.random.randn())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    assert manager.restore_rng(path) is True
    got = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.rand(3), np.random.randn())
    assert torch.equal(got[0], expected[0]) and got[1:3] == expected[1:3]
    assert np.array_equal(got[3], expected[3]) and got[4] == expected[4]


def test_restore_rng_without_a_state_for_this_rank(tmp_path, capsys):
    path = _save(CheckpointManager(tmp_path), 1, _model(), rng=False)
    assert not (path / "rng-rank0.safetensors").exists()
    assert CheckpointManager(tmp_path).restore_rng(path) is False
    assert "no RNG state for rank 0" in capsys.readouterr().err


def test_keep_k_pruning(tmp_path):
    model = _model()
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (10, 20, 30, 40):
        _save(manager, step, model)
    assert [p.name for p in manager.checkpoints()] == ["step-00000030", "step-00000040"]
    keep_all = CheckpointManager(tmp_path / "all", keep=0)
    for step in (1, 2, 3):
        _save(keep_all, step, model)
    assert len(keep_all.checkpoints()) == 3


def test_pruning_does_not_count_a_broken_checkpoint(tmp_path):
    model = _model()
    manager = CheckpointManager(tmp_path, keep=2)
    _save(manager, 1, model)
    bad = _save(manager, 2, model)
    (bad / "manifest.json").unlink()
    _save(manager, 3, model)
    assert [p.name for p in manager.checkpoints()] == ["step-00000001", "step-00000002", "step-00000003"]


def test_truncated_file_falls_back_to_the_previous_checkpoint(tmp_path, capsys):
    model, opt, sched = _trainer(1)
    manager = CheckpointManager(tmp_path, keep=5)
    good = _save(manager, 1, model, opt, sched)
    bad = _save(manager, 2, model, opt, sched)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert manager.latest() == good
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "model.safetensors has" in err[0] and "truncated" in err[0]
    with pytest.raises(CheckpointError, match="cannot be loaded: model.safetensors has"):
        manager.load(bad)


def test_same_size_corruption_is_caught_by_the_hash(tmp_path, capsys):
    model = _model()
    manager = CheckpointManager(tmp_path)
    good = _save(manager, 1, model)
    bad = _save(manager, 2, model)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    assert manager.latest(verify=True) == good
    assert "sha256 differs" in capsys.readouterr().err
    assert manager.latest(verify=False) == bad  # sizes only


def test_missing_manifest_falls_back(tmp_path, capsys):
    model = _model()
    manager = CheckpointManager(tmp_path)
    good = _save(manager, 5, model)
    bad = _save(manager, 6, model)
    (bad / "manifest.json").unlink()
    assert manager.latest() == good
    err = capsys.readouterr().err
    assert "step-00000006" in err and "no manifest.json" in err
    (good / "manifest.json").write_text("{not json")
    assert manager.latest() is None
    assert "manifest.json is unreadable" in capsys.readouterr().err


def test_leftover_temporary_folder_is_ignored_then_cleaned(tmp_path, capsys):
    model = _model()
    manager = CheckpointManager(tmp_path)
    good = _save(manager, 1, model)
    leftover = manager.root / "step-00000002.tmp-deadbeef"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    assert manager.latest() == good
    err = capsys.readouterr().err
    assert "step-00000002.tmp-deadbeef" in err and "unfinished save" in err
    assert manager.checkpoints() == [good]
    _save(manager, 3, model)
    assert not leftover.exists()


def test_saving_a_step_again_replaces_it(tmp_path):
    manager = CheckpointManager(tmp_path)
    _save(manager, 4, _model(), extra={"v": 1})
    path = _save(manager, 4, _model(), extra={"v": 2})
    assert manager.latest() == path and manager.load(path).extra == {"v": 2}
    assert sorted(p.name for p in manager.root.iterdir()) == ["step-00000004"]


def test_nan_or_inf_state_is_never_written(tmp_path):
    model, opt, sched = _trainer(1)
    manager = CheckpointManager(tmp_path)
    state = model.state_dict()
    state["2.weight"] = state["2.weight"].clone()
    state["2.weight"][3, 1] = float("nan")
    assert not is_nan_free(state) and first_non_finite(state) == "2.weight"
    with pytest.raises(CheckpointError, match=r"refusing to save checkpoint step 7: model.2.weight holds NaN"):
        manager.save(7, state, opt.state_dict(), sched.state_dict())
    opt_state = opt.state_dict()
    opt_state["state"][0]["exp_avg_sq"] = opt_state["state"][0]["exp_avg_sq"].clone().fill_(float("inf"))
    with pytest.raises(CheckpointError, match=r"optimizer.state.0.exp_avg_sq holds NaN or inf"):
        manager.save(7, model.state_dict(), opt_state, sched.state_dict())
    assert not manager.root.exists() or list(manager.root.iterdir()) == []
    assert manager.latest() is None
    assert is_nan_free(model.state_dict()) and is_nan_free({"a": [1.0, {"b": torch.ones(2)}]})
    assert not is_nan_free({"a": [1.0, {"b": float("-inf")}]})


def test_unsavable_states_are_refused_before_writing(tmp_path):
    manager = CheckpointManager(tmp_path)
    model = _model()
    with pytest.raises(CheckpointError, match=r"state.param_groups.0.fn: a builtin_function_or_method cannot be saved"):
        manager.save(1, model.state_dict(), {"param_groups": [{"fn": len}]})
    with pytest.raises(CheckpointError, match="extra is not JSON-able"):
        manager.save(1, model.state_dict(), extra={"x": object()})
    with pytest.raises(CheckpointError, match="must pass the \\(full\\) model state dict"):
        manager.save(1, {})
    assert not manager.root.exists() or list(manager.root.iterdir()) == []


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_carrying_code_is_refused(tmp_path):
    model, opt, sched = _trainer(1)
    manager = CheckpointManager(tmp_path)
    path = _save(manager, 1, model, opt, sched)
    marker = tmp_path / "pwned"
    with open(path / "optimizer.pt", "wb") as f:
        pickle.dump({"state": {}, "param_groups": [_Payload(str(marker))]}, f, protocol=2)
    manifest = json.loads((path / "manifest.json").read_text())  # re-sign it, as an attacker would
    import hashlib

    data = (path / "optimizer.pt").read_bytes()
    manifest["files"]["optimizer.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert manager.latest() == path
    with pytest.raises(CheckpointError, match="optimizer.pt: refused to unpickle"):
        manager.load(path)
    assert not marker.exists()


def test_tied_weights_are_saved_once_per_name(tmp_path):
    model = _model()
    state = model.state_dict()
    state["tied"] = state["0.weight"]  # same storage
    path = CheckpointManager(tmp_path).save(1, state)
    loaded = CheckpointManager(tmp_path).load(path).model_state
    assert torch.equal(loaded["tied"], loaded["0.weight"])


def test_a_full_disk_is_named_and_leaves_no_partial_folder(tmp_path, monkeypatch):
    """safetensors wraps the OS error in its own ('os error 28'), torch's writer in a RuntimeError; either way the
    error names the file and says the disk is full, the temporary folder is gone and earlier checkpoints stay."""
    import safetensors.torch

    model, opt, sched = _trainer(1)
    manager = CheckpointManager(tmp_path, keep=1)
    good = _save(manager, 1, model, opt, sched)
    real_save_file = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)  # a partial file is there when the error comes
        raise RuntimeError('Error while serializing: I/O error: No space left on device (os error 28) at path "x"')

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(CheckpointError) as err:
        _save(manager, 2, model, opt, sched)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("checkpoint step 2: cannot write ")
    assert "model.safetensors: No space left on device (disk full" in msg and "was removed" in msg
    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)

    def torch_full(obj, f, *a, **kw):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", torch_full)
    with pytest.raises(CheckpointError, match=r"optimizer.pt: No space left on device \(disk full"):
        _save(manager, 3, model, opt, sched)
    assert [p.name for p in manager.root.iterdir()] == [good.name]  # no step-*.tmp-* left, step 1 kept (keep=1)
    assert manager.latest() == good


_WORKER = textwrap.dedent(
    """
    import os, sys, random
    import torch, torch.distributed as dist
    from hermesflow_fast.train.checkpoint import CheckpointManager, CheckpointError
    rank, world, port, run = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)
    random.seed(rank)
    manager = CheckpointManager(run, keep=1, rank=rank, world_size=world)
    model = torch.nn.Linear(3, 2).state_dict() if rank == 0 else None
    path = manager.save(5, model, extra={"rank0": True} if rank == 0 else None)
    expected = (torch.rand(3).tolist(), random.random())
    torch.manual_seed(0)
    random.seed(0)
    assert manager.restore_rng(path)
    assert (torch.rand(3).tolist(), random.random()) == expected, rank
    bad = {"w": torch.full((2,), float("nan"))} if rank == 0 else None
    try:
        manager.save(6, bad)
    except CheckpointError as exc:
        print(f"rank {rank} refused: {exc}", flush=True)
    assert manager.latest() == path
    dist.destroy_process_group()
    print(f"rank {rank} ok", flush=True)
    """
)


def test_two_rank_save_with_gloo(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(worker), str(r), str(port), str(tmp_path / "run")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for r in (0, 1)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=60)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("ranks hung in CheckpointManager.save")
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, out
        assert f"rank {rank} ok" in out
        assert f"rank {rank} refused" in out
    assert "w holds NaN" in outs[0] and "failed on another rank" in outs[1]
    path = tmp_path / "run" / "checkpoints" / "step-00000005"
    files = json.loads((path / "manifest.json").read_text())["files"]
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors", "model.safetensors", "state.json"} <= set(files)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000005"]
