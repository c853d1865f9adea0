"""The knowledge world's second language: L2 records, spellings, token overlap, bilingual builds."""
from __future__ import annotations

import json

import pytest

from massedit.cli import main as cli_main
from massedit.world.build import WorldExistsError, build_world, is_complete
from massedit.world.generate import DEFAULT_RELATIONS, RELATIONS, _rng, fill, generate_world, record_order, write_world_files
from massedit.world.languages import (
    check_languages,
    l2_counterfact_records,
    object_names,
    respell,
    second_language,
    subject_token_jaccard,
)
from massedit.world import languages as lang
from massedit.world.train import preset, recall_items, train_tokenizer, training_sequences

L1_FILES = ("world.json", "counterfact.json", "zsre.json", "reference_texts.json", "corpus.txt")
L2_FILES = ("world.l2.json", "counterfact.l2.json", "zsre.l2.json")


def _read(path, names):
    return {name: (path / name).read_bytes() for name in names}


def _all_relations_world(n=40, seed=0):
    return generate_world(n, seed=seed, relations=[r[0] for r in RELATIONS])


def test_every_relation_and_object_has_l2_phrasing():
    for rid, _, nouns, verbs, questions, objects in RELATIONS:
        l2_nouns, l2_verbs, l2_questions, names = lang.RELATIONS[rid]
        assert (len(l2_nouns), len(l2_verbs), len(l2_questions)) == (len(nouns), len(verbs), len(questions))
        assert set(names) == set(objects)
        assert len(set(names.values())) == len(objects)
        assert not set(names.values()) & set(objects)
        assert all(q.count("{}") == 1 for q in l2_questions)
    w = _all_relations_world()
    l2 = second_language(w)
    for r1, r2 in zip(w.relations, l2.relations):
        assert r2.id == r1.id and len(r2.objects) == len(r1.objects)
        assert not set(r2.train_templates) & set(r2.heldout_templates) and r2.heldout_templates
        assert set(r2.rewrite_templates) <= set(r2.train_templates)
        assert r2.heldout_questions and not set(r2.train_questions) & set(r2.heldout_questions)
        assert not set(r2.train_templates) & set(r1.train_templates + r1.heldout_templates)


def test_l2_spellings_are_distinct_and_keep_the_name_pools():
    w = generate_world(300, seed=1, names="pooled")
    l2 = second_language(w)
    reserved = frozenset(lang._l2_words())
    assert len(set(l2.subjects)) == len(w.subjects)
    assert not set(l2.subjects) & set(w.subjects)
    assert len(set(l2.given_names + l2.surnames)) == len(w.given_names) + len(w.surnames)
    for s1, s2 in zip(w.subjects, l2.subjects):
        g1, f1 = s1.split(" ")
        g2, f2 = s2.split(" ")
        assert (g2, f2) == (respell(g1, False, reserved), respell(f1, True, reserved))
        assert g2 in l2.given_names and f2 in l2.surnames
        assert {r: object_names(r)[o] for r, o in w.facts[s1].items()} == l2.facts[s2]


def test_l2_records_have_the_l1_case_ids_and_objects(tmp_path):
    w = _all_relations_world()
    write_world_files(w, tmp_path, n_corpus_docs=100, languages=2)
    cf1, cf2 = (json.loads((tmp_path / f).read_text()) for f in ("counterfact.json", "counterfact.l2.json"))
    z1, z2 = (json.loads((tmp_path / f).read_text()) for f in ("zsre.json", "zsre.l2.json"))
    l2 = second_language(w)
    subject = dict(zip(w.subjects, l2.subjects))
    assert len(cf1) == len(cf2) == len(w.subjects) * len(w.relations)
    for a, b in zip(cf1, cf2):
        ra, rb = a["requested_rewrite"], b["requested_rewrite"]
        assert a["case_id"] == b["case_id"] and ra["relation_id"] == rb["relation_id"]
        assert rb["subject"] == subject[ra["subject"]]
        for key in ("target_new", "target_true"):
            assert rb[key]["id"] == ra[key]["id"]
            assert rb[key]["str"] == object_names(ra["relation_id"])[ra[key]["str"]]
        assert rb["prompt"] in l2.relation(rb["relation_id"]).rewrite_templates
        assert rb["subject"] in b["paraphrase_prompts"][1]
        assert all(rb["subject"] not in p for p in b["neighborhood_prompts"])
        assert all(l2.facts[s][rb["relation_id"]] == rb["target_true"]["str"]
                   for s in l2.subjects if any(p == fill(rb["prompt"], s) for p in b["neighborhood_prompts"]))
    for (s, rid), a, b in zip(record_order(w), z1, z2):
        assert a["subject"] == s and b["subject"] == subject[s]
        assert (b["alt"], b["pred"]) == (object_names(rid)[a["alt"]], object_names(rid)[a["pred"]])
    corpus = (tmp_path / "corpus.txt").read_text()
    assert any(s in corpus for s in l2.subjects) and any(s in corpus for s in w.subjects)


