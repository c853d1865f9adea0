"""Editing models that Accelerate places and offloads: the same ΔW, statistics and metrics as the
plain model, edits written through to offloaded weights (CPU weights maps and disk offload
files), revert bit for bit, and save_pretrained carrying the edit.

On a CPU-only machine a device_map's "cpu" entries are not offloaded (only "disk" is); the CPU
offload that a GPU machine applies to them is exercised with accelerate.cpu_offload (a plain dict
weights map) and dispatch_model given the offloaded blocks' state dict (an OffloadedWeightsLoader
holding CPU tensors, as transformers builds for "cpu" entries on a GPU machine)."""
from __future__ import annotations

import time

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from accelerate.hooks import AlignDevicesHook, ModelHook, SequentialHook
from transformers import AutoModelForCausalLM

from massedit.model.arch import ModelLayout
from massedit.inputs.templates import generate_templates
from massedit.edits.delta import EditDelta
from massedit.model.devices import execution_device, input_device, offloaded_state_dict, read_parameter
from massedit.evaluation import evaluate, summary
from massedit.model.loading import dtype_kwargs
from massedit.compute.stats import second_moments
from test_evaluate import cf_record
from test_pipeline import EDITED, FACTS, WORLD_REQUESTS, train_world, world_editor
from tiny import make_model

LAYERS = (1, 2, 3)  # world_editor's
# CounterFact-style records of the edited facts, to compare metrics between placements.
RECORDS = [cf_record(i, FACTS[i][0], FACTS[i][1] + " {}", new, FACTS[i][2], [f"I know that {FACTS[i][1]} {FACTS[i][0]}"],
                     [f"{FACTS[j][1]} {FACTS[j][0]}" for j in range(len(FACTS)) if j not in EDITED][:3])
           for i, new in EDITED.items()]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def saved(request, tmp_path_factory):
    """(checkpoint directory, tokenizer, corpus) of a small model trained on a toy world of facts."""
    model, tok, sentences = train_world(arch=request.param)
    path = tmp_path_factory.mktemp(request.param) / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, tok, sentences


def _placement(model, rule) -> dict[str, str]:
    """A device_map over the model's top-level pieces (embeddings, each block, final norm, head):
    rule(name, block index or None) → "cpu" | "disk"."""
    layout = ModelLayout(model)
    blocks = {layout.block_name(l): l for l in range(layout.n_layers)}
    base, _, _ = layout.block_name(0).rpartition(".")  # e.g. transformer.h
    owner, _, _ = base.rpartition(".")
    names = [f"{owner}.{n}" for n, _ in model.get_submodule(owner).named_children() if f"{owner}.{n}" != base]
    names += list(blocks) + [n for n, _ in model.named_children() if n != owner]
    return {n: rule(n, blocks.get(n)) for n in names}


# The input embeddings (GPT-2: token and position) and the output head, which GPT-2 ties to them
# (tied weights must share a placement).
_EMBEDDINGS = {"transformer.wte", "transformer.wpe", "model.embed_tokens", "lm_head"}


def _from_pretrained(rule):
    def load(path, plain, offload_folder):
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", device_map=_placement(plain, rule),
                                                    offload_folder=offload_folder, **dtype_kwargs(torch.float32))
    return load


def _cpu_weights_map(path, plain, offload_folder):
    """The edited blocks offloaded to CPU tensors in an OffloadedWeightsLoader's state dict: what a
    device_map's "cpu" entries become on a GPU machine (dispatch_model with a GPU main device)."""
    device_map = _placement(plain, lambda n, l: "disk" if l in LAYERS else "cpu")
    blocks = [n for n, d in device_map.items() if d == "disk"]
    state = {k: v.clone() for k, v in plain.state_dict().items() if any(k.startswith(f"{b}.") for b in blocks)}
    return dispatch_model(plain, device_map, main_device="cpu", state_dict=state, offload_dir=offload_folder)


