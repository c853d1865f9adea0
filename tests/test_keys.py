"""Keys and h^L at subject tokens against plain per-prompt forwards (DESIGN §2.3)."""
import pytest
import torch

from massedit.model.arch import ModelLayout
from massedit.compute.keys import subject_hidden, subject_keys
from massedit.inputs.tokens import compose, encode_prompt
from tiny import make_model, make_requests, make_tokenizer

TEMPLATES = [["{}"], ["The city of Paris. {}", "Because I speak. {}", "You know what. {}"]]


def _direct(model, layout, tok, prompt_template, subject, layer, kind):
    enc = encode_prompt(tok, prompt_template, subject)
    store = {}
    module = layout.rewrite_module(layer) if kind == "key" else layout.block(layer)
    if kind == "key":
        handle = module.register_forward_pre_hook(lambda m, a: store.__setitem__("x", a[0]))
    else:
        handle = module.register_forward_hook(lambda m, a, o: store.__setitem__("x", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(torch.tensor([list(enc.ids)]))
    handle.remove()
    return store["x"][0, enc.subject_index]


@pytest.mark.parametrize("model_type,side", [("gpt2", "right"), ("llama", "left")])
def test_keys_are_group_means_of_per_prompt_keys(model_type, side):
    tok = make_tokenizer("bpe" if model_type == "gpt2" else "sentencepiece", side)
    model, _ = make_model(model_type, tok)
    layout = ModelLayout(model)
    requests = make_requests(10, seed=6)
    got = subject_keys(model, layout, tok, requests, TEMPLATES, layer=2, batch_size=7)
    for i, r in enumerate(requests):
        groups = [torch.stack([_direct(model, layout, tok, compose(c, r.prompt), r.subject, 2, "key") for c in g]).mean(0)
                  for g in TEMPLATES]
        torch.testing.assert_close(got[i], torch.stack(groups).mean(0), rtol=1e-5, atol=1e-6)
    # The bare prompt weighs 1/2, each of the three context prompts 1/6.
    assert got.shape == (10, layout.key_dim(2))


def test_hidden_at_bare_prompt():
    model, tok = make_model("gpt2")
    layout = ModelLayout(model)
    requests = make_requests(8, seed=8)
    got = subject_hidden(model, layout, tok, requests, layer=3, batch_size=3)
    for i, r in enumerate(requests):
        torch.testing.assert_close(got[i], _direct(model, layout, tok, r.prompt, r.subject, 3, "hidden"),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", ["gpt2", "gptj", "llama"])
def test_layer_states_equal_fresh_computation_as_layers_are_edited(model_type):
    """Carrying the residual stream from one edited layer to the next gives the keys and h^L a
    full recomputation on the edited model gives (gptj's blocks return tuples)."""
    from massedit.compute.keys import LayerStates

    model, tok = make_model(model_type)
    layout = ModelLayout(model)
    requests = make_requests(9, seed=9)
    states = LayerStates(model, layout, tok, requests, TEMPLATES, target_layer=3, batch_size=4)
    gen = torch.Generator().manual_seed(0)
    for layer in (1, 2, 3):
        keys, h = states.at_layer(layer)
        torch.testing.assert_close(keys, subject_keys(model, layout, tok, requests, TEMPLATES, layer), rtol=1e-5,
                                   atol=1e-6)
        torch.testing.assert_close(h, subject_hidden(model, layout, tok, requests, 3), rtol=1e-5, atol=1e-6)
        weight = layout.rewrite_module(layer).weight
        with torch.no_grad():
            weight.add_(0.5 * torch.randn(weight.shape, generator=gen))
