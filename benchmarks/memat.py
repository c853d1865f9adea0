"""MEMAT vs MEMIT across two languages (issue 12, item 3; issue 22, item 1; README "MEMAT on the
bilingual world").

    python -m benchmarks.memat --world DIR [--n 100] [--k 4,8,16,32] [--threads T]
        [--stats-dir DIR] [--out-dir DIR]
    python -m benchmarks.memat --model gemma3-270m --facts DIR [--l2 ca] [--n 100] [--k 8,16,32]
        [--layers 2,3,4,5] [--lam 1000] [--hparams FILE] [--z-cache DIR] [--stats-dir DIR] [--threads T]

- A world must be bilingual (`massedit world build --languages 2`): counterfact.json (L1) and
  counterfact.l2.json (L2, the same case_ids). Facts of a real model come from
  `massedit data facts --model M --out DIR --languages en,ca`: DIR/counterfact.json (L1) and
  DIR/<--l2>/counterfact.json (L2, the same case_ids); the real model is edited with
  benchmarks.common.real_hparams (the MEMIT paper's z settings, --layers, --lam, --clamp) and its
  statistics come from the real models' built-in corpus. MEMAT's own keys are at their defaults
  (the paper's code) in both cases, K aside, unless --hparams gives a file (JSON / YAML, read by
  massedit.hparams.load_hparams) that replaces the source's settings, MEMAT's keys included
  (memat_lr, memat_epochs, ...); --k, --layers, --lam, --clamp, --steps, --samples override it.
- --z-cache DIR: the MEMIT run's z is stored there (benchmarks.z_cache) and a later run whose z
  would be the same (model, facts, z settings, context templates) takes it instead of the z phase,
  through `Memit(targets=)`, which checks it against the editor; the JSON says which (memit.z).
- Edits: the first --n L1 records with distinct subjects, made with MEMIT and with MEMAT (L2
  records of the same case_ids) for each K. Each run starts from the
  unedited model: its delta is reverted after the evaluation and the weights are checked bit for
  bit against a snapshot. MEMAT's MEMIT phase takes the MEMIT run's z (`Memat(..., targets=)`: one z
  optimization for all K) and solves again; whether it gives the same weights as the MEMIT run is
  checked (digests) and reported.
- Metrics: ES, PS, NS, EM, PM, NM with 95% intervals (massedit.evaluation.evaluate) on the edited L1 records
  and on the L2 records of the same case_ids, before the edit and after each run.
- Gains: relative change of MEMAT's EM and PM over MEMIT's, (MEMAT − MEMIT)/|MEMIT|, and the
  difference in NS points, per K and language.
- Probes: the facts they were trained and validated on (the edited facts MEMIT gets right in L2,
  split 70/30), the validation accuracy of every (layer, head) probe (heat map), the best one,
  the corrected heads; timings of MEMAT's phases (memit, memat_features, memat_probes,
  memat_omega). Where MEMIT gets fewer than two facts right in L2 MEMAT cannot run: the error is
  recorded and the rest (MEMIT, key transfer) still reported.
- Key transfer: per edited layer, how much of MEMIT's L1 edit reaches the L2 subject's key
  (`key_transfer`), and how many edited facts MEMIT already gets right in L2, with MEMAT's L2 EM
  gain split by that.
- World only: recall per language and the subject-token Jaccard overlap (the world's build.json).

K values above the model's number of heads are an error; without --k, the default 4,8,16,32 keeps
those below the head count and adds the head count itself when 32 exceeds it.

Writes <out-dir>/memat-<world or model>-<timestamp>.json (rewritten after each run, so a stopped
run keeps what it measured) and .png (probe accuracy heat map, gain vs K, key transfer).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch

from benchmarks import common, z_cache
from benchmarks.common import distinct_subject_records, machine_info

DEFAULT_K = (4, 8, 16, 32)
METRICS = ("ES", "PS", "NS", "EM", "PM", "NM")
LANGUAGES = ("L1", "L2")
PHASES = ("memit", "memat_features", "memat_probes", "memat_omega")
GAIN_METRICS = ("EM", "PM")


def _parse(argv):
    p = common.parser("memat", __doc__)
    p.add_argument("--n", type=int, default=100, help="edits (capped at the distinct subjects)")
    p.add_argument("--k", help="comma-separated head counts K (default: 4,8,16,32 up to the model's heads)")
    p.add_argument("--l2", help="with --facts: the second language, DIR/<L2>/counterfact.json (default ca)")
    p.add_argument("--hparams", help="hparams file (JSON / YAML) with MEMAT's keys (memat_lr, memat_epochs, ...): "
                                     "replaces the source's settings; --k, --layers, --lam ... override it")
    common.add_z_cache(p, "the MEMIT run's z is saved there")
    common.add_source_arguments(p, "a bilingual world directory (massedit world build --languages 2)")
    args = p.parse_args(argv)
    try:
        args.k_list = None if args.k is None else [int(k) for k in args.k.split(",")]
    except ValueError:
        p.error(f"--k: comma-separated integers, e.g. 4,8,16, got {args.k!r}")
    if args.n < 1 or (args.k_list is not None and min(args.k_list) < 1):
        p.error("--n and every --k must be >= 1")
    if args.world is not None and args.l2 is not None:
        p.error("--l2 goes with --facts; a bilingual world's L2 is its counterfact.l2.json")
    common.check_source(p, args, ("counterfact.json", "counterfact.l2.json", "model"),
                        "massedit world build --languages 2 --out DIR")
    common.check_z_cache(p, args)
    args.hp = common.read_hparams(p, args.hparams)
    if args.facts is not None:
        args.l2 = args.l2 or "ca"
        if not l2_path(args).is_file():
            p.error(f"--facts {args.facts}: no {args.l2}/counterfact.json; rebuild the facts with both languages: "
                    f"`massedit data facts --model {args.model} --out {args.facts} --languages en,{args.l2}`")
    return args


def l2_path(args) -> Path:
    """The L2 records: a world's counterfact.l2.json, or the facts' <l2>/counterfact.json."""
    if args.world is not None:
        return Path(args.world) / "counterfact.l2.json"
    return Path(args.facts) / args.l2 / "counterfact.json"


def k_values(asked: Optional[list[int]], n_heads: int) -> list[int]:
    """The K of each MEMAT run: `asked` if every one fits the model, else an error; without `asked`,
    DEFAULT_K below n_heads, plus n_heads when a default exceeds it."""
    if asked is not None:
        over = [k for k in asked if k > n_heads]
        if over:
            raise SystemExit(f"--k {','.join(map(str, over))}: the model has {n_heads} heads in all; "
                             f"give values up to {n_heads}")
        return list(dict.fromkeys(asked))
    ks = [k for k in DEFAULT_K if k < n_heads]
    return ks + [n_heads] if max(DEFAULT_K) >= n_heads else ks


def l2_records(path: Path, l1: list[dict]) -> list[dict]:
    """The L2 record (from the CounterFact file `path`) of each L1 record, by case_id, in the same order."""
    from massedit.inputs.records import load_records

    _, records = load_records(path)
    by_case = {rec["case_id"]: rec for rec in records}
    missing = [rec["case_id"] for rec in l1 if rec["case_id"] not in by_case]
    if missing:
        raise SystemExit(f"{path}: no record for case_ids {missing[:10]}; give the L2 file built with the L1 one "
                         "(massedit world build --languages 2, or massedit data facts --languages en,ca)")
    return [by_case[rec["case_id"]] for rec in l1]


def _evaluate(model, tok, records: dict) -> tuple[dict, dict]:
    """Metrics ({language: {metric: stat}}) and the per-case values of each language."""
    from massedit.evaluation import evaluate

    metrics, per_case = {}, {}
    for lang, recs in records.items():
        ev = evaluate(model, tok, recs)
        metrics[lang] = {m: ev["metrics"][m] for m in METRICS}
        per_case[lang] = ev["per_case"]
    return metrics, per_case


def _snapshot(model) -> dict:
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def _unchanged(model, snapshot: dict) -> bool:
    state = model.state_dict()
    return state.keys() == snapshot.keys() and all(torch.equal(state[k], v) for k, v in snapshot.items())


def relative_gain(memat: Optional[float], memit: Optional[float]) -> Optional[float]:
    """(memat − memit)/|memit| in percent; None when either is missing or memit is 0."""
    if memat is None or memit is None or memit == 0:
        return None
    return 100.0 * (memat - memit) / abs(memit)


def gains(memat: dict, memit: dict) -> dict:
    """Per language: relative EM and PM gains (percent), their differences and NS's (points)."""
    out = {}
    for lang in LANGUAGES:
        a, b = memat[lang], memit[lang]
        row = {f"{m}_gain_pct": relative_gain(a[m]["mean"], b[m]["mean"]) for m in GAIN_METRICS}
        for m in GAIN_METRICS + ("NS",):
            row[f"{m}_diff"] = None if a[m]["mean"] is None or b[m]["mean"] is None else a[m]["mean"] - b[m]["mean"]
        out[lang] = row
    return out


