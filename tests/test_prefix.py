"""The z phase computes only what δ changes (DESIGN §7): same z as the plain batched path."""
import inspect
from types import SimpleNamespace

import pytest
import torch

from massedit.model.arch import ModelLayout
from massedit.editor import MassEditor
from massedit.hparams import default_for
from massedit.inputs.requests import EditRequest
from massedit.compute.targets import TargetOptimizer, ZSettings
from tiny import MODEL_TYPES, SENTENCEPIECE_TYPES, WORDS, make_model, make_requests, make_tokenizer

TEMPLATES = [["{}"], ["The city of Paris. {}", "Because I speak. {}"]]
SETTINGS = dict(num_grad_steps=12, lr=0.5, weight_decay=1e-3, clamp_norm_factor=4.0, kl_factor=0.0625,
                early_stop_loss=5.75)
PROMPTS = {
    "start": "{} plays the sport of",
    "middle": "In Tokyo, the friend of {} speaks",
    "end": "The team of football is {}",
}


def _requests(where):
    subjects = ["Michael Jordan", "Zorblax", "Quintavelle Mxyzptlk", "the city-state of Rome", "Sony Nokia"]
    targets = ["baseball", "French", "Xanadu-Prime city-state", "chess", "the capital of Rome"]
    return [EditRequest(subject=s, prompt=PROMPTS[where], target_new=t) for s, t in zip(subjects, targets)]


def _optimizers(model_type, side, dtype=torch.float32):
    tok = make_tokenizer("sentencepiece" if model_type in SENTENCEPIECE_TYPES else "bpe", side)
    model, _ = make_model(model_type, tok, dtype=dtype)
    layout = ModelLayout(model)
    s = ZSettings(layer=1, loss_layer=3, **SETTINGS)
    return [TargetOptimizer(model, layout, tok, s, TEMPLATES, reuse_prefix=r) for r in (True, False)]


def _rel(a, b):
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("where", ["start", "middle", "end"])
@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_prefix_reuse_equals_plain_path(model_type, where, side):
    prefix, plain = _optimizers(model_type, side)
    reqs = _requests(where)
    a = prefix.optimize(reqs, batch_size=3, progress=False)
    b = plain.optimize(reqs, batch_size=3, progress=False)
    assert _rel(a.z, b.z) <= 1e-4
    assert torch.equal(a.steps, b.steps)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_prefix_reuse_every_architecture(model_type):
    prefix, plain = _optimizers(model_type, "right")
    reqs = make_requests(6, seed=4)
    assert _rel(prefix.optimize(reqs, 6, False).z, plain.optimize(reqs, 6, False).z) <= 1e-4


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_prefix_reuse_same_weight_deltas(model_type, tmp_path, monkeypatch):
    import random

    import massedit.compute.targets as targets

    used = []
    for cls in (targets._PrefixForward, targets._PlainForward):
        real_init = cls.__init__

        def spy(self, *args, _real=real_init, **kwargs):
            used.append(type(self).__name__)
            _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", spy)

    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30))) for _ in range(200)]
    tok = make_tokenizer("sentencepiece" if model_type in SENTENCEPIECE_TYPES else "bpe")
    model, _ = make_model(model_type, tok)
    hp = default_for(model.config).replace(layers=[1, 2], v_loss_layer=3, mom2_n_samples=200, mom2_update_weight=50,
                                           v_num_grad_steps=12, v_weight_decay=1e-3, clamp_norm_factor=4.0)
    deltas = []
    for reuse in (True, False):
        editor = MassEditor(model, tok, hp, stats_dir=tmp_path, corpus=corpus, context_templates=TEMPLATES,
                            progress=False, reuse_prefix=reuse)
        deltas.append(editor.edit(make_requests(16, seed=5), batch_size=8, apply=False).delta)
        assert used and set(used) == {"_PrefixForward" if reuse else "_PlainForward"}
        used.clear()
    for wa, wb in zip(*(d.weights for d in deltas)):
        da, db = wa.dense(), wb.dense()
        assert ((da - db).norm() / db.norm()).item() <= 1e-3


def test_float64_prefix_reuse_with_left_padding_stays_finite():
    prefix, plain = _optimizers("llama", "right", torch.float64)
    reqs = _requests("middle")
    a = prefix.optimize(reqs, batch_size=5, progress=False)
    assert torch.isfinite(a.z).all()
    assert _rel(a.z, plain.optimize(reqs, batch_size=5, progress=False).z) <= 1e-8


