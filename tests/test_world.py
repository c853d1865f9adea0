"""The synthetic world: deterministic generator, formats, tokenizer, cached atomic builds, recall."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from massedit.cli import main as cli_main
from massedit.world import build as build_mod
from massedit.world import generate_world, load_world, write_world_files
from massedit.world.build import WorldExistsError, build_world, is_complete
from massedit.world.generate import DEFAULT_RELATIONS, RELATIONS, counterfact_records, documents, documents_with_spans, record_order, zsre_records, _rng
from massedit.world.train import preset, recall, train_model, train_tokenizer, torch_settings

DATA_FILES = ("counterfact.json", "zsre.json", "corpus.txt", "world.json", "reference_texts.json")


def _files(world, path, docs=150):
    write_world_files(world, path, n_corpus_docs=docs)
    return {name: (path / name).read_bytes() for name in DATA_FILES}


def test_generator_is_deterministic(tmp_path):
    a = _files(generate_world(40, seed=3), tmp_path / "a")
    b = _files(generate_world(40, seed=3), tmp_path / "b")
    c = _files(generate_world(40, seed=4), tmp_path / "c")
    for name in DATA_FILES:
        assert a[name] == b[name], name
        assert a[name] != c[name], name


def test_world_shape():
    w = generate_world(60, seed=0)
    assert len(w.subjects) == len(set(w.subjects)) == 60
    assert [r.id for r in w.relations] == [r[0] for r in RELATIONS]
    objects = set()
    for r in w.relations:
        assert 8 <= len(r.objects) <= 30
        assert len(r.train_templates) + len(r.heldout_templates) >= 6
        assert r.heldout_templates and r.heldout_questions
        assert not set(r.train_templates) & set(r.heldout_templates)
        assert set(r.rewrite_templates) <= set(r.train_templates)
        for t in r.train_templates + r.heldout_templates + r.train_questions + r.heldout_questions:
            assert t.count("{}") == 1
        objects.update(r.objects)
    assert not objects & set(w.subjects)
    for s in w.subjects:
        assert set(w.facts[s]) == {r.id for r in w.relations}
        for r in w.relations:
            assert w.facts[s][r.id] in r.objects


def test_subjects_are_named_from_shared_pools():
    w = generate_world(600, seed=0, names="pooled")
    given, surnames = set(w.given_names), set(w.surnames)
    assert not given & surnames
    by_surname, by_given = {}, {}
    for s in w.subjects:
        g, last = s.split(" ")
        assert g in given and last in surnames
        by_surname.setdefault(last, []).append(s)
        by_given.setdefault(g, []).append(s)
    # Neither piece alone names a person: most surnames and every given name are shared.
    assert sum(len(v) > 1 for v in by_surname.values()) > 0.7 * len(by_surname)
    assert min(len(v) for v in by_given.values()) > 2


def test_relations_can_be_chosen():
    w = generate_world(20, seed=0, relations=["P27", "P19"])
    assert [r.id for r in w.relations] == ["P19", "P27"]
    assert all(set(f) == {"P19", "P27"} for f in w.facts.values())
    for bad in (["P999"], [], ["P19", "P19"]):
        with pytest.raises(ValueError, match="relations must be distinct ids"):
            generate_world(20, seed=0, relations=bad)


def test_heldout_templates_are_new_combinations_of_seen_parts():
    w = generate_world(20, seed=0)
    for r in w.relations:
        train_text = " ".join(r.train_templates)
        for t in r.heldout_templates:
            # Its relation phrase occurs in training: every held-out template shares its last words
            # (the phrase before the object) with some training template.
            tail = " ".join(t.split()[-2:])
            assert tail in train_text, (r.id, t)


def _subject_of(prompt: str, template: str) -> str:
    head, _, tail = template.partition("{}")
    assert prompt.startswith(head) and prompt.endswith(tail)
    return prompt[len(head): len(prompt) - len(tail)]


def test_counterfact_format():
    w = generate_world(50, seed=1)
    records = counterfact_records(w)
    assert len(records) == 50 * len(RELATIONS)
    assert [r["case_id"] for r in records] == list(range(len(records)))
    for rec in records:
        rw = rec["requested_rewrite"]
        assert set(rw) == {"prompt", "relation_id", "target_new", "target_true", "subject"}
        assert rw["prompt"].count("{}") == 1
        rel = w.relation(rw["relation_id"])
        s, new, true = rw["subject"], rw["target_new"], rw["target_true"]
        assert set(new) == set(true) == {"str", "id"}
        assert true["str"] == w.facts[s][rel.id]
        assert new["str"] != true["str"] and new["str"] in rel.objects
        assert new["id"] != true["id"]
        assert rw["prompt"] in rel.train_templates
        assert len(rec["paraphrase_prompts"]) == 2
        assert rec["paraphrase_prompts"][1] in [t.replace("{}", s) for t in rel.heldout_templates]
        assert s in rec["paraphrase_prompts"][0]
        assert 1 <= len(rec["neighborhood_prompts"]) <= 10
        for p in rec["neighborhood_prompts"]:
            other = _subject_of(p, rw["prompt"])
            assert other != s and w.facts[other][rel.id] == true["str"]
        for p in rec["attribute_prompts"]:
            assert w.facts[_subject_of(p, rw["prompt"])][rel.id] == new["str"]
        assert rec["generation_prompts"] and all(s in p for p in rec["generation_prompts"])
        assert "{}" not in " ".join(rec["paraphrase_prompts"] + rec["neighborhood_prompts"])


def test_records_put_distinct_subjects_first():
    w = generate_world(30, seed=0)
    order = record_order(w)
    assert len(set(order)) == len(order) == 30 * len(RELATIONS)
    for k in range(len(RELATIONS)):
        assert len({s for s, _ in order[30 * k: 30 * (k + 1)]}) == 30


def test_zsre_format():
    w = generate_world(30, seed=2)
    records = zsre_records(w)
    assert len(records) == 30 * len(RELATIONS)
    keys = {"subject", "src", "pred", "rephrase", "alt", "answers", "loc", "loc_ans", "cond"}
    for r in records:
        assert set(r) == keys
        assert r["subject"] in r["src"] and r["subject"] in r["rephrase"]
        assert r["src"] != r["rephrase"]
        assert r["answers"] == [r["alt"]] and r["alt"] != r["pred"]
        other = next(s for s in w.subjects if s in r["loc"])
        assert other != r["subject"]
        assert r["loc_ans"] in w.facts[other].values()


def test_documents_cover_every_fact_once_per_epoch():
    w = generate_world(15, seed=0)
    text = ". " + " ".join(documents(w, _rng(0, "t"), epochs=2, question_rate=0.0))
    for s, rid, obj in w.fact_list():
        # Every sentence follows another one's full stop (or the ". " put in front).
        n = sum(text.count(". " + t.replace("{}", s) + " " + obj + ".") for t in w.relation(rid).train_templates)
        assert n == 2, (s, rid, obj)


def test_document_spans_mark_the_objects():
    w = generate_world(15, seed=0)
    objects = {o for r in w.relations for o in r.objects}
    docs = documents_with_spans(w, _rng(0, "t"), epochs=1)
    assert sum(len(spans) for _, spans in docs) == 15 * len(RELATIONS)
    for text, spans in docs:
        for a, b in spans:
            assert text[a:b] in objects and text[b] == "." and text[a - 1] == " "


def test_object_flags_cover_object_tokens():
    from massedit.world.train import _encode_docs

    w = generate_world(15, seed=0)
    tok = train_tokenizer(w, "gpt2", 800, n_texts=1500)
    docs = documents_with_spans(w, _rng(0, "t"), epochs=1)[:5]
    for (ids, flags), (text, spans) in zip(_encode_docs(tok, docs, 512), docs):
        flagged = tok.decode([i for i, f in zip(ids, flags) if f]).split()
        assert " ".join(flagged) == " ".join(text[a:b] for a, b in spans)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_tokenizer(arch):
    w = generate_world(20, seed=0)
    tok = train_tokenizer(w, arch, 800, n_texts=2000)
    lengths = [len(tok(" " + s, add_special_tokens=False)["input_ids"]) for s in w.subjects]
    assert sum(n >= 2 for n in lengths) >= len(lengths) * 0.8
    ids = tok("X was born in Paris.")["input_ids"]
    if arch == "llama":
        assert ids[0] == tok.bos_token_id
    # An object is the same tokens at the end of a sentence as after a prompt.
    from massedit.inputs.tokens import target_ids

    for obj in ("Paris", "Cape Town", "ice hockey"):
        t = target_ids(tok, "X was born in", obj)
        full = tok("X was born in " + obj + ".")["input_ids"]
        assert full[-len(t) - 1:-1] == t


def test_training_is_deterministic():
    w = generate_world(12, seed=0)
    cfg = preset("gpt2", quick=True)
    cfg.steps, cfg.n_layer, cfg.d_model, cfg.d_ff = 5, 1, 32, 64
    tok = train_tokenizer(w, "gpt2", 400, n_texts=500)
    with torch_settings(1):
        m1, _ = train_model(w, "gpt2", tok, cfg, seed=5)
        m2, _ = train_model(w, "gpt2", tok, cfg, seed=5)
        m3, _ = train_model(w, "gpt2", tok, cfg, seed=6)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)


# ------------------------------------------------------------------------------------------------
# Quick builds (one per module)


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("worlds") / "quick"
    info = build_world(out, quick=True, threads=1)
    return out, info


def test_quick_build_outputs(quick_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, info = quick_world
    assert info["cached"] is False and is_complete(out)
    assert not list(out.parent.glob(".quick.massedit-staging-*"))
    tok = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.model_type == "gpt2" and model.config.vocab_size == len(tok)
    world = load_world(out)
    assert len(world.subjects) == build_mod.QUICK_SUBJECTS
    cf = json.loads((out / "counterfact.json").read_text())
    assert len(cf) == build_mod.QUICK_SUBJECTS * len(DEFAULT_RELATIONS)
    assert len((out / "corpus.txt").read_text().splitlines()) == 200
    refs = json.loads((out / "reference_texts.json").read_text())
    assert set(refs) == {w for _, _, w in world.fact_list()}
    build = json.loads((out / "build.json").read_text())
    for split in ("rewrite", "paraphrase", "prefix", "question", "question_heldout"):
        fig = build["recall"][split]
        assert fig["n"] == len(cf) and 0.0 <= fig["full_top1"] <= fig["first_top1"] <= 1.0
        assert 0.0 <= fig["p_true"] <= 1.0
    r = recall(model, tok, world, "rewrite", limit=30)
    assert r["n"] == 30


def test_quick_build_is_cached(quick_world, capsys):
    out, _ = quick_world
    stamp = (out / "build.json").stat().st_mtime_ns
    content = (out / "build.json").read_text()
    t = time.perf_counter()
    again = build_world(out, quick=True, threads=1)
    assert again["cached"] is True
    assert cli_main(["world", "build", "--out", str(out), "--quick", "--threads", "1"]) == 0
    assert "reused" in capsys.readouterr().out
    assert time.perf_counter() - t < 5
    assert (out / "build.json").stat().st_mtime_ns == stamp
    assert (out / "build.json").read_text() == content
    # Other arguments on the same directory: an error, not a silent overwrite.
    with pytest.raises(WorldExistsError):
        build_world(out, quick=True, seed=1, threads=1)
    assert cli_main(["world", "build", "--out", str(out), "--quick", "--seed", "1"]) == 2


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "train_model", boom)
    out = tmp_path / "w"
    with pytest.raises(KeyboardInterrupt):
        build_world(out, quick=True, threads=1)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_other_directories(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "notes.txt").write_text("mine")
    with pytest.raises(WorldExistsError):
        build_world(tmp_path / "w", quick=True)
    assert (tmp_path / "w" / "notes.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------
# The default world meets its recall targets (slow: trains a model unless the cache holds it)


def _slow_requested(config) -> bool:
    return "slow" in (config.getoption("markexpr") or "") and "not slow" not in config.getoption("markexpr")


@pytest.mark.slow
def test_default_world_recall(request):
    if not (_slow_requested(request.config) or os.environ.get("MASSEDIT_RUN_SLOW")):
        pytest.skip("slow: run with -m slow (or MASSEDIT_RUN_SLOW=1)")
    cache = Path(os.environ.get("MASSEDIT_WORLD_CACHE", Path.home() / ".cache" / "massedit" / "world"))
    info = build_world(cache / "gpt2-default", arch="gpt2", threads=int(os.environ.get("MASSEDIT_THREADS", "2")))
    rec = info["recall"]
    assert rec["rewrite"]["first_top1"] >= 0.95 and rec["rewrite"]["full_top1"] >= 0.95
    assert rec["paraphrase"]["full_top1"] >= 0.90
    assert rec["prefix"]["full_top1"] >= 0.90
    assert rec["rewrite"]["p_true"] < 0.99  # not saturated (DESIGN §9)
