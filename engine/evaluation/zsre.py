"""zsRE metrics: efficacy, paraphrase and specificity as top-1 token accuracy.

Convention (and what the reference, kmeng01/memit, does):

* **zsRE** (reference `dsets/zsre.py` and `experiments/py/eval_utils_zsre.py`): target =
  answers[0] (`zsre_target="alt"` uses "alt", as EasyEdit does); efficacy / paraphrase = the
  fraction of target tokens that are the top-1 prediction given src / rephrase, teacher forced;
  specificity = the same for " " + loc_ans given `loc + "?"` — MEMIT appends "?" to the loc
  question, which in zsre_mend_eval.json already starts with "nq question: " (not added again;
  "?" is not doubled when loc already ends with one). Per case: mean over its target tokens;
  score = harmonic mean of the three aggregate means.
"""
from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from massedit.evaluation.scoring import score_continuations
from massedit.inputs.records import zsre_targets

ZSRE_METRICS = ("efficacy", "paraphrase", "specificity")


def _loc_prompt(loc: str) -> str:
    return loc if loc.endswith("?") else loc + "?"


def evaluate_zsre(model, tok, cases: Sequence[tuple[Union[int, str], dict]], batch_size: int,
                  zsre_target: str) -> list[dict]:
    """Per-case metrics of checked zsRE records (case id, record); `zsre_target` chooses the target."""
    prepared, pairs = [], []
    for case_id, rec in cases:
        target, _ = zsre_targets(rec, zsre_target)
        groups = {"efficacy": [(rec["src"], target)]}
        groups["paraphrase"] = [(rec["rephrase"], target)] if rec.get("rephrase") else []
        groups["specificity"] = [(_loc_prompt(rec["loc"]), rec["loc_ans"])] if rec.get("loc") else []
        prepared.append((case_id, rec, target, groups))
        for group in groups.values():
            pairs.extend(group)
    scores = dict(zip(pairs, score_continuations(model, tok, pairs, batch_size)))
    per_case = []
    for case_id, rec, target, groups in prepared:
        case = {"case_id": case_id, "subject": rec.get("subject"), "target": target}
        for name, group in groups.items():
            correct = [c for pair in group for c in scores[pair].correct]
            case[name] = float(np.mean(correct)) if correct else None
            case[f"{name}_tokens_correct"] = correct
            case[f"{name}_prompts"] = [{"prompt": p, "target": t, "nll": scores[(p, t)].nll} for p, t in group]
        per_case.append(case)
    return per_case

