"""massedit.evaluation: teacher-forced scoring, CounterFact / zsRE metrics, text metrics, loading, CLI."""
from __future__ import annotations

import importlib.util
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import massedit.cli
from massedit.evaluation import aggregate, counterfact, evaluate, scoring, summary, text
from massedit.inputs.records import load_records
from tiny import make_model, make_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def gpt2():
    model, tok = make_model("gpt2", tok=make_tokenizer("bpe", "right"), seed=0)
    return model, tok


@pytest.fixture(scope="module")
def left_tok():
    return make_tokenizer("bpe", "left")


# ---- independent reference: one full sequence at a time, log-probs summed by hand ----------
def ref_score(model, tok, prompt, target):
    """Per-token log-probs and argmax hits of ' target' after prompt, from one unpadded forward."""
    p_ids = tok(prompt)["input_ids"]
    full = tok(prompt + " " + target)["input_ids"]
    assert full[: len(p_ids)] == p_ids
    t_ids = full[len(p_ids):]
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    lps = [logp[len(p_ids) + j - 1, t].item() for j, t in enumerate(t_ids)]
    hits = [int(logits[len(p_ids) + j - 1].argmax()) == t for j, t in enumerate(t_ids)]
    return t_ids, lps, hits


def ref_nll(model, tok, prompt, target):
    _, lps, _ = ref_score(model, tok, prompt, target)
    return -sum(lps) / len(lps)


def cf_record(case_id, subject, prompt, new, true, para, neigh, relation="P1", **extra):
    rec = {
        "case_id": case_id,
        "requested_rewrite": {"prompt": prompt, "relation_id": relation, "subject": subject,
                              "target_new": {"str": new, "id": "Q1"}, "target_true": {"str": true, "id": "Q2"}},
        "paraphrase_prompts": para,
        "neighborhood_prompts": neigh,
        "attribute_prompts": [],
        "generation_prompts": [f"{subject} is", f"{subject} works for"],
    }
    rec.update(extra)
    return rec


RECORDS = [
    # multi-token new object ("Mxyzptlk" = 3 tokens) against a one-token true object
    cf_record(0, "Danielle Darrieux", "The mother tongue of {} is", "Mxyzptlk", "French",
              ["Danielle Darrieux speaks", "Danielle Darrieux is native to the language of"],
              ["Michael Jordan speaks", "The mother tongue of Lionel Messi is", "Marie Curie speaks"]),
    # o_new and o_true share their first token (" city" / " city" "-" "state")
    cf_record(1, "Michael Jordan", "{} plays the sport of", "city-state", "city",
              ["Michael Jordan plays", "Michael Jordan is a football"],
              ["Lionel Messi plays the sport of", "Albert Einstein plays"], relation="P2"),
    cf_record(2, "Albert Einstein", "{} was born in", "baseball", "basketball",
              ["Albert Einstein is from"], ["Marie Curie was born in"], relation="P2"),
]


def expected_case(model, tok, rec):
    rr = rec["requested_rewrite"]
    new, true = rr["target_new"]["str"], rr["target_true"]["str"]
    out = {}
    groups = {"rewrite": [rr["prompt"].replace("{}", rr["subject"])], "paraphrase": rec["paraphrase_prompts"],
              "neighborhood": rec["neighborhood_prompts"]}
    for (succ, mag, group) in (("ES", "EM", "rewrite"), ("PS", "PM", "paraphrase"), ("NS", "NM", "neighborhood")):
        s, d = [], []
        for p in groups[group]:
            n_new, n_true = ref_nll(model, tok, p, new), ref_nll(model, tok, p, true)
            if group == "neighborhood":
                s.append(float(n_true < n_new))
                d.append(math.exp(-n_true) - math.exp(-n_new))
            else:
                s.append(float(n_true > n_new))
                d.append(math.exp(-n_new) - math.exp(-n_true))
        out[succ] = sum(s) / len(s) if s else None
        out[mag] = sum(d) / len(d) if d else None
    return out


