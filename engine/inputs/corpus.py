"""Text corpora for covariance statistics: plain text (one document per line), JSONL with a
"text" field, or a `datasets` dataset saved with save_to_disk."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional
from massedit.files import write_text


def iter_corpus(path: str | Path) -> Iterator[str]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus not found: {path} (give a .txt file with one document per line, a .jsonl "
                                "file with a 'text' field, or a directory written by datasets' save_to_disk)")
    if path.is_dir():
        yield from _iter_dataset(path)
    elif path.suffix == ".jsonl":
        for lineno, line in _lines(path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}, line {lineno}: expected an object with a string field 'text'")
            if record["text"].strip():
                yield record["text"]
    else:
        for _, line in _lines(path):
            if line.strip():
                yield line.rstrip("\r\n")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 file; decoded line by line so that an error can say where."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"corpus {path}, line {lineno}: not UTF-8 text ({err.reason} at byte {err.start} "
                                 "of the line); convert the file to UTF-8") from None


def _iter_dataset(path: Path) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path} is a directory: reading a saved dataset needs the 'datasets' package "
                         "(pip install datasets)") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    if "text" not in ds.column_names:
        raise ValueError(f"{path}: the dataset has no 'text' column (columns: {', '.join(ds.column_names)})")
    for text in ds["text"]:
        if text and text.strip():
            yield text


def read_corpus(path: str | Path, limit: Optional[int] = None) -> list[str]:
    texts = []
    for text in iter_corpus(path):
        if limit is not None and len(texts) >= limit:
            break
        texts.append(text)
    if not texts:
        raise ValueError(f"corpus {path} holds no non-empty documents")
    return texts


# Built-in corpora, for models whose pretraining text cannot be had offline (DESIGN §14): English prose
# that ships with Python (its documentation topics, pydoc_data), text the model writes itself, or both.
BUILTIN = ("pydoc", "sampled", "pydoc+sampled")
SAMPLED_DOCS = 600  # generating is the slow part on a CPU (about 4 minutes for SmolLM2-135M on 2 cores)
SAMPLED_TOKENS = 96
_SAMPLE_STARTS = ("The", "In", "A", "It", "This", "When", "Many", "After", "One", "Some", "He", "She", "There",
                  "According to", "During", "Most")


def is_builtin(corpus) -> bool:
    """A built-in corpus name, unless a file or directory of that name exists (a path always wins)."""
    return isinstance(corpus, str) and corpus in BUILTIN and not Path(corpus).exists()


def pydoc_texts() -> list[str]:
    """The paragraphs of Python's documentation topics of at least 200 characters (751 with Python 3.11)."""
    import re

    from pydoc_data.topics import topics

    paragraphs = (" ".join(p.split()) for _, text in sorted(topics.items()) for p in re.split(r"\n\s*\n", text))
    return [p for p in paragraphs if len(p) >= 200]


def sampled_texts(model, tok, n: int = SAMPLED_DOCS, seed: int = 0, max_new_tokens: int = SAMPLED_TOKENS,
                  batch_size: int = 40) -> list[str]:
    """`n` texts the model writes from short neutral starts (top-k 40 sampling, seeded): text whose key
    statistics are the model's own, when its training text is not at hand."""
    import torch

    from massedit.model.devices import input_device

    texts: list[str] = []
    padding_side, tok.padding_side = tok.padding_side, "left"
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            for start in range(0, n, batch_size):
                prompts = [_SAMPLE_STARTS[i % len(_SAMPLE_STARTS)] for i in range(start, min(n, start + batch_size))]
                batch = tok(prompts, return_tensors="pt", padding=True).to(input_device(model))
                out = model.generate(**batch, do_sample=True, top_k=40, max_new_tokens=max_new_tokens,
                                     pad_token_id=tok.pad_token_id)
                texts += [" ".join(t.split()) for t in tok.batch_decode(out, skip_special_tokens=True)]
    finally:
        tok.padding_side = padding_side
    return texts


def corpus_texts(corpus, n: int, model=None, tok=None, cache_dir: Optional[Path] = None) -> list[str]:
    """At most `n` documents of `corpus`: a list of texts, a file or saved dataset (iter_corpus), or a
    built-in corpus name. Sampled text is written once to `cache_dir` and read back after that."""
    if isinstance(corpus, (list, tuple)):
        return list(corpus)[:n]
    if not is_builtin(corpus):
        return read_corpus(corpus, n)
    parts = []
    if "pydoc" in corpus:
        parts.append(pydoc_texts())
    if "sampled" in corpus:
        cached = Path(cache_dir) / f"sampled-corpus-{SAMPLED_DOCS}x{SAMPLED_TOKENS}.txt" if cache_dir else None
        if cached is not None and cached.exists():
            parts.append(read_corpus(cached))
        else:
            texts = sampled_texts(model, tok, SAMPLED_DOCS)
            if cached is not None:
                write_text(cached, "\n".join(texts) + "\n")
            parts.append(texts)
    # Interleaved, so that a sample count below the total still takes from every part.
    mixed = [t for group in zip(*parts) for t in group] + [t for p in parts for t in p[min(map(len, parts)):]]
    return mixed[:n]
