"""Covariance statistics (DESIGN §2.4): the one-pass engine against a plain per-document loop, the
reference file layout (write, reuse, read foreign files, errors, atomic writes), and the rule that
statistics come from the unedited model."""
from __future__ import annotations


import numpy as np
import pytest
import torch

import massedit.compute.stats as stats_mod
from massedit.model.arch import ModelLayout
from massedit.editor import MassEditor
from massedit.hparams import default_for
from massedit.compute.stats import StatsError, layer_covariances, second_moments
from tiny import WORDS, make_model

MODEL_NAME = "tiny-model"


def _documents(n_words=(1, 3, 8, 20, 45, 90, 400, 2, 13)) -> list[str]:
    """Documents of very different lengths from the tiny vocabulary; the 400-word one is longer
    than the tiny models' context (128 positions) and must be truncated."""
    docs = []
    for i, n in enumerate(n_words):
        docs.append(" ".join(WORDS[(7 * i + 3 * j + j * j) % len(WORDS)] for j in range(n)))
    return docs


def _context_length(model) -> int:
    cfg = model.config
    return int(getattr(cfg, "n_positions", None) or cfg.max_position_embeddings)


def _reference_second_moments(model, tok, texts, layers) -> dict[int, tuple[torch.Tensor, int]]:
    """Σ k kᵀ (float64) and the token count per layer: each layer on its own, each document on its
    own (no padding), the key read with a forward pre-hook on the rewrite module."""
    layout = ModelLayout(model)
    max_len = _context_length(model)
    out = {}
    for layer in layers:
        module = layout.rewrite_module(layer)
        captured: dict[str, torch.Tensor] = {}

        def pre_hook(_m, args, kwargs):
            captured["key"] = args[0] if args else next(iter(kwargs.values()))

        def mlp_hook(_m, args, kwargs):
            captured["mlp_in"] = args[0] if args else next(iter(kwargs.values()))

        mlp = model.get_submodule(layout.rewrite_name(layer).rsplit(".", 1)[0])  # the block's MLP
        handles = [module.register_forward_pre_hook(pre_hook, with_kwargs=True),
                   mlp.register_forward_pre_hook(mlp_hook, with_kwargs=True)]
        acc = torch.zeros(layout.key_dim(layer), layout.key_dim(layer), dtype=torch.float64)
        count = 0
        try:
            with torch.no_grad():
                for text in texts:
                    ids = tok(text)["input_ids"][:max_len]
                    if not ids:
                        continue
                    model(input_ids=torch.tensor([ids]))
                    feats = captured["key"].reshape(-1, captured["key"].shape[-1]).double()
                    assert feats.shape[0] == len(ids)
                    # The key is the MLP's hidden activation: act(c_fc(x)) for GPT-2, act(gate(x)) * up(x)
                    # for gated MLPs — i.e. exactly the down projection's input.
                    x = captured["mlp_in"]
                    if hasattr(mlp, "gate_proj"):
                        direct = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
                    else:
                        direct = mlp.act(mlp.c_fc(x))
                    torch.testing.assert_close(direct.reshape(feats.shape).double(), feats, rtol=1e-5, atol=1e-6)
                    acc += feats.T @ feats
                    count += len(ids)
        finally:
            for h in handles:
                h.remove()
        out[layer] = (acc, count)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("kind,layers", [("gpt2", [0, 2, 3]), ("llama", [1, 3])])
@pytest.mark.parametrize("batch_tokens", [48, 8192])
def test_one_pass_statistics_equal_per_document_reference(kind, layers, batch_tokens):
    model, tok = make_model(kind)
    docs = _documents()
    lengths = [len(tok(d)["input_ids"]) for d in docs]
    assert max(lengths) > _context_length(model), "one document must exceed the context length"
    assert sum(n > 48 for n in lengths) >= 2 and min(lengths) <= 3  # some longer than a 48-token batch
    layout = ModelLayout(model)
    got = second_moments(model, layout, tok, docs, layers, torch.float32, batch_tokens=batch_tokens, progress=False)
    ref = _reference_second_moments(model, tok, docs, layers)
    expected_tokens = sum(min(n, _context_length(model)) for n in lengths)
    assert set(got) == set(layers)
    for layer in layers:
        mom2, count = got[layer]
        ref_mom2, ref_count = ref[layer]
        assert count == ref_count == expected_tokens
        assert mom2.shape == ref_mom2.shape == (layout.key_dim(layer), layout.key_dim(layer))
        assert _rel(mom2, ref_mom2) <= 1e-5, (layer, _rel(mom2, ref_mom2))
        assert torch.equal(mom2, mom2.T)


def test_float64_accumulation_matches_too():
    model, tok = make_model("gpt2")
    docs = _documents()
    got = second_moments(model, ModelLayout(model), tok, docs, [1], torch.float64, batch_tokens=64, progress=False)
    ref = _reference_second_moments(model, tok, docs, [1])
    assert got[1][0].dtype == torch.float64
    assert _rel(got[1][0], ref[1][0]) <= 1e-6
    assert got[1][1] == ref[1][1]


