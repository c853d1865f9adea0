"""Generation metrics: n-gram entropy (GE), TF-IDF similarity (RS) and the texts they are computed on.

Conventions (and what the reference, kmeng01/memit, does):

* **GE** (reference `n_gram_entropy` / `compute_n_gram_entropy`): per generated text,
  mean(2/3·H₂, 4/3·H₃) with Hₙ the base-2 entropy of the n-gram frequency distribution; the case
  value is the arithmetic mean over its texts. NOTE: the reference takes the *mean* of the two
  weighted entropies, i.e. half of the sum written in DESIGN §6; we follow the reference (it is
  what makes the paper's ≈620 come out). Words are split by a regex approximating
  `nltk.word_tokenize` (word runs, hyphenated words, clitics like "'s", single punctuation
  marks); nltk is not a dependency. A text with fewer than n words contributes Hₙ = 0.
* **Generation** (reference `generate_fast`: top-k = 5 sampling, max_out_len = 100 tokens
  *including* the prompt, one sample per prompt, text = decoded prompt + continuation). Here
  `model.generate` with the same settings (top_k=0 means greedy), seeded (`seed`) inside a forked
  RNG so the caller's RNG state is untouched; prompts are batched by equal token length, so no
  padding is ever needed; generation stops early if every row emits EOS. Text is NFKD-normalized
  and "\\n\\n" replaced by a space, as the reference does.
* **RS** (reference: TF-IDF cosine between the joined generations and the joined Wikipedia
  snippets about o_new, with a vectorizer fitted on Wikipedia). Here the reference texts come
  from `reference_texts={object: [texts]}` and/or a record's own `"reference_texts"`; the IDF is
  fitted on all those texts (each text a document) with sklearn's defaults re-implemented in
  numpy: lowercase, tokens `\\b\\w\\w+\\b`, raw counts, idf = ln((1+N)/(1+df)) + 1, l2 norm.
  Without texts for a case's o_new its RS is None and a note says so.
"""
from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter, defaultdict
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from massedit.inputs import tokens as T
from massedit.model.devices import input_device


_WORD_RE = re.compile(r"\w+(?:-\w+)*|'\w+|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    """Regex approximation of nltk.word_tokenize (see the module docstring)."""
    return _WORD_RE.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Reference `compute_n_gram_entropy`: mean over n of weight_n · H_n (bits)."""
    words = word_tokenize(text)
    values = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(words[k : k + n]) for k in range(len(words) - n + 1))
        freqs = np.array(list(counts.values()), dtype=np.float64)
        h = float(-(freqs / freqs.sum() * np.log2(freqs / freqs.sum())).sum()) if freqs.size else 0.0
        values.append(w * h)
    return float(np.mean(values))


def n_gram_entropy(texts: Sequence[str]) -> Optional[float]:
    """Reference `n_gram_entropy` (arithmetic mean over texts)."""
    return float(np.mean([ngram_entropy(t) for t in texts])) if texts else None


_TFIDF_RE = re.compile(r"(?u)\b\w\w+\b")


class Tfidf:
    """sklearn TfidfVectorizer defaults in numpy: lowercase, `\\b\\w\\w+\\b`, smooth idf, l2 norm."""

    def __init__(self, documents: Iterable[str]):
        documents = list(documents)
        df: Counter = Counter()
        for doc in documents:
            df.update(set(self.tokenize(doc)))
        self.vocabulary = {w: k for k, w in enumerate(sorted(df))}
        n = len(documents)
        self.idf = np.array([math.log((1 + n) / (1 + df[w])) + 1.0 for w in sorted(df)], dtype=np.float64)

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return _TFIDF_RE.findall(text.lower())

    def transform(self, text: str) -> np.ndarray:
        vec = np.zeros(len(self.vocabulary), dtype=np.float64)
        for word, count in Counter(self.tokenize(text)).items():
            k = self.vocabulary.get(word)
            if k is not None:
                vec[k] = count
        vec *= self.idf
        norm = np.linalg.norm(vec)
        return vec / norm if norm > 0 else vec

    def similarity(self, text_a: str, text_b: str) -> float:
        """Cosine of the two TF-IDF vectors; 0 when either has no known word."""
        a, b = self.transform(text_a), self.transform(text_b)
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def generate_texts(model, tok, prompts: Sequence[str], max_length: int = 100, top_k: int = 5, seed: int = 0,
                   batch_size: int = 64) -> list[str]:
    """One text (prompt + continuation, max_length tokens in all) per prompt, like generate_fast."""
    device = input_device(model)
    encoded = [list(tok(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"generation prompt {prompts[i]!r} tokenizes to nothing")
        groups[len(ids)].append(i)
    outputs: list[Optional[list[int]]] = [None] * len(prompts)
    sampling = dict(do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0) if top_k and top_k > 0 else dict(do_sample=False)
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
        torch.manual_seed(seed)
        for length in sorted(groups):
            idx = groups[length]
            new_tokens = max_length - length
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                if new_tokens <= 0:
                    for i in chunk:
                        outputs[i] = encoded[i]
                    continue
                ids = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=device)
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                    pad_token_id=T.pad_id_of(tok), **sampling,
                )
                for r, i in enumerate(chunk):
                    outputs[i] = out[r].tolist()
    texts = []
    for ids in outputs:
        text = tok.decode(ids, skip_special_tokens=True)
        texts.append(unicodedata.normalize("NFKD", text).replace("\n\n", " "))
    return texts

