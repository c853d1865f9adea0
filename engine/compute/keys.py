"""Keys and hidden states at subject tokens (DESIGN §2.3, §2.5), batched over all prompts.

One no-grad forward per batch of prompts, stopped after the deepest block that is needed.
"""
from __future__ import annotations

from typing import Sequence

import torch

from massedit.model.arch import ModelLayout
from massedit.model.devices import execution_device, input_device
from massedit.model.hooks import capture_inputs, capture_outputs, replayed, run_until
from massedit.inputs.requests import EditRequest
from massedit.inputs.tokens import Encoded, compose, encode_prompt, pad, pad_id_of, padding_side


@torch.no_grad()
def collect_at_subject(
    model,
    layout: ModelLayout,
    tok,
    encoded: Sequence[Encoded],
    key_layers: Sequence[int] = (),
    hidden_layers: Sequence[int] = (),
    batch_size: int = 256,
) -> dict[tuple[str, int], torch.Tensor]:
    """{("key", l): [rows, d_ff], ("hidden", l): [rows, d]} at each prompt's subject token, float32.

    In a causal model the states at the subject token depend only on the tokens up to it, so each
    prompt is cut after its subject and identical cuts (same context, same subject, prompts
    that differ only after the subject) are computed once.
    """
    stop = layout.block(max([*key_layers, *hidden_layers]))
    key_mods = {f"key{l}": layout.rewrite_module(l) for l in key_layers}
    hid_mods = {f"hidden{l}": layout.block(l) for l in hidden_layers}
    unique: dict[tuple[int, ...], int] = {}
    index = torch.tensor([unique.setdefault(tuple(e.ids[: e.subject_index + 1]), len(unique)) for e in encoded])
    cuts = sorted(unique, key=len)  # similar lengths together: less padding
    rank = torch.empty(len(cuts), dtype=torch.long)
    rank[torch.tensor([unique[c] for c in cuts])] = torch.arange(len(cuts))
    pieces: dict[str, list[torch.Tensor]] = {name: [] for name in (*key_mods, *hid_mods)}
    device = input_device(model)
    for start in range(0, len(cuts), batch_size):
        rows = cuts[start : start + batch_size]
        batch = pad(rows, pad_id_of(tok), padding_side(tok), device)
        cols = torch.tensor([len(r) - 1 for r in rows]) + batch.shift
        store: dict = {}
        with capture_inputs(key_mods, store), capture_outputs(hid_mods, store):
            run_until(model, stop, **batch.model_inputs())
        width = batch.input_ids.shape[1]
        for name in pieces:
            t = store[name].reshape(len(rows), width, -1)  # OPT feeds its MLP [batch·seq, d]
            pieces[name].append(t[torch.arange(len(rows), device=t.device), cols.to(t.device)].float())
    out = {}
    for name, parts in pieces.items():
        kind, layer = ("key", int(name[3:])) if name.startswith("key") else ("hidden", int(name[6:]))
        rows = torch.cat(parts)
        out[(kind, layer)] = rows[rank[index].to(rows.device)]
    return out


def template_prompts(tok, requests: Sequence[EditRequest], templates: Sequence[Sequence[str]]) -> list[Encoded]:
    """Request-major, then template-major list of encoded context-template prompts."""
    return [
        encode_prompt(tok, compose(ctx, r.prompt), r.subject) for r in requests for group in templates for ctx in group
    ]


def group_mean(per_prompt: torch.Tensor, n_requests: int, templates: Sequence[Sequence[str]]) -> torch.Tensor:
    """Mean within each template group, then over groups: [n·T, d] → [n, d]."""
    x = per_prompt.view(n_requests, sum(len(g) for g in templates), -1)
    means, start = [], 0
    for group in templates:
        means.append(x[:, start : start + len(group)].mean(1))
        start += len(group)
    return torch.stack(means, 1).mean(1)


def subject_keys(model, layout, tok, requests, templates, layer: int, batch_size: int = 256) -> torch.Tensor:
    """k_i^l averaged over context templates: [n, d_ff] float32."""
    enc = template_prompts(tok, requests, templates)
    keys = collect_at_subject(model, layout, tok, enc, key_layers=[layer], batch_size=batch_size)[("key", layer)]
    return group_mean(keys, len(requests), templates)


