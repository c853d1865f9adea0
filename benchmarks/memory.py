"""Peak memory of each MEMIT phase at full model size, massedit beside the public reference.

    python -m benchmarks.memory [--configs gpt-j-6b,llama-3-8b,llama-3-70b] [--edits N]
                                      [--z-batch B] [--quick] [--out FILE]

Each model is built on the `meta` device from its published configuration (no weights, no
download; GPT-J-6B and Llama-3-8B as in benchmarks/gpu_scale.py, Llama-3-70B below) and read
through massedit's architecture registry: parameter count, hidden width h, key width d (d_ff),
key/value width of attention, vocabulary V, whether the MLP is gated (m = 3 intermediate tensors
of width d, else 2), the edited layers of its preset. Every figure is then a formula over those
shapes, written out beside it in the JSON (`components`), so each can be checked by hand.

Phases, per approach (bytes; w = the model dtype's bytes per element):

* weights: parameters × w. massedit: bfloat16 (what `torch_dtype="auto"` loads for these
  checkpoints and what the GPU check runs); reference: float32 (its experiments/evaluate.py loads
  `from_pretrained(name).cuda()`).
* statistics: one corpus pass. massedit: every edited layer's float32 accumulator at once
  (E·4d², one pass for all layers), the batch's captured keys (E·T·d·w), the fused Triton
  accumulation needs no d×d temporary. Reference (rome/layer_stats.py, one pass per layer):
  the float32 accumulator and the d×d product `a.t().mm(a)` it adds (2·4d²), the float32 copy of
  the keys (T·d·4). Both: the no-grad activations of one block, T·(2h + m·d)·w, with T tokens
  per batch (massedit 8192; reference 3 × context length).
* z: the target optimization of one chunk. massedit: B requests × 7 prompts, only the suffix
  (s tokens from the subject on) run with autograd through the blocks after the z layer, the
  prefix's keys/values cached, the LM head at label positions only. Reference (memit/compute_z.py):
  one request, 7 whole prompts (S tokens) through the same blocks, full logits.
  Saved activations per token per block ≈ (7h + m·d)·w (the inputs of the four attention
  projections and of the MLP, q/k/v/output for the attention backward, the norms' inputs, the MLP
  intermediates); logits and their log-softmax and gradient in float32 (3 × 4 bytes per entry).
* keys: one no-grad batch of prompts (massedit 256 requests × 7 prompts, reference 128 contexts)
  plus the keys of all n requests in float32 (n·d·4); the reference also keeps them in float64
  for the solve.
* solve: one edited layer. massedit (engine/solve/cholesky.py): the factor of λC is built in one d×d
  buffer (E of them kept where `solve_device` says: host memory by default; the table also shows
  `solve_device="layer"`, all factors on the GPU), then per layer on
  the layer's device the keys (4dn), their working copy M and the result (2·8dn), the Gram
  matrix (8·min(n, d)²) and, with the factor on the host, one panel (≤ 256 MiB). Reference
  (memit/memit_main.py): C in float32 on the GPU (4d²), and `torch.linalg.solve(λ·C.double() +
  K Kᵀ, K)` holds λC, K Kᵀ and their sum at once (3·8d²) before LU copies the sum (8d²), with K
  (8dn) and the result (8dn); all covariances cached in host memory in float32 (E·4d²), and the
  original weights of the edited layers kept on the GPU in float32 (E·4hd).
* delta: applying one layer. massedit keeps ΔW as factors (8n(h + d) per layer, beside the λC
  factors: on the host by default), copies one layer's in, writes round(W + ΔW) into a new weight
  (h·d·w) in blocks of 64 MiB of float64; the reference forms ΔW = R·(K')ᵀ in float64 (8hd), a float32 copy (4hd) and
  the new weight (4hd).

Peak of the whole edit on the GPU = weights + the largest phase (the phases run one after the
other); host memory is listed separately. Writes JSON to benchmarks/results/ and prints a table.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import torch

from benchmarks import common

CONFIGS = ("gpt-j-6b", "llama-3-8b", "llama-3-70b")
GIB = 2**30

# Prompt shapes (tokens) of a typical CounterFact request with the default context templates.
REWRITE_PROMPTS = 6  # "{}" + five generated templates (DESIGN §2.1)
ROWS_PER_REQUEST = REWRITE_PROMPTS + 1  # and the KL prompt
PROMPT_TOKENS = 24  # template prefix (~10) + prompt (~10) + target but its last token
SUFFIX_TOKENS = 8  # from the subject's last token on
TARGET_TOKENS = 3
MASSEDIT_STATS_TOKENS = 8192  # massedit.compute.stats.second_moments batch_tokens
MASSEDIT_KEY_REQUESTS = 256  # massedit.compute.keys.LayerStates batch_size
REFERENCE_KEY_CONTEXTS = 128  # rome/repr_tools.py _batch(n=128)
PANEL_BYTES = 256 * 2**20  # massedit.solve.cholesky.PANEL_BYTES


def model_config(name: str):
    """The published configuration (config.json values) of `name`."""
    from transformers import LlamaConfig

    from benchmarks.gpu_scale import model_config as gpu_scale_config

    if name == "gpt-j-6b":
        return gpu_scale_config("gptj-6b", False, 0)
    if name == "llama-3-8b":
        return gpu_scale_config("llama-8b", False, 0)
    if name == "llama-3-70b":
        # meta-llama/Meta-Llama-3-70B.
        return LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                           num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                           rope_theta=500000.0, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
                           bos_token_id=128000, eos_token_id=128001)
    raise ValueError(f"unknown config {name!r}; choose from {', '.join(CONFIGS)}")


def hparams_for(name: str):
    """The preset's edited layers (Llama-3-70B: Llama-3-8B's preset, scored at its last layer)."""
    from massedit.hparams import preset

    if name == "llama-3-70b":
        return preset("llama-3-8b").replace(v_loss_layer=79)
    return preset(name)


def shapes(name: str) -> dict:
    """Sizes read from the model built on the meta device through massedit's architecture registry."""
    from transformers import AutoModelForCausalLM

    from massedit.model.arch import ModelLayout

    cfg = model_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    hp = hparams_for(name)
    layout = ModelLayout(model, hp.module_overrides())
    layer = hp.layers[0]
    h, d = layout.hidden_size, layout.key_dim(layer)
    mlp = model.get_submodule(layout.rewrite_name(layer).rsplit(".", 1)[0])
    mlp_weights = sum(p.numel() for p in mlp.parameters() if p.ndim == 2)
    block = layout.block(layer)
    block_weights = sum(p.numel() for p in block.parameters() if p.ndim == 2)
    attn_weights = block_weights - mlp_weights
    heads = cfg.num_attention_heads if hasattr(cfg, "num_attention_heads") else cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    loss_layer = layout.n_layers - 1 if hp.v_loss_layer is None else hp.v_loss_layer
    return {
        "config": name,
        "model_type": cfg.model_type,
        "params": sum(p.numel() for p in model.parameters()),
        "n_layers": layout.n_layers,
        "hidden": h,
        "key_dim": d,
        "kv_dim": h * kv_heads // heads,
        "vocab": layout.lm_head.weight.shape[0],
        "context": int(getattr(cfg, "max_position_embeddings", None) or cfg.n_positions),
        "mlp_tensors": round(mlp_weights / (h * d)),  # 3 for gate/up/down MLPs, 2 for fc_in/fc_out
        "attn_weights_per_block": attn_weights,
        "edited_layers": list(hp.layers),
        "z_layer": max(hp.layers),
        "loss_layer": loss_layer,
        "blocks_after_z": loss_layer - max(hp.layers),
    }