PLACEMENTS = {
    "edited-blocks-on-disk": _from_pretrained(lambda n, l: "disk" if l in LAYERS else "cpu"),
    "embeddings-on-disk": _from_pretrained(lambda n, l: "disk" if n in _EMBEDDINGS else "cpu"),
    "alternate-blocks": _from_pretrained(lambda n, l: ("disk" if l % 2 else "cpu") if l is not None else "cpu"),
    "cpu-offload": lambda path, plain, offload_folder: cpu_offload(plain, execution_device=torch.device("cpu")),
    "cpu-weights-map": _cpu_weights_map,
}


def _load(path, placement: str, offload_folder):
    """The checkpoint loaded plain, or placed and offloaded as PLACEMENTS[placement] says."""
    plain = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **dtype_kwargs(torch.float32))
    return (plain if placement == "plain" else PLACEMENTS[placement](path, plain, offload_folder)).eval()


def _stored(model) -> dict[str, torch.Tensor]:
    """Every parameter's stored value (weights map / offload file for offloaded ones), copied."""
    return {n: read_parameter(model, n).clone() for n, _ in model.named_parameters()}


@torch.no_grad()
def _target_logprob(model, tok, request) -> float:
    ids = tok(request["prompt"].format(request["subject"]))["input_ids"]
    target = tok(request["target_new"], add_special_tokens=False)["input_ids"]
    full = torch.tensor([ids + target], device=input_device(model))
    logp = model(input_ids=full).logits[0, len(ids) - 1 : -1].float().log_softmax(-1).cpu()
    return float(logp[torch.arange(len(target)), torch.tensor(target)].sum())


def _offloaded(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.device.type == "meta"]


@pytest.mark.filterwarnings("ignore:.*ridge:UserWarning")  # 36 short sentences: C has a null space
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_offloaded_model_edits_like_the_plain_model(saved, placement, tmp_path):
    path, tok, sentences = saved
    plain = _load(path, "plain", None)
    model = _load(path, placement, tmp_path / "offload")
    layout = ModelLayout(model)
    edited = {layout.rewrite_weight_name(l) for l in LAYERS}
    offloaded = _offloaded(model)
    assert offloaded, "the placement offloads nothing"
    if placement == "edited-blocks-on-disk":
        assert edited <= set(offloaded)

    # Statistics on the offloaded model equal the plain model's.
    sums = second_moments(model, layout, tok, sentences, list(LAYERS), torch.float64, progress=False)
    ref_sums = second_moments(plain, ModelLayout(plain), tok, sentences, list(LAYERS), torch.float64, progress=False)
    for l in LAYERS:
        assert sums[l][1] == ref_sums[l][1]
        assert torch.allclose(sums[l][0].cpu(), ref_sums[l][0], rtol=1e-6, atol=1e-9), l

    before_probs = [_target_logprob(model, tok, r) for r in WORLD_REQUESTS]
    before, started = _stored(model), time.time()
    ref = world_editor(plain, tok, sentences, tmp_path / "stats-plain").edit(WORLD_REQUESTS)
    result = world_editor(model, tok, sentences, tmp_path / "stats").edit(WORLD_REQUESTS)
    for got, want in zip(result.delta.weights, ref.delta.weights):
        assert got.name == want.name
        dw, dw_ref = got.dense(), want.dense()
        assert float((dw - dw_ref).norm() / dw_ref.norm()) <= 1e-5, got.name

    # The edit is in the stored weights and in the forward pass, as on the plain model.
    after = _stored(model)
    assert {n for n in before if not torch.equal(before[n], after[n])} == edited
    after_probs = [_target_logprob(model, tok, r) for r in WORLD_REQUESTS]
    assert all(a > b + 1.0 for a, b in zip(after_probs, before_probs)), (before_probs, after_probs)
    assert after_probs == pytest.approx([_target_logprob(plain, tok, r) for r in WORLD_REQUESTS], abs=1e-3)
    metrics = summary(evaluate(model, tok, RECORDS))
    assert metrics["ES"] == 100.0
    assert metrics == pytest.approx(summary(evaluate(plain, tok, RECORDS)), abs=1e-3)

    # save_pretrained of the edited model carries the edit; a model offloaded by hand passes its state dict.
    out = tmp_path / "saved"
    model.save_pretrained(out, state_dict=offloaded_state_dict(model) if placement == "cpu-offload" else None)
    if placement == "cpu-weights-map":  # the edit went into the weights map, not the offload files
        assert not any(f.stat().st_mtime > started for f in (tmp_path / "offload").glob("*.dat"))
    reloaded = _load(out, "plain", None)
    for n in edited:
        assert torch.equal(read_parameter(reloaded, n), after[n]), n
    assert [_target_logprob(reloaded, tok, r) for r in WORLD_REQUESTS] == pytest.approx(after_probs, abs=1e-4)

    result.delta.revert(model)
    reverted = _stored(model)
    for n, value in before.items():
        assert torch.equal(reverted[n], value), n
    assert [_target_logprob(model, tok, r) for r in WORLD_REQUESTS] == pytest.approx(before_probs, abs=1e-5)

    # A saved delta applies to (and reverts from) the offloaded model like the fresh one.
    result.delta.save(tmp_path / "delta.safetensors")
    saved_delta = EditDelta.load(tmp_path / "delta.safetensors")
    saved_delta.apply(model)
    assert all(torch.equal(read_parameter(model, n), after[n]) for n in edited)
    saved_delta.revert(model)
    assert all(torch.equal(read_parameter(model, n), before[n]) for n in edited)


