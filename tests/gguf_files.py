"""Writing GGUF files of tiny models for tests, the way llama.cpp's converter lays them out, so that
transformers' GGUF loader reads back the same weights (tests need no download)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# transformers' model_type → GGUF architecture name
GGUF_ARCH = {"llama": "llama", "gemma3_text": "gemma3"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows interleaved per rotary pair; the loader undoes exactly this."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_name(name_map, hf_name: str) -> str | None:
    base, _, suffix = hf_name.rpartition(".")
    gguf = name_map.get_name(base)
    return None if gguf is None else f"{gguf}.{suffix}"


def write_gguf(model, tok, path: Path) -> Path:
    """`model` (a tiny LlamaForCausalLM or Gemma3ForCausalLM) and its byte-level BPE `tok`, as one
    float32 GGUF file at `path`."""
    import gguf

    cfg = model.config
    arch = GGUF_ARCH[cfg.model_type]
    n_layers = cfg.num_hidden_layers
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_block_count(n_layers)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope_parameters
    writer.add_rope_freq_base(float(rope.get("full_attention", rope)["rope_theta"]))  # Gemma-3: per attention kind
    if arch == "gemma3":
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_sliding_window(cfg.sliding_window)
    else:
        writer.add_rope_dimension_count(cfg.head_dim)

    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = set(tok.all_special_tokens)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in special else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_bos_token_id(tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    tied = getattr(cfg, "tie_word_embeddings", False)
    for hf_name, value in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = _tensor_name(name_map, hf_name)
        if name is None:
            raise ValueError(f"no GGUF name for {hf_name}")
        w = value.detach().to(torch.float32).numpy().copy()
        if arch == "llama" and ".attn_q." in name:
            w = _permute(w, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in name:
            w = _permute(w, cfg.num_key_value_heads)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            w = w + 1  # llama.cpp stores Gemma's (1 + w) norm scale; the loader subtracts one
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
