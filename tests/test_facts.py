"""`massedit data facts`: real facts as CounterFact / zsRE records, filtered by a knowledge check.

Most tests stub the model out with an oracle scorer (it knows every fact) or a pseudo-random one;
one runs the command end to end on a tiny random model."""
from __future__ import annotations

import json
from collections import Counter
import zlib
from pathlib import Path

import pytest

from massedit import cli
from massedit.inputs.facts import RELATION_IDS, RELATIONS, build_facts
from massedit.inputs.facts.build import MAX_PROMPTS, MIN_POPULATION
from massedit.inputs.facts.grammar import LANGUAGES, Name, sentence
from massedit.inputs.facts.known import Probe, knows, select_known
from massedit.inputs.facts.sources import load_facts
from massedit.inputs.records import load_records
from massedit.inputs.requests import load_requests, validate_requests
from massedit.methods.memat.method import match_l2, parse_l2_records
from tiny import WORDS, make_model

FACTS = load_facts(MIN_POPULATION)


def oracle():
    """A scorer that knows every fact: the true object scores 0 after any of its prompts, the rest -1."""
    truth = {}
    for rel in RELATIONS:
        for f in FACTS[rel.id]:
            for lang in LANGUAGES:
                for t in rel.templates[lang]:
                    truth[sentence(t, lang, f.subject.name(lang))] = f.object.name(lang).phrase()
    return lambda pairs: [0.0 if truth.get(p) == o else -1.0 for p, o in pairs]


def _hashed(pairs):
    """A scorer that knows a pseudo-random subset of the facts."""
    return [-float(zlib.crc32(f"{p}|{o}".encode()) % 1000) for p, o in pairs]


def _build(tmp_path: Path, name: str, **kwargs) -> Path:
    kwargs.setdefault("max_per_relation", 12)
    built = build_facts(kwargs.pop("scorer", oracle()), languages=("en", "ca"), model="stub", **kwargs)
    built.write(tmp_path / name)
    return tmp_path / name


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    a, b = _build(tmp_path, "a", seed=3), _build(tmp_path, "b", seed=3)
    files = _files(a)
    assert set(files) == {"counterfact.json", "zsre.json", "facts.json", "ca/counterfact.json", "ca/zsre.json"}
    assert files == _files(b)
    assert _files(_build(tmp_path, "c", seed=4))["counterfact.json"] != files["counterfact.json"]


def test_a_record_does_not_depend_on_the_other_relations(tmp_path):
    full = json.loads((_build(tmp_path, "all", max_per_relation=None) / "counterfact.json").read_text())
    one = json.loads((_build(tmp_path, "one", max_per_relation=None, relations=["P30"]) / "counterfact.json").read_text())
    # case_id and the neighborhood (never a subject kept for the relation) come from the set kept.
    strip = lambda rec: {k: v for k, v in rec.items() if k not in ("case_id", "neighborhood_prompts")}  # noqa: E731
    by_subject = {r["requested_rewrite"]["subject"]: strip(r) for r in full if r["requested_rewrite"]["relation_id"] == "P30"}
    assert len(one) == len(FACTS["P30"]) and by_subject
    assert all(strip(r) == by_subject[r["requested_rewrite"]["subject"]] for r in one
               if r["requested_rewrite"]["subject"] in by_subject)


def test_relations_and_templates():
    assert len(RELATIONS) >= 6
    for rel in RELATIONS:
        assert len(FACTS[rel.id]) >= 100, rel.id
        for lang in LANGUAGES:
            assert len(rel.templates[lang]) >= 3 and len(set(rel.templates[lang])) == len(rel.templates[lang])
            assert len(rel.templates[lang]) == len(rel.templates["en"])  # index-aligned twins
            assert all(t.count("{}") == 1 for t in rel.templates[lang] + rel.questions[lang])


