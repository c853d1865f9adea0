"""Tiny random models and locally built tokenizers for tests (no downloads)."""
from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers import (
    FalconConfig,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    OlmoConfig,
    OPTConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

from massedit.model.arch import REGISTRY
from massedit.model.loading import dtype_kwargs

WORDS = (
    "the a of in is was plays sport native language city capital country born works for "
    "located speaks team football baseball basketball tennis soccer golf hockey chess Paris "
    "London Berlin Rome Madrid Tokyo Moscow Cairo English French German Italian Spanish "
    "Japanese Russian Michael Jordan Danielle Darrieux Lionel Messi Marie Curie Albert Einstein "
    "Apple Google Microsoft Toyota Nokia Sony mother tongue profession actor singer writer "
    "therefore because I you it he she they what where who which by from to at as an and or "
    "city-state Zorblax Quintavelle Mxyzptlk Xanadu-Prime"
).split()


def _corpus() -> list[str]:
    lines = [" ".join(WORDS[i : i + 7]) for i in range(0, len(WORDS), 3)]
    return lines + ["The mother tongue of Danielle Darrieux is French.", "Michael Jordan plays basketball."]


@functools.lru_cache(maxsize=None)
def _tokenizer_json(style: str) -> str:
    if style == "bpe":
        tk = Tokenizer(models.BPE(unk_token=None))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
    elif style == "sentencepiece":
        tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
        tk.normalizer = normalizers.Sequence([normalizers.Replace(" ", "\u2581")])
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"])
    else:
        raise ValueError(style)
    tk.train_from_iterator(_corpus() * 3, trainer)
    return tk.to_str()


def make_tokenizer(style: str = "bpe", padding_side: str = "right") -> PreTrainedTokenizerFast:
    """'bpe': GPT-2-like byte-level BPE, no BOS. 'sentencepiece': Llama-like, BOS '<s>'."""
    tk = Tokenizer.from_str(_tokenizer_json(style))
    if style == "bpe":
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
        tok.pad_token = tok.eos_token
    else:
        from tokenizers import processors

        bos = tk.token_to_id("<s>")
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def _configs(vocab: int) -> dict:
    d, ff, heads, layers, pos = 32, 64, 4, 4, 128
    common = dict(vocab_size=vocab, num_hidden_layers=layers, hidden_size=d, num_attention_heads=heads)
    llama_like = dict(common, intermediate_size=ff, num_key_value_heads=2, max_position_embeddings=pos)
    return {
        "gpt2": GPT2Config(vocab_size=vocab, n_layer=layers, n_embd=d, n_head=heads, n_inner=ff, n_positions=pos,
                           bos_token_id=0, eos_token_id=0),
        "gptj": GPTJConfig(vocab_size=vocab, n_layer=layers, n_embd=d, n_head=heads, n_inner=ff, n_positions=pos,
                           rotary_dim=4, bos_token_id=0, eos_token_id=0),
        "gpt_neox": GPTNeoXConfig(**common, intermediate_size=ff, max_position_embeddings=pos, rotary_pct=0.5,
                                  bos_token_id=0, eos_token_id=0),
        "llama": LlamaConfig(**llama_like),
        "mistral": MistralConfig(**llama_like),
        "qwen2": Qwen2Config(**llama_like),
        "gemma": GemmaConfig(**llama_like, head_dim=8),
        "qwen3": Qwen3Config(**llama_like, head_dim=8),
        # Gemma 2 / 3 and OLMo 2 normalize the MLP's output before the residual (post_feedforward_layernorm).
        "gemma2": Gemma2Config(**llama_like, head_dim=8, query_pre_attn_scalar=8),
        "gemma3_text": Gemma3TextConfig(**llama_like, head_dim=8, query_pre_attn_scalar=8),
        "olmo": OlmoConfig(**llama_like, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "olmo2": Olmo2Config(**llama_like, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "phi3": Phi3Config(**llama_like, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "falcon": FalconConfig(vocab_size=vocab, num_hidden_layers=layers, hidden_size=d, num_attention_heads=heads,
                               new_decoder_architecture=False, multi_query=True, bos_token_id=0, eos_token_id=0),
        "opt": OPTConfig(vocab_size=vocab, num_hidden_layers=layers, hidden_size=d, num_attention_heads=heads,
                         ffn_dim=ff, max_position_embeddings=pos, word_embed_proj_dim=d, pad_token_id=1,
                         bos_token_id=0, eos_token_id=0),
    }


MODEL_TYPES = tuple(_configs(10))
# Llama-like families get a Llama-like tokenizer (BOS, SentencePiece pieces).
SENTENCEPIECE_TYPES = tuple(t for t in MODEL_TYPES if REGISTRY[t].family == "llama-like")


def make_model(model_type: str = "gpt2", tok=None, seed: int = 0, dtype=torch.float32):
    tok = tok if tok is not None else make_tokenizer("sentencepiece" if model_type in SENTENCEPIECE_TYPES else "bpe")
    cfg = _configs(len(tok))[model_type]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", **dtype_kwargs(dtype))
    model.eval()
    return model, tok


_SUBJECTS = ("Michael Jordan", "Danielle Darrieux", "Lionel Messi", "Marie Curie", "Albert Einstein", "Zorblax",
             "Quintavelle Mxyzptlk", "Xanadu-Prime", "Sony", "Nokia", "Toyota", "the city-state of Rome")
_PROMPTS = ("{} plays the sport of", "The mother tongue of {} is", "{} was born in", "{}, who works for",
            "In Tokyo, {} speaks", "{}")
_OBJECTS = ("baseball", "French", "Tokyo", "Google", "Xanadu-Prime city-state", "the capital of Rome", "chess",
            "Quintavelle Mxyzptlk")


def make_requests(n: int, seed: int = 0) -> list:
    """n distinct requests with subjects, prompts and targets of mixed token lengths."""
    import random

    from massedit.inputs.requests import EditRequest

    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        subject = rng.choice(_SUBJECTS)
        if rng.random() < 0.5:
            subject = f"{subject} {rng.choice(WORDS[20:60])}"
        prompt = rng.choice(_PROMPTS)
        if (subject, prompt) in seen:
            continue
        seen.add((subject, prompt))
        out.append(EditRequest(subject=subject, prompt=prompt, target_new=rng.choice(_OBJECTS)))
    return out
