"""Spreading the update over the edited layers (DESIGN §2.5).

For each edited layer in increasing order: keys K^l and h^L are recomputed on the model as edited
so far, the residual (z − h^L) is divided by the number of layers left, and
Δ^l = R ((λC + KKᵀ)⁻¹K)ᵀ is applied before the next layer's keys are read. Δ^l is kept as its two
factors (R and the solved keys). If anything fails, the layers applied so far are reverted, so
the model is returned exactly as it came.

Under torch.distributed each rank reads the keys and h^L of its share of the requests, the rows
are gathered, rank 0 solves and sends the result, and every rank applies the same Δ^l.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
from tqdm.auto import tqdm

from massedit.model import parallel
from massedit.model.arch import ModelLayout
from massedit.edits.delta import EditDelta, WeightDelta, applied
from massedit.model.devices import execution_device
from massedit.compute.keys import LayerStates


def through_output_norm(norm: torch.nn.Module, rewrite: torch.nn.Module, keys: torch.Tensor,
                        residual: torch.Tensor) -> torch.Tensor:
    """The change of the rewrite module's outputs u = rewrite(keys) that moves norm(u) by `residual`.

    With a norm after the MLP (Gemma 2/3, OLMo 2), the residual stream receives norm(u), not u:
    adding the residual to u itself would move it by about w * residual / rms(u) (w the norm's
    scale, up to 600 on Gemma-3-270M). RMS norms are scale invariant, so u' = s * y / w (y = norm(u)
    + residual) gives norm(u') = y / rms(y / w): the target exactly where it is reachable, else the
    point of its direction (a normed output can turn, not grow). s sets |u'| = |u| * max(1, |y| /
    |norm(u)|): u turns by the angle the normed output turns and grows as far as the target lies
    beyond the normed output's reach, so that the edit also holds for the other contexts' u around
    this one (the keys are their mean). Keeping |u'| = |u| there left the edits of tiny Gemma 2
    without effect (tests/test_cli_edit.py)."""
    with torch.no_grad():
        device = execution_device(rewrite)
        dtype = next((p.dtype for p in norm.parameters()), keys.dtype)
        u = rewrite(keys.to(device, dtype)).to(torch.float64)
        y = norm(u.to(dtype)).to(torch.float64) + residual.to(device, torch.float64)
        scale = norm(torch.ones(1, u.shape[-1], device=device, dtype=dtype)).to(torch.float64)
        # A scale entry of 0 can carry nothing; leave that coordinate of u where it is.
        tiny = scale.abs() < 1e-8 * scale.abs().max()
        v = torch.where(tiny, u, y / torch.where(tiny, torch.ones_like(scale), scale))
        base = norm(u.to(dtype)).to(torch.float64).norm(dim=-1, keepdim=True)
        grow = (y.norm(dim=-1, keepdim=True) / base.clamp_min(1e-300)).clamp_min(1.0)
        s = grow * u.norm(dim=-1, keepdim=True) / v.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        return (s * v - u).to(residual.device, residual.dtype)


def spread_update(
    model,
    layout: ModelLayout,
    tok,
    requests: Sequence,
    layers: Sequence[int],
    z: torch.Tensor,
    solvers: dict,
    templates,
    timings: dict[str, float],
    progress: bool = True,
    batch_size: int = 256,
) -> list[WeightDelta]:
    """Per-layer weight deltas; the model is unchanged when this returns (or raises)."""
    target_layer = max(layers)
    weights: list[WeightDelta] = []
    mine = parallel.world().shard(requests)
    states = LayerStates(model, layout, tok, mine, templates, target_layer, batch_size) if mine else None
    with applied(model) as layers_applied:
        for j, layer in enumerate(tqdm(layers, desc="layers", disable=not progress, unit="layer")):
            t0 = time.perf_counter()
            keys, h = states.at_layer(layer) if states else (
                torch.zeros(0, layout.key_dim(layer), device=execution_device(layout.rewrite_module(layer))),
                torch.zeros(0, layout.hidden_size, device=execution_device(layout.block(target_layer))))
            keys, h = parallel.gather_sharded(keys, len(requests)), parallel.gather_sharded(h, len(requests))
            t1 = time.perf_counter()
            residual = (z.to(h.device) - h) / (len(layers) - j)
            norm = layout.mlp_output_norm(layer)
            if norm is not None:
                residual = through_output_norm(norm, layout.rewrite_module(layer), keys, residual)
            solver = solvers[layer]
            # Each layer's ΔW factors (8n(h + d) bytes: 9 GB for GPT-J's six layers at n = 10,000) are
            # kept beside the solver's factor, host memory by default; applying copies one layer's in.
            # Only rank 0 holds solvers (massedit.editor); the other ranks keep them in host memory.
            keep = solver.device if solver is not None else torch.device("cpu")
            solved = parallel.tensor_from_main(lambda: solver.solve(keys.T), keep)
            wd = WeightDelta(
                name=layout.rewrite_weight_name(layer),
                u=residual.T.to(keep, torch.float64).contiguous(),
                v=solved.to(keep).contiguous(),
                transposed=layout.rewrite_is_conv1d(layer),
            )
            layers_applied.apply(EditDelta([wd], {}))
            weights.append(wd)
            t2 = time.perf_counter()
            timings["keys"] = timings.get("keys", 0.0) + t1 - t0
            timings["solve"] = timings.get("solve", 0.0) + t2 - t1
    return weights
