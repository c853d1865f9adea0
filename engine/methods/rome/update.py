"""ROME (DESIGN §3): sequential rank-one edits of one rewrite weight, the baseline MEMIT is judged by.

For each request, in order, on the model as edited by the requests before it:

1. **Target.** A vector δ (hidden size, init 0) is added to the output of the rewrite module of
   layer l* (the MLP down projection; its output is the MLP output) at the subject token of every
   rewriting prompt (each context template + the target tokens but the last) and of the KL prompt
   "{} is a". Loss = NLL of the target (mean over rewriting prompts of −Σ log P / len(target)) +
   kl_factor·KL(P_now ‖ P_init) at the KL prompt's subject token + v_weight_decay·‖δ‖/‖m‖², with
   m the unedited MLP output at the subject token of the first rewriting prompt. Adam (v_lr);
   stop when the loss < z_early_stop_loss or at the last iteration (at most v_num_grad_steps − 1
   updates); after each step δ is clamped to clamp_norm_factor·‖m‖. Target v* = m + δ.
   This is the reference's `compute_v` (kmeng01/rome) and differs from MEMIT's z (§2.2) in where
   δ lives: the MLP output of l*, so the clamp and the weight decay are relative to ‖m‖, not to the
   residual stream's ‖h‖ (for GPT-2/GPT-J/NeoX/Llama blocks the gradient is the same, since the
   MLP output is added to the residual). It is the z loop of `massedit.compute.targets` with
   `site="mlp"`, one request at a time (`optimize_target`).
2. **Left vector** (d_ff wide; `compute_u`): k̄ = mean key at the subject token over the context
   templates (`massedit.compute.keys.subject_keys`: mean within each template group, then over groups, as
   everywhere in this engine; the reference ROME takes a plain mean over its templates),
   u = C⁻¹k̄ / ‖C⁻¹k̄‖ (u = k̄/‖k̄‖ when mom2_adjustment is false). C⁻¹k̄ is a Cholesky solve with
   the layer's cached factor of λC (λ cancels in the normalization), in float64; the reference
   multiplies by an explicit float32 inverse.
3. **Right vector** (d_model wide; end of `compute_v`): with the constraint key k_c and the
   current value W k_c + b, r = (v* − (W k_c + b)) / (u·k_c), so that after
   W ← W + r uᵀ the edited module maps k_c to exactly v*. The reference uses the key of the bare
   prompt (no template) for k_c; that is the default here (`constraint="prompt"`).
   `constraint="mean"` uses k_c = k̄, the formula as DESIGN §3 and the ROME paper write it
   (Δ = (v* − W k*)(C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*)); it is what EasyEdit's `enable_random_prefix_keys`
   selects, and an hparams file with that key set to true selects it here too.
4. The rank-one step is applied (exactly revertible, `massedit.edits.delta`) before the next request.

The result is one `WeightDelta` whose n columns are the n rank-one terms (u = the right vectors
r_i, [d_model, n]; v = the left vectors u_i, [d_ff, n] — `WeightDelta`'s u is always the d_model
side), so it saves, applies and reverts like a MEMIT delta. The per-request steps are reverted
(bit-exactly, in reverse order) before returning, also when anything fails midway: the model is
returned exactly as it came, and the caller applies the combined delta. Applying the sum at once
rounds once, so the edited weights may differ from the sequentially rounded ones in the last bit.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from massedit.model.arch import ModelLayout
from massedit.edits.delta import EditDelta, WeightDelta, applied
from massedit.model.devices import read_parameter
from massedit.hparams import HParamsError
from massedit.compute.keys import collect_at_subject, subject_keys
from massedit.model.quantized import DENSE, dequantized, storage_of
from massedit.inputs.requests import EditRequest
from massedit.solve.cholesky import LayerSolver
from massedit.compute.targets import TargetOptimizer, ZResult, ZSettings, frozen_eval
from massedit.inputs.tokens import encode_prompt

CONSTRAINTS = ("prompt", "mean")


def rome_layer(hp) -> int:
    """The single layer l* of a ROME configuration; a clear error for any other number of layers."""
    layers = list(hp.layers)
    if len(layers) != 1:
        raise HParamsError(
            f'hparams, key "layers": ROME edits exactly one layer, got {layers}; give one layer, e.g. '
            f"[{layers[len(layers) // 2] if layers else 5}] (massedit.hparams.default_for(model.config, "
            "algorithm='rome') picks one), or use method 'memit' to spread the edit over several layers"
        )
    return layers[0]


def constraint_of(hp) -> str:
    """'mean' when the hparams carry EasyEdit's enable_random_prefix_keys: true, else 'prompt'."""
    return "mean" if bool(getattr(hp, "extras", {}).get("enable_random_prefix_keys", False)) else "prompt"


def optimize_target(model, layout: ModelLayout, tok, request: EditRequest, templates: Sequence[str],
                    s: ZSettings) -> ZResult:
    """ROME's v* for one request, as a one-row ZResult (z: v* = m + δ, h: m): δ added to the output
    of layer s.layer's rewrite module."""
    optimizer = TargetOptimizer(model, layout, tok, s, [templates], reuse_prefix=False, site="mlp")
    return optimizer.optimize_serial([request], progress=False)


