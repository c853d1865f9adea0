"""Quantized bases: which edited modules are bitsandbytes 8-bit / 4-bit, and how they take an edit.

Statistics, z and keys run on the quantized model as loaded (keys are the rewrite module's input,
read with a pre-hook, so storage does not matter there). A weight edit cannot live in the
quantized storage: re-quantizing W + ΔW rounds most of a small ΔW away. So when an edit is
written into a bnb module, the module is swapped for a dense *stand-in* (nn.Linear, or Conv1D
where transformers replaced a Conv1D) holding bitsandbytes' own dequantization of W in the
model's compute dtype, and the edit is applied to that exactly like to any dense weight. The
quantized module object is set aside untouched; once the stand-in's weight is bit-identical to
that dequantization again (an exact revert), the original module goes back in its place, so
revert returns the very int8 weight + SCB, or packed 4-bit data + quant_state, that was there.

While a stand-in is in place, its module name is listed in the model's
quantization_config.llm_int8_skip_modules, so that save_pretrained writes a checkpoint that
from_pretrained reloads with that module dense (the edit in effect) and every other module
quantized.

Anything else that stores a weight other than as a plain float tensor (GPTQ, AWQ, HQQ, fp8,
tensor subclasses) is refused before any work, with what to do instead.
"""
from __future__ import annotations

import sys
import weakref
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from massedit.model.arch import is_conv1d_class

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

DENSE, BNB_8BIT, BNB_4BIT = "dense", "bnb-8bit", "bnb-4bit"


class UnsupportedQuantizationError(ValueError):
    """An edited module whose weight storage massedit cannot write an edit into."""


def _bnb_classes() -> tuple[type, type]:
    # No bnb module can exist unless bitsandbytes was imported, so its absence costs no import.
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return (), ()
    return bnb.nn.Linear8bitLt, bnb.nn.Linear4bit


def _quant_method(model: nn.Module) -> Optional[str]:
    qc = getattr(model.config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method))


def storage_of(module: nn.Module) -> Optional[str]:
    """DENSE, BNB_8BIT or BNB_4BIT; None for a storage massedit cannot edit."""
    int8, int4 = _bnb_classes()
    if int8 and isinstance(module, int8):
        return BNB_8BIT
    if int4 and isinstance(module, int4):
        return BNB_4BIT
    weight = getattr(module, "weight", None)
    # Tensor subclasses (torchao, quantizer-specific parameters) hide their storage: not editable;
    # a DTensor (FSDP2, tensor parallel) holds a dense shard on each rank (massedit.model.sharded).
    if type(weight) in (nn.Parameter, torch.Tensor, DTensor) and weight.dtype in _FLOAT_DTYPES:
        return DENSE
    return None


def _refusal(name: str, module: nn.Module, method: Optional[str]) -> UnsupportedQuantizationError:
    weight = getattr(module, "weight", None)
    what = type(module).__name__ + (f" with a {weight.dtype} weight" if weight is not None else " (no weight)")
    return UnsupportedQuantizationError(
        f"cannot edit {name}: it is a {what}" + (f" ({method} quantization)" if method else "")
        + "; massedit edits float weights and bitsandbytes 8-bit/4-bit modules: load the model with "
        "--quantize 8bit|4bit (quantization_config=BitsAndBytesConfig(...)) or in a float dtype "
        "(--model-dtype bfloat16)"
    )


def _cpu_repacked(module: nn.Module) -> bool:
    return getattr(getattr(module.weight, "quant_state", None), "packing_format_for_cpu", False)


def check_editable(model: nn.Module, module_names: Iterable[str]) -> dict[str, str]:
    """The storage of each module an edit will write into; refuses an unsupported one at once."""
    found = {}
    for name in module_names:
        module = model.get_submodule(name)
        storage = storage_of(module)
        if storage is None:
            raise _refusal(name, module, _quant_method(model))
        if storage == BNB_4BIT and _cpu_repacked(module):
            raise _repacked_refusal(name)
        found[name] = storage
    return found