def _split_gain(memat_cases: list[dict], memit_cases: list[dict], right: list[bool]) -> dict:
    """MEMAT's L2 EM minus MEMIT's (points), over the facts MEMIT gets right in L2 and over the others."""
    out = {}
    for name, keep in (("right_after_memit", True), ("wrong_after_memit", False)):
        diffs = [a["EM"] - b["EM"] for a, b, r in zip(memat_cases, memit_cases, right) if r == keep]
        out[name] = {"n": len(diffs), "EM_diff": 100.0 * sum(diffs) / len(diffs) if diffs else None}
    return out


def world_facts(world: Path) -> dict:
    """Recall per language and subject-token overlap, as the world's build recorded them."""
    build = json.loads((world / "build.json").read_text(encoding="utf-8"))
    recall = build.get("recall", {})
    return {
        "model": build.get("model"),
        "steps": build.get("args", {}).get("train", {}).get("steps"),
        "recall_full_top1": {lang: recall.get(key, {}).get("full_top1")
                             for lang, key in (("L1", "rewrite"), ("L2", "l2_rewrite"))},
        "subject_token_jaccard": build.get("languages", {}).get("subject_token_jaccard"),
    }


def key_transfer(editor, records: dict, delta) -> dict:
    """Per edited layer, how much of MEMIT's edit an L2 prompt reaches: the MLP key k at the subject's
    last token of each rewrite prompt in L1 and L2, their cosine for the same fact and for different
    facts (L1 fact i against L2 fact i+1), and the median over facts of ‖Δk_L2‖/‖Δk_L1‖ with
    Δk = u (vᵀk) the edit's change of that layer's output."""
    from massedit.compute.keys import collect_at_subject
    from massedit.inputs.tokens import encode_prompt

    layers = editor.hp.layers
    keys = {}
    for lang, recs in records.items():
        enc = [encode_prompt(editor.tok, r["requested_rewrite"]["prompt"], r["requested_rewrite"]["subject"])
               for r in recs]
        found = collect_at_subject(editor.model, editor.layout, editor.tok, enc, key_layers=layers)
        keys[lang] = {l: found[("key", l)].double() for l in layers}
    by_name = {wd.name: wd for wd in delta.weights}
    out = {}
    for l in layers:
        wd = by_name[editor.layout.rewrite_weight_name(l)]
        u, v = wd.u.double().cpu(), wd.v.double().cpu()
        k1, k2 = keys["L1"][l], keys["L2"][l]
        reach = (k2 @ v @ u.T).norm(dim=1) / (k1 @ v @ u.T).norm(dim=1).clamp_min(1e-30)
        cos = torch.nn.functional.cosine_similarity
        out[str(l)] = {"cos_same_fact": float(cos(k1, k2).mean()),
                       "cos_other_fact": float(cos(k1, k2.roll(-1, 0)).mean()),
                       "cos_l1_other_fact": float(cos(k1, k1.roll(-1, 0)).mean()),
                       "edit_reach_l2_over_l1_median": float(reach.median())}
    return out


