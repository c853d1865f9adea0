"""The scaling suite: ROME, serial MEMIT and batched MEMIT at n = 1, 2, 4, ... edits.

    python -m benchmarks.scaling [--world DIR] [--budget SECONDS] [--max-n 1024] [--threads 2]

For every (method, n), in one process and on the same weights:
  * wall time per phase as the editor reports it (z, keys, solve; covariance is precomputed and
    cached, so it is ~0 in every run) and in total (`MassEditor.edit`, the apply included);
  * peak memory during the edit (see `PeakMemory`: sampled RSS above the RSS at entry, after
    malloc_trim, on CPU; torch.cuda.max_memory_allocated on CUDA);
  * ES / PS / NS / S (massedit.evaluation.evaluate, CounterFact) on the n edited records, after the edit, and
    the same on the unedited model (pre-edit). The delta is then reverted (bit-exact; checked by
    a digest of the rewrite weights), so every run starts from the unedited model.
Sizes are interleaved (n = 1 for every method, then n = 2, ...) so that machine load affects the
methods alike. Budget: each method has a share of --budget (budget / number of methods; the
unused share of a method that stopped is split among those still running). A method stops
growing n when its next run, predicted as 2.2x its last run (edit + evaluation, ~linear in n),
would take it past its share. Also measured: ROME single edits (each of the first --single
records edited alone, evaluated, reverted) and the statistics pass.

Output: benchmarks/results/scaling-<timestamp>.json, -runtime.png (total edit time vs n, log-log)
and -quality.png (ES/PS/NS/S vs n, pre-edit dashed), and the tables of
`python -m benchmarks.table`.

Without a world build at --world (DIR/build.json, DIR/model, DIR/counterfact.json,
DIR/corpus.txt, as `massedit world build` writes them) the suite falls back to an untrained
GPT-2 with synthetic requests and says so: its timings are fine, its quality figures meaningless.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.common import (DEFAULT_WORLD, RESULTS_DIR, PeakMemory, Setup, load_world, machine_info, random_fallback,
                               stamp, world_ready, write_json)

METHODS = ("rome", "memit-serial", "memit")
DEFAULT_BUDGET = 1000.0  # seconds of edit runs; the whole suite stays under 20 min on a 2-core CPU
GROWTH = 2.2  # predicted cost of the next run (n doubles) relative to the last one
METRICS = ("ES", "PS", "NS", "S")
SMOKE_TEMPLATES = [["{}"], ["The river was quiet. {}"]]


def _parse(argv):
    p = common.parser("scaling", __doc__)
    p.add_argument("--world", default=str(DEFAULT_WORLD), help=f"world build directory (default {DEFAULT_WORLD})")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds of edit runs over all methods (default {DEFAULT_BUDGET:g}; smoke 60)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma separated, from " + ", ".join(METHODS))
    p.add_argument("--max-n", type=int, default=1024, help="largest n (powers of two from 1)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core machine two OpenMP threads were 20-45x slower)")
    p.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    p.add_argument("--steps", type=int, default=None, help="v_num_grad_steps for every method (default: hparams)")
    p.add_argument("--lam", type=float, default=None, help="MEMIT mom2_update_weight (default: hparams)")
    p.add_argument("--memit-layers", default=None, help="MEMIT layers, e.g. 0,1 (default: the world preset)")
    p.add_argument("--rome-layer", type=int, default=None, help="ROME layer (default: the world preset's)")
    p.add_argument("--memit-hparams", default=None, help="MEMIT hparams file (JSON / YAML) instead of defaults")
    p.add_argument("--rome-hparams", default=None, help="ROME hparams file instead of defaults")
    p.add_argument("--batch-size", type=int, default=None, help="batched MEMIT: requests per z chunk")
    p.add_argument("--single", type=int, default=10, help="ROME single edits on the first K records (0: skip)")
    p.add_argument("--templates", choices=("shared", "reference"), default="shared",
                   help="shared: every method uses the same generated context templates (MEMIT's plan); "
                        "reference: ROME generates its own with its hparams' plan")
    p.add_argument("--corpus-docs", type=int, default=None, help="statistics corpus documents (default: all)")
    p.add_argument("--stats-dir", default=None, help="statistics cache (default: a temporary directory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny random model, n in {1, 2}, seconds")
    p.add_argument("--out-dir", default=str(RESULTS_DIR), help=f"results directory (default {RESULTS_DIR})")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--progress", action="store_true", help="progress bars")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------
# hparams and editors


def _hparams(setup: Setup, args, method: str):
    from massedit.hparams import MEMITHyperParams, world_preset

    path = args.rome_hparams if method == "rome" else args.memit_hparams
    if path:
        hp = MEMITHyperParams.from_file(path)
    else:
        hp = world_preset(setup.model.config, "rome" if method == "rome" else "memit")
    changes = {"mom2_n_samples": len(setup.corpus)}
    if args.steps is not None:
        changes["v_num_grad_steps"] = args.steps
    if method == "rome" and args.rome_layer is not None:
        changes["layers"] = [args.rome_layer]
    if method != "rome":
        if args.memit_layers:
            changes["layers"] = [int(x) for x in args.memit_layers.split(",") if x.strip()]
        if args.lam is not None:
            changes["mom2_update_weight"] = args.lam
        if args.batch_size is not None:
            changes["batch_size"] = args.batch_size
    return hp.replace(**changes)


def _digest(model, layout, layers) -> str:
    h = hashlib.sha256()
    for layer in sorted(set(layers)):
        h.update(layout.rewrite_module(layer).weight.detach().cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# evaluation


class Quality:
    """Post-edit metrics on the edited records; pre-edit per-case values cached by case id."""

    def __init__(self, model, tok, records):
        self.model, self.tok, self.records = model, tok, records
        self._pre: dict = {}
        self.pre_s = 0.0

    def _cases(self, n: int):
        from massedit.evaluation import evaluate

        return evaluate(self.model, self.tok, self.records[:n], kind="counterfact")

    @staticmethod
    def _agg(per_case) -> dict:
        from massedit.evaluation.aggregate import aggregate
        from massedit.evaluation.counterfact import CF_METRICS

        stats = aggregate(per_case, CF_METRICS, ("S", ("ES", "PS", "NS")))
        return {k: (None if v["mean"] is None else round(v["mean"], 3)) for k, v in stats.items()}

    def pre(self, n: int) -> dict:
        """Metrics of the unedited model on records[:n] (call only while the model is unedited)."""
        from massedit.evaluation import evaluate

        missing = [r for r in self.records[:n] if r["case_id"] not in self._pre]
        if missing:
            t = time.perf_counter()
            for case in evaluate(self.model, self.tok, missing, kind="counterfact")["per_case"]:
                self._pre[case["case_id"]] = case
            self.pre_s += time.perf_counter() - t
        return self._agg([self._pre[r["case_id"]] for r in self.records[:n]])

    def post(self, n: int) -> tuple[dict, list]:
        result = self._cases(n)
        return self._agg(result["per_case"]), result["per_case"]


# ----------------------------------------------------------------------------------------------
# the suite


def _sizes(max_n: int, available: int) -> list[int]:
    sizes, n = [], 1
    while n <= min(max_n, available):
        sizes.append(n)
        n *= 2
    return sizes


def _one_run(editor, method: str, records, n: int, quality: Quality, digest0: str, layers, batch_size) -> dict:
    model = editor.model
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        res = editor.edit(records[:n], method=method, batch_size=batch_size)
        edit_s = time.perf_counter() - t0
    t = time.perf_counter()
    post, _ = quality.post(n)
    eval_s = time.perf_counter() - t
    t = time.perf_counter()
    res.delta.revert(model)
    revert_s = time.perf_counter() - t
    restored = _digest(model, editor.layout, layers) == digest0
    if not restored:
        raise RuntimeError(f"{method} n={n}: the weights were not restored by revert")
    timings = {k: round(v, 4) for k, v in res.timings.items()}
    return {
        "method": method, "n": n, "edit_s": round(edit_s, 4), "timings": timings,
        "eval_s": round(eval_s, 3), "revert_s": round(revert_s, 4), "wall_s": round(edit_s + eval_s + revert_s, 3),
        "memory": mem.result, "metrics": post, "pre_metrics": quality.pre(n),
        "z_loss_mean": round(float(res.z_loss.float().mean()), 5),
        "z_steps_mean": round(float(res.z_steps.float().mean()), 3), "restored": restored,
    }


def _rome_single(editor, records, k: int, digest0: str, layers) -> dict:
    from massedit.evaluation import evaluate

    cases, times = [], []
    for rec in records[:k]:
        t = time.perf_counter()
        res = editor.edit([rec], method="rome")
        times.append(time.perf_counter() - t)
        case = evaluate(editor.model, editor.tok, [rec], kind="counterfact")["per_case"][0]
        res.delta.revert(editor.model)
        cases.append({"case_id": rec["case_id"], "ES": case["ES"], "PS": case["PS"], "NS": case["NS"],
                      "z_loss": round(float(res.z_loss[0]), 5)})
    if _digest(editor.model, editor.layout, layers) != digest0:
        raise RuntimeError("ROME single edits: the weights were not restored by revert")
    mean = lambda key: (round(100 * sum(c[key] for c in cases if c[key] is not None)  # noqa: E731
                              / max(1, sum(c[key] is not None for c in cases)), 3) if cases else None)
    return {"k": len(cases), "ES": mean("ES"), "PS": mean("PS"), "NS": mean("NS"),
            "edit_s_mean": round(sum(times) / max(1, len(times)), 4), "cases": cases}


def ratios(runs: list[dict]) -> dict:
    """Per n: serial/batched and rome/batched edit-time ratios (and the z phase), the largest n
    that each pair has in common, and at the batched engine's largest n the ratio against each
    method that the budget stopped earlier, its time extrapolated linearly in n from its last run
    (both run one request after another, so their time per request does not fall with n)."""
    by = {(r["method"], r["n"]): r for r in runs}
    out: dict = {"per_n": {}, "largest_common": {}, "at_max_n": {}}
    top = max((n for (m, n) in by if m == "memit"), default=None)
    for other in ("memit-serial", "rome"):
        common = sorted(n for (m, n) in by if m == other and ("memit", n) in by)
        for n in common:
            a, b = by[(other, n)], by[("memit", n)]
            entry = out["per_n"].setdefault(str(n), {})
            entry[f"{other}/memit"] = round(a["edit_s"] / b["edit_s"], 3)
            za, zb = a["timings"].get("z", 0.0), b["timings"].get("z", 0.0)
            entry[f"{other}/memit z"] = round(za / zb, 3) if zb > 0 else None
        if common:
            n = common[-1]
            out["largest_common"][f"{other}/memit"] = {
                "n": n, "ratio": round(by[(other, n)]["edit_s"] / by[("memit", n)]["edit_s"], 3),
                f"{other}_s": by[(other, n)]["edit_s"], "memit_s": by[("memit", n)]["edit_s"]}
            if top is not None and n < top:
                est = by[(other, n)]["edit_s"] * top / n
                out["at_max_n"][f"{other}/memit"] = {
                    "n": top, "ratio": round(est / by[("memit", top)]["edit_s"], 3), "extrapolated_from_n": n,
                    f"{other}_s_extrapolated": round(est, 2), "memit_s": by[("memit", top)]["edit_s"]}
    return out


def main(argv=None) -> dict:
    args = _parse(argv)
    t_suite = time.perf_counter()
    common.set_threads(args.threads)
    from massedit.editor import MassEditor

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SystemExit(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    budget = args.budget if args.budget is not None else (60.0 if args.smoke else DEFAULT_BUDGET)
    max_n = min(args.max_n, 2) if args.smoke else args.max_n
    if args.smoke:
        args.steps = args.steps or 2
        args.single = min(args.single, 1)

    t = time.perf_counter()
    if not args.smoke and world_ready(Path(args.world)):
        setup = load_world(Path(args.world), args.corpus_docs)
    else:
        reason = "--smoke" if args.smoke else f"no world build at {args.world} (build.json, model/, counterfact.json, corpus.txt)"
        print(f"NOTE: {reason}: using a random fallback model with synthetic requests; quality figures are "
              "meaningless, timings are for the fallback model's size", flush=True)
        setup = random_fallback(args.smoke, args.seed)
        if args.corpus_docs:
            setup.corpus = setup.corpus[: args.corpus_docs]
        setup.info["fallback_reason"] = reason
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    setup.model.to(device)
    setup.info["device"] = device
    setup_s = time.perf_counter() - t
    model, tok, records = setup.model, setup.tok, setup.records
    sizes = _sizes(max_n, len(records))

    hps = {m: _hparams(setup, args, m) for m in methods}
    tmp = None
    stats_dir = args.stats_dir
    if stats_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="massedit_scaling_stats_")
        stats_dir = tmp.name
    # Context templates: generated once (MEMIT's plan) and shared by every method, unless ROME
    # brings its own (--templates reference: generated with the ROME hparams' plan).
    t = time.perf_counter()
    if args.smoke:
        shared = SMOKE_TEMPLATES
    else:
        from massedit.inputs.templates import generate_templates
        from massedit.compute.targets import frozen_eval

        plan = (hps.get("memit") or hps.get("memit-serial") or _hparams(setup, args, "memit")).context_template_plan()
        with frozen_eval(model):
            shared = generate_templates(model, tok, plan, args.seed)
    editors: dict[str, MassEditor] = {}
    for m in methods:
        kind = "rome" if m == "rome" else "memit"
        if kind not in editors:
            own = kind == "rome" and args.templates == "reference" and not args.smoke
            editors[kind] = MassEditor(model, tok, hps[m], stats_dir=stats_dir, corpus=setup.corpus,
                                       model_name="scaling-bench", context_templates=None if own else shared,
                                       seed=args.seed, progress=args.progress)
    all_templates = {k: ed.context_templates() for k, ed in editors.items()}
    templates_s = time.perf_counter() - t
    first = next(iter(editors.values()))
    layers = sorted({l for hp in hps.values() for l in hp.layers})
    digest0 = _digest(model, first.layout, layers)

    # Statistics for every edited layer, from the unedited model, once (cached in stats_dir).
    t = time.perf_counter()
    for kind, ed in editors.items():
        if kind == "memit" or ed.hp.mom2_adjustment:
            ed.solvers()
    stats_s = time.perf_counter() - t

    quality = Quality(model, tok, records)
    # Warm-up (first-call paths, the λC factors), excluded from the timings.
    t = time.perf_counter()
    for m in methods:
        editors["rome" if m == "rome" else "memit"].edit(records[:1], method=m, apply=False)
    warmup_s = time.perf_counter() - t
    if _digest(model, first.layout, layers) != digest0:
        raise RuntimeError("warm-up changed the weights")

    print(f"scaling: model {setup.info['kind']} ({setup.info.get('path', setup.info.get('note', ''))}), "
          f"methods {methods}, n up to {sizes[-1] if sizes else 0}, budget {budget:g} s, threads {args.threads}",
          flush=True)
    runs: list[dict] = []
    spent = {m: 0.0 for m in methods}
    share = {m: budget / len(methods) for m in methods}
    active = list(methods)
    stopped: dict[str, str] = {}
    t_runs = time.perf_counter()
    for n in sizes:
        for m in list(active):
            ed = editors["rome" if m == "rome" else "memit"]
            r = _one_run(ed, m, records, n, quality, digest0, layers, args.batch_size)
            runs.append(r)
            spent[m] += r["wall_s"]
            print(f"  {m:<13} n={n:<5} edit {r['edit_s']:8.2f} s  eval {r['eval_s']:6.2f} s  "
                  f"peak {r['memory']['peak_mb']:8.1f} MB  ES {_f(r['metrics']['ES'])}  PS {_f(r['metrics']['PS'])}  "
                  f"NS {_f(r['metrics']['NS'])}  S {_f(r['metrics']['S'])}", flush=True)
            if n == sizes[-1]:
                continue
            if spent[m] + GROWTH * r["wall_s"] > share[m]:
                active.remove(m)
                stopped[m] = (f"stopped after n={n}: spent {spent[m]:.1f} s, next run predicted "
                              f"{GROWTH * r['wall_s']:.1f} s, share {share[m]:.1f} s")
                left = share[m] - spent[m]
                for other in active:  # hand the unused share on
                    share[other] += max(0.0, left) / len(active)
    runs_s = time.perf_counter() - t_runs

    single = None
    if "rome" in editors and args.single > 0:
        t = time.perf_counter()
        single = _rome_single(editors["rome"], records, args.single, digest0, layers)
        single["wall_s"] = round(time.perf_counter() - t, 3)
        print(f"  rome single edits (first {single['k']} records, each alone): ES {_f(single['ES'])} "
              f"PS {_f(single['PS'])} NS {_f(single['NS'])}", flush=True)

    ts = stamp()
    out_dir = Path(args.out_dir)
    result = {
        "suite": "scaling",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))},
        "machine": machine_info(),
        "model": setup.info,
        "fallback": setup.fallback,
        "methods": methods,
        "sizes": sizes,
        "hparams": {m: {k: v for k, v in hps[m].to_dict().items() if k in (
            "layers", "v_num_grad_steps", "v_lr", "v_loss_layer", "v_weight_decay", "clamp_norm_factor",
            "kl_factor", "mom2_adjustment", "mom2_update_weight", "mom2_n_samples", "mom2_dtype", "batch_size")}
            for m in methods},
        "context_templates": all_templates,
        "budget": {"seconds": budget, "growth_prediction": GROWTH, "spent_s": {m: round(v, 2) for m, v in spent.items()},
                   "final_share_s": {m: round(v, 2) for m, v in share.items()}, "stopped": stopped},
        "memory_method": "CPU: peak RSS above the RSS at the edit's start, sampled every 10 ms by a thread, "
                         "after glibc malloc_trim (tracemalloc does not see torch tensors); CUDA: "
                         "torch.cuda.max_memory_allocated above the allocation at start",
        "setup_s": round(setup_s, 2), "statistics_s": round(stats_s, 2), "context_templates_s": round(templates_s, 2),
        "warmup_s": round(warmup_s, 2), "pre_eval_s": round(quality.pre_s, 2), "runs_s": round(runs_s, 2),
        "runs": runs,
        "ratios": ratios(runs),
        "rome_single": single,
    }
    result["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    json_path = out_dir / f"scaling-{ts}.json"
    if not args.no_plots:
        result["plots"] = plots(result, out_dir / f"scaling-{ts}")
    result["suite_s"] = round(time.perf_counter() - t_suite, 2)
    write_json(json_path, result)
    if tmp is not None:
        tmp.cleanup()

    from benchmarks.table import render

    print()
    print(render(result))
    print(f"wrote {json_path}" + (f", {', '.join(result['plots'].values())}" if result.get("plots") else ""))
    result["json"] = str(json_path)
    return result


def _f(x) -> str:
    return "  -  " if x is None else f"{x:5.1f}"


# ----------------------------------------------------------------------------------------------
# plots


def plots(result: dict, prefix: Path) -> dict:
    plt = common.pyplot()

    prefix.parent.mkdir(parents=True, exist_ok=True)
    runs, methods = result["runs"], result["methods"]
    colors = {"rome": "tab:red", "memit-serial": "tab:orange", "memit": "tab:blue"}
    # memit-serial and memit give the same edits (DESIGN §2.2): distinct markers keep both visible.
    style = {"rome": dict(marker="o"), "memit-serial": dict(marker="s", markersize=8, linestyle="-."),
             "memit": dict(marker="o", markersize=4)}
    model = result["model"]
    title = ("random fallback model" if result["fallback"]
             else f"world model, {model.get('n_layer')} layers x {model.get('d_model')}")

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for m in methods:
        pts = sorted((r["n"], r["edit_s"]) for r in runs if r["method"] == m)
        if pts:
            ax.plot(*zip(*pts), label=m, color=colors.get(m), **style.get(m, {}))
            zpts = sorted((r["n"], r["timings"].get("z", 0.0)) for r in runs if r["method"] == m)
            ax.plot(*zip(*zpts), linestyle=":", color=colors.get(m), alpha=0.7, label=f"{m} (z phase)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("edits n")
    ax.set_ylabel("edit wall time (s)")
    ax.set_title(f"Runtime vs n — {title}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    runtime = common.save_figure(fig, str(prefix) + "-runtime.png")

    fig, axes = plt.subplots(2, 2, figsize=(9, 6.4), sharex=True)
    all_n = sorted({r["n"] for r in runs})
    pre = {r["n"]: r["pre_metrics"] for r in runs}
    for ax, metric in zip(axes.flat, METRICS):
        for m in methods:
            pts = sorted((r["n"], r["metrics"].get(metric)) for r in runs if r["method"] == m)
            pts = [(n, v) for n, v in pts if v is not None]
            if pts:
                ax.plot(*zip(*pts), label=m, color=colors.get(m), **style.get(m, {}))
        pre_pts = [(n, pre[n].get(metric)) for n in all_n if pre[n].get(metric) is not None]
        if pre_pts:
            ax.plot(*zip(*pre_pts), linestyle="--", color="gray", label="pre-edit")
        single = result.get("rome_single")
        if metric in ("ES", "PS", "NS") and single and single.get(metric) is not None:
            ax.scatter([1], [single[metric]], marker="*", s=90, color="darkred", zorder=5,
                       label=f"rome single edits (k={single['k']})")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-2, 102)
        ax.set_title(metric)
        ax.grid(True, alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("edits n")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Edit quality vs n — {title}")
    quality = common.save_figure(fig, str(prefix) + "-quality.png")
    return {"runtime": runtime, "quality": quality}


if __name__ == "__main__":
    main()