def _repacked_refusal(name: str) -> UnsupportedQuantizationError:
    return UnsupportedQuantizationError(
        f"cannot edit this model: bitsandbytes has repacked the 4-bit weight of {name} for its CPU "
        "inference kernel (a forward ran without gradients on an AVX512-BF16 CPU); that layout has no "
        "backward pass and cannot be undone exactly: load the model again and edit it before running "
        "it (massedit's own forwards keep the original layout)"
    )


def check_model(model: nn.Module, module_names: Iterable[str]) -> None:
    """Before any expensive phase: the edited modules are editable, and no 4-bit module of the
    model is in bitsandbytes' CPU inference layout (the z phase backpropagates through them)."""
    check_editable(model, module_names)
    _, int4 = _bnb_classes()
    for name, module in model.named_modules():
        if int4 and isinstance(module, int4) and _cpu_repacked(module):
            raise _repacked_refusal(name)


@contextmanager
def cpu_repacking_off(model: nn.Module) -> Iterator[None]:
    """bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel on the first forward
    without gradients; that kernel has no backward and the repacking is lossy to undo, so the
    forwards massedit runs keep the canonical layout. The modules' flags are restored afterwards."""
    _, int4 = _bnb_classes()
    modules = [m for m in model.modules() if int4 and isinstance(m, int4) and hasattr(m, "support_avx512bf16_for_cpu")]
    flags = [m.support_avx512bf16_for_cpu for m in modules]
    for m in modules:
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.support_avx512bf16_for_cpu = flag


def dequantized(module: nn.Module) -> torch.Tensor:
    """The module's weight as [out, in] floats, by bitsandbytes' own dequantization for bnb modules."""
    storage = storage_of(module)
    weight = module.weight
    if storage == BNB_8BIT:
        if weight.dtype != torch.int8:  # has_fp16_weights: a float weight not quantized yet
            return weight.data
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return sys.modules["bitsandbytes"].functional.int8_vectorwise_dequant(weight.data, scb)
    if storage == BNB_4BIT:
        if _cpu_repacked(module):
            raise _repacked_refusal(type(module).__name__)
        return sys.modules["bitsandbytes"].functional.dequantize_4bit(weight.data, weight.quant_state)
    if storage == DENSE:
        return weight.T if is_conv1d_class(type(module)) else weight
    raise _refusal(type(module).__name__, module, None)


def _compute_dtype(model: nn.Module) -> torch.dtype:
    # The residual stream's dtype is what reaches the rewrite module (bnb layers return their
    # input's dtype), so the stand-in computes in it.
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    return weight.dtype if weight is not None and weight.dtype in _FLOAT_DTYPES else torch.float32


def _is_conv1d_source(quantized: nn.Module) -> bool:
    # transformers records the class a bnb module replaced; GPT-2's Conv1D stores [in, out].
    return is_conv1d_class(getattr(quantized, "source_cls", nn.Linear))


