"""What a run folder allows, decided before anything in it is written: another run's folder is refused; a resume with
other settings is refused naming each key old → new, unless only resumable keys changed and the flag says so; a
folder that never trained takes any config; a checkpoint of another model or vocabulary is refused naming each
tensor; every checkpoint corrupt means step 0 with the old metrics moved aside."""

from __future__ import annotations

import json

import pytest
import torch

from hermesflow_fast.errors import UserError
from hermesflow_fast.train.checkpoint import CheckpointManager
from hermesflow_fast.train.config import TrainConfig, config_to_dict, load_config, save_config
from hermesflow_fast.train.resume import (
    ConfigChange,
    ResumeError,
    changes_header,
    check_model_shapes,
    check_vocab,
    config_changes,
    move_aside,
    plan_run_dir,
)


def _cfg(*overrides: str) -> TrainConfig:
    return load_config(None, ["train.max_steps=100", *overrides])


def _run_dir(tmp_path, cfg: TrainConfig, steps_logged: int = 0, checkpoint_at: int | None = None):
    run = tmp_path / "run"
    save_config(cfg, run / "config.yaml", header="hermesflow train")
    if steps_logged:
        (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, steps_logged + 1)))
    if checkpoint_at is not None:
        state = {"w": torch.ones(3, 2)}
        CheckpointManager(run).save(checkpoint_at, state, extra={"step": checkpoint_at, "config": config_to_dict(cfg)})
    return run


def _snapshot(run):
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_config_changes_name_keys_in_schema_order():
    old, new = config_to_dict(_cfg()), config_to_dict(_cfg("train.lr=5e-3", "train.epochs=3", "run.run_dir=/x"))
    changes = config_changes(old, new)
    assert [str(c) for c in changes] == ["train.lr: 2e-05 → 0.005", "train.epochs: 1 → 3"]  # run_dir is ignored
    assert [c.changeable for c in changes] == [False, True]
    del old["train"]["grad_accum"]  # a key the schema gained since: its default is no change, another value is
    assert config_changes(old, config_to_dict(_cfg()), defaults=TrainConfig()) == []
    assert config_changes(old, config_to_dict(_cfg("train.grad_accum=2")), defaults=TrainConfig()) == [
        ConfigChange("train.grad_accum", 1, 2)]
    assert ConfigChange("log.every", 1, 5).changeable and ConfigChange("checkpoint.keep", 1, 5).changeable
    assert not ConfigChange("model.init_from", None, "/x").changeable


def test_a_new_run_into_a_used_folder(tmp_path):
    cfg = _cfg()
    assert plan_run_dir(tmp_path / "nothing", cfg, resume=False).history is False
    run = _run_dir(tmp_path, cfg)
    # only config.yaml: a run that never logged a step (a crash before step 1, a bad value) takes any config
    plan = plan_run_dir(run, _cfg("train.beta=0.5"), resume=False)
    assert [str(c) for c in plan.changes] == ["train.beta: 0.2 → 0.5"] and not plan.history
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ResumeError, match=r"already holds a different run \(train.beta: 0.2 → 0.5\)"):
        plan_run_dir(run, _cfg("train.beta=0.5"), resume=False)
    plan = plan_run_dir(run, cfg, resume=False)  # the same run again, no checkpoint: start over
    assert plan.restart and plan.checkpoint is None
    CheckpointManager(run).save(2, {"w": torch.ones(1)}, extra={"step": 2})
    with pytest.raises(ResumeError, match="already holds checkpoints; pass --resume auto"):
        plan_run_dir(run, cfg, resume=False)


