"""The method interface and the name → method registry (PEFT's model_type → class mapping style)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Optional, Sequence

import torch

from massedit.edits.delta import WeightDelta
from massedit.hparams import MEMITHyperParams, register_hparams
from massedit.inputs.requests import EditRequest
from massedit.compute.targets import ZResult


class EditMethod(ABC):
    """Turns validated requests into weight deltas on an editor's model, leaving the model unchanged.

    `name` is the registry key (`--method` on the CLI); `hparams_class` declares its hyperparameter
    keys (MEMITHyperParams, or a dataclass subclass of it adding the method's own keys, which hparams
    files may then carry); `hparams_family` is the preset family `default_for` uses for it ("memit"
    or "rome"). `preserves_keys`: the method's solves use the keys
    of earlier rounds (`preserved`, per layer K_p K_pᵀ), so sequential editing collects them.
    `shards_requests`: it runs under torch.distributed, each rank taking a share of the requests
    (massedit.model.parallel); the others are refused with several processes. `edits_in_rounds`: it may
    run as one round of sequential editing (massedit.edits.sequential, ledgers).
    """

    name: ClassVar[str]
    hparams_class: ClassVar[type[MEMITHyperParams]] = MEMITHyperParams
    hparams_family: ClassVar[str] = "memit"
    preserves_keys: ClassVar[bool] = False
    shards_requests: ClassVar[bool] = False
    edits_in_rounds: ClassVar[bool] = True

    def check(self, hp) -> None:
        """Raise a one-line error for hparams this method cannot use, before any work."""

    def hparams(self, editor) -> MEMITHyperParams:
        """The editor's hparams as this method's `hparams_class` (its own keys at their defaults where
        the editor's hparams lack them)."""
        return self.hparams_class.from_hparams(editor.hp)

    @classmethod
    def add_arguments(cls, parser) -> list[str]:
        """Add this method's own `massedit edit` options; returns their argparse dests."""
        return []

    @classmethod
    def from_args(cls, args) -> "EditMethod":
        """The method configured from `massedit edit`'s parsed arguments (its own options included)."""
        return cls()

    def check_requests(self, requests: Sequence[EditRequest], editor=None) -> None:
        """Raise a one-line error for requests this method cannot edit (MEMAT: each needs its
        second-language record), before any model work; with `editor`, also against its model and
        tokenizer, before statistics or any optimization."""

    def check_saved_model(self, layout) -> None:
        """Raise a one-line error when the edited model, saved with save_pretrained, would not reload
        with the edit in effect (the CLI asks before editing a model it will save)."""

    def additions(self):
        """Parameters the last `compute` needs added to the model (a `massedit.edits.delta.ParameterAdditions`),
        or None."""
        return None

    def details(self) -> dict:
        """Method-specific results of the last `compute` (JSON-serializable), reported beside the timings."""
        return {}

    def layer_solvers(self, editor, preserved: Optional[dict[int, torch.Tensor]] = None) -> dict:
        """Per edited layer, an object whose `solve(keys [d, n])` returns X [d, n] with Δ = R Xᵀ and whose
        `device` says where it keeps its state (ΔW factors are kept there too)."""
        return editor.solvers()

    @abstractmethod
    def compute(self, editor, requests: Sequence[EditRequest], templates, solvers: dict, timings: dict[str, float],
                batch_size: Optional[int]) -> tuple[list[WeightDelta], ZResult]:
        """The weight deltas and the per-request targets; adds its phases' seconds to `timings`."""


METHODS: dict[str, type[EditMethod]] = {}


def register_method(cls: type[EditMethod]) -> type[EditMethod]:
    """Class decorator: make `cls` available as `cls.name` to MassEditor.edit and the CLI, and the keys
    of its `hparams_class` to hparams files."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute `name` to be registered")
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"method {name!r} is already registered ({METHODS[name].__name__})")
    register_hparams(name, cls.hparams_class)
    METHODS[name] = cls
    return cls


def method_names() -> list[str]:
    return list(METHODS)


def get_method(method) -> EditMethod:
    """An EditMethod instance as it is, or a new instance of the registered method of that name."""
    if isinstance(method, EditMethod):
        return method
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return METHODS[method]()