def test_memory_budget_sizes_chunks():
    prefix, _ = _optimizers("gpt2", "right")
    prompts = prefix.prompts(make_requests(8))
    per = prefix.bytes_per_request(prompts)
    assert prefix.chunk_size(prompts, memory_budget=3 * per + 1) == 3
    assert prefix.chunk_size(prompts, memory_budget=1) == 1
    reqs = make_requests(8)
    small = prefix.optimize(reqs, progress=False, memory_budget=2 * per)
    whole = prefix.optimize(reqs, batch_size=8, progress=False)
    assert _rel(small.z, whole.z) <= 1e-5


def test_cpu_chunks_fit_the_machines_available_memory(monkeypatch):
    """On CPU an out-of-memory process is killed, not raised to: chunks are sized from the available
    host memory (at most max_chunk), with the same z as one chunk."""
    import psutil

    prefix, _ = _optimizers("gpt2", "right")
    reqs = make_requests(8)
    per = prefix.bytes_per_request(prefix.prompts(reqs))
    whole = prefix.optimize(reqs, batch_size=8, progress=False)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=6 * per + 1))
    assert prefix.chunk_size(prefix.prompts(reqs)) == 3
    assert prefix.chunk_size(prefix.prompts(reqs), max_chunk=2) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert prefix.chunk_size(prefix.prompts(reqs)) == 1
    sizes = []
    real = TargetOptimizer.optimize_chunk
    monkeypatch.setattr(TargetOptimizer, "optimize_chunk", lambda self, p: sizes.append(len(p)) or real(self, p))
    small = prefix.optimize(reqs, progress=False)
    assert sizes == [1] * 8 and _rel(small.z, whole.z) <= 1e-5


def test_out_of_memory_chunks_are_split_and_retried(monkeypatch):
    prefix, _ = _optimizers("gpt2", "right")
    reqs = make_requests(7)
    expected = prefix.optimize(reqs, batch_size=1, progress=False)
    real = TargetOptimizer.optimize_chunk
    sizes = []

    def limited(self, prompts):
        sizes.append(len(prompts))
        if len(prompts) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, prompts)

    monkeypatch.setattr(TargetOptimizer, "optimize_chunk", limited)
    got = prefix.optimize(reqs, batch_size=7, progress=False)
    assert sizes[0] == 7 and max(s for s in sizes if s <= 2) == 2
    assert _rel(got.z, expected.z) <= 1e-5


def test_non_memory_errors_are_not_swallowed(monkeypatch):
    prefix, _ = _optimizers("gpt2", "right")
    monkeypatch.setattr(TargetOptimizer, "optimize_chunk", lambda self, p: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        prefix.optimize(make_requests(4), batch_size=4, progress=False)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_prefix_reuse_is_available_on_current_transformers(model_type):
    """The probe must not quietly turn prefix reuse off where the cache API supports it."""
    import transformers
    from packaging.version import Version

    from massedit.compute.targets import supports_prefix_reuse

    if Version(transformers.__version__) < Version("4.56"):
        pytest.skip("older transformers keep some families on legacy caches; the plain path is used there")
    model, _ = make_model(model_type)
    assert supports_prefix_reuse(model)


def _forward_taking(model, keyword):
    """The model with a forward that takes the cache only as `keyword`, as one transformers version does."""
    inner = model.forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, use_cache=None, **kwargs):
        other = {"cache": "past_key_values", "past_key_values": "cache"}[keyword]
        if other in kwargs:
            raise TypeError(f"forward() got an unexpected keyword argument '{other}'")
        return inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=use_cache,
                     cache=kwargs.pop(keyword, None), **kwargs)

    forward.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
         for n in ("input_ids", "attention_mask", "position_ids", keyword, "use_cache")]
        + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])
    model.forward = forward
    return model


