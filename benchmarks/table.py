"""Markdown tables from a scaling results JSON: `python -m benchmarks.table [--json FILE]`.

The same renderer prints the tables at the end of a scaling run, so the README's tables are the
run's own output.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from benchmarks import common
from benchmarks.common import RESULTS_DIR, newest_result


def _parse(argv):
    p = common.parser("table", __doc__)
    p.add_argument("--json", default=None, help="a scaling-*.json file (default: the newest in benchmarks/results)")
    p.add_argument("--dir", default=str(RESULTS_DIR), help="where to look for the newest results")
    return p.parse_args(argv)


def _num(x, fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def render(result: dict) -> str:
    runs, methods = result["runs"], result["methods"]
    by = {(r["method"], r["n"]): r for r in runs}
    sizes = sorted({r["n"] for r in runs})
    m, model = result["machine"], result["model"]
    out = []
    kind = model["kind"] + (" — RANDOM FALLBACK, quality figures meaningless" if result.get("fallback") else "")
    out.append(f"Scaling run {result['timestamp']}: model {kind}"
               + (f" ({model.get('path')})" if model.get("path") else "")
               + f", {model.get('n_layer')} layers, d_model {model.get('d_model')}, d_ff {model.get('d_ff')}"
               + f", on {model.get('device', 'cpu')}.")
    out.append(f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} threads"
               + (f", GPU {m['gpu']}" if m.get("gpu") else "")
               + (f"; load average at start {m['load_average_at_start']}" if m.get("load_average_at_start") else "")
               + ".")
    hp = result["hparams"]
    out.append("Hparams: " + "; ".join(
        f"{meth}: layers {h['layers']}, {h['v_num_grad_steps']} steps, clamp {h['clamp_norm_factor']}"
        + ("" if meth == "rome" else f", λ {h['mom2_update_weight']:g}") for meth, h in hp.items()) + ".")
    out.append("")
    out.append("Edit wall time in seconds (`MassEditor.edit`, apply included; statistics precomputed) and ratios:")
    out.append("")
    header = ["n"] + [f"{x} s" for x in methods]
    pairs = [p for p in ("memit-serial", "rome") if p in methods and "memit" in methods]
    header += [f"{p} / memit" for p in pairs]
    rows = []
    for n in sizes:
        row = [str(n)] + [_num(by[(x, n)]["edit_s"]) if (x, n) in by else "–" for x in methods]
        for p in pairs:
            row.append(f"{by[(p, n)]['edit_s'] / by[('memit', n)]['edit_s']:.2f}×"
                       if (p, n) in by and ("memit", n) in by else "–")
        rows.append(row)
    out.append(common.markdown_table(header, rows))
    lc = result.get("ratios", {}).get("largest_common", {})
    if lc:
        out.append("")
        out.append("At the largest common n: " + "; ".join(
            f"{k} = {v['ratio']:.2f}× at n = {v['n']} ({v[k.split('/')[0] + '_s']:.2f} s vs {v['memit_s']:.2f} s)"
            for k, v in lc.items()) + ".")
    at_max = result.get("ratios", {}).get("at_max_n", {})
    if at_max:
        out.append("")
        out.append("At the batched engine's largest n (the other method's time extrapolated linearly from its last n): "
                   + "; ".join(f"{k} ≈ {v['ratio']:.2f}× at n = {v['n']} (≈ {v[k.split('/')[0] + '_s_extrapolated']:.1f} s "
                               f"from n = {v['extrapolated_from_n']}, vs {v['memit_s']:.2f} s measured)"
                               for k, v in at_max.items()) + ".")
    out.append("")
    out.append("Phases (s), peak memory (MB, see memory_method) and quality after editing "
               "(ES / PS / NS / S on the n edited records, %; pre-edit in parentheses):")
    out.append("")
    header = ["method", "n", "total", "z", "keys", "solve", "eval", "peak MB", "ES", "PS", "NS", "S"]
    rows = []
    for x in methods:
        for n in sizes:
            r = by.get((x, n))
            if r is None:
                continue
            t, q, pre = r["timings"], r["metrics"], r["pre_metrics"]
            rows.append([x, str(n), _num(r["edit_s"]), _num(t.get("z")), _num(t.get("keys")), _num(t.get("solve"), "{:.3f}"),
                         _num(r["eval_s"]), _num(r["memory"].get("cuda_peak_mb", r["memory"]["peak_mb"]), "{:.1f}")]
                        + [f"{_num(q.get(k), '{:.1f}')} ({_num(pre.get(k), '{:.1f}')})" for k in ("ES", "PS", "NS", "S")])
    out.append(common.markdown_table(header, rows))
    single = result.get("rome_single")
    if single:
        out.append("")
        out.append(f"ROME single edits (each of the first {single['k']} records edited alone, then reverted): "
                   f"ES {_num(single['ES'], '{:.1f}')}, PS {_num(single['PS'], '{:.1f}')}, "
                   f"NS {_num(single['NS'], '{:.1f}')}; {single['edit_s_mean']:.2f} s per edit.")
    b = result.get("budget", {})
    if b.get("stopped"):
        out.append("")
        out.append(f"Budget {b['seconds']:g} s: " + "; ".join(f"{k} {v}" for k, v in b["stopped"].items()) + ".")
    if "suite_s" in result:
        out.append("")
        out.append(f"Suite wall time {result['suite_s']:.0f} s (setup {result['setup_s']:.0f} s, statistics "
                   f"{result['statistics_s']:.0f} s, runs {result['runs_s']:.0f} s).")
    return "\n".join(out)


def main(argv=None) -> str:
    args = _parse(argv)
    path: Optional[Path] = Path(args.json) if args.json else newest_result("scaling", Path(args.dir))
    if path is None or not path.exists():
        raise SystemExit(f"no scaling results found ({args.json or Path(args.dir) / 'scaling-*.json'}); "
                         "run `python -m benchmarks.scaling` first")
    text = render(json.loads(path.read_text(encoding="utf-8")))
    print(f"<!-- generated by `python -m benchmarks.table` from {path.name} -->")
    print(text)
    return text


if __name__ == "__main__":
    main()