# ------------------------------------------------------------------------------ file layout


@pytest.fixture
def gpt2():
    model, tok = make_model("gpt2")
    return model, tok, ModelLayout(model)


def _hp(model, layers=(1, 2), n=6, dataset="tinywiki"):
    return default_for(model.config).replace(layers=list(layers), mom2_n_samples=n, mom2_dataset=dataset)


def _path(root, layer, n=6, dataset="tinywiki", dtype="float32"):
    # Written out by hand from the reference layout, not through massedit.compute.stats.stats_file.
    return root / MODEL_NAME / f"{dataset}_stats" / f"transformer.h.{layer}.mlp.c_proj_{dtype}_mom2_{n}.npz"


def test_layer_covariances_write_reference_layout(gpt2, tmp_path):
    model, tok, layout = gpt2
    docs = _documents()  # 9 documents, the first 6 are used
    hp = _hp(model)
    covs = layer_covariances(model, layout, tok, hp, tmp_path, MODEL_NAME, docs, progress=False)
    ref = _reference_second_moments(model, tok, docs[:6], [1, 2])
    for layer in (1, 2):
        path = _path(tmp_path, layer)
        assert path.is_file(), sorted(p.name for p in path.parent.iterdir())
        with np.load(path, allow_pickle=False) as data:
            assert {"mom2.mom2", "mom2.count", "sample_size", "mom2.constructor"} <= set(data.files)
            mom2, count, sample_size = data["mom2.mom2"], int(data["mom2.count"]), int(data["sample_size"])
            assert "SecondMoment" in str(data["mom2.constructor"])
        assert mom2.dtype == np.float32 and mom2.shape == (64, 64)
        assert count == ref[layer][1] and sample_size == 6
        # mom2.mom2 is the SUM of k kᵀ, not the mean
        assert _rel(torch.from_numpy(mom2), ref[layer][0]) <= 1e-5
        assert covs[layer][0].device.type == "cpu" and covs[layer][1] == count
        assert torch.equal(covs[layer][0], torch.from_numpy(mom2))
    assert sorted(p.name for p in (tmp_path / MODEL_NAME / "tinywiki_stats").iterdir()) == [
        _path(tmp_path, 1).name, _path(tmp_path, 2).name]  # no temp files left


def test_second_call_reuses_the_files(gpt2, tmp_path, monkeypatch):
    model, tok, layout = gpt2
    hp = _hp(model)
    first = layer_covariances(model, layout, tok, hp, tmp_path, MODEL_NAME, _documents(), progress=False)
    mtimes = {l: _path(tmp_path, l).stat().st_mtime_ns for l in (1, 2)}

    def no_recompute(*_a, **_k):
        raise AssertionError("statistics were recomputed although the files exist")

    monkeypatch.setattr(stats_mod, "second_moments", no_recompute)
    for corpus in (None, _documents()):
        again = layer_covariances(model, layout, tok, hp, tmp_path, MODEL_NAME, corpus, progress=False)
        for l in (1, 2):
            assert torch.equal(again[l][0], first[l][0]) and again[l][1] == first[l][1]
            assert _path(tmp_path, l).stat().st_mtime_ns == mtimes[l]


def test_only_missing_layers_are_computed(gpt2, tmp_path, monkeypatch):
    model, tok, layout = gpt2
    layer_covariances(model, layout, tok, _hp(model, layers=[1]), tmp_path, MODEL_NAME, _documents(), progress=False)
    seen = []
    real = stats_mod.second_moments

    def spy(model_, layout_, tok_, texts, layers, *a, **k):
        seen.append(list(layers))
        return real(model_, layout_, tok_, texts, layers, *a, **k)

    monkeypatch.setattr(stats_mod, "second_moments", spy)
    layer_covariances(model, layout, tok, _hp(model, layers=[1, 2]), tmp_path, MODEL_NAME, _documents(), progress=False)
    assert seen == [[2]]


def test_hand_written_reference_file_is_read_as_is(gpt2, tmp_path):
    model, tok, layout = gpt2
    rng = np.random.default_rng(0)
    sums = {}
    for layer in (1, 2):
        a = rng.standard_normal((64, 300)).astype(np.float32)
        sums[layer] = a @ a.T  # a random SPD sum, as the reference's SecondMoment stores it
        path = _path(tmp_path, layer, n=5000, dataset="wikipedia")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            path,
            **{
                "constructor": np.array("util.runningstats.CombinedStat()"),
                "mom2.constructor": np.array("util.runningstats.SecondMoment()"),
                "mom2.count": np.array(1234),
                "mom2.mom2": sums[layer],
                "sample_size": np.array(5000),
            },
        )
    hp = _hp(model, n=5000, dataset="wikipedia")
    # Nothing in such a file says which model it belongs to: the caller must name the model.
    with pytest.raises(StatsError, match="no model fingerprint.*--model-name tiny-model"):
        layer_covariances(model, layout, tok, hp, tmp_path, MODEL_NAME, corpus=_documents(), progress=False)
    covs = layer_covariances(model, layout, tok, hp, tmp_path, MODEL_NAME, corpus=None, progress=False,
                             explicit_name=True)
    for layer in (1, 2):
        assert torch.equal(covs[layer][0], torch.from_numpy(sums[layer])) and covs[layer][1] == 1234