def _stand_in_weight(quantized: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    weight = dequantized(quantized).to(dtype)
    return (weight.T if _is_conv1d_source(quantized) else weight).contiguous()


def editable_value(model: nn.Module, weight_name: str) -> Optional[torch.Tensor]:
    """For a weight stored by bitsandbytes, the dense value an edit of it starts from (what its
    stand-in holds, so what a delta records as its base); None for any other weight."""
    module = model.get_submodule(_module_name(weight_name))
    if storage_of(module) in (BNB_8BIT, BNB_4BIT):
        return _stand_in_weight(module, _compute_dtype(model))
    return None


def _stand_in(quantized: nn.Module, dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        if _is_conv1d_source(quantized):
            module = quantized.source_cls(quantized.out_features, quantized.in_features)
        else:
            module = nn.Linear(quantized.in_features, quantized.out_features, bias=quantized.bias is not None)
    module.weight = nn.Parameter(_stand_in_weight(quantized, dtype).clone(), requires_grad=False)
    if quantized.bias is not None:
        module.bias = nn.Parameter(quantized.bias.detach().to(dtype).clone(), requires_grad=False)
    else:
        module.bias = None
    hook = getattr(quantized, "_hf_hook", None)
    if hook is not None:
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(module, hook)
    return module


# stand-in → the quantized module it replaced; weak, so a discarded model takes both with it.
_ORIGINALS: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()
# model whose quantization_config.llm_int8_skip_modules was unset → the defaults written in its
# place, so that the last restore can unset it again.
_UNSET_SKIP: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


def _module_name(weight_name: str) -> str:
    return weight_name.rsplit(".", 1)[0]


def _skip_modules(model: nn.Module) -> tuple[Optional[object], Optional[list]]:
    qc = getattr(model.config, "quantization_config", None)
    if qc is None:
        return None, None
    skip = qc.get("llm_int8_skip_modules") if isinstance(qc, dict) else getattr(qc, "llm_int8_skip_modules", None)
    return qc, (list(skip) if skip is not None else None)


def _set_skip_modules(qc, skip: Optional[list]) -> None:
    if isinstance(qc, dict):
        qc["llm_int8_skip_modules"] = skip
    else:
        qc.llm_int8_skip_modules = skip


def make_editable(model: nn.Module, weight_names: Iterable[str]) -> list[str]:
    """Swap the bnb modules owning `weight_names` for dense stand-ins; returns the swapped module
    names. Names that are not modules of the model are left for the caller to report."""
    names = []
    for weight_name in weight_names:
        name = _module_name(weight_name)
        try:
            model.get_submodule(name)
        except AttributeError:
            continue
        names.append(name)
    storages = check_editable(model, names)
    swapped = []
    dtype = _compute_dtype(model)
    try:
        for name in names:
            if storages[name] != DENSE:
                _swap_in_stand_in(model, name, dtype)
                swapped.append(name)
    except BaseException:
        restore_unchanged(model, [f"{name}.weight" for name in swapped])
        raise
    return swapped


def _swap_in_stand_in(model: nn.Module, name: str, dtype: torch.dtype) -> None:
    original = model.get_submodule(name)
    stand_in = _stand_in(original, dtype)
    qc, skip = _skip_modules(model)
    if qc is not None:
        if skip is None:
            # transformers skips lm_head (and tied modules) when the list is unset; keep those.
            skip = list(getattr(getattr(model, "hf_quantizer", None), "modules_to_not_convert", None) or [])
            _UNSET_SKIP[model] = list(skip)
        _set_skip_modules(qc, skip + [name])
    _ORIGINALS[stand_in] = original
    model.set_submodule(name, stand_in)


def restore_unchanged(model: nn.Module, weight_names: Iterable[str]) -> list[str]:
    """Give back the quantized module wherever its stand-in holds exactly the dequantized W again;
    returns the restored module names. A stand-in that still differs (an edit in effect, or an
    approximate revert) stays."""
    restored = []
    for weight_name in weight_names:
        name = _module_name(weight_name)
        try:
            stand_in = model.get_submodule(name)
        except AttributeError:
            continue
        original = _ORIGINALS.get(stand_in)
        if original is None:
            continue
        expected = _stand_in_weight(original, stand_in.weight.dtype).to(stand_in.weight.device)
        if not torch.equal(_bits(expected), _bits(stand_in.weight)):
            continue
        qc, skip = _skip_modules(model)
        if qc is not None and skip is not None:
            skip = [m for m in skip if m != name]
            unset = _UNSET_SKIP.get(model) == skip
            _set_skip_modules(qc, None if unset else skip)
            if unset:
                del _UNSET_SKIP[model]
        model.set_submodule(name, original)
        del _ORIGINALS[stand_in]
        restored.append(name)
    return restored


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)
