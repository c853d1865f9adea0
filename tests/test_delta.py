"""EditDelta: apply adds U Vᵀ to exactly the targeted weights; revert restores them bit for bit."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from massedit.model.loading import dtype_kwargs

import massedit.edits.delta as delta_mod
from massedit.model.arch import ModelLayout
from massedit.edits.delta import DeltaError, EditDelta, WeightDelta, config_hash
from tiny import make_model

LAYERS = (0, 2, 3)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(model, snapshot) -> None:
    for name, value in model.state_dict().items():
        assert torch.equal(value, snapshot[name]), name


def _make_delta(model, n=5, rel=0.1, layers=LAYERS, seed=1, factor_dtype=torch.float32) -> EditDelta:
    """Random rank-n factors with |Δ| about `rel` times the weight's typical entry."""
    layout = ModelLayout(model)
    g = torch.Generator().manual_seed(seed)
    weights = []
    for layer in layers:
        w = layout.rewrite_module(layer).weight
        d_model, d_ff = layout.hidden_size, layout.key_dim(layer)
        u = torch.randn(d_model, n, generator=g, dtype=factor_dtype)
        v = torch.randn(d_ff, n, generator=g, dtype=factor_dtype) * (rel * w.float().std().item() / n**0.5)
        weights.append(WeightDelta(layout.rewrite_weight_name(layer), u, v, layout.rewrite_is_conv1d(layer)))
    return EditDelta(weights, {"config_hash": config_hash(model), "layers": list(layers), "n_requests": n})


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("n", [1, 5, 16])
def test_apply_adds_delta_to_targeted_weights_only(kind, n):
    model, _ = make_model(kind)
    before = _snapshot(model)
    delta = _make_delta(model, n=n)
    delta.apply(model)
    assert delta.is_applied(model)
    after = model.state_dict()
    targeted = {wd.name: wd for wd in delta.weights}
    for name, value in after.items():
        if name not in targeted:
            assert torch.equal(value, before[name]), name
            continue
        wd = targeted[name]
        direct = wd.u.double() @ wd.v.double().T
        direct = direct.T if wd.transposed else direct
        assert wd.transposed == (kind == "gpt2") and direct.shape == value.shape
        expected = before[name].double() + direct
        assert not torch.equal(value, before[name])
        # One rounding to float32, nothing more.
        assert torch.allclose(value.double(), expected, rtol=2**-23, atol=1e-12)
        assert torch.equal(value, (before[name].double() + wd.dense()).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("rel", [0.1, 10.0])
def test_revert_is_bit_identical(kind, dtype, rel, tmp_path):
    model, _ = make_model(kind, dtype=dtype)
    before = _snapshot(model)
    delta = _make_delta(model, n=16, rel=rel)
    delta.apply(model)
    if rel > 1:
        # A Δ this large crosses binades nearly everywhere: naive subtraction cannot be exact.
        assert delta.n_fixups > 0
    delta.revert(model)
    assert not delta.is_applied(model)
    _assert_same(model, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_revert_after_save_load_of_delta_and_model(dtype, tmp_path):
    model, _ = make_model("gpt2", dtype=dtype)
    before = _snapshot(model)
    delta = _make_delta(model, n=5, rel=10.0)
    delta.apply(model)
    delta.save(tmp_path / "out" / "delta.safetensors")
    model.save_pretrained(tmp_path / "edited")

    from transformers import AutoModelForCausalLM

    edited = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", **dtype_kwargs(dtype))
    loaded = EditDelta.load(tmp_path / "out" / "delta.safetensors")
    assert loaded.is_applied(edited) and loaded.n_fixups == delta.n_fixups
    loaded.revert(edited)
    _assert_same(edited, before)


_CHILD = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import load_file, save_file
    from massedit.edits.delta import EditDelta
    torch.set_num_threads(1)
    d = sys.argv[1]
    model = torch.nn.Linear(1, 1, bias=False)
    model.weight = torch.nn.Parameter(load_file(d + "/edited.safetensors")["w"])
    EditDelta.load(d + "/delta.safetensors").revert(model)
    save_file({"w": model.weight.detach()}, d + "/reverted.safetensors")
    """
)


def test_revert_in_another_process(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(3)
    model = torch.nn.Linear(96, 40, bias=False).to(torch.bfloat16)
    original = model.weight.detach().clone()
    u, v = torch.randn(40, 7), torch.randn(96, 7) * 0.1
    delta = EditDelta([WeightDelta("weight", u, v)], {"method": "test"})
    delta.apply(model)
    delta.save(tmp_path / "delta.safetensors")
    save_file({"w": model.weight.detach()}, str(tmp_path / "edited.safetensors"))
    subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], check=True)
    assert torch.equal(load_file(str(tmp_path / "reverted.safetensors"))["w"], original)


def test_chunked_dense_matches_and_reverts(monkeypatch):
    model, _ = make_model("llama", dtype=torch.bfloat16)
    before = _snapshot(model)
    delta = _make_delta(model, n=16, rel=10.0)
    wd = delta.weights[0]
    whole = wd.dense()
    monkeypatch.setattr(delta_mod, "_CHUNK_BYTES", 8 * 64 * 3)  # 3 rows a chunk, ragged last chunk
    chunks = list(delta_mod._dense_rows(wd, "cpu"))
    assert len(chunks) == 11
    assert torch.allclose(wd.dense(), whole, rtol=1e-12, atol=0)
    delta.apply(model)
    delta.revert(model)
    _assert_same(model, before)


def test_save_load_keeps_factors_and_metadata(tmp_path):
    model, _ = make_model("gpt2")
    delta = _make_delta(model, n=3, factor_dtype=torch.float64)
    delta.metadata["hparams"] = {"layers": [0, 2, 3], "mom2_update_weight": 15000.0}
    delta.save(tmp_path / "delta.safetensors")
    loaded = EditDelta.load(tmp_path / "delta.safetensors")
    assert not loaded.is_applied(model)
    assert loaded.metadata == delta.metadata
    for a, b in zip(delta.weights, loaded.weights):
        assert (a.name, a.transposed) == (b.name, b.transposed)
        assert b.u.dtype == torch.float64 and torch.equal(a.u, b.u) and torch.equal(a.v, b.v)


def test_shape_mismatch_and_missing_weight():
    model, _ = make_model("gpt2")
    name = ModelLayout(model).rewrite_weight_name(1)
    bad = EditDelta([WeightDelta(name, torch.randn(32, 2), torch.randn(65, 2), transposed=True)], {})
    with pytest.raises(DeltaError, match=r"expects shape \(65, 32\).*has shape \(64, 32\).*another model"):
        bad.apply(model)
    llama, _ = make_model("llama")
    with pytest.raises(DeltaError, match=r"no such parameter.*another model"):
        _make_delta(llama).apply(model, force=True)


def test_config_hash_mismatch():
    model, _ = make_model("gpt2")
    half, _ = make_model("gpt2", dtype=torch.float16)
    assert config_hash(model) == config_hash(half)  # the load dtype does not change the model
    other, _ = make_model("gpt2")
    other.config.layer_norm_epsilon = 1e-6
    assert config_hash(other) != config_hash(model)
    delta = _make_delta(model)
    before = _snapshot(other)
    with pytest.raises(DeltaError, match="config hash mismatch.*force=True"):
        delta.apply(other)
    _assert_same(other, before)
    delta.apply(other, force=True)
    delta.revert(other)
    _assert_same(other, before)


def test_non_finite_factors_refused():
    model, _ = make_model("llama")
    before = _snapshot(model)
    delta = _make_delta(model)
    delta.weights[-1].v[3, 0] = float("nan")
    with pytest.raises(DeltaError, match="NaN"):
        delta.apply(model)
    assert not delta.is_applied(model)
    _assert_same(model, before)


def test_revert_refused_after_weights_changed():
    model, _ = make_model("gpt2")
    original = _snapshot(model)
    delta = _make_delta(model)
    delta.apply(model)
    with torch.no_grad():
        model.get_parameter(delta.weights[1].name)[0, 0] += 1e-3
    changed = _snapshot(model)
    with pytest.raises(DeltaError, match=r"changed since.*exact=False"):
        delta.revert(model)
    _assert_same(model, changed)
    assert not delta.is_applied(model)
    delta.revert(model, exact=False)
    for wd in delta.weights:
        assert torch.allclose(model.get_parameter(wd.name), original[wd.name], atol=2e-3)


def test_revert_refused_after_dtype_change():
    model, _ = make_model("llama")
    delta = _make_delta(model)
    delta.apply(model)
    model.half()
    with pytest.raises(DeltaError, match="same dtype"):
        delta.revert(model)


def test_failed_write_mid_apply_restores_model(monkeypatch):
    model, _ = make_model("llama", dtype=torch.bfloat16)
    before = _snapshot(model)
    delta = _make_delta(model, rel=10.0)
    real_write, calls = delta_mod.write_parameter, []

    def flaky_write(model_, name, value):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        real_write(model_, name, value)

    monkeypatch.setattr(delta_mod, "write_parameter", flaky_write)
    with pytest.raises(RuntimeError, match="injected"):
        delta.apply(model)
    assert not delta.is_applied(model)
    _assert_same(model, before)


def test_overflow_mid_apply_restores_model():
    model, _ = make_model("gpt2", dtype=torch.float16)
    before = _snapshot(model)
    delta = _make_delta(model)
    delta.weights[1].u.mul_(1e9)
    with pytest.raises(DeltaError, match="overflows"):
        delta.apply(model)
    assert not delta.is_applied(model)
    _assert_same(model, before)


def test_apply_revert_state_errors():
    model, _ = make_model("gpt2")
    delta = _make_delta(model)
    with pytest.raises(DeltaError, match="not applied"):
        delta.revert(model)
    delta.apply(model)
    with pytest.raises(DeltaError, match="already applied"):
        delta.apply(model)
    delta.revert(model)
    with pytest.raises(DeltaError, match="not applied"):
        delta.revert(model)
    with pytest.raises(DeltaError, match="once"):
        EditDelta(delta.weights + delta.weights[:1], {})
