"""Smoke test of `python -m benchmarks.real` on a tiny Llama with facts from the real-facts builder
(a stub knowledge check that knows every fact): trace, layers, MEMIT at two sizes, ROME, corpora."""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks import real
from massedit.commands._common import REAL_MODEL_CORPUS
from massedit.inputs.facts import build_facts
from test_facts import oracle
from tiny import make_model


def _facts(tmp_path: Path) -> Path:
    built = build_facts(oracle(), relations=("P36", "P30"), max_per_relation=4, model="tiny")
    built.write(tmp_path / "facts")
    return tmp_path / "facts"


def test_real_benchmark_smoke(tmp_path, capsys, monkeypatch):
    import massedit.inputs.corpus as corpus

    monkeypatch.setattr(corpus, "SAMPLED_DOCS", 6)  # the model-written corpus, small for a smoke test
    model, tok = make_model("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    facts = _facts(tmp_path)
    n_records = len(json.loads((facts / "counterfact.json").read_text()))
    out = tmp_path / "real.json"
    assert real.main(["--model", str(tmp_path / "model"), "--facts", str(facts), "--n", "2,max", "--trace", "2",
                      "--trace-full", "1", "--trace-samples", "2", "--span", "2", "--rome", "2", "--corpora", "--corpora-n", "2",
                      "--samples", "40", "--stats-dir", str(tmp_path / "stats"), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["facts"]["records"] == n_records
    trace = data["trace"]
    assert trace["facts"] == 2 and len(trace["suggested_layers"]) == 2
    assert trace["full"]["facts"] == 1 and len(trace["full"]["heatmaps"]) == 3
    assert all(Path(p).exists() for p in trace["full"]["heatmaps"])
    # One z phase, for the largest n; the smaller n solves again from the first n of its z.
    largest, smaller = data["memit"]
    assert (largest["n"], smaller["n"]) == (n_records, 2)
    assert largest["timings"]["z"] > 0 and "z" not in smaller["timings"] and str(n_records) in smaller["z"]
    assert smaller["pre"] != largest["pre"] or n_records == 2
    for row in data["memit"]:
        assert {"ES", "PS", "NS"} <= set(row["pre"]) and {"ES", "PS", "NS"} <= set(row["post"])
        assert {"reach_mean", "reach_median", "reach_below_half", "miss_mean"} <= set(row["reach"])
    # Where the damage is: each relation's count and metrics, before and after.
    by_rel = largest["post"]["by_relation"]
    assert set(by_rel) == {"P36", "P30"} and sum(r["n"] for r in by_rel.values()) == n_records
    assert set(largest["pre"]["by_relation"]) == set(by_rel) and {"ES", "PS", "NS"} <= set(by_rel["P36"])
    flops = largest["z_flops"]
    assert flops["path"] == "prefix" and flops["flops"] > flops["flops_record"] > 0
    assert 0 < flops["fraction_of_matmul"] and flops["cpu_matmul_flops_per_s"] > 0
    assert data["rome"]["n"] == 2 and len(data["rome"]["layer"]) == 1
    corpora = data["corpora"]
    assert set(corpora) == {"pydoc", "sampled", "pydoc+sampled"}
    # The default corpus edits; the others solve again from its z with their own statistics.
    assert corpora[REAL_MODEL_CORPUS]["timings"]["z"] > 0 and "z" not in corpora[REAL_MODEL_CORPUS]
    for other in set(corpora) - {REAL_MODEL_CORPUS}:
        assert corpora[other]["z"] == "reused" and corpora[other]["corpus"] == other
        assert corpora[other]["timings"]["statistics"] > 0 and {"ES", "PS", "NS"} <= set(corpora[other]["post"])
    assert {p.name for p in (tmp_path / "stats").glob("*/*_stats")} == {"pydoc_stats", "sampled_stats",
                                                                         "pydoc+sampled_stats"}
    printed = capsys.readouterr().out
    assert "known facts" in printed and "ES pre→post" in printed and "by relation (MEMIT layers" in printed


def test_a_lam_sweep_solves_again_from_the_same_z(tmp_path):
    """At the same λ the re-solved row must score exactly as the edit it reuses z from; a λ far larger
    writes less, so ES cannot rise."""
    model, tok = make_model("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    facts = _facts(tmp_path)
    out = tmp_path / "real.json"
    argv = ["--model", str(tmp_path / "model"), "--facts", str(facts), "--n", "4", "--trace", "0", "--layers", "1,2",
            "--lam", "50,50,1e9", "--corpus", "pydoc", "--samples", "40", "--stats-dir", str(tmp_path / "stats"),
            "--out", str(out)]
    assert real.main(argv) == 0
    rows = json.loads(out.read_text())["memit"]
    assert [r["lam"] for r in rows] == [50, 50, 1e9] and rows[1]["z"] == "reused"
    assert rows[1]["post"] == rows[0]["post"]
    assert rows[2]["post"]["ES"] <= rows[0]["post"]["ES"]
    assert rows[2]["post"] != rows[0]["post"]
    # How far h^L moved toward z: the same for the same λ, next to nothing for a λ that writes nothing.
    assert rows[1]["reach"] == rows[0]["reach"]
    assert abs(rows[2]["reach"]["reach_mean"]) < 0.05 < rows[0]["reach"]["reach_mean"]
    assert rows[2]["reach"]["miss_mean"] > rows[0]["reach"]["miss_mean"]


def test_rows_measured_before_a_failure_are_kept(tmp_path, monkeypatch):
    """The JSON is written after every row: a run stopped during its second λ keeps its first."""
    import pytest

    model, tok = make_model("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "real.json"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(real, "_resolve", stopped)
    with pytest.raises(KeyboardInterrupt):
        real.main(["--model", str(tmp_path / "model"), "--facts", str(_facts(tmp_path)), "--n", "2", "--trace", "0",
                   "--layers", "1,2", "--lam", "50,500", "--corpus", "pydoc", "--samples", "40",
                   "--stats-dir", str(tmp_path / "stats"), "--out", str(out)])
    rows = json.loads(out.read_text())["memit"]
    assert [(r["n"], r["lam"]) for r in rows] == [(2, 50)] and {"ES", "PS", "NS"} <= set(rows[0]["post"])


def test_lam_that_is_not_a_number_is_one_line(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        real.main(["--model", "x", "--lam", "1000,abc"])
    assert "--lam: a number or comma-separated numbers" in capsys.readouterr().err


def test_stored_z_scores_as_the_run_that_stored_it_and_changed_z_settings_miss(tmp_path, capsys):
    """--z-cache: a second run with the same z settings reuses the stored z (no z phase) and scores
    exactly as the first; a run with fewer layers below the same z layer or another λ reuses it too;
    another clamp, or facts with another target, is a miss and runs its own z phase."""
    model, tok = make_model("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    facts = _facts(tmp_path)
    cache = tmp_path / "z"

    def run(name, *extra, facts_dir=facts):
        out = tmp_path / f"{name}.json"
        assert real.main(["--model", str(tmp_path / "model"), "--facts", str(facts_dir), "--n", "4", "--trace", "0",
                          "--corpus", "pydoc", "--samples", "40", "--stats-dir", str(tmp_path / "stats"),
                          "--z-cache", str(cache), "--out", str(out), "--layers", "1,2", *extra]) == 0
        return json.loads(out.read_text())["memit"][0]

    first = run("first")
    assert first["timings"]["z"] > 0 and len(list(cache.glob("*.pt"))) == 1
    again = run("again")
    assert "z" not in again["timings"] and again["z"].startswith("stored:")
    assert again["post"] == first["post"] and again["reach"] == first["reach"]
    assert again["z_loss_mean"] == first["z_loss_mean"]
    assert "stored:" in run("one-layer", "--layers", "2")["z"]  # z is found at layer 2 either way
    assert "stored:" in run("lam", "--lam", "7")["z"]
    assert run("clamp", "--clamp", "0.5")["timings"]["z"] > 0
    records = json.loads((facts / "counterfact.json").read_text())
    records[0]["requested_rewrite"]["target_new"]["str"] = records[1]["requested_rewrite"]["target_true"]["str"]
    other = tmp_path / "other-facts"
    other.mkdir()
    (other / "counterfact.json").write_text(json.dumps(records))
    assert run("other-facts", facts_dir=other)["timings"]["z"] > 0
    assert len(list(cache.glob("*.pt"))) == 3
    # Any stored subset, in any order, is a hit: z does not depend on the other requests.
    records = json.loads((facts / "counterfact.json").read_text())
    subset = tmp_path / "subset"
    subset.mkdir()
    (subset / "counterfact.json").write_text(json.dumps([records[3], records[1]]))
    picked = run("subset", "--n", "max", facts_dir=subset)
    assert "stored:" in picked["z"] and picked["n"] == 2


def test_shift_compares_the_chosen_layers_with_the_span_moved_earlier_and_later(tmp_path, capsys):
    """--shift K: the chosen span (solved again from the main run's z), the span K layers earlier and
    K later (each its own z, stored), scored on the same --shift-n facts; a span that would leave the
    model is left out."""
    from massedit.model.arch import ModelLayout

    model, tok = make_model("llama")
    n_layers = ModelLayout(model).n_layers
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out, cache = tmp_path / "real.json", tmp_path / "z"
    assert real.main(["--model", str(tmp_path / "model"), "--facts", str(_facts(tmp_path)), "--n", "4", "--trace", "0",
                      "--layers", "1,2", "--shift", "1", "--shift-n", "3", "--corpus", "pydoc", "--samples", "40",
                      "--stats-dir", str(tmp_path / "stats"), "--z-cache", str(cache), "--out", str(out)]) == 0
    ranges = json.loads(out.read_text())["layer_ranges"]
    assert {k: r["layers"] for k, r in ranges.items()} == {"chosen": [1, 2], "earlier": [0, 1], "later": [2, 3]}
    assert n_layers == 4
    assert ranges["chosen"]["z"] == "the first 3 of the n = 4 run's"
    for label in ("earlier", "later"):
        assert ranges[label]["timings"]["z"] > 0 and {"ES", "PS", "NS"} <= set(ranges[label]["post"])
    assert sorted(p.name.split("-")[2] for p in cache.glob("*.pt")) == ["L1", "L2", "L3"]
    assert "earlier: layers [0, 1]" in capsys.readouterr().out
    assert real._shifted([0, 1], 2, 4) == {"later": [2, 3]}


def test_at_most_per_object_keeps_order_and_caps_each_relation_and_true_object():
    def rec(rel, true, subject):
        return {"requested_rewrite": {"relation_id": rel, "target_true": {"str": true}, "subject": subject}}

    records = [rec("P17", "China", "a"), rec("P17", "China", "b"), rec("P30", "Asia", "c"), rec("P17", "China", "d"),
               rec("P17", "India", "e"), rec("P30", "China", "f")]
    kept = real._at_most_per_object(records, 2)
    assert [r["requested_rewrite"]["subject"] for r in kept] == ["a", "b", "c", "e", "f"]


def test_max_per_object_below_one_is_one_line(capsys):
    import pytest

    with pytest.raises(SystemExit):
        real.main(["--model", "x", "--max-per-object", "0"])
    assert "--max-per-object must be at least 1" in capsys.readouterr().err


def test_a_z_cache_that_is_a_file_is_one_line_before_loading(tmp_path, capsys):
    import pytest

    (tmp_path / "z").write_text("")
    with pytest.raises(SystemExit):
        real.main(["--model", "not-loaded", "--z-cache", str(tmp_path / "z")])
    assert "--z-cache" in (err := capsys.readouterr().err) and "a file, not a folder" in err
