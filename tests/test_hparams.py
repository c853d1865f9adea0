"""Hyperparameters: reference JSON / EasyEdit YAML loading, checks, presets, defaults, round trip."""
import json

import pytest

from massedit.hparams import (
    EXTRA_KEYS,
    PRESETS,
    HParamsError,
    MEMITHyperParams,
    default_for,
    default_layers,
    preset,
    preset_name_for,
)

# The key set of kmeng01/memit hparams/MEMIT/EleutherAI_gpt-j-6B.json.
MEMIT_GPTJ_JSON = """{
    "layers": [
        3, 4, 5, 6, 7, 8
    ],
    "clamp_norm_factor": 0.75,
    "layer_selection": "all",
    "fact_token": "subject_last",
    "v_num_grad_steps": 25,
    "v_lr": 5e-1,
    "v_loss_layer": 27,
    "v_weight_decay": 0.5,
    "kl_factor": 0.0625,
    "mom2_adjustment": true,
    "mom2_update_weight": 15000,
    "rewrite_module_tmp": "transformer.h.{}.mlp.fc_out",
    "layer_module_tmp": "transformer.h.{}",
    "mlp_module_tmp": "transformer.h.{}.mlp",
    "attn_module_tmp": "transformer.h.{}.attn",
    "ln_f_module": "transformer.ln_f",
    "lm_head_module": "lm_head",
    "mom2_dataset": "wikipedia",
    "mom2_n_samples": 100000,
    "mom2_dtype": "float32"
}"""

# The key set of kmeng01/rome hparams/ROME/gpt2-xl.json (+ the ROME-only templates key).
ROME_GPT2XL_JSON = {
    "layers": [17], "fact_token": "subject_last", "v_num_grad_steps": 20, "v_lr": 5e-1, "v_loss_layer": 47,
    "v_weight_decay": 0.5, "clamp_norm_factor": 4, "kl_factor": 0.0625, "mom2_adjustment": True,
    "context_template_length_params": [[5, 10], [10, 10]],
    "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj", "layer_module_tmp": "transformer.h.{}",
    "mlp_module_tmp": "transformer.h.{}.mlp", "attn_module_tmp": "transformer.h.{}.attn",
    "ln_f_module": "transformer.ln_f", "lm_head_module": "transformer.wte", "mom2_dataset": "wikipedia",
    "mom2_n_samples": 100000, "mom2_dtype": "float32",
}

# The key set of zjunlp/EasyEdit hparams/MEMIT/llama-7b.yaml / mistral-7b.yaml (note "5e-1" and
# "1e-3", which PyYAML reads as strings).
EASYEDIT_MEMIT_YAML = """alg_name: "MEMIT"
model_name: "./hugging_cache/llama-2-7b"
stats_dir: "./data/stats"
device: 1
layers: [4, 5, 6, 7, 8]
clamp_norm_factor: 4
layer_selection: "all"
fact_token: "subject_last"
v_num_grad_steps: 25
v_lr: 5e-1
v_loss_layer: 31
v_weight_decay: 1e-3
kl_factor: 0.0625
mom2_adjustment: true
mom2_update_weight: 15000
rewrite_module_tmp: "model.layers.{}.mlp.down_proj"
layer_module_tmp: "model.layers.{}"
mlp_module_tmp: "model.layers.{}.mlp"
attn_module_tmp: "model.layers.{}.self_attn"
ln_f_module: "model.norm"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
model_parallel: false
batch_size: 1
max_length: 40
"""

# The key set of zjunlp/EasyEdit hparams/ROME/gpt-j-6B.yaml plus ROMEHyperParams' optional keys.
EASYEDIT_ROME_YAML = """alg_name: "ROME"
model_name: "./hugging_cache/gpt-j-6B"
stats_dir: "./data/stats"
device: 1
layers: [5]
fact_token: "subject_last"
v_num_grad_steps: 20
v_lr: 5e-1
v_loss_layer: 27
v_weight_decay: 0.5
clamp_norm_factor: 4
kl_factor: 0.0625
mom2_adjustment: false
context_template_length_params: [[5, 10], [10, 10]]
rewrite_module_tmp: "transformer.h.{}.mlp.fc_out"
layer_module_tmp: "transformer.h.{}"
mlp_module_tmp: "transformer.h.{}.mlp"
attn_module_tmp: "transformer.h.{}.attn"
ln_f_module: "transformer.ln_f"
lm_head_module: "lm_head"
mom2_dataset: "wikipedia"
mom2_n_samples: 100000
mom2_dtype: "float32"
fp16: false
enable_prompt_keys: false
enable_random_prefix_keys: true
original_implementation: false
"""


