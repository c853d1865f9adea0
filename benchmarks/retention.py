"""How long edits last under further training: edit known facts, keep training the model on ordinary
text, and watch ES/PS/NS of the edits and the loss on held-out text as the steps go by.

The real measurement (SmolLM2-135M, 100 known facts, 200 steps of AdamW at lr 1e-5):

    massedit data facts --model smollm2-135m --out facts/smollm2 --max-per-relation 60
    python -m benchmarks.retention --model smollm2-135m --facts facts/smollm2 --n 100 --steps 200 \\
        --eval-every 20 --stats-dir stats

It writes benchmarks/results/retention-smollm2-135m-<time>.json (rewritten after each rule, so a cut
run keeps the rules it finished) and, at the end, retention-smollm2-135m-<time>.png beside it (ES
against steps for each rule, held-out loss in a second panel), and prints a table.

Three rules, each from the same unedited weights (restored between rules), with the same batches:
"memit" (MEMIT once at step 0), "alphaedit" (AlphaEdit once at step 0) and "memit-reapply" (MEMIT at
step 0, re-applied by massedit.edits.training.TrainingEdits with reapply="below:X", X = --threshold
(default 0.9), for the facts whose ES fell below it). The edits, evaluations (massedit.evaluation.evaluate on the edited
records) and re-applications are TrainingEdits' own, called after every optimizer step. A curve
point's ES/PS/NS are TrainingEdits' evaluation, made before that step's re-application; where facts
were re-applied the point also holds the scores right after it ("after_reapply"), and the held-out
loss is measured after it.

Training: the --train-text documents (default the built-in "pydoc" corpus: Python documentation
prose) shuffled (seeded), --heldout of them kept aside for the loss, the rest cycled in batches of
--batch-size truncated to --max-length tokens; causal-LM loss, AdamW (--lr, --weight-decay), gradients
clipped to norm 1 (Hugging Face Trainer's default). Edits use default_for's hparams (--layers to
choose layers, e.g. those benchmarks.real's trace suggests) and statistics from the built-in corpus
of real models (the one the model's preset names) unless --corpus names another, cached in
--stats-dir. --model takes whatever `massedit edit --model` takes (a catalog name fetches the model).
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Optional

import torch

from benchmarks import common

RULES = {"memit": ("memit", False), "alphaedit": ("alphaedit", False), "memit-reapply": ("memit", True)}
METRICS = ("ES", "PS", "NS")


def _args(argv):
    p = common.parser("retention", __doc__)
    p.add_argument("--model", default="smollm2-135m", help="catalog name, HF directory or .gguf (default smollm2-135m)")
    p.add_argument("--facts", required=True, help="directory written by `massedit data facts` (its counterfact.json)")
    p.add_argument("--n", type=int, default=100, help="known facts edited (the first N; default 100)")
    p.add_argument("--rules", default=",".join(RULES), help=f"comma-separated, from {', '.join(RULES)} (default all)")
    p.add_argument("--threshold", type=float, default=0.9, help="memit-reapply: re-apply below this ES per fact (0.9)")
    p.add_argument("--steps", type=int, default=200, help="training steps after the edit (default 200)")
    p.add_argument("--eval-every", type=int, default=20, help="evaluate every this many steps (default 20)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default 1e-5)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0, as Trainer's)")
    p.add_argument("--batch-size", type=int, default=8, help="documents per step (default 8)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per document (default 128)")
    p.add_argument("--train-text", default="pydoc",
                   help="text trained on: pydoc, or a corpus file or saved dataset as --corpus takes (default pydoc)")
    p.add_argument("--heldout", type=int, default=64, help="documents kept aside for the held-out loss (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", help="edited layers, e.g. 4,5,6,7,8 (default: default_for's)")
    p.add_argument("--z-steps", type=int, help="override v_num_grad_steps (smoke runs)")
    p.add_argument("--corpus", help="statistics corpus (default: the real models' built-in one)")
    p.add_argument("--samples", type=int, default=2000, help="mom2_n_samples (default 2000)")
    p.add_argument("--stats-dir", default="stats", help="statistics cache (default ./stats)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/retention-<model>-<time>.json)")
    common.add_threads(p, default=None)
    args = p.parse_args(argv)
    args.rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    bad = [r for r in args.rules if r not in RULES]
    if bad or not args.rules:
        p.error(f"--rules: from {', '.join(RULES)}, got {bad or args.rules}")
    if min(args.n, args.steps, args.eval_every, args.batch_size, args.max_length, args.heldout) < 1:
        p.error("--n, --steps, --eval-every, --batch-size, --max-length and --heldout must be at least 1")
    if "sampled" in args.train_text and not Path(args.train_text).exists():
        p.error("--train-text: the model's own sampled text is statistics text, not training text; "
                "give pydoc or a file")
    if not 0 < args.threshold <= 1:
        p.error(f"--threshold: an ES per fact in (0, 1], got {args.threshold}")
    return args


def _records(facts: str, n: int) -> list[dict]:
    path = Path(facts) / "counterfact.json"
    if not path.is_file():
        raise SystemExit(f"--facts {facts}: no counterfact.json there; write one with "
                         f"`massedit data facts --model M --out {facts}`")
    return json.loads(path.read_text(encoding="utf-8"))[:n]


def _hparams(model, args, corpus):
    from massedit.hparams import default_for
    from massedit.inputs.corpus import is_builtin

    changes = {"mom2_n_samples": args.samples}
    if args.layers:
        changes["layers"] = [int(x) for x in args.layers.split(",")]
    if args.z_steps:
        changes["v_num_grad_steps"] = args.z_steps
    if is_builtin(corpus):
        changes["mom2_dataset"] = corpus
    return default_for(model.config).replace(**changes)


class Text:
    """Training batches and held-out batches of tokenized documents, the same for every rule."""

    def __init__(self, tok, docs: list[str], args):
        docs = list(docs)
        random.Random(args.seed).shuffle(docs)
        if len(docs) <= args.heldout:
            raise SystemExit(f"--train-text {args.train_text}: {len(docs)} documents, not more than --heldout "
                             f"{args.heldout}; lower --heldout or give more text")
        self.heldout_docs, self.train_docs = docs[: args.heldout], docs[args.heldout:]
        self.tok, self.batch_size, self.max_length = tok, args.batch_size, args.max_length

    def encode(self, texts: list[str], device) -> dict:
        # Right padding: positions count from each document's first token; padding is not a target.
        side, self.tok.padding_side = self.tok.padding_side, "right"
        try:
            batch = self.tok(texts, truncation=True, max_length=self.max_length, padding=True, return_tensors="pt")
        finally:
            self.tok.padding_side = side
        batch = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    def train_batch(self, step: int, device) -> dict:
        """The documents of training step `step` (1, 2, ...), cycling through the training documents."""
        start = (step - 1) * self.batch_size
        return self.encode([self.train_docs[(start + i) % len(self.train_docs)] for i in range(self.batch_size)],
                           device)

    @torch.no_grad()
    def heldout_loss(self, model) -> float:
        """Mean next-token loss over every held-out target token."""
        from massedit.model.devices import input_device

        was_training, total, count = model.training, 0.0, 0
        model.eval()
        try:
            for start in range(0, len(self.heldout_docs), self.batch_size):
                batch = self.encode(self.heldout_docs[start: start + self.batch_size], input_device(model))
                targets = int((batch["labels"][:, 1:] != -100).sum())
                total += float(model(**batch).loss) * targets
                count += targets
        finally:
            model.train(was_training)
        return total / max(1, count)


def _scores(metrics: dict) -> dict:
    return {m: metrics.get(m) for m in METRICS}


def run_rule(rule: str, editor, text: Text, records: list, initial: dict, args) -> dict:
    """One rule from the unedited weights: edit at step 0, then --steps steps of training with
    TrainingEdits called after each; a curve point every --eval-every steps."""
    from massedit.edits.training import TrainingEdits
    from massedit.evaluation import summary
    from massedit.model.devices import input_device

    model = editor.model
    model.load_state_dict(initial)
    method, reapply = RULES[rule]
    edits = TrainingEdits(editor, {0: records}, eval_every=args.eval_every, method=method,
                          reapply=f"below:{args.threshold}" if reapply else "never", prefix="")
    after: dict[int, dict] = {}  # ES/PS/NS right after a step's re-application

    def step_edits(step: int) -> bool:
        metrics = edits(step)
        if metrics.get("reapplied"):
            after[step] = _scores(summary(edits.evaluate()))
        return bool(metrics)

    step_edits(0)
    losses = {0: text.heldout_loss(model)}
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    train_seconds = 0.0
    for step in range(1, args.steps + 1):
        t1 = time.perf_counter()
        loss = model(**text.train_batch(step, input_device(model))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - t1
        if step_edits(step):
            losses[step] = text.heldout_loss(model)
    model.eval()
    del optimizer
    curve = [{"step": h["step"], **_scores(h), "loss": losses[h["step"]], "reapplied": h.get("reapplied", 0),
              **({"after_reapply": after[h["step"]]} if h["step"] in after else {})} for h in edits.history]
    return {"rule": rule, "method": method, "reapply": f"below:{args.threshold}" if reapply else "never",
            "edit_seconds": round(edits.results[0].timings["total"], 2),
            "reapply_seconds": round(sum(r.timings["total"] for r in edits.results[1:]), 2),
            "train_seconds": round(train_seconds, 2),
            "reapplied_total": sum(p["reapplied"] for p in curve), "curve": curve}


def plot(result: dict, path: Path) -> None:
    plt = common.pyplot()
    fig, (es_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run in result["rules"].values():
        steps = [p["step"] for p in run["curve"]]
        # A re-applied point goes on to its score right after the re-application: a saw-tooth.
        es = [(p["step"], y) for p in run["curve"] for y in (p["ES"], p.get("after_reapply", {}).get("ES"))
              if y is not None]
        line, = es_ax.plot(*zip(*es), marker="o", label=run["rule"])
        again = [p for p in run["curve"] if p["reapplied"]]
        if again:
            es_ax.scatter([p["step"] for p in again], [p["ES"] for p in again], marker="x", s=80, color="black",
                          zorder=3, label=f"{run['rule']}: re-applied after this evaluation")
        loss_ax.plot(steps, [p["loss"] for p in run["curve"]], marker="o", color=line.get_color(), label=run["rule"])
    pre = result["pre"]
    es_ax.axhline(pre["ES"], ls=":", color="gray", label="unedited")
    loss_ax.axhline(pre["loss"], ls=":", color="gray", label="unedited")
    s = result["settings"]
    es_ax.set(xlabel="training steps after the edit", ylabel="ES of the edited facts (%)", ylim=(0, 102),
              title=f"{result['model']}: {s['n']} edits, AdamW lr {s['lr']:g}, batch {s['batch_size']}")
    loss_ax.set(xlabel="training steps after the edit", ylabel="held-out loss (nats/token)",
                title=f"held-out loss on {s['heldout']} {s['train_text']} documents")
    es_ax.legend(fontsize=8)
    loss_ax.legend(fontsize=8)
    common.save_figure(fig, path)


def table(result: dict) -> str:
    rows = [["unedited", "-"] + [common.fmt(result["pre"][m], ".1f") for m in METRICS]
            + [common.fmt(result["pre"]["loss"], ".4f"), "-", "-"]]
    for run in result["rules"].values():
        rows += [[run["rule"], str(p["step"])] + [common.fmt(p[m], ".1f") for m in METRICS]
                 + [common.fmt(p["loss"], ".4f"), str(p["reapplied"]),
                    common.fmt(p.get("after_reapply", {}).get("ES"), ".1f", "-")] for p in run["curve"]]
    return common.text_table(["rule", "step", *METRICS, "held-out loss", "re-applied", "ES after"], rows)


def main(argv: Optional[list[str]] = None) -> int:
    args = _args(argv)
    common.set_threads(args.threads)
    torch.manual_seed(args.seed)

    from massedit import MassEditor
    from massedit.evaluation import evaluate, summary
    from massedit.inputs.corpus import corpus_texts
    from massedit.model.loading import LoadOptions, load_model, model_name_for

    name = model_name_for(args.model)
    out = common.result_path(f"retention-{name}", args.out)
    records = _records(args.facts, args.n)
    model, tok = load_model(args.model, LoadOptions(torch_dtype="float32"))
    corpus = common.real_corpus(model, args.corpus)
    hp = _hparams(model, args, corpus)
    editor = MassEditor(model, tok, hp, stats_dir=args.stats_dir, corpus=corpus, model_name=name, progress=False)
    text = Text(tok, corpus_texts(args.train_text, 10**9), args)
    t0 = time.perf_counter()
    editor.solvers()  # statistics of the unedited model (cached on disk), shared by every rule
    statistics_seconds = round(time.perf_counter() - t0, 1)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pre = _scores(summary(evaluate(model, tok, records, source=f"{args.facts}/counterfact.json")))
    settings = {k: getattr(args, k) for k in ("n", "steps", "eval_every", "lr", "weight_decay", "batch_size",
                                              "max_length", "train_text", "heldout", "threshold", "seed")}
    result: dict = {"benchmark": "retention", "model": args.model, "machine": common.machine_info(),
                    "facts": {"dir": args.facts, "edited": len(records)},
                    "settings": {**settings, "n": len(records), "train_docs": len(text.train_docs)},
                    "corpus": corpus, "hparams": hp.to_dict(), "statistics_seconds": statistics_seconds,
                    "pre": {**pre, "loss": text.heldout_loss(model)}, "rules": {}}
    print(f"{args.model}: {len(records)} facts; unedited ES {common.fmt(pre.get('ES'), '.1f')}, "
          f"held-out loss {result['pre']['loss']:.4f}", flush=True)
    for rule in args.rules:
        run = run_rule(rule, editor, text, records, initial, args)
        result["rules"][rule] = run
        last = run["curve"][-1]
        print(f"{rule}: ES {common.fmt(run['curve'][0]['ES'], '.1f')} after the edit, "
              f"{common.fmt(last['ES'], '.1f')} at step {last['step']}; re-applied {run['reapplied_total']}; "
              f"edit {run['edit_seconds']} s, training {run['train_seconds']} s", flush=True)
        common.write_json(out, result)
    print(table(result), flush=True)
    common.write_result(f"retention-{name}", result, out=out, plot=plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
