"""Architecture registry: the one place that knows where things live inside each model family.

Every other module asks a `ModelLayout` for blocks, rewrite modules (MLP down projections), the
final norm and the LM head; nothing else branches on `model_type`. `REGISTRY` has one entry per
`model_type`, each naming its family: a family whose MLP ends in one down projection is one line
there (e.g. ``"qwen3": _LLAMA_BIASED``).

The key of a layer is the *input* of its rewrite module, read with a forward pre-hook. For gated
MLPs (Llama, Mistral, Qwen2/3, Gemma 1-3, OLMo 1-2, Phi-3) that input already is act(gate(x)) * up(x), so one rule
serves every family.

Attention heads (MEMAT) are read the same way: the input of the attention output projection is
the heads' outputs side by side, n_heads slices of head_dim (query heads: with grouped-query
attention the key/value heads are shared, the outputs are not), so one rule serves every family
too; n_heads and head_dim come from the config.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from massedit.model.devices import read_parameter


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one model family, in the reference hparams' template style."""

    # Which family the entry belongs to; default hyperparameters are chosen per family
    # (massedit.hparams.defaults: "llama-like" gets EasyEdit's Llama values).
    family: str
    layer_module_tmp: str  # a transformer block, e.g. "transformer.h.{}"
    rewrite_module_tmp: str  # the MLP down projection, e.g. "transformer.h.{}.mlp.c_proj"
    ln_f_module: str  # final norm before the LM head
    lm_head_module: str
    attn_module_tmp: str  # self-attention of a block
    attn_out_module_tmp: str  # attention output projection (MEMAT)
    # The MLP whose output causal tracing restores (the rewrite module's parent, or the rewrite
    # module itself where a block has no MLP submodule, as in OPT).
    mlp_module_tmp: str = ""
    # Modules applied between the final norm and the LM head when present (OPT's project_out).
    extra_head_modules: tuple[str, ...] = ()
    # The config flag that makes the family build (and from_pretrained load) a bias on the
    # attention output projection, where it has none by default; None: no such flag.
    attn_bias_flag: Optional[str] = None
    # A norm applied to the MLP's output before it joins the residual stream (Gemma 2 / 3 and
    # OLMo 2's post_feedforward_layernorm), so the rewrite module's output reaches the residual
    # only through it; "" where the MLP output is added as it is.
    mlp_output_norm: str = ""


_LLAMA_LIKE = ArchSpec(
    family="llama-like",
    layer_module_tmp="model.layers.{}",
    rewrite_module_tmp="model.layers.{}.mlp.down_proj",
    ln_f_module="model.norm",
    lm_head_module="lm_head",
    attn_module_tmp="model.layers.{}.self_attn",
    attn_out_module_tmp="model.layers.{}.self_attn.o_proj",
    mlp_module_tmp="model.layers.{}.mlp",
)
# `attention_bias` gives q/k/v/o_proj biases; Mistral, Qwen2 and Phi-3 have no flag for o_proj's.
_LLAMA_BIASED = dataclasses.replace(_LLAMA_LIKE, attn_bias_flag="attention_bias")
_POST_FFN_NORM = "model.layers.{}.post_feedforward_layernorm"