def test_reference_memit_json(tmp_path):
    p = tmp_path / "EleutherAI_gpt-j-6B.json"
    p.write_text(MEMIT_GPTJ_JSON)
    hp = MEMITHyperParams.from_file(p)
    assert hp.layers == [3, 4, 5, 6, 7, 8] and hp.v_lr == 0.5 and hp.v_num_grad_steps == 25
    assert hp.mom2_update_weight == 15000 and hp.rewrite_module_tmp == "transformer.h.{}.mlp.fc_out"
    assert hp.extras == {} and max(hp.layers) == 8 and hp.v_loss_layer == 27
    assert hp.module_overrides()["lm_head_module"] == "lm_head"
    # the reference file is the GPT-J preset plus explicit module paths
    assert hp.replace(**{k: None for k in hp.module_overrides()}) == preset("gpt-j-6b")


def test_reference_rome_json(tmp_path):
    p = tmp_path / "gpt2-xl.json"
    p.write_text(json.dumps(ROME_GPT2XL_JSON))
    hp = MEMITHyperParams.from_json(p)
    assert hp.layers == [17] and hp.clamp_norm_factor == 4.0 and hp.lm_head_module == "transformer.wte"
    assert hp.context_template_plan() == [(5, 10), (10, 10)]
    assert hp.mom2_update_weight == 15000  # unused by ROME, default kept


def test_easyedit_yaml(tmp_path):
    p = tmp_path / "llama-7b.yaml"
    p.write_text(EASYEDIT_MEMIT_YAML)
    hp = MEMITHyperParams.from_file(p)
    assert hp.v_lr == 0.5 and hp.v_weight_decay == pytest.approx(1e-3)  # "5e-1" / "1e-3" strings
    assert hp.layers == [4, 5, 6, 7, 8] and hp.clamp_norm_factor == 4.0
    assert hp.extras == {
        "alg_name": "MEMIT", "model_name": "./hugging_cache/llama-2-7b", "stats_dir": "./data/stats",
        "device": 1, "model_parallel": False, "batch_size": 1, "max_length": 40,
    }
    assert hp.batch_size == 64  # EasyEdit's per-call batch size does not set the z chunk size
    for k in hp.extras:
        assert k in EXTRA_KEYS

    p = tmp_path / "gpt-j-6B.yml"
    p.write_text(EASYEDIT_ROME_YAML)
    rome = MEMITHyperParams.from_yaml(p)
    assert rome.layers == [5] and rome.mom2_adjustment is False
    assert rome.extras["enable_random_prefix_keys"] is True and rome.extras["alg_name"] == "ROME"


def test_round_trip(tmp_path):
    p = tmp_path / "in.yaml"
    p.write_text(EASYEDIT_MEMIT_YAML)
    hp = MEMITHyperParams.from_yaml(p)
    hp.to_json(tmp_path / "out.json")
    again = MEMITHyperParams.from_json(tmp_path / "out.json")
    assert again == hp and again.to_dict() == hp.to_dict()
    hp.to_yaml(tmp_path / "out.yaml")
    assert MEMITHyperParams.from_file(tmp_path / "out.yaml") == hp
    plain = preset("gpt2-xl")
    assert "extras" not in plain.to_dict()
    assert MEMITHyperParams.from_dict(plain.to_dict()) == plain


def test_unknown_key_suggestion():
    with pytest.raises(HParamsError) as err:
        MEMITHyperParams.from_dict({"layers": [1], "v_num_grad_step": 5, "zzz": 1}, "my.json")
    msg = str(err.value)
    assert "my.json" in msg and '"v_num_grad_step"' in msg and 'did you mean "v_num_grad_steps"' in msg
    assert '"zzz"' in msg and "Valid keys:" in msg and "mom2_update_weight" in msg
    with pytest.raises(HParamsError, match="did you mean"):
        preset("gpt2-xl").replace(kl_facter=1.0)


