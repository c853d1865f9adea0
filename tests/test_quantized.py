"""Editing bitsandbytes 8-bit and 4-bit bases (massedit.model.quantized) on trained tiny GPT-2 and Llama
worlds loaded with from_pretrained(quantization_config=BitsAndBytesConfig(...)) on CPU: the edit
takes effect as on the dense model, revert gives back every quantized tensor bit for bit, the
edited model saves and reloads with the edit, and unsupported storage is refused before any work."""
from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import massedit.editor as editor_mod  # noqa: E402
from massedit.model.arch import ModelLayout  # noqa: E402
from massedit.edits.delta import EditDelta  # noqa: E402
from massedit.editor import MassEditor  # noqa: E402
from massedit.hparams import default_for  # noqa: E402
from massedit.model.quantized import UnsupportedQuantizationError, cpu_repacking_off  # noqa: E402
from test_pipeline import EDITED, FACTS, _sentence, edit_world, train_world  # noqa: E402

BITS = {
    "8bit": lambda: BitsAndBytesConfig(load_in_8bit=True),
    "4bit": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                       bnb_4bit_compute_dtype=torch.float32),
}


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """arch → (saved dense model dir, tokenizer, corpus, p(new) after the dense edit)."""
    out = {}
    for arch in ("gpt2", "llama"):
        model, tok, sentences = train_world(arch=arch)
        path = tmp_path_factory.mktemp(f"world_{arch}")
        model.save_pretrained(path)
        edit_world(model, tok, sentences, path / "stats")
        out[arch] = (path, tok, sentences, _p_new(model, tok))
    return out


def _p_new(model, tok) -> torch.Tensor:
    """The probability of each edited fact's new object."""
    probs = []
    for i, obj in EDITED.items():
        ids = tok(_sentence("", FACTS[i][1], FACTS[i][0]))["input_ids"]
        with torch.no_grad(), cpu_repacking_off(model):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        probs.append(float(logits.softmax(-1)[tok.convert_tokens_to_ids(obj)]))
    return torch.tensor(probs)


def _load(path, bits):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=BITS[bits]()).eval()


def _bnb_modules(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))}


def _stored(model) -> dict:
    """Every stored tensor and quantization attribute: int8 weight + SCB, packed 4-bit data +
    quant_state (absmax, code, nested state, dtype, shape, ...), float parameters. bitsandbytes
    itself rearranges storage on a module's first forward (8-bit scales move into the module's
    state; 4-bit weights are repacked on AVX512-BF16 CPUs), so snapshots are taken after one."""
    out = {}
    for name, m in _bnb_modules(model).items():
        out[f"{name}.weight"] = m.weight.data.clone()
        if isinstance(m, bnb.nn.Linear8bitLt):
            # A first forward moves the scales from the weight into the module's state.
            out[f"{name}.SCB"] = (m.weight.SCB if m.weight.SCB is not None else m.state.SCB).clone()
        else:
            for key, value in m.weight.quant_state.as_dict(packed=False).items():
                out[f"{name}.quant_state.{key}"] = value.clone() if torch.is_tensor(value) else value
    for name, p in model.named_parameters():
        if p.is_floating_point():
            out[name] = p.detach().clone()
    return out


def _assert_same(model, stored) -> None:
    now = _stored(model)
    assert now.keys() == stored.keys()
    for key, value in now.items():
        if torch.is_tensor(value):
            assert value.dtype == stored[key].dtype and value.shape == stored[key].shape, key
            assert torch.equal(value.view(torch.uint8), stored[key].view(torch.uint8)), key
        else:
            assert value == stored[key], key


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_edit_takes_effect_and_reverts_bit_identically(worlds, arch, bits, tmp_path):
    path, tok, sentences, dense_p = worlds[arch]
    model = _load(path, bits)
    _p_new(model, tok)
    modules = _bnb_modules(model)
    stored = _stored(model)
    skip_before = model.config.quantization_config.llm_int8_skip_modules
    layout = ModelLayout(model)
    assert layout.key_dim(1) == 256  # asked of the module, not of the packed weight's shape
    assert layout.rewrite_is_conv1d(1) == (arch == "gpt2")  # bnb replaced GPT-2's Conv1D

    result = edit_world(model, tok, sentences, tmp_path / "stats")
    p = _p_new(model, tok)
    assert (p > 0.8).all(), p
    assert torch.allclose(p, dense_p, atol=0.05), (p, dense_p)
    edited = {layout.rewrite_name(l) for l in (1, 2, 3)}
    assert {n for n, m in model.named_modules() if n in modules and m is not modules[n]} == edited
    assert set(model.config.quantization_config.llm_int8_skip_modules) >= edited

    result.delta.revert(model)
    assert all(model.get_submodule(n) is m for n, m in modules.items())  # the very modules given back
    assert model.config.quantization_config.llm_int8_skip_modules == skip_before
    _assert_same(model, stored)