def test_bilingual_files_are_deterministic(tmp_path):
    names = L1_FILES + L2_FILES
    for d, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_world_files(generate_world(40, seed=seed), tmp_path / d, 100, languages=2)
    a, b, c = (_read(tmp_path / d, names) for d in "abc")
    for name in names:
        assert a[name] == b[name], name
        assert a[name] != c[name], name


def test_one_language_world_is_unchanged(tmp_path):
    w = generate_world(40, seed=2)
    write_world_files(w, tmp_path / "plain", 100)
    write_world_files(w, tmp_path / "one", 100, languages=1)
    write_world_files(w, tmp_path / "two", 100, languages=2)
    plain, one, two = (_read(tmp_path / d, L1_FILES) for d in ("plain", "one", "two"))
    assert plain == one
    assert not any((tmp_path / "one" / f).exists() for f in L2_FILES)
    # The second language adds files and L2 text to the corpus; the L1 data files stay as they are.
    assert {k: v for k, v in two.items() if k != "corpus.txt"} == {k: v for k, v in plain.items() if k != "corpus.txt"}
    assert two["corpus.txt"] != plain["corpus.txt"]
    cfg = preset("gpt2", quick=True)
    tok = train_tokenizer(w, "gpt2", 400, n_texts=300)
    assert training_sequences(w, tok, cfg, _rng(0, "t")) == training_sequences(w, tok, cfg, _rng(0, "t"), languages=1)


def test_subject_token_overlap_is_low():
    w = generate_world(60, seed=0)
    l2 = second_language(w)
    tok = train_tokenizer(w, "gpt2", 600, n_texts=1500, languages=2)
    assert subject_token_jaccard(tok, w, w) == 1.0
    overlap = subject_token_jaccard(tok, w, l2)
    assert 0.0 <= overlap < 0.5
    # Both spellings are in the tokenizer's training text: L2 pieces are tokens as L1 pieces are.
    l1_len = sum(len(tok(" " + s)["input_ids"]) for s in w.subjects)
    l2_len = sum(len(tok(" " + s)["input_ids"]) for s in l2.subjects)
    assert l2_len < 2 * l1_len


def test_training_statements_are_in_both_languages():
    w = generate_world(30, seed=0)
    l2 = second_language(w)
    cfg = preset("gpt2", quick=True)
    cfg.steps, cfg.batch_size = 40, 30
    tok = train_tokenizer(w, "gpt2", 500, n_texts=500, languages=2)
    seqs = training_sequences(w, tok, cfg, _rng(0, "t"), languages=2)
    texts = tok.batch_decode([ids for ids, _ in seqs])
    in_l2 = sum(any(s in t for s in l2.subjects) for t in texts)
    in_l1 = sum(any(s in t for s in w.subjects) for t in texts)
    assert in_l1 + in_l2 == len(texts)
    assert 0.4 < in_l2 / len(texts) < 0.6


def test_l2_recall_items_are_the_l2_records():
    w = generate_world(20, seed=0)
    l2 = second_language(w)
    records = l2_counterfact_records(w, l2)
    items = recall_items(w, "rewrite", language=2)
    assert [p for p, _, _ in items] == [fill(r["requested_rewrite"]["prompt"], r["requested_rewrite"]["subject"])
                                        for r in records]
    assert [o for _, o, _ in items] == [r["requested_rewrite"]["target_true"]["str"] for r in records]
    assert [p for p, _, _ in recall_items(w, "paraphrase", language=2)] == [r["paraphrase_prompts"][1] for r in records]


def test_bad_language_counts_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="languages must be 1 or 2"):
        check_languages(3)
    with pytest.raises(ValueError, match="languages must be 1 or 2"):
        write_world_files(generate_world(12), tmp_path / "w", 10, languages=0)
    with pytest.raises(ValueError, match="languages must be 1 or 2"):
        build_world(tmp_path / "b", quick=True, languages=3)
    assert cli_main(["world", "build", "--out", str(tmp_path / "c"), "--quick", "--languages", "3"]) == 2
    assert "--languages must be 1 or 2" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_quick_bilingual_build(tmp_path):
    out = tmp_path / "bi"
    info = build_world(out, quick=True, n_subjects=12, n_corpus_docs=20, languages=2, threads=1)
    assert info["cached"] is False and is_complete(out, languages=2)
    assert info["args"]["languages"] == 2
    assert 0.0 <= info["languages"]["subject_token_jaccard"] < 0.5
    for split in ("rewrite", "paraphrase", "prefix", "question", "question_heldout"):
        assert info["recall"][split]["n"] == info["recall"][f"l2_{split}"]["n"] == 12 * len(DEFAULT_RELATIONS)
    assert build_world(out, quick=True, n_subjects=12, n_corpus_docs=20, languages=2, threads=1)["cached"] is True
    # The language count is part of the cache key.
    with pytest.raises(WorldExistsError):
        build_world(out, quick=True, n_subjects=12, n_corpus_docs=20, threads=1)
