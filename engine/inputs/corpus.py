"""Text corpora for covariance statistics: plain text (one document per line), JSONL with a
"text" field, or a `datasets` dataset saved with save_to_disk."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional


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