# ---- scoring engine ------------------------------------------------------------------------
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_score_continuations_matches_one_sequence_at_a_time(gpt2, left_tok, side, batch_size):
    model, tok = gpt2
    tok = tok if side == "right" else left_tok
    pairs = [
        ("The mother tongue of Danielle Darrieux is", "Mxyzptlk"),
        ("The mother tongue of Danielle Darrieux is", "French"),
        ("Michael Jordan plays", "city-state"),
        ("Michael Jordan plays", "city"),
        ("I", "baseball"),
        ("The mother tongue of Danielle Darrieux is", "Mxyzptlk"),  # duplicate: scored once
        ("Albert Einstein was born in the city of", "Xanadu-Prime"),
    ]
    scores = scoring.score_continuations(model, tok, pairs, batch_size=batch_size)
    assert len(scores) == len(pairs)
    assert scores[0] == scores[5]
    for (prompt, target), s in zip(pairs, scores):
        t_ids, lps, hits = ref_score(model, tok, prompt, target)
        assert list(s.target_ids) == t_ids
        assert s.logprobs == pytest.approx(lps, abs=1e-5)
        assert list(s.correct) == hits
        assert s.nll == pytest.approx(-sum(lps) / len(lps), abs=1e-5)
        assert s.prob == pytest.approx(math.exp(sum(lps) / len(lps)), rel=1e-5)
    # multi-token objects really are multi-token, and " city-state" starts with " city"
    assert len(scores[0].target_ids) > 1 and len(scores[6].target_ids) > 1
    assert scores[2].target_ids[0] == scores[3].target_ids[0] and len(scores[2].target_ids) > 1


def test_score_continuations_low_precision_model(gpt2):
    model, tok = gpt2
    half, _ = make_model("gpt2", tok=tok, seed=0, dtype=torch.bfloat16)
    pairs = [("Michael Jordan plays", "city-state"), ("I", "baseball")]
    fp32 = scoring.score_continuations(model, tok, pairs)
    bf16 = scoring.score_continuations(half, tok, pairs)
    for a, b in zip(fp32, bf16):
        assert all(math.isfinite(x) for x in b.logprobs)
        assert b.nll == pytest.approx(a.nll, abs=0.1)


# ---- CounterFact ---------------------------------------------------------------------------
def test_counterfact_metrics_by_hand(gpt2):
    model, tok = gpt2
    result = evaluate(model, tok, RECORDS, batch_size=5)
    assert result["kind"] == "counterfact" and result["n_cases"] == 3
    expected = [expected_case(model, tok, rec) for rec in RECORDS]
    for case, exp in zip(result["per_case"], expected):
        for name in ("ES", "PS", "NS", "EM", "PM", "NM"):
            assert case[name] == pytest.approx(exp[name], abs=1e-5), name
    for name in ("ES", "PS", "NS", "EM", "PM", "NM"):
        vals = np.array([e[name] for e in expected]) * 100
        stat = result["metrics"][name]
        assert stat["n"] == 3
        assert stat["mean"] == pytest.approx(vals.mean(), abs=1e-3)
        half = 1.96 * vals.std(ddof=1) / math.sqrt(3)
        assert stat["ci95"] == pytest.approx([vals.mean() - half, vals.mean() + half], abs=1e-3)
    m = {k: result["metrics"][k]["mean"] for k in ("ES", "PS", "NS")}
    s_expected = 0.0 if min(m.values()) == 0 else 3 / sum(1 / v for v in m.values())
    assert result["metrics"]["S"]["mean"] == pytest.approx(s_expected, abs=1e-6)
    flat = summary(result)
    assert list(flat) == ["ES", "PS", "NS", "S", "EM", "PM", "NM"]
    assert flat["ES"] == result["metrics"]["ES"]["mean"]
    # per-relation breakdown
    assert set(result["by_relation"]) == {"P1", "P2"}
    assert result["by_relation"]["P2"]["n_cases"] == 2
    p2 = np.array([expected[1]["PS"], expected[2]["PS"]]) * 100
    assert result["by_relation"]["P2"]["metrics"]["PS"]["mean"] == pytest.approx(p2.mean(), abs=1e-3)


