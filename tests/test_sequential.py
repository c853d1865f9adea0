"""Sequential editing (massedit.edits.sequential, massedit.methods.alphaedit, DESIGN §11): AlphaEdit's
update against its public code's formula, rounds with preserved keys against one combined solve,
the projector cache, and the edit ledger (exact revert of the last K rounds, crash and resume)."""
from __future__ import annotations

import pytest
import torch

import massedit.edits.ledger as ledger_mod
import massedit.methods.memit as memit_method
from massedit.editor import MassEditor
from massedit.hparams import default_for
from massedit.compute.keys import subject_hidden, subject_keys
from massedit.edits.ledger import Ledger
from massedit.methods.alphaedit import AlphaEdit
from massedit.solve.nullspace import cached_basis, null_space_solve, projector_file
from massedit.inputs.requests import EditRequest
from massedit.edits.sequential import SequentialEditor, split_rounds
from massedit.compute.stats import stats_file
from massedit.compute.targets import ZResult
from tiny import WORDS, make_model

TEMPLATES = [["{}"], ["The a of. {}", "I you it. {}"]]
CORPUS = [" ".join(WORDS[(5 * i + j * (i % 7 + 1)) % len(WORDS)] for j in range(8 + (11 * i) % 37)) for i in range(40)]
REQUESTS = [
    EditRequest("Michael Jordan", "{} plays the sport of", "baseball"),
    EditRequest("Lionel Messi", "{} plays the sport of", "tennis"),
    EditRequest("Marie Curie", "The native language of {} is", "Spanish"),
    EditRequest("Albert Einstein", "{} was born in", "Tokyo"),
    EditRequest("Danielle Darrieux", "The mother tongue of {} is", "German"),
    EditRequest("Sony", "{}, who works for", "Nokia"),
]


