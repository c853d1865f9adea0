"""Statistics survive an interruption: a resumed pass equals an uninterrupted one exactly."""
import random

import pytest
import torch

import massedit.compute.stats as stats
from massedit.model.arch import ModelLayout
from tiny import WORDS, make_model


def _texts(n=60, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(n)]


def test_resumed_statistics_equal_uninterrupted(tmp_path, monkeypatch):
    model, tok = make_model("gpt2")
    layout = ModelLayout(model)
    texts, layers = _texts(), [1, 2]
    full = stats.second_moments(model, layout, tok, texts, layers, batch_tokens=200, progress=False)

    ckpt = tmp_path / "pass.partial.npz"
    calls = {"n": 0}
    real = stats.accumulate_xtx

    def crash_after_some(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2 * 7:  # two layers per batch: dies during the 8th batch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stats, "accumulate_xtx", crash_after_some)
    with pytest.raises(KeyboardInterrupt):
        stats.second_moments(model, layout, tok, texts, layers, batch_tokens=200, progress=False,
                             checkpoint=ckpt, checkpoint_every=3)
    assert ckpt.exists()
    monkeypatch.setattr(stats, "accumulate_xtx", real)
    resumed_calls = {"n": 0}

    def counting(*args, **kwargs):
        resumed_calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(stats, "accumulate_xtx", counting)
    resumed = stats.second_moments(model, layout, tok, texts, layers, batch_tokens=200, progress=False,
                                   checkpoint=ckpt, checkpoint_every=3)
    n_batches = len(stats._batches([len(tok(t)["input_ids"]) for t in texts], 200))
    assert resumed_calls["n"] == 2 * (n_batches - 6)  # the 6 checkpointed batches are not redone
    assert not ckpt.exists()
    for l in layers:
        assert torch.equal(resumed[l][0], full[l][0])
        assert resumed[l][1] == full[l][1]


def test_checkpoint_from_other_corpus_is_ignored(tmp_path):
    model, tok = make_model("gpt2")
    layout = ModelLayout(model)
    ckpt = tmp_path / "pass.partial.npz"
    acc = {1: torch.ones(layout.key_dim(1), layout.key_dim(1))}
    stats._save_checkpoint(ckpt, acc, 123, 1, "not-this-corpus")
    with pytest.warns(UserWarning, match="another model, corpus"):
        got = stats.second_moments(model, layout, tok, _texts(10), [1], progress=False, checkpoint=ckpt)
    assert torch.equal(got[1][0], stats.second_moments(model, layout, tok, _texts(10), [1], progress=False)[1][0])


def test_token_count_is_every_real_token():
    model, tok = make_model("llama")
    texts = _texts(20, seed=2)
    got = stats.second_moments(model, ModelLayout(model), tok, texts, [2], batch_tokens=128, progress=False)
    assert got[2][1] == sum(len(tok(t)["input_ids"]) for t in texts)
