"""Issue 11, items 1, 3 and 8 in the statistics library: a statistics file knows which model it
belongs to, float16 sums never overflow silently, non-finite statistics are refused, a corrupt
resume checkpoint is discarded, files honour the umask, and model names stay inside --stats-dir."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

import massedit.compute.stats as stats_mod
from massedit.model.arch import ModelLayout
from massedit.hparams import default_for
from massedit.model.loading import model_name_for
from massedit.compute.stats import (IDENTITY_KEY, ModelIdentity, StatsError, check_model_name, layer_covariances,
                            read_stats, write_stats)
from tiny import WORDS, make_model

DOCS = [" ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(5 + i % 9)) for i in range(12)]


def _hp(model, layers=(1, 2), dtype="float32", n=len(DOCS)):
    return default_for(model.config).replace(layers=list(layers), mom2_n_samples=n, mom2_dataset="tiny",
                                             mom2_dtype=dtype)


def _files(root, name="model"):
    return sorted((root / name / "tiny_stats").glob("*.npz"))


def test_another_models_statistics_are_refused_not_used(tmp_path):
    """Two different models under one name (`world build` saves every model as `model`)."""
    first, tok = make_model("gpt2", seed=0)
    second, _ = make_model("gpt2", seed=1)
    layer_covariances(first, ModelLayout(first), tok, _hp(first), tmp_path, "model", DOCS, progress=False)
    written = {p: p.read_bytes() for p in _files(tmp_path)}
    with pytest.raises(StatsError) as info:
        layer_covariances(second, ModelLayout(second), tok, _hp(second), tmp_path, "model", DOCS, progress=False)
    message = str(info.value)
    assert "belongs to another model" in message and str(_files(tmp_path)[0]) in message
    assert "--model-name" in message and "delete" in message and "same checkpoint" not in message
    assert {p: p.read_bytes() for p in _files(tmp_path)} == written  # the other model's files are kept
    # under its own name the second model gets its own statistics, which differ
    own = layer_covariances(second, ModelLayout(second), tok, _hp(second), tmp_path, "model-b", DOCS, progress=False)
    again = layer_covariances(first, ModelLayout(first), tok, _hp(first), tmp_path, "model", None, progress=False)
    assert not torch.allclose(own[1][0] / own[1][1], again[1][0] / again[1][1])


def test_same_checkpoint_loaded_otherwise_is_named_as_such(tmp_path):
    """A checkpoint's float statistics refused for the same checkpoint loaded with --quantize: both
    identities name the same source, so the message says why they still differ."""
    first, tok = make_model("gpt2", seed=0)
    second, _ = make_model("gpt2", seed=0)
    for m in (first, second):
        m.config._name_or_path = "worlds/w/model"
    with torch.no_grad():
        ModelLayout(second).block(0).attn.c_attn.weight.mul_(1.01)  # as quantization perturbs it
    layer_covariances(first, ModelLayout(first), tok, _hp(first), tmp_path, "model", DOCS, progress=False)
    with pytest.raises(StatsError, match=r"\(worlds/w/model, .*\(worlds/w/model, .*same checkpoint.*--quantize"):
        layer_covariances(second, ModelLayout(second), tok, _hp(second), tmp_path, "model", DOCS, progress=False)


def test_identity_ignores_load_dtype_and_edits_but_not_other_weights():
    model, tok = make_model("gpt2")
    layout = ModelLayout(model)
    base = ModelIdentity(model, layout, "m").of_layer(2)
    half = make_model("gpt2")[0].half()
    roundtrip = make_model("gpt2")[0].half().float()
    assert ModelIdentity(half, ModelLayout(half), "m").of_layer(2) == ModelIdentity(
        roundtrip, ModelLayout(roundtrip), "m").of_layer(2)
    with torch.no_grad():
        layout.rewrite_module(1).weight.add_(0.5)  # what an edit changes: the base's statistics still apply
    assert ModelIdentity(model, layout, "m").of_layer(2) == base
    with torch.no_grad():
        layout.block(2).attn.c_attn.weight.add_(1e-3)  # block 2 feeds layer 2's keys
    assert ModelIdentity(model, layout, "m").of_layer(2)["weights_sha256"] != base["weights_sha256"]
    fresh = make_model("gpt2")[0]
    assert ModelIdentity(model, layout, "m").of_layer(1) == ModelIdentity(fresh, ModelLayout(fresh), "m").of_layer(1)
    with torch.no_grad():
        layout.block(3).attn.c_attn.weight.add_(1e-3)  # later blocks do not
    later = ModelIdentity(model, layout, "m").of_layer(2)
    with torch.no_grad():
        layout.block(3).attn.c_attn.weight.sub_(1)
    assert ModelIdentity(model, layout, "m").of_layer(2) == later


def test_written_files_carry_the_identity_and_stay_reference_readable(tmp_path):
    model, tok = make_model("llama")
    layer_covariances(model, ModelLayout(model), tok, _hp(model), tmp_path, "model", DOCS, progress=False)
    for path in _files(tmp_path):
        with np.load(path, allow_pickle=False) as data:
            assert {"mom2.mom2", "mom2.count", "sample_size", "mom2.constructor", IDENTITY_KEY} <= set(data.files)
            # the reference reads the "mom2." keys only; the identity is a plain string array
            assert data[IDENTITY_KEY].dtype.kind == "U"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x"])
def test_path_like_model_names_are_refused(name, tmp_path):
    with pytest.raises(StatsError, match=rf"model name {re.escape(repr(name))} .*; pass --model-name NAME"):
        check_model_name(name)


def test_model_name_of_dot_and_dotdot(tmp_path, monkeypatch):
    model_dir = tmp_path / "my-model"
    (model_dir / "sub").mkdir(parents=True)
    monkeypatch.chdir(model_dir)
    assert model_name_for(".") == "my-model" and model_name_for("./") == "my-model"
    monkeypatch.chdir(model_dir / "sub")
    assert model_name_for("..") == "my-model"
    assert model_name_for("EleutherAI/gpt-j-6B") == "EleutherAI_gpt-j-6B"


def test_short_corpus_is_said_and_recorded(tmp_path):
    model, tok = make_model("gpt2")
    with pytest.warns(UserWarning, match=r"12 documents, fewer than the 50 samples asked.*sample_size"):
        layer_covariances(model, ModelLayout(model), tok, _hp(model, n=50), tmp_path, "model", DOCS, progress=False)
    for path in _files(tmp_path):
        assert path.name.endswith("_mom2_50.npz")
        with np.load(path, allow_pickle=False) as data:
            assert int(data["sample_size"]) == len(DOCS)


def test_float16_statistics_are_refused_before_any_work(tmp_path, monkeypatch):
    model, tok = make_model("gpt2")
    monkeypatch.setattr(stats_mod, "second_moments", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(StatsError, match="float16 cannot hold the raw sum.*float32"):
        layer_covariances(model, ModelLayout(model), tok, _hp(model, dtype="float16"), tmp_path, "model", DOCS,
                          progress=False)
    assert not (tmp_path / "model").exists()


def test_non_finite_statistics_are_refused_when_written_and_read(tmp_path):
    path = tmp_path / "m" / "x_stats" / "layer_float16_mom2_5.npz"
    mom2 = (torch.eye(4) * 7e4).to(torch.float16)  # what storing a large sum in float16 gives
    mom2[1, 1] = mom2[2, 2] = 1.0
    with pytest.raises(StatsError, match="2 non-finite entries.*nothing was written"):
        write_stats(path, mom2, 10, 5)
    assert not path.exists()
    path.parent.mkdir(parents=True)
    # a float16 file as an overflowing writer (the reference, or massedit before) left it
    np.savez(path, **{"mom2.mom2": np.full((4, 4), np.inf, dtype=np.float16), "mom2.count": np.array(10),
                      "sample_size": np.array(5)})
    with pytest.raises(StatsError, match=r"16 non-finite entries.*overflowed.*float32"):
        read_stats(path, 4)


def test_statistics_files_honour_the_umask(tmp_path):
    model, tok = make_model("gpt2")
    old = os.umask(0o022)
    try:
        layer_covariances(model, ModelLayout(model), tok, _hp(model), tmp_path, "model", DOCS, progress=False)
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in _files(tmp_path)} == {oct(0o644)}


@pytest.mark.parametrize("content", [b"PK\x03\x04 half a zip", b"not a zip at all", "pickled"])
def test_corrupt_checkpoint_is_discarded_with_a_warning(content, tmp_path):
    model, tok = make_model("gpt2")
    layout = ModelLayout(model)
    ckpt = tmp_path / "pass_1_float32.partial.npz"
    if content == "pickled":  # an npz whose arrays need pickle, which is never loaded
        np.savez(ckpt, fingerprint=np.array([{"a": 1}], dtype=object), count=np.array(1), done=np.array(1))
    else:
        ckpt.write_bytes(content)
    with pytest.warns(UserWarning, match="discarding unreadable statistics checkpoint.*starting over"):
        got = stats_mod.second_moments(model, layout, tok, DOCS, [1], progress=False, checkpoint=ckpt)
    assert not ckpt.exists()
    fresh = stats_mod.second_moments(model, layout, tok, DOCS, [1], progress=False)
    assert torch.equal(got[1][0], fresh[1][0]) and got[1][1] == fresh[1][1]


def test_checkpoint_of_another_model_is_not_resumed(tmp_path):
    model, tok = make_model("gpt2")
    layout = ModelLayout(model)
    ckpt = tmp_path / "pass.partial.npz"
    key = stats_mod._fingerprint([tok(t)["input_ids"] for t in DOCS], [1], torch.float32, 8192, "other-model")
    stats_mod._save_checkpoint(ckpt, {1: torch.ones(64, 64)}, 5, 1, key)
    with pytest.warns(UserWarning, match="another model"):
        got = stats_mod.second_moments(model, layout, tok, DOCS, [1], progress=False, checkpoint=ckpt,
                                       model_digest="this-model")
    assert torch.equal(got[1][0], stats_mod.second_moments(model, layout, tok, DOCS, [1], progress=False)[1][0])


def test_identity_of_an_offloaded_model_reads_the_offloaded_weights():
    from accelerate import cpu_offload

    model, _ = make_model("gpt2")
    offloaded, _ = make_model("gpt2")
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert offloaded.get_input_embeddings().weight.device.type == "meta"
    expected = ModelIdentity(model, ModelLayout(model), "m").of_layer(3)
    assert ModelIdentity(offloaded, ModelLayout(offloaded), "m").of_layer(3) == expected
