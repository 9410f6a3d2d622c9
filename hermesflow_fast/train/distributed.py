"""Process-group setup and model wrapping for ``torchrun`` (one process per device; gloo on CPU, NCCL on CUDA).

    torchrun --nproc-per-node 2 -m hermesflow_fast.train --config configs/tiny.yaml --run-dir runs/x
    hermesflow train --nproc 2 --config configs/tiny.yaml --run-dir runs/x        # the same, torchrun underneath

Without torchrun's environment (RANK/WORLD_SIZE) everything runs as one process and no group is created.
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Imported before any process group exists, on purpose: torch.distributed.nn.functional declares its collectives
# with `group=group.WORLD` as a default argument, evaluated when the module is first imported. Imported after
# init_process_group (DDP's construction imports it), those defaults hold the group for the life of the process,
# destroy_process_group cannot free it, and gloo's worker threads live on into interpreter exit, where they race the
# process's teardown: "terminate called without an active exception" (SIGABRT) on a rank in some runs.
import torch.distributed.nn  # noqa: F401, E402  (isort: keep after torch.distributed)
from torch import nn

__all__ = ["DistInfo", "all_reduce_sum", "barrier", "init_distributed", "shutdown", "wrap_model"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str = "auto", device: str | None = None) -> DistInfo:
    """Read torchrun's environment, pick the device (cuda:LOCAL_RANK when CUDA is there) and init the group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA device(s): "
                               f"--nproc must be ≤ the number of GPUs")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        be = backend if backend != "auto" else ("nccl" if cuda else "gloo")
        dist.init_process_group(be, timeout=datetime.timedelta(minutes=30),
                                **({"device_id": dev} if be == "nccl" else {}))
    return DistInfo(rank, world, local, dev)


def shutdown() -> None:
    """Destroy the process group; its backend (gloo's threads, NCCL's communicators) goes with the last reference.

    Call it after the models wrapped by ``wrap_model`` are dropped (DDP's reducer and FSDP's state hold the group):
    a backend still alive at interpreter exit can abort the process."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if "torch.distributed.tensor" in sys.modules:  # FSDP2's DTensors ran: their sharding caches hold the mesh
        try:
            from torch.distributed.tensor.debug import _clear_sharding_prop_cache

            _clear_sharding_prop_cache()
        except (ImportError, AttributeError, RuntimeError):  # another torch release: the group may outlive us
            pass
    gc.collect()  # wrappers caught in reference cycles release the group now, not during interpreter teardown


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (a no-op in one process); float64 stays float64 on gloo."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap_model(module: nn.Module, info: DistInfo, strategy: str = "ddp") -> nn.Module:
    """DDP (default) or FSDP2 ``fully_shard`` per transformer block and at the root; unchanged in one process."""
    if not info.distributed:
        return module
    if strategy == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in module.policy.model.layers:
            fully_shard(layer)
        fully_shard(module)
        return module
    raise ValueError(f"dist.strategy {strategy!r}: expected 'ddp' or 'fsdp'")