def test_resume_refuses_other_settings_and_applies_resumable_ones_only_when_asked(tmp_path):
    cfg = _cfg()
    run = _run_dir(tmp_path, cfg, steps_logged=8, checkpoint_at=8)
    before = _snapshot(run)
    with pytest.raises(ResumeError) as err:
        plan_run_dir(run, _cfg("train.lr=5e-3", "train.epochs=3"), resume=True, allow_change=True)
    msg = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in msg
    assert "train.lr: 2e-05 → 0.005 cannot change once a run has begun" in msg and "train.epochs" not in msg
    assert "--init-from " + str(run / "checkpoints" / "step-00000008") in msg
    with pytest.raises(ResumeError, match=r"differs from .*config.yaml: train.max_steps: 100 → 200; pass "
                                          r"--allow-config-change"):
        plan_run_dir(run, _cfg("train.max_steps=200"), resume=True)
    plan = plan_run_dir(run, _cfg("train.max_steps=200", "log.every=5"), resume=True, allow_change=True)
    assert [c.key for c in plan.changes] == ["train.max_steps", "log.every"]
    assert plan.checkpoint == run / "checkpoints" / "step-00000008" and plan.step == 8 and not plan.restart
    # config.yaml agrees but the checkpoint recorded another run: refused as well
    save_config(_cfg("train.beta=0.5"), run / "config.yaml")
    with pytest.raises(ResumeError, match=r"state.json records another run: train.beta: 0.2 → 0.5"):
        plan_run_dir(run, _cfg("train.beta=0.5"), resume=True)
    save_config(cfg, run / "config.yaml", header="hermesflow train")
    assert _snapshot(run) == before  # planning never writes


def test_every_checkpoint_corrupt_means_step_zero_and_a_restart(tmp_path):
    run = _run_dir(tmp_path, _cfg(), steps_logged=8, checkpoint_at=4)
    CheckpointManager(run, keep=0).save(8, {"w": torch.ones(3, 2)}, extra={"step": 8})
    for ck in CheckpointManager(run).checkpoints():
        data = bytearray((ck / "model.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (ck / "model.safetensors").write_bytes(bytes(data))
    plan = plan_run_dir(run, _cfg(), resume=True)
    assert plan.checkpoint is None and plan.restart and plan.history
    assert [(p.name, why) for p, why in plan.failed] == [
        ("step-00000008", "model.safetensors: sha256 differs from the manifest (corrupt)"),
        ("step-00000004", "model.safetensors: sha256 differs from the manifest (corrupt)")]
    assert move_aside(run / "metrics.jsonl").name == "metrics.jsonl.1"
    (run / "metrics.jsonl").write_text("{}\n")
    assert move_aside(run / "metrics.jsonl").name == "metrics.jsonl.2"


def test_checkpoint_of_another_model_names_each_tensor(tmp_path):
    CheckpointManager(tmp_path).save(1, {"embed.weight": torch.zeros(10, 4), "head.weight": torch.zeros(10, 4),
                                         "old.bias": torch.zeros(4)}, rng=False)
    ck = tmp_path / "checkpoints" / "step-00000001"
    check_model_shapes(ck, {"embed.weight": (10, 4), "head.weight": (10, 4), "old.bias": (4,)})
    with pytest.raises(ResumeError) as err:
        check_model_shapes(ck, {"embed.weight": (12, 4), "head.weight": (10, 4), "new.bias": (4,)})
    assert str(err.value) == (
        f"--resume: {ck / 'model.safetensors'} holds another model than this config builds: embed.weight is "
        f"(10, 4) in the checkpoint but (12, 4) in the model; new.bias (4,) is missing from the checkpoint; old.bias "
        f"(4,) is in the checkpoint but not in the model")


def test_a_data_vocabulary_other_than_the_checkpoints_is_refused():
    check_vocab(None, "x", {"a": 1})
    check_vocab({"a": 1, "b": 2}, "x", {"a": 1, "b": 2})
    with pytest.raises(ResumeError, match=r"differs from run/vocab.json \(num_image_codes: 64 → 128\)"):
        check_vocab({"num_image_codes": 64}, "run/vocab.json", {"num_image_codes": 128})


def test_changes_are_recorded_in_the_config_header(tmp_path):
    path = tmp_path / "config.yaml"
    save_config(_cfg(), path, header="hermesflow train --config x.yaml")
    header = changes_header(path, [ConfigChange("train.epochs", 2, 3)], "on resume at step 16")
    save_config(_cfg("train.epochs=3"), path, header=header)
    lines = path.read_text().splitlines()
    assert lines[:2] == ["# hermesflow train --config x.yaml", "# changed on resume at step 16: train.epochs: 2 → 3"]
    assert load_config(path).train.epochs == 3
