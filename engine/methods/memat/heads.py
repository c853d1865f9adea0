"""Attention heads: reading their outputs, adding corrections to them, folding those into a bias.

A head's output is its slice of the attention output projection's input (`ModelLayout` says
which module that is, and n_heads / head_dim), read and changed with forward pre-hooks, so
every registry family works alike. Adding ω_h to head h's slice at every position adds
W_O[:, slice_h]·ω_h to the projection's output everywhere, which is what a bias does: the
correction is kept as that bias change (`fold_into_bias`), summed over the heads of a layer.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterator, Sequence

import torch

from massedit.model.arch import ModelLayout
from massedit.edits.delta import WeightDelta
from massedit.model.devices import input_device, read_parameter
from massedit.model.hooks import capture_inputs, capture_outputs, hooks, run_until
from massedit.inputs.tokens import Batch, pad, pad_id_of, padding_side

Head = tuple[int, int]  # (layer, head)


def head_outputs(model, layout: ModelLayout, tok, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Every head's output at the last token of each text: [n_layers, n_heads, len(texts), head_dim],
    float32 on the host."""
    n_layers, n_heads, head_dim = layout.n_layers, layout.n_heads, layout.head_dim
    modules = {str(l): layout.attn_out_module(l) for l in range(n_layers)}
    out = torch.empty(n_layers, n_heads, len(texts), head_dim)
    side, pad_id, device = padding_side(tok), pad_id_of(tok), input_device(model)
    for start in range(0, len(texts), batch_size):
        seqs = [tok(t, add_special_tokens=True)["input_ids"] for t in texts[start : start + batch_size]]
        batch = pad(seqs, pad_id, side, device)
        rows = torch.arange(len(seqs))
        cols = batch.shift + batch.lengths - 1
        store: dict = {}
        with torch.no_grad(), capture_inputs(modules, store):
            run_until(model, modules[str(n_layers - 1)], **batch.model_inputs(), use_cache=False)
        for l in range(n_layers):
            x = store[str(l)]
            last = x[rows.to(x.device), cols.to(x.device)].float().cpu()
            out[l, :, start : start + len(seqs)] = last.view(len(seqs), n_heads, head_dim).transpose(0, 1)
    return out


def _by_layer(heads: Sequence[Head]) -> dict[int, list[tuple[int, int]]]:
    """layer -> [(head, index into `heads`)]."""
    grouped = defaultdict(list)
    for k, (layer, head) in enumerate(heads):
        grouped[layer].append((head, k))
    return dict(grouped)


@contextlib.contextmanager
def head_corrections(layout: ModelLayout, heads: Sequence[Head], omega: torch.Tensor) -> Iterator[None]:
    """While active, ω[k] [head_dim] is added to head heads[k]'s output at every position (gradients
    flow to ω); corrections of heads that share a layer add up."""
    n_heads, head_dim = layout.n_heads, layout.head_dim

    def make(members):
        index = torch.tensor([h for h, _ in members])
        rows = torch.tensor([k for _, k in members])

        def pre_hook(_module, args, kwargs):
            key = None if args else next(iter(kwargs))  # the input passed by keyword (Linear: input, Conv1D: x)
            x = args[0] if args else kwargs[key]
            add = torch.zeros(n_heads, head_dim, dtype=omega.dtype, device=omega.device)
            add = add.index_add(0, index.to(omega.device), omega[rows.to(omega.device)])
            x = x + add.reshape(-1).to(x.device, x.dtype)
            if args:
                return (x,) + tuple(args[1:]), kwargs
            return args, {**kwargs, key: x}

        return pre_hook

    grouped = _by_layer(heads)
    with hooks(lambda: [layout.attn_out_module(l).register_forward_pre_hook(make(m), with_kwargs=True)
                        for l, m in grouped.items()]):
        yield


def fold_into_bias(model, layout: ModelLayout, heads: Sequence[Head], omega: torch.Tensor) -> list[WeightDelta]:
    """One bias delta per layer with selected heads: Δb = Σ_h W_O[:, slice_h]·ω_h, kept as its terms
    (u [d_model, K_l], one column per head; v = ones [1, K_l]) in float64."""
    head_dim = layout.head_dim
    deltas = []
    for layer, members in sorted(_by_layer(heads).items()):
        name = layout.attn_out_name(layer)
        weight = read_parameter(model, f"{name}.weight").double()
        # W_O in [out, in] layout: GPT-2's Conv1D stores it [in, out].
        w_o = weight.T if layout.attn_out_is_conv1d(layer) else weight
        columns = [w_o[:, h * head_dim : (h + 1) * head_dim] @ omega[k].detach().to(w_o.device, torch.float64)
                   for h, k in members]
        u = torch.stack(columns, dim=1).cpu()
        deltas.append(WeightDelta(f"{name}.bias", u, torch.ones(1, len(members), dtype=torch.float64), vector=True))
    return deltas


def logits_at(model, layout: ModelLayout, batch: Batch, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """LM logits at (rows, cols) of a padded batch, from the last block's output (gradients kept)."""
    last = layout.block(layout.n_layers - 1)
    store: dict = {}
    with capture_outputs({"h": last}, store):
        run_until(model, last, **batch.model_inputs(), use_cache=False)
    h = store["h"]
    return layout.logits(h[rows.to(h.device), cols.to(h.device)])