@pytest.mark.parametrize(
    "change, key, words",
    [
        ({"layers": []}, "layers", ["empty"]),
        ({"layers": [5, 3, 4]}, "layers", ["increasing", "[3, 4, 5]"]),
        ({"layers": [3, 3]}, "layers", ["repeats"]),
        ({"layers": [-1, 2]}, "layers", [">= 0"]),
        ({"layers": 5}, "layers", ["list", "[5]"]),
        ({"layers": [1.5]}, "layers", ["item 0", "integer"]),
        ({"v_num_grad_steps": 0}, "v_num_grad_steps", [">= 1"]),
        ({"v_lr": "fast"}, "v_lr", ["number"]),
        ({"mom2_dtype": "float8"}, "mom2_dtype", ["float32", "bfloat16"]),
        ({"fact_token": "last"}, "fact_token", ["subject_last", "not"]),
        ({"layer_selection": "random"}, "layer_selection", ["all"]),
        ({"mom2_update_weight": 0}, "mom2_update_weight", ["> 0"]),
        ({"clamp_norm_factor": -1}, "clamp_norm_factor", ["> 0"]),
        ({"mom2_adjustment": "yes"}, "mom2_adjustment", ["true or false"]),
        ({"rewrite_module_tmp": "model.layers.mlp"}, "rewrite_module_tmp", ['"{}"']),
        ({"context_template_length_params": [[10]]}, "context_template_length_params", ["item 0", "pair"]),
        ({"context_template_length_params": [[10, 0]]}, "context_template_length_params", [">= 1"]),
        ({"alg_name": "KN"}, "alg_name", ["MEMIT", "ROME"]),
    ],
)
def test_value_errors(change, key, words):
    data = dict(json.loads(MEMIT_GPTJ_JSON), **change)
    with pytest.raises(HParamsError) as err:
        MEMITHyperParams.from_dict(data, "hp.json")
    msg = str(err.value)
    assert "hp.json" in msg and f'key "{key}"' in msg, msg
    for w in words:
        assert w in msg, msg


def test_direct_construction_is_checked():
    with pytest.raises(HParamsError, match="increasing"):
        MEMITHyperParams(layers=[2, 1])
    with pytest.raises(HParamsError, match="missing key \"layers\""):
        MEMITHyperParams.from_dict({"v_lr": 0.1}, "x.json")
    with pytest.raises(HParamsError, match='key "layers": layer 6 is out of range'):
        preset("gpt-j-6b").check_depth(6)


