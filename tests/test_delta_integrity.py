"""Issue 11, items 4 and 5: a delta's header is checked against its tensors, and whether a delta is
applied is decided from the model's weights, not from the object or file it came from."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from massedit.model.arch import ModelLayout
from massedit.edits.delta import HEADER_KEY, DeltaError, EditDelta, WeightDelta, config_hash
from tiny import make_model


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, snapshot) -> bool:
    return all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


def _delta(model, layers=(1, 3)) -> EditDelta:
    layout = ModelLayout(model)
    g = torch.Generator().manual_seed(5)
    weights = [WeightDelta(layout.rewrite_weight_name(l), torch.randn(layout.hidden_size, 3, generator=g),
                           torch.randn(layout.key_dim(l), 3, generator=g) * 0.05, layout.rewrite_is_conv1d(l))
               for l in layers]
    return EditDelta(weights, {"config_hash": config_hash(model)})


def test_saved_applied_delta_applies_to_the_base_and_only_once(tmp_path):
    edited, _ = make_model("gpt2")
    delta = _delta(edited)
    delta.apply(edited)  # what `edit` saves: a delta that was applied
    delta.save(tmp_path / "delta.safetensors")
    base, _ = make_model("gpt2")
    original = _snapshot(base)
    EditDelta.load(tmp_path / "delta.safetensors").apply(base)  # load → apply on the base model
    assert _same(base, _snapshot(edited))
    with pytest.raises(DeltaError, match="already applied"):  # whatever object it comes from
        EditDelta.load(tmp_path / "delta.safetensors").apply(base)
    EditDelta.load(tmp_path / "delta.safetensors").revert(base)  # a fresh load reverts the edited model
    assert _same(base, original)
    with pytest.raises(DeltaError, match="not applied to this model"):
        EditDelta.load(tmp_path / "delta.safetensors").revert(base)


def test_unapplied_delta_carries_its_base_record(tmp_path):
    model, _ = make_model("llama")
    base = _snapshot(model)
    delta = _delta(model)
    delta.record(model)
    assert _same(model, base)
    delta.save(tmp_path / "d.safetensors")
    with pytest.raises(DeltaError, match="not applied to this model"):
        EditDelta.load(tmp_path / "d.safetensors").revert(model)
    first, second = EditDelta.load(tmp_path / "d.safetensors"), EditDelta.load(tmp_path / "d.safetensors")
    first.apply(model)
    assert second.is_applied(model) and first.is_applied(model)
    with pytest.raises(DeltaError, match="already applied"):
        second.apply(model)
    second.revert(model)
    assert _same(model, base)


def test_editor_apply_false_records_the_base(tmp_path):
    from massedit import MassEditor
    from massedit.hparams import MEMITHyperParams
    from tiny import make_requests

    model, tok = make_model("gpt2")
    base = _snapshot(model)
    hp = MEMITHyperParams(layers=[1], v_num_grad_steps=2, mom2_n_samples=4, mom2_update_weight=10.0)
    docs = ["the a of in is was plays sport", "Michael Jordan plays basketball.", "Paris London Berlin", "I you it"]
    editor = MassEditor(model, tok, hp, stats_dir=tmp_path, corpus=docs, context_templates=[["{}"]], progress=False)
    result = editor.edit(make_requests(2), apply=False)
    result.delta.save(tmp_path / "d.safetensors")
    loaded = EditDelta.load(tmp_path / "d.safetensors")
    assert loaded.n_fixups >= 0 and not loaded.is_applied(model)
    with pytest.raises(DeltaError, match="not applied to this model"):
        loaded.revert(model)
    loaded.apply(model)
    with pytest.raises(DeltaError, match="already applied"):
        result.delta.apply(model)
    result.delta.revert(model)
    assert _same(model, base)


# ---- item 4: the header is validated against the tensors -------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, _ = make_model("gpt2")
    delta = _delta(model)
    delta.apply(model)
    path = tmp_path_factory.mktemp("delta") / "delta.safetensors"
    delta.save(path)
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[HEADER_KEY])
    return load_file(str(path)), header


def _write(tmp_path, tensors, header) -> str:
    path = tmp_path / "bad.safetensors"
    meta = {HEADER_KEY: header if isinstance(header, str) else json.dumps(header)}
    save_file(tensors, str(path), metadata=meta)
    return str(path)


def _edit(saved, change):
    tensors, header = saved
    tensors, header = dict(tensors), json.loads(json.dumps(header))
    change(tensors, header)
    return tensors, header


CASES = {
    "empty record": (lambda t, h: h.update(record=[]), r"field 'record'.*list of 2"),
    "version 1, applied []": (lambda t, h: h.update(format_version=1, applied=[], record=None),
                              r"field 'applied'.*list of 2"),
    "no weights": (lambda t, h: h.pop("weights"), r"field 'weights' is missing"),
    "weights not a list": (lambda t, h: h.update(weights={"a": 1}), r"field 'weights' is missing or not a list"),
    "name not a string": (lambda t, h: h["weights"][0].update(name=3), r"'weights'\[0\]\.name"),
    "transposed missing": (lambda t, h: h["weights"][1].pop("transposed"), r"'weights'\[1\]\.transposed"),
    "missing tensor": (lambda t, h: t.pop("weight.1.v"), r"'weights'\[1\].*weight\.1\.v"),
    "extra tensor": (lambda t, h: t.update({"weight.2.u": torch.zeros(2, 2)}), r"tensors \['weight\.2\.u'\]"),
    "extra weight entry": (lambda t, h: h["weights"].append({"name": "x", "transposed": False}),
                           r"'weights'\[2\].*weight\.2\.u"),
    "factor ranks differ": (lambda t, h: t.update({"weight.0.v": torch.zeros(64, 2)}),
                            r"'weights'\[0\] does not match"),
    "factor not a matrix": (lambda t, h: t.update({"weight.0.u": torch.zeros(32)}), r"'weights'\[0\].*2-D"),
    "integer factor": (lambda t, h: t.update({"weight.0.u": torch.zeros(32, 3, dtype=torch.int32)}),
                       r"'weights'\[0\].*2-D float"),
    "repeated name": (lambda t, h: h["weights"][1].update(name=h["weights"][0]["name"]), r"'weights'.*once"),
    "bad dtype": (lambda t, h: h["record"][0].update(dtype="Parameter"), r"'record'\[0\]\.dtype"),
    "dtype not a string": (lambda t, h: h["record"][0].update(dtype=None), r"'record'\[0\]\.dtype"),
    "bad digest": (lambda t, h: h["record"][1].update(sha256_after="xyz"), r"'record'\[1\]\.sha256_after"),
    "device missing": (lambda t, h: h["record"][1].pop("device"), r"'record'\[1\]\.device"),
    "record not an object": (lambda t, h: h["record"].__setitem__(0, 7), r"'record'\[0\] is not an object"),
    "fixup missing": (lambda t, h: t.pop("fixup.0.index"), r"'record'\[0\].*fixup\.0\.index"),
    "fixup out of range": (lambda t, h: t.update({"fixup.1.index": torch.tensor([10**9]),
                                                  "fixup.1.value": torch.zeros(1)}), r"'record'\[1\].*outside"),
    "fixup value dtype": (lambda t, h: t.update({"fixup.1.index": torch.tensor([0]),
                                                 "fixup.1.value": torch.zeros(1, dtype=torch.float16)}),
                          r"'record'\[1\].*fixup\.1\.value"),
    "fixup index dtype": (lambda t, h: t.update({"fixup.0.index": torch.zeros(1, dtype=torch.int32)}),
                          r"'record'\[0\].*int64"),
    "metadata not an object": (lambda t, h: h.update(metadata=[1]), r"field 'metadata'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_header_is_a_delta_error_naming_file_and_field(case, saved, tmp_path):
    change, pattern = CASES[case]
    path = _write(tmp_path, *_edit(saved, change))
    with pytest.raises(DeltaError, match=pattern) as info:
        EditDelta.load(path)
    assert "bad.safetensors" in str(info.value)


@pytest.mark.parametrize("raw, pattern", [("{not json", "not JSON"), ("[1, 2]", "not a JSON object"),
                                          ('{"format_version": "1"}', "version 1 is not supported")])
def test_header_that_is_not_an_object(raw, pattern, saved, tmp_path):
    with pytest.raises(DeltaError, match=pattern):
        EditDelta.load(_write(tmp_path, saved[0], raw))


def test_truncated_file_is_a_delta_error(saved, tmp_path):
    path = _write(tmp_path, *saved)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(DeltaError, match="bad.safetensors.*truncated or corrupt"):
        EditDelta.load(path)


def test_version_1_files_still_load(saved, tmp_path):
    tensors, header = _edit(saved, lambda t, h: h.update(format_version=1, applied=h.pop("record")))
    loaded = EditDelta.load(_write(tmp_path, tensors, header))
    assert loaded.n_fixups == sum(t.numel() for k, t in tensors.items() if k.endswith(".index"))


def test_delta_that_changes_nothing_applies_and_reverts():
    """A Δ that rounds away entirely (z already reached: zero residual) leaves the weights as they
    were; applying it, even after record(), and reverting it are no-ops, not errors."""
    model, _ = make_model("gpt2")
    base = _snapshot(model)
    delta = _delta(model)
    for wd in delta.weights:
        wd.u.zero_()
    delta.record(model)
    delta.apply(model)
    assert _same(model, base) and delta.is_applied(model)
    delta.revert(model)
    assert _same(model, base)
