"""CounterFact probability metrics: cases per second, batched engine vs one prompt at a time.

    python -m benchmarks.eval_speed --world worlds/gpt2-default [--cases 200] [--threads 1]

The baseline scores each (prompt, object) pair with its own forward over the full logits, as a
straightforward implementation does; the engine dedups pairs, shares rows between objects that
continue the same tokens, pads many rows into one forward and applies the LM head only at the
scored positions. Both give the same log-probabilities, checked here.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks import common

from massedit.inputs import tokens as T
from massedit.evaluation import evaluate, summary
from massedit.evaluation.scoring import score_continuations
from massedit.inputs.records import load_records


def _pairs(records):
    for rec in records:
        rr = rec["requested_rewrite"]
        prompt = T.fill(rr["prompt"], rr["subject"])[0]
        prompts = [prompt] + list(rec.get("paraphrase_prompts", [])) + list(rec.get("neighborhood_prompts", []))
        for p in prompts:
            for target in (rr["target_new"]["str"], rr["target_true"]["str"]):
                yield p, target


@torch.no_grad()
def one_at_a_time(model, tok, records) -> float:
    """Mean-token log-prob of every pair, one forward each; returns the sum (to compare)."""
    total = 0.0
    for prompt, target in _pairs(records):
        prompt_ids = list(tok(prompt)["input_ids"])
        tids = T.target_ids(tok, prompt, target)
        ids = torch.tensor([prompt_ids + tids[:-1]])
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        start = len(prompt_ids) - 1
        total += sum(logp[start + k, t].item() for k, t in enumerate(tids)) / len(tids)
    return total


def main(argv=None) -> dict:
    ap = common.parser("eval_speed", __doc__)
    ap.add_argument("--world", default="worlds/gpt2-default", help="world build directory (model/ + counterfact.json)")
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    common.add_threads(ap)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/eval_speed-<timestamp>.json)")
    args = ap.parse_args(argv)
    common.set_threads(args.threads)

    world = Path(args.world)
    model, tok = common.load_pretrained(world / "model")
    _, records = load_records(world / "counterfact.json")
    records = records[: args.cases]
    n_pairs = sum(1 for _ in _pairs(records))

    t = time.perf_counter()
    result = evaluate(model, tok, records, batch_size=args.batch_size)
    batched_s = time.perf_counter() - t
    t = time.perf_counter()
    reference = one_at_a_time(model, tok, records)
    single_s = time.perf_counter() - t
    engine_total = sum(-s.nll for s in score_continuations(model, tok, list(_pairs(records)), args.batch_size))
    if abs(engine_total - reference) > 1e-3 * max(1.0, abs(reference)):
        raise AssertionError(f"batched and one-at-a-time log-probs differ: {engine_total} vs {reference}")

    report = {
        "benchmark": "eval_speed", "world": str(world), "cases": len(records), "pairs": n_pairs,
        "batch_size": args.batch_size, "threads": args.threads,
        "batched_s": round(batched_s, 3), "one_at_a_time_s": round(single_s, 3),
        "batched_cases_per_s": round(len(records) / batched_s, 2),
        "one_at_a_time_cases_per_s": round(len(records) / single_s, 2),
        "speedup": round(single_s / batched_s, 2), "metrics": summary(result),
        "machine": common.machine_info(),
    }
    print(common.text_table(["mode", "seconds", "cases/s"], [
        ["batched", f"{batched_s:.2f}", f"{report['batched_cases_per_s']:.1f}"],
        ["one at a time", f"{single_s:.2f}", f"{report['one_at_a_time_cases_per_s']:.1f}"]]))
    print(f"speedup {report['speedup']:.1f}x over {len(records)} cases ({n_pairs} prompt/object pairs)")
    common.write_json(common.result_path("eval_speed", args.out), report)
    return report


if __name__ == "__main__":
    main()
