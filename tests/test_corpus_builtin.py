"""Built-in statistics corpora for real models: Python's documentation prose, text the model writes
itself, or both; the default for catalog models; statistics filed under the corpus's name."""
from __future__ import annotations

import pytest

import massedit.inputs.corpus as corpus
from massedit.commands._common import REAL_MODEL_CORPUS, default_corpus
from massedit.inputs.corpus import BUILTIN, corpus_texts, is_builtin, pydoc_texts, sampled_texts
from massedit.model import catalog
from tiny import make_model


def test_pydoc_prose_ships_with_python():
    texts = pydoc_texts()
    assert len(texts) > 500 and all(len(t) >= 200 and "\n" not in t for t in texts)
    assert texts == pydoc_texts()


def test_sampled_text_is_seeded_and_cached(tmp_path, monkeypatch):
    model, tok = make_model("gpt2")
    first = sampled_texts(model, tok, n=5, max_new_tokens=6, batch_size=2)
    assert len(first) == 5 and first == sampled_texts(model, tok, n=5, max_new_tokens=6, batch_size=2)
    assert tok.padding_side == "right"  # restored
    monkeypatch.setattr(corpus, "SAMPLED_DOCS", 4)
    texts = corpus_texts("sampled", 100, model, tok, cache_dir=tmp_path)
    assert len(texts) == 4
    cached = list(tmp_path.glob("sampled-corpus-*.txt"))
    assert len(cached) == 1
    monkeypatch.setattr(corpus, "sampled_texts", lambda *a, **k: pytest.fail("generated again"))
    assert corpus_texts("sampled", 100, model, tok, cache_dir=tmp_path) == texts


def test_mixed_corpus_interleaves_so_a_small_count_takes_from_both(tmp_path, monkeypatch):
    model, tok = make_model("gpt2")
    monkeypatch.setattr(corpus, "SAMPLED_DOCS", 3)
    monkeypatch.setattr(corpus, "SAMPLED_TOKENS", 5)
    texts = corpus_texts("pydoc+sampled", 4, model, tok, cache_dir=tmp_path)
    pydoc = pydoc_texts()
    assert texts[0] == pydoc[0] and texts[2] == pydoc[1] and texts[1] not in pydoc and texts[3] not in pydoc
    assert len(corpus_texts("pydoc+sampled", 10_000, model, tok, cache_dir=tmp_path)) == len(pydoc) + 3


def test_a_path_wins_over_a_builtin_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert all(is_builtin(name) for name in BUILTIN)
    (tmp_path / "pydoc").write_text("my own text\n")
    assert not is_builtin("pydoc")
    assert corpus_texts("pydoc", 10) == ["my own text"]


def test_catalog_models_default_to_the_builtin_corpus_of_their_preset():
    from massedit.hparams import preset

    for name in catalog.CATALOG:
        assert default_corpus(name, None) == preset(name).mom2_dataset
    name = next(iter(catalog.CATALOG))
    assert default_corpus(name, "mine.txt") == "mine.txt"
    assert default_corpus("./some/model", None) is None


def test_catalog_presets_name_a_builtin_corpus_and_other_models_fall_back():
    """Statistics of a catalog model are computed from its preset's corpus and filed under its name:
    a preset naming a corpus nothing can compute offline would leave `massedit edit` without them."""
    from massedit.commands._common import preset_corpus
    from massedit.hparams import preset

    assert all(is_builtin(preset(name).mom2_dataset) for name in catalog.CATALOG)
    assert preset_corpus(preset("gpt2-xl")) == REAL_MODEL_CORPUS  # its preset names wikipedia


def test_stats_command_files_builtin_statistics_under_the_corpus_name(tmp_path, monkeypatch, capsys):
    from massedit.cli import main

    model, tok = make_model("gpt2")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert main(["stats", "--model", str(tmp_path / "m"), "--corpus", "pydoc", "--layers", "1", "--samples", "20",
                 "--stats-dir", str(tmp_path / "stats"), "--quiet"]) == 0
    assert list((tmp_path / "stats" / "m" / "pydoc_stats").glob("*.npz"))
    assert main(["stats", "--model", str(tmp_path / "m"), "--layers", "1", "--stats-dir", str(tmp_path / "stats")]) == 2
    assert "--corpus is required" in capsys.readouterr().err