def test_wrong_shape_is_rejected_with_the_fix(gpt2, tmp_path):
    model, tok, layout = gpt2
    path = _path(tmp_path, 1)
    path.parent.mkdir(parents=True)
    np.savez(path, **{"mom2.mom2": np.eye(10, dtype=np.float32), "mom2.count": np.array(10),
                      "sample_size": np.array(6), "mom2.constructor": np.array("util.runningstats.SecondMoment()")})
    with pytest.raises(StatsError) as info:
        layer_covariances(model, layout, tok, _hp(model), tmp_path, MODEL_NAME, _documents(), progress=False)
    message = str(info.value)
    assert "(10, 10)" in message and "64" in message and str(path) in message
    assert "delete it" in message and "--stats-dir" in message


def test_missing_statistics_without_corpus(gpt2, tmp_path):
    model, tok, layout = gpt2
    with pytest.raises(StatsError, match="pass a corpus") as info:
        layer_covariances(model, layout, tok, _hp(model), tmp_path, MODEL_NAME, corpus=None, progress=False)
    assert "--corpus" in str(info.value)
    assert not (tmp_path / MODEL_NAME).exists()


def test_write_is_atomic(gpt2, tmp_path, monkeypatch):
    model, tok, layout = gpt2
    real_savez = np.savez

    def savez_that_dies(file, *args, **kwds):
        file.write(b"PK\x03\x04 half an archive")  # something reached the disk already
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", savez_that_dies)
    with pytest.raises(OSError, match="No space left"):
        layer_covariances(model, layout, tok, _hp(model), tmp_path, MODEL_NAME, _documents(), progress=False)
    stats_dir = tmp_path / MODEL_NAME / "tinywiki_stats"
    assert not _path(tmp_path, 1).exists() and not _path(tmp_path, 2).exists()
    assert list(stats_dir.iterdir()) == []  # no leftover temp file

    monkeypatch.setattr(np, "savez", real_savez)
    layer_covariances(model, layout, tok, _hp(model), tmp_path, MODEL_NAME, _documents(), progress=False)
    assert _path(tmp_path, 1).is_file() and _path(tmp_path, 2).is_file()
    assert len(list(stats_dir.iterdir())) == 2


def test_truncated_file_is_an_error_not_a_crash(gpt2, tmp_path):
    model, tok, layout = gpt2
    path = _path(tmp_path, 1)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(StatsError, match="delete it"):
        layer_covariances(model, layout, tok, _hp(model), tmp_path, MODEL_NAME, _documents(), progress=False)


# ------------------------------------------------------------------------- unedited model


REQUESTS = [
    {"subject": "Michael Jordan", "prompt": "{} plays the sport of", "target_new": "baseball"},
    {"subject": "Lionel Messi", "prompt": "{} plays the sport of", "target_new": "tennis"},
]


def test_statistics_come_from_the_unedited_model(tmp_path, monkeypatch):
    model, tok = make_model("gpt2")
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    calls = []
    real = stats_mod.second_moments

    def spy(model_, *args, **kwargs):
        calls.append(all(torch.equal(v, original[k]) for k, v in model_.state_dict().items()))
        return real(model_, *args, **kwargs)

    monkeypatch.setattr(stats_mod, "second_moments", spy)
    hp = default_for(model.config).replace(layers=[1, 2, 3], v_num_grad_steps=5, mom2_n_samples=9)
    editor = MassEditor(model, tok, hp, stats_dir=tmp_path, corpus=_documents(), model_name=MODEL_NAME,
                        context_templates=[["{}"], ["The a. {}"]], progress=False)
    editor.edit(REQUESTS)
    assert calls == [True]  # one pass, on the unedited weights
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, original[k])]
    assert changed == [f"transformer.h.{l}.mlp.c_proj.weight" for l in (1, 2, 3)]

    # The cached files hold the statistics of the original model, every layer included (the
    # reference recomputes later layers' statistics on a partly edited model: DESIGN §9).
    fresh, _ = make_model("gpt2")
    ref = _reference_second_moments(fresh, tok, _documents(), [1, 2, 3])
    for layer in (1, 2, 3):
        with np.load(_path(tmp_path, layer, n=9, dataset="wikipedia"), allow_pickle=False) as data:
            assert _rel(torch.from_numpy(data["mom2.mom2"]), ref[layer][0]) <= 1e-5
