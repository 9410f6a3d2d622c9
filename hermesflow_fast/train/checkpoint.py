"""Training checkpoints: full state (model, optimizer, scheduler, per-rank RNG, data position), atomic, verified.

HermesFlow saved only the model weights, so a resumed run restarted warm-up with a fresh optimizer
(docs/differences.md). Here a
checkpoint is everything needed to continue the same run bit for bit:

    run_dir/config.yaml                                the resolved config (written by the trainer; resume.py)
    run_dir/checkpoints/step-00000100/
        model.safetensors                              full (unsharded) model state dict
        optimizer.pt                                   torch.save(optimizer.state_dict()); tensors, numbers,
                                                       strings, lists, dicts only (loaded with weights_only=True)
        scheduler.json                                 lr scheduler state_dict
        rng-rank{r}.safetensors                        rank r's RNG: "torch_cpu", "cuda" (the current device, when
                                                       CUDA is initialized), "numpy_keys"; numpy's position/gauss and
                                                       Python's random.getstate() as exact JSON in the metadata
        state.json                                     {"format", "step", "world_size", "rng", "saved_at", "extra"}
                                                       extra: JSON-able trainer state (data position, metrics, ...)
        manifest.json                                  written last: {"format", "step", "files": {name: {size, sha256}}}

Atomicity. Rank 0 writes the shared files into ``step-XXXXXXXX.tmp-<random>``, every rank adds its RNG file, rank 0
hashes every file into manifest.json, fsyncs the files and the folder, and renames the folder to ``step-XXXXXXXX``
(``os.replace``). Only then are checkpoints beyond the newest ``keep`` complete ones deleted. A crash at any point
leaves either the previous checkpoints intact plus a temporary folder (ignored, deleted by the next save) or a
complete new checkpoint. A write that fails (a full disk, a lost mount) removes the temporary folder and raises one
line naming the file, the OS's reason and, when the disk is full, how much is left. With ``world_size`` > 1 the ranks
meet between phases (an all-reduce of a success flag, which is also a barrier, so a failure on one rank is raised on
all instead of hanging); ``run_dir`` must be on a file system every rank sees. ``latest()`` returns the newest
checkpoint whose manifest checks out (every file present, same size, same sha256) and names each one it skips and
why. A state with a NaN or inf anywhere is never written.

Nothing is unpickled beyond plain data: safetensors and JSON, and ``torch.load(weights_only=True)`` for the optimizer
state, which refuses a pickle carrying code. Cost: the manifest hashes every byte once per save, and ``latest()``
re-reads the newest checkpoint once (≈ 1–2 s per GB).

    python -m pytest -q tests/train/test_checkpoint.py
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import math
import os
import pickle
import re
import secrets
import shutil
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hermesflow_fast.io import fsync_path
from hermesflow_fast.model.weights import CheckpointError
from hermesflow_fast.train.rng_state import capture_rng_state, restore_rng_state

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "LoadedCheckpoint",
    "first_non_finite",
    "is_nan_free",
]

FORMAT = "hermesflow_fast.checkpoint/1"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.json"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_TEMP_DIR = re.compile(r"^step-(\d{8,})\.(tmp|old)-[0-9a-f]+$")


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


@dataclass
class LoadedCheckpoint:
    """What ``CheckpointManager.load`` read back; states are ready for ``load_state_dict``."""

    path: Path
    step: int
    model_state: dict[str, Tensor]
    optimizer_state: dict[str, Any] | None
    scheduler_state: dict[str, Any] | None
    extra: dict[str, Any]
    world_size: int


# ----------------------------------------------------------------------------------------------------------- checks


def first_non_finite(state: Any, prefix: str = "") -> str | None:
    """Dotted name of the first NaN/inf in a (nested) state dict (floating tensors and Python floats), else None."""
    if isinstance(state, Tensor):
        floating = state.is_floating_point() or state.is_complex()
        return prefix or "<tensor>" if floating and state.numel() and not bool(torch.isfinite(state).all()) else None
    if isinstance(state, float):
        return None if math.isfinite(state) else (prefix or "<float>")
    if isinstance(state, Mapping):
        items: Any = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for key, value in items:
        found = first_non_finite(value, f"{prefix}.{key}" if prefix else str(key))
        if found is not None:
            return found
    return None


def is_nan_free(state_dict: Any) -> bool:
    """True when no floating tensor or float in ``state_dict`` (nested dicts/lists allowed) holds a NaN or inf."""
    return first_non_finite(state_dict) is None


def _check_plain(obj: Any, where: str) -> None:
    """Refuse what ``torch.load(weights_only=True)`` would not read back (or would, but as code)."""
    if obj is None or isinstance(obj, (Tensor, bool, int, float, str)):
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where}: key {key!r} is a {type(key).__name__}; only str/int keys are saved")
            _check_plain(value, f"{where}.{key}")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}.{i}")
        return
    raise CheckpointError(f"{where}: a {type(obj).__name__} cannot be saved; only tensors, numbers, strings, None, "
                          f"lists and dicts are (so the file loads with torch.load(weights_only=True))")


# ------------------------------------------------------------------------------------------------------- file helpers


def _write_json(path: Path, obj: Any, allow_nan: bool = False) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, allow_nan=allow_nan)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


class _WriteError(CheckpointError):
    """A checkpoint file or folder could not be written (disk full, permissions, a vanished file system)."""


def _free_bytes(path: Path) -> int | None:
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _io_reason(exc: BaseException, path: Path) -> str:
    """Why writing ``path`` failed, in words: the OS error (also when a library wraps it, as safetensors' 'os error
    28' or torch's 'file write failed') and, when the disk is full, that it is and how much is left."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None and (m := re.search(r"os error (\d+)", str(exc))):
        code = int(m.group(1))
    text = os.strerror(code) if code else (" ".join(str(exc).split()) or type(exc).__name__)
    free = _free_bytes(path)
    if code in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < 1 << 20):
        left = f"{free / 2**20:.1f} MiB left" if free is not None else "no space left"
        text += f" (disk full: {left} on that file system)"
    return text


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn a failure to write ``path`` into one _WriteError line naming the file and the cause."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError, or a library's wrapper of one (safetensors, torch)
        raise _WriteError(f"cannot write {path}: {_io_reason(exc, path)}") from exc


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({type(exc).__name__}: {exc})") from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