@pytest.mark.parametrize(
    "change, n_layers, words",
    [
        # a layer past the model is the layers' fault, not v_loss_layer's (which is then "below" it)
        ({"layers": [99], "v_loss_layer": 27}, 28, ['key "layers"', "layer 99 is out of range", "28 layers"]),
        ({"v_loss_layer": 99}, 28, ['key "v_loss_layer"', "99 is out of range", "use 27"]),
        ({"layers": [2, 3], "v_loss_layer": 1}, 28, ['key "v_loss_layer"', "below the last edited layer 3"]),
    ],
)
def test_depth_errors_name_the_key_at_fault(change, n_layers, words):
    hp = MEMITHyperParams.from_dict(dict(json.loads(MEMIT_GPTJ_JSON), **change), "hp.json")
    with pytest.raises(HParamsError) as err:
        hp.check_depth(n_layers)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(HParamsError, match="not found"):
        MEMITHyperParams.from_file(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text('{"layers": [1],\n "v_lr": }')
    with pytest.raises(HParamsError, match="line 2, column"):
        MEMITHyperParams.from_file(tmp_path / "bad.json")
    (tmp_path / "bad.yaml").write_text("layers: [1\nv_lr: 0.5\n")
    with pytest.raises(HParamsError, match="invalid YAML"):
        MEMITHyperParams.from_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(HParamsError, match="mapping"):
        MEMITHyperParams.from_file(tmp_path / "list.yaml")
    with pytest.raises(HParamsError, match="json or .yaml"):
        MEMITHyperParams.from_file(tmp_path / "x.toml")


def test_presets():
    g = preset("gpt2-xl")
    assert (g.layers, g.mom2_update_weight, g.v_num_grad_steps, g.v_loss_layer) == ([13, 14, 15, 16, 17], 20000, 20, 47)
    j = preset("EleutherAI/gpt-j-6B")
    assert (j.layers, j.v_num_grad_steps, j.v_lr, j.v_loss_layer, j.v_weight_decay, j.clamp_norm_factor,
            j.kl_factor, j.mom2_update_weight, j.mom2_n_samples, j.mom2_dtype) == (
        [3, 4, 5, 6, 7, 8], 25, 0.5, 27, 0.5, 0.75, 0.0625, 15000, 100000, "float32")
    n = preset("gpt-neox-20b")
    assert (n.layers, n.mom2_update_weight, n.v_num_grad_steps, n.clamp_norm_factor, n.v_loss_layer) == (
        [6, 7, 8, 9, 10], 20000, 20, 0.3, 43)
    for name in ("llama-7b", "llama-2-7b", "llama-3-8b", "mistral-7b"):
        p = preset(name)
        assert (p.layers, p.mom2_update_weight, p.v_num_grad_steps, p.v_loss_layer) == ([4, 5, 6, 7, 8], 15000, 25, 31)
    r = preset("rome-gpt-j-6b")
    assert (r.layers, r.v_num_grad_steps, r.v_lr, r.v_weight_decay, r.kl_factor, r.clamp_norm_factor) == (
        [5], 20, 0.5, 0.5, 0.0625, 4.0)
    assert preset("rome-gpt2-xl").layers == [17]
    assert all(p.rewrite_module_tmp is None for p in PRESETS.values())  # module paths from the registry
    p = preset("gpt2-xl")
    p.layers.append(18)
    assert preset("gpt2-xl").layers == [13, 14, 15, 16, 17]  # copies
    with pytest.raises(HParamsError, match='did you mean "gpt2-xl"'):
        preset("gpt2-xxl")


def test_default_for():
    from transformers import GPT2Config, GPTJConfig, LlamaConfig

    assert default_for(GPT2Config(n_layer=48, n_embd=1600, n_head=25)) == preset("gpt2-xl")
    assert default_for(GPTJConfig(n_layer=28, n_embd=4096)) == preset("gpt-j-6b")
    assert default_for(GPTJConfig(n_layer=28, n_embd=4096), "rome") == preset("rome-gpt-j-6b")
    assert preset_name_for({"model_type": "gpt_neox", "num_hidden_layers": 44, "hidden_size": 6144}) == "gpt-neox-20b"
    tiny = default_for(GPT2Config(n_layer=4, n_embd=32, n_head=4))
    assert tiny.layers == [1, 2] and tiny.v_loss_layer == 3 and tiny.clamp_norm_factor == 0.75
    tiny_llama = default_for(LlamaConfig(num_hidden_layers=6, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=4))
    assert tiny_llama.layers == [1, 2] and tiny_llama.v_loss_layer == 5 and tiny_llama.clamp_norm_factor == 4.0
    assert default_for({"model_type": "qwen2", "num_hidden_layers": 28}).layers == [4, 5, 6, 7]
    assert default_for({"model_type": "gpt2", "n_layer": 4}, "rome").layers == [1]
    assert default_layers(32) == [4, 5, 6, 7, 8] and default_layers(1) == [0] and default_layers(3) == [1]
    for n in range(1, 80):
        layers = default_layers(n)
        assert layers == sorted(set(layers)) and 0 <= layers[0] and layers[-1] <= max(0, n - 2)
    with pytest.raises(HParamsError, match="depth"):
        default_for({"model_type": "x"})


def test_every_module_path_key_reaches_the_architecture_spec():
    """No module-path key is read and then ignored: each one replaces the table's path."""
    from massedit.model.arch import OVERRIDE_KEYS, spec_for

    keys = [k for k in MEMITHyperParams.from_dict({"layers": [1]}).to_dict() if k.endswith(("_module", "_module_tmp"))]
    assert sorted(keys) == sorted(OVERRIDE_KEYS)
    hp = preset("gpt2-xl").replace(**{k: f"my.{{}}.{k}" if k.endswith("_tmp") else f"my.{k}" for k in keys})
    for model_type in ("gpt2", "not-in-the-table"):
        spec = spec_for(model_type, hp.module_overrides())
        assert all(getattr(spec, k) == getattr(hp, k) for k in keys), model_type


def test_smollm2_shape_gets_its_measured_preset_and_other_llamas_do_not():
    smol = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576}
    hp = default_for(smol)
    assert hp.layers == [1, 2, 3, 4, 5] and hp.mom2_update_weight == PRESETS["smollm2-135m"].mom2_update_weight
    assert hp.v_loss_layer == 29 and default_for(smol, "rome").layers == [3]
    assert hp.clamp_norm_factor == 0.75 and hp.mom2_dataset == "pydoc"
    other = default_for({"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 640})
    assert other.mom2_update_weight == PRESETS["llama-7b"].mom2_update_weight and other.layers != hp.layers


def test_gemma3_270m_shape_gets_one_layer_on_the_mlp_site():
    """Gemma-3-270M's measured preset: one layer (spreading over more realises under half of z on a
    model whose MLP output passes a norm), δ at the MLP output, 50 steps; ROME keeps the defaults."""
    gemma = {"model_type": "gemma3_text", "num_hidden_layers": 18, "hidden_size": 640}
    hp = default_for(gemma)
    assert hp.layers == [5] and hp.z_site == "mlp" and hp.v_num_grad_steps == 50 and hp.v_loss_layer == 17
    assert hp.mom2_dataset == "pydoc+sampled" and hp.mom2_update_weight == 300
    assert default_for(gemma, "rome").z_site == "residual"
    assert default_for({**gemma, "num_hidden_layers": 26, "hidden_size": 1152}).layers != [5]
