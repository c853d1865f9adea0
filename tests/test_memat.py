"""MEMAT (issue 12, item 1): probes, head corrections folded into biases, the delta, the API and the CLI."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import make_model, make_requests

from massedit import MassEditor
from massedit.model.arch import ModelLayout
from massedit.edits.delta import HEADER_KEY, EditDelta, ParameterAdditions
from massedit.methods.memat.heads import fold_into_bias, head_corrections, head_outputs
from massedit.hparams import HParamsError
from massedit.methods.memat.method import Memat, MematHyperParams
from massedit.methods.memat.probes import fit_logistic
from massedit.inputs.requests import RequestError

pytestmark = pytest.mark.filterwarnings("ignore:.*did not converge", "ignore:.*not positive definite")

DOCS = ["the a of in is was plays sport", "Michael Jordan plays basketball.", "Paris London Berlin", "I you it"]


def _hp(**changes) -> MematHyperParams:
    values = dict(layers=[1], v_num_grad_steps=25, clamp_norm_factor=10, mom2_n_samples=4, mom2_update_weight=1.0,
                  memat_top_k=4, memat_batch_size=4, memat_epochs=2)
    return MematHyperParams(**{**values, **changes})


def _requests(n: int = 8):
    return [replace(r, case_id=i, target_true="Paris") for i, r in enumerate(make_requests(n))]


def _records(requests) -> list[dict]:
    return [{"case_id": r.case_id, "requested_rewrite": {"prompt": r.prompt, "subject": r.subject,
             "target_new": {"str": r.target_new}, "target_true": {"str": r.target_true}}} for r in requests]


def _editor(model, tok, tmp_path, **hp) -> MassEditor:
    return MassEditor(model, tok, _hp(**hp), stats_dir=tmp_path / "stats", corpus=DOCS, context_templates=[["{}"]],
                      progress=False)


def _logits(model, tok, text="Michael Jordan plays the sport of"):
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


# ------------------------------------------------------------------------------------------ probes


def _direct_logistic(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """scikit-learn's objective for one head, minimized with a plain torch L-BFGS loop."""
    theta = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=1000, tolerance_grad=1e-12, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        z = x @ theta[:-1] + theta[-1]
        loss = (torch.nn.functional.softplus(z) - y * z).sum() + (theta[:-1] ** 2).sum() / (2 * c)
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


@pytest.mark.parametrize("c", [1.0, 0.1])
def test_batched_probes_equal_one_head_at_a_time(c):
    torch.manual_seed(1)
    heads, n, d = 7, 60, 6
    y = (torch.rand(n) < 0.5).double()
    x = torch.randn(heads, n, d, dtype=torch.float64) + 0.8 * y[None, :, None] * torch.randn(heads, 1, d)
    x[3] *= 8  # a nearly separable head
    probes = fit_logistic(x.float(), y, c=c)
    for h in range(heads):
        theta = _direct_logistic(x[h].float().double(), y, c)
        assert torch.allclose(probes.weight[h], theta[:-1], atol=1e-4)
        assert abs(float(probes.bias[h]) - float(theta[-1])) < 1e-4
    acc = probes.accuracy(x, y)
    assert acc.shape == (heads,) and float(acc.min()) >= 0.5