def test_hmean_and_s_with_a_forced_model(gpt2):
    """A model that always predicts ' city' as the first token: ES/PS known exactly."""
    model, tok = gpt2
    city = tok(" city")["input_ids"][0]

    class Favour(torch.nn.Module):
        def __init__(self, inner, token, bonus=50.0):
            super().__init__()
            self.inner, self.token, self.bonus = inner, token, bonus

        def forward(self, **kw):
            logits = self.inner(**kw).logits.clone()
            logits[..., self.token] += self.bonus
            return SimpleNamespace(logits=logits)

    forced = Favour(model, city)
    recs = [
        cf_record(0, "Michael Jordan", "{} plays the sport of", "city", "basketball", ["Michael Jordan plays"],
                  ["Lionel Messi plays"]),
        cf_record(1, "Lionel Messi", "{} plays the sport of", "football", "city", ["Lionel Messi plays"],
                  ["Michael Jordan plays"]),
    ]
    res = evaluate(forced, tok, recs)
    # case 0: new=' city' wins everywhere → ES 1, PS 1, NS 0; case 1: true=' city' → ES 0, PS 0, NS 1
    assert [c["ES"] for c in res["per_case"]] == [1.0, 0.0]
    assert [c["NS"] for c in res["per_case"]] == [0.0, 1.0]
    for k in ("ES", "PS", "NS"):
        assert res["metrics"][k]["mean"] == pytest.approx(50.0)
    assert res["metrics"]["S"]["mean"] == pytest.approx(50.0)
    lo, hi = res["metrics"]["S"]["ci95"]
    assert 0.0 <= lo <= 50.0 <= hi <= 100.0
    assert aggregate.hmean([100.0, 50.0, 0.0]) == 0.0
    assert aggregate.hmean([100.0, 50.0, 25.0]) == pytest.approx(3 / (1 / 100 + 1 / 50 + 1 / 25))


def test_padding_sides_give_the_same_metrics(gpt2, left_tok):
    model, tok = gpt2
    right = evaluate(model, tok, RECORDS, batch_size=8)
    left = evaluate(model, left_tok, RECORDS, batch_size=8)
    for a, b in zip(right["per_case"], left["per_case"]):
        for name in ("ES", "PS", "NS", "EM", "PM", "NM"):
            assert a[name] == pytest.approx(b[name], abs=1e-6)
        for ra, rb in zip(a["neighborhood_prompts"], b["neighborhood_prompts"]):
            assert ra["nll_new"] == pytest.approx(rb["nll_new"], abs=1e-5)


def test_missing_neighborhood_and_paraphrase_prompts(gpt2):
    model, tok = gpt2
    no_neigh = cf_record(5, "Marie Curie", "{} was born in", "Paris", "London", ["Marie Curie is from"], [])
    no_para = cf_record(6, "Albert Einstein", "{} was born in", "Rome", "Berlin", [], ["Marie Curie was born in"])
    del no_para["paraphrase_prompts"]
    result = evaluate(model, tok, [RECORDS[0], no_neigh, no_para])
    c0, c1, c2 = result["per_case"]
    assert c1["NS"] is None and c1["NM"] is None and c1["PS"] is not None
    assert c2["PS"] is None and c2["PM"] is None and c2["NS"] is not None
    assert result["metrics"]["NS"]["n"] == 2 and result["metrics"]["PS"]["n"] == 2
    assert result["metrics"]["ES"]["n"] == 3
    assert result["metrics"]["NS"]["mean"] == pytest.approx(100 * np.mean([c0["NS"], c2["NS"]]))
    assert result["metrics"]["S"]["n"] == 2
    assert any("NS missing for 1" in n for n in result["notes"])
    # a single case with no neighborhood at all: NS missing, S missing, no crash
    only = evaluate(model, tok, [no_neigh])
    assert only["metrics"]["NS"] == {"mean": None, "ci95": None, "n": 0}
    assert only["metrics"]["S"]["mean"] is None
    assert summary(only)["NS"] is None


def test_case_ids_restrict(gpt2):
    model, tok = gpt2
    res = evaluate(model, tok, RECORDS, case_ids=[2, 0])
    assert [c["case_id"] for c in res["per_case"]] == [0, 2]
    with pytest.raises(ValueError, match="case ids not found"):
        evaluate(model, tok, RECORDS, case_ids=[99])