def _weight_and_bias(layout: ModelLayout, layer: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The rewrite weight as [d_model, d_ff] (Conv1D transposed back, bnb storage dequantized,
    offloaded storage read where Accelerate keeps it) and its bias, float64."""
    module, name = layout.rewrite_module(layer), layout.rewrite_name(layer)
    if storage_of(module) == DENSE:
        w = read_parameter(layout.model, f"{name}.weight")
        w = w.T if layout.rewrite_is_conv1d(layer) else w
    else:
        w = dequantized(module)
    bias = getattr(module, "bias", None)
    return w.detach().double(), (read_parameter(layout.model, f"{name}.bias").double() if bias is not None else None)


def rank_one(layout: ModelLayout, layer: int, target: torch.Tensor, key_mean: torch.Tensor,
             key_constraint: torch.Tensor, solver: Optional[LayerSolver]) -> tuple[torch.Tensor, torch.Tensor]:
    """(right [d_model], left [d_ff]) with W + right leftᵀ mapping key_constraint to `target`.

    left = C⁻¹k̄ / ‖C⁻¹k̄‖ (k̄ / ‖k̄‖ without a solver); right = (v* − (W k_c + b)) / (left·k_c).
    Everything in float64 on the rewrite weight's device."""
    w, b = _weight_and_bias(layout, layer)
    dev = w.device
    k_bar = key_mean.to(dev, torch.float64)
    k_c = key_constraint.to(dev, torch.float64)
    if solver is not None:
        # C⁻¹k̄ = λ (λC)⁻¹k̄; λ cancels in the normalization, so the cached factor of λC serves.
        left = solver.cov_solve(k_bar[:, None]).squeeze(1).to(dev)
    else:
        left = k_bar
    left = left / left.norm()
    current = w @ k_c + (b if b is not None else 0.0)
    right = (target.to(dev, torch.float64) - current) / torch.dot(left, k_c)
    return right, left


def bare_prompt_keys(model, layout: ModelLayout, tok, requests: Sequence[EditRequest], layer: int) -> torch.Tensor:
    """The key at the subject token of each bare prompt (no context template): [n, d_ff] float32."""
    enc = [encode_prompt(tok, r.prompt, r.subject) for r in requests]
    return collect_at_subject(model, layout, tok, enc, key_layers=[layer])[("key", layer)]


def rome_update(
    model,
    layout: ModelLayout,
    tok,
    hp,
    requests: Sequence[EditRequest],
    templates,
    solver: Optional[LayerSolver],
    timings: dict[str, float],
    progress: bool = True,
    constraint: Optional[str] = None,
) -> tuple[list[WeightDelta], ZResult]:
    """Sequential ROME over `requests`; the model is unchanged when this returns (or raises).

    Returns the combined delta's one WeightDelta (n rank-one columns) and, per request, the
    target v* (ZResult.z), the initial MLP output m (ZResult.h), the z loss and the stopping step.
    `solver` holds the layer's covariance (None when hp.mom2_adjustment is false).
    `constraint`: 'prompt' (reference code, default) or 'mean' (DESIGN §3 / paper); None → from hp.
    """
    layer = rome_layer(hp)
    if not requests:
        raise ValueError("no requests to edit")
    constraint = constraint or constraint_of(hp)
    if constraint not in CONSTRAINTS:
        raise ValueError(f"constraint must be one of {', '.join(CONSTRAINTS)}, got {constraint!r}")
    if hp.mom2_adjustment and solver is None:
        raise ValueError("ROME with mom2_adjustment needs the layer's covariance (a LayerSolver)")
    settings = ZSettings.from_hparams(hp, layout, layer=layer)
    flat_templates = [t for group in templates for t in group]
    name = layout.rewrite_weight_name(layer)
    transposed = layout.rewrite_is_conv1d(layer)
    rights, lefts, targets, inits, losses, steps = [], [], [], [], [], []
    for key in ("z", "keys", "solve"):
        timings.setdefault(key, 0.0)
    # Eval mode throughout (no dropout in z, keys or values); restored afterwards.
    with frozen_eval(model), applied(model) as steps_applied:
        for req in tqdm(requests, desc="rome", disable=not progress, unit="req"):
            t0 = time.perf_counter()
            tgt = optimize_target(model, layout, tok, req, flat_templates, settings)
            target = tgt.z[0]
            t1 = time.perf_counter()
            k_bar = subject_keys(model, layout, tok, [req], templates, layer)[0]
            k_c = k_bar if constraint == "mean" else bare_prompt_keys(model, layout, tok, [req], layer)[0]
            t2 = time.perf_counter()
            right, left = rank_one(layout, layer, target, k_bar, k_c, solver)
            wd = WeightDelta(name, right[:, None].contiguous(), left[:, None].contiguous(), transposed)
            steps_applied.apply(EditDelta([wd], {}))
            t3 = time.perf_counter()
            timings["z"] += t1 - t0
            timings["keys"] += t2 - t1
            timings["solve"] += t3 - t2
            rights.append(right)
            lefts.append(left)
            targets.append(target.float().cpu())
            inits.append(tgt.h[0].float().cpu())
            losses.append(tgt.loss[0].float())
            steps.append(int(tgt.steps[0]))
    combined = WeightDelta(name, torch.stack(rights, 1), torch.stack(lefts, 1), transposed)
    z = ZResult(torch.stack(targets), torch.stack(inits), torch.stack(losses), torch.tensor(steps, dtype=torch.long))
    return [combined], z
