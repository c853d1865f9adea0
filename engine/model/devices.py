"""Where a module executes, and how to read and write a parameter that Accelerate may have offloaded.

With a `device_map`, `cpu_offload` or `disk_offload`, Accelerate leaves offloaded parameters on
the `meta` device and attaches an `AlignDevicesHook` that moves the real values (from its
`weights_map`: CPU tensors, or memory-mapped files in the offload folder) to
`hook.execution_device` for each forward. So the device of a module's parameters says nothing
about where it computes, and a parameter's value may live only in a weights map. Every stage asks
here instead of looking at `parameter.device`.
"""
from __future__ import annotations

from typing import Optional

import torch
from accelerate.hooks import AlignDevicesHook, SequentialHook
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, offload_weight
from torch import nn
from torch.distributed.tensor import DTensor


def _align_hook(module: nn.Module) -> Optional[AlignDevicesHook]:
    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    return next((h for h in hooks if isinstance(h, AlignDevicesHook)), None)


def _as_device(device) -> torch.device:
    # Accelerate stores GPU execution devices as bare indices.
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def execution_device(module: nn.Module) -> torch.device:
    """The device `module` computes on: its (or its first hooked submodule's) Accelerate execution
    device, else the device of its first materialized parameter or buffer; CPU for a module that
    holds nothing."""
    for sub in module.modules():
        hook = _align_hook(sub)
        if hook is not None and hook.execution_device is not None:
            return _as_device(hook.execution_device)
        for t in (*sub.parameters(recurse=False), *sub.buffers(recurse=False)):
            if t.device.type != "meta":
                return t.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where the model's input ids go: the execution device of its input embedding (of the module
    itself for a wrapper that has none)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return execution_device(embeddings if embeddings is not None else model)


def _offload_slot(model: nn.Module, name: str):
    """(weights map without prefixes, full key) holding parameter `name` of an offloaded module,
    or None when the parameter is not offloaded. The hook may sit on the owner or, with
    place_submodules, on an ancestor, whose weights map is keyed relative to it."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = model.get_submodule(".".join(parts[:cut]))
        hook = _align_hook(owner)
        if hook is None or not hook.offload or hook.weights_map is None:
            continue
        mapping, key = hook.weights_map, ".".join(parts[cut:])
        while isinstance(mapping, PrefixedDataset):
            mapping, key = mapping.dataset, mapping.prefix + key
        if _holds(mapping, key):
            return mapping, key
    return None


def _holds(mapping, key: str) -> bool:
    # Mapping's `in` would load the tensor (from disk, for an offload file) just to test for it.
    if isinstance(mapping, OffloadedWeightsLoader):
        return key in mapping.state_dict or key in mapping.index
    return key in mapping


def read_parameter(model: nn.Module, name: str) -> torch.Tensor:
    """The stored value of parameter `name` (detached): the parameter itself (of a DTensor, the
    shard this rank holds: see massedit.model.sharded.local_part), or, when it is
    offloaded, its weights-map value, always on the CPU (Accelerate loads a weight it reads from a
    checkpoint onto the execution device, one from an offload file onto the CPU; exact revert
    needs the same device at apply and at revert time)."""
    param = model.get_parameter(name)
    if isinstance(param, DTensor):
        return param.detach().to_local()
    if param.device.type != "meta":
        return param.detach()
    slot = _offload_slot(model, name)
    if slot is None:
        raise ValueError(f"{name} is on the meta device and no Accelerate hook holds its value; "
                         "load the model with its weights (or with a device_map) before editing")
    mapping, key = slot
    return mapping[key].detach().cpu()


def write_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Store `value` (same shape and dtype) as parameter `name`, bit for bit, everywhere it lives:
    the materialized parameter, and for an offloaded one its weights-map tensor (CPU offload) or
    its offload file (disk offload), so later forwards and save_pretrained see it.

    A disk-offloaded weight that Accelerate reads straight from the model's own checkpoint is
    redirected to a file in the offload folder: the user's checkpoint is never written."""
    param = model.get_parameter(name)
    if isinstance(param, DTensor):
        param = param.detach().to_local()  # this rank's shard, written in place
    if value.shape != param.shape or value.dtype != param.dtype:
        raise ValueError(f"{name}: cannot store a {value.dtype} {tuple(value.shape)} value in a "
                         f"{param.dtype} {tuple(param.shape)} parameter")
    with torch.no_grad():
        if param.device.type != "meta":
            param.copy_(value.to(param.device))
        slot = _offload_slot(model, name)
        if slot is None:
            if param.device.type == "meta":
                raise ValueError(f"{name} is on the meta device and no Accelerate hook holds its value")
            return
        mapping, key = slot
        if isinstance(mapping, OffloadedWeightsLoader) and key not in mapping.state_dict:
            if mapping.save_folder is None:
                raise ValueError(f"{name} is offloaded to disk without an offload folder to write the edit to; "
                                 "load the model with offload_folder=DIR")
            offload_weight(value.detach().cpu(), key, mapping.save_folder, index=mapping.index)
            return
        stored = mapping.state_dict if isinstance(mapping, OffloadedWeightsLoader) else mapping
        # In place: the same CPU tensor may also be referenced elsewhere (tied weights, the
        # state dict cpu_offload was given).
        stored[key].copy_(value.to(stored[key].device))


def offloaded_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with offloaded parameters read from their weights maps (on CPU), for
    `model.save_pretrained(dir, state_dict=...)` of a model offloaded by hand (cpu_offload /
    disk_offload); models loaded with a device_map need nothing, save_pretrained reads them."""
    return {name: read_parameter(model, name) if tensor.device.type == "meta" else tensor
            for name, tensor in model.state_dict().items()}
