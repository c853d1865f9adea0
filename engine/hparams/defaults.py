"""The hyperparameters massedit picks when none are given.

Three kinds, three names:

- **Presets** (`preset(name)`, `PRESETS`): named reference configurations, shipped as data files in
  the reference JSON format (``massedit/hparams/presets/NAME.json``) and read by the same reader as
  users' files. Their sources:
  ``gpt2-xl``: kmeng01/memit hparams/MEMIT/gpt2-xl.json (also in EasyEdit);
  ``gpt-j-6b``: kmeng01/memit hparams/MEMIT/EleutherAI_gpt-j-6B.json;
  ``gpt-neox-20b``: layers, λ, steps and clamp from the MEMIT paper, App. B.4 (DESIGN §2); the
  reference's MEMIT neox JSON is not at hand, so lr / decay / KL are the reference's common values
  and v_loss_layer = 43 (its last layer, as in the reference's ROME neox JSON);
  ``llama-7b`` (also named ``llama-2-7b``, ``llama-3-8b``, ``mistral-7b``): EasyEdit
  hparams/MEMIT/llama-7b.yaml (model llama-2-7b) and mistral-7b.yaml: layers 4..8, 25 steps, lr 0.5,
  loss layer 31, weight decay 1e-3, clamp 4, KL 0.0625, λ 15000;
  ``rome-gpt2-xl``, ``rome-gpt-j-6b``: kmeng01/rome hparams/ROME/gpt2-xl.json and
  EleutherAI_gpt-j-6B.json (clamp 4, wd 0.5, KL 0.0625, 20 steps), with context templates
  [[5, 10], [10, 10]] as in the reference's ROME files that carry the key (memit repo's ROME neox
  JSON, EasyEdit's ROME YAMLs);
  ``rome-llama-7b``: EasyEdit hparams/ROME/llama-7b.yaml (llama-2-7b): layer 5, 25 steps, wd 1e-3,
  clamp 4, no covariance;
  ``smollm2-135m``, ``rome-smollm2-135m``: measured on SmolLM2-135M with its known facts
  (benchmarks.real; README "Measured on real models"): the paper's z settings (25 steps, lr 0.5,
  KL 0.0625) with clamp 0.75 (NS 77.8 against clamp 4's 76.8 at n = 100), layers 1..5 from the causal
  trace, λ from a sweep at n = 1,000, statistics of the built-in `pydoc` corpus (NS 70.8 against
  `pydoc+sampled`'s 69.6 from the same z at n = 1,000); ROME at layer 3, the middle of that range.
  ``gemma3-270m``: measured on Gemma-3-270M with its 150 known facts: one layer (5, the end of the
  trace's span 1..5), δ found at the MLP output (z_site "mlp": Gemma's MLP output passes a norm
  before the residual stream), 50 steps (z does not converge in 25), λ 300 from a sweep of 100 /
  300 / 1000, statistics of `pydoc+sampled` (S 67.2 against 62.7 with `pydoc`'s, same z). Spreading over layers 4..5 or 1..5 realises under half of z (README, "Measured on
  real models"); no ROME preset (depth-scaled defaults).
- **Defaults for a model** (`default_for(config)`): the preset of a model the references tuned, else
  values scaled to the model's depth from the preset of its family in the architecture table.
- **World-model settings** (`world_preset(config)`): measured for the small models `massedit world
  build` trains; not a named preset.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Mapping, Optional

from massedit.hparams.params import HParamsError, MEMITHyperParams, default_layers
from massedit.model.arch import REGISTRY

__all__ = ["PRESETS", "preset", "load_hparams", "preset_name_for", "default_for", "world_preset"]

_PRESET_DIR = Path(__file__).with_name("presets")

PRESETS: dict[str, MEMITHyperParams] = {
    path.stem: MEMITHyperParams.from_json(path) for path in sorted(_PRESET_DIR.glob("*.json"))
}
"""Preset name → its hyperparameters, read from ``presets/*.json``; use `preset(name)` for a private copy."""

_ALIASES = {
    "gpt-j": "gpt-j-6b", "gptj": "gpt-j-6b", "gpt-j-6b": "gpt-j-6b", "eleutherai_gpt-j-6b": "gpt-j-6b",
    "gpt-neox": "gpt-neox-20b", "neox-20b": "gpt-neox-20b", "eleutherai_gpt-neox-20b": "gpt-neox-20b",
    "llama-2-7b": "llama-7b", "llama-2-7b-hf": "llama-7b", "llama-3-8b": "llama-7b", "meta-llama-3-8b": "llama-7b",
    "llama-3.1-8b": "llama-7b", "meta-llama-3.1-8b": "llama-7b", "mistral-7b": "llama-7b",
    "mistral-7b-v0.1": "llama-7b", "mistral-7b-v0.3": "llama-7b",
    "rome-eleutherai_gpt-j-6b": "rome-gpt-j-6b", "rome-gpt-j": "rome-gpt-j-6b",
}

# Families of the architecture table with tuned reference values; the others take GPT-J's.
_FAMILY_PRESETS = {"llama-like": ("llama-7b", "rome-llama-7b")}
_OTHER_PRESETS = ("gpt-j-6b", "rome-gpt-j-6b")

# (model_type, n_layers, hidden size) → preset names for MEMIT and ROME
_KNOWN_MODELS = {
    ("gpt2", 48, 1600): ("gpt2-xl", "rome-gpt2-xl"),
    ("gptj", 28, 4096): ("gpt-j-6b", "rome-gpt-j-6b"),
    ("gpt_neox", 44, 6144): ("gpt-neox-20b", None),
    ("llama", 32, 4096): ("llama-7b", "rome-llama-7b"),
    ("mistral", 32, 4096): ("mistral-7b", None),
    # Measured here, not by the references: README "Measured on real models" (the trace's layers; λ swept at n = 1,000).
    ("llama", 30, 576): ("smollm2-135m", "rome-smollm2-135m"),
    ("gemma3_text", 18, 640): ("gemma3-270m", None),
}


def preset(name: str) -> MEMITHyperParams:
    """A fresh copy of the named preset (a file in ``presets/``). Accepts hub ids and reference file
    names ("EleutherAI/gpt-j-6B", "EleutherAI_gpt-j-6B.json", "gpt2-xl")."""
    key = str(name).strip().lower().rsplit("/", 1)[-1]
    for ext in (".json", ".yaml", ".yml"):
        if key.endswith(ext):
            key = key[: -len(ext)]
    key = _ALIASES.get(key, key)
    if key not in PRESETS:
        close = difflib.get_close_matches(key, list(PRESETS) + list(_ALIASES), n=1, cutoff=0.5)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        raise HParamsError(f"unknown preset {name!r}{hint}; presets: {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[key])


def load_hparams(file_or_preset) -> MEMITHyperParams:
    """A .json / .yaml hparams file, or a preset name ("gpt-j-6b", "EleutherAI/gpt-j-6B")."""
    path = Path(file_or_preset)
    if path.exists() or path.suffix.lower() in (".json", ".yaml", ".yml"):
        return MEMITHyperParams.from_file(path)
    try:
        return preset(str(file_or_preset))
    except HParamsError as err:
        raise HParamsError(f"{file_or_preset}: no such hparams file (.json / .yaml), and {err}") from None


def _cfg_get(cfg: Any, *names: str) -> Any:
    for n in names:
        v = cfg.get(n) if isinstance(cfg, Mapping) else getattr(cfg, n, None)
        if v is not None:
            return v
    return None


def _config_of(model_config: Any) -> Any:
    if not isinstance(model_config, Mapping) and not hasattr(model_config, "model_type") and hasattr(model_config, "config"):
        return model_config.config  # a model was passed
    return model_config


def preset_name_for(model_config: Any, algorithm: str = "memit") -> Optional[str]:
    """The preset that matches a HF config exactly (type, depth and width), else None."""
    cfg = _config_of(model_config)
    key = (
        _cfg_get(cfg, "model_type"),
        _cfg_get(cfg, "num_hidden_layers", "n_layer", "n_layers", "num_layers"),
        _cfg_get(cfg, "hidden_size", "n_embd", "d_model"),
    )
    names = _KNOWN_MODELS.get(key)
    if names is None:
        return None
    return names[0] if algorithm.lower() == "memit" else names[1]


def _algorithm(name: str) -> str:
    algorithm = name.lower()
    if algorithm not in ("memit", "rome"):
        raise HParamsError(f"algorithm must be 'memit' or 'rome', got {name!r}")
    return algorithm


def default_for(model_config: Any, algorithm: str = "memit") -> MEMITHyperParams:
    """Hyperparameters for a HF model config (or a model, or a config dict).

    A model the references tuned (GPT-2 XL, GPT-J 6B, GPT-NeoX 20B, 32-layer 4096-wide Llama /
    Mistral) or this project measured (SmolLM2-135M, Gemma-3-270M) gets its preset. Any other model gets depth-scaled defaults: layers from
    `default_layers(N)`, v_loss_layer = N - 1, and the other values of the closest reference
    family — EasyEdit's Llama values (25 steps, weight decay 1e-3, clamp 4) for the architecture
    table's "llama-like" family, GPT-J's MEMIT values (25 steps, weight decay 0.5, clamp 0.75, λ 15000)
    for the rest. A tiny
    4-layer model gets layers [1, 2] and v_loss_layer 3. `algorithm="rome"` gives a single layer
    (the middle of the MEMIT range; GPT-J: 5) with the clamp (4) and context templates
    ([[5, 10], [10, 10]]) of the family's ROME preset.
    These are starting points, not tuned values: measure on the model at hand (DESIGN §9).
    """
    algorithm = _algorithm(algorithm)
    cfg = _config_of(model_config)
    name = preset_name_for(cfg, algorithm)
    if name is not None:
        return preset(name)
    n = _cfg_get(cfg, "num_hidden_layers", "n_layer", "n_layers", "num_layers")
    if n is None:
        raise HParamsError(
            "cannot tell the model's depth from its config (no num_hidden_layers / n_layer); "
            "give the hparams explicitly (e.g. preset('gpt-j-6b') with 'layers' changed)"
        )
    n = int(n)
    spec = REGISTRY.get(_cfg_get(cfg, "model_type"))
    memit, rome = _FAMILY_PRESETS.get(spec.family if spec else None, _OTHER_PRESETS)
    layers = default_layers(n)
    hp = preset(memit).replace(layers=layers, v_loss_layer=n - 1)
    if algorithm == "memit":
        return hp
    ref = preset(rome)
    return hp.replace(layers=[layers[(len(layers) - 1) // 2]], clamp_norm_factor=ref.clamp_norm_factor,
                      context_template_length_params=ref.context_template_length_params)


def world_preset(model_config: Any, algorithm: str = "memit") -> MEMITHyperParams:
    """MEMIT (or ROME) settings for the small models that `massedit world build` trains (computed
    from the model's depth; not one of the named presets in PRESETS).

    Chosen from measurements on the world models (6 layers x 128, d_ff 512):
    - Layer: on the default world (2,000 subjects x 3 relations), mean-ablating the MLP output at
      the subject's last token lowers P(true) by 0.51 at layer 0 and by at most 0.001 at every later
      layer, and the causal trace's MLP effect there is 0.23 for windows starting at 0 and 1, 0.01
      or less after: the facts are written by layer 0's MLP. At n = 1000 (distinct subjects),
      layer [0] gives ES 43.7 / PS 41.8 / NS 78.5 against 30.9 / 30.9 / 79.5 for [0, 1, 2]; on the
      earlier 200-subject world the same held (layers [0] / [0, 1] / [1, 2]: ES 36.4 / 38.8 / 35.6).
    - z: such models are sure of their facts (p(true) ≈ 0.995 on the default world), so the
      reference's clamp (0.75·‖h‖) and 20-25 steps stop z short of overturning one: with them the
      default world reaches ES 26 / PS 24 at n = 100, against ES 71 / PS 75 / NS 94.4 with 100
      steps and clamp 10.
    - λ 200 rather than GPT-J's 15000 (the world's statistics come from 2,000 short documents):
      on the 200-subject world at n = 100, λ 1000 gives ES 36 / NS 98 and λ 5000 ES 1 / NS 99.6,
      against ES 80 / NS 88.
    ROME gets layer 0 too, with a z optimization allowed to go further: 200 steps, clamp 20 and
    weight decay 0.05. On the default world's first ten records, its single edits reach ES 100 /
    PS 95 with them against ES 90 / PS 85 with MEMIT's 100 steps, clamp 10, decay 0.5 (one
    relation-first prompt, "The city of birth of {} is", stays at z loss 2.0); for MEMIT at n = 100
    the same change gives ES 78 against 80, and twice the steps would double the demo's z phase.
    """
    algorithm = _algorithm(algorithm)
    cfg = _config_of(model_config)
    n = int(_cfg_get(cfg, "num_hidden_layers", "n_layer", "n_layers", "num_layers"))
    rome = algorithm == "rome"
    return MEMITHyperParams(
        layers=[0],
        v_num_grad_steps=200 if rome else 100,
        v_lr=0.5,
        v_loss_layer=n - 1,
        v_weight_decay=0.05 if rome else 0.5,
        clamp_norm_factor=20.0 if rome else 10.0,
        kl_factor=0.0625,
        mom2_update_weight=200.0,
        mom2_dataset="world",
        mom2_n_samples=2000,
        mom2_dtype="float32",
    )
