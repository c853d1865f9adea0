"""ROME (massedit.methods.rome.update, DESIGN §3): the rank-one update against a direct computation, exact revert,
the one-layer rule, sequential semantics, and restoration on failure."""
import pytest
import torch

from massedit.edits.delta import EditDelta
from massedit.editor import METHODS, MassEditor
from massedit.hparams import HParamsError, MEMITHyperParams
from massedit.inputs.requests import EditRequest
from massedit.compute.stats import layer_covariances
from massedit.inputs.tokens import compose, encode_prompt, fill, target_ids
from tiny import _corpus, make_model

LAYER = 1
TEMPLATES = [["{}"], ["The a of the city. {}", "I speaks French and. {}"]]
REQ_A = EditRequest(subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="English")
REQ_B = EditRequest(subject="Michael Jordan", prompt="{} plays the sport of", target_new="chess")

REWRITE = {"gpt2": "transformer.h.{}.mlp.c_proj", "llama": "model.layers.{}.mlp.down_proj"}


def _hp(**kw):
    base = dict(layers=[LAYER], v_num_grad_steps=8, v_lr=0.5, v_loss_layer=3, v_weight_decay=0.5,
                clamp_norm_factor=4.0, kl_factor=0.0625, mom2_update_weight=100.0, mom2_n_samples=32)
    base.update(kw)
    return MEMITHyperParams(**base)


def _editor(model, tok, tmp_path, hp=None, corpus="default"):
    return MassEditor(model, tok, hp or _hp(), stats_dir=tmp_path / "stats",
                      corpus=_corpus() if corpus == "default" else corpus, context_templates=TEMPLATES,
                      progress=False)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    return all(torch.equal(snap[k], v) for k, v in model.state_dict().items())


def _rewrite(model, model_type):
    return model.get_submodule(REWRITE[model_type].format(LAYER))


def _w(model, model_type):
    """The rewrite weight as [d_model, d_ff] (GPT-2's Conv1D stores [d_ff, d_model]), float64."""
    w = _rewrite(model, model_type).weight.detach().double()
    return w.T if model_type == "gpt2" else w


def _bias(model, model_type):
    b = _rewrite(model, model_type).bias
    return b.detach().double() if b is not None else 0.0


@torch.no_grad()
def _io_at_subject(model, tok, model_type, template, subject):
    """(key, MLP output) at the subject's last token, read with hooks on the rewrite module."""
    enc = encode_prompt(tok, template, subject)
    got = {}
    mod = _rewrite(model, model_type)
    h1 = mod.register_forward_pre_hook(lambda m, args: got.__setitem__("k", args[0]))
    h2 = mod.register_forward_hook(lambda m, args, out: got.__setitem__("v", out))
    try:
        model(input_ids=torch.tensor([enc.ids]))
    finally:
        h1.remove()
        h2.remove()
    return got["k"][0, enc.subject_index].double(), got["v"][0, enc.subject_index].double()


def _mean_key(model, tok, model_type, req):
    """k̄: mean over each template group, then over groups (DESIGN §2.3)."""
    groups = [torch.stack([_io_at_subject(model, tok, model_type, compose(c, req.prompt), req.subject)[0]
                           for c in g]).mean(0) for g in TEMPLATES]
    return torch.stack(groups).mean(0)


def _target_nll(model, tok, req):
    text = fill(req.prompt, req.subject)[0]
    tgt = target_ids(tok, text, req.target_new)
    ids = list(tok(text)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids + tgt[:-1]])).logits[0].double(), -1)
    return -sum(float(logp[len(ids) - 1 + t, tgt[t]]) for t in range(len(tgt))) / len(tgt)


