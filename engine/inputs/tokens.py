"""Prompts to token ids: subject positions, target tokens, padded batches.

The subject token (`fact_token = "subject_last"`) is found from the tokenizer's character offsets,
so it is right for byte-level BPE (leading-space tokens) and SentencePiece alike; tokenizers
without offsets fall back to tokenizing the text up to the subject's end. Batches are padded here,
on either side, with explicit position ids so that padding never shifts a row's positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


class SubjectNotFoundError(ValueError):
    pass


@dataclass(frozen=True)
class Encoded:
    """One tokenized prompt: its ids and the index of the subject's last token."""

    ids: tuple[int, ...]
    subject_index: int


def fill(template: str, subject: str) -> tuple[str, int, int]:
    """Put the subject into a template with one '{}'; returns text and the subject's char span.

    str.format is avoided on purpose: prompts and generated context text may hold other braces.
    """
    head, sep, tail = template.partition("{}")
    if not sep:
        raise ValueError(f"template {template!r} has no '{{}}' where the subject goes")
    return head + subject + tail, len(head), len(head) + len(subject)


def compose(context: str, prompt: str) -> str:
    """A context template ('<text>. {}') wrapped around a request prompt ('{} plays')."""
    head, sep, tail = context.partition("{}")
    if not sep:
        raise ValueError(f"context template {context!r} has no '{{}}' where the prompt goes")
    return head + prompt + tail


def _encode_plain(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=True)["input_ids"])


def subject_last_index(tok, text: str, start: int, end: int) -> tuple[list[int], int]:
    """Token ids of `text` and the index of the token that holds its character end-1."""
    if getattr(tok, "is_fast", False):
        enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        hits = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
        if hits:
            return ids, hits[-1]
    else:
        ids = _encode_plain(tok, text)
        prefix = _encode_plain(tok, text[:end])
        if prefix and ids[: len(prefix)] == prefix:
            return ids, len(prefix) - 1
    raise SubjectNotFoundError(
        f"cannot locate the subject {text[start:end]!r} in the tokenized prompt {text!r}: no token "
        "covers its characters. Check that the subject is spelled as it should appear in the prompt "
        "and that the tokenizer is a fast (offset-mapping) tokenizer."
    )


def encode_prompt(tok, template: str, subject: str) -> Encoded:
    text, start, end = fill(template, subject)
    ids, index = subject_last_index(tok, text, start, end)
    return Encoded(tuple(ids), index)


def spaced_target(prompt_text: str, target: str) -> str:
    """The target as it is scored after the prompt: with a leading space, as the reference does."""
    if target[:1].isspace() or prompt_text[-1:].isspace():
        return target
    return " " + target


def target_ids(tok, prompt_text: str, target: str) -> list[int]:
    """Token ids of `target` as a continuation of `prompt_text`.

    Taken as the suffix of tokenize(prompt + target) when tokenize(prompt) is its prefix, so that
    SentencePiece's word-boundary handling matches what the model sees; else the spaced target
    tokenized alone.
    """
    target = spaced_target(prompt_text, target)
    prompt_ids = _encode_plain(tok, prompt_text)
    full_ids = _encode_plain(tok, prompt_text + target)
    if full_ids[: len(prompt_ids)] == prompt_ids and len(full_ids) > len(prompt_ids):
        return full_ids[len(prompt_ids):]
    ids = list(tok(target, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing; give a non-empty target")
    return ids


@dataclass
class Batch:
    """Padded token batch. `shift[r]` is the column of row r's first real token."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    shift: torch.Tensor
    lengths: torch.Tensor

    def model_inputs(self) -> dict:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }

    def column(self, row_positions: torch.Tensor) -> torch.Tensor:
        """Columns in the padded batch of per-row positions counted in the unpadded sequence."""
        return row_positions + self.shift.to(row_positions.device)


def pad_id_of(tok) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tok, name, None)
        if value is not None:
            return int(value)
    return 0


def pad(
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    side: str = "right",
    device: Optional[torch.device] = None,
    offsets: Optional[Sequence[int]] = None,
    width: Optional[int] = None,
) -> Batch:
    """Pad on one side, or place row r at column offsets[r] (padding on both sides) when given."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    if not seqs:
        raise ValueError("cannot pad an empty list of sequences")
    lengths = torch.tensor([len(s) for s in seqs])
    if offsets is None:
        longest = int(lengths.max())
        offsets = [longest - len(s) if side == "left" else 0 for s in seqs]
    width = max([width or 0] + [o + len(s) for o, s in zip(offsets, seqs)])
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, (s, offset) in enumerate(zip(seqs, offsets)):
        ids[r, offset : offset + len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[r, offset : offset + len(s)] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    shift = torch.tensor(list(offsets), dtype=torch.long)
    if device is not None:
        # Pinned host memory lets the copy overlap work already queued on the GPU.
        cuda = torch.device(device).type == "cuda"
        ids, mask, positions = (t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)
                                for t in (ids, mask, positions))
    return Batch(ids, mask, positions, shift, lengths)


def padding_side(tok) -> str:
    return getattr(tok, "padding_side", "right") or "right"
