"""Tokenizer, model and training for the world model; recall measurement.

Training reads one fact statement per sequence (`generate.documents_with_spans` with max_facts=1):
each time in a randomly chosen training template or training question, half of them after a random
filler sentence so that prefixed prompts are recalled too. The loss is the next-token loss on the
object's tokens plus `lm_weight` times the next-token loss on every other token. The object term is
what memorizes the facts; the language-model term keeps the model a model of the world's text (its
own generations are sentences, which MEMIT's context templates are made of) and, measured, also
shortens the plateau before recall takes off: with lm_weight 0.25 a 6 x 128 GPT-2 reaches 97%
rewrite / 97% paraphrase / 98% prefixed recall in 270 s on two idle cores, against 88 / 90 / 92% with
the object loss alone (and 67% for whole-document next-token training with 6 x 192 in 15 minutes).
Logits are computed only where a loss is taken.

Determinism: all randomness comes from seeded generators; torch runs with deterministic
algorithms. Same seed, same thread count and same machine give the same weights; a different
thread count or CPU may change float summation order and hence the last bits.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from massedit.model.devices import input_device
from massedit.inputs.tokens import pad, spaced_target, target_ids
from massedit.world.generate import World, _rng, documents_with_spans, filler_sentence, fill, counterfact_records, \
    zsre_records, tokenizer_texts
from massedit.world.languages import check_languages, l2_counterfact_records, l2_zsre_records, second_language

ARCHS = ("gpt2", "llama")


@dataclass
class TrainConfig:
    n_layer: int = 6
    d_model: int = 128
    n_head: int = 4
    d_ff: int = 512
    n_positions: int = 128
    vocab_size: int = 3000
    tokenizer_texts: int = 12000
    steps: int = 6000
    batch_size: int = 64  # sequences of one statement each (~17 tokens)
    lr: float = 3e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 100
    weight_decay: float = 0.05
    beta2: float = 0.98
    grad_clip: float = 1.0
    lm_weight: float = 0.25
    question_rate: float = 0.15
    start_filler_rate: float = 0.5
    threads: int = 2

    def to_json(self) -> dict:
        return asdict(self)


def preset(arch: str, quick: bool = False) -> TrainConfig:
    if arch not in ARCHS:
        raise ValueError(f"unknown world arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if quick:
        return TrainConfig(n_layer=2, d_model=64, n_head=2, d_ff=256, vocab_size=600, tokenizer_texts=2000,
                           steps=60, batch_size=32, warmup_steps=5)
    if arch == "llama":
        return TrainConfig(d_ff=352)  # SwiGLU has three matrices: about the parameters of GPT-2's two at 512
    return TrainConfig()


# ----------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(world: World, arch: str, vocab_size: int, n_texts: int = 12000, languages: int = 1):
    """A tokenizer trained on world text with decoy names (see `generate.tokenizer_texts`), n_texts
    of them per language.

    gpt2: byte-level BPE with a prefix space, '<|endoftext|>' as bos/eos/pad, no BOS added (as GPT-2).
    llama: SentencePiece-like BPE (Metaspace '▁', prepend at the first word), '<s>' added at the
    start of every text, '</s>' eos and pad, '<unk>'.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = tokenizer_texts(world, n_texts)
    if check_languages(languages) == 2:
        texts += tokenizer_texts(second_language(world), n_texts)
    if arch == "gpt2":
        tk = Tokenizer(models.BPE(unk_token=None))
        # A prefix space, as SentencePiece's '▁' does: a subject that opens a prompt is the same
        # tokens as one inside a sentence (GPT-2's own tokenizer has no prefix space, and a small model
        # then has to learn every name twice).
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], min_frequency=2,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tk.train_from_iterator(texts, trainer)
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                      pad_token="<|endoftext|>", model_max_length=1024)
    else:
        tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
        # Punctuation is split off words (as SentencePiece effectively does on real text), so that
        # "Paris." is "▁Paris" + "." and an object is the same token at a sentence end as after a prompt.
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first"),
            pre_tokenizers.Punctuation(behavior="isolated"),
        ])
        tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
        alphabet = [chr(c) for c in range(33, 127)] + ["\u2581"]
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"], min_frequency=2,
                                      initial_alphabet=alphabet, show_progress=False)
        tk.train_from_iterator(texts, trainer)
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                          special_tokens=[("<s>", tk.token_to_id("<s>"))])
        tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                      pad_token="</s>", model_max_length=1024)
    tok.padding_side = "right"
    return tok