@pytest.mark.filterwarnings("ignore:.*ridge:UserWarning")
def test_disk_offload_never_writes_the_checkpoint(saved, tmp_path):
    """Accelerate reads disk-offloaded weights straight from the checkpoint's safetensors file; the
    edit goes to a file in the offload folder instead, and the checkpoint's bytes stay as they were."""
    path, tok, sentences = saved
    files = {p: p.read_bytes() for p in path.glob("*.safetensors")}
    model = _load(path, "edited-blocks-on-disk", tmp_path / "offload")
    result = world_editor(model, tok, sentences, tmp_path / "stats").edit(WORLD_REQUESTS[:1])
    assert all(p.read_bytes() == data for p, data in files.items())
    assert sorted(f.name for f in (tmp_path / "offload").glob("*.dat")) == sorted(
        f"{wd.name}.dat" for wd in result.delta.weights)


def test_execution_device_is_the_hooks_not_the_parameters(saved, tmp_path):
    path, tok, _ = saved
    model = _load(path, "embeddings-on-disk", tmp_path / "offload")
    emb = model.get_input_embeddings()
    assert emb.weight.device.type == "meta"
    assert execution_device(emb) == input_device(model) == torch.device("cpu")
    plain, _ = make_model("gpt2")
    assert execution_device(plain.get_submodule("transformer.h.1")) == torch.device("cpu")


def test_execution_device_reads_accelerate_hooks_without_a_gpu():
    """GPU placements name devices by index; the hook, not the (CPU or meta) parameters, decides.
    The hooks are set without running their init, which would move the weights to the GPU."""
    model, _ = make_model("llama")
    block = model.get_submodule("model.layers.1")
    block._hf_hook = SequentialHook(ModelHook(), AlignDevicesHook(execution_device=1))
    assert execution_device(block) == torch.device("cuda", 1)
    model.get_input_embeddings()._hf_hook = AlignDevicesHook(execution_device="cuda:0")
    assert input_device(model) == torch.device("cuda", 0)


@pytest.mark.filterwarnings("ignore:.*ridge:UserWarning")
def test_rome_and_generated_templates_on_an_offloaded_model(saved, tmp_path):
    """ROME reads the rewrite weight itself (W k for its rank-one update), and context templates
    are sampled with generate(): both see the offloaded values as the plain model's."""
    path, tok, sentences = saved
    plain = _load(path, "plain", None)
    model = _load(path, "edited-blocks-on-disk", tmp_path / "offload")
    assert generate_templates(model, tok, ((6, 5),)) == generate_templates(plain, tok, ((6, 5),))
    results = [world_editor(m, tok, sentences, tmp_path / name, layers=(2,)).edit(WORLD_REQUESTS[:1], method="rome")
               for m, name in ((plain, "stats-plain"), (model, "stats"))]
    (want,), (got,) = (r.delta.weights for r in results)
    assert float((got.dense() - want.dense()).norm() / want.dense().norm()) <= 1e-5
    name = ModelLayout(model).rewrite_weight_name(2)
    assert torch.equal(read_parameter(model, name), read_parameter(plain, name))