def test_catalan_articles_contractions_and_agreement():
    japan, italy, usa = Name("Japó", "el"), Name("Itàlia"), Name("Estats Units", "els")
    assert sentence("La capital <de>{} és", "ca", japan) == "La capital del Japó és"
    assert sentence("La capital <de>{} és", "ca", italy) == "La capital d'Itàlia és"
    assert sentence("<A>{} es parla oficialment", "ca", usa) == "Als Estats Units es parla oficialment"
    assert sentence("<Art>{} té la capital a", "ca", Name("Índia", "l'")) == "L'Índia té la capital a"
    assert sentence("La capital <de>{} és", "ca", Name("Iemen", "el")) == "La capital del Iemen és"
    assert sentence("<The>{}'s capital is", "en", Name("United States", "the")) == "The United States's capital is"
    assert Name("Japó", "el").phrase() == "el Japó" and Name("Índia", "l'").phrase() == "l'Índia"
    plural = Name("Filipines", "les")
    assert sentence("<Art>{} <és|són> un país", "ca", plural) == "Les Filipines són un país"
    assert sentence("<Art>{} <és|són> un país", "ca", japan) == "El Japó és un país"


def test_fields_and_counts(tmp_path):
    out = _build(tmp_path, "facts")
    report = json.loads((out / "facts.json").read_text())
    assert report["counts"].keys() == set(RELATION_IDS) and all(c["kept"] == 12 for c in report["counts"].values())
    assert "more probable" in report["knowledge_test"] or "higher" in report["knowledge_test"]
    for lang, root in (("en", out), ("ca", out / "ca")):
        records = json.loads((root / "counterfact.json").read_text())
        assert len(records) == 12 * len(RELATION_IDS)
        subjects = [r["requested_rewrite"]["subject"] for r in records]
        assert len(set(subjects)) == len(subjects)  # distinct subjects by default
        kept = {(r["requested_rewrite"]["relation_id"], r["requested_rewrite"]["subject"]) for r in records}
        for r in records:
            rw = r["requested_rewrite"]
            rel = next(x for x in RELATIONS if x.id == rw["relation_id"])
            facts = FACTS[rel.id]
            true = next(f for f in facts if f.subject.name(lang).text == rw["subject"]).object
            assert rw["target_true"] == {"str": true.name(lang).phrase(), "id": true.id}
            assert rw["target_new"]["id"] != true.id and rw["target_new"]["str"] != rw["target_true"]["str"]
            assert rw["prompt"].count("{}") == 1
            assert len(r["paraphrase_prompts"]) >= 2 and rw["prompt"].replace("{}", rw["subject"]) not in r["paraphrase_prompts"]
            assert all(rw["subject"] in p for p in r["paraphrase_prompts"] + r["generation_prompts"])
            # Neighbors share the true object and are not edited in the same file's batch.
            sharing = [f.subject.name(lang).text for f in facts
                       if f.object.id == true.id and (rel.id, f.subject.name(lang).text) not in kept]
            assert len(r["neighborhood_prompts"]) == min(MAX_PROMPTS, len(sharing))
            assert not any(p == rw["prompt"].replace("{}", subject) for p in r["neighborhood_prompts"]
                           for (rid, subject) in kept if rid == rel.id)
            holders = sum(f.object.id == rw["target_new"]["id"] for f in facts)
            assert len(r["attribute_prompts"]) == min(MAX_PROMPTS, holders)
            assert len(r["generation_prompts"]) >= 3
        assert sum(len(r["neighborhood_prompts"]) >= 5 for r in records) >= 12 * 3  # P17, P30, P37, P38 have many


def test_catalan_twins_share_case_ids_and_targets(tmp_path):
    out = _build(tmp_path, "facts")
    for name in ("counterfact.json", "zsre.json"):
        en, ca = (json.loads(p.read_text()) for p in (out / name, out / "ca" / name))
        assert [r["case_id"] for r in en] == [r["case_id"] for r in ca] == list(range(len(en)))
    en, ca = (json.loads(p.read_text()) for p in (out / "counterfact.json", out / "ca" / "counterfact.json"))
    for a, b in zip(en, ca):
        for key in ("relation_id", "target_new", "target_true"):
            ids = (lambda v: v["id"] if isinstance(v, dict) else v)  # noqa: E731
            assert ids(a["requested_rewrite"][key]) == ids(b["requested_rewrite"][key])
        assert len(a["neighborhood_prompts"]) == len(b["neighborhood_prompts"])
    assert any(a["requested_rewrite"]["prompt"] != b["requested_rewrite"]["prompt"] for a, b in zip(en, ca))