# ---- generation metrics --------------------------------------------------------------------
def test_ngram_entropy_hand_counts():
    # words a b a b a: bigrams (a,b)x2 (b,a)x2 → H2 = 1; trigrams (a,b,a)x2 (b,a,b)x1 → H3 = h(1/3)
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    expected = (2 / 3 * 1.0 + 4 / 3 * h3) / 2  # the reference averages the two weighted entropies
    assert text.ngram_entropy("a b a b a") == pytest.approx(expected)
    # punctuation is its own token: "x , x , x" has the same counts as "a b a b a"
    assert text.ngram_entropy("x, x, x") == pytest.approx(expected)
    # all-distinct words: 4 bigrams, 3 trigrams, uniform
    assert text.ngram_entropy("one two three four five") == pytest.approx((2 / 3 * 2 + 4 / 3 * math.log2(3)) / 2)
    assert text.ngram_entropy("hello") == 0.0
    assert text.n_gram_entropy(["a b a b a", "hello"]) == pytest.approx(expected / 2)
    assert text.word_tokenize("Jordan's city-state, ok.") == ["Jordan", "'s", "city-state", ",", "ok", "."]


def test_tfidf_toy_texts():
    docs = ["Paris is a city", "London is a city", "Tokyo"]
    vec = text.Tfidf(docs)
    assert set(vec.vocabulary) == {"paris", "is", "city", "london", "tokyo"}  # "a" is too short
    idf = {w: math.log(4 / (1 + df)) + 1 for w, df in {"paris": 1, "is": 2, "city": 2, "london": 1, "tokyo": 1}.items()}
    # "paris paris city unknown" vs "Paris is a city"
    a = {"paris": 2 * idf["paris"], "city": idf["city"]}
    b = {"paris": idf["paris"], "is": idf["is"], "city": idf["city"]}
    dot = sum(a[w] * b.get(w, 0.0) for w in a)
    cos = dot / math.sqrt(sum(v * v for v in a.values())) / math.sqrt(sum(v * v for v in b.values()))
    assert vec.similarity("paris paris city unknown", "Paris is a city") == pytest.approx(cos)
    assert vec.similarity("Tokyo", "London") == 0.0
    assert vec.similarity("nothing known", "Paris") == 0.0


def test_generation_metrics_ge_and_rs(gpt2, monkeypatch):
    model, tok = gpt2
    rec = dict(RECORDS[0], reference_texts={"Mxyzptlk": ["Mxyzptlk is a city", "the city of Mxyzptlk"]})
    other = RECORDS[1]  # no reference texts about "city-state"
    texts = {"Danielle Darrieux is": "Danielle Darrieux is a city a city", "Danielle Darrieux works for": "x y z",
             "Michael Jordan is": "Michael Jordan is", "Michael Jordan works for": "Michael Jordan works for Paris"}
    monkeypatch.setattr(counterfact, "generate_texts", lambda m, t, prompts, **kw: [texts[p] for p in prompts])
    res = evaluate(model, tok, [rec, other], generation=True,
                      reference_texts={"city-statex": ["unused"], "Mxyzptlk": ["Mxyzptlk is a city"]})
    c0, c1 = res["per_case"]
    gen0 = [texts["Danielle Darrieux is"], texts["Danielle Darrieux works for"]]
    assert c0["GE"] == pytest.approx(np.mean([text.ngram_entropy(t) for t in gen0]))
    corpus = ["unused", "Mxyzptlk is a city", "the city of Mxyzptlk"]
    assert c0["RS"] == pytest.approx(text.Tfidf(corpus).similarity(" ".join(gen0), " ".join(corpus[1:])))
    assert c1["RS"] is None and c1["GE"] is not None
    assert res["metrics"]["RS"]["n"] == 1 and res["metrics"]["GE"]["n"] == 2
    assert any("RS missing for 1" in n for n in res["notes"])
    assert set(summary(res)) == {"ES", "PS", "NS", "S", "EM", "PM", "NM", "GE", "RS"}


