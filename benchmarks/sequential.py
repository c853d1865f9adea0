"""Sequential editing (DESIGN §11; issue 22, item 2): rounds of edits for each update rule, on a
knowledge world or on a real model with real facts.

    python -m benchmarks.sequential --world worlds/gpt2-default [--n 2000] [--round-size 100]
        [--rules memit,memit-preserve,alphaedit] [--serial-rounds 1] [--out-dir DIR]
    python -m benchmarks.sequential --model smollm2-135m --facts DIR [--n 1000] [--round-size 100]
        [--layers 1,2,3,4,5] [--lam 1000] [--hparams FILE] [--threshold 2e-2,spectrum] [--l2 10]
        [--null-mass 0.05] [--serial-rounds 0] [--stats-dir DIR]

- Requests: the CounterFact records with distinct subjects of the world, or of the facts directory
  (`massedit data facts --model M --out DIR`), at most --n of them, edited in rounds of
  --round-size on one model per rule (each rule starts from the unedited model, loaded again).
  A real model is edited with benchmarks.common.real_hparams (the MEMIT paper's z settings,
  --layers, --lam, --clamp) and statistics of the real models' built-in corpus.
- --hparams FILE (read by massedit.hparams.load_hparams) replaces those settings for every rule,
  AlphaEdit's keys nullspace_threshold and L2 included; --layers, --lam, --clamp, --steps and
  --samples override its keys, and --threshold and --l2 override AlphaEdit's.
- --threshold: comma-separated nullspace thresholds, one alphaedit run each (default: the hparams'
  value, 2e-2 as AlphaEdit's public files without --hparams). `spectrum` picks one from the
  model's covariances: the eigenvalues of the edited layers' C, pooled, below which lies the
  fraction --null-mass of their summed eigenvalue mass (`spectrum_threshold`): the directions
  edits may write then carry that share of the unedited model's key energy, whatever the scale of
  its keys (AlphaEdit's fixed 2e-2 is an absolute eigenvalue, so what it keeps depends on that
  scale). Every alphaedit run records its threshold and L2 and, per edited layer, the null space's
  dimension and share of C's trace at that threshold, with the spectrum's quantiles.
- After every round: ES / PS / NS over all the edits so far, and over the first round's edits (how
  much of the earliest knowledge survives), with the round's wall time and its evaluation's.
- The serial-z structure of AlphaEdit's public code (z one request at a time; the engine's
  `memit-serial` z loop with AlphaEdit's update stands in for it) runs the first --serial-rounds
  rounds on a fresh model: the ratio of its round time to the batched engine's is reported.

Writes <out-dir>/sequential-<world or model>-<timestamp>.json and .png (metrics vs number of edits,
one line per run), both rewritten after every round, so a run stopped part way keeps its rounds.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Union

import torch

from benchmarks import common
from benchmarks.common import distinct_subject_records, machine_info

RULES = ("memit", "memit-preserve", "alphaedit")
METRICS = ("ES", "PS", "NS")
PANELS = METRICS + tuple(f"{m}_first_round" for m in METRICS)
SPECTRUM = "spectrum"
DEFAULT_NULL_MASS = 0.05
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def _parse(argv):
    p = common.parser("sequential", __doc__)
    p.add_argument("--n", type=int, default=2000, help="edits in all (capped at the distinct subjects)")
    p.add_argument("--round-size", type=int, default=100)
    p.add_argument("--rules", default=",".join(RULES), help="comma separated, from " + ", ".join(RULES))
    p.add_argument("--serial-rounds", type=int, default=1, help="rounds timed with AlphaEdit's serial z (0: none)")
    p.add_argument("--hparams", help="hparams file (JSON / YAML) for every rule, AlphaEdit's nullspace_threshold and "
                                     "L2 included")
    p.add_argument("--threshold", help="AlphaEdit's nullspace_threshold: comma-separated values and/or 'spectrum', "
                                       "one alphaedit run each (default: the hparams', 2e-2)")
    p.add_argument("--null-mass", type=float, default=DEFAULT_NULL_MASS,
                   help=f"--threshold spectrum: the share of the covariances' eigenvalue mass below the threshold "
                        f"(default {DEFAULT_NULL_MASS})")
    p.add_argument("--l2", type=float, help="AlphaEdit's L2 (default: the hparams', 10)")
    common.add_source_arguments(p, "a world directory (massedit world build --out DIR)")
    args = p.parse_args(argv)
    args.rule_list = args.rules.split(",")
    bad = [r for r in args.rule_list if r not in RULES]
    if bad or args.n < 1 or args.round_size < 1 or args.serial_rounds < 0:
        p.error(f"--rules from {', '.join(RULES)} (got {bad}); --n, --round-size >= 1; --serial-rounds >= 0")
    try:
        args.thresholds = [None] if args.threshold is None else [
            t if t == SPECTRUM else float(t) for t in args.threshold.split(",")]
    except ValueError:
        p.error(f"--threshold: comma-separated numbers and/or '{SPECTRUM}', e.g. 2e-2,{SPECTRUM}, "
                f"got {args.threshold!r}")
    if any(t is not None and t != SPECTRUM and t <= 0 for t in args.thresholds):
        p.error(f"--threshold: thresholds must be > 0, got {args.threshold!r}")
    if not 0 < args.null_mass < 1:
        p.error(f"--null-mass: a share between 0 and 1, e.g. {DEFAULT_NULL_MASS}, got {args.null_mass}")
    if args.l2 is not None and args.l2 < 0:
        p.error(f"--l2 must be >= 0 (AlphaEdit's public files use 10), got {args.l2}")
    common.check_source(p, args, ("counterfact.json", "model"))
    args.hp = common.read_hparams(p, args.hparams)
    return args


def spectrum_threshold(eigenvalues: dict, mass: float) -> float:
    """The nullspace threshold below which the pooled eigenvalues of the layers' covariances
    ({layer: eigenvalues}) hold at most the share `mass` of their sum: halfway between the last
    eigenvalue inside that share and the first that would pass it (not on an eigenvalue, where
    whether it counts would hang on the last bits of the eigensolver that computes it again)."""
    pooled = torch.sort(torch.cat([e.double().flatten() for e in eigenvalues.values()])).values
    share = pooled.cumsum(0) / pooled.sum()
    below = int((share <= mass).sum())
    if below == 0:
        return float(pooled[0] / 2)
    if below == len(pooled):
        return float(pooled[-1] * 2)
    return float((pooled[below - 1] + pooled[below]) / 2)


def spectrum_summary(eigenvalues: dict, threshold: float) -> dict:
    """Per layer: its width, the null space's dimension and share of the trace at `threshold`,
    and the eigenvalues' quantiles."""
    out = {}
    for layer, e in eigenvalues.items():
        e = e.double()
        null = e < threshold
        out[str(layer)] = {"dim": len(e), "null_dim": int(null.sum()), "null_mass": float(e[null].sum() / e.sum()),
                           "trace": float(e.sum()),
                           "quantiles": {f"{q:g}": float(v) for q, v in zip(
                               QUANTILES, torch.quantile(e, torch.tensor(QUANTILES, dtype=e.dtype)))}}
    return out