# ----------------------------------------------------------------------------------------------
# Model


def make_model(arch: str, tok, cfg: TrainConfig, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        conf = GPT2Config(vocab_size=len(tok), n_layer=cfg.n_layer, n_embd=cfg.d_model, n_head=cfg.n_head,
                          n_inner=cfg.d_ff, n_positions=cfg.n_positions, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        model = GPT2LMHeadModel(conf)
    else:
        conf = LlamaConfig(vocab_size=len(tok), num_hidden_layers=cfg.n_layer, hidden_size=cfg.d_model,
                           num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
                           intermediate_size=cfg.d_ff, max_position_embeddings=cfg.n_positions,
                           tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model = LlamaForCausalLM(conf)
    return model


@contextmanager
def torch_settings(threads: int):
    """Threads and deterministic algorithms for the duration of a build; restored afterwards."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(max(1, threads))
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def _encode_docs(tok, docs: Sequence[tuple[str, list[tuple[int, int]]]], max_len: int) -> list[tuple[list[int], list[int]]]:
    """Token ids (with eos) and per-token flags: 1 on the tokens of stated objects (the facts)."""
    enc = tok([text for text, _ in docs], add_special_tokens=True, return_offsets_mapping=True)
    eos = tok.eos_token_id
    out = []
    for ids, offsets, (_, spans) in zip(enc["input_ids"], enc["offset_mapping"], docs):
        # An object token may start with the object's leading space, hence s - 1.
        flags = [int(b > a and any(a < e and b > s - 1 for s, e in spans)) for a, b in offsets]
        out.append(((list(ids) + [eos])[:max_len], (flags + [0])[:max_len]))
    return out


def _collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    b = pad([ids for ids, _ in batch], pad_id, side="right")
    flags = pad([f for _, f in batch], 0, side="right").input_ids.bool()
    return b, flags


def training_sequences(world: World, tok, cfg: TrainConfig, rng: random.Random, languages: int = 1) -> list:
    """Enough single-statement sequences for cfg.steps batches: whole passes over every fact, each
    pass in a fresh random order and with fresh templates and fillers. With two languages, each
    statement is in L1 or in L2 with equal probability (each language's passes drawn on their own)."""
    n_facts = len(world.subjects) * len(world.relations)
    passes = math.ceil(cfg.steps * cfg.batch_size / n_facts)

    def statements(w: World) -> list:
        return documents_with_spans(w, rng, epochs=passes, question_rate=cfg.question_rate, filler_rate=0.0,
                                    start_filler_rate=cfg.start_filler_rate, max_facts=1)

    docs = statements(world)
    if check_languages(languages) == 2:
        docs = [b if rng.random() < 0.5 else a for a, b in zip(docs, statements(second_language(world)))]
    return _encode_docs(tok, docs, cfg.n_positions)


# Sequences are padded to the longest of their batch; batches of similar lengths waste little.
# Lengths are sorted only within windows of this many batches, so each batch still mixes facts
# from all over the shuffled stream.
BUCKET_WINDOW = 32


def length_bucketed(seqs: list, batch_size: int, rng: random.Random) -> list[list]:
    """The sequences cut into batches of similar lengths, in a random order."""
    batches = []
    span = batch_size * BUCKET_WINDOW
    for start in range(0, len(seqs), span):
        window = sorted(seqs[start:start + span], key=lambda s: len(s[0]))
        chunk = [window[i:i + batch_size] for i in range(0, len(window), batch_size)]
        rng.shuffle(chunk)
        batches.extend(chunk)
    return batches


def train_model(world: World, arch: str, tok, cfg: TrainConfig, seed: int,
                log: Optional[Callable[[str], None]] = None, log_every: int = 200,
                languages: int = 1) -> tuple[object, dict]:
    """Train a fresh model on the world (in 1 or 2 languages) for cfg.steps steps. Returns (model in
    eval mode, info)."""
    model = make_model(arch, tok, cfg, seed)
    t0 = time.perf_counter()
    seqs = training_sequences(world, tok, cfg, _rng(seed, "training"), languages)
    batches = length_bucketed(seqs, cfg.batch_size, _rng(seed, "batches"))
    t_data = time.perf_counter() - t0
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or "ln_" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, cfg.beta2))

    def lr_at(step: int) -> float:
        """Linear warmup, then cosine down to min_lr_ratio at the last step."""
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    body, head = model.base_model, model.get_output_embeddings()
    pad_id = tok.pad_token_id
    model.train()
    tokens, obj_losses, lm_losses = 0, [], []
    t1 = time.perf_counter()
    for step in range(cfg.steps):
        b, flags = _collate(batches[step % len(batches)], pad_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        hidden = body(input_ids=b.input_ids, attention_mask=b.attention_mask).last_hidden_state[:, :-1]
        labels = b.input_ids[:, 1:]
        is_obj = flags[:, 1:]
        is_text = (b.attention_mask[:, 1:] > 0) & ~is_obj
        obj_loss = F.cross_entropy(head(hidden[is_obj]).float(), labels[is_obj])
        lm_loss = F.cross_entropy(head(hidden[is_text]).float(), labels[is_text])
        loss = obj_loss + cfg.lm_weight * lm_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        tokens += int(b.attention_mask.sum())
        obj_losses.append(float(obj_loss.detach()))
        lm_losses.append(float(lm_loss.detach()))
        if log and ((step + 1) % log_every == 0 or step + 1 == cfg.steps):
            elapsed = time.perf_counter() - t1
            recent = slice(max(0, step + 1 - log_every), step + 1)
            log(f"step {step + 1}/{cfg.steps}  object loss {sum(obj_losses[recent]) / len(obj_losses[recent]):.3f}  "
                f"text loss {sum(lm_losses[recent]) / len(lm_losses[recent]):.3f}  "
                f"{tokens / elapsed:.0f} tok/s  {elapsed:.0f} s")
    model.eval()
    every = max(1, cfg.steps // 20)
    info = {"steps": cfg.steps, "tokens": tokens, "sequences": len(seqs),
            "object_loss": [round(sum(obj_losses[i:i + every]) / len(obj_losses[i:i + every]), 4)
                            for i in range(0, cfg.steps, every)],
            "text_loss": [round(sum(lm_losses[i:i + every]) / len(lm_losses[i:i + every]), 4)
                          for i in range(0, cfg.steps, every)],
            "data_seconds": round(t_data, 2), "train_seconds": round(time.perf_counter() - t1, 2)}
    return model, info


# ----------------------------------------------------------------------------------------------
# Recall

SPLITS = ("rewrite", "paraphrase", "prefix", "question", "question_heldout")


def recall_items(world: World, split: str, language: int = 1) -> list[tuple[str, str, str]]:
    """(prompt text, true object, relation id) per fact for a split, in language 1 (counterfact.json,
    zsre.json) or 2 (their L2 versions, counterfact.l2.json and zsre.l2.json).

    rewrite: the CounterFact rewrite prompt (a simple training template);
    paraphrase: the CounterFact held-out paraphrase (a template never seen with the relation);
    prefix: a random filler sentence, then the rewrite prompt;
    question / question_heldout: the zsRE question (training question) / its held-out rephrase.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown recall split {split!r}; choose from {', '.join(SPLITS)}")
    if check_languages(language) == 2:
        l2 = second_language(world)
        cf_records, zsre = (lambda: l2_counterfact_records(world, l2)), (lambda: l2_zsre_records(world, l2))
    else:
        cf_records, zsre = (lambda: counterfact_records(world)), (lambda: zsre_records(world))
    if split in ("question", "question_heldout"):
        key = "src" if split == "question" else "rephrase"
        return [(r[key], r["pred"], "") for r in zsre()]
    out = []
    rng = _rng(world.seed, "recall-prefix")
    for r in cf_records():
        rw = r["requested_rewrite"]
        true, rid = rw["target_true"]["str"], rw["relation_id"]
        if split == "rewrite":
            text = fill(rw["prompt"], rw["subject"])
        elif split == "paraphrase":
            text = r["paraphrase_prompts"][1]
        else:
            text = f"{filler_sentence(rng)} {fill(rw['prompt'], rw['subject'])}"
        out.append((text, true, rid))
    return out


def _encode_pairs(tok, items: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, object ids) per item, as `massedit.inputs.tokens.target_ids` computes them, batched."""
    if not items:
        return []
    prompts = [p for p, _ in items]
    fulls = [p + spaced_target(p, o) for p, o in items]
    enc_p = tok(prompts, add_special_tokens=True)["input_ids"]
    enc_f = tok(fulls, add_special_tokens=True)["input_ids"]
    rows = []
    for (prompt, obj), p, f in zip(items, enc_p, enc_f):
        p, f = list(p), list(f)
        t = f[len(p):] if f[:len(p)] == p and len(f) > len(p) else target_ids(tok, prompt, obj)
        rows.append((p, t))
    return rows


@torch.no_grad()
def score_objects(model, tok, items: Sequence[tuple[str, str]], batch_size: int = 128) -> list[dict]:
    """Teacher-forced scores of each (prompt, object): per-token log-probs and top-1 hits."""
    device = input_device(model)
    rows = _encode_pairs(tok, items)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    out: list[Optional[dict]] = [None] * len(rows)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        seqs = [rows[i][0] + rows[i][1][:-1] for i in idx]
        b = pad(seqs, pad_id, side="right", device=device)
        logp = torch.log_softmax(model(**b.model_inputs()).logits.float(), dim=-1)
        for r, i in enumerate(idx):
            p, t = rows[i]
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(t), device=device)
            lp = logp[r, pos]
            tgt = torch.tensor(t, device=device)
            tok_lp = lp.gather(1, tgt[:, None])[:, 0]
            hits = (lp.argmax(-1) == tgt)
            out[i] = {"logprobs": tok_lp.tolist(), "hits": hits.tolist()}
    return out  # type: ignore[return-value]


def recall(model, tok, world: World, split: str = "rewrite", limit: Optional[int] = None,
           batch_size: int = 128, language: int = 1) -> dict:
    """Top-1 recall of the true object on one split (see `recall_items`) in language 1 or 2.

    first_top1: the object's first token is the argmax; full_top1: every object token is the argmax
    under teacher forcing; p_true: mean probability of the whole object (product over its tokens);
    p_first: mean probability of its first token; by_relation: full_top1 per relation.
    """
    items = recall_items(world, split, language)
    if limit is not None:
        items = items[:limit]
    was_training = model.training
    model.eval()
    scores = score_objects(model, tok, [(p, o) for p, o, _ in items], batch_size=batch_size)
    model.train(was_training)
    n = len(scores)
    first = [s["hits"][0] for s in scores]
    full = [all(s["hits"]) for s in scores]
    p_true = [math.exp(sum(s["logprobs"])) for s in scores]
    p_first = [math.exp(s["logprobs"][0]) for s in scores]
    by_rel: dict[str, list[bool]] = {}
    for (_, _, rid), ok in zip(items, full):
        if rid:
            by_rel.setdefault(rid, []).append(ok)
    return {
        "n": n,
        "first_top1": round(sum(first) / n, 4),
        "full_top1": round(sum(full) / n, 4),
        "p_true": round(sum(p_true) / n, 4),
        "p_first": round(sum(p_first) / n, 4),
        "by_relation": {k: round(sum(v) / len(v), 4) for k, v in by_rel.items()},
    }


def recall_all(model, tok, world: World, limit: Optional[int] = None, languages: int = 1) -> dict:
    """Every split; with two languages also every split in L2, as "l2_" + split."""
    figures = {split: recall(model, tok, world, split, limit=limit) for split in SPLITS}
    if check_languages(languages) == 2:
        figures.update({f"l2_{split}": recall(model, tok, world, split, limit=limit, language=2) for split in SPLITS})
    return figures