def test_records_load_as_counterfact_and_zsre(tmp_path):
    out = _build(tmp_path, "facts")
    _, tok = make_model("gpt2")
    for root in (out, out / "ca"):
        assert load_records(root / "counterfact.json")[0] == "counterfact"
        assert load_records(root / "zsre.json")[0] == "zsre"
        for name in ("counterfact.json", "zsre.json"):
            requests = load_requests(root / name)
            assert len(validate_requests(requests, tok)) == len(requests)
    requests = load_requests(out / "counterfact.json")
    l2 = match_l2(requests, parse_l2_records(str(out / "ca" / "counterfact.json")))
    assert [r.case_id for r in l2] == [r.case_id for r in requests]


def test_knowledge_test_and_selection():
    probes = [Probe("p", "a", ("b", "c")), Probe("q", "a", ("b",))]
    scores = {("p", "a"): -1.0, ("p", "b"): -2.0, ("p", "c"): -1.0, ("q", "a"): -0.5, ("q", "b"): -3.0}
    assert knows(lambda pairs: [scores[x] for x in pairs], probes) == [False, True]  # a tie is not knowing
    # A loss to an early candidate, in stages or not, leaves the other probes' scores in place.
    probes = [Probe("p", "a", ("b", "c", "d")), Probe("q", "a", ("b", "c")), Probe("r", "a", tuple("bcdefg"))]
    scores = {("p", "a"): -1.0, ("p", "b"): -0.5, ("p", "c"): -9.0, ("p", "d"): -9.0, ("q", "a"): -1.0,
              ("q", "b"): -2.0, ("q", "c"): -3.0, **{("r", x): -5.0 for x in "bcdefg"}, ("r", "a"): -4.0}
    asked = []

    def scorer(pairs):
        asked.extend(pairs)
        return [scores[x] for x in pairs]

    for stages in ((), (1,), (1, 2)):
        asked.clear()
        assert knows(scorer, probes, stages) == [False, True, True]
    assert ("p", "d") not in asked  # p lost at its first candidate: the later stages skip it
    pending = {"R1": ["x", "y", "z"], "R2": ["x", "w"]}
    kept, tested = select_known(pending, lambda facts: [True] * len(facts), lambda f: frozenset(f), chunk=1)
    assert kept == ["x", "w", "y", "z"] and tested == {"R1": 3, "R2": 1}  # round-robin; R2's x is never tested
    kept, _ = select_known(pending, lambda facts: [f != "y" for f in facts], lambda f: frozenset(f),
                           max_per_relation=1, chunk=5)
    assert kept == ["x", "w"]


def test_at_most_max_per_object_kept_and_a_failed_test_frees_its_place():
    # Facts "a1".."a4" share object a; "b1" has object b. One chunk would test all of a's at once.
    pending = {"R": ["a1", "a2", "a3", "b1", "a4"]}
    asked = []

    def test(facts):
        asked.append(list(facts))
        return [f != "a1" for f in facts]  # the model does not know a1

    kept, tested = select_known(pending, test, lambda f: frozenset([f]), chunk=10, objects=lambda f: f[0],
                                max_per_object=2)
    assert kept == ["a2", "b1", "a3"] and tested == {"R": 4}
    assert asked == [["a1", "a2", "b1"], ["a3"]]  # a4 is never tested: a already holds two
    unlimited, _ = select_known(pending, test, lambda f: frozenset([f]), chunk=10, objects=lambda f: f[0])
    assert unlimited == ["a2", "a3", "b1", "a4"]


