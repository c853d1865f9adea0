"""CounterFact metrics: ES / PS / NS, EM / PM / NM and S, plus GE and RS on generated texts
(DESIGN §4, §6).

Conventions (and what the reference, kmeng01/memit, does):

* **ES / PS / NS** (reference `experiments/summarize.py`): per prompt, the reference stores the
  *mean token NLL* of each object; a rewrite/paraphrase prompt succeeds when
  `nll(o_true) > nll(o_new)` (strictly), a neighborhood prompt when `nll(o_true) < nll(o_new)`.
  So "P(o)" is the geometric-mean token probability exp(-mean NLL). Per case: the fraction of its
  prompts that succeed (ES over the one rewrite prompt is 0 or 1). Aggregate: mean over cases.
* **EM / PM / NM** (DESIGN §4; the reference's `*_diff`): per prompt p̄(o_new) − p̄(o_true)
  (neighborhood: p̄(o_true) − p̄(o_new)) with p̄ = exp(−mean token NLL), averaged over the
  case's prompts, then over cases.
* **S** = harmonic mean of the aggregate ES, PS, NS means, as the reference computes its
  "score" (not a mean of per-case harmonic means); 0 if any of them is 0.
* **Missing prompts.** A case without paraphrase (or neighborhood) prompts has PS/PM (or NS/NM)
  = None; aggregates skip it and report how many cases contributed (`n`).
* **GE, RS** are `massedit.evaluation.text`'s; RS's reference texts come from
  `reference_texts={object: [texts]}` and/or a record's own `"reference_texts"`.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence, Union

import numpy as np

from massedit.evaluation.scoring import score_continuations
from massedit.evaluation.text import Tfidf, generate_texts, n_gram_entropy
from massedit.inputs import tokens as T
from massedit.inputs.records import Rewrite, rewrite

CF_METRICS = ("ES", "PS", "NS", "EM", "PM", "NM")
GEN_METRICS = ("GE", "RS")


def _cf_prompts(rw: Rewrite, rec: dict) -> dict[str, list[str]]:
    return {
        "rewrite": [T.fill(rw.prompt, rw.subject)[0]],
        "paraphrase": list(rec.get("paraphrase_prompts") or []),
        "neighborhood": list(rec.get("neighborhood_prompts") or []),
    }


def _mean_or_none(values: list[float]) -> Optional[float]:
    return float(np.mean(values)) if values else None


def evaluate_counterfact(model, tok, cases: Sequence[tuple[Union[int, str], dict]], batch_size: int,
                         generation: bool, reference_texts: Optional[dict], gen_opts: dict,
                         notes: list[str]) -> list[dict]:
    """Per-case metrics of checked CounterFact records (case id, record); notes are appended to `notes`."""
    prepared = []
    pairs = []
    for case_id, rec in cases:
        rw = rewrite(rec, "counterfact", f"case {case_id}")
        new, true = rw.target_new, rw.target_true
        prompts = _cf_prompts(rw, rec)
        prepared.append((case_id, rec, new, true, prompts))
        for group in prompts.values():
            for p in group:
                pairs.extend([(p, new), (p, true)])
    scores = dict(zip(pairs, score_continuations(model, tok, pairs, batch_size)))

    per_case = []
    for case_id, rec, new, true, prompts in prepared:
        case = {
            "case_id": case_id,
            "relation_id": rec["requested_rewrite"].get("relation_id", "unknown"),
            "subject": rec["requested_rewrite"]["subject"],
            "target_new": new,
            "target_true": true,
        }
        details = {}
        for group, plist in prompts.items():
            rows = []
            for p in plist:
                s_new, s_true = scores[(p, new)], scores[(p, true)]
                rows.append({
                    "prompt": p, "nll_new": s_new.nll, "nll_true": s_true.nll,
                    "prob_new": s_new.prob, "prob_true": s_true.prob,
                    "new_correct": s_new.all_correct, "true_correct": s_true.all_correct,
                })
            details[group] = rows
        for succ, mag, group, want_new in (("ES", "EM", "rewrite", True), ("PS", "PM", "paraphrase", True),
                                           ("NS", "NM", "neighborhood", False)):
            rows = details[group]
            if want_new:
                case[succ] = _mean_or_none([float(r["nll_true"] > r["nll_new"]) for r in rows])
                case[mag] = _mean_or_none([r["prob_new"] - r["prob_true"] for r in rows])
            else:
                case[succ] = _mean_or_none([float(r["nll_true"] < r["nll_new"]) for r in rows])
                case[mag] = _mean_or_none([r["prob_true"] - r["prob_new"] for r in rows])
        case.update({f"{g}_prompts": rows for g, rows in details.items()})
        per_case.append(case)

    if generation:
        _add_generation(model, tok, prepared, per_case, batch_size, reference_texts, gen_opts, notes)
    return per_case


def _add_generation(model, tok, prepared, per_case, batch_size, reference_texts, gen_opts, notes) -> None:
    refs: dict[str, list[str]] = defaultdict(list)
    for obj, texts in (reference_texts or {}).items():
        refs[obj].extend(texts)
    for _, rec, *_ in prepared:
        for obj, texts in (rec.get("reference_texts") or {}).items():
            refs[obj].extend(t for t in texts if t not in refs[obj])
    tfidf = Tfidf(dict.fromkeys(t for texts in refs.values() for t in texts)) if refs else None

    flat, owners = [], []
    for k, (_, rec, *_rest) in enumerate(prepared):
        for p in rec.get("generation_prompts") or []:
            flat.append(p)
            owners.append(k)
    texts = generate_texts(model, tok, flat, batch_size=batch_size, **gen_opts) if flat else []
    by_case: dict[int, list[str]] = defaultdict(list)
    for k, text in zip(owners, texts):
        by_case[k].append(text)

    no_prompts, no_refs = 0, 0
    for k, ((_, rec, new, _true, _p), case) in enumerate(zip(prepared, per_case)):
        gen = by_case.get(k, [])
        case["generated_texts"] = gen
        case["GE"] = n_gram_entropy(gen)
        if not gen:
            no_prompts += 1
            case["RS"] = None
            continue
        if tfidf is None or not refs.get(new):
            no_refs += 1
            case["RS"] = None
        else:
            case["RS"] = tfidf.similarity(" ".join(gen), " ".join(refs[new]))
    if no_prompts:
        notes.append(f"{no_prompts} case(s) have no generation_prompts: GE and RS are missing for them")
    if no_refs:
        notes.append(
            f"RS missing for {no_refs} case(s): no reference texts about their target_new "
            "(pass reference_texts={object: [texts]} or put 'reference_texts' in the records)"
        )

