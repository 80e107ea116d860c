"""Data parallelism for the ``fam`` commands on torch.distributed.

The launcher (``torchrun``, ``accelerate launch``, a cluster's srun wrapper around
torchrun) starts the processes and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init` joins the process group from that
environment (``env://``): gloo on the CPU, nccl with one GPU per process
(``cuda:LOCAL_RANK``). Without those variables the process runs alone (rank 0 of 1)
and nothing is initialised. Only small Python objects travel between processes
(``*_object`` collectives); the work itself is sharded by index.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    initialized: bool = False  # this module created the process group (and destroys it in close())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str:
        """``"rank 1/4"`` (``""`` when alone): prefix for progress lines."""
        return f"rank {self.rank}/{self.world_size}" if self.world_size > 1 else ""

    def close(self) -> None:
        if self.initialized:
            import torch.distributed as dist

            dist.destroy_process_group()


def env_rank() -> int:
    """The rank the launcher gave this process (0 when alone); readable before :func:`init`."""
    return int(os.environ.get("RANK", "0") or 0)


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def resolve_device(requested: Optional[str], local_rank: int) -> str:
    """``requested`` (e.g. "cuda", "cuda:1", "cpu"), default cuda when available; a bare
    "cuda" becomes this process's GPU, ``cuda:LOCAL_RANK``."""
    import torch

    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        device = f"cuda:{local_rank}"
    return device


def init(device: Optional[str] = None) -> Context:
    """Join the launcher's process group (or run alone); returns this process's Context.
    ``device``: as for :func:`resolve_device`."""
    import torch

    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    resolved = resolve_device(device, local_rank)
    if world_size == 1:
        return Context(device=resolved)
    import torch.distributed as dist

    on_gpu = resolved.startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(torch.device(resolved))
    if dist.is_initialized():  # e.g. accelerate's PartialState created it already
        return Context(dist.get_rank(), dist.get_world_size(), local_rank, resolved, initialized=False)
    dist.init_process_group(backend="nccl" if on_gpu else "gloo", init_method="env://",
                            **({"device_id": torch.device(resolved)} if on_gpu else {}))
    return Context(dist.get_rank(), dist.get_world_size(), local_rank, resolved, initialized=True)


def shard(items: Sequence[T], rank: int, world_size: int) -> List[T]:
    """Static interleaving: items ``rank, rank + world_size, ...``."""
    return list(items[rank::world_size])


def all_gather(ctx: Context, obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if ctx.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def gather_to_main(ctx: Context, obj: Any) -> Optional[List[Any]]:
    """Every rank's ``obj`` in rank order on rank 0; None on the other ranks."""
    if ctx.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: Optional[List[Any]] = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(ctx: Context, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (the others pass anything, e.g. None)."""
    if ctx.world_size == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: Context) -> None:
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
