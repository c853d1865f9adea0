"""Families with a norm after the MLP (Gemma 2/3, OLMo 2): MEMIT's residual is carried through the norm,
so the edited layer's output reaches z instead of about residual / rms(u)."""
from __future__ import annotations

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

import massedit.solve.spread as spread
from massedit import MassEditor
from massedit.hparams import default_for
from tiny import WORDS, make_model


@pytest.mark.parametrize("norm_cls", [Gemma3RMSNorm, Olmo2RMSNorm])
@pytest.mark.parametrize("size", [0.05, 3.0])
def test_through_output_norm_reaches_the_target_where_reachable(norm_cls, size):
    torch.manual_seed(0)
    d, d_ff, n = 64, 96, 7
    norm = norm_cls(d, eps=1e-12).double()  # exact up to the norm's eps, which is 1e-6 in the real models
    with torch.no_grad():
        norm.weight.copy_(0.5 + torch.rand(d, dtype=torch.float64))
    rewrite = torch.nn.Linear(d_ff, d, bias=False).double()
    with torch.no_grad():
        rewrite.weight.mul_(20)  # MLP outputs before the norm are far from unit scale in real models
    keys = torch.randn(n, d_ff, dtype=torch.float64)
    residual = size * torch.randn(n, d, dtype=torch.float64)
    delta_u = spread.through_output_norm(norm, rewrite, keys, residual)
    torch.set_grad_enabled(False)
    u = rewrite(keys)
    got = norm(u + delta_u)
    y = norm(u) + residual
    scale = norm(torch.ones(1, d, dtype=torch.float64))
    reachable = y / (y / scale).pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(got, reachable, rtol=1e-6, atol=1e-9)
    if size < 1:
        # adding the residual to u itself, as for a family without the norm, lands far from the target
        naive = norm(u + residual)
        assert float((got - y).norm()) < 0.5 * float((naive - y).norm())  # left: the radial part, ~1/sqrt(d) of r
    # u turns by the angle the normed output turns, and grows only as far as the target is out of reach
    grow = (y.norm(dim=-1) / norm(u).norm(dim=-1)).clamp_min(1.0)
    torch.testing.assert_close((u + delta_u).norm(dim=-1), grow * u.norm(dim=-1))
    torch.set_grad_enabled(True)


@pytest.mark.parametrize("model_type", ["gemma3_text", "olmo2"])
def test_memit_one_layer_reaches_z_through_the_norm(model_type, tmp_path, monkeypatch):
    model, tok = make_model(model_type)
    hp = default_for(model.config)
    hp.layers = [2]
    hp.mom2_update_weight = 1e-4  # nearly an exact fit of the keys: the layer's output is what the solve asked
    hp.mom2_n_samples = 60
    # The normed MLP output can only turn, not grow (|norm(u)| is fixed by the norm's scale), so z is
    # kept within reach of one layer here; z of the default clamp is ~10x further than this layer can go.
    hp.clamp_norm_factor = 0.1
    corpus = [" ".join(WORDS[i:i + 12]) for i in range(0, 120, 2)]
    request = {"prompt": "{} plays the sport of", "subject": "Lionel Messi", "target_new": {"str": "chess"}}

    def distance_to_z(carry_through_norm: bool) -> float:
        if not carry_through_norm:
            monkeypatch.setattr(spread, "through_output_norm", lambda norm, rewrite, keys, residual: residual)
        editor = MassEditor(model, tok, hp, stats_dir=tmp_path / "stats", corpus=corpus, progress=False,
                            context_templates=[["{}"]])
        result = editor.edit([request], apply=False)
        ids = tok("Lionel Messi plays the sport of", return_tensors="pt").input_ids
        position = len(tok("Lionel Messi").input_ids) - 1
        with torch.no_grad():
            before = model(ids, output_hidden_states=True).hidden_states[3][0, position]
            result.delta.apply(model)
            after = model(ids, output_hidden_states=True).hidden_states[3][0, position]
            result.delta.revert(model)
        monkeypatch.undo()
        z = result.z[0]
        return float((after - z).norm() / (before - z).norm())

    through = distance_to_z(True)
    plain = distance_to_z(False)
    # What is left is where z lies off the sphere the normed output moves on (its radial part and the
    # curvature over a turn of |z - h| / |norm(u)| ~ 0.3 rad), not a shortfall of the solve.
    assert through < 0.5, through
    assert through < plain / 2, (through, plain)


@pytest.mark.parametrize("model_type", ["gemma3_text", "olmo2"])
def test_z_site_mlp_puts_z_within_reach_of_the_normed_output(model_type, tmp_path):
    """δ found at the rewrite module's output (z_site "mlp") at the default clamp: one layer at a near-exact
    fit lands on z, where δ on the residual stream (the reference's site) stays far from it."""
    model, tok = make_model(model_type)
    with torch.no_grad():
        # A random tiny MLP's outputs have rms² near the norm's eps (1e-6), where the norm is not yet
        # scale invariant; a real model's are far above it.
        model.model.layers[2].mlp.down_proj.weight.mul_(100)
    corpus = [" ".join(WORDS[i:i + 12]) for i in range(0, 120, 2)]
    request = {"prompt": "{} plays the sport of", "subject": "Lionel Messi", "target_new": {"str": "chess"}}
    ids = tok("Lionel Messi plays the sport of", return_tensors="pt").input_ids
    position = len(tok("Lionel Messi").input_ids) - 1

    def distance_to_z(site: str) -> tuple[float, float]:
        hp = default_for(model.config).replace(layers=[2], mom2_update_weight=1e-4, mom2_n_samples=60, z_site=site)
        editor = MassEditor(model, tok, hp, stats_dir=tmp_path / "stats", corpus=corpus, progress=False,
                            context_templates=[["{}"]])
        result = editor.edit([request], apply=False)
        with torch.no_grad():
            before = model(ids, output_hidden_states=True).hidden_states[3][0, position]
            result.delta.apply(model)
            after = model(ids, output_hidden_states=True).hidden_states[3][0, position]
            result.delta.revert(model)
        z = result.z[0]
        return float((after - z).norm() / (before - z).norm()), float((z - before).norm() / before.norm())

    mlp, mlp_move = distance_to_z("mlp")
    residual, _ = distance_to_z("residual")
    assert mlp < 1e-2, mlp  # what is left: the λ = 1e-4 fit and the norm's eps
    assert residual > 0.3, residual
    assert mlp_move > 0.01  # a real move of h^L, not a target left where it started


def test_z_site_is_checked():
    from massedit.hparams import HParamsError

    with pytest.raises(HParamsError, match="z_site"):
        default_for(make_model("llama")[0].config).replace(z_site="attn")