def subject_hidden(model, layout, tok, requests, layer: int, batch_size: int = 256) -> torch.Tensor:
    """Block-`layer` output at the subject token of each bare prompt: [n, d] float32."""
    enc = [encode_prompt(tok, r.prompt, r.subject) for r in requests]
    return collect_at_subject(model, layout, tok, enc, hidden_layers=[layer], batch_size=batch_size)[("hidden", layer)]


class LayerStates:
    """Keys at each edited layer and h^L, for MEMIT's layer loop, without recomputing what no edit changed.

    Layer l_j's keys are read with l_0..l_{j-1} edited. Blocks before l_{j-1} are the same as in
    the previous pass, so each pass records the residual stream entering its own edited block
    and the next pass replays everything before that block from the record: pass j runs blocks
    l_{j-1}..l_j (and on to L for the bare prompts, which also give h^L) instead of 0..l_j.
    Prompts are cut after the subject and identical cuts computed once, as in collect_at_subject.
    """

    def __init__(self, model, layout: ModelLayout, tok, requests: Sequence[EditRequest], templates,
                 target_layer: int, batch_size: int = 256):
        self.model, self.layout, self.templates, self.n = model, layout, templates, len(requests)
        self.target_layer = target_layer
        self.pad_id = pad_id_of(tok)
        keyed = template_prompts(tok, requests, templates)
        bare = [encode_prompt(tok, r.prompt, r.subject) for r in requests]
        unique: dict[tuple[int, ...], int] = {}
        self.key_index = torch.tensor([unique.setdefault(tuple(e.ids[: e.subject_index + 1]), len(unique)) for e in keyed])
        self.bare_index = torch.tensor([unique.setdefault(tuple(e.ids[: e.subject_index + 1]), len(unique)) for e in bare])
        cuts = list(unique)
        needs_h = set(self.bare_index.tolist())
        # Batches hold either only cuts that also give h^L or none, so only the former run up to L.
        groups = [sorted((c for c in range(len(cuts)) if (c in needs_h) == flag), key=lambda c: len(cuts[c]))
                  for flag in (True, False)]
        self.batches = [(ids[i : i + batch_size], flag) for ids, flag in zip(groups, (True, False))
                        for i in range(0, len(ids), batch_size)]
        self.cuts = cuts
        self.records: list = [None] * len(self.batches)  # (first block to run, replay outputs)

    @torch.no_grad()
    def at_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys [n, d_ff] averaged over templates, h^L [n, d]) with the model as edited so far."""
        L, device = self.target_layer, input_device(self.model)
        key_rows = torch.empty(len(self.cuts), self.layout.key_dim(layer),
                               device=execution_device(self.layout.rewrite_module(layer)))
        hidden_rows = torch.empty(len(self.cuts), self.layout.hidden_size, device=execution_device(self.layout.block(L)))
        for b, (ids, wants_h) in enumerate(self.batches):
            rows = [self.cuts[c] for c in ids]
            batch = pad(rows, self.pad_id, "right", device)
            cols = torch.tensor([len(r) - 1 for r in rows])
            store, raw = {}, {}
            mods = {"key": self.layout.rewrite_module(layer)}
            outs = {"hidden": self.layout.block(L)} if wants_h else {}
            record_block = layer - 1
            hooks = [self.layout.block(record_block).register_forward_hook(
                lambda _m, _a, o: raw.__setitem__("out", o))] if record_block >= 0 else []
            replays = self.records[b] or {}
            try:
                with replayed(self.layout, replays), capture_inputs(mods, store), capture_outputs(outs, store):
                    run_until(self.model, self.layout.block(max(layer, L) if wants_h else layer),
                              **batch.model_inputs())
            finally:
                for h in hooks:
                    h.remove()
            width = batch.input_ids.shape[1]
            take = torch.arange(len(rows))
            key = store["key"].reshape(len(rows), width, -1)  # OPT feeds its MLP [batch·seq, d]
            key_rows[torch.tensor(ids)] = key[take.to(key.device), cols.to(key.device)].float().to(key_rows.device)
            if wants_h:
                h = store["hidden"]
                hidden_rows[torch.tensor(ids)] = h[take.to(h.device), cols.to(h.device)].float().to(hidden_rows.device)
            if "out" in raw:  # the next pass starts at this edited block, fed by the recorded stream
                self.records[b] = {l: raw["out"] for l in range(layer)}
        keys = group_mean(key_rows[self.key_index.to(key_rows.device)], self.n, self.templates)
        return keys, hidden_rows[self.bare_index.to(hidden_rows.device)]