def _eigenvalues(editor) -> dict:
    return {layer: torch.linalg.eigvalsh(c.double()) for layer, c in editor.covariances().items()}


def _alphaedit(editor, threshold: Union[float, str, None], args):
    """AlphaEdit at `threshold` (None: the hparams'; 'spectrum': picked from `editor`'s covariances)
    and --l2, with the settings it uses and the spectrum at its threshold."""
    from massedit.methods.alphaedit import AlphaEdit

    eigenvalues = {layer: torch.linalg.eigvalsh(c.double()) for layer, c in editor.covariances().items()}
    picked = spectrum_threshold(eigenvalues, args.null_mass) if threshold == SPECTRUM else threshold
    method = AlphaEdit(nullspace_threshold=picked, l2=args.l2)
    used, l2 = method.settings(editor)
    info = {"threshold": used, "L2": l2, "threshold_from": "hparams" if threshold is None else threshold}
    if threshold == SPECTRUM:
        info["null_mass"] = args.null_mass
    info["spectrum"] = spectrum_summary(eigenvalues, used)
    return method, info


def _label(run: dict) -> str:
    if run["rule"] != "alphaedit":
        return run["rule"]
    return f"alphaedit ({'spectrum ' if run['threshold_from'] == SPECTRUM else ''}t={run['threshold']:.3g})"


