"""How edits are judged: CounterFact and zsRE metrics (DESIGN §4, §5, §6) and causal tracing.

`evaluate(model, tok, records)` runs the metrics of the records' kind, `summary(result)` flattens
them. The jobs, one module each: `scoring` (the one teacher-forced scorer), `counterfact`, `zsre`,
`text` (generation, n-gram entropy, TF-IDF), `aggregate` (means, intervals, composites), `trace`.
Records are read and checked by `massedit.inputs.records`.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterable, Optional, Union

# The function under another name, so that `massedit.evaluation.aggregate` stays the module.
from massedit.evaluation.aggregate import aggregate as _aggregate
from massedit.evaluation.aggregate import summary
from massedit.evaluation.counterfact import CF_METRICS, GEN_METRICS, evaluate_counterfact
from massedit.evaluation.zsre import ZSRE_METRICS, evaluate_zsre
from massedit.inputs.records import case_id_of, check_records
from massedit.model.quantized import cpu_repacking_off

__all__ = ["evaluate", "summary"]


def evaluate(model, tok, records: list, kind: str = "auto", batch_size: int = 64, generation: bool = False,
             case_ids: Optional[Iterable[Union[int, str]]] = None, reference_texts: Optional[dict] = None, *,
             zsre_target: str = "answers", generation_max_length: int = 100, generation_top_k: int = 5,
             seed: int = 0, source: str = "records") -> dict:
    """Evaluate `model` on CounterFact or zsRE records (conventions: the metric modules' docstrings).

    Returns {"kind", "n_cases", "metrics": {name: {"mean", "ci95", "n"}}, "by_relation",
    "per_case", "notes"}; aggregate means are in percent (×100), per-case values in 0–1.
    """
    kind = check_records(records, kind, source, zsre_target)
    if kind == "zsre" and generation:
        raise ValueError("generation metrics (GE, RS) are defined for CounterFact only, not zsRE")
    if reference_texts is not None:
        if not isinstance(reference_texts, dict) or not all(
            isinstance(v, list) and all(isinstance(t, str) for t in v) for v in reference_texts.values()
        ):
            raise ValueError("reference_texts must be a dict {object: [texts]}")
    cases = [(case_id_of(rec, i), rec) for i, rec in enumerate(records)]
    if case_ids is not None:
        wanted = list(dict.fromkeys(case_ids))
        present = {cid for cid, _ in cases}
        missing = [c for c in wanted if c not in present]
        if missing:
            raise ValueError(f"{source}: case ids not found: {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
        keep = set(wanted)
        cases = [(cid, rec) for cid, rec in cases if cid in keep]

    notes: list[str] = []
    # Evaluating before an edit (edit --eval, demo) must leave a 4-bit model editable.
    with cpu_repacking_off(model):
        if kind == "counterfact":
            gen_opts = dict(max_length=generation_max_length, top_k=generation_top_k, seed=seed)
            per_case = evaluate_counterfact(model, tok, cases, batch_size, generation, reference_texts, gen_opts, notes)
            names = CF_METRICS + (GEN_METRICS if generation else ())
            composite = ("S", ("ES", "PS", "NS"))
        else:
            per_case = evaluate_zsre(model, tok, cases, batch_size, zsre_target)
            names, composite = ZSRE_METRICS, ("score", ZSRE_METRICS)

    by_relation = {}
    if kind == "counterfact":
        groups: dict[str, list[dict]] = defaultdict(list)
        for case in per_case:
            groups[case["relation_id"]].append(case)
        by_relation = {
            rel: {"n_cases": len(cs), "metrics": _aggregate(cs, names, composite)} for rel, cs in sorted(groups.items())
        }
    for name in names:
        missing = sum(1 for c in per_case if c.get(name) is None)
        if missing and name not in ("RS", "GE"):
            notes.append(f"{name} missing for {missing} of {len(per_case)} case(s) (no prompts); the aggregate skips them")
    return {
        "kind": kind,
        "n_cases": len(per_case),
        "metrics": _aggregate(per_case, names, composite),
        "by_relation": by_relation,
        "per_case": per_case,
        "notes": notes,
    }
