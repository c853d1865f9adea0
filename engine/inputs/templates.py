"""Context templates (DESIGN §2.1): the bare "{}" plus short generated prefixes "<text>. {}".

Templates come in groups; keys are averaged within each group, then over groups (§2.3).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from massedit.model.devices import input_device

STARTERS = ("The", "Therefore", "Because", "I", "You")

ContextTemplates = list[list[str]]


def validate_templates(templates, source: str = "context templates") -> ContextTemplates:
    if not isinstance(templates, list) or not templates or not all(isinstance(g, list) and g for g in templates):
        raise ValueError(
            f'{source}: expected a non-empty JSON list of non-empty lists of strings, e.g. [["{{}}"], '
            '["Some text. {}"]]'
        )
    for gi, group in enumerate(templates):
        for ti, t in enumerate(group):
            if not isinstance(t, str) or t.count("{}") != 1:
                raise ValueError(
                    f"{source}: group {gi}, template {ti} ({t!r}) must be a string with exactly one '{{}}' "
                    "where the prompt goes"
                )
    return [list(g) for g in templates]


def load_templates(path: str | Path) -> ContextTemplates:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"context templates file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    return validate_templates(data, str(path))


@torch.no_grad()
def generate_templates(
    model, tok, plan: Sequence[tuple[int, int]] = ((10, 5),), seed: int = 0, starters: Sequence[str] = STARTERS
) -> ContextTemplates:
    """[["{}"], one group per (max_tokens, n_gen) pair of "<generated>. {}" templates].

    Each group holds n_gen texts (n_gen // len(starters) per starter, at least one) of at most
    max_tokens tokens including the starter, sampled top-k 5 as the reference does.
    """
    device = input_device(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    groups = [["{}"]]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for max_tokens, n_gen in plan:
            texts = []
            for starter in starters:
                ids = tok(starter, return_tensors="pt")["input_ids"].to(device)
                new = max(1, max_tokens - ids.shape[1])
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    top_k=5,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    num_return_sequences=max(1, n_gen // len(starters)),
                    pad_token_id=pad,
                    # Rank 0 generates alone: an FSDP2 model is gathered for the edit, so its forwards
                    # need no other rank (transformers would otherwise wait for them every token).
                    synced_gpus=False,
                )
                texts += tok.batch_decode(out, skip_special_tokens=True)
            # Braces would be read as format fields by tools that use str.format on templates.
            cleaned = [t.replace("{", " ").replace("}", " ").replace("\n", " ").strip() for t in texts]
            groups.append([f"{t}. {{}}" for t in cleaned])
    return groups
