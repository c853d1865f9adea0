"""The main job on an embedded default: build (or reuse) the knowledge world and its model, compute
covariance statistics, edit N facts in one batch, evaluate before and after, print a table.

Examples:
  massedit demo                                  # 1,000 edits on the default GPT-2-style world
  massedit demo --n 100 --out runs/demo100
  massedit demo --arch llama --world worlds/llama-default
  massedit demo --quick                          # a tiny smoke world, seconds

Writes OUT/report.json (metrics pre/post, timings per phase, hparams), OUT/delta.safetensors and,
when matplotlib is installed, OUT/metrics.png. The world and the statistics are cached, so a
second run only edits and evaluates.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from massedit.editor import MassEditor
from massedit.methods import method_names
from massedit.evaluate import evaluate, load_records, summary
from massedit.hparams import world_preset
from massedit.requests import parse_records

NAME = "demo"
HELP = "build the knowledge world, edit N facts, evaluate before/after (the two-command quick start)"
METRICS = ("ES", "PS", "NS", "S", "EM", "PM", "NM")


def add_arguments(p) -> None:
    p.add_argument("--world", default="worlds/gpt2-default", help="world build directory (built if missing)")
    p.add_argument("--arch", default="gpt2", choices=("gpt2", "llama"), help="world model family")
    p.add_argument("--n", type=int, default=1000, help="number of facts to edit (default 1000)")
    p.add_argument("--method", default="memit", choices=method_names())
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="tiny smoke world and few edits")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def _table(pre: dict, post: dict, timings: dict) -> str:
    lines = [f"{'metric':<8}{'pre':>9}{'post':>9}"]
    for k in METRICS:
        if k in pre:
            lines.append(f"{k:<8}{pre[k]:>9.1f}{post[k]:>9.1f}")
    lines.append("")
    lines.append("phase            seconds")
    for k in ("world", "covariance", "context_templates", "z", "keys", "solve", "eval_pre", "eval_post", "total"):
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
    names = [k for k in ("ES", "PS", "NS", "S") if k in pre]
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
    from massedit.world.build import build_world, is_complete

    if args.n < 1:
        raise ValueError("--n must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    start = time.perf_counter()
    world_dir = Path(args.world + ("-quick" if args.quick and args.world == "worlds/gpt2-default" else ""))
    say(f"[1/4] knowledge world in {world_dir} (built once, then reused)")
    if not is_complete(world_dir):
        build_world(world_dir, arch=args.arch, quick=args.quick, log=say)
    t_world = time.perf_counter() - start

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(world_dir / "model").eval()
    tok = AutoTokenizer.from_pretrained(world_dir / "model")
    _, records = load_records(world_dir / "counterfact.json")
    records = records[: args.n]
    requests = parse_records(records, str(world_dir / "counterfact.json"), fmt="counterfact")
    hp = world_preset(model.config)

    say(f"[2/4] evaluating {len(records)} facts before editing")
    t = time.perf_counter()
    pre = summary(evaluate(model, tok, records))
    t_pre = time.perf_counter() - t

    out = Path(args.out)
    say(f"[3/4] editing {len(requests)} facts with {args.method} (layers {hp.layers}; statistics cached in {out / 'stats'})")
    editor = MassEditor(model, tok, hp, stats_dir=out / "stats", corpus=world_dir / "corpus.txt",
                        model_name=f"world-{world_dir.name}", progress=not args.quiet)
    result = editor.edit(requests, method=args.method)

    say("[4/4] evaluating after editing")
    t = time.perf_counter()
    post = summary(evaluate(model, tok, records))
    t_post = time.perf_counter() - t

    timings = {"world": t_world, **result.timings, "eval_pre": t_pre, "eval_post": t_post,
               "total": time.perf_counter() - start}
    report = {"n_edits": result.n_edits, "method": args.method, "world": str(world_dir),
              "metrics": {"pre": pre, "post": post}, "timings": {k: round(v, 3) for k, v in timings.items()},
              "z_loss": result.report()["z_loss"], "hparams": hp.to_dict()}
    out.mkdir(parents=True, exist_ok=True)
    result.delta.save(out / "delta.safetensors")
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plotted = _plot(pre, post, out / "metrics.png")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_table(pre, post, timings))
        print(f"\nwrote {out / 'report.json'}, {out / 'delta.safetensors'}" + (f", {out / 'metrics.png'}" if plotted else ""))
    return 0
