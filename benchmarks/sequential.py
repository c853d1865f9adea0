"""Sequential editing on the knowledge world (DESIGN §11): rounds of edits for each update rule.

    python -m benchmarks.sequential --world worlds/gpt2-default [--n 2000] [--round-size 100]
        [--rules memit,memit-preserve,alphaedit] [--serial-rounds 1] [--out-dir DIR]

- Requests: the world's CounterFact records with distinct subjects (the world lists them first),
  at most --n of them, edited in rounds of --round-size on one model per rule.
- After every round: ES / PS / NS over all the edits so far, and ES of the first round's edits
  (how much of the earliest knowledge survives), with the round's wall time.
- The serial-z structure of AlphaEdit's public code (z one request at a time; the engine's
  `memit-serial` z loop with AlphaEdit's update stands in for it) runs the first --serial-rounds
  rounds on a fresh model: the ratio of its round time to the batched engine's is reported.

Writes <out-dir>/sequential-<timestamp>.json and .png (metric vs number of edits, one line per rule).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from benchmarks import common
from benchmarks.common import distinct_subject_records, load_pretrained, machine_info, world_editor

RULES = ("memit", "memit-preserve", "alphaedit")
METRICS = ("ES", "PS", "NS")


def _parse(argv):
    p = common.parser("sequential", __doc__)
    p.add_argument("--world", required=True, help="a world directory (massedit world build --out DIR)")
    p.add_argument("--n", type=int, default=2000, help="edits in all (capped at the world's distinct subjects)")
    p.add_argument("--round-size", type=int, default=100)
    p.add_argument("--rules", default=",".join(RULES), help="comma separated, from " + ", ".join(RULES))
    p.add_argument("--serial-rounds", type=int, default=1, help="rounds timed with AlphaEdit's serial z (0: none)")
    p.add_argument("--threshold", type=float, default=2e-2, help="AlphaEdit's nullspace_threshold")
    p.add_argument("--l2", type=float, default=10.0, help="AlphaEdit's L2")
    common.add_world_editor_arguments(p)
    args = p.parse_args(argv)
    bad = [r for r in args.rules.split(",") if r not in RULES]
    if bad or args.n < 1 or args.round_size < 1 or args.serial_rounds < 0:
        p.error(f"--rules from {', '.join(RULES)} (got {bad}); --n, --round-size >= 1; --serial-rounds >= 0")
    return args


def _method(rule: str, args, serial: bool = False):
    from massedit.methods import get_method
    from massedit.methods.alphaedit import AlphaEdit

    if rule == "alphaedit":
        return AlphaEdit(serial_z=serial, nullspace_threshold=args.threshold, l2=args.l2)
    return get_method(rule)


def run_rule(rule: str, args, world: Path, rounds: list, records: list, templates=None) -> dict:
    from massedit.evaluation import evaluate, summary
    from massedit.edits.sequential import SequentialEditor

    model, tok = load_pretrained(world / "model")
    # Every rule edits with the same context templates (the first rule's).
    editor = world_editor(model, tok, world, args.stats_dir, args.steps, args.samples, templates)
    method = _method(rule, args)
    seq = SequentialEditor(editor, method)
    out = {"rule": rule, "rounds": []}
    if rule == "alphaedit":
        out["null_space_dim"] = {str(l): round(float(p.trace())) for l, p in method.projectors(editor).items()}
    first = len(rounds[0])
    done = 0
    for i, batch in enumerate(rounds, 1):
        result = seq.edit_round(batch)
        done += len(batch)
        ev = evaluate(model, tok, records[:done])
        metrics = summary(ev)
        early = [c["ES"] for c in ev["per_case"][:first] if c.get("ES") is not None]
        out["rounds"].append({
            "round": i, "n_edits": done, "seconds": result.timings["total"],
            "timings": {k: round(v, 4) for k, v in result.timings.items()},
            **{m: metrics[m] for m in METRICS},
            "ES_first_round": 100.0 * sum(early) / max(1, len(early)),
        })
        print(f"{rule:>15} round {i:>3}: {done:>5} edits  {result.timings['total']:7.2f} s  "
              + "  ".join(f"{m} {_pct(metrics[m])}" for m in METRICS)
              + f"  ES(round 1) {out['rounds'][-1]['ES_first_round']:5.1f}", flush=True)
    out["templates"] = editor.context_templates()
    return out


def _pct(value) -> str:
    """A metric for the table; n/a where the records cannot give it (e.g. no neighborhood prompts)."""
    return "  n/a" if value is None else f"{value:5.1f}"


def run_serial(args, world: Path, rounds: list, templates) -> list[float]:
    from massedit.edits.sequential import SequentialEditor

    model, tok = load_pretrained(world / "model")
    editor = world_editor(model, tok, world, args.stats_dir, args.steps, args.samples, templates)
    seq = SequentialEditor(editor, _method("alphaedit", args, serial=True))
    seconds = []
    for batch in rounds[: args.serial_rounds]:
        seconds.append(seq.edit_round(batch).timings["total"])
        print(f"alphaedit (serial z) round {len(seconds)}: {seconds[-1]:.2f} s", flush=True)
    return seconds


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()

    panels = METRICS + ("ES_first_round",)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, metric in zip(axes, panels):
        for run in result["runs"]:
            xs = [r["n_edits"] for r in run["rounds"]]
            ax.plot(xs, [r[metric] for r in run["rounds"]], marker="o", markersize=3, label=run["rule"])
        ax.set_xlabel("edits so far")
        ax.set_title(metric.replace("_first_round", " of round 1's edits"))
        ax.set_ylim(-2, 102)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Sequential editing, rounds of {result['round_size']} ({result['world']})")
    common.save_figure(fig, path)


def main(argv: Optional[list] = None) -> dict:
    args = _parse(argv)
    common.set_threads(args.threads)
    world = Path(args.world)
    records, requests = distinct_subject_records(world, args.n)
    rounds = [requests[i : i + args.round_size] for i in range(0, len(requests), args.round_size)]
    result = {"benchmark": "sequential", "world": str(world), "n": len(requests), "round_size": args.round_size,
              "threshold": args.threshold, "l2": args.l2, "machine": machine_info(), "runs": []}
    templates = None
    for rule in args.rules.split(","):
        run = run_rule(rule, args, world, rounds, records, templates)
        templates = run.pop("templates")
        result["runs"].append(run)
    batched = next((r for r in result["runs"] if r["rule"] == "alphaedit"), None)
    if args.serial_rounds and batched is not None:
        serial = run_serial(args, world, rounds, templates)
        fast = [r["seconds"] for r in batched["rounds"][: len(serial)]]
        result["serial_z"] = {"rounds": len(serial), "serial_seconds": serial, "batched_seconds": fast,
                              "ratio": sum(serial) / sum(fast)}
        print(f"AlphaEdit round time, serial z / batched z: {result['serial_z']['ratio']:.2f}x "
              f"({sum(serial):.1f} s / {sum(fast):.1f} s over {len(serial)} round(s))")
    common.write_result("sequential", result, directory=args.out_dir, plot=plot)
    return result


if __name__ == "__main__":
    main()
