"""Issue 20's acceptance: a method with a hyperparameter key of its own is one file (this one) and runs
through the CLI with an hparams file carrying that key; a Llama-like family is one table line."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

import massedit.cli as cli
from massedit import MassEditor
from massedit.hparams import METHOD_HPARAMS, MEMITHyperParams, above, default_for, hparam, load_hparams, preset
from massedit.methods import METHODS, register_method
from massedit.methods.memit import Memit
from massedit.model.arch import REGISTRY
from test_cli_edit import HPARAMS, Files, _edit_argv, _save_model
from tiny import make_model, make_requests

pytestmark = pytest.mark.filterwarnings("ignore:.*did not converge", "ignore:.*not positive definite",
                                        "ignore:.*fewer than the .* samples asked")


@dataclass
class ScaledHyperParams(MEMITHyperParams):
    my_scale: float = hparam(1.0, check=above(0, "the factor MEMIT's update is scaled by"))


class ScaledMemit(Memit):
    """MEMIT with its update scaled by the hparams key "my_scale"."""

    name = "test-scaled-memit"
    hparams_class = ScaledHyperParams
    scales: list = []

    def compute(self, editor, requests, templates, solvers, timings, batch_size):
        scale = self.hparams(editor).my_scale
        type(self).scales.append(scale)
        weights, z = super().compute(editor, requests, templates, solvers, timings, batch_size)
        for w in weights:
            w.u.mul_(scale)
        return weights, z


@pytest.fixture
def scaled():
    register_method(ScaledMemit)
    ScaledMemit.scales.clear()
    yield ScaledMemit
    METHODS.pop(ScaledMemit.name)
    METHOD_HPARAMS.pop(ScaledMemit.name)


def test_a_registered_method_reads_its_own_key_from_the_cli_hparams_file(scaled, tmp_path, capsys):
    model_dir = _save_model("gpt2", tmp_path)
    files = Files(tmp_path, hparams={**HPARAMS, "my_scale": 0.5})
    assert cli.main(_edit_argv(model_dir, files, "--method", scaled.name)) == 0, capsys.readouterr().err
    assert scaled.scales == [0.5]
    report = json.loads((files.out / "report.json").read_text())
    assert report["method"] == scaled.name and report["hparams"]["my_scale"] == 0.5
    assert isinstance(load_hparams(files.hparams), ScaledHyperParams)

    # the key is checked and spelled like every other one
    for i, (key, words) in enumerate((("my_scale", ['"my_scale"', "must be > 0", "scaled by"]),
                                      ("my_scal", ['"my_scal"', 'did you mean "my_scale"']))):
        (tmp_path / f"bad{i}").mkdir()
        bad = Files(tmp_path / f"bad{i}", hparams={**HPARAMS, key: 0})
        capsys.readouterr()
        assert cli.main(_edit_argv(model_dir, bad, "--method", scaled.name)) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and all(w in err[0] for w in words), err


def test_the_method_gets_its_default_where_the_hparams_lack_its_key(scaled, tmp_path):
    model, tok = make_model("gpt2")
    hp = default_for(model.config).replace(layers=[1, 2], v_num_grad_steps=2)
    assert type(hp) is MEMITHyperParams and hp.replace(my_scale=2.0).my_scale == 2.0
    editor = MassEditor(model, tok, hp, stats_dir=tmp_path, corpus=["the a of in is", "Paris London Berlin"],
                        context_templates=[["{}"]], progress=False)
    editor.edit(make_requests(2), method=scaled.name, apply=False)
    assert scaled.scales == [1.0]


def test_a_llama_like_family_is_one_table_line(monkeypatch, tmp_path):
    monkeypatch.setitem(REGISTRY, "my_llama", REGISTRY["llama"])  # the line
    model, tok = make_model("llama")
    model.config.model_type = "my_llama"
    hp = default_for(model.config)
    llama = preset("llama-7b")
    assert (hp.clamp_norm_factor, hp.v_weight_decay, hp.v_num_grad_steps) == (
        llama.clamp_norm_factor, llama.v_weight_decay, llama.v_num_grad_steps)  # the family's defaults
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    editor = MassEditor(model, tok, hp.replace(layers=[1, 2], mom2_n_samples=4, mom2_update_weight=1.0),
                        stats_dir=tmp_path, corpus=["the a of in is", "Paris London Berlin", "I you it", "sport"],
                        context_templates=[["{}"]], progress=False)
    assert editor.layout.model_type == "my_llama"
    result = editor.edit(make_requests(3))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"model.layers.{l}.mlp.down_proj.weight" for l in (1, 2)} and result.n_edits == 3


def test_a_key_is_declared_once():
    @dataclass
    class Clashing(MEMITHyperParams):
        L2: float = 1.0  # AlphaEdit's

    class Undecorated(MEMITHyperParams):
        my_scale: float = 1.0

    for hparams_class, error, words in ((Clashing, ValueError, "already declared by AlphaEditHyperParams"),
                                        (Undecorated, TypeError, "@dataclass")):
        method = type("Other", (Memit,), {"name": "test-other", "hparams_class": hparams_class})
        with pytest.raises(error, match=words):
            register_method(method)
        assert "test-other" not in METHODS and "test-other" not in METHOD_HPARAMS
