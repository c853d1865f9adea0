"""Teacher-forced scoring of target continuations: the one scorer every metric rests on.

In `score_continuations` every (prompt, target) pair of every case is flattened into one list,
deduplicated, sorted by length (little padding), padded on the tokenizer's side with explicit
position ids, and run many per forward under `torch.no_grad()`. Only the logits at the target
positions are kept; log-softmax is taken over those rows only, in float32, whatever the model's
dtype. `batch_size=1` is the "one prompt at a time" mode (no padding at all).

Convention (and what the reference, kmeng01/memit, does):

* **Object tokens.** The object is scored as a continuation of the prompt with a leading space
  (`massedit.inputs.tokens.target_ids`), token by token: the input is prompt ids + target ids[:-1] and the
  log-probs are read at the last len(target) positions. The reference builds
  `f"{prefix} {target}"` and tokenizes " target" separately (which, for tokenizers with a BOS,
  scores the BOS too); here the target ids are the suffix of tokenize(prompt + " " + target).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from massedit.inputs import tokens as T
from massedit.model.arch import ModelLayout, UnsupportedModelError
from massedit.model.devices import input_device
from massedit.model.hooks import capture_outputs, run_until


@dataclass(frozen=True)
class ContScore:
    """Teacher-forced score of one target continuation of one prompt."""

    prompt: str
    target: str
    target_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # log P(target_t | prompt, target_<t), one per target token
    correct: tuple[bool, ...]  # argmax at that position == target_t

    @property
    def nll(self) -> float:
        """Mean token negative log-likelihood (the reference's per-prompt 'prob')."""
        return -sum(self.logprobs) / len(self.logprobs)

    @property
    def prob(self) -> float:
        """p̄ = exp(-mean token NLL): the geometric-mean token probability."""
        return math.exp(-self.nll)

    @property
    def accuracy(self) -> float:
        """Fraction of target tokens predicted top-1."""
        return sum(self.correct) / len(self.correct)

    @property
    def all_correct(self) -> bool:
        return all(self.correct)


def _encode_prompt(tok, prompt: str) -> list[int]:
    prompt_ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
    if not prompt_ids:
        raise ValueError(f"prompt {prompt!r} tokenizes to nothing: there is no position to predict the target from")
    return prompt_ids


def _head_at(model):
    """A function (batch inputs, rows, cols) -> logits at those positions only.

    Registry models run their blocks and apply the final norm and the LM head at the scored
    positions alone; other models fall back to full logits."""
    try:
        layout = ModelLayout(model)
    except (UnsupportedModelError, AttributeError):
        layout = None

    def full(inputs, rows, cols):
        logits = model(**inputs, use_cache=False).logits
        return logits[rows.to(logits.device), cols.to(logits.device)]

    if layout is None:
        return full

    def positions(inputs, rows, cols):
        store: dict = {}
        last = layout.block(layout.n_layers - 1)
        with capture_outputs({"h": last}, store):
            run_until(model, last, **inputs, use_cache=False)
        h = store["h"]
        return layout.logits(h[rows.to(h.device), cols.to(h.device)])

    return positions


def score_continuations(model, tok, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> list[ContScore]:
    """Per-token log-probs and top-1 correctness of each target given its prompt.

    Pairs are deduplicated; pairs whose inputs (prompt + target[:-1]) are the same token sequence,
    such as two single-token objects after one prompt, share one row. Rows are sorted by length and
    scored `batch_size` per forward. Returns one ContScore per input pair, in input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pairs = [(str(p), str(t)) for p, t in pairs]
    unique = list(dict.fromkeys(pairs))
    if not unique:
        return []
    prompt_cache: dict[str, list[int]] = {}
    rows_of: dict[tuple[int, ...], list[int]] = {}  # input sequence -> indices into `unique`
    targets: list[list[int]] = []
    for i, (prompt, target) in enumerate(unique):
        if prompt not in prompt_cache:
            prompt_cache[prompt] = _encode_prompt(tok, prompt)
        tids = list(T.target_ids(tok, prompt, target))
        targets.append(tids)
        rows_of.setdefault(tuple(prompt_cache[prompt] + tids[:-1]), []).append(i)
    seqs = sorted(rows_of, key=len)
    device = input_device(model)
    side, pad_id = T.padding_side(tok), T.pad_id_of(tok)
    head = _head_at(model)
    scored: list[Optional[ContScore]] = [None] * len(unique)
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            batch = T.pad(chunk, pad_id, side, device=device)
            rows, cols, tgt, spans = [], [], [], []
            for r, seq in enumerate(chunk):
                for i in rows_of[seq]:
                    tids = targets[i]
                    first = int(batch.shift[r]) + len(seq) - len(tids)
                    spans.append((i, len(tgt), len(tids)))
                    rows.extend([r] * len(tids))
                    cols.extend(range(first, first + len(tids)))
                    tgt.extend(tids)
            picked = head(batch.model_inputs(), torch.tensor(rows), torch.tensor(cols)).float()
            tgt_t = torch.tensor(tgt, device=picked.device)
            logp = picked.log_softmax(dim=-1).gather(1, tgt_t[:, None]).squeeze(1).tolist()
            hits = (picked.argmax(dim=-1) == tgt_t).tolist()
            for i, offset, n in spans:
                prompt, target = unique[i]
                scored[i] = ContScore(prompt, target, tuple(targets[i]), tuple(logp[offset : offset + n]),
                                      tuple(bool(h) for h in hits[offset : offset + n]))
    by_pair = dict(zip(unique, scored))
    return [by_pair[p] for p in pairs]