# One line per model_type (transformers' config.model_type). Not here: Mixtral and other
# mixture-of-experts models, whose MLP is several experts' down projections, not one.
REGISTRY: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        family="gpt2",
        layer_module_tmp="transformer.h.{}",
        rewrite_module_tmp="transformer.h.{}.mlp.c_proj",
        ln_f_module="transformer.ln_f",
        lm_head_module="lm_head",
        attn_module_tmp="transformer.h.{}.attn",
        attn_out_module_tmp="transformer.h.{}.attn.c_proj",
        mlp_module_tmp="transformer.h.{}.mlp",
    ),
    "gptj": ArchSpec(
        family="gptj",
        layer_module_tmp="transformer.h.{}",
        rewrite_module_tmp="transformer.h.{}.mlp.fc_out",
        ln_f_module="transformer.ln_f",
        lm_head_module="lm_head",
        attn_module_tmp="transformer.h.{}.attn",
        attn_out_module_tmp="transformer.h.{}.attn.out_proj",
        mlp_module_tmp="transformer.h.{}.mlp",
    ),
    "gpt_neox": ArchSpec(
        family="gpt-neox",
        layer_module_tmp="gpt_neox.layers.{}",
        rewrite_module_tmp="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        ln_f_module="gpt_neox.final_layer_norm",
        lm_head_module="embed_out",
        attn_module_tmp="gpt_neox.layers.{}.attention",
        attn_out_module_tmp="gpt_neox.layers.{}.attention.dense",
        mlp_module_tmp="gpt_neox.layers.{}.mlp",
    ),
    "llama": _LLAMA_BIASED,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_BIASED,
    "gemma": _LLAMA_BIASED,
    "gemma2": dataclasses.replace(_LLAMA_BIASED, mlp_output_norm=_POST_FFN_NORM),
    "gemma3_text": dataclasses.replace(_LLAMA_BIASED, mlp_output_norm=_POST_FFN_NORM),
    "olmo": _LLAMA_BIASED,
    "olmo2": dataclasses.replace(_LLAMA_BIASED, mlp_output_norm=_POST_FFN_NORM),
    "phi3": _LLAMA_LIKE,
    "falcon": ArchSpec(
        family="falcon",
        layer_module_tmp="transformer.h.{}",
        rewrite_module_tmp="transformer.h.{}.mlp.dense_4h_to_h",
        ln_f_module="transformer.ln_f",
        lm_head_module="lm_head",
        attn_module_tmp="transformer.h.{}.self_attention",
        attn_out_module_tmp="transformer.h.{}.self_attention.dense",
        mlp_module_tmp="transformer.h.{}.mlp",
        attn_bias_flag="bias",  # gives every linear layer a bias
    ),
    "opt": ArchSpec(
        family="opt",
        layer_module_tmp="model.decoder.layers.{}",
        rewrite_module_tmp="model.decoder.layers.{}.fc2",
        ln_f_module="model.decoder.final_layer_norm",
        lm_head_module="lm_head",
        attn_module_tmp="model.decoder.layers.{}.self_attn",
        attn_out_module_tmp="model.decoder.layers.{}.self_attn.out_proj",
        mlp_module_tmp="model.decoder.layers.{}.fc2",
        extra_head_modules=("model.decoder.project_out",),
    ),
}

# Module paths an hparams file may set (its keys of the same names); the first four are needed
# to edit a model_type that is not in the table.
OVERRIDE_KEYS = ("layer_module_tmp", "rewrite_module_tmp", "ln_f_module", "lm_head_module", "mlp_module_tmp",
                 "attn_module_tmp")
_REQUIRED_KEYS = OVERRIDE_KEYS[:4]


def spec_for(model_type: str, overrides: Optional[dict] = None) -> ArchSpec:
    """The table's entry for `model_type`, with module paths from hparams taking precedence."""
    overrides = {k: v for k, v in (overrides or {}).items() if k in OVERRIDE_KEYS and v}
    base = REGISTRY.get(model_type)
    if base is None:
        missing = [k for k in _REQUIRED_KEYS if k not in overrides]
        if missing:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not in massedit's architecture registry "
                f"(known: {', '.join(sorted(REGISTRY))}). To edit it anyway, name its modules in "
                f"the hparams: {', '.join(missing)} (e.g. layer_module_tmp='model.layers.{{}}', "
                "rewrite_module_tmp='model.layers.{}.mlp.down_proj', ln_f_module='model.norm', "
                "lm_head_module='lm_head')."
            )
        return ArchSpec(**{"family": "", "attn_module_tmp": "", "attn_out_module_tmp": "", **overrides})
    return dataclasses.replace(base, **overrides)


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise UnsupportedModelError(
            f"module {path!r} not found in {type(model).__name__}; check the module paths "
            "(layer_module_tmp / rewrite_module_tmp / ln_f_module / lm_head_module) in the hparams"
        ) from err


def is_conv1d_class(cls: type) -> bool:
    # transformers' Conv1D keeps weight as [in, out]; detected by class name so that no
    # transformers-internal import path is assumed.
    return any(c.__name__ == "Conv1D" for c in cls.__mro__)


