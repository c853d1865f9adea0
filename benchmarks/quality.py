"""Edit quality on the knowledge world: ES/PS/NS/S against the number of edits, and the evidence
behind the edited layers.

    python -m benchmarks.quality --world worlds/gpt2-default [--n 1,10,100,1000] [--trace]
        [--sweep "1-2,1-3,2-4"] [--lambda 200] [--clamp 4] [--out FILE]

- `--trace`: which MLP layers carry the facts. For each layer, the MLP output at the subject's last
  token is replaced by its mean over other subjects (mean ablation) and the drop in the true
  object's probability is measured on the rewrite prompts: large drops mark the layers whose MLPs
  write the subject's attributes, which is where MEMIT should edit.
- `--sweep`: MEMIT at the largest n for several layer ranges, to compare ranges directly.
- The main series: MEMIT with the world preset (or the given overrides) at each n, metrics on the
  edited records, pre-edit values alongside; the model is restored (bit-exact revert) between runs.

Writes benchmarks/results/quality-<timestamp>.json and .png (ES/PS/NS/S vs n on a log axis,
pre-edit values dashed, like the MEMIT paper's scaling figure).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks import common
from massedit.inputs import tokens as T
from massedit.model.arch import ModelLayout
from massedit.editor import MassEditor
from massedit.evaluation import evaluate
from massedit.inputs.records import load_records
from massedit.model.hooks import capture_outputs, edit_output
from massedit.hparams import world_preset
from massedit.inputs.requests import parse_records

METRICS = ("ES", "PS", "NS", "S")


def _ranges(text: str) -> list[list[int]]:
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.append(list(range(int(a), int(b or a) + 1)))
    return out


@torch.no_grad()
def mlp_trace(model, tok, records, n_cases: int = 200) -> dict[int, float]:
    """Mean drop of P(true object) when one layer's MLP output at the subject token is mean-ablated."""
    layout = ModelLayout(model)
    cases = []
    for rec in records[:n_cases]:
        rr = rec["requested_rewrite"]
        enc = T.encode_prompt(tok, rr["prompt"], rr["subject"])
        tid = T.target_ids(tok, T.fill(rr["prompt"], rr["subject"])[0], rr["target_true"]["str"])[0]
        cases.append((list(enc.ids), enc.subject_index, tid))

    def ablated(mean, subj):
        def fn(h):
            h = h.clone()
            h[0, subj] = mean
            return h

        return fn

    def true_prob(layer=None, mean=None):
        probs = []
        for ids, subj, tid in cases:
            if layer is None:
                logits = model(torch.tensor([ids])).logits
            else:
                with edit_output(layout.rewrite_module(layer), ablated(mean, subj)):
                    logits = model(torch.tensor([ids])).logits
            probs.append(torch.softmax(logits[0, -1].float(), -1)[tid].item())
        return sum(probs) / len(probs)

    base = true_prob()
    drops = {}
    for layer in range(layout.n_layers):
        outs = []
        for ids, subj, _ in cases:
            store: dict = {}
            with capture_outputs({"m": layout.rewrite_module(layer)}, store):
                model(torch.tensor([ids]))
            outs.append(store["m"][0, subj])
        mean = torch.stack(outs).mean(0)
        drops[layer] = base - true_prob(layer, mean)
    return {"p_true": base, "drop_by_layer": drops}


def _pct(stat: dict) -> str:
    return "-" if stat.get("mean") is None else f"{stat['mean']:.1f}"


def run_series(model, tok, records, hp, ns, stats_dir, corpus, model_name, progress) -> list[dict]:
    editor = MassEditor(model, tok, hp, stats_dir=stats_dir, corpus=corpus, model_name=model_name, progress=progress)
    rows = []
    for n in ns:
        subset = records[:n]
        requests = parse_records(subset, "world counterfact", fmt="counterfact")
        pre = evaluate(model, tok, subset)["metrics"]
        t = time.perf_counter()
        result = editor.edit(requests)
        seconds = time.perf_counter() - t
        post = evaluate(model, tok, subset)["metrics"]
        result.delta.revert(model)
        row = {"n": len(subset), "layers": hp.layers, "seconds": round(seconds, 2), "timings": result.report()["timings"],
               "z_loss_mean": result.report()["z_loss"]["mean"],
               "pre": {k: pre[k] for k in METRICS if k in pre}, "post": {k: post[k] for k in METRICS if k in post}}
        rows.append(row)
        print(f"n={row['n']:<5} layers={hp.layers} " + "  ".join(
            f"{k} {_pct(row['pre'][k])}->{_pct(row['post'][k])}" for k in METRICS) + f"  ({seconds:.1f} s)", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    plt = common.pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r["n"] for r in rows]
    for k, color in zip(METRICS, ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728")):
        ax.plot(ns, [r["post"][k]["mean"] for r in rows], "-o", color=color, label=f"{k} (post)")
        ax.plot(ns, [r["pre"][k]["mean"] for r in rows], "--", color=color, alpha=0.6, label=f"{k} (pre)")
    ax.set_xscale("log")
    ax.set_xlabel("number of edits")
    ax.set_ylabel("percent")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("MEMIT on the knowledge world")
    common.save_figure(fig, path, dpi=120)


def main(argv=None) -> dict:
    ap = common.parser("quality", __doc__)
    ap.add_argument("--world", default="worlds/gpt2-default")
    ap.add_argument("--n", default="1,10,100,1000", help="comma-separated edit counts")
    ap.add_argument("--layers", default=None, help="edited layers as a range, e.g. 1-3 (default: world preset)")
    ap.add_argument("--lambda", dest="lam", type=float, default=None, help="mom2_update_weight")
    ap.add_argument("--clamp", type=float, default=None, help="clamp_norm_factor")
    ap.add_argument("--steps", type=int, default=None, help="v_num_grad_steps")
    ap.add_argument("--trace", action="store_true", help="measure which MLP layers carry the facts")
    ap.add_argument("--sweep", default=None, help="layer ranges to compare at the largest n, e.g. 1-2,1-3,2-4")
    common.add_threads(ap)
    ap.add_argument("--stats-dir", default="stats")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/quality-<timestamp>.json)")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)
    common.set_threads(args.threads)

    world = Path(args.world)
    model, tok = common.load_pretrained(world / "model")
    _, records = load_records(world / "counterfact.json")
    hp = world_preset(model.config)
    changes = {k: v for k, v in (("mom2_update_weight", args.lam), ("clamp_norm_factor", args.clamp),
                                 ("v_num_grad_steps", args.steps)) if v is not None}
    if args.layers:
        changes["layers"] = _ranges(args.layers)[0]
    hp = hp.replace(**changes)
    ns = [int(x) for x in args.n.split(",")]
    name = f"world-{world.name}"
    report = {"benchmark": "quality", "world": str(world), "hparams": hp.to_dict(),
              "machine": common.machine_info()}
    if args.trace:
        report["trace"] = mlp_trace(model, tok, records)
        print("MLP mean-ablation drop of P(true) by layer:",
              {l: round(d, 3) for l, d in report["trace"]["drop_by_layer"].items()}, flush=True)
    if args.sweep:
        report["sweep"] = [row for layers in _ranges(args.sweep) for row in
                           run_series(model, tok, records, hp.replace(layers=layers), [max(ns)], args.stats_dir,
                                      world / "corpus.txt", name, args.progress)]
    report["series"] = run_series(model, tok, records, hp, ns, args.stats_dir, world / "corpus.txt", name,
                                  args.progress)
    common.write_result("quality", report, args.out, plot=lambda r, path: plot(r["series"], path))
    return report


if __name__ == "__main__":
    main()