# ------------------------------------------------------------------------------------------ heads and bias


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_bias_gives_the_logits_of_omega_at_every_position_and_heads_of_a_layer_sum(model_type):
    model, tok = make_model(model_type)
    layout = ModelLayout(model)
    heads = [(1, 0), (1, 2), (2, 3)]
    omega = torch.randn(len(heads), layout.head_dim) * 0.5
    base = _logits(model, tok)
    with head_corrections(layout, heads, omega):
        hooked = _logits(model, tok)
    # every position, the first one included, sees the correction (not only the last column)
    assert bool(((hooked - base).abs().amax(dim=-1) > 1e-5).all())
    found = layout.attn_out_bias_additions()
    additions = None if found is None else ParameterAdditions(found[1], found[0])
    delta = EditDelta(fold_into_bias(model, layout, heads, omega), additions=additions)
    delta.apply(model)
    assert torch.allclose(_logits(model, tok), hooked, atol=1e-5)
    delta.revert(model)
    assert torch.equal(_logits(model, tok), base)

    both = fold_into_bias(model, layout, heads[:2], omega[:2])[0].dense()
    alone = [fold_into_bias(model, layout, [h], omega[k : k + 1])[0].dense() for k, h in enumerate(heads[:2])]
    assert both.shape == (layout.hidden_size,)
    assert torch.allclose(both, alone[0] + alone[1], atol=1e-12) and not torch.allclose(both, alone[1])


def test_head_outputs_are_the_slices_of_the_output_projection_input():
    model, tok = make_model("gpt2")
    layout = ModelLayout(model)
    texts = ["Michael Jordan plays", "the a of in is was plays sport"]
    out = head_outputs(model, layout, tok, texts, batch_size=2)
    assert out.shape == (layout.n_layers, layout.n_heads, 2, layout.head_dim)
    one = head_outputs(model, layout, tok, texts[1:], batch_size=1)
    assert torch.allclose(out[:, :, 1], one[:, :, 0], atol=1e-5)  # padding does not change a text's heads


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "qwen2"])
def test_memat_runs_end_to_end_and_reports_its_phases(model_type, tmp_path):
    model, tok = make_model(model_type)
    base, reqs = _state(model), _requests()
    editor = _editor(model, tok, tmp_path)
    result = editor.edit(reqs, method=Memat(_records(reqs)), apply=False)
    assert _same_state(model, base)  # MEMIT's deltas were applied for the features and taken off again
    report = json.loads(json.dumps(result.report()))
    details, layout = report["details"], editor.layout
    for phase in ("memit", "z", "memat_features", "memat_probes", "memat_omega"):
        assert report["timings"][phase] >= 0
    assert len(details["probe_accuracy"]) == layout.n_layers
    assert all(len(row) == layout.n_heads for row in details["probe_accuracy"])
    assert len(details["heads"]) == 4 and len({tuple(h) for h in details["heads"]}) == 4
    assert details["best_val_accuracy"] == max(max(row) for row in details["probe_accuracy"])
    chosen = [details["probe_accuracy"][l][h] for l, h in details["heads"]]
    assert min(chosen) >= sorted(a for row in details["probe_accuracy"] for a in row)[-4]
    for norm, a0 in zip(details["omega_norms"], details["a0_norms"]):
        assert 0 < norm <= 0.75 * a0 * (1 + 1e-5)
    assert details["reloadable"] == (model_type != "qwen2")
    biases = [wd for wd in result.delta.weights if wd.vector]
    assert {wd.name for wd in biases} == {f"{layout.attn_out_name(l)}.bias" for l, _ in details["heads"]}
    assert (result.delta.additions is None) == (model_type == "gpt2")

    result.delta.apply(model)
    assert not _same_state(model, base)
    result.delta.revert(model)
    assert _same_state(model, base)


def test_memat_delta_reverts_bit_for_bit_and_survives_save_load_apply(tmp_path):
    model, tok = make_model("llama")
    base, base_config = _state(model), model.config.to_dict()
    reqs = _requests()
    result = _editor(model, tok, tmp_path).edit(reqs, method=Memat(_records(reqs)))
    edited = _logits(model, tok)
    assert model.config.attention_bias is True
    result.delta.save(tmp_path / "d.safetensors")
    result.delta.revert(model)
    assert _same_state(model, base) and model.config.to_dict() == base_config
    loaded = EditDelta.load(tmp_path / "d.safetensors")
    loaded.apply(model)
    assert torch.equal(_logits(model, tok), edited)
    loaded.revert(model)
    assert _same_state(model, base)