def _plain_tensors(state: Mapping[str, Tensor], where: str) -> dict[str, Tensor]:
    """CPU, contiguous, one storage per tensor (safetensors refuses shared storage), with names checked."""
    out: dict[str, Tensor] = {}
    storages: set[int] = set()
    for name, t in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{where}: key {name!r} is not a string")
        if not isinstance(t, Tensor):
            raise CheckpointError(f"{where}: {name!r} is a {type(t).__name__}, not a tensor")
        if hasattr(t, "full_tensor"):
            raise CheckpointError(f"{where}: {name!r} is a sharded DTensor; pass a full state dict (e.g. "
                                  f"torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
                                  f"options=StateDictOptions(full_state_dict=True, cpu_offload=True)))")
        t = t.detach().to("cpu").contiguous()
        if t.numel():
            if t.untyped_storage().data_ptr() in storages:  # tied weights: written once per name
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


# ---------------------------------------------------------------------------------------------------------- manager


class CheckpointManager:
    """Saves, finds, verifies and loads the checkpoints of one run under ``run_dir/checkpoints``.

    Every rank constructs one with its ``rank`` and the ``world_size`` and calls ``save`` together (it synchronizes
    through torch.distributed when world_size > 1). ``keep``: complete checkpoints kept, 0 = all.
    """

    def __init__(self, run_dir: str | os.PathLike, keep: int = 3, rank: int = 0, world_size: int = 1) -> None:
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise ValueError(f"CheckpointManager: keep must be an int >= 0 (0 = keep all), got {keep!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"CheckpointManager: rank={rank} must lie in [0, world_size={world_size})")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep, self.rank, self.world_size = keep, rank, world_size

    # ------------------------------------------------------------------------------------------------- listing

    def step_dir(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def checkpoints(self) -> list[Path]:
        """Every finished (renamed) step folder, oldest first, valid or not."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def _temporaries(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if _TEMP_DIR.match(p.name))

    def _say(self, message: str) -> None:
        if self.rank == 0:
            print(message, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------------------------------------ verifying

    def verify(self, path: str | os.PathLike, full: bool = True) -> str | None:
        """Why the checkpoint at ``path`` cannot be used (None if it can): its manifest is missing or unreadable, or a
        listed file is missing, has another size, or (``full``) another sha256."""
        path = Path(path)
        if not path.is_dir():
            return "not a folder"
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            return f"no {MANIFEST_FILE} (the save did not finish)"
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
            if manifest.get("format") != FORMAT or not isinstance(files, dict):
                return f"{MANIFEST_FILE} is not a {FORMAT} manifest"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return f"{MANIFEST_FILE} is unreadable ({type(exc).__name__}: {exc})"
        for required in (MODEL_FILE, STATE_FILE):
            if required not in files:
                return f"{MANIFEST_FILE} does not list {required}"
        for name, entry in files.items():
            if not isinstance(entry, dict) or "/" in name or name.startswith("."):
                return f"{MANIFEST_FILE}: bad entry for {name!r}"
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            size = file.stat().st_size
            if size != entry.get("size"):
                return f"{name} has {size} bytes, the manifest says {entry.get('size')} (truncated or rewritten)"
            if full and _sha256(file) != entry.get("sha256"):
                return f"{name}: sha256 differs from the manifest (corrupt)"
        return None

    def scan(self, verify: bool = True) -> tuple[Path | None, list[tuple[Path, str]]]:
        """(the newest checkpoint that checks out or None, [(each newer one that does not, why)]), saying nothing."""
        failed: list[tuple[Path, str]] = []
        for path in reversed(self.checkpoints()):
            reason = self.verify(path, full=verify)
            if reason is None:
                return path, failed
            failed.append((path, reason))
        return None, failed

    def latest(self, verify: bool = True) -> Path | None:
        """The newest checkpoint that checks out (every file's size, and with ``verify`` its sha256, against the
        manifest), or None. Each newer one that does not, and each unfinished temporary folder, is named on stderr
        with the reason, and the previous one is tried."""
        for temp in self._temporaries():
            self._say(f"checkpoint {temp}: ignored: a temporary folder left by an unfinished save")
        path, failed = self.scan(verify)
        for bad, reason in failed:
            self._say(f"checkpoint {bad}: skipped: {reason}; trying the previous one")
        return path

    # --------------------------------------------------------------------------------------------------- saving

    def _distributed(self) -> bool:
        if self.world_size == 1:
            return False
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"CheckpointManager: world_size={self.world_size} but torch.distributed is not "
                               f"initialized, so the ranks cannot meet between save phases")
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise RuntimeError(f"CheckpointManager: built for rank {self.rank} of {self.world_size}, but the process "
                               f"group says rank {dist.get_rank()} of {dist.get_world_size()}")
        return True

    def _agree(self, ok: bool) -> bool:
        """All ranks meet; True when every rank's ``ok`` is True (a barrier that also carries failures)."""
        if not self._distributed():
            return ok
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _phase(self, active: bool, fn, what: str):
        """Run ``fn`` where ``active``; then agree; re-raise a local failure, or report a remote one."""
        error: BaseException | None = None
        result = None
        if active:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised below after the ranks agreed
                error = exc
        if not self._agree(error is None):
            if error is not None:
                raise error
            raise CheckpointError(f"checkpoint save failed on another rank while {what}; see that rank's error")
        return result

    def save(
        self,
        step: int,
        model_state: Mapping[str, Tensor] | None,
        optimizer_state: Mapping[str, Any] | None = None,
        scheduler_state: Mapping[str, Any] | None = None,
        extra: Mapping[str, Any] | None = None,
        rng: bool = True,
    ) -> Path:
        """Write checkpoint ``step`` (layout in the module docstring) and return its folder; called by every rank.
        Rank 0's ``model_state`` (full, unsharded), ``optimizer_state``, ``scheduler_state`` and ``extra`` are
        written; other ranks may pass None. A NaN/inf in the model or optimizer state raises CheckpointError naming
        the tensor, and nothing is written."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"CheckpointManager.save: step must be an int >= 0, got {step!r}")
        final = self.step_dir(step)
        temp = None
        try:
            temp = self._phase(self.rank == 0, lambda: self._write_shared(step, model_state, optimizer_state,
                                                                           scheduler_state, extra, rng),
                               "writing the shared files")
            if self.rank != 0:
                temps = sorted(self.root.glob(f"{final.name}.tmp-*"))
                temp = temps[-1] if len(temps) == 1 else None
            self._phase(rng, lambda: self._write_rng(temp, final), "writing the RNG states")
            self._phase(self.rank == 0, lambda: self._finish(temp, final, step, rng), "finishing the checkpoint")
        except _WriteError as exc:
            if self.rank == 0 and temp is not None:
                shutil.rmtree(temp, ignore_errors=True)
            raise CheckpointError(f"checkpoint step {step}: {exc}; the unfinished checkpoint folder was removed and "
                                  f"earlier checkpoints are untouched") from exc
        except BaseException:
            if self.rank == 0 and temp is not None:
                shutil.rmtree(temp, ignore_errors=True)
            raise
        return final

    def _write_shared(self, step, model_state, optimizer_state, scheduler_state, extra, rng) -> Path:
        if not model_state:
            raise CheckpointError(f"checkpoint step {step}: rank 0 must pass the (full) model state dict, got "
                                  f"{'an empty one' if model_state is not None else 'None'}")
        bad = first_non_finite(model_state, "model")
        if bad is None and optimizer_state is not None:
            bad = first_non_finite(optimizer_state, "optimizer")
        if bad is not None:
            raise CheckpointError(f"refusing to save checkpoint step {step}: {bad} holds NaN or inf values "
                                  f"(a non-finite checkpoint would poison every resume)")
        if optimizer_state is not None:
            _check_plain(optimizer_state, "optimizer state")
        if scheduler_state is not None:
            try:
                json.dumps(scheduler_state, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"scheduler state is not JSON-able ({exc})") from exc
        state = {"format": FORMAT, "step": step, "world_size": self.world_size, "rng": bool(rng),
                 "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "extra": dict(extra or {})}
        try:
            json.dumps(state)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint extra is not JSON-able ({exc})") from exc
        tensors = _plain_tensors(model_state, "model state")

        with _writing(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self._temporaries():  # one writer per run dir: anything temporary is a crashed save's
            shutil.rmtree(leftover, ignore_errors=True)
        temp = self.root / f"step-{step:08d}.tmp-{secrets.token_hex(4)}"
        with _writing(temp):
            temp.mkdir()
        try:
            self._write_files(temp, tensors, optimizer_state, scheduler_state, state)
        except BaseException:  # a half-written folder never outlives the save that made it
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return temp

    @staticmethod
    def _write_files(temp: Path, tensors: dict[str, Tensor], optimizer_state, scheduler_state, state) -> None:
        from safetensors.torch import save_file

        with _writing(temp / MODEL_FILE):
            save_file(tensors, str(temp / MODEL_FILE), metadata={"format": "pt"})
            fsync_path(temp / MODEL_FILE)
        tensors.clear()
        if optimizer_state is not None:
            with _writing(temp / OPTIMIZER_FILE), open(temp / OPTIMIZER_FILE, "wb") as f:
                torch.save(optimizer_state, f)
                f.flush()
                os.fsync(f.fileno())
        if scheduler_state is not None:
            with _writing(temp / SCHEDULER_FILE):
                _write_json(temp / SCHEDULER_FILE, dict(scheduler_state))
        with _writing(temp / STATE_FILE):
            _write_json(temp / STATE_FILE, state, allow_nan=True)

    def _write_rng(self, temp: Path | None, final: Path) -> None:
        if temp is None or not temp.is_dir():
            raise CheckpointError(f"rank {self.rank}: no single temporary folder {final.name}.tmp-* to write the RNG "
                                  f"state into (is {self.root} on a file system every rank sees?)")
        from safetensors.torch import save_file

        tensors, meta = capture_rng_state()
        with _writing(temp / _rng_file(self.rank)):
            save_file(tensors, str(temp / _rng_file(self.rank)), metadata=meta)
            fsync_path(temp / _rng_file(self.rank))

    def _finish(self, temp: Path, final: Path, step: int, rng: bool) -> None:
        if rng:
            missing = [_rng_file(r) for r in range(self.world_size) if not (temp / _rng_file(r)).is_file()]
            if missing:
                raise CheckpointError(f"checkpoint {final.name}: RNG files {missing} were not written")
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
                 for p in sorted(temp.iterdir()) if p.is_file()}
        with _writing(temp / MANIFEST_FILE):
            _write_json(temp / MANIFEST_FILE, {"format": FORMAT, "step": step, "files": files})
            fsync_path(temp)
        with _writing(final):
            if final.exists():  # the same step saved again: move the old one aside, swap, then delete it
                aside = final.with_name(f"{final.name}.old-{secrets.token_hex(4)}")
                os.replace(final, aside)
                os.replace(temp, final)
                shutil.rmtree(aside, ignore_errors=True)
            else:
                os.replace(temp, final)
            fsync_path(self.root)
        self._prune(final)

    def _prune(self, newest: Path) -> None:
        """Keep the newest ``keep`` complete checkpoints (sizes match the manifest); delete every folder older than
        the oldest kept one."""
        if self.keep == 0:
            return
        complete = [p for p in reversed(self.checkpoints()) if p == newest or self.verify(p, full=False) is None]
        kept = complete[: self.keep]
        oldest_kept = int(_STEP_DIR.match(kept[-1].name).group(1))
        for path in self.checkpoints():
            if int(_STEP_DIR.match(path.name).group(1)) < oldest_kept:
                try:
                    shutil.rmtree(path)
                except OSError as exc:
                    self._say(f"checkpoint {path}: could not delete it ({exc}); delete it by hand")

    # -------------------------------------------------------------------------------------------------- loading

    def load(self, path: str | os.PathLike, map_location: str | torch.device = "cpu",
             verify: bool = False) -> LoadedCheckpoint:
        """Read a checkpoint (safetensors, JSON, and ``torch.load(weights_only=True)`` only). Sizes are always checked
        against the manifest, sha256 too with ``verify`` (``latest()`` already did)."""
        path = Path(path)
        reason = self.verify(path, full=verify)
        if reason is not None:
            raise CheckpointError(f"checkpoint {path}: cannot be loaded: {reason}")
        state = _read_json(path / STATE_FILE)
        if not isinstance(state, dict) or "step" not in state:
            raise CheckpointError(f"{path / STATE_FILE}: expected a JSON object with a 'step'")
        from safetensors.torch import load_file

        device = str(torch.device(map_location))
        try:
            model_state = load_file(str(path / MODEL_FILE), device=device)
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad file
            raise CheckpointError(f"{path / MODEL_FILE}: not a readable safetensors file ({exc})") from exc
        optimizer_state = None
        if (path / OPTIMIZER_FILE).is_file():
            optimizer_state = _load_plain(path / OPTIMIZER_FILE, map_location)
        scheduler_state = _read_json(path / SCHEDULER_FILE) if (path / SCHEDULER_FILE).is_file() else None
        return LoadedCheckpoint(path=path, step=int(state["step"]), model_state=model_state,
                                optimizer_state=optimizer_state, scheduler_state=scheduler_state,
                                extra=state.get("extra", {}), world_size=int(state.get("world_size", 1)))

    def restore_rng(self, path: str | os.PathLike) -> bool:
        """Set this rank's torch CPU (and current CUDA device), numpy and Python RNG states from checkpoint ``path``.
        False, said on stderr, when it holds none for this rank (saved with rng=False, or by fewer ranks)."""
        file = Path(path) / _rng_file(self.rank)
        if not file.is_file():
            print(f"checkpoint {path}: no RNG state for rank {self.rank} ({file.name}); the RNG streams start afresh",
                  file=sys.stderr, flush=True)
            return False
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc
        restore_rng_state(tensors, meta, file)
        return True


def _load_plain(file: Path, map_location: str | torch.device) -> Any:
    try:
        return torch.load(str(file), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{file}: refused to unpickle: only tensors, numbers, strings, lists and dicts are "
                              f"loaded (torch.load with weights_only=True); this file carries other objects or code, "
                              f"or is corrupt ({first})") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{file}: not a readable torch file ({type(exc).__name__}: {exc})") from exc
