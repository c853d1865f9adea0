"""The whole MEMIT pipeline through MassEditor: exact revert, apply=False, all-or-nothing failure
handling, mode/flag restoration, the layer solve, the update formula recomputed by hand, and
edits taking effect on a small model that actually knows facts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import massedit.solve.spread as memit_mod
import massedit.methods.memit as memit_method
import massedit.compute.targets as targets_mod
from massedit.model.arch import ModelLayout
from massedit.edits.delta import EditDelta
from massedit.editor import MassEditor
from massedit.hparams import default_for
from massedit.solve.cholesky import LayerSolver
from massedit.inputs.tokens import compose, encode_prompt
from tiny import WORDS, make_model

REQUESTS = [
    {"subject": "Michael Jordan", "prompt": "{} plays the sport of", "target_new": "baseball"},
    {"subject": "Lionel Messi", "prompt": "{} plays the sport of", "target_new": "tennis"},
    {"subject": "Marie Curie", "prompt": "The native language of {} is", "target_new": "Spanish"},
]
TEMPLATES = [["{}"], ["The a of. {}", "I you it. {}"]]
CORPUS = [" ".join(WORDS[(5 * i + j * (i % 7 + 1)) % len(WORDS)] for j in range(8 + (11 * i) % 37)) for i in range(40)]


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model, snapshot) -> None:
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for name, value in state.items():
        assert value.dtype == snapshot[name].dtype, name
        assert torch.equal(value, snapshot[name]), name


def _changed(model, snapshot) -> list[str]:
    return [k for k, v in model.state_dict().items() if not torch.equal(v, snapshot[k])]


def _no_hooks_left(model) -> bool:
    from massedit.model.hooks import Replay

    no_hooks = all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    return no_hooks and not any(isinstance(m, Replay) for m in model.modules())


def _editor(model, tok, tmp_path, layers=(1, 2), steps=6, **hp_changes) -> MassEditor:
    hp = default_for(model.config).replace(layers=list(layers), v_num_grad_steps=steps, mom2_n_samples=len(CORPUS),
                                           **hp_changes)
    return MassEditor(model, tok, hp, stats_dir=tmp_path / "stats", corpus=CORPUS, model_name="tiny",
                      context_templates=TEMPLATES, progress=False)


# ------------------------------------------------------------------------- revert / apply


@pytest.mark.parametrize("kind,dtype", [
    ("gpt2", torch.float32), ("gpt2", torch.float16), ("gpt2", torch.bfloat16),
    ("llama", torch.float32), ("llama", torch.bfloat16),
])
def test_revert_restores_weights_bit_identically(kind, dtype, tmp_path):
    model, tok = make_model(kind, dtype=dtype)
    before = _snapshot(model)
    result = _editor(model, tok, tmp_path).edit(REQUESTS)
    layout = ModelLayout(model)
    assert result.delta.is_applied(model) and result.n_edits == 3
    assert set(_changed(model, before)) == {layout.rewrite_weight_name(l) for l in (1, 2)}
    assert all(p.dtype == dtype for p in model.parameters())
    result.delta.revert(model)
    _assert_same(model, before)


def test_apply_false_leaves_model_unchanged_and_delta_applies_later(tmp_path):
    model, tok = make_model("gpt2")
    before = _snapshot(model)
    later = _editor(model, tok, tmp_path / "a").edit(REQUESTS, apply=False)
    _assert_same(model, before)
    assert not later.delta.is_applied(model)

    reference, _ = make_model("gpt2")
    now = _editor(reference, tok, tmp_path / "b").edit(REQUESTS, apply=True)
    assert now.delta.is_applied(reference)
    for a, b in zip(later.delta.weights, now.delta.weights):
        assert a.name == b.name and torch.equal(a.u, b.u) and torch.equal(a.v, b.v)

    later.delta.apply(model)
    _assert_same(model, _snapshot(reference))
    later.delta.revert(model)
    _assert_same(model, before)

    # ... also after a round trip through a file
    path = tmp_path / "delta.safetensors"
    later.delta.save(path)
    EditDelta.load(path).apply(model)
    _assert_same(model, _snapshot(reference))


# --------------------------------------------------------------------- failure handling


class Injected(RuntimeError):
    pass


def _fail_on_call(real, n):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise Injected(f"injected failure on call {n}")
        return real(*args, **kwargs)

    return wrapper, calls


def _frozen_embeddings_in_train_mode(model):
    model.train()
    emb = model.get_input_embeddings().weight
    emb.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not all(flags.values()) and any(flags.values())
    return flags


def _assert_modes(model, flags) -> None:
    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("where", ["keys", "solve", "apply"])
def test_failure_on_second_layer_leaves_model_unchanged(where, tmp_path, monkeypatch):
    model, tok = make_model("gpt2")
    flags = _frozen_embeddings_in_train_mode(model)
    editor = _editor(model, tok, tmp_path, layers=(1, 2, 3))
    editor.solvers()  # statistics first, so the failure below happens in the layer loop
    before = _snapshot(model)
    if where == "keys":
        wrapper, calls = _fail_on_call(memit_mod.LayerStates.at_layer, 2)
        monkeypatch.setattr(memit_mod.LayerStates, "at_layer", wrapper)
    elif where == "solve":
        wrapper, calls = _fail_on_call(LayerSolver.solve, 2)
        monkeypatch.setattr(LayerSolver, "solve", wrapper)
    else:  # the second layer's weight write itself fails
        wrapper, calls = _fail_on_call(EditDelta.apply, 2)
        monkeypatch.setattr(EditDelta, "apply", wrapper)
    with pytest.raises(Injected):
        editor.edit(REQUESTS)
    assert calls["n"] == 2  # the first layer was updated before the failure
    _assert_same(model, before)
    assert _no_hooks_left(model)
    _assert_modes(model, flags)

    monkeypatch.undo()
    result = editor.edit(REQUESTS)  # the editor is still usable
    assert len(_changed(model, before)) == 3
    result.delta.revert(model)
    _assert_same(model, before)


@pytest.mark.parametrize("method", ["memit", "memit-serial"])
def test_failure_in_z_phase_leaves_model_unchanged(method, tmp_path, monkeypatch):
    model, tok = make_model("gpt2")
    flags = _frozen_embeddings_in_train_mode(model)
    before = _snapshot(model)
    editor = _editor(model, tok, tmp_path)
    seen = {}
    real_run = targets_mod.run_until

    def run_until_that_fails(model_, stop, **inputs):
        seen["n"] = seen.get("n", 0) + 1
        seen["training"] = model_.training
        seen["grad"] = any(p.requires_grad for p in model_.parameters())
        if seen["n"] == 3:  # after some optimizer steps, hooks installed
            raise Injected("injected failure in the z phase")
        return real_run(model_, stop, **inputs)

    monkeypatch.setattr(targets_mod, "run_until", run_until_that_fails)
    with pytest.raises(Injected):
        editor.edit(REQUESTS, method=method)
    assert seen["n"] == 3 and seen["training"] is False and seen["grad"] is False
    _assert_same(model, before)
    assert _no_hooks_left(model)
    _assert_modes(model, flags)


def test_flags_and_training_mode_restored_after_edit(tmp_path):
    model, tok = make_model("gpt2")
    flags = _frozen_embeddings_in_train_mode(model)
    result = _editor(model, tok, tmp_path).edit(REQUESTS)
    assert result.delta.is_applied(model)
    _assert_modes(model, flags)
    assert _no_hooks_left(model)

    model.eval()
    _editor(model, tok, tmp_path).edit(REQUESTS[:1])
    assert not model.training and not any(m.training for m in model.modules())


def test_edit_of_a_model_in_train_mode_equals_edit_in_eval_mode(tmp_path):
    model_eval, tok = make_model("gpt2")
    model_train, _ = make_model("gpt2")
    assert model_train.config.resid_pdrop > 0  # dropout present in the tiny GPT-2
    model_train.train()
    a = _editor(model_eval, tok, tmp_path / "a").edit(REQUESTS, apply=False)
    b = _editor(model_train, tok, tmp_path / "b").edit(REQUESTS, apply=False)
    for wa, wb in zip(a.delta.weights, b.delta.weights):
        da, db = wa.dense(), wb.dense()
        assert float((da - db).norm() / da.norm()) < 1e-5


# ------------------------------------------------------------------------------- solve


def _spd(d, rank, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, rank, generator=g, dtype=torch.float64)
    return a @ a.T / rank


@pytest.mark.parametrize("n", [1, 5, 23, 24, 40])  # d = 24: Woodbury for n < d, direct for n >= d
@pytest.mark.parametrize("keys_dtype", [torch.float32, torch.float64])
def test_layer_solve_equals_dense_solve(n, keys_dtype):
    d, lam = 24, 7.5
    cov = _spd(d, 60, 0)
    g = torch.Generator().manual_seed(n)
    keys = torch.randn(d, n, generator=g, dtype=torch.float64).to(keys_dtype)
    solver = LayerSolver(cov, lam, layer=3)
    got = solver.solve(keys)
    k = keys.double()
    expected = torch.linalg.solve(lam * cov + k @ k.T, k)
    assert got.dtype == torch.float64 and got.shape == (d, n)
    assert float((got - expected).norm() / expected.norm()) <= 1e-8
    # the λC factor is kept and reused across batches
    again = solver.solve(keys)
    assert torch.equal(got, again)


@pytest.mark.parametrize("n", [5, 30])
def test_singular_covariance_warns_with_ridge(n, recwarn):
    d, lam = 24, 7.0
    cov = _spd(d, 10, 1)  # rank 10 < 24: keys that never fire in the corpus
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(d, n, generator=g, dtype=torch.float64)
    solver = LayerSolver(cov, lam, layer=5)
    got = solver.solve(keys)
    a = lam * cov + keys @ keys.T
    assert torch.isfinite(got).all()
    assert float((a @ got - keys).norm() / keys.norm()) <= 1e-8
    assert float((got - torch.linalg.pinv(a) @ keys).norm() / got.norm()) <= 1e-4
    messages = [str(w.message) for w in recwarn.list]
    # the solver keeps only the factor of λC, which is singular here: one warning, whatever n
    assert sum("ridge" in m and "layer 5" in m for m in messages) == 1, messages


def test_rank_deficient_system_warns_not_crashes():
    d = 16
    cov = _spd(d, 3, 3)
    keys = _spd(d, 2, 4)[:, :d]  # n = d keys of rank 2: λC + KKᵀ singular on the direct path
    with pytest.warns(UserWarning, match="ridge"):
        got = LayerSolver(cov, 2.0, layer=0).solve(keys)
    assert torch.isfinite(got).all()


# ------------------------------------------------------------------ update formula by hand


def _hidden_and_keys_by_hand(model, tok, layout, requests, layer, target_layer, templates):
    """k_i^l averaged within then over template groups, and h_i^L at the bare prompt's subject
    token, read with plain hooks (no engine batching)."""
    store = {}
    h1 = layout.rewrite_module(layer).register_forward_pre_hook(lambda m, a: store.__setitem__("k", a[0]))
    h2 = layout.block(target_layer).register_forward_hook(
        lambda m, a, out: store.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    keys, hidden = [], []
    try:
        with torch.no_grad():
            for r in requests:
                group_means = []
                for group in templates:
                    per = []
                    for ctx in group:
                        enc = encode_prompt(tok, compose(ctx, r["prompt"]), r["subject"])
                        model(input_ids=torch.tensor([enc.ids]))
                        per.append(store["k"][0, enc.subject_index].double())
                    group_means.append(torch.stack(per).mean(0))
                keys.append(torch.stack(group_means).mean(0))
                enc = encode_prompt(tok, r["prompt"], r["subject"])
                model(input_ids=torch.tensor([enc.ids]))
                hidden.append(store["h"][0, enc.subject_index].double())
    finally:
        h1.remove()
        h2.remove()
    return torch.stack(keys), torch.stack(hidden)


def _covariance_by_hand(model, tok, layout, layer, texts):
    store = {}
    handle = layout.rewrite_module(layer).register_forward_pre_hook(lambda m, a: store.__setitem__("k", a[0]))
    acc, count = 0, 0
    try:
        with torch.no_grad():
            for t in texts:
                model(input_ids=torch.tensor([tok(t)["input_ids"][:128]]))
                k = store["k"][0].double()
                acc = acc + k.T @ k
                count += k.shape[0]
    finally:
        handle.remove()
    return acc / count


@pytest.mark.parametrize("kind,layers,mom2_dtype,tol", [
    ("gpt2", [2], "float64", 5e-6),
    ("gpt2", [2], "float32", 1e-4),  # float32 statistics: ~1e-5 measured
    ("gpt2", [1, 2, 3], "float64", 5e-6),
    ("llama", [2], "float64", 5e-6),
    ("llama", [1, 3], "float32", 1e-4),
])
def test_update_equals_memit_formula(kind, layers, mom2_dtype, tol, tmp_path, monkeypatch):
    model, tok = make_model(kind)
    layout = ModelLayout(model)
    lam = 40.0
    captured = {}
    real_spread = memit_method.spread_update

    def spy(*args, **kwargs):
        captured["z"] = args[5].detach().double().clone()
        return real_spread(*args, **kwargs)

    monkeypatch.setattr(memit_method, "spread_update", spy)
    editor = _editor(model, tok, tmp_path, layers=layers, steps=8, mom2_update_weight=lam,
                     mom2_dtype=mom2_dtype)
    before = _snapshot(model)
    result = editor.edit(REQUESTS, apply=False)
    _assert_same(model, before)
    z = captured["z"]
    target_layer = max(layers)
    covs = {l: _covariance_by_hand(model, tok, layout, l, CORPUS) for l in layers}

    # Walk the layers as DESIGN §2.5 says, applying each hand-computed Δ before the next layer.
    for j, (layer, wd) in enumerate(zip(layers, result.delta.weights)):
        k, h = _hidden_and_keys_by_hand(model, tok, layout, REQUESTS, layer, target_layer, TEMPLATES)
        resid = ((z - h) / (len(layers) - j)).T  # R: [d, n]
        norm = layout.mlp_output_norm(layer)
        if norm is not None:  # a norm after the MLP: R carried through it (tests/test_output_norm.py)
            resid = memit_mod.through_output_norm(norm, layout.rewrite_module(layer), k.float(), resid.T).T.double()
        kk = k.T  # K: [d_ff, n]
        delta = resid @ torch.linalg.solve(lam * covs[layer] + kk @ kk.T, kk).T  # R Kᵀ (λC + KKᵀ)⁻¹
        conv1d = layout.rewrite_is_conv1d(layer)
        assert conv1d == (kind == "gpt2") and wd.transposed == conv1d
        expected = delta.T if conv1d else delta
        got = wd.dense()
        assert wd.name == layout.rewrite_weight_name(layer)
        assert got.shape == expected.shape == layout.rewrite_module(layer).weight.shape
        rel = float((got - expected).norm() / expected.norm())
        assert rel <= tol, (layer, rel)
        with torch.no_grad():  # the weight the engine's own apply would write
            w = layout.rewrite_module(layer).weight
            w.copy_((w.double() + got).to(w.dtype))

    # and apply writes exactly those weights
    edited = _snapshot(model)
    fresh, _ = make_model(kind)
    result.delta.apply(fresh)
    _assert_same(fresh, edited)


# ------------------------------------------------------------- edits on a model with facts

# A toy world: 12 single-token subjects, 3 relations with 4 objects each, every fact stated with
# and without a prefix. Facts are phrased "<relation phrase> <subject> <object>": in a model this
# small, "<subject> <relation phrase> <object>" facts are read at the answer position straight from
# the subject's embedding by layer-0 attention (patching the subject token's residual at ANY layer,
# even block 0's output, never changes the answer), so no edit at the subject token can move them.
# With the object right after the subject, the subject token is the answer position and MEMIT's
# mechanism applies. Label smoothing keeps the facts short of p ≈ 1 (DESIGN §9: over-trained toy
# facts cannot be overturned within the clamp) while every fact stays top-1 with a margin.
SUBJECTS = ["Alden", "Brina", "Corin", "Delia", "Evan", "Fara", "Gideon", "Hana", "Ivo", "Jora", "Kellan", "Lysa"]
RELATIONS = {
    "the city of": ["Paris", "London", "Berlin", "Rome"],
    "the sport of": ["football", "tennis", "golf", "chess"],
    "the language of": ["French", "German", "Italian", "Spanish"],
}
PREFIXES = ["", "I know that", "They say"]
FACTS = [(s, list(RELATIONS)[i % 3], RELATIONS[list(RELATIONS)[i % 3]][(i // 3) % 4]) for i, s in enumerate(SUBJECTS)]
EDITED = {0: "London", 4: "golf", 8: "Spanish"}  # fact index -> new object (known to the model)
WORLD_SEED = 0


def _sentence(prefix, relation, subject, obj=None) -> str:
    return " ".join(x for x in (prefix, relation, subject, obj) if x) + (" ." if obj else "")


def _world_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for s, r, _ in FACTS for p in PREFIXES for w in _sentence(p, r, s).split()}
                   | {o for objs in RELATIONS.values() for o in objs} | {".", "is", "a"})
    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def train_world(seed=WORLD_SEED, steps=150, lr=1e-2, warmup=20, label_smoothing=0.1, arch="gpt2"):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tok = _world_tokenizer()
    sentences = [_sentence(p, r, s, o) for s, r, o in FACTS for p in PREFIXES]
    torch.manual_seed(seed)
    cfg = {
        "gpt2": lambda: GPT2Config(vocab_size=len(tok), n_layer=6, n_embd=64, n_head=4, n_inner=256, n_positions=32,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1),
        "llama": lambda: LlamaConfig(vocab_size=len(tok), num_hidden_layers=6, hidden_size=64, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=256, max_position_embeddings=32,
                                     bos_token_id=1, eos_token_id=1, pad_token_id=1),
    }[arch]()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    encoded = [tok(t)["input_ids"] + [tok.eos_token_id] for t in sentences]
    width = max(map(len, encoded))
    ids = torch.full((len(encoded), width), tok.eos_token_id)
    labels = torch.full((len(encoded), width), -100)
    for i, e in enumerate(encoded):
        ids[i, : len(e)] = torch.tensor(e)
        labels[i, : len(e)] = torch.tensor(e)
    mask = (labels != -100).long()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
                               label_smoothing=label_smoothing)
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:  # linear warm-up, then linear decay to 0
            group["lr"] = lr * min(1.0, (step + 1) / warmup) * (1 - step / steps)
        opt.step()
    model.eval()
    return model, tok, sentences


@torch.no_grad()
def _top1(model, tok, relation, subject, prefix="") -> str:
    ids = tok(_sentence(prefix, relation, subject))["input_ids"]
    return tok.convert_ids_to_tokens(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))


WORLD_REQUESTS = [{"subject": FACTS[i][0], "prompt": FACTS[i][1] + " {}", "target_new": o} for i, o in EDITED.items()]


def world_editor(model, tok, sentences, stats_dir, lam=200.0, layers=(1, 2, 3), steps=25, clamp=4.0) -> MassEditor:
    hp = default_for(model.config).replace(
        layers=list(layers), v_loss_layer=model.config.num_hidden_layers - 1, mom2_update_weight=lam,
        v_num_grad_steps=steps, clamp_norm_factor=clamp, mom2_n_samples=len(sentences))
    templates = [["{}"], [p + " {}" for p in PREFIXES if p]]
    return MassEditor(model, tok, hp, stats_dir=stats_dir, corpus=sentences, model_name="world",
                      context_templates=templates, progress=False)


def edit_world(model, tok, sentences, stats_dir, **settings):
    return world_editor(model, tok, sentences, stats_dir, **settings).edit(WORLD_REQUESTS)


@pytest.mark.filterwarnings("ignore:.*ridge:UserWarning")  # 36 short sentences: C has a null space
def test_edits_take_effect_on_a_model_that_knows_facts(tmp_path):
    model, tok, sentences = train_world()
    known = [_top1(model, tok, r, s, p) == o for s, r, o in FACTS for p in PREFIXES]
    assert all(known), f"the world model knows {sum(known)}/{len(known)} fact statements"
    for i, new in EDITED.items():
        assert new in RELATIONS[FACTS[i][1]] and new != FACTS[i][2]
    before = _snapshot(model)

    result = edit_world(model, tok, sentences, tmp_path)

    new_top1 = [_top1(model, tok, FACTS[i][1], FACTS[i][0]) == o for i, o in EDITED.items()]
    new_prefixed = [_top1(model, tok, FACTS[i][1], FACTS[i][0], p) == o for i, o in EDITED.items() for p in PREFIXES]
    kept = [_top1(model, tok, r, s) == o for j, (s, r, o) in enumerate(FACTS) if j not in EDITED]
    assert all(new_top1), new_top1
    assert sum(new_prefixed) >= 8, new_prefixed  # with and without the context prefixes
    assert sum(kept) >= 8, f"only {sum(kept)}/9 unedited facts kept"
    assert float(result.z_loss.max()) < 1.5

    result.delta.revert(model)
    _assert_same(model, before)
    assert all(_top1(model, tok, r, s) == o for s, r, o in FACTS)
