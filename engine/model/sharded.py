"""Models a training job holds wrapped (DESIGN §15): DDP replicas and FSDP2 shards.

DDP (`DistributedDataParallel`) keeps a full replica on every rank behind a wrapper whose module
paths start with "module.": the editor works on `unwrap(model)`, and every rank adds the same ΔW.

FSDP2 (`torch.distributed.fsdp.fully_shard`) swaps the model's class in place and keeps each
parameter as a DTensor sharded over a DeviceMesh; its forwards all-gather each unit's parameters
and free them again afterwards, one collective per unit and forward, so every rank must run the
same forwards. An edit does not: requests are sharded over ranks, z stops early per request, and
the context templates are sampled on rank 0 alone. `gathered(model)` therefore has FSDP2 gather
every unit once (its own `unshard`) and keep it gathered for the block, which makes the forwards
free of collectives. Outside that block a parameter is this rank's shard: `local_part(param)`
says which block of the full weight it is, so that an edit adds only those rows of ΔW, computed
from the low-rank factors.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterator, Optional

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.nn.parallel import DataParallel, DistributedDataParallel

# Models inside a `gathered` block: nested blocks (an edit generating its context templates) leave
# the gathering to the outermost.
_GATHERED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def unwrap(model: nn.Module) -> nn.Module:
    """The model a DDP (or DataParallel) wrapper holds, whose parameter names the edit uses; any
    other model as it is (FSDP2 keeps the model itself)."""
    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def _fsdp_units(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """For an FSDP2 model: every unit's parameters all-gathered on entry (on every rank: a
    collective) and kept so until the block ends, when they are sharded again and FSDP2's
    reshard settings are put back. Inside, forwards and backwards run no collectives, so ranks may
    run different forwards, and a parameter is the full (unsharded) tensor. Anything else: nothing."""
    units = _fsdp_units(model)
    if not units or model in _GATHERED:
        yield
        return
    # FSDP2 has setters for its reshard settings but no getters: they are read from its state.
    settings = [(unit, [(g.post_forward_mesh_info is not None, g.reshard_after_backward)
                        for g in unit._get_fsdp_state()._fsdp_param_groups]) for unit in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.set_reshard_after_backward(False, recurse=False)
        unit.unshard()
    _GATHERED.add(model)
    try:
        yield
    finally:
        _GATHERED.discard(model)
        for unit, groups in settings:
            unit.reshard()
        if isinstance(model, FSDPModule):
            # The edit stops forwards early (massedit.model.hooks.run_until raises past the last layer
            # it needs), which leaves FSDP2 mid-forward: its recovery for aborted forwards clears that.
            model.reset_iter_state()
        for unit, groups in settings:
            if groups:
                after_forward, after_backward = groups[0]
                unit.set_reshard_after_forward(after_forward, recurse=False)
                unit.set_reshard_after_backward(after_backward, recurse=False)


def local_part(param: torch.Tensor) -> Optional[tuple[slice, ...]]:
    """For a DTensor: the block of the full tensor this rank holds (one slice per dimension), from
    its placements (Shard cuts a dimension as torch.chunk does, over one mesh dimension after the
    other; Replicate keeps it whole). None for an ordinary tensor."""
    if not isinstance(param, DTensor):
        return None
    mesh, coordinate = param.device_mesh, param.device_mesh.get_coordinate()
    if coordinate is None:
        raise ValueError("this rank holds no part of a DTensor being edited: run the edit on the ranks of its mesh")
    ranges = [range(n) for n in param.shape]
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard:
            raise ValueError(f"cannot edit a DTensor placed as {placement}: only Shard and Replicate placements "
                             "(FSDP2, tensor-parallel row or column shards) are supported")
        d = placement.dim
        chunks = torch.arange(len(ranges[d])).chunk(mesh.size(mesh_dim))
        chunk = chunks[coordinate[mesh_dim]] if coordinate[mesh_dim] < len(chunks) else chunks[0][:0]
        ranges[d] = ranges[d][int(chunk[0]) : int(chunk[-1]) + 1] if len(chunk) else ranges[d][:0]
    index = tuple(slice(r.start, r.stop) for r in ranges)
    local = tuple(param.to_local().shape)
    if tuple(len(r) for r in ranges) != local:
        raise ValueError(f"cannot tell which part of a {tuple(param.shape)} DTensor placed as {param.placements} "
                         f"this rank's {local} shard is")
    return index