def _phase(components: dict[str, int], host: Optional[dict[str, int]] = None) -> dict:
    return {"device_bytes": sum(components.values()), "components": components,
            "host_bytes": sum((host or {}).values()), "host_components": host or {}}


def massedit_phases(s: dict, n: int, z_batch: int, solve_device: str) -> dict:
    h, d, kv, V, m = s["hidden"], s["key_dim"], s["kv_dim"], s["vocab"], s["mlp_tensors"]
    E, w = len(s["edited_layers"]), 2
    T = MASSEDIT_STATS_TOKENS
    rows = z_batch * ROWS_PER_REQUEST
    labels = z_batch * (REWRITE_PROMPTS * TARGET_TOKENS + 1)
    key_tokens = min(n, MASSEDIT_KEY_REQUESTS) * ROWS_PER_REQUEST * PROMPT_TOKENS
    small = min(n, d)
    factors = {"factors of λC, E·8d²": E * 8 * d * d}
    panel = min(PANEL_BYTES, 8 * d * d)
    deltas = {"ΔW factors, E·8n(h+d)": E * 8 * n * (h + d)}
    solve = {
        "factor being built, 8d²": 8 * d * d,
        "keys, 4dn": 4 * d * n,
        "M = L⁻¹K and result, 2·8dn": 2 * 8 * d * n,
        "Gram matrix, 8·min(n,d)²": 8 * small * small,
        "this layer's ΔW factors, 8n(h+d)": 8 * n * (h + d),
    }
    if solve_device == "layer":
        solve["factors of the other edited layers, (E-1)·8d²"] = (E - 1) * 8 * d * d
        solve["ΔW factors of the layers before, (E-1)·8n(h+d)"] = (E - 1) * 8 * n * (h + d)
    else:
        solve["one factor panel (≤ 256 MiB)"] = panel
    return {
        "weights": _phase({"parameters × 2 (bfloat16)": s["params"] * w}),
        "statistics": _phase({
            "accumulators, E·4d²": E * 4 * d * d,
            "captured keys, E·T·d·w": E * T * d * w,
            "block activations, T·(2h + m·d)·w": T * (2 * h + m * d) * w,
        }),
        "z": _phase({
            "saved activations, rows·s·(7h + m·d)·w·blocks": rows * SUFFIX_TOKENS * (7 * h + m * d) * w
            * s["blocks_after_z"],
            "prefix keys/values, rows·(S−s)·2kv·w·blocks": rows * (PROMPT_TOKENS - SUFFIX_TOKENS) * 2 * kv * w
            * s["blocks_after_z"],
            "logits at labels, labels·V·12": labels * V * 12,
        }),
        "keys": _phase({
            "batch activations, tokens·(2h + m·d)·w": key_tokens * (2 * h + m * d) * w,
            "keys of all requests, 4dn": 4 * d * n,
        }),
        "solve": _phase(solve, {**factors, **deltas} if solve_device != "layer" else None),
        "delta": _phase({
            **(deltas if solve_device == "layer" else {"one layer's ΔW factors copied in, 8n(h+d)": 8 * n * (h + d)}),
            "the new weight, h·d·w": h * d * w,
            "apply block (64 MiB float64) and its rounding": 2 * 64 * 2**20,
        }, deltas if solve_device != "layer" else None),
    }


