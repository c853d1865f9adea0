"""Sequential (lifelong) editing (DESIGN §11): rounds of edits on one model, each applied on the
model the earlier rounds made.

    seq = SequentialEditor(editor, rule="alphaedit", ledger="ledger/")
    for batch in batches:
        seq.edit_round(batch)
    seq.ledger.revert_last(editor.model, 1)

The rule is any registered method (massedit.methods): "memit" (plain MEMIT per round),
"memit-preserve" (λC + K_p K_pᵀ + K Kᵀ) and "alphaedit" (null-space projection) are the three of
§11. For rules that preserve keys, each round's keys are read on the model after the round (as
the AlphaEdit code does) and their outer products are added to K_p K_pᵀ for the next rounds.
Statistics, the projector and the context templates stay those of the unedited model.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence, Union

import torch

from massedit.editor import EditResult, MassEditor
from massedit.compute.keys import subject_keys
from massedit.edits.ledger import Ledger, LedgerError, requests_digest
from massedit.methods import EditMethod, get_method
from massedit.compute.targets import frozen_eval


class SequentialEditor:
    """Edits `editor.model` in rounds with one rule, optionally recording every round in a ledger.

    With a ledger that already has rounds, the model must be its base (the rounds are replayed,
    bit for bit) or base + its rounds; the earlier rounds' keys and the context templates come from
    the ledger, so the next round is computed exactly as without the interruption.
    """

    def __init__(self, editor: MassEditor, rule: Union[str, EditMethod] = "alphaedit",
                 ledger: Union[Ledger, str, None] = None):
        self.editor = editor
        self.method = get_method(rule)
        if not self.method.edits_in_rounds:
            raise ValueError(f"method {self.method.name!r} does not edit in rounds (sequential editing, ledgers); "
                             "edit all requests in one run")
        self.method.check(editor.hp)
        self.ledger = Ledger(ledger) if ledger is not None and not isinstance(ledger, Ledger) else ledger
        self.preserved: dict[int, torch.Tensor] = {}
        self.results: list[EditResult] = []
        self._keys: list[dict[int, torch.Tensor]] = []  # per round done, its keys per layer
        if self.ledger is not None and self.ledger.header is not None:
            self._resume()

    def _resume(self) -> None:
        ledger = self.ledger
        ledger.check_model(self.editor.model, self.method.name, self.editor.hp)
        if ledger.state_of(self.editor.model) == "base":
            # Statistics (and projectors) come from the unedited model: load or compute them first.
            self.method.layer_solvers(self.editor, None)
        ledger.replay(self.editor.model)
        # Later rounds must see round 1's templates, not ones generated from the edited model.
        self.editor.set_context_templates(ledger.header["context_templates"])
        self._keys = [ledger.keys(i) for i in range(1, len(ledger) + 1)]
        self._accumulate()

    @property
    def rounds_done(self) -> int:
        return len(self._keys)

    def _accumulate(self, rounds: Optional[list] = None) -> None:
        """Add the rounds' K Kᵀ to K_p K_pᵀ per layer; with no argument, recompute it from every round
        done. Summed in round order, so a resumed or reverted editor holds exactly what an
        uninterrupted one would."""
        if rounds is None:
            self.preserved, rounds = {}, self._keys
        for keys in rounds:
            for layer, k in keys.items():
                k = k.to(torch.float64)
                gram = k.T @ k
                self.preserved[layer] = gram if layer not in self.preserved else self.preserved[layer] + gram.to(
                    self.preserved[layer].device)

    def _round_keys(self, requests) -> dict[int, torch.Tensor]:
        ed = self.editor
        templates = ed.context_templates()
        return {l: subject_keys(ed.model, ed.layout, ed.tok, requests, templates, l) for l in ed.hp.layers}

    def edit_round(self, requests: Sequence, batch_size: Optional[int] = None) -> EditResult:
        """Edit one round into the model (applied) and record it; the model is unchanged on failure."""
        ed = self.editor
        if self.ledger is not None:
            # Before any edit: the base digests and round 1's context templates.
            ed.validate(requests)
            self.ledger.start(ed.model, [ed.layout.rewrite_weight_name(l) for l in ed.hp.layers], self.method.name,
                              ed.hp, ed.context_templates(), ed.model_name)
        with frozen_eval(ed.model):
            result = ed.edit(requests, self.method, batch_size, preserved=self.preserved)
            try:
                t = time.perf_counter()
                keys = self._round_keys(result.requests) if self.method.preserves_keys else {}
                result.timings["preserve_keys"] = time.perf_counter() - t
                if self.ledger is not None:
                    self.ledger.append(result.delta, keys, {
                        "method": self.method.name, "n_edits": result.n_edits,
                        "requests_sha256": requests_digest(result.requests), "report": result.report(),
                    })
            except BaseException:
                result.delta.revert(ed.model)
                raise
        self._keys.append(keys)
        self._accumulate([keys])
        self.results.append(result)
        return result

    def revert_last(self, k: int = 1) -> None:
        """Revert the last `k` rounds bit-exactly (and take them off the ledger, if there is one)."""
        if not 1 <= k <= self.rounds_done:
            raise LedgerError(f"can revert 1 to {self.rounds_done} rounds, not {k}")
        if self.ledger is not None:
            self.ledger.revert_last(self.editor.model, k)
        else:
            if k > len(self.results):
                raise LedgerError(f"only the {len(self.results)} rounds of this session can be reverted without a ledger")
            for result in reversed(self.results[-k:]):
                result.delta.revert(self.editor.model)
        del self._keys[-k:]
        del self.results[max(0, len(self.results) - k):]
        self._accumulate()

    def pending(self, rounds: Sequence[Sequence]) -> list[list]:
        """The rounds not yet done: the ledger's recorded rounds must be the first of `rounds`."""
        done = self.ledger.rounds() if self.ledger is not None else []
        if len(done) > len(rounds):
            raise LedgerError(f"ledger {self.ledger.path} has {len(done)} rounds, more than the {len(rounds)} given")
        for i, info in enumerate(done):
            if info["requests_sha256"] != requests_digest(self.editor.validate(rounds[i])):
                raise LedgerError(f"ledger {self.ledger.path} round {i + 1} edited other requests than round {i + 1} "
                                  "here (same requests and round size?); use a new ledger directory")
        return [list(r) for r in rounds[len(done):]]


def split_rounds(requests: Sequence, round_size: int) -> list[list]:
    if round_size < 1:
        raise LedgerError(f"round size must be at least 1, got {round_size}")
    return [list(requests[i : i + round_size]) for i in range(0, len(requests), round_size)]