def test_real_generation_is_seeded(gpt2):
    model, tok = gpt2
    prompts = ["Michael Jordan is", "Marie Curie", "Michael Jordan is"]
    state = torch.random.get_rng_state()
    a = text.generate_texts(model, tok, prompts, max_length=10, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # caller's RNG untouched
    b = text.generate_texts(model, tok, prompts, max_length=10, seed=3)
    assert a == b and all(t.startswith(p) for t, p in zip(a, prompts))
    greedy = text.generate_texts(model, tok, prompts, max_length=10, top_k=0)
    assert greedy[0] == greedy[2]


# ---- zsRE ----------------------------------------------------------------------------------
ZSRE = [
    {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
     "pred": "Trinity College", "rephrase": "What university did Watts Humphrey take part in?",
     "alt": "Xanadu", "answers": ["Hugo Weaving"],
     "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving",
     "cond": "Trinity College >> Hugo Weaving || What university did Watts Humphrey attend?"},
    {"subject": "Marie Curie", "src": "Which city was Marie Curie born in?", "answers": ["Paris"],
     "rephrase": "", "alt": "Rome", "loc": "nq question: where is tokyo?", "loc_ans": "Japan"},
]


def test_zsre_token_accuracy_hand_case(gpt2):
    model, tok = gpt2
    space = tok(" Hugo")["input_ids"][0]  # 'Ġ' in this tokenizer: " Hugo Weaving" = Ġ H u go Ġ W e a v in g
    assert tok.convert_ids_to_tokens(space) == "Ġ"

    class Favour(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            logits = self.inner(**kw).logits.clone()
            logits[..., space] += 100.0
            return SimpleNamespace(logits=logits)

    res = evaluate(Favour(model), tok, ZSRE)
    assert res["kind"] == "zsre"
    c0, c1 = res["per_case"]
    t_ids = tok(" Hugo Weaving")["input_ids"]
    expected = [t == space for t in t_ids]
    assert sum(expected) == 2 and len(expected) == 11
    assert c0["efficacy_tokens_correct"] == expected and c0["efficacy"] == pytest.approx(2 / 11)
    assert c0["paraphrase"] == pytest.approx(2 / 11) and c0["specificity"] == pytest.approx(2 / 11)
    assert c0["specificity_prompts"][0]["prompt"].endswith("hacksaw ridge?")
    paris = tok(" Paris")["input_ids"]  # Ġ Paris → 1 of 2 tokens
    assert c1["efficacy"] == pytest.approx(sum(t == space for t in paris) / len(paris))
    assert c1["paraphrase"] is None  # empty rephrase → missing
    assert c1["specificity_prompts"][0]["prompt"] == "nq question: where is tokyo?"  # no doubled "?"
    assert res["metrics"]["paraphrase"]["n"] == 1
    e = np.array([c0["efficacy"], c1["efficacy"]]) * 100
    assert res["metrics"]["efficacy"]["mean"] == pytest.approx(e.mean())
    parts = [res["metrics"][k]["mean"] for k in ("efficacy", "paraphrase", "specificity")]
    assert res["metrics"]["score"]["mean"] == pytest.approx(3 / sum(1 / p for p in parts))
    assert list(summary(res)) == ["efficacy", "paraphrase", "specificity", "score"]


def test_zsre_against_reference_and_alt_target(gpt2):
    model, tok = gpt2
    res = evaluate(model, tok, ZSRE[:1], zsre_target="alt")
    case = res["per_case"][0]
    assert case["target"] == "Xanadu"
    _, _, hits = ref_score(model, tok, ZSRE[0]["src"], "Xanadu")
    assert case["efficacy_tokens_correct"] == hits
    _, _, hits = ref_score(model, tok, ZSRE[0]["loc"] + "?", "Hugo Weaving")
    assert case["specificity_tokens_correct"] == hits
    with pytest.raises(ValueError, match='record 0, field "alt"'):
        evaluate(model, tok, [{k: v for k, v in ZSRE[0].items() if k != "alt"}], zsre_target="alt")


# ---- loading -------------------------------------------------------------------------------
def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_load_records_kinds(tmp_path):
    kind, recs = load_records(_write(tmp_path, "cf.json", RECORDS))
    assert kind == "counterfact" and len(recs) == 3
    kind, recs = load_records(_write(tmp_path, "zsre.json", ZSRE))
    assert kind == "zsre" and len(recs) == 2


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r[1]["requested_rewrite"].pop("target_true"), r'record 1, field "requested_rewrite.target_true"'),
    (lambda r: r[2].__setitem__("paraphrase_prompts", "not a list"), r'record 2, field "paraphrase_prompts"'),
    (lambda r: r[0]["neighborhood_prompts"].__setitem__(1, 7), r'record 0, field "neighborhood_prompts\[1\]"'),
    (lambda r: r[1]["requested_rewrite"].__setitem__("prompt", "no slot"), r'record 1, field "requested_rewrite.prompt"'),
    (lambda r: r[2]["requested_rewrite"]["target_new"].__setitem__("str", 3), r'record 2, field "requested_rewrite.target_new.str"'),
    (lambda r: r.__setitem__(1, "text"), r"record 1: expected an object"),
])
def test_malformed_counterfact(tmp_path, mutate, match):
    recs = json.loads(json.dumps(RECORDS))
    mutate(recs)
    path = _write(tmp_path, "bad_cf.json", recs)
    with pytest.raises(ValueError, match=match) as err:
        load_records(path)
    assert "bad_cf.json" in str(err.value)