@pytest.mark.parametrize("arch,bits", [("gpt2", "8bit"), ("llama", "4bit")])
def test_edited_quantized_model_saves_and_reloads_with_the_edit(worlds, arch, bits, tmp_path):
    path, tok, sentences, _ = worlds[arch]
    model = _load(path, bits)
    edit_world(model, tok, sentences, tmp_path / "stats")
    edited = _p_new(model, tok)
    model.save_pretrained(tmp_path / "edited")

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited").eval()
    layout = ModelLayout(reloaded)
    assert not isinstance(layout.rewrite_module(2), (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
    assert isinstance(layout.rewrite_module(4), (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
    assert torch.allclose(_p_new(reloaded, tok), edited, atol=1e-4)


def test_saved_delta_applies_to_a_fresh_quantized_model_and_dense_deltas_transfer(worlds, tmp_path):
    path, tok, sentences, dense_p = worlds["gpt2"]
    model = _load(path, "4bit")
    result = edit_world(model, tok, sentences, tmp_path / "stats")
    result.delta.revert(model)
    result.delta.save(tmp_path / "delta.safetensors")

    fresh = _load(path, "4bit")
    _p_new(fresh, tok)
    stored = _stored(fresh)
    delta = EditDelta.load(tmp_path / "delta.safetensors")
    delta.apply(fresh)
    assert (_p_new(fresh, tok) > 0.8).all()
    delta.revert(fresh)
    _assert_same(fresh, stored)

    # A delta made on the dense GPT-2 (Conv1D, [in, out]) applies to its bnb Linear through the
    # Conv1D stand-in: the orientation is asked of the module.
    dense = AutoModelForCausalLM.from_pretrained(path).eval()
    dense_delta = edit_world(dense, tok, sentences, tmp_path / "stats_dense").delta
    dense_delta.revert(dense)
    dense_delta.apply(fresh)
    assert torch.allclose(_p_new(fresh, tok), dense_p, atol=0.05)


def test_rome_on_a_quantized_base_reads_the_dequantized_weight(worlds, tmp_path):
    path, tok, sentences, _ = worlds["gpt2"]
    model = _load(path, "8bit")
    _p_new(model, tok)
    stored = _stored(model)
    hp = default_for(model.config).replace(layers=[2], v_loss_layer=5, v_num_grad_steps=25, clamp_norm_factor=4.0,
                                           mom2_update_weight=200.0, mom2_n_samples=len(sentences))
    editor = MassEditor(model, tok, hp, stats_dir=tmp_path, corpus=sentences, model_name="world",
                        context_templates=[["{}"], ["I know that {}"]], progress=False)
    requests = [{"subject": FACTS[i][0], "prompt": FACTS[i][1] + " {}", "target_new": o} for i, o in EDITED.items()]
    result = editor.edit(requests, method="rome")
    assert (_p_new(model, tok) > 0.5).all()
    result.delta.revert(model)
    _assert_same(model, stored)


class _PackedLinear(torch.nn.Module):
    """What GPTQ/AWQ-style kernels look like from outside: packed int32 storage, no float weight."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.register_buffer("qweight", torch.zeros(d_in // 8, d_out, dtype=torch.int32))

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _refused_before_any_work(model, tok, monkeypatch) -> str:
    def no_work(*args, **kwargs):
        raise AssertionError("an expensive phase ran before the refusal")

    monkeypatch.setattr(editor_mod, "layer_covariances", no_work)
    monkeypatch.setattr(editor_mod, "generate_templates", no_work)
    hp = default_for(model.config).replace(layers=[1, 2])
    with pytest.raises(UnsupportedQuantizationError) as err:
        MassEditor(model, tok, hp, corpus=["a b c"], progress=False).edit(
            [{"subject": "Alden", "prompt": "the city of {}", "target_new": "Rome"}])
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("kind", ["gptq", "fp8"])
def test_unsupported_quantization_is_refused_before_any_work(worlds, kind, monkeypatch):
    path, tok, _, _ = worlds["llama"]
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    name = "model.layers.2.mlp.down_proj"
    if kind == "gptq":
        model.set_submodule(name, _PackedLinear(256, 64))
        model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    else:
        model.get_submodule(name).weight.data = model.get_submodule(name).weight.data.to(torch.float8_e4m3fn)
    message = _refused_before_any_work(model, tok, monkeypatch)
    assert name in message and "--quantize 8bit|4bit" in message and "float dtype" in message
    if kind == "gptq":
        assert "gptq quantization" in message


def test_model_repacked_by_bitsandbytes_cpu_kernel_is_refused(worlds, monkeypatch):
    path, tok, _, _ = worlds["llama"]
    model = _load(path, "4bit")
    module = model.get_submodule("model.layers.5.mlp.down_proj")
    module.weight.quant_state.packing_format_for_cpu = True  # what a first no-grad forward does on AVX512-BF16
    message = _refused_before_any_work(model, tok, monkeypatch)
    assert "model.layers.5.mlp.down_proj" in message and "load the model again" in message


@pytest.mark.parametrize("first", ["evaluate", "trace"])
def test_evaluating_or_tracing_a_4bit_model_first_leaves_it_editable(first, worlds, tmp_path):
    """`massedit edit --quantize 4bit --eval` (and demo) evaluate before editing, a user traces to
    choose the layers: on a CPU whose
    bitsandbytes kernel repacks 4-bit weights at the first no-grad forward, that evaluation must
    not repack them, or the z phase's backward fails inside bitsandbytes."""
    from massedit.evaluation import evaluate
    from massedit.inputs.requests import parse_records
    from massedit.evaluation.trace import trace

    path, tok, sentences, _ = worlds["gpt2"]
    probe = _load(path, "4bit")
    with torch.no_grad():
        probe(input_ids=torch.tensor([tok(sentences[0])["input_ids"]]))
    if not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in _bnb_modules(probe).values()):
        pytest.skip("bitsandbytes does not repack 4-bit weights on this CPU (no AVX512-BF16)")
    model = _load(path, "4bit")
    records = [{"case_id": i, "requested_rewrite": {"prompt": _sentence("", FACTS[i][1], "{}"), "subject": FACTS[i][0],
                                                     "target_new": {"str": obj}, "target_true": {"str": FACTS[i][2]}}}
               for i, obj in EDITED.items()]
    if first == "evaluate":
        evaluate(model, tok, records)
    else:
        trace(model, tok, parse_records(records, "records", fmt="counterfact"), samples=2)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in _bnb_modules(model).values())
    assert edit_world(model, tok, sentences, tmp_path / "stats").n_edits == len(EDITED)


def test_a_checkpoint_transformers_cannot_save_is_refused_before_the_edit(worlds, tmp_path, capsys):
    """A saved 4-bit checkpoint reloads, but transformers may be unable to save it again: edit
    then says so before any work instead of failing with a traceback when writing --out."""
    import json

    import massedit.cli as cli

    path, tok, sentences, _ = worlds["gpt2"]
    saved = tmp_path / "saved-4bit"
    _load(path, "4bit").save_pretrained(saved)
    tok.save_pretrained(saved)
    requests = tmp_path / "r.json"
    requests.write_text(json.dumps([{"subject": FACTS[0][0], "prompt": _sentence("", FACTS[0][1], "{}"),
                                     "target_new": EDITED[0]}]))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences) + "\n")
    code = cli.main(["edit", "--model", str(saved), "--requests", str(requests), "--corpus", str(corpus),
                     "--stats-dir", str(tmp_path / "stats"), "--out", str(tmp_path / "out"), "--quiet"])
    if code == 2:  # this transformers version cannot save it
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("massedit edit: error: ")]
        assert len(errors) == 1 and "cannot save a model loaded from this checkpoint" in errors[0], err
        assert not (tmp_path / "stats").exists() and not (tmp_path / "out").exists()
    else:
        assert code == 0 and (tmp_path / "out" / "delta.safetensors").exists()


def test_ledger_of_a_quantized_base_verifies_after_save_and_reload(worlds, tmp_path):
    """The ledger's base digest of a bitsandbytes weight is the dense value its edits start from,
    the same that the round's delta records, so verify holds in memory and on the saved model."""
    from massedit.edits.sequential import SequentialEditor
    from test_pipeline import WORLD_REQUESTS, world_editor

    path, tok, sentences, _ = worlds["gpt2"]
    model = _load(path, "8bit")
    seq = SequentialEditor(world_editor(model, tok, sentences, tmp_path / "stats"), "memit", ledger=tmp_path / "ledger")
    seq.edit_round(WORLD_REQUESTS[:2])
    seq.edit_round(WORLD_REQUESTS[2:])
    assert seq.ledger.verify(model) == []
    model.save_pretrained(tmp_path / "edited")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited").eval()
    assert seq.ledger.verify(reloaded) == []