def test_save_pretrained_reloads_llama_with_the_correction(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = make_model("llama")
    assert model.model.layers[0].self_attn.o_proj.bias is None
    reqs = _requests()
    _editor(model, tok, tmp_path).edit(reqs, method=Memat(_records(reqs)))
    model.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager")
    assert torch.equal(_logits(reloaded, tok), _logits(model, tok))
    assert any(bool(reloaded.model.layers[l].self_attn.o_proj.bias.any()) for l in range(4))


def test_version_2_delta_files_still_load(tmp_path):
    model, tok = make_model("gpt2")
    result = _editor(model, tok, tmp_path).edit(make_requests(2), method="memit", apply=False)
    path = tmp_path / "v3.safetensors"
    result.delta.save(path)
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[HEADER_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header["format_version"] = 2
    header.pop("additions")
    for entry in header["weights"]:
        entry.pop("vector")
    save_file(tensors, str(tmp_path / "v2.safetensors"), metadata={HEADER_KEY: json.dumps(header)})
    old = EditDelta.load(tmp_path / "v2.safetensors")
    assert old.additions is None and not any(wd.vector for wd in old.weights)
    old.apply(model)
    assert old.is_applied(model)


# ------------------------------------------------------------------------------------------ errors


def test_bad_records_and_hparams_are_one_line_errors(tmp_path):
    model, tok = make_model("gpt2")
    reqs = _requests(3)
    editor = _editor(model, tok, tmp_path)
    with pytest.raises(RequestError, match="needs the second-language records"):
        editor.edit(reqs, method="memat")
    with pytest.raises(RequestError, match="case_id 2 has no record"):
        editor.edit(reqs, method=Memat(_records(reqs)[:2]))
    with pytest.raises(RequestError, match="repeats an earlier record"):
        Memat(_records(reqs) + _records(reqs)[:1])
    broken = _records(reqs)
    del broken[1]["requested_rewrite"]["target_true"]
    with pytest.raises((RequestError, ValueError), match="target_true"):
        Memat(broken)
    with pytest.raises(RequestError, match="memat_top_k"):
        _editor(model, tok, tmp_path, memat_top_k=17).edit(reqs, method=Memat(_records(reqs)))
    assert not (tmp_path / "stats").exists()  # refused before any statistics were computed
    for key, value in (("memat_lr", 0), ("memat_val_fraction", 1.0), ("memat_batch_size", 0)):
        with pytest.raises(HParamsError, match=key):
            _hp(**{key: value})


def _cli_files(tmp_path, model_type):
    model, tok = make_model(model_type)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    reqs = _requests(4)
    (tmp_path / "req.json").write_text(json.dumps(_records(reqs)))
    (tmp_path / "l2.json").write_text(json.dumps(_records(reqs)))
    (tmp_path / "short.json").write_text(json.dumps(_records(reqs)[:2]))
    (tmp_path / "hp.json").write_text(json.dumps({**_hp().to_dict(), "mom2_dataset": "tiny"}))
    (tmp_path / "ctx.json").write_text(json.dumps([["{}"]]))
    (tmp_path / "corpus.txt").write_text("\n".join(DOCS))
    return ["edit", "--model", str(tmp_path / "model"), "--requests", str(tmp_path / "req.json"), "--hparams",
            str(tmp_path / "hp.json"), "--corpus", str(tmp_path / "corpus.txt"), "--stats-dir", str(tmp_path / "st"),
            "--context-templates", str(tmp_path / "ctx.json"), "--quiet", "--out", str(tmp_path / "out")]


@pytest.mark.parametrize("extra, message", [
    (["--method", "memat"], "needs the second-language records"),
    (["--method", "memat", "--memat-records", "missing.json"], "no such file"),
    (["--method", "memat", "--memat-records", "{tmp}/short.json"], "case_id 2 has no record"),
    (["--method", "memit", "--memat-records", "{tmp}/l2.json"], "goes with --method memat"),
])
def test_cli_refuses_missing_or_mismatched_records(tmp_path, capsys, extra, message):
    from massedit.cli import main

    args = _cli_files(tmp_path, "gpt2") + [a.replace("{tmp}", str(tmp_path)) for a in extra]
    capsys.readouterr()
    assert main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "st").exists()


def test_cli_edits_with_memat_and_refuses_a_family_that_cannot_reload_the_bias(tmp_path, capsys):
    from massedit.cli import main

    args = _cli_files(tmp_path / "gpt2", "gpt2") + ["--method", "memat", "--memat-records",
                                                     str(tmp_path / "gpt2" / "l2.json")]
    assert main(args) == 0
    report = json.loads((tmp_path / "gpt2" / "out" / "report.json").read_text())
    assert len(report["details"]["heads"]) == 4 and "memat_omega" in report["timings"]
    assert any(w.get("vector") for w in json.loads(
        safe_open(str(tmp_path / "gpt2" / "out" / "delta.safetensors"), "pt").metadata()[HEADER_KEY])["weights"])

    args = _cli_files(tmp_path / "qwen2", "qwen2") + ["--method", "memat", "--memat-records",
                                                       str(tmp_path / "qwen2" / "l2.json")]
    capsys.readouterr()
    assert main(args) != 0
    assert "no config flag" in capsys.readouterr().err


# ------------------------------------------------------------------- z from an earlier MEMIT run


def test_memat_with_a_memit_runs_targets_skips_z_and_gives_the_same_delta(tmp_path, monkeypatch):
    """targets=: the MEMIT run's z, so MEMAT at several K optimizes z once; what it writes is the same,
    bit for bit, as MEMAT optimizing z itself, and MEMIT with the same targets gives MEMIT's delta."""
    from massedit.compute.targets import TargetOptimizer
    from massedit.methods.memit import Memit

    model, tok = make_model("llama")
    reqs = _requests()
    editor = _editor(model, tok, tmp_path)
    memit = editor.edit(reqs, method="memit", apply=False)
    own = editor.edit(reqs, method=Memat(_records(reqs)), apply=False)

    def no_z(*args, **kwargs):
        raise AssertionError("z was optimized again")

    monkeypatch.setattr(TargetOptimizer, "optimize", no_z)
    reused = editor.edit(reqs, method=Memat(_records(reqs), targets=memit), apply=False)
    assert [wd.name for wd in reused.delta.weights] == [wd.name for wd in own.delta.weights]
    assert all(torch.equal(a.dense(), b.dense()) for a, b in zip(reused.delta.weights, own.delta.weights))
    assert torch.equal(reused.z, memit.z) and torch.equal(reused.z_loss, memit.z_loss)
    again = editor.edit(reqs, method=Memit(targets=memit), apply=False)
    assert all(torch.equal(a.dense(), b.dense()) for a, b in zip(again.delta.weights, memit.delta.weights))


def test_targets_of_another_edit_are_refused_before_any_work(tmp_path):
    from massedit.methods.memit import Memit

    model, tok = make_model("llama")
    reqs = _requests()
    editor = _editor(model, tok, tmp_path)
    memit = editor.edit(reqs, method="memit", apply=False)
    with pytest.raises(RequestError, match="requests differ"):
        editor.edit(reqs[:-1], method=Memit(targets=memit), apply=False)
    other = _editor(model, tok, tmp_path, clamp_norm_factor=4)
    with pytest.raises(RequestError, match="z settings differ"):
        other.edit(reqs, method=Memit(targets=memit), apply=False)
    with pytest.raises(TypeError, match="EditResult"):
        Memit(targets=memit.z)
    # λ and the layers below the z layer do not reach z: those targets serve.
    _editor(model, tok, tmp_path, mom2_update_weight=5.0).edit(reqs, method=Memit(targets=memit), apply=False)