def test_rome_is_a_method():
    assert "rome" in METHODS


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_update_matches_direct_formula(tmp_path, model_type):
    model, tok = make_model(model_type)
    ed = _editor(model, tok, tmp_path)
    w0, b = _w(model, model_type), _bias(model, model_type)
    k0, m0 = _io_at_subject(model, tok, model_type, REQ_A.prompt, REQ_A.subject)
    k_bar = _mean_key(model, tok, model_type, REQ_A)
    nll_before = _target_nll(model, tok, REQ_A)

    res = ed.edit([REQ_A], method="rome")
    v_star = res.z[0].double()
    # C = E[k kᵀ] from the cached statistics, the covariance MEMIT uses too
    mom2, count = layer_covariances(model, ed.layout, tok, ed.hp, ed.stats_dir, ed.model_name)[LAYER]
    cov = mom2.double() / count

    # Δ = (v* − (W k0 + b)) (C⁻¹k̄)ᵀ / ((C⁻¹k̄)ᵀ k0): the reference's compute_u / compute_v.
    c_inv_k = torch.linalg.solve(cov, k_bar)
    expected = torch.outer(v_star - (w0 @ k0 + b), c_inv_k) / torch.dot(c_inv_k, k0)
    w1 = _w(model, model_type)
    torch.testing.assert_close(w1 - w0, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    # The edited module maps the prompt's key to v* exactly (float tolerance).
    torch.testing.assert_close(w1 @ k0 + b, v_star, rtol=1e-5, atol=1e-5 * float(v_star.abs().max()))
    # and v* moved away from the unedited MLP output, towards the target.
    assert float((v_star - m0).norm()) > 1e-3 * float(m0.norm())
    assert _target_nll(model, tok, REQ_A) < nll_before

    wd = res.delta.weights[0]
    assert wd.u.shape == (w0.shape[0], 1) and wd.v.shape == (w0.shape[1], 1)
    assert wd.transposed == (model_type == "gpt2")
    assert res.method == "rome" and res.delta.metadata["method"] == "rome"
    assert set(res.timings) >= {"z", "keys", "solve", "covariance", "total"}
    assert res.z_loss.shape == (1,)


def test_mean_constraint_maps_mean_key_to_target(tmp_path):
    """enable_random_prefix_keys (EasyEdit) / DESIGN §3's formula: the constraint is at k̄."""
    model, tok = make_model("gpt2")
    ed = _editor(model, tok, tmp_path, _hp(extras={"enable_random_prefix_keys": True}))
    k_bar = _mean_key(model, tok, "gpt2", REQ_A)
    res = ed.edit([REQ_A], method="rome")
    v_star = res.z[0].double()
    torch.testing.assert_close(_w(model, "gpt2") @ k_bar + _bias(model, "gpt2"), v_star,
                               rtol=1e-5, atol=1e-5 * float(v_star.abs().max()))


def test_target_is_mlp_output_plus_clamped_delta(tmp_path):
    """One Adam step with a huge lr is −lr·sign(g); the clamp then rescales δ to
    clamp_norm_factor·‖m‖ with m the MLP output (not the residual stream)."""
    model, tok = make_model("gpt2")
    hp = _hp(v_num_grad_steps=2, v_lr=1e3, kl_factor=0.0, v_weight_decay=0.0, clamp_norm_factor=0.5)
    ed = MassEditor(model, tok, hp, stats_dir=tmp_path / "stats", corpus=_corpus(), context_templates=[["{}"]],
                    progress=False)
    text = fill(REQ_A.prompt, REQ_A.subject)[0]
    enc = encode_prompt(tok, REQ_A.prompt, REQ_A.subject)
    tgt = target_ids(tok, text, REQ_A.target_new)
    # g = ∂NLL/∂δ for δ added to the MLP output at the subject token, by autograd here.
    delta = torch.zeros(model.config.n_embd, requires_grad=True)
    store = {}

    def hook(_m, _a, out):
        store["m"] = out[0, enc.subject_index].detach().double()
        out = out.clone()
        out[0, enc.subject_index] += delta
        return out

    handle = _rewrite(model, "gpt2").register_forward_hook(hook)
    try:
        logits = model(input_ids=torch.tensor([list(enc.ids) + tgt[:-1]])).logits[0]
    finally:
        handle.remove()
    logp = torch.log_softmax(logits, -1)
    nll = -sum(logp[len(enc.ids) - 1 + t, tgt[t]] for t in range(len(tgt))) / len(tgt)
    (g,) = torch.autograd.grad(nll, delta)
    model.zero_grad(set_to_none=True)

    res = ed.edit([REQ_A], method="rome", apply=False)
    d = res.z[0].double() - store["m"]
    torch.testing.assert_close(d.norm(), 0.5 * store["m"].norm(), rtol=1e-4, atol=0)
    big = g.abs() > 1e-3 * g.abs().max()
    assert torch.equal(torch.sign(d[big]), -torch.sign(g.double()[big]))
    assert int(res.z_steps[0]) == 1


def test_revert_is_bit_exact_and_delta_round_trips(tmp_path):
    model, tok = make_model("gpt2")
    ed = _editor(model, tok, tmp_path)
    ed.solvers()
    before = _snapshot(model)
    res = ed.edit([REQ_A, REQ_B], method="rome")
    assert not _same(model, before)
    edited = _snapshot(model)
    wd = res.delta.weights[0]
    assert wd.u.shape[1] == wd.v.shape[1] == 2  # one column per rank-one edit
    res.delta.save(tmp_path / "rome.safetensors")
    res.delta.revert(model)
    assert _same(model, before)
    loaded = EditDelta.load(tmp_path / "rome.safetensors")
    assert loaded.metadata["method"] == "rome" and not loaded.is_applied(model)
    fresh = EditDelta(loaded.weights, loaded.metadata)
    fresh.apply(model)
    assert _same(model, edited)
    fresh.revert(model)
    assert _same(model, before)


def test_multi_layer_hparams_is_a_clear_error(tmp_path):
    model, tok = make_model("gpt2")
    ed = _editor(model, tok, tmp_path, _hp(layers=[1, 2]))
    before = _snapshot(model)
    with pytest.raises(HParamsError, match=r"ROME edits exactly one layer, got \[1, 2\]"):
        ed.edit([REQ_A], method="rome")
    assert _same(model, before)
    assert not (tmp_path / "stats").exists()  # refused before any statistics were computed


def test_sequential_second_edit_sees_the_first(tmp_path):
    model, tok = make_model("gpt2")
    ed = _editor(model, tok, tmp_path)
    before = _snapshot(model)
    both = ed.edit([REQ_A, REQ_B], method="rome", apply=False)
    assert _same(model, before)

    alone_b = ed.edit([REQ_B], method="rome", apply=False)
    first = ed.edit([REQ_A], method="rome")  # applied
    second = ed.edit([REQ_B], method="rome", apply=False)  # on the model edited by A
    first.delta.revert(model)
    assert _same(model, before)

    wd = both.delta.weights[0]
    torch.testing.assert_close(wd.u[:, :1], first.delta.weights[0].u, rtol=1e-6, atol=0)
    torch.testing.assert_close(wd.u[:, 1:], second.delta.weights[0].u, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(wd.v[:, 1:], second.delta.weights[0].v, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(both.z[1], second.z[0])
    # Computed on the unedited model instead, B's edit differs.
    diff = (alone_b.delta.weights[0].u - wd.u[:, 1:]).norm() / wd.u[:, 1:].norm()
    assert float(diff) > 1e-4


def test_failure_midway_restores_the_model(tmp_path, monkeypatch):
    import massedit.methods.rome.update as rome

    model, tok = make_model("gpt2")
    ed = _editor(model, tok, tmp_path)
    ed.solvers()
    before = _snapshot(model)
    real, calls = rome.bare_prompt_keys, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(rome, "bare_prompt_keys", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        ed.edit([REQ_A, REQ_B, REQ_A.__class__(subject="Lionel Messi", prompt="{} was born in",
                                                target_new="Tokyo")], method="rome")
    assert len(calls) == 3
    assert _same(model, before)  # the two applied steps were reverted bit-exactly


def test_without_mom2_adjustment_needs_no_statistics(tmp_path):
    model, tok = make_model("gpt2")
    ed = _editor(model, tok, tmp_path, _hp(mom2_adjustment=False), corpus=None)
    k_bar = _mean_key(model, tok, "gpt2", REQ_A)
    res = ed.edit([REQ_A], method="rome", apply=False)
    left = res.delta.weights[0].v[:, 0]
    torch.testing.assert_close(left, k_bar / k_bar.norm(), rtol=1e-5, atol=1e-7)
    assert not (tmp_path / "stats").exists()
