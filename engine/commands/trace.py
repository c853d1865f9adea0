"""Causal tracing: where the model recalls its facts, and which layers to edit (DESIGN §12).

Example:
  massedit trace --model ./world/model --data ./world/counterfact.json --n 50 --out trace

Writes OUT/trace.json (settings, per-fact and averaged effects, the suggested layers),
OUT/trace_hidden.png, OUT/trace_mlp.png and OUT/trace_attn.png (token × layer heat maps averaged
over the facts, when matplotlib is installed) and OUT/hparams.json: the model's default hparams
(`--base default`: massedit.default_for; `--base world`: massedit.world_preset) with `layers`
set to the suggestion, for `massedit edit --hparams OUT/hparams.json`.

The suggestion is the window of `--span` consecutive layers (default: as many as the base
hparams edit) with the largest summed MLP effect at the subject's last token; on a model of N ≥ 3
layers its last layer is at most N − 2, so that blocks remain after it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from massedit.model.arch import ModelLayout
from massedit.hparams import default_for, world_preset
from massedit.commands._common import add_model_arguments, options_from_args
from massedit.model.loading import load_model
from massedit.inputs.requests import load_requests
from massedit.evaluation.heatmap import write_heatmaps
from massedit.evaluation.trace import BATCH_TOKENS, GROUPS, KINDS, check_requests, trace
from massedit.files import write_text

NAME = "trace"
HELP = "causal tracing: token × layer effects of hidden, MLP and attention states; suggests layers"

_FILES = ("trace.json", "hparams.json") + tuple(f"trace_{k}.png" for k in KINDS)


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="hub name or local directory")
    p.add_argument("--data", required=True,
                   help="CounterFact JSON, or simple JSON / JSONL / CSV requests with target_true (the true object)")
    p.add_argument("--n", type=int, help="trace the first N facts (default: all)")
    p.add_argument("--samples", type=int, default=10, help="noise samples per fact (default 10)")
    p.add_argument("--window", type=int,
                   help="consecutive MLP / attention layers restored together (default: 10 on 28+ layers, "
                        "scaled down with depth)")
    p.add_argument("--span", type=int, help="number of layers to suggest (default: as many as the base hparams edit)")
    p.add_argument("--noise", type=float, default=3.0, help="noise std as a multiple of the subjects' embedding std (default 3)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (fact i uses seed + i)")
    p.add_argument("--base", default="default", choices=("default", "world"),
                   help="hparams the suggestion goes into: default_for (default) or world_preset (world models)")
    p.add_argument("--batch-tokens", type=int, default=BATCH_TOKENS,
                   help=f"tokens per batched forward (default {BATCH_TOKENS}; more is faster on a GPU, costs memory)")
    p.add_argument("--kinds", default=",".join(KINDS),
                   help=f"what to restore, comma-separated among {','.join(KINDS)} (default all; mlp alone is "
                   "what the suggested layers need, a third of the work)")
    p.add_argument("--last-subject-only", action="store_true",
                   help="trace only the subject's last token's row (what the suggested layers read): as many "
                   "times fewer forwards as the prompt has tokens; the heat maps then show that row alone")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--force", action="store_true", help="overwrite an earlier trace's files in --out")
    add_model_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _check_args(args) -> None:
    for name in ("n", "samples", "window", "span", "batch_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not args.noise > 0:
        raise ValueError(f"--noise must be positive, got {args.noise}")
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if not kinds or any(k not in KINDS for k in kinds):
        raise ValueError(f"--kinds {args.kinds!r}: give some of {','.join(KINDS)}, comma-separated")
    if "mlp" not in kinds:
        raise ValueError("--kinds must include mlp: the suggested layers come from the MLP effect")
    args.kinds = kinds
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    taken = [f for f in _FILES if (out / f).exists()]
    if taken and not args.force:
        raise ValueError(f"--out {out} already holds {', '.join(taken)}; choose another directory or pass --force")


def _finite(values) -> list:
    return [None if math.isnan(v) else v for v in values]


def run(args) -> int:
    _check_args(args)
    kinds = args.kinds
    requests = load_requests(args.data)[: args.n]
    check_requests(requests)
    model, tok = load_model(args.model, options_from_args(args))
    hp = (world_preset if args.base == "world" else default_for)(model.config)
    n_layers = ModelLayout(model).n_layers
    span = args.span or len(hp.layers)
    if span > n_layers:
        raise ValueError(f"--span {span} exceeds the model's {n_layers} layers")
    result = trace(model, tok, requests, samples=args.samples, window=args.window, noise_scale=args.noise,
                   seed=args.seed, kinds=kinds, batch_tokens=args.batch_tokens, progress=not args.quiet,
                   last_subject_only=args.last_subject_only)
    layers = result.suggested_layers(span)
    mlp_last_subject = result.averaged("mlp")[GROUPS.index("last subject token")].tolist()
    hp = hp.replace(layers=layers)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "settings": {"model": args.model, "data": args.data, "facts": len(result.traces), "samples": result.samples,
                     "window": result.window, "noise_scale": args.noise, "sigma": result.sigma, "seed": result.seed,
                     "span": span, "base": args.base},
        "suggested_layers": layers,
        "rule": f"the {span} consecutive layers (last at most N - 2 where N >= 3) with the largest summed MLP "
                "effect at the subject's last token",
        "mlp_effect_at_last_subject_token": mlp_last_subject,
        "p_clean": sum(t.p_clean for t in result.traces) / len(result.traces),
        "p_corrupted": sum(t.p_corrupted for t in result.traces) / len(result.traces),
        "averaged": {k: {g: _finite(row) for g, row in zip(GROUPS, result.averaged(k).tolist())} for k in kinds},
    }
    write_text(out / "hparams.json", json.dumps(hp.to_dict(), indent=4) + "\n")
    plots = write_heatmaps(result, out, kinds=kinds)
    summary["files"] = [str(out / "trace.json"), str(out / "hparams.json")] + [str(p) for p in plots]
    write_text(out / "trace.json", json.dumps({**summary, "facts": [t.to_dict() for t in result.traces]}, indent=1) + "\n")
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{len(result.traces)} facts, {result.samples} noise samples, window {result.window}: "
          f"P(true) clean {summary['p_clean']:.3f}, corrupted {summary['p_corrupted']:.3f}")
    print("MLP effect at the subject's last token, by layer:")
    print("  " + "  ".join(f"{l}: {v:.3f}" for l, v in enumerate(mlp_last_subject)))
    print(f"suggested layers: {layers} ({summary['rule']}; --span changes the count)")
    print(f"wrote {', '.join(summary['files'])}")
    print(f"edit with them: massedit edit --hparams {out / 'hparams.json'} ...")
    if not plots:
        print("heat maps skipped: matplotlib is not installed (pip install matplotlib)")
    return 0
