"""Many processes with torch.distributed (DESIGN §10.5): ranks, shards and the collectives the
engine needs.

A process started by `torchrun` or `accelerate launch` finds RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT in its environment; the first call to `world()` then joins the process group (gloo
without CUDA, NCCL with it) unless the caller already did. Without those variables everything
here is the single-process identity: one rank, collectives that return their input.

What is sharded: statistics by batches of documents, z and keys by requests. Sums are
all-reduced, per-request rows gathered in request order; one rank (rank 0) writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    rank: int
    size: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every size-th one from position rank (deterministic, balanced when
        the items are sorted by cost)."""
        return list(items[self.rank :: self.size])

    def shard_indices(self, n: int, rank: int | None = None) -> list[int]:
        return list(range(self.rank if rank is None else rank, n, self.size))


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process as one of several."""
    return all(v in os.environ for v in _LAUNCH_VARS) and int(os.environ["WORLD_SIZE"]) > 1


def world() -> World:
    """This process's rank and the number of ranks; joins the launcher's process group on first use."""
    if not dist.is_available():
        return World(0, 1)
    if not dist.is_initialized() and launched():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if not dist.is_initialized():
        return World(0, 1)
    return World(dist.get_rank(), dist.get_world_size())


def local_device(requested: str) -> str:
    """--device for this rank: with several ranks on CUDA, 'auto' means this rank's own GPU
    (LOCAL_RANK), so that ranks on one machine do not all shard the model over every GPU."""
    if requested == "auto" and world().size > 1 and torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return requested


def _comm_device() -> torch.device:
    """Where collectives take their tensors: NCCL reduces CUDA tensors, gloo CPU ones."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all ranks, in place, on its own device and dtype."""
    if world().size == 1:
        return tensor
    buf = tensor.to(_comm_device())
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def gather_rows(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` ([rows, ...], rows may differ between ranks), in rank order, on
    this tensor's device. Sizes are gathered first and the rows padded to the largest."""
    w = world()
    if w.size == 1:
        return [tensor]
    dev = _comm_device()
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(w.size)]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], dtype=torch.long, device=dev))
    sizes = [int(s) for s in sizes]
    padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=dev)
    padded[: tensor.shape[0]] = tensor.to(dev)
    parts = [torch.empty_like(padded) for _ in range(w.size)]
    dist.all_gather(parts, padded)
    return [p[:n].to(tensor.device) for p, n in zip(parts, sizes)]


def gather_sharded(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """The rows of all n items from each rank's rows of its `World.shard` of them, in item order."""
    w = world()
    if w.size == 1:
        return tensor
    parts = gather_rows(tensor)
    out = torch.empty((n, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    for rank, part in enumerate(parts):
        out[w.shard_indices(n, rank)] = part
    return out


def from_main(make: Callable[[], T]) -> T:
    """`make()` run on rank 0 only and its (picklable) result sent to every rank, so that all
    ranks hold one identical value (e.g. sampled context templates). If it raises, every rank
    raises the same error rather than waiting for a value that never comes."""
    w = world()
    if w.size == 1:
        return make()
    box: list[Any] = [None]
    if w.main:
        try:
            box[0] = (True, make())
        except Exception as err:
            box[0] = (False, err)
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    ok, value = box[0]
    if not ok:
        raise value
    return value


def tensor_from_main(make: Callable[[], torch.Tensor], device) -> torch.Tensor:
    """`make()` run on rank 0 only; its tensor on every rank (on `device` elsewhere), bit for bit,
    so that a result every rank applies (e.g. a layer's solve) is one and the same."""
    if world().size == 1:
        return make()
    made: dict[str, torch.Tensor] = {}

    def make_and_describe():
        made["t"] = make()
        return tuple(made["t"].shape), made["t"].dtype

    shape, dtype = from_main(make_and_describe)
    if "t" in made:
        buf = made["t"].to(_comm_device())
        dist.broadcast(buf, src=0)
        return made["t"]
    buf = torch.empty(shape, dtype=dtype, device=_comm_device())
    dist.broadcast(buf, src=0)
    return buf.to(device)


def barrier() -> None:
    """Every rank waits here until all arrive (e.g. until rank 0 has written the files)."""
    if world().size > 1:
        dist.barrier()