def reference_phases(s: dict, n: int) -> dict:
    h, d, V, m = s["hidden"], s["key_dim"], s["vocab"], s["mlp_tensors"]
    E, w = len(s["edited_layers"]), 4
    T = 3 * s["context"]
    rows = ROWS_PER_REQUEST
    key_tokens = REFERENCE_KEY_CONTEXTS * PROMPT_TOKENS
    originals = {"original edited weights, E·4hd": E * 4 * h * d}
    return {
        "weights": _phase({"parameters × 4 (float32)": s["params"] * w}),
        "statistics": _phase({
            "accumulator and the product it adds, 2·4d²": 2 * 4 * d * d,
            "float32 keys, 4·T·d": 4 * T * d,
            "block activations, T·(2h + m·d)·w": T * (2 * h + m * d) * w,
        }),
        "z": _phase({
            "saved activations, rows·S·(7h + m·d)·w·blocks": rows * PROMPT_TOKENS * (7 * h + m * d) * w
            * s["blocks_after_z"],
            "full logits, rows·S·V·12": rows * PROMPT_TOKENS * V * 12,
        }),
        "keys": _phase({
            "batch activations, tokens·(2h + m·d)·w": key_tokens * (2 * h + m * d) * w,
            "keys of all requests, 4dn + 8dn": 12 * d * n,
        }),
        "solve": _phase({
            **originals,
            "C on the GPU, 4d²": 4 * d * d,
            "λC, K Kᵀ and their sum, 3·8d²": 3 * 8 * d * d,
            "LU copy of the sum, 8d²": 8 * d * d,
            "K and the result, 2·8dn": 2 * 8 * d * n,
        }, {"covariances cached, E·4d²": E * 4 * d * d}),
        "delta": _phase({
            **originals,
            "ΔW in float64, its float32 copy and the new weight, 16hd": 16 * h * d,
        }),
    }


def summarize(phases: dict) -> dict:
    work = {k: v["device_bytes"] for k, v in phases.items() if k != "weights"}
    top = max(work, key=work.get)
    return {"peak_device_bytes": phases["weights"]["device_bytes"] + work[top], "largest_phase": top,
            "peak_host_bytes": max(v["host_bytes"] for v in phases.values())}


