"""What a run folder allows before anything in it is written: a fresh run, a restart, or a resume, and which settings
may change on the way.

A run folder records one run: ``config.yaml`` (the resolved config in effect), ``vocab.json``, ``metrics.jsonl`` and
``checkpoints/``. ``plan_run_dir`` reads them, compares the recorded config (``config.yaml``, else the newest good
checkpoint's) with the requested one and decides, touching nothing:

    folder without history (no checkpoint, no logged step)       any config: nothing was trained under the old one
    no --resume, another config, or any checkpoint               refused (choose another folder, or --resume auto)
    no --resume, same config, logged steps but no checkpoint     start over; metrics.jsonl is moved aside first
    --resume, a key outside CHANGEABLE_ON_RESUME differs         refused, each key named with old → new
    --resume, only CHANGEABLE_ON_RESUME keys differ              refused unless --allow-config-change; then applied
                                                                 for real and recorded in config.yaml's header
    --resume, every checkpoint fails verification                step 0, said in one line; metrics.jsonl moved aside

What may change on resume: how long to run (``train.epochs``, ``train.max_steps``: the lr schedule is rebuilt over the
new step count), how often to log and save (``log.*``, ``checkpoint.*``), and how the same math is executed
(``dist.*``, ``model.compile``, ``model.activation_checkpointing``, ``model.attn_backend``, ``data.token_budget``:
how a step's pairs are packed, never which pairs or their masks; ``train.precompute_ref_logps``; ``train.nan_policy``)
and, for self-play, records per generation call (``curation.batch_size``, ``eval.batch_size``: results are drawn per
record) and whether candidates are also written as PNGs (``curation.save_images``: the journals are the same).
Everything else (model, data, seed, lr, β, loss, batch, warm-up, curation) is the experiment itself: a run that
changed it halfway would not be the run its record describes. The learning rate in particular stays: AdamW's moments
and the schedule's position were built under the old peak, and a new peak is a new experiment. To go on from a
checkpoint's weights under new settings, start another folder with ``--init-from``.

``check_model_shapes`` and ``check_vocab`` compare a checkpoint's tensors (names and shapes, from the safetensors
header) and vocabulary with the model and data about to train, naming every difference.

    python -m pytest -q tests/train/test_resume.py
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hermesflow_fast.errors import UserError
from hermesflow_fast.train.checkpoint import MODEL_FILE, STATE_FILE, CheckpointManager

__all__ = [
    "CHANGEABLE_ON_RESUME",
    "CONFIG_FILE",
    "IGNORED",
    "METRICS_FILE",
    "ConfigChange",
    "ResumeError",
    "ResumePlan",
    "changes_header",
    "check_model_shapes",
    "check_vocab",
    "config_changes",
    "describe",
    "judge_changes",
    "logged_steps",
    "move_aside",
    "plan_run_dir",
    "read_recorded_config",
]

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"

CHANGEABLE_ON_RESUME: tuple[str, ...] = (
    "train.epochs", "train.max_steps", "train.nan_policy", "train.precompute_ref_logps",
    "checkpoint", "log", "dist",
    "model.compile", "model.activation_checkpointing", "model.attn_backend", "data.token_budget",
    "run.name", "curation.batch_size", "eval.batch_size", "curation.save_images",
)
IGNORED: tuple[str, ...] = ("run.run_dir",)  # where the folder is, not what runs in it


class ResumeError(UserError):
    """A run folder that cannot be continued or reused as asked; the message names the keys, files or tensors."""


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class ConfigChange:
    """One dotted key whose requested value differs from the recorded one."""

    key: str
    old: Any
    new: Any

    @property
    def changeable(self) -> bool:
        return _under(self.key, CHANGEABLE_ON_RESUME)

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} → {self.new!r}"


def describe(changes: Sequence[ConfigChange], limit: int = 6) -> str:
    shown = "; ".join(str(c) for c in changes[:limit])
    return shown + (f"; … {len(changes) - limit} more" if len(changes) > limit else "")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _as_dict(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        from hermesflow_fast.train.config import config_to_dict

        return config_to_dict(config)
    return dict(config)


def config_changes(stored: Mapping[str, Any] | Any, requested: Mapping[str, Any] | Any,
                   defaults: Mapping[str, Any] | Any | None = None,
                   ignore: Sequence[str] = IGNORED) -> list[ConfigChange]:
    """Every dotted key of ``requested`` whose value differs from ``stored`` (nested dicts or config dataclasses), in
    schema order. A key the record lacks (added to the schema since) counts as its ``defaults`` value; a key the
    schema no longer has is no change (it has no effect now)."""
    old, new = _flatten(_as_dict(stored)), _flatten(_as_dict(requested))
    base = _flatten(_as_dict(defaults)) if defaults is not None else {}
    missing = object()
    out = []
    for key, value in new.items():
        before = old.get(key, base.get(key, missing))
        if _under(key, ignore) or _same(before, value):
            continue
        out.append(ConfigChange(key, "(absent)" if before is missing else before, value))
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                             and not isinstance(a, bool) and not isinstance(b, bool) and a == b)


def read_recorded_config(path: str | os.PathLike) -> dict[str, Any] | None:
    """The config a run folder recorded (``config.yaml`` as nested dicts), or None when there is none."""
    import yaml

    path = Path(path)
    if not path.is_file():
        return None
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ResumeError(f"{path}: cannot read the run's recorded config ({' '.join(str(exc).split())})") from exc
    if not isinstance(saved, Mapping):
        raise ResumeError(f"{path}: expected a mapping of config sections, got {type(saved).__name__}")
    return dict(saved)


def judge_changes(changes: Sequence[ConfigChange], where: str | os.PathLike, allow_change: bool, hint: str) -> None:
    """Refuse ``changes`` from the record at ``where`` for a resume: any key outside CHANGEABLE_ON_RESUME always,
    the others unless ``allow_change`` (``--allow-config-change``). ``hint``: what to do instead of a fixed change."""
    fixed = [c for c in changes if not c.changeable]
    if fixed:
        raise ResumeError(f"--resume: {where} records another run: {describe(fixed)} cannot change once a run has "
                          f"begun (--help lists what --allow-config-change may change); {hint}")
    if changes and not allow_change:
        raise ResumeError(f"--resume: the config differs from {where}: {describe(changes)}; pass "
                          f"--allow-config-change to apply this (it is recorded in the run's config.yaml), or drop it")


def logged_steps(metrics: str | os.PathLike) -> int:
    """Lines of a ``metrics.jsonl`` (0 when it is missing)."""
    path = Path(metrics)
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def move_aside(path: str | os.PathLike) -> Path:
    """Rename ``path`` to the first free ``<name>.1``, ``<name>.2``, … beside it; returns the new path."""
    path = Path(path)
    k = 1
    while (aside := path.with_name(f"{path.name}.{k}")).exists():
        k += 1
    os.replace(path, aside)
    return aside


def changes_header(config_file: str | os.PathLike, changes: Sequence[ConfigChange], when: str) -> str | None:
    """The header of a config.yaml about to be rewritten: its earlier header lines plus one for ``changes``."""
    path = Path(config_file)
    lines: list[str] = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            lines.append(line[1:].strip())
    if changes:
        lines.append(f"changed {when}: {describe(changes, limit=len(changes))}")
    return "\n".join(lines) or None


@dataclass
class ResumePlan:
    """What ``plan_run_dir`` decided (nothing written yet)."""

    checkpoint: Path | None = None  # the checkpoint to continue from (None: step 0)
    failed: list[tuple[Path, str]] = dataclasses.field(default_factory=list)  # checkpoints skipped, and why
    changes: list[ConfigChange] = dataclasses.field(default_factory=list)  # from the record, to be applied
    restart: bool = False  # step 0 in a folder that logged steps: metrics.jsonl moves aside first
    history: bool = False  # the folder holds checkpoints or logged steps
    checkpoint_extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # the checkpoint's state.json extra

    @property
    def step(self) -> int:
        return int(self.checkpoint_extra.get("step", 0)) if self.checkpoint is not None else 0


def plan_run_dir(run_dir: str | os.PathLike, config: Mapping[str, Any] | Any, resume: bool,
                 allow_change: bool = False, manager: CheckpointManager | None = None, verify: bool = True,
                 defaults: Mapping[str, Any] | Any | None = None, ignore: Sequence[str] = IGNORED) -> ResumePlan:
    """Decide how a training run may use ``run_dir`` (rules in the module docstring); raise ResumeError, touching
    nothing, when it may not. ``config``: the requested config (nested dicts or the dataclass); ``verify``: hash every
    checkpoint file against its manifest (else sizes only); ``ignore``: keys left out of the comparison."""
    run_dir = Path(run_dir)
    manager = manager or CheckpointManager(run_dir)
    requested = _as_dict(config)
    config_file = run_dir / CONFIG_FILE
    stored, where = read_recorded_config(config_file), str(config_file)
    found = manager.checkpoints()
    logged = logged_steps(run_dir / METRICS_FILE) > 0
    plan = ResumePlan(history=bool(found) or logged)
    if resume:
        plan.checkpoint, plan.failed = manager.scan(verify=verify)
    ck_config = None
    if plan.checkpoint is not None:
        state_file = plan.checkpoint / STATE_FILE
        try:
            plan.checkpoint_extra = dict(json.loads(state_file.read_text()).get("extra") or {})
        except (OSError, ValueError, AttributeError) as exc:
            raise ResumeError(f"{state_file}: not a readable checkpoint state ({exc})") from exc
        ck_config = plan.checkpoint_extra.get("config")
        if stored is None and isinstance(ck_config, Mapping):
            stored, where, ck_config = dict(ck_config), str(state_file), None
    plan.changes = config_changes(stored, requested, defaults, ignore) if stored is not None else []
    if not resume:
        if plan.history and plan.changes:
            raise ResumeError(f"run dir {run_dir} already holds a different run ({describe(plan.changes)}); choose "
                              f"another --run-dir, or pass --resume auto to continue it")
        if found:
            raise ResumeError(f"run dir {run_dir} already holds checkpoints; pass --resume auto to continue it or "
                              f"choose another --run-dir (nothing was written)")
        plan.restart = logged
        return plan
    if plan.history:
        source = plan.checkpoint or (found[-1] if found else None)
        hint = (f"to go on from these weights under new settings, start another --run-dir with --init-from {source}"
                if source is not None else "choose another --run-dir for the new settings")
        judge_changes(plan.changes, where, allow_change, hint)
        if isinstance(ck_config, Mapping):  # config.yaml agrees; the checkpoint's own record must too
            judge_changes([c for c in config_changes(ck_config, requested, defaults, ignore) if not c.changeable],
                          plan.checkpoint / STATE_FILE, allow_change, hint)
    plan.restart = plan.checkpoint is None and logged
    return plan


def check_model_shapes(checkpoint: str | os.PathLike, shapes: Mapping[str, Sequence[int]]) -> None:
    """Refuse a checkpoint whose tensors (names and shapes, read from the safetensors header only) differ from the
    model's ``shapes`` ({name: shape}), naming each differing tensor and both shapes."""
    from safetensors import safe_open

    file = Path(checkpoint) / MODEL_FILE
    try:
        with safe_open(str(file), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - no __iter__
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad header
        raise ResumeError(f"{file}: not a readable safetensors file ({exc})") from exc
    model = {k: tuple(v) for k, v in shapes.items()}
    problems = []
    for name in [*model, *(k for k in saved if k not in model)]:
        a, b = saved.get(name), model.get(name)
        if a == b:
            continue
        if a is None:
            problems.append(f"{name} {b} is missing from the checkpoint")
        elif b is None:
            problems.append(f"{name} {a} is in the checkpoint but not in the model")
        else:
            problems.append(f"{name} is {a} in the checkpoint but {b} in the model")
    if problems:
        more = f"; … {len(problems) - 4} more" if len(problems) > 4 else ""
        raise ResumeError(f"--resume: {file} holds another model than this config builds: "
                          f"{'; '.join(problems[:4])}{more}")


def check_vocab(stored: Mapping[str, Any] | None, where: str | os.PathLike, vocab: Mapping[str, Any]) -> None:
    """Refuse a resume whose data lays tokens out differently from the vocabulary recorded at ``where``."""
    if stored is None:
        return
    diffs = [f"{k}: {stored.get(k)!r} → {v!r}" for k, v in vocab.items() if stored.get(k) != v]
    if diffs:
        raise ResumeError(f"--resume: the data's token layout differs from {where} ({'; '.join(diffs[:4])}); the "
                          f"checkpoint's token ids would mean other tokens")
