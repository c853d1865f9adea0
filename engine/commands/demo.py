"""The main job on an embedded default: build (or reuse) the knowledge world and its model, compute
covariance statistics, edit N facts in one batch, evaluate before and after, print a table.

Examples:
  massedit demo                                  # 1,000 edits on the default GPT-2-style world
  massedit demo --n 100 --out runs/demo100
  massedit demo --arch llama --world worlds/llama-default
  massedit demo --quick                          # a tiny smoke world, seconds

Before editing, the demo traces a few of the facts (ROME's causal trace, `massedit trace`) to show
where the model keeps them: the MLP effect at the subject's last token by layer, next to the
layers the world preset edits.

Writes OUT/report.json (metrics pre/post, timings per phase, hparams, the trace's MLP effects),
OUT/delta.safetensors and, when matplotlib is installed, OUT/metrics.png and OUT/trace_mlp.png,
all at once when the run finishes. A non-empty OUT
is refused unless --force. The world and the statistics (OUT/stats) are cached, so a second run
(with --force) only edits and evaluates.
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import torch

from massedit.editor import MassEditor
from massedit.evaluation import evaluate, summary
from massedit.inputs.records import load_records
from massedit.hparams import world_preset
from massedit.model.loading import load_model
from massedit.methods import method_names
from massedit.commands._common import add_model_arguments, options_from_args
from massedit.commands._outputs import check_out, claim, staged
from massedit.inputs.requests import parse_records
from massedit.evaluation.heatmap import write_heatmaps
from massedit.evaluation.trace import GROUPS, trace

NAME = "demo"
HELP = "build the knowledge world, edit N facts, evaluate before/after (the two-command quick start)"
METRICS = ("ES", "PS", "NS", "S", "EM", "PM", "NM")
TRACE_FACTS = 30
TRACE_SAMPLES = 5


def add_arguments(p) -> None:
    p.add_argument("--world", default="worlds/gpt2-default", help="world build directory (built if missing)")
    p.add_argument("--arch", default="gpt2", choices=("gpt2", "llama"), help="world model family")
    p.add_argument("--n", type=int, default=1000, help="number of facts to edit (default 1000)")
    p.add_argument("--method", default="memit", choices=method_names())
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo; must be new or empty unless --force)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out directory (reusing its statistics)")
    p.add_argument("--quick", action="store_true", help="tiny smoke world and few edits")
    p.add_argument("--trace", type=int, default=TRACE_FACTS,
                   help=f"facts to trace before editing (default {TRACE_FACTS}; 0 skips the trace)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    add_model_arguments(p)


def _table(pre: dict, post: dict, timings: dict) -> str:
    lines = [f"{'metric':<8}{'pre':>9}{'post':>9}"]
    for k in METRICS:
        if k in pre:
            lines.append(f"{k:<8}" + "".join("      n/a" if v is None else f"{v:>9.1f}" for v in (pre[k], post.get(k))))
    lines.append("")
    lines.append("phase            seconds")
    for k in ("world", "trace", "covariance", "context_templates", "z", "keys", "solve", "eval_pre", "eval_post",
              "total"):
        if k in timings:
            lines.append(f"{k:<17}{timings[k]:>7.2f}")
    return "\n".join(lines)


def _plot(pre: dict, post: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = [k for k in ("ES", "PS", "NS", "S") if pre.get(k) is not None and post.get(k) is not None]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar([x - 0.2 for x in xs], [pre[k] for k in names], width=0.4, label="pre-edit", color="#bbbbbb")
    ax.bar([x + 0.2 for x in xs], [post[k] for k in names], width=0.4, label="post-edit", color="#3366aa")
    ax.set_xticks(list(xs), names)
    ax.set_ylim(0, 100)
    ax.set_ylabel("percent")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(args) -> int:
    if args.n < 1:
        raise ValueError("--n must be at least 1")
    if args.trace < 0:
        raise ValueError("--trace must be 0 (no trace) or a number of facts")
    out = Path(args.out)
    check_out(out, args.force)
    with claim(out):
        return _demo(args, out)


def _demo(args, out: Path) -> int:
    from massedit.world.build import build_world, is_complete

    if args.threads:
        torch.set_num_threads(args.threads)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    start = time.perf_counter()
    world_dir = Path(args.world + ("-quick" if args.quick and args.world == "worlds/gpt2-default" else ""))
    say(f"[1/5] knowledge world in {world_dir} (built once, then reused)")
    if not is_complete(world_dir):
        build_world(world_dir, arch=args.arch, quick=args.quick, log=say)
    t_world = time.perf_counter() - start

    model, tok = load_model(str(world_dir / "model"), options_from_args(args))
    _, records = load_records(world_dir / "counterfact.json")
    if args.n > len(records):
        warnings.warn(f"--n {args.n}: the world has {len(records)} facts; editing all {len(records)}")
    records = records[: args.n]
    requests = parse_records(records, str(world_dir / "counterfact.json"), fmt="counterfact")
    hp = world_preset(model.config)

    traced, t_trace = None, 0.0
    if args.trace:
        say(f"[2/5] tracing {min(args.trace, len(requests))} facts: where does the model keep them?")
        t = time.perf_counter()
        traced = trace(model, tok, requests[: args.trace], samples=TRACE_SAMPLES, kinds=("mlp",))
        t_trace = time.perf_counter() - t
        effect = traced.averaged("mlp")[GROUPS.index("last subject token")].tolist()
        say("      MLP effect at the subject's last token by layer: "
            + "  ".join(f"{l}: {v:.2f}" for l, v in enumerate(effect)) + f"  (the preset edits {hp.layers})")

    say(f"[3/5] evaluating {len(records)} facts before editing")
    t = time.perf_counter()
    pre = summary(evaluate(model, tok, records))
    t_pre = time.perf_counter() - t

    say(f"[4/5] editing {len(requests)} facts with {args.method} (layers {hp.layers}; statistics cached in {out / 'stats'})")
    editor = MassEditor(model, tok, hp, stats_dir=out / "stats", corpus=world_dir / "corpus.txt",
                        model_name=f"world-{world_dir.name}", progress=not args.quiet)
    result = editor.edit(requests, method=args.method)

    say("[5/5] evaluating after editing")
    t = time.perf_counter()
    post = summary(evaluate(model, tok, records))
    t_post = time.perf_counter() - t

    timings = {"world": t_world, "trace": t_trace, **result.timings, "eval_pre": t_pre, "eval_post": t_post,
               "total": time.perf_counter() - start}
    report = {"n_edits": result.n_edits, "method": args.method, "world": str(world_dir),
              "metrics": {"pre": pre, "post": post}, "timings": {k: round(v, 3) for k, v in timings.items()},
              "z_loss": result.report()["z_loss"], "hparams": hp.to_dict()}
    if traced is not None:
        report["trace"] = {"facts": len(traced.traces), "samples": traced.samples, "window": traced.window,
                           "mlp_effect_at_last_subject_token": effect}
    with staged(out, owned=("delta.safetensors", "report.json", "metrics.png", "trace_mlp.png")) as stage:
        result.delta.save(stage / "delta.safetensors")
        plots = [stage / "metrics.png"] if _plot(pre, post, stage / "metrics.png") else []
        if traced is not None:
            plots += write_heatmaps(traced, stage, kinds=("mlp",))
        (stage / "report.json").write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_table(pre, post, timings))
        print(f"\nreport: {out / 'report.json'}\ndelta:  {out / 'delta.safetensors'}")
        if plots:
            print("plots:  " + ", ".join(str(out / p.name) for p in plots))
    return 0