def run_rule(rule: str, threshold, args, rounds: list, records: list, out: dict, save, templates=None):
    """Edits `rounds` with `rule` on a freshly loaded model, appending each round's metrics to
    out["rounds"] and calling `save()` after each; returns the context templates it edited with."""
    from massedit.edits.sequential import SequentialEditor
    from massedit.evaluation import evaluate, summary
    from massedit.evaluation.aggregate import aggregate
    from massedit.methods import get_method

    model, tok = common.source_model(args)
    # Every rule edits with the same context templates (the first rule's).
    editor = common.source_editor(args, model, tok, args.hp, templates)
    if rule == "alphaedit":
        method, info = _alphaedit(editor, threshold, args)
        out.update(info)
        out["null_space_dim"] = {str(l): round(float(p.trace())) for l, p in method.projectors(editor).items()}
    else:
        method = get_method(rule)
    out["label"] = _label(out)
    seq = SequentialEditor(editor, method)
    first = len(rounds[0])
    done = 0
    for i, batch in enumerate(rounds, 1):
        result = seq.edit_round(batch)
        done += len(batch)
        t0 = time.perf_counter()
        ev = evaluate(model, tok, records[:done])
        eval_seconds = time.perf_counter() - t0
        metrics = summary(ev)
        early = aggregate(ev["per_case"][:first], METRICS)
        out["rounds"].append({
            "round": i, "n_edits": done, "seconds": result.timings["total"], "eval_seconds": round(eval_seconds, 2),
            "timings": {k: round(v, 4) for k, v in result.timings.items()},
            **{m: metrics[m] for m in METRICS},
            **{f"{m}_first_round": early[m]["mean"] for m in METRICS},
        })
        row = out["rounds"][-1]
        print(f"{out['label']:>28} round {i:>3}: {done:>5} edits  {result.timings['total']:7.2f} s "
              f"(evaluation {eval_seconds:6.1f} s)  "
              + "  ".join(f"{m} {_pct(row[m])}" for m in METRICS) + "  round 1: "
              + "  ".join(f"{m} {_pct(row[m + '_first_round'])}" for m in METRICS), flush=True)
        save()
    return editor.context_templates()


def _pct(value) -> str:
    """A metric for the table; n/a where the records cannot give it (e.g. no neighborhood prompts)."""
    return "  n/a" if value is None else f"{value:5.1f}"


def run_serial(args, rounds: list, templates, threshold: float, l2: float) -> list[float]:
    from massedit.edits.sequential import SequentialEditor
    from massedit.methods.alphaedit import AlphaEdit

    model, tok = common.source_model(args)
    editor = common.source_editor(args, model, tok, args.hp, templates)
    seq = SequentialEditor(editor, AlphaEdit(serial_z=True, nullspace_threshold=threshold, l2=l2))
    seconds = []
    for batch in rounds[: args.serial_rounds]:
        seconds.append(seq.edit_round(batch).timings["total"])
        print(f"alphaedit (serial z) round {len(seconds)}: {seconds[-1]:.2f} s", flush=True)
    return seconds


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()

    fig, axes = plt.subplots(2, len(METRICS), figsize=(4.2 * len(METRICS), 7.4))
    for ax, metric in zip(axes.flat, PANELS):
        for run in result["runs"]:
            xs = [r["n_edits"] for r in run["rounds"]]
            ys = [float("nan") if r[metric] is None else r[metric] for r in run["rounds"]]
            ax.plot(xs, ys, marker="o", markersize=3, label=run.get("label", run["rule"]))
        ax.set_xlabel("edits so far")
        ax.set_title(metric.replace("_first_round", " of round 1's edits") if "first" in metric
                     else f"{metric} of all edits so far")
        ax.set_ylim(-2, 102)
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Sequential editing, rounds of {result['round_size']} ({result['source']})")
    common.save_figure(fig, path)


def main(argv: Optional[list] = None) -> dict:
    args = _parse(argv)
    common.set_threads(args.threads)
    records, requests = distinct_subject_records(common.source_directory(args), args.n)
    rounds = [requests[i : i + args.round_size] for i in range(0, len(requests), args.round_size)]
    name = common.source_name(args)
    path = common.result_path(f"sequential-{name}", directory=args.out_dir)
    result = {"benchmark": "sequential", **common.source_info(args), "source": name, "n": len(requests),
              "round_size": args.round_size, "hparams_file": args.hparams, "machine": machine_info(), "runs": []}

    def save() -> None:
        common.write_json(path, result)
        plot(result, path.with_suffix(".png"))

    templates = None
    for rule in args.rule_list:
        for threshold in args.thresholds if rule == "alphaedit" else [None]:
            run = {"rule": rule, "rounds": []}
            result["runs"].append(run)
            templates = run_rule(rule, threshold, args, rounds, records, run, save, templates)
    batched = next((r for r in result["runs"] if r["rule"] == "alphaedit"), None)
    if args.serial_rounds and batched is not None:
        serial = run_serial(args, rounds, templates, batched["threshold"], batched["L2"])
        fast = [r["seconds"] for r in batched["rounds"][: len(serial)]]
        result["serial_z"] = {"rounds": len(serial), "threshold": batched["threshold"], "serial_seconds": serial,
                              "batched_seconds": fast, "ratio": sum(serial) / sum(fast)}
        print(f"AlphaEdit round time, serial z / batched z: {result['serial_z']['ratio']:.2f}x "
              f"({sum(serial):.1f} s / {sum(fast):.1f} s over {len(serial)} round(s))")
    common.write_result("sequential", result, out=path, plot=plot)
    return result


if __name__ == "__main__":
    main()