def run(args, save=lambda result: None) -> dict:
    """The measurements; `save(result)` after each run, so that a stopped run keeps what it measured."""
    from massedit.inputs.requests import RequestError
    from massedit.methods.memat.method import Memat
    from massedit.methods.memit import Memit

    model, tok = common.source_model(args)
    l1, requests = distinct_subject_records(common.source_directory(args), args.n)
    records = {"L1": l1, "L2": l2_records(l2_path(args), l1)}
    editor = common.source_editor(args, model, tok, args.hp)
    n_heads = editor.layout.n_layers * editor.layout.n_heads
    ks = k_values(args.k_list, n_heads)
    base_hp = editor.hp
    snapshot = _snapshot(model)

    pre, pre_cases = _evaluate(model, tok, records)
    result = {"benchmark": "memat", **common.source_info(args), "l2_records": str(l2_path(args)),
              "n": len(requests), "k": ks, "n_layers": editor.layout.n_layers, "n_heads": editor.layout.n_heads,
              "hparams": base_hp.to_dict(), "hparams_file": args.hparams, "machine": machine_info(), "pre": pre}
    if args.world is not None:
        result["world_facts"] = world_facts(Path(args.world))

    stored = _stored_z(args, editor, requests)
    edited = memit_result = editor.edit(requests, method=Memit(targets=stored[0]) if stored else "memit")
    if stored:
        print(f"z: stored, {stored[1]['path']}", flush=True)
    elif args.z_cache:
        z_cache.save(args.z_cache, _z_key(args, editor), edited.requests, edited.z, edited.z_loss, edited.z_steps,
                     edited.timings["z"], edited.delta.metadata)
    memit, memit_cases = _evaluate(model, tok, records)
    memit_digests = {d["name"]: d["sha256_after"] for d in edited.delta.digests()}
    memit_dense = {wd.name: wd.dense() for wd in edited.delta.weights}
    edited.delta.revert(model)
    result["key_transfer"] = key_transfer(editor, records, edited.delta)
    right = _right_in_l2(memit_cases["L2"])
    result["memit"] = {"metrics": memit, "timings": edited.report()["timings"], "restored": _unchanged(model, snapshot),
                       "l2_right": sum(right),
                       "z": f"stored: {stored[1]['path']} (z phase {stored[1]['z_seconds']:.0f} s for "
                            f"{stored[1]['stored']})" if stored else "optimized"}
    result["pre_l2_right"] = sum(_right_in_l2(pre_cases["L2"]))
    _print_rows("memit", memit)
    _print_transfer(result)
    result["memat"] = []
    save(result)

    for k in ks:
        editor.hp = base_hp.replace(memat_top_k=k)
        try:
            edited = editor.edit(requests, method=Memat(records["L2"], targets=memit_result))
        except RequestError as err:
            # Too few facts right in L2 for the probes: the same for every K (the MEMIT phase is).
            result["memat_error"] = str(err)
            print(f"MEMAT did not run: {err}", flush=True)
            break
        metrics, cases = _evaluate(model, tok, records)
        digests = {d["name"]: d["sha256_after"] for d in edited.delta.digests()}
        edited.delta.revert(model)
        details = edited.details
        result["memat"].append({
            "k": k,
            "metrics": metrics,
            "gains": gains(metrics, memit),
            "l2_em_gain_by_transfer": _split_gain(cases["L2"], memit_cases["L2"], right),
            "timings": edited.report()["timings"],
            "memit_phase_identical": all(digests.get(n) == d for n, d in memit_digests.items()),
            "memit_phase_rel_diff": _rel_diff(edited.delta, memit_dense),
            "restored": _unchanged(model, snapshot),
            "details": {key: details[key] for key in ("facts", "facts_right", "n_train_facts", "n_val_facts",
                                                      "best_val_accuracy", "heads", "omega_norms", "a0_norms")},
            "omega_loss_first_last": [details["omega_loss"][0], details["omega_loss"][-1]],
            "omega_steps": len(details["omega_loss"]),
            "probe_accuracy": details["probe_accuracy"],
        })
        if len(result["memat"]) == 1:
            result["probe_facts"] = {key: details[key] for key in ("facts", "facts_right", "n_train_facts",
                                                                   "n_val_facts")}
            print(f"probes: trained on {details['n_train_facts']} facts, validated on {details['n_val_facts']} "
                  f"(the {details['facts_right']} of {details['facts']} edited facts MEMIT gets right in L2)",
                  flush=True)
        _print_rows(f"memat K={k}", metrics)
        save(result)
    editor.hp = base_hp
    return result