def _public_projector(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """experiments/evaluate.py `get_project` of the AlphaEdit code, on a given covariance."""
    U, S, _ = torch.linalg.svd(cov, full_matrices=False)
    small = (S < threshold).nonzero(as_tuple=True)[0]
    return U[:, small] @ U[:, small].T


def _public_update(P, layer_ks, cache_c, resid, l2):
    """AlphaEdit_main.py's upd_matrix: [d_in, d_out]."""
    eye = torch.eye(layer_ks.shape[0], dtype=layer_ks.dtype)
    return torch.linalg.solve(P @ (layer_ks @ layer_ks.T + cache_c) + l2 * eye, P @ layer_ks @ resid.T)


def _between(cov, i) -> float:
    """A threshold halfway between the i-th and (i+1)-th smallest eigenvalues: i of them below it."""
    values = torch.linalg.eigvalsh(cov)
    return float(values[i - 1] + values[i]) / 2


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_alphaedit_update_equals_public_formula():
    g = torch.Generator().manual_seed(1)
    d, n, n_p, d_out = 24, 5, 7, 10
    basis = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = basis @ torch.diag(torch.logspace(-4, 1, d, dtype=torch.float64)) @ basis.T / d
    keys = torch.randn(d, n, generator=g, dtype=torch.float64)
    kp = torch.randn(d, n_p, generator=g, dtype=torch.float64)
    resid = torch.randn(d_out, n, generator=g, dtype=torch.float64)
    threshold = _between(cov, d // 2)
    P = _public_projector(cov, threshold)
    ours_basis = cached_basis(None, cov, threshold)
    assert ours_basis.shape[1] == d // 2 and _rel(ours_basis @ ours_basis.T, P) < 1e-10
    expected = _public_update(P, keys, kp @ kp.T, resid, 10.0)
    x = null_space_solve(ours_basis @ ours_basis.T, kp @ kp.T, keys, 10.0)  # Δ = R Xᵀ
    assert _rel((resid @ x.T).T, expected) < 1e-6
    # with no earlier rounds, K_p K_pᵀ = 0
    assert _rel((resid @ null_space_solve(P, None, keys, 10.0).T).T, _public_update(P, keys, 0 * P, resid, 10.0)) < 1e-6


# --------------------------------------------------------------------------- end to end, fixed z


def _editor(model, tok, tmp_path, layers=(2,), lam=40.0, templates=TEMPLATES, **kw) -> MassEditor:
    hp = default_for(model.config).replace(layers=list(layers), v_num_grad_steps=4, mom2_n_samples=len(CORPUS),
                                           mom2_update_weight=lam, mom2_dtype="float64")
    return MassEditor(model, tok, hp, stats_dir=tmp_path / "stats", corpus=CORPUS, model_name="tiny",
                      context_templates=templates, progress=False, **kw)


def _float64_model(tmp_path):
    """A float64 tiny model whose statistics (cached in tmp_path) come from its float32 original:
    the covariance kernel takes float32 keys at most."""
    model, tok = make_model("gpt2")
    _editor(model, tok, tmp_path).solvers()
    return model.double(), tok


@pytest.fixture
def fixed_z(monkeypatch):
    """z per subject, fixed (random, near the model's scale), in place of the z optimization."""
    table: dict[str, torch.Tensor] = {}

    def targets(self, editor, requests, templates, batch_size):
        rows = []
        for r in requests:
            if r.subject not in table:
                g = torch.Generator().manual_seed(len(table) + 7)
                table[r.subject] = torch.randn(editor.model.config.hidden_size, generator=g, dtype=torch.float64)
            rows.append(table[r.subject])
        n = len(requests)
        return ZResult(torch.stack(rows), torch.zeros_like(torch.stack(rows)), torch.zeros(n), torch.zeros(n, dtype=torch.long))

    monkeypatch.setattr(memit_method.Memit, "targets", targets)
    return table


def _weight(model, editor):
    return dict(model.named_parameters())[editor.layout.rewrite_weight_name(editor.hp.layers[0])]


def test_alphaedit_rounds_on_a_model_equal_public_formula(tmp_path, fixed_z):
    model, tok = _float64_model(tmp_path)
    editor = _editor(model, tok, tmp_path)
    layer = editor.hp.layers[0]
    cov = editor.covariances()[layer]
    threshold = _between(cov, cov.shape[0] // 2)
    seq = SequentialEditor(editor, AlphaEdit(nullspace_threshold=threshold, l2=10.0))
    P = _public_projector(cov, threshold)
    cache_c = torch.zeros_like(P)
    w = _weight(model, editor)
    for batch in split_rounds(REQUESTS, 3):
        layer_ks = subject_keys(model, editor.layout, tok, batch, TEMPLATES, layer).double().T
        cur_zs = subject_hidden(model, editor.layout, tok, batch, layer).double().T
        before = w.detach().clone()
        seq.edit_round(batch)
        zs = torch.stack([fixed_z[r.subject] for r in batch], 1)
        expected = _public_update(P, layer_ks, cache_c, zs - cur_zs, 10.0)  # GPT-2 Conv1D: [d_in, d_out] = W's shape
        assert _rel(w.detach() - before, expected) < 1e-6
        after = subject_keys(model, editor.layout, tok, batch, TEMPLATES, layer).double().T  # cache_c += K Kᵀ
        cache_c = cache_c + after @ after.T
    # the projector was cached beside the statistics file
    hp = editor.hp
    stats = stats_file(tmp_path / "stats", "tiny", hp.mom2_dataset, editor.layout.rewrite_name(layer), hp.mom2_dtype,
                       hp.mom2_n_samples)
    assert projector_file(stats, threshold).is_file()


def test_alphaedit_takes_threshold_and_l2_from_its_public_hparams_keys(tmp_path, fixed_z):
    """A file in the shape of AlphaEdit's own hparams files ("nullspace_threshold", "L2",
    alg_name "AlphaEdit") loads, and `AlphaEdit()` uses its values; arguments given override them."""
    import json

    from massedit.hparams import HParamsError, load_hparams

    model, tok = _float64_model(tmp_path)
    editor = _editor(model, tok, tmp_path)
    layer = editor.hp.layers[0]
    cov = editor.covariances()[layer]
    threshold = _between(cov, cov.shape[0] // 3)
    path = tmp_path / "alphaedit.json"
    path.write_text(json.dumps({**editor.hp.to_dict(), "alg_name": "AlphaEdit", "nullspace_threshold": threshold,
                                "L2": 3.0}))
    hp = load_hparams(path)
    assert (hp.nullspace_threshold, hp.L2) == (threshold, 3.0)
    editor.hp = hp
    method = AlphaEdit()
    assert method.settings(editor) == (threshold, 3.0)
    assert round(float(method.projectors(editor)[layer].trace())) == cov.shape[0] // 3
    batch = REQUESTS[:2]
    layer_ks = subject_keys(model, editor.layout, tok, batch, TEMPLATES, layer).double().T
    cur_zs = subject_hidden(model, editor.layout, tok, batch, layer).double().T
    w = _weight(model, editor)
    before = w.detach().clone()
    SequentialEditor(editor, method).edit_round(batch)
    zs = torch.stack([fixed_z[r.subject] for r in batch], 1)
    expected = _public_update(_public_projector(cov, threshold), layer_ks, 0 * cov, zs - cur_zs, 3.0)
    assert _rel(w.detach() - before, expected) < 1e-6
    assert AlphaEdit(nullspace_threshold=1e-3, l2=0.5).settings(editor) == (1e-3, 0.5)
    for key, value, words in (("nullspace_threshold", 0, "must be > 0"), ("L2", -1, "must be >= 0")):
        path.write_text(json.dumps({**hp.to_dict(), key: value}))
        with pytest.raises(HParamsError, match=f'"{key}".*{words}'):
            load_hparams(path)


def test_projector_cache_is_reused_and_recomputed_when_statistics_change(tmp_path):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 8, generator=g, dtype=torch.float64)
    cov = a @ a.T
    stats = tmp_path / "layer_float32_mom2_10.npz"
    stats.write_bytes(b"statistics one")
    first = cached_basis(stats, cov, 1.0)
    cached = projector_file(stats, 1.0)
    assert cached.is_file()
    assert torch.equal(cached_basis(stats, cov * 0, 1.0), first)  # same statistics file: read, not recomputed
    stats.write_bytes(b"statistics two")  # other statistics: the cached projector must not be used
    assert cached_basis(stats, cov * 0, 1.0).shape[1] == 8


def test_rounds_with_preserved_keys_equal_one_combined_solve(tmp_path, fixed_z):
    """Recursive least squares: with one edited layer and fixed z, round 2's residual on the model
    edited by round 1 is (z − h) − Δ₁k₂, so λC + K₁K₁ᵀ + K₂K₂ᵀ gives the combined solve's ΔW, provided
    the keys are those of the prompts h is read at: the bare prompt only, no context templates (with
    templates K holds template means and h moves by Δ₁ times the bare prompt's key, not by Δ₁k₂)."""
    model, tok = _float64_model(tmp_path)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    bare = [["{}"]]
    editor = _editor(model, tok, tmp_path, templates=bare)
    seq = SequentialEditor(editor, "memit-preserve")
    for batch in split_rounds(REQUESTS, 2):
        seq.edit_round(batch)
    w = _weight(model, editor)
    rounds = w.detach().clone() - base[editor.layout.rewrite_weight_name(editor.hp.layers[0])]
    model.load_state_dict(base)
    combined = _editor(model, tok, tmp_path, templates=bare).edit(REQUESTS, apply=False).delta.weights[0].dense()
    assert _rel(rounds, combined) < 1e-6
    # plain sequential MEMIT forgets: its rounds do not add up to the combined solve
    seq = SequentialEditor(_editor(model, tok, tmp_path, templates=bare), "memit")
    for batch in split_rounds(REQUESTS, 2):
        seq.edit_round(batch)
    assert _rel(w.detach() - base[editor.layout.rewrite_weight_name(editor.hp.layers[0])], combined) > 1e-3


# --------------------------------------------------------------------------- ledger


def _run(tmp_path, ledger_dir, rule="alphaedit", snapshots=None, **editor_kw):
    model, tok = make_model("gpt2")
    editor = _editor(model, tok, tmp_path, layers=(1, 2), **editor_kw)
    seq = SequentialEditor(editor, rule, ledger_dir)
    for batch in seq.pending(split_rounds(REQUESTS, 2)):
        seq.edit_round(batch)
        if snapshots is not None:
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, seq


def _same(model, snapshot) -> bool:
    return all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def test_ledger_revert_last_k_is_bit_identical_to_the_model_after_round_n_minus_k(tmp_path, fixed_z):
    snapshots = []
    model, seq = _run(tmp_path, tmp_path / "ledger", snapshots=snapshots)
    ledger = seq.ledger
    assert len(ledger) == 3 and [r["round"] for r in ledger.rounds()] == [1, 2, 3]
    assert ledger.verify(model) == [] and _same(model, snapshots[-1])  # verify leaves the model as it was
    ledger.revert_last(model, 2)
    assert _same(model, snapshots[0]) and len(ledger) == 1
    assert len(list((tmp_path / "ledger" / "reverted").glob("*/*"))) == 2
    assert ledger.verify(model) == []
    with torch.no_grad():
        dict(model.named_parameters())["transformer.h.2.mlp.c_proj.weight"][0, 0] += 1.0
    assert ledger.verify(model) and ledger.state_of(model) == "other"


def test_crash_mid_round_leaves_a_consistent_ledger_and_resume_finishes_the_job(tmp_path, fixed_z, monkeypatch):
    reference, _ = _run(tmp_path, tmp_path / "uninterrupted")
    real_save = ledger_mod.save_file
    calls = {"n": 0}

    def crash_on_second_round(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the second round's keys file, after its delta was written
            raise KeyboardInterrupt("injected crash")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ledger_mod, "save_file", crash_on_second_round)
    snapshots = []
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, tmp_path / "ledger", snapshots=snapshots)
    monkeypatch.setattr(ledger_mod, "save_file", real_save)
    ledger = Ledger(tmp_path / "ledger")  # reopening removes the interrupted round's partial directory
    assert len(ledger) == 1 and not list((tmp_path / "ledger" / "rounds").glob(".*"))
    # a fresh process: the base model again; round 1 is replayed, rounds 2 and 3 run
    model, seq = _run(tmp_path, tmp_path / "ledger")
    assert len(seq.results) == 2 and len(seq.ledger) == 3
    assert _same(model, reference.state_dict())


def test_sequential_editor_revert_last_without_a_ledger_restores_weights_and_preserved_keys(tmp_path, fixed_z):
    snapshots = []
    model, seq = _run(tmp_path, None, rule="memit-preserve", snapshots=snapshots)
    preserved_after_one = {l: k.T.double() @ k.double() for l, k in seq._keys[0].items()}
    seq.revert_last(2)
    assert _same(model, snapshots[0]) and seq.rounds_done == 1 and len(seq.results) == 1
    assert all(torch.equal(seq.preserved[l], p) for l, p in preserved_after_one.items())
    with pytest.raises(ValueError, match="can revert 1 to 1 rounds"):
        seq.revert_last(2)
