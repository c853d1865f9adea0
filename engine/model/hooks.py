"""Forward hooks that read and edit activations, for every transformers version.

Blocks return a tuple in transformers 4.x and a bare tensor in 5.x; these helpers accept both
and hand back the same structure they were given.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the activations it needs are captured."""


def hidden_of(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def with_hidden(output, hidden: torch.Tensor):
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden


@contextlib.contextmanager
def hooks(handles_factory: Callable[[], list]) -> Iterator[None]:
    handles = handles_factory()
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_inputs(modules: dict[str, nn.Module], store: dict[str, torch.Tensor]) -> Iterator[None]:
    """Record each module's first positional input into `store[name]` (e.g. MLP keys)."""

    def make(name):
        def pre_hook(_module, args, kwargs):
            store[name] = args[0] if args else next(iter(kwargs.values()))

        return pre_hook

    with hooks(lambda: [m.register_forward_pre_hook(make(n), with_kwargs=True) for n, m in modules.items()]):
        yield


@contextlib.contextmanager
def capture_outputs(modules: dict[str, nn.Module], store: dict[str, torch.Tensor]) -> Iterator[None]:
    """Record each module's (hidden) output into `store[name]`."""

    def make(name):
        def hook(_module, _args, output):
            store[name] = hidden_of(output)

        return hook

    with hooks(lambda: [m.register_forward_hook(make(n)) for n, m in modules.items()]):
        yield


@contextlib.contextmanager
def edit_output(module: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the module's hidden output h by fn(h)."""

    def hook(_module, _args, output):
        return with_hidden(output, fn(hidden_of(output)))

    with hooks(lambda: [module.register_forward_hook(hook)]):
        yield


@contextlib.contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """End the forward pass right after `module` ran; catch StopForward around the call."""

    def hook(_module, _args, _output):
        raise StopForward

    with hooks(lambda: [module.register_forward_hook(hook)]):
        yield


def run_until(model: nn.Module, stop_module: nn.Module | None, **inputs) -> None:
    """Forward `model` on inputs, stopping after `stop_module` (None: run to the end)."""
    if stop_module is None:
        model(**inputs)
        return
    with stop_after(stop_module):
        try:
            model(**inputs)
        except StopForward:
            pass


class Replay(nn.Module):
    """Stands in for a block whose output is known: returns it without computing anything.

    Attribute reads fall through to the real block, since model code may consult them (for
    example the attention type of a layer)."""

    def __init__(self, block: nn.Module, output):
        super().__init__()
        object.__setattr__(self, "_block", block)
        object.__setattr__(self, "_output", output)

    def forward(self, *args, **kwargs):
        return self._output

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)


@contextlib.contextmanager
def replayed(layout, outputs: dict) -> Iterator[None]:
    """Swap blocks {layer: output} for replays inside their ModuleList for the duration."""
    parent_name, _, _ = layout.block_name(0).rpartition(".")
    parent = layout.model.get_submodule(parent_name)
    originals = {l: parent[l] for l in outputs}
    try:
        for l, out in outputs.items():
            parent[l] = Replay(originals[l], out)
        yield
    finally:
        for l, block in originals.items():
            parent[l] = block