def test_builder_caps_each_relation_and_true_object(tmp_path):
    capped = json.loads((_build(tmp_path, "capped", max_per_relation=None, relations=["P17"], max_per_object=3)
                         / "counterfact.json").read_text())
    whole = json.loads((_build(tmp_path, "whole", max_per_relation=None, relations=["P17"]) / "counterfact.json")
                       .read_text())
    def per_object(records):
        return Counter(r["requested_rewrite"]["target_true"]["str"] for r in records)

    assert max(per_object(capped).values()) == 3 < max(per_object(whole).values())
    assert set(per_object(capped)) == set(per_object(whole))  # every country keeps some of its cities
    report = json.loads((tmp_path / "capped" / "facts.json").read_text())
    assert report["max_per_object"] == 3 and report["n_records"] == len(capped)


def _cli(capsys, *argv):
    code = cli.main(list(argv))
    return code, capsys.readouterr()


@pytest.mark.parametrize("flag, value, valid", [("--relations", "P17,P99", "P17, P1376"),
                                                ("--languages", "en,fr", "en, ca"),
                                                ("--max-candidates", "0", "at least 1"),
                                                ("--max-per-object", "0", "at least 1")])
def test_bad_choices_are_one_line_before_loading(tmp_path, capsys, flag, value, valid):
    code, cap = _cli(capsys, "data", "facts", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"),
                     flag, value)
    assert code == 2 and len(cap.err.strip().splitlines()) == 1 and valid in cap.err
    assert not (tmp_path / "o").exists()


def test_out_not_empty_is_refused(tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("x")
    code, cap = _cli(capsys, "data", "facts", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o"))
    assert code == 2 and len(cap.err.strip().splitlines()) == 1 and "--force" in cap.err


def test_tiny_model_end_to_end(tmp_path, capsys):
    model, tok = make_model("gpt2")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "facts"
    argv = ["data", "facts", "--model", str(tmp_path / "model"), "--out", str(out), "--relations", "P30,P38",
            "--languages", "en,ca", "--max-candidates", "1", "--max-per-relation", "4", "--seed", "1"]
    code, cap = _cli(capsys, *argv)
    assert code == 0, cap.err
    assert "P30" in cap.out and "kept" in cap.out
    report = json.loads((out / "facts.json").read_text())
    assert report["model"] == str(tmp_path / "model") and report["languages"] == ["en", "ca"]
    n = report["n_records"]
    assert n == sum(c["kept"] for c in report["counts"].values()) > 0
    for c in report["counts"].values():  # kept only where known in both languages
        assert set(c["known"]) == {"en", "en+ca"} and c["kept"] <= c["known"]["en+ca"] <= c["known"]["en"]
    first = _files(out)
    assert _cli(capsys, *argv)[0] == 2  # --out is not empty now
    assert _cli(capsys, *argv, "--force")[0] == 0 and _files(out) == first
    for data in (out / "counterfact.json", out / "zsre.json", out / "ca" / "counterfact.json"):
        code, cap = _cli(capsys, "eval", "--model", str(tmp_path / "model"), "--data", str(data))
        assert code == 0, cap.err
        assert f"{n} case(s)" in cap.out
    files = {"hparams.json": json.dumps({"layers": [1, 2], "v_num_grad_steps": 2, "mom2_n_samples": 10}),
             "corpus.txt": "\n".join(" ".join(WORDS[i : i + 12]) for i in range(0, 120, 12)),
             "templates.json": json.dumps([["{}"]])}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    code, cap = _cli(capsys, "edit", "--model", str(tmp_path / "model"), "--requests", str(out / "counterfact.json"),
                     "--out", str(tmp_path / "edited"), "--stats-dir", str(tmp_path / "stats"), "--quiet",
                     "--corpus", str(tmp_path / "corpus.txt"), "--context-templates", str(tmp_path / "templates.json"),
                     "--hparams", str(tmp_path / "hparams.json"))
    assert code == 0, cap.err
    assert json.loads((tmp_path / "edited" / "report.json").read_text())["n_edits"] == n