def stores_transposed(module: nn.Module) -> bool:
    """Whether the module's editable weight is stored [in, out] (Conv1D) rather than [out, in].

    Asked of the module, not the model family: bitsandbytes replaces GPT-2's Conv1D by a Linear.
    A quantized module that replaced a Conv1D (transformers records the class as `source_cls`) is
    edited through a dense Conv1D stand-in (massedit.model.quantized), so it counts as one."""
    return is_conv1d_class(type(module)) or is_conv1d_class(getattr(module, "source_cls", nn.Module))


def in_features(module: nn.Module) -> int:
    """Input width of a Linear-like module (bitsandbytes' included) or a Conv1D."""
    if is_conv1d_class(type(module)):
        return int(module.weight.shape[0])
    return int(module.in_features)


class ModelLayout:
    """Resolved module handles of one model instance."""

    def __init__(self, model: nn.Module, overrides: Optional[dict] = None):
        self.model = model
        self.model_type = getattr(model.config, "model_type", type(model).__name__)
        self.spec = spec_for(self.model_type, overrides)
        self.n_layers = self._count_layers()
        self.ln_f = get_module(model, self.spec.ln_f_module)
        # transformers 5 renamed some heads (GPT-NeoX's embed_out became lm_head); the model's own
        # accessor is the fallback for a path that moved.
        self.lm_head = self._optional(self.spec.lm_head_module) or model.get_output_embeddings()
        if self.lm_head is None:
            get_module(model, self.spec.lm_head_module)
        self.extra_head = [
            m for m in (self._optional(p) for p in self.spec.extra_head_modules) if m is not None
        ]
        # Gemma-2-style models squash logits; the z loss must see the same logits as the model.
        self.logit_softcap = getattr(model.config, "final_logit_softcapping", None)

    def _optional(self, path: str) -> Optional[nn.Module]:
        try:
            return self.model.get_submodule(path)
        except AttributeError:
            return None

    def _count_layers(self) -> int:
        n = getattr(self.model.config, "num_hidden_layers", None) or getattr(self.model.config, "n_layer", None)
        if n is None:
            n = 0
            while self._optional(self.spec.layer_module_tmp.format(n)) is not None:
                n += 1
        return int(n)

    def check_layers(self, layers: Iterable[int], source: str = "'layers' in the hparams") -> None:
        """Every layer exists; `source` names where the numbers came from, for the message."""
        for layer in layers:
            if not 0 <= layer < self.n_layers:
                raise ValueError(
                    f"layer {layer} is out of range: the model has {self.n_layers} layers "
                    f"(0..{self.n_layers - 1}); fix {source}"
                )

    def check_rewrite_modules(self, layers: Iterable[int]) -> None:
        """The rewrite module must write the residual stream (MEMIT edits the MLP's down projection).

        A template naming another module (the up projection, an attention input) would only fail
        after the z phase, with statistics already cached under that module's name."""
        for layer in layers:
            module = self.rewrite_module(layer)
            # nn.Linear (and bitsandbytes' layers) state out_features; GPT-2's Conv1D calls it nf.
            out = getattr(module, "out_features", None) or getattr(module, "nf", None)
            if out is not None and out != self.hidden_size:
                raise UnsupportedModelError(
                    f"rewrite_module_tmp {self.spec.rewrite_module_tmp!r}: {self.rewrite_name(layer)} has "
                    f"{out} outputs, but the edited module must write the residual stream ({self.hidden_size} "
                    "wide): name the MLP's down (output) projection, "
                    f"e.g. {REGISTRY.get(self.model_type, _LLAMA_LIKE).rewrite_module_tmp!r}"
                )

    @property
    def context_length(self) -> Optional[int]:
        """Longest sequence the model takes (its position table), None when the config does not say."""
        for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            value = getattr(self.model.config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def block_name(self, layer: int) -> str:
        return self.spec.layer_module_tmp.format(layer)

    def block(self, layer: int) -> nn.Module:
        return get_module(self.model, self.block_name(layer))

    def rewrite_name(self, layer: int) -> str:
        return self.spec.rewrite_module_tmp.format(layer)

    def rewrite_module(self, layer: int) -> nn.Module:
        return get_module(self.model, self.rewrite_name(layer))

    def mlp_output_norm(self, layer: int) -> Optional[nn.Module]:
        """The norm between the rewrite module's output and the residual stream, if the family has one."""
        return get_module(self.model, self.spec.mlp_output_norm.format(layer)) if self.spec.mlp_output_norm else None

    def rewrite_is_conv1d(self, layer: int) -> bool:
        return stores_transposed(self.rewrite_module(layer))

    def rewrite_weight_name(self, layer: int) -> str:
        return f"{self.rewrite_name(layer)}.weight"

    def key_dim(self, layer: int) -> int:
        """Width of the key (the rewrite module's input), d_ff; packed quantized weights have
        other shapes, so the module is asked."""
        return in_features(self.rewrite_module(layer))

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd"))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits from a last-block residual stream (any leading shape)."""
        x = self.ln_f(hidden)
        for module in self.extra_head:
            x = module(x)
        if isinstance(self.lm_head, nn.Embedding):
            # Reference hparams name the tied input embedding as the head (GPT-2's transformer.wte);
            # its weight may be offloaded, so it is read where Accelerate keeps it.
            weight = read_parameter(self.model, f"{self._name_of(self.lm_head)}.weight")
            logits = x @ weight.to(x.device).T
        else:
            logits = self.lm_head(x)
        if self.logit_softcap:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def _name_of(self, module: nn.Module) -> str:
        return next(name for name, m in self.model.named_modules() if m is module)

    # ------------------------------------------------------------------ attention heads (MEMAT)

    @property
    def n_heads(self) -> int:
        cfg = self.model.config
        n = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
        if not n:
            raise UnsupportedModelError(f"{self.model_type}: the config names no number of attention heads "
                                        "(num_attention_heads / n_head)")
        return int(n)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.model.config, "head_dim", None) or self.hidden_size // self.n_heads)

    def attn_out_name(self, layer: int) -> str:
        if not self.spec.attn_out_module_tmp:
            raise UnsupportedModelError(f"model_type {self.model_type!r} is not in the registry: massedit does "
                                        "not know its attention output projection")
        return self.spec.attn_out_module_tmp.format(layer)

    def attn_out_module(self, layer: int) -> nn.Module:
        return get_module(self.model, self.attn_out_name(layer))

    def attn_out_is_conv1d(self, layer: int) -> bool:
        return stores_transposed(self.attn_out_module(layer))

    def check_heads(self) -> None:
        """Every attention output projection takes n_heads · head_dim inputs (the heads side by side)."""
        width = self.n_heads * self.head_dim
        for layer in range(self.n_layers):
            got = in_features(self.attn_out_module(layer))
            if got != width:
                raise UnsupportedModelError(
                    f"{self.attn_out_name(layer)} takes {got} inputs, not n_heads·head_dim = "
                    f"{self.n_heads}·{self.head_dim}: massedit cannot split its input into heads")

    def attn_out_bias_additions(self) -> Optional[tuple[dict, dict]]:
        """What a model without attention-output biases needs to carry one: (config values
        {key: (before, after)}, parameters {name: shape} to add as zeros). None when every layer
        has the bias. With the family's flag, the parameters are all those the flag creates (a
        model built from the flagged config on the meta device says which), so that the saved
        model reloads with plain from_pretrained; without one, only the o_proj biases (in memory)."""
        named = dict(self.model.named_parameters())
        missing = [f"{self.attn_out_name(l)}.bias" for l in range(self.n_layers)]
        missing = [n for n in missing if n not in named]
        if not missing:
            return None
        flag = self.spec.attn_bias_flag
        if flag is None:
            return {}, {n: (self.hidden_size,) for n in missing}
        cfg = copy.deepcopy(self.model.config)
        setattr(cfg, flag, True)
        with torch.device("meta"):
            flagged = type(self.model)(cfg)
        shapes = {n: tuple(p.shape) for n, p in flagged.named_parameters() if n not in named}
        absent = [n for n in missing if n not in shapes]
        if absent:
            raise UnsupportedModelError(f"{self.model_type}: config flag {flag!r} does not create {absent[0]}; "
                                        "fix attn_bias_flag in massedit.model.arch")
        return {flag: (getattr(self.model.config, flag, None), True)}, shapes
