"""Batched z optimization against the serial reference loop (DESIGN §2.2)."""
import pytest
import torch

from massedit.model.arch import ModelLayout
from massedit.editor import MassEditor
from massedit.hparams import default_for
from massedit.compute.targets import TargetOptimizer, ZSettings, build_prompts
from massedit.inputs.tokens import fill
from tiny import WORDS, make_model, make_requests, make_tokenizer

TEMPLATES = [["{}"], ["The city of Paris. {}", "Because I speak. {}", "You know what. {}"]]
# On random tiny models ‖h‖ ≈ 0.1, so the reference's weight decay (0.5·‖δ‖/‖h‖²) would swamp the
# NLL; a light decay and a wide clamp make the optimization move, and the threshold lets requests
# stop at different iterations.
MOVING = dict(num_grad_steps=20, lr=0.5, weight_decay=1e-3, clamp_norm_factor=4.0, kl_factor=0.0625,
              early_stop_loss=5.75)


def _setup(model_type, side, dtype=torch.float32):
    tok = make_tokenizer("bpe" if model_type == "gpt2" else "sentencepiece", side)
    model, _ = make_model(model_type, tok, dtype=dtype)
    return model, tok, ModelLayout(model)


def _rel(a, b):
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_batched_z_equals_serial(model_type, side):
    model, tok, layout = _setup(model_type, side)
    requests = make_requests(64)
    opt = TargetOptimizer(model, layout, tok, ZSettings(layer=2, loss_layer=3, **MOVING), TEMPLATES)
    batched = opt.optimize(requests, batch_size=16, progress=False)
    serial = opt.optimize_serial(requests, progress=False)
    assert _rel(batched.z, serial.z) <= 1e-4
    assert torch.equal(batched.steps, serial.steps)
    assert torch.allclose(batched.loss, serial.loss, rtol=1e-4)
    assert batched.steps.min() < batched.steps.max(), "early stop must be exercised"


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_reference_settings_agree_in_float64(model_type):
    """At the reference's GPT-J settings the clamp binds at every step (Adam steps of 0.5 against a
    radius of 0.75·‖h‖ ≈ 0.08), which amplifies rounding differences; in float64 they stay far
    inside the tolerance."""
    model, tok, layout = _setup(model_type, "right", torch.float64)
    requests = make_requests(24, seed=1)
    s = ZSettings(layer=2, loss_layer=3, num_grad_steps=20, lr=0.5, weight_decay=0.5, clamp_norm_factor=0.75,
                  kl_factor=0.0625)
    opt = TargetOptimizer(model, layout, tok, s, TEMPLATES)
    batched = opt.optimize(requests, batch_size=5, progress=False)
    serial = opt.optimize_serial(requests, progress=False)
    assert _rel(batched.z, serial.z) <= 1e-4
    # The clamp binds on these models: every δ sits on or inside 0.75·‖h‖.
    norms = (batched.z - batched.h).norm(dim=1) / batched.h.norm(dim=1)
    assert norms.max() <= 0.75 * (1 + 1e-9) and norms.max() > 0.7


def test_padding_side_does_not_change_z():
    zs = []
    for side in ("right", "left"):
        model, tok, layout = _setup("gpt2", side)
        opt = TargetOptimizer(model, layout, tok, ZSettings(layer=2, loss_layer=3, **MOVING), TEMPLATES)
        zs.append(opt.optimize(make_requests(12), batch_size=12, progress=False).z)
    assert _rel(zs[0], zs[1]) <= 1e-5


def test_first_loss_is_the_target_nll_of_the_unedited_model():
    """At iteration 0 (δ = 0) the loss is the mean over rewriting prompts of the target's mean
    token NLL, computed here by plain per-prompt forwards."""
    model, tok, layout = _setup("llama", "left")
    requests = make_requests(6, seed=3)
    s = ZSettings(layer=1, loss_layer=3, num_grad_steps=1, lr=0.5, weight_decay=0.5, clamp_norm_factor=0.75,
                  kl_factor=0.0625)
    result = TargetOptimizer(model, layout, tok, s, TEMPLATES).optimize(requests, batch_size=4, progress=False)
    for i, r in enumerate(requests):
        nlls = []
        for ctx in (t for g in TEMPLATES for t in g):
            prompt = fill(ctx.replace("{}", r.prompt), r.subject)[0]
            target = build_prompts(tok, r, ["{}"]).target
            ids = list(tok(prompt)["input_ids"]) + list(target)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            start = len(ids) - len(target) - 1
            nlls.append(-sum(logp[start + t, target[t]].item() for t in range(len(target))) / len(target))
        assert result.loss[i].item() == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_weight_deltas_batched_equal_serial(model_type, tmp_path):
    """Whole edits: ΔW per layer from the batched and the serial z agree (same statistics)."""
    model, tok, _ = _setup(model_type, "left" if model_type == "llama" else "right")
    hp = default_for(model.config).replace(
        layers=[1, 2], v_loss_layer=3, mom2_n_samples=300, mom2_update_weight=50, v_num_grad_steps=20,
        v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=4.0, z_early_stop_loss=5.75)
    import random

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30))) for _ in range(300)]
    editor = MassEditor(model, tok, hp, stats_dir=tmp_path, corpus=corpus, context_templates=TEMPLATES,
                        progress=False)
    requests = make_requests(64, seed=2)
    batched = editor.edit(requests, method="memit", batch_size=16, apply=False)
    serial = editor.edit(requests, method="memit-serial", apply=False)
    # Llama's batches are left-padded, so its masked attention sums in another order than a single
    # prompt's; Adam's per-coordinate normalization turns those ulp-level gradient differences into
    # ~3e-4 relative after 20 steps (measured), where GPT-2's right-padded batches stay below 1e-5.
    assert _rel(batched.z, serial.z) <= (1e-3 if model_type == "llama" else 1e-4)
    for wb, ws in zip(batched.delta.weights, serial.delta.weights):
        assert wb.name == ws.name
        db, ds = wb.dense(), ws.dense()
        assert ((db - ds).norm() / ds.norm()).item() <= 1e-3