@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_cache_is_passed_under_the_keyword_the_forward_takes(keyword):
    """transformers 5.x renamed `past_key_values` to `cache` (and drops the old name later): the
    prefix path must follow the installed forward, not one spelling."""
    from massedit.compute.targets import cache_keyword, supports_prefix_reuse

    tok = make_tokenizer("bpe")
    model = _forward_taking(make_model("gpt2", tok)[0], keyword)
    assert cache_keyword(model) == keyword
    assert supports_prefix_reuse(model)
    s = ZSettings(layer=1, loss_layer=3, **SETTINGS)
    prefix, plain = (TargetOptimizer(model, ModelLayout(model), tok, s, TEMPLATES, reuse_prefix=r) for r in (True, False))
    assert prefix.reuse_prefix
    reqs = _requests("middle")
    assert _rel(prefix.optimize(reqs, 5, False).z, plain.optimize(reqs, 5, False).z) <= 1e-4


# ------------------------------------------------------------------ the probe on real-scale logits


def _real_scale(model_type: str, dtype, peak: float = 30.0):
    """A tiny model as deep as SmolLM2-135M (30 layers) with its LM head scaled so that the probe's
    logits reach ±peak, as a real model's do (SmolLM2-135M: 31.5); tied embeddings keep their values."""
    from transformers import AutoModelForCausalLM

    from tiny import dtype_kwargs

    config = make_model(model_type)[0].config
    config.num_hidden_layers = 30
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", **dtype_kwargs(dtype)).eval()
    with torch.no_grad():
        now = model(input_ids=torch.arange(1, 6)[None]).logits.abs().max().item()
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach() * (peak / now), requires_grad=False)
    return model


def _continuing(model, change):
    """The model with each forward's keyword inputs and output passed through `change(kwargs,
    cache_is_empty, run)`, `run(**kwargs)` being the real forward; calls without a cache pass."""
    from massedit.compute.targets import cache_keyword

    key, inner = cache_keyword(model), model.forward

    def forward(**kwargs):
        cache = kwargs.get(key)
        if cache is None:
            return inner(**kwargs)
        return change(kwargs, cache.get_seq_length() == 0, inner)

    forward.__signature__ = inspect.signature(inner)
    model.forward = forward
    return model


def _layers_reversed(kwargs, empty, run):
    """Continues from the prefix's keys/values with the layers in reverse order."""
    from massedit.compute.targets import filled_cache, kv_pairs

    if not empty:
        key = next(k for k in kwargs if k in ("cache", "past_key_values"))
        kwargs[key] = filled_cache(kv_pairs(kwargs[key])[::-1])
    return run(**kwargs)


def _prefix_at_wrong_positions(kwargs, empty, run):
    """Records the prefix as if it stood three positions later."""
    if empty:
        kwargs["position_ids"] = kwargs["position_ids"] + 3
    return run(**kwargs)


def _float32_noise_of_smollm2(kwargs, empty, run):
    """A correct cache whose continuation differs from the full forward by what float32 summation
    order gave on SmolLM2-135M (1.44e-3 on logits up to 31.5): ±1.44e-3 on every logit."""
    out = run(**kwargs)
    if not empty:
        sign = torch.randint(0, 2, out.logits.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
        out.logits = out.logits + (1.44e-3 * sign).to(out.logits.dtype)
    return out


_PROBE_CASES = [(m, d, c, r) for m in ("llama", "gpt2") for d in (torch.float32, torch.bfloat16)
                for c, r in ((None, True), (_float32_noise_of_smollm2, True), (_layers_reversed, False),
                             (_prefix_at_wrong_positions, False))
                # Shifting a rotary model's prefix by 3 positions moves these logits by 0.3 (2 units in
                # the last place of bfloat16 at 30), 0.05 in float32 where rounding is 1e-5: a
                # comparison of bfloat16 logits cannot tell that from rounding; float32 covers it.
                if not (m == "llama" and d == torch.bfloat16 and c is _prefix_at_wrong_positions)]


@pytest.mark.parametrize("model_type, dtype, cache, reused", _PROBE_CASES)
def test_prefix_probe_tells_a_wrong_cache_from_rounding_at_real_logit_scale(model_type, dtype, cache, reused):
    """Logits of a real model's scale (~30) and float32 rounding of the size measured on SmolLM2 keep
    prefix reuse on (the former absolute 1e-3 tolerance turned it off); a cache read from the wrong
    layers or recorded at the wrong positions turns it off, in float32 and in bfloat16."""
    from massedit.compute.targets import supports_prefix_reuse

    model = _real_scale(model_type, dtype)
    if cache is not None:
        model = _continuing(model, cache)
    assert supports_prefix_reuse(model) is reused