def _z_key(args, editor) -> dict:
    return z_cache.key(common.source_name(args), editor.hp.to_dict(), editor.context_templates())


def _stored_z(args, editor, requests):
    """(EditResult for Memit(targets=), z_cache.load's dict) of the requests' stored z, or None."""
    return z_cache.stored_result(args.z_cache, _z_key(args, editor), editor, requests) if args.z_cache else None


def _print_transfer(result: dict) -> None:
    print(f"MEMIT gets {result['memit']['l2_right']} of {result['n']} edited facts right in L2 "
          f"({result['pre_l2_right']} before the edit)", flush=True)
    for layer, row in result["key_transfer"].items():
        print(f"key transfer, layer {layer}: cos(L1, L2 key) same fact {row['cos_same_fact']:.3f}, other fact "
              f"{row['cos_other_fact']:.3f}; median |edit at L2 key| / |edit at L1 key| "
              f"{row['edit_reach_l2_over_l1_median']:.3f}", flush=True)


def _rel_diff(delta, reference: dict) -> float:
    """max |Δ − Δ_ref| / max |Δ_ref| over the weights in `reference` ({name: dense Δ})."""
    mine = {wd.name: wd for wd in delta.weights}
    return max(float((mine[name].dense() - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
               for name, ref in reference.items())


def _right_in_l2(cases: list[dict]) -> list[bool]:
    """Whether each L2 rewrite prompt prefers the new object (ES = 1)."""
    return [bool(c.get("ES")) for c in cases]


def _fmt(stat: dict) -> str:
    if stat["mean"] is None:
        return f"{'-':>12}"
    half = "" if stat["ci95"] is None else f"±{(stat['ci95'][1] - stat['ci95'][0]) / 2:.1f}"
    return f"{stat['mean']:6.1f}{half:>6}"


def _print_rows(label: str, metrics: dict) -> None:
    for lang in LANGUAGES:
        print(f"{label:>11} {lang}  " + " ".join(_fmt(metrics[lang][m]) for m in METRICS), flush=True)


def table(result: dict) -> str:
    """The metric table (mean ± 95% half-width) and the per-K gains, as Markdown."""
    head = "| run | lang | " + " | ".join(METRICS) + " |\n|---|---|" + "---|" * len(METRICS) + "\n"
    rows = [("pre-edit", result["pre"]), ("MEMIT", result["memit"]["metrics"])]
    rows += [(f"MEMAT K={r['k']}", r["metrics"]) for r in result["memat"]]
    body = "".join(f"| {label} | {lang} | " + " | ".join(_fmt(m[lang][x]).strip() for x in METRICS) + " |\n"
                   for label, m in rows for lang in LANGUAGES)
    # The points beside the percentages: near a MEMIT EM of 0 a relative gain is large whatever it is.
    gain_head = ("\n| K | L2 EM gain % (pts) | L2 PM gain % (pts) | L2 NS diff | L1 EM gain % (pts) "
                 "| L1 PM gain % (pts) | L1 NS diff "
                 "| probe train facts | best probe acc | " + " | ".join(f"{p} s" for p in PHASES) + " |\n|"
                 + "---|" * (9 + len(PHASES)) + "\n")

    def num(x, digits=1):
        return "-" if x is None else f"{x:+.{digits}f}"

    def gain(row: dict, metric: str) -> str:
        return f"{num(row[f'{metric}_gain_pct'])} ({num(row[f'{metric}_diff'])})"

    gain_rows = "".join(
        f"| {r['k']} | " + " | ".join(x for lang in ("L2", "L1") for x in (
            gain(r["gains"][lang], "EM"), gain(r["gains"][lang], "PM"), num(r["gains"][lang]["NS_diff"])))
        + f" | {r['details']['n_train_facts']} | {r['details']['best_val_accuracy']:.3f} | "
        + " | ".join(f"{r['timings'].get(p, 0.0):.1f}" for p in PHASES) + " |\n"
        for r in result["memat"])
    missing = f"\nMEMAT did not run: {result['memat_error']}\n" if "memat_error" in result else ""
    return head + body + gain_head + gain_rows + missing


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()

    fig, (ax_map, ax_gain, ax_keys) = plt.subplots(1, 3, figsize=(16, 4.2))
    if result["memat"]:
        accuracy = torch.tensor(result["memat"][0]["probe_accuracy"])
        im = ax_map.imshow(accuracy.numpy(), aspect="auto", cmap="viridis", vmin=min(0.5, float(accuracy.min())),
                           vmax=1.0)
        ax_map.set_xlabel("head")
        ax_map.set_ylabel("layer")
        ax_map.set_xticks(range(result["n_heads"]))
        ax_map.set_yticks(range(result["n_layers"]))
        facts = result["memat"][0]["details"]
        ax_map.set_title(f"probe validation accuracy (best {float(accuracy.max()):.2f}; "
                         f"{facts['n_train_facts']} train / {facts['n_val_facts']} validation facts)", fontsize=9)
        fig.colorbar(im, ax=ax_map)
    else:
        for ax in (ax_map, ax_gain):
            ax.text(0.5, 0.5, "MEMAT did not run:\ntoo few facts right in L2", ha="center", va="center")
            ax.set_axis_off()
    ks = [r["k"] for r in result["memat"]]
    for lang, style in (("L2", "-o"), ("L1", "--s")):
        for metric in GAIN_METRICS:
            ys = [r["gains"][lang][f"{metric}_gain_pct"] for r in result["memat"]]
            ax_gain.plot(ks, [float("nan") if y is None else y for y in ys], style, label=f"{metric} {lang}")
    if ks:
        ax_gain.axhline(0, color="black", linewidth=0.8)
        ax_gain.axhline(10, color="grey", linestyle=":", linewidth=0.8, label="+10%")
        ax_gain.set_xscale("log", base=2)
        ax_gain.set_xticks(ks, [str(k) for k in ks])
        ax_gain.set_xlabel("K (corrected heads)")
        ax_gain.set_ylabel("relative gain over MEMIT (%)")
        ax_gain.set_title(f"MEMAT vs MEMIT, {result['n']} edits from L1")
        ax_gain.grid(True, alpha=0.3)
        ax_gain.legend(fontsize=8)
    layers = list(result["key_transfer"])
    rows = [result["key_transfer"][layer] for layer in layers]
    for key, label in (("edit_reach_l2_over_l1_median", "|edit at L2 key| / |at L1 key| (median)"),
                       ("cos_same_fact", "cos(L1 key, L2 key), same fact"),
                       ("cos_other_fact", "cos(L1 key, L2 key), other fact")):
        ax_keys.plot(layers, [row[key] for row in rows], marker="o", label=label)
    ax_keys.set_xlabel("edited layer")
    ax_keys.set_title(f"MEMIT's edit at the L2 subject's key ({result['memit']['l2_right']} of {result['n']} "
                      "right in L2)", fontsize=9)
    ax_keys.grid(True, alpha=0.3)
    # Reach sits near 1 and the cosines below it: from 0 the legend fits under the points.
    ax_keys.set_ylim(0, max(1.05, *(row[k] for row in rows for k in ("edit_reach_l2_over_l1_median",
                                                                         "cos_same_fact"))) + 0.05)
    ax_keys.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"MEMAT on {_title(result)}")
    common.save_figure(fig, path)


def _title(result: dict) -> str:
    if "world" in result:
        return Path(result["world"]).name
    return f"{result['model']}, facts {Path(result['facts']).name} (L2: {Path(result['l2_records']).parent.name})"


def main(argv: Optional[list] = None) -> dict:
    args = _parse(argv)
    common.set_threads(args.threads)
    path = common.result_path(f"memat-{common.source_name(args)}", directory=args.out_dir)
    print(f"{'':>11} lang " + " ".join(f"{m:>12}" for m in METRICS))
    t0 = time.perf_counter()
    result = run(args, save=lambda partial: common.write_json(path, partial))
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    text = table(result)
    print(text)
    result["table"] = text
    common.write_result("memat", result, out=path, plot=plot)
    return result


if __name__ == "__main__":
    main()
