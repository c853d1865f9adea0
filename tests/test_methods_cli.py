"""The method registry (massedit.methods) and the sequential CLI: a method registered here plugs
into `massedit edit` without touching the editor; `massedit edit --ledger` and `massedit ledger`."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import massedit.cli as cli
from massedit.edits.delta import WeightDelta
from massedit.editor import MassEditor
from massedit.edits.ledger import Ledger
from massedit.methods import METHODS, EditMethod, get_method, register_method
from massedit.compute.targets import ZResult
from test_cli_edit import Files, _edit_argv, _save_model
from tiny import make_model


class RankOne(EditMethod):
    """Adds 1e-3 · 1 eᵢᵀ to the first edited layer's rewrite weight, i = number of requests."""

    name = "test-rank-one"

    def layer_solvers(self, editor, preserved=None):
        return {}

    def compute(self, editor, requests, templates, solvers, timings, batch_size):
        layout, layer = editor.layout, editor.hp.layers[0]
        d_out, d_in = layout.hidden_size, layout.key_dim(layer)
        v = torch.zeros(d_in, 1)
        v[len(requests), 0] = 1.0
        wd = WeightDelta(layout.rewrite_weight_name(layer), torch.full((d_out, 1), 1e-3), v,
                         layout.rewrite_is_conv1d(layer))
        n = len(requests)
        return [wd], ZResult(torch.zeros(n, d_out), torch.zeros(n, d_out), torch.zeros(n), torch.zeros(n, dtype=torch.long))


@pytest.fixture
def rank_one():
    register_method(RankOne)
    yield RankOne
    METHODS.pop(RankOne.name)


def test_registry_names_and_unknown_method():
    assert {"memit", "memit-serial", "memit-preserve", "alphaedit", "rome"} <= set(METHODS)
    assert get_method("rome").hparams_family == "rome"
    with pytest.raises(ValueError, match="unknown method 'nope'; choose one of memit"):
        get_method("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_method(type("Other", (RankOne,), {"name": "memit"}))


def test_a_registered_method_plugs_into_the_cli_and_the_editor(rank_one, tmp_path, capsys):
    model_dir = _save_model("gpt2", tmp_path)
    files = Files(tmp_path)
    assert cli.main(_edit_argv(model_dir, files, "--method", "test-rank-one")) == 0, capsys.readouterr().err
    report = json.loads((files.out / "report.json").read_text())
    assert report["method"] == "test-rank-one" and report["n_edits"] == 3
    base = dict(AutoModelForCausalLM.from_pretrained(model_dir).named_parameters())
    edited = dict(AutoModelForCausalLM.from_pretrained(files.out).named_parameters())
    name = "transformer.h.1.mlp.c_proj.weight"  # Conv1D: [d_ff, d_model]; row 3 gets 1e-3
    diff = (edited[name] - base[name]).detach()
    assert torch.allclose(diff[3], torch.full_like(diff[3], 1e-3), atol=1e-6) and diff[4:].abs().max() == 0
    model, tok = make_model("gpt2")
    editor = MassEditor(model, tok, stats_dir=tmp_path / "none", progress=False, context_templates=[["{}"]])
    assert editor.edit([{"subject": "Sony", "prompt": "{} is", "target_new": "Nokia"}], method="test-rank-one").method == "test-rank-one"


def test_edit_in_rounds_with_a_ledger_then_list_verify_revert(tmp_path, capsys):
    model_dir = _save_model("gpt2", tmp_path)
    files = Files(tmp_path)
    ledger = tmp_path / "ledger"
    argv = _edit_argv(model_dir, files, "--method", "alphaedit", "--ledger", str(ledger), "--round-size", "1")
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert len(Ledger(ledger)) == 3
    capsys.readouterr()
    assert cli.main(["ledger", "list", "--ledger", str(ledger)]) == 0
    listing = capsys.readouterr().out
    assert "alphaedit" in listing and listing.count("round ") == 3
    assert cli.main(["ledger", "verify", "--ledger", str(ledger), "--model", str(files.out)]) == 0
    assert cli.main(["ledger", "verify", "--ledger", str(ledger), "--model", str(model_dir)]) == 1
    assert "without the rounds" in capsys.readouterr().err
    # running the same command again finds every round done and runs none
    files.out = tmp_path / "out-again"
    assert cli.main(_edit_argv(model_dir, files, "--method", "alphaedit", "--ledger", str(ledger), "--round-size", "1")) == 0
    assert "3 of 3 round(s) already recorded" in capsys.readouterr().out
    reverted = tmp_path / "minus-two"
    assert cli.main(["ledger", "revert", "--ledger", str(ledger), "--last", "2", "--model", str(files.out),
                     "--out", str(reverted)]) == 0
    assert len(Ledger(ledger)) == 1
    assert cli.main(["ledger", "verify", "--ledger", str(ledger), "--model", str(reverted)]) == 0


@pytest.mark.parametrize("args,message", [
    (["--round-size", "2"], "--round-size needs --ledger"),
    (["--ledger", "LEDGER", "--method", "memit"], "records rounds of 'alphaedit'"),
])
def test_round_errors_are_one_line(args, message, tmp_path, capsys):
    model_dir = _save_model("gpt2", tmp_path)
    files = Files(tmp_path)
    ledger = tmp_path / "ledger"
    if "LEDGER" in args:
        assert cli.main(_edit_argv(model_dir, files, "--method", "alphaedit", "--ledger", str(ledger))) == 0
        files.out = tmp_path / "out2"
    capsys.readouterr()
    args = [str(ledger) if a == "LEDGER" else a for a in args]
    assert cli.main(_edit_argv(model_dir, files, *args)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_ledger_command_errors_name_the_problem(tmp_path, capsys):
    """`massedit ledger` on a directory that is no ledger, on a damaged ledger.json, and a revert
    into a non-empty --out (ledger revert has no --force): one line that says what is wrong."""
    model_dir = _save_model("gpt2", tmp_path)
    files = Files(tmp_path)
    ledger = tmp_path / "ledger"
    assert cli.main(_edit_argv(model_dir, files, "--ledger", str(ledger))) == 0, capsys.readouterr().err
    capsys.readouterr()

    def one_line(argv, message):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err

    one_line(["ledger", "list", "--ledger", str(model_dir)], "holds no ledger (no ledger.json)")
    one_line(["ledger", "revert", "--ledger", str(ledger), "--last", "1", "--model", str(files.out),
              "--out", str(model_dir)], "not empty; ledger revert writes a new directory")
    (ledger / "ledger.json").write_text("{")
    one_line(["ledger", "list", "--ledger", str(ledger)], f"{ledger / 'ledger.json'}: not valid JSON")
