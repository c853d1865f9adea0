"""The knowledge filter: keep a fact only where the model knows it.

The test (stated in facts.json): after the rewrite prompt, the true object's token sequence is more
probable than that of every candidate object of the relation, probabilities being the summed
teacher-forced log-probabilities of the object's tokens. A fact with a Catalan twin must pass in
both languages. The scorer is a parameter, so tests can stub the model out.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence

# (prompt, continuation) pairs -> summed log-probability of each continuation given its prompt.
Scorer = Callable[[Sequence[tuple[str, str]]], list[float]]

STAGES = (4, 16)
TEST = ("the true object's summed token log-probability after the rewrite prompt (teacher forced, the object "
        "with a leading space) is higher than that of every candidate object of the relation")


def model_scorer(model, tok, batch_size: int = 64) -> Scorer:
    """The project's batched continuation scorer, summed over each continuation's tokens."""
    from massedit.evaluation.scoring import score_continuations

    def score(pairs: Sequence[tuple[str, str]]) -> list[float]:
        return [sum(s.logprobs) for s in score_continuations(model, tok, pairs, batch_size)]

    return score


@dataclass(frozen=True)
class Probe:
    """One knowledge question: does `true` beat every one of `others` after `prompt`?"""

    prompt: str
    true: str
    others: tuple[str, ...]


def knows(scorer: Scorer, probes: Sequence[Probe], stages: Sequence[int] = STAGES) -> list[bool]:
    """One answer per probe. Candidates are scored in stages (the first `stages[0]`, then up to
    `stages[1]`, ..., then the rest), each stage one scorer call for all probes still standing: a
    probe whose true object loses to one candidate is out, so most unknown facts cost a few
    candidates' scores instead of all of them. The answer is the same as scoring everything."""
    verdict = [True] * len(probes)
    true: list = [None] * len(probes)
    longest = max((len(p.others) for p in probes), default=0)
    bounds = [0, *(s for s in stages if s < longest), longest]
    for lo, hi in zip(bounds, bounds[1:]):
        alive = [i for i, ok in enumerate(verdict) if ok]
        fresh = [i for i in alive if true[i] is None]
        pairs = [(probes[i].prompt, probes[i].true) for i in fresh]
        pairs += [(probes[i].prompt, o) for i in alive for o in probes[i].others[lo:hi]]
        scores = iter(scorer(pairs))
        for i in fresh:
            true[i] = next(scores)
        for i in alive:
            # A list, not a generator: every score of the stage is read, in order.
            verdict[i] = all([true[i] > next(scores) for _ in probes[i].others[lo:hi]])
    return verdict


def select_known(pending: dict, test: Callable[[list], list[bool]], subjects: Callable[[object], frozenset],
                 max_per_relation: Optional[int] = None, chunk: int = 64,
                 distinct: bool = True, objects: Callable[[object], Hashable] = lambda fact: None,
                 max_per_object: Optional[int] = None) -> tuple[list, dict]:
    """Test the facts of each relation (`pending`: relation -> facts in the order to try them), a
    chunk per relation per round, round-robin, until each relation has `max_per_relation` known
    facts or none left. With `distinct`, a subject (any of its `subjects(fact)` keys) is kept once:
    a fact whose subject another relation already holds is not tested, and one subject is not
    tested for two relations in one round. With `max_per_object`, at most that many facts of one
    `objects(fact)` key are kept (and tested at once in a round): the rest wait for a test that
    fails, else are never tested. Returns (the known facts in the order kept, relation -> number tested)."""
    pending = {rid: list(facts) for rid, facts in pending.items()}
    kept: list = []
    n_kept = {rid: 0 for rid in pending}
    tested = {rid: 0 for rid in pending}
    claimed: set[Hashable] = set()
    per_object: Counter = Counter()  # kept, then also those in the round being tested
    while True:
        batch, in_round = [], set()
        for rid, facts in pending.items():
            room = chunk if max_per_relation is None else min(chunk, max_per_relation - n_kept[rid])
            rest = []
            for fact in facts:
                keys = subjects(fact)
                if distinct and keys & claimed:
                    continue  # it can never be kept
                full_object = max_per_object is not None and per_object[objects(fact)] >= max_per_object
                if room > 0 and not (distinct and keys & in_round) and not full_object:
                    batch.append((rid, fact))
                    in_round |= keys
                    per_object[objects(fact)] += 1
                    room -= 1
                else:
                    rest.append(fact)
            full = max_per_relation is not None and n_kept[rid] >= max_per_relation
            pending[rid] = [] if full else rest
        if not batch:
            return kept, tested
        for (rid, fact), ok in zip(batch, test([fact for _, fact in batch])):
            tested[rid] += 1
            if ok:
                kept.append(fact)
                n_kept[rid] += 1
                claimed |= subjects(fact)
            else:
                per_object[objects(fact)] -= 1