def run(configs: Sequence[str], n: int, z_batch: int) -> dict:
    rows = []
    for name in configs:
        s = shapes(name)
        d, E = s["key_dim"], len(s["edited_layers"])
        approaches = {"massedit": massedit_phases(s, n, z_batch, "cpu"),
                      "massedit_factors_on_layer": massedit_phases(s, n, z_batch, "layer"),
                      "reference": reference_phases(s, n)}
        rows.append({"shapes": s, **{k: {"phases": v, **summarize(v)} for k, v in approaches.items()},
                     "previous_engine_solve_state_bytes": E * 16 * d * d,
                     "previous_engine_note": "before this change each edited layer kept C and its Cholesky factor "
                                             "in float64 on the layer's device: E·16d², all on the early layers' "
                                             "GPUs"})
    return {
        "benchmark": "memory",
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"edits": n, "z_batch_requests": z_batch,
                     "rows_per_request": ROWS_PER_REQUEST, "prompt_tokens": PROMPT_TOKENS,
                     "suffix_tokens": SUFFIX_TOKENS, "target_tokens": TARGET_TOKENS,
                     "massedit_stats_tokens": MASSEDIT_STATS_TOKENS},
        "method": __doc__.split("\n\n", 2)[2],
        "models": rows,
    }


def format_table(result: dict) -> str:
    lines = []
    st = result["settings"]
    lines.append(f"Peak memory per phase (GiB; computed from shapes on the meta device): n = {st['edits']:,} edits, "
                 f"massedit z chunk {st['z_batch_requests']} requests")
    head = (f"{'model':<12} {'phase':<11} {'massedit GPU':>13} {'host':>7} {'(factors on GPU)':>17} "
            f"{'reference GPU':>14} {'host':>7} {'ratio':>7}")
    lines += [head, "-" * len(head)]
    for r in result["models"]:
        name = r["shapes"]["config"]
        ours, layer, ref = r["massedit"], r["massedit_factors_on_layer"], r["reference"]
        for phase in ours["phases"]:
            a, c, b = ours["phases"][phase], layer["phases"][phase], ref["phases"][phase]
            ratio = b["device_bytes"] / a["device_bytes"] if a["device_bytes"] else float("inf")
            lines.append(f"{name:<12} {phase:<11} {a['device_bytes'] / GIB:>13.2f} {a['host_bytes'] / GIB:>7.2f} "
                         f"{c['device_bytes'] / GIB:>17.2f} {b['device_bytes'] / GIB:>14.2f} "
                         f"{b['host_bytes'] / GIB:>7.2f} {ratio:>6.1f}x")
        ratio = ref["peak_device_bytes"] / ours["peak_device_bytes"]
        lines.append(f"{name:<12} {'PEAK':<11} {ours['peak_device_bytes'] / GIB:>13.2f} "
                     f"{ours['peak_host_bytes'] / GIB:>7.2f} {layer['peak_device_bytes'] / GIB:>17.2f} "
                     f"{ref['peak_device_bytes'] / GIB:>14.2f} {ref['peak_host_bytes'] / GIB:>7.2f} {ratio:>6.1f}x"
                     f"   (largest phase: {ours['largest_phase']} / {ref['largest_phase']})")
        lines.append(f"{'':<12} previous engine: C and its factor per layer on the GPU, E·16d² = "
                     f"{r['previous_engine_solve_state_bytes'] / GIB:.2f} GiB")
        lines.append("")
    lines.append("PEAK = weights + the largest other phase, on the GPU(s); ratio = reference / massedit (factors on the "
                 "host, the default). Each figure's formula is in the JSON ('components').")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = common.parser("memory", __doc__)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--edits", type=int, default=10000, help="number of edits n (default 10000)")
    p.add_argument("--z-batch", type=int, default=16, help="massedit requests per z chunk (default 16)")
    p.add_argument("--quick", action="store_true", help="GPT-J-6B only")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON output (default benchmarks/results/memory-<time>.json)")
    args = p.parse_args(argv)
    configs = ["gpt-j-6b"] if args.quick else [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or args.edits < 1 or args.z_batch < 1:
        p.error(f"unknown config(s) {unknown}; choose from {', '.join(CONFIGS)}" if unknown else
                "--edits and --z-batch must be at least 1")
    result = run(configs, args.edits, args.z_batch)
    print(format_table(result))
    out = common.write_json(common.result_path("memory", args.out), result)
    print(f"wrote {out}")
    result["out"] = str(out)
    return result


if __name__ == "__main__":
    main()