def test_malformed_zsre_and_files(tmp_path):
    recs = json.loads(json.dumps(ZSRE))
    recs[1]["answers"] = []
    with pytest.raises(ValueError, match=r'zs.json, record 1, field "answers": is an empty list'):
        load_records(_write(tmp_path, "zs.json", recs))
    recs = json.loads(json.dumps(ZSRE))
    del recs[0]["loc_ans"]
    with pytest.raises(ValueError, match=r'record 0, field "loc_ans"'):
        load_records(_write(tmp_path, "zs.json", recs))
    with pytest.raises(ValueError, match="expected a JSON list"):
        load_records(_write(tmp_path, "obj.json", {"a": 1}))
    with pytest.raises(ValueError, match="invalid JSON"):
        load_records(_write(tmp_path, "broken.json", "[{"))
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_records(_write(tmp_path, "other.json", [{"foo": 1}]))


# ---- CLI -----------------------------------------------------------------------------------
@pytest.fixture
def only_existing_commands(monkeypatch):
    present = tuple(n for n in massedit.cli.COMMANDS if importlib.util.find_spec(f"massedit.commands.{n}"))
    monkeypatch.setattr(massedit.cli, "COMMANDS", present)


def test_cli_end_to_end(gpt2, tmp_path, capsys, only_existing_commands):
    model, tok = gpt2
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = _write(tmp_path, "cf.json", RECORDS)
    out = tmp_path / "out" / "metrics.json"
    code = massedit.cli.main(["eval", "--model", str(model_dir), "--data", str(data), "--json", str(out),
                            "--device", "cpu", "--model-dtype", "float32", "--batch-size", "4", "--limit", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "95% CI" in printed and "ES" in printed and "NM" in printed
    got = json.loads(out.read_text())
    assert {"ES", "PS", "NS", "S", "EM", "PM", "NM", "details"} <= set(got)
    direct = summary(evaluate(model, tok, RECORDS[:2]))
    for k, v in direct.items():
        assert got[k] == pytest.approx(v, abs=1e-4)
    assert got["details"]["n_cases"] == 2

    # user errors: one line, exit 2
    bad = json.loads(json.dumps(RECORDS))
    del bad[1]["requested_rewrite"]["subject"]
    code = massedit.cli.main(["eval", "--model", str(model_dir), "--data", str(_write(tmp_path, "bad.json", bad))])
    err = capsys.readouterr().err
    assert code == 2 and "record 1" in err and "requested_rewrite.subject" in err
    code = massedit.cli.main(["eval", "--model", str(tmp_path / "nope"), "--data", str(data)])
    assert code == 2 and "model directory" in capsys.readouterr().err


def test_bench_eval_smoke(tmp_path):
    """The evaluation benchmark runs and its batched and one-at-a-time log-probs agree."""
    from benchmarks import eval_speed
    from massedit.world.build import build_world

    world = tmp_path / "world"
    build_world(world, quick=True, threads=1)
    report = eval_speed.main(["--world", str(world), "--cases", "5", "--out", str(tmp_path / "r.json")])
    assert report["pairs"] > 0 and report["batched_s"] > 0 and report["one_at_a_time_s"] > 0
