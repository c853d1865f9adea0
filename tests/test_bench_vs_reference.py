"""`python -m benchmarks.vs_reference`: its one-line errors about the reference's environment (before
any model is loaded), the translation to the reference's hparams and requests, the ΔW comparison,
and (slow; only where MASSEDIT_REFERENCE_PYTHON and MASSEDIT_REFERENCE_CODE name the reference's
environment and code) MEMIT on a tiny Llama agreeing with the reference's."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from benchmarks import vs_reference
from benchmarks.reference_memit import REFERENCE_FILES
from massedit.hparams import MEMITHyperParams
from massedit.inputs.facts import build_facts
from massedit.inputs.requests import EditRequest
from massedit.model.arch import ModelLayout
from test_facts import oracle
from tiny import make_tokenizer


def _error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        vs_reference.main(argv)
    message = exc.value.code if isinstance(exc.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert "\n" not in message
    return message


def _argv(tmp_path: Path, *extra: str) -> list[str]:
    (tmp_path / "facts").mkdir(exist_ok=True)
    (tmp_path / "facts" / "counterfact.json").write_text("[]")
    # A model that does not exist: every error below must come before any model is loaded.
    return ["--model", str(tmp_path / "no-model"), "--facts", str(tmp_path / "facts"), *extra]


def test_no_reference_python_is_named_with_its_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(vs_reference.PYTHON_ENV, raising=False)
    message = _error(capsys, _argv(tmp_path, "--reference-code", str(tmp_path)))
    assert vs_reference.PYTHON_ENV in message and "--reference-python" in message


def test_a_missing_reference_python_or_code_is_one_line(tmp_path, capsys):
    message = _error(capsys, _argv(tmp_path, "--reference-python", str(tmp_path / "nope"),
                                   "--reference-code", str(tmp_path)))
    assert "not an executable" in message
    message = _error(capsys, _argv(tmp_path, "--reference-python", sys.executable, "--reference-code", str(tmp_path)))
    assert "no memit/memit_main.py" in message and "kmeng01/memit" in message


def _fake_reference(folder: Path) -> Path:
    for name in REFERENCE_FILES:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("")
    (folder / "memit" / "memit_hparams.py").write_text("MEMITHyperParams = None\n")
    return folder


def test_a_reference_python_with_transformers_5_is_refused(tmp_path, capsys):
    code = _fake_reference(tmp_path / "memit")
    message = _error(capsys, _argv(tmp_path, "--reference-python", sys.executable, "--reference-code", str(code)))
    assert "has transformers 5." in message and "needs 4.x" in message


def test_an_incomplete_reference_checkout_is_reported_by_the_driver(tmp_path, capsys):
    code = _fake_reference(tmp_path / "memit")
    (code / "rome" / "layer_stats.py").unlink()
    message = _error(capsys, _argv(tmp_path, "--reference-python", sys.executable, "--reference-code", str(code)))
    assert message.startswith("vs_reference: reference: --reference-code") and "rome/layer_stats.py" in message


def _llama(tied: bool):
    tok = make_tokenizer("bpe")
    cfg = LlamaConfig(vocab_size=len(tok), num_hidden_layers=4, hidden_size=32, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128, rope_theta=1e5,
                      tie_word_embeddings=tied, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval(), tok


def test_reference_hparams_have_exactly_the_reference_fields():
    model, _ = _llama(tied=True)
    layout = ModelLayout(model)
    hp = MEMITHyperParams(layers=[1, 2], v_num_grad_steps=7, mom2_dataset="pydoc", mom2_n_samples=40)
    ref = vs_reference.reference_hparams(hp.to_dict(), vs_reference.module_paths(model, layout), layout.n_layers)
    assert tuple(ref) == vs_reference.REFERENCE_FIELDS
    assert ref["layers"] == [1, 2] and ref["v_num_grad_steps"] == 7 and ref["v_loss_layer"] == 3
    assert (ref["mom2_dataset"], ref["mom2_n_samples"], ref["fact_token"]) == ("pydoc", 40, "subject_last")
    assert ref["rewrite_module_tmp"] == "model.layers.{}.mlp.down_proj" and ref["layer_module_tmp"] == "model.layers.{}"
    assert (ref["mlp_module_tmp"], ref["attn_module_tmp"]) == ("model.layers.{}.mlp", "model.layers.{}.self_attn")
    # A tied head's weight is listed once, under the embedding: the reference must look it up there.
    assert (ref["ln_f_module"], ref["lm_head_module"]) == ("model.norm", "model.embed_tokens")
    assert ref["lm_head_module"] + ".weight" in dict(model.named_parameters())
    untied, _ = _llama(tied=False)
    assert vs_reference.module_paths(untied, ModelLayout(untied))["lm_head_module"] == "lm_head"
    with_loss_layer = vs_reference.reference_hparams({**hp.to_dict(), "v_loss_layer": 2},
                                                     vs_reference.module_paths(model, layout), 4)
    assert with_loss_layer["v_loss_layer"] == 2


def test_settings_the_reference_cannot_take_are_refused():
    model, _ = _llama(tied=True)
    layout = ModelLayout(model)
    paths = vs_reference.module_paths(model, layout)
    hp = MEMITHyperParams(layers=[1], z_early_stop_loss=0.01).to_dict()
    with pytest.raises(ValueError, match="hard-coded"):
        vs_reference.reference_hparams(hp, paths, 4)
    with pytest.raises(ValueError, match="ln_f_module"):
        vs_reference.reference_hparams(MEMITHyperParams(layers=[1]).to_dict(), {**paths, "ln_f_module": None}, 4)
    with pytest.raises(ValueError, match="residual stream only"):
        vs_reference.reference_hparams(MEMITHyperParams(layers=[1], z_site="mlp").to_dict(), paths, 4)


def test_requests_take_the_reference_form():
    requests = [EditRequest(subject="Paris", prompt="{} is the capital of", target_new="Italy")]
    assert vs_reference.reference_requests(requests) == [
        {"case_id": 0, "prompt": "{} is the capital of", "subject": "Paris", "target_new": {"str": "Italy"}}]


def test_relative_differences_per_weight():
    ref = {"model.layers.10.w": torch.ones(2, 2), "model.layers.2.w": torch.full((2, 3), 2.0)}
    ours = {"model.layers.10.w": torch.ones(2, 2) * 1.5, "model.layers.2.w": torch.full((2, 3), 2.0)}
    diffs = vs_reference.relative_differences(ours, ref)
    assert list(diffs) == ["model.layers.2.w", "model.layers.10.w"]  # in layer order
    assert diffs == {"model.layers.2.w": 0.0, "model.layers.10.w": pytest.approx(0.5)}
    with pytest.raises(ValueError, match="different weights"):
        vs_reference.relative_differences({"model.layers.2.w": ours["model.layers.2.w"]}, ref)
    with pytest.raises(ValueError, match="model.layers.2.w"):
        vs_reference.relative_differences({**ours, "model.layers.2.w": torch.zeros(3, 2)}, ref)


def test_phase_timings_leave_the_rest_to_other():
    timings = vs_reference.phase_timings({"z": 2.0, "keys": 1.0, "covariance": 0.5, "solve": 0.25, "total": 4.0})
    assert timings == {"z": 2.0, "keys": 1.0, "covariance": 0.5, "other": 0.5, "total": 4.0}
    assert vs_reference.phase_timings({"z": 1.0, "total": 1.5})["other"] == 0.5


@pytest.mark.slow
@pytest.mark.skipif(not (os.environ.get(vs_reference.PYTHON_ENV) and os.environ.get(vs_reference.CODE_ENV)),
                    reason=f"needs the reference's environment: {vs_reference.PYTHON_ENV} and {vs_reference.CODE_ENV}")
def test_memit_agrees_with_the_reference_on_a_tiny_llama(tmp_path, capsys):
    """A Llama as SmolLM2 is (tied embeddings, RoPE θ 1e5, byte-level BPE without BOS), saved by
    transformers 5: the reference's ΔW on the same requests, statistics and templates agrees with ours."""
    import warnings

    warnings.simplefilter("ignore")  # a random model's z never converges; the corpus is shorter than asked
    model, tok = _llama(tied=True)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    build_facts(oracle(), relations=("P36", "P30"), max_per_relation=4, model="tiny").write(tmp_path / "facts")
    out = tmp_path / "vs.json"
    assert vs_reference.main(["--model", str(tmp_path / "model"), "--facts", str(tmp_path / "facts"), "--n", "2,4",
                              "--layers", "1,2", "--steps", "10", "--stats-dir", str(tmp_path / "stats"),
                              "--corpus", "pydoc", "--samples", "100000", "--stats-docs", "20",
                              "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["reference"]["transformers"].startswith("4.")
    assert data["checks"]["logits_max_abs_diff"] <= 1e-4
    # The corpus is shorter than the samples asked: the reference reads the file massedit filed under them.
    assert set(data["checks"]["statistics_documents"]) == {"1", "2"}
    assert 0 < data["checks"]["statistics_documents"]["1"] < 100000
    assert [row["n"] for row in data["sizes"]] == [2, 4]
    for row in data["sizes"]:
        assert set(row["delta_rel_diff"]) == {f"model.layers.{l}.mlp.down_proj.weight" for l in (1, 2)}
        assert max(row["delta_rel_diff"].values()) <= 1e-3, row["delta_rel_diff"]
        assert row["massedit"]["z"] > 0 and row["reference"]["z"] > 0 and row["reference"]["keys"] > 0
        f = row["z_flops"]
        assert f["reference"]["flops"] > f["massedit"]["flops"] > 0 and f["flop_ratio"] > 1
        assert 0 < f["massedit"]["fraction_of_matmul"] and 0 < f["reference"]["fraction_of_matmul"]
    stats = data["statistics"]
    assert stats["massedit"]["tokens"] == stats["reference"]["tokens"] > 0
    assert len(stats["reference"]["passes"]) == 2 and max(stats["covariance_rel_diff"].values()) <= 1e-5
    printed = capsys.readouterr().out
    assert "reference/massedit" in printed and "ΔW relative difference per layer" in printed and "FLOP ratio" in printed


def test_the_reference_structure_costs_the_lm_head_at_every_position():
    """z_accounting's "reference" path is the plain path with H·full_i in place of H·labels_i, and the
    row divides each side's FLOPs by its own time."""
    from benchmarks import common
    from massedit.inputs.requests import EditRequest

    _, tok = _llama(tied=True)
    reqs = [EditRequest("Paris", "{} is the capital of", "Italy"), EditRequest("Rome", "{} lies in", "Spain")]
    templates, steps, head = [["{}"], ["A b c. {}"]], [3, 5], 1000
    plain, ref, prefix = (common.z_accounting(tok, reqs, templates, steps, path, 100, 40, head)
                          for path in ("plain", "reference", "prefix"))
    assert ref["flops"] > plain["flops"] > prefix["flops"] > 0
    per_request = [common.z_accounting(tok, [r], templates, [s], path, 100, 40, head)
                   for r, s in zip(reqs, steps) for path in ("plain", "reference")]
    for (p, r), s in zip(zip(per_request[::2], per_request[1::2]), steps):
        assert r["flops"] - p["flops"] == (2 * s + 1) * 2 * head * (p["prompt_tokens"] - p["label_positions"])
    row = vs_reference.z_flops_row({"massedit_path": "prefix", "massedit": 1e12, "reference": 4e12}, 10.0, 50.0, 1e11)
    assert row["flop_ratio"] == 4.0 and row["massedit"]["fraction_of_matmul"] == 1.0
    assert row["reference"]["fraction_of_matmul"] == 0.8
