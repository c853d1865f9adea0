"""Edit requests: loading (CounterFact, zsRE, simple JSON / JSONL / CSV) and validation.

Everything here runs before any model is touched: a bad file fails in milliseconds, with a message
that names the file, the record and the field and says how to fix it.

What a record holds (CounterFact, zsRE with its two target mappings, simple) is
`massedit.inputs.records`; this module reads the containers — a JSON list, JSON lines
(``.jsonl``) or a CSV file (``.csv``, simple requests only, with those column names) — and checks a
batch of requests against each other.

Targets are stored as given, without a forced leading space: the engine adds the space when it
scores a target (``massedit.inputs.tokens.spaced_target``), as the reference does.
"""
from __future__ import annotations

import csv
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from massedit.inputs import tokens as _tokens
from massedit.inputs.records import (ZSRE_TARGETS, RequestError, check_fields, check_list, detect_kind, read_json_list,
                                     read_text, rewrite, where)

__all__ = [
    "EditRequest",
    "RequestError",
    "FORMATS",
    "ZSRE_TARGETS",
    "load_requests",
    "parse_records",
    "validate_requests",
    "check_request",
]

FORMATS = ("auto", "counterfact", "zsre", "simple", "json", "jsonl", "csv")


@dataclass(frozen=True)
class EditRequest:
    subject: str
    prompt: str  # exactly one "{}" where the subject goes
    target_new: str  # stored WITHOUT forced leading space (the engine adds it when scoring)
    target_true: Optional[str] = None
    case_id: Optional[Union[int, str]] = None
    source: str = ""  # where it came from, for messages: "<file>, record <i>"

    def text(self) -> str:
        """The prompt with the subject filled in."""
        return _tokens.fill(self.prompt, self.subject)[0]


def check_request(req: EditRequest, source: Optional[str] = None) -> None:
    """Field checks for one request (types, non-empty, exactly one "{}")."""
    check_fields(req.subject, req.prompt, req.target_new, req.target_true, req.case_id,
                 source or req.source or "request")


def parse_records(records: list, source: str, fmt: str = "auto", zsre_target: str = "answers") -> list[EditRequest]:
    """Requests from in-memory records (a list of dicts); `source` names them in messages.

    `fmt`: "auto" (by the first record's shape, `massedit.inputs.records.detect_kind`; neither
    CounterFact nor zsRE → simple), "counterfact", "zsre" or "simple" ("json", "jsonl" and "csv"
    only choose a container and mean "auto" here). `zsre_target`: "answers" (MEMIT's mapping,
    target_new = answers[0], the default) or "alt" (EasyEdit's, target_new = alt).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}; got {fmt!r}")
    records = check_list(records, source)
    return _requests(records, [f"{source}, record {i}" for i in range(len(records))], fmt, zsre_target)


# The keys of a simple record; any other key is ignored, and said so once (a misspelt "target_true").
_SIMPLE_KEYS = ("subject", "prompt", "target_new", "target_true", "case_id")


def _requests(records: list, sources: list[str], fmt: str, zsre_target: str) -> list[EditRequest]:
    kind = fmt if fmt in ("counterfact", "zsre", "simple") else detect_kind(records[0]) or "simple"
    requests = [EditRequest(*rewrite(rec, kind, src, i, zsre_target), src)
                for i, (rec, src) in enumerate(zip(records, sources))]
    unknown = sorted({str(k) for rec in records for k in rec} - set(_SIMPLE_KEYS)) if kind == "simple" else []
    if unknown:
        first = next(src for rec, src in zip(records, sources) if set(map(str, rec)) - set(_SIMPLE_KEYS))
        warnings.warn(f"{first}: ignoring key(s) a request does not have: {', '.join(map(repr, unknown))} "
                      f"(a request reads {', '.join(_SIMPLE_KEYS)})", stacklevel=3)
    return requests


# --------------------------------------------------------------------------------------------
# files


def _load_jsonl(path: Path, text: str) -> tuple[list, list[int]]:
    records, lines = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise RequestError(
                f"{path}, line {lineno} (record {len(records)}): invalid JSON at column {err.colno}: "
                f"{err.msg}; each line must hold one complete JSON object"
            ) from None
        except RecursionError:
            raise RequestError(f"{path}, line {lineno} (record {len(records)}): the JSON is nested too deeply to read; "
                               "each line must hold one flat record object") from None
        lines.append(lineno)
    return records, lines


_CSV_REQUIRED = ("subject", "prompt", "target_new")


def _load_csv(path: Path, text: str) -> tuple[list, list[int]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames
    if not header:
        raise RequestError(f"{path}: empty CSV file; the first line must name the columns {', '.join(_CSV_REQUIRED)}")
    header = [h.strip() if isinstance(h, str) else h for h in header]
    reader.fieldnames = header
    for col in _CSV_REQUIRED:
        if col not in header:
            raise RequestError(
                f'{path}, header (line 1), field "{col}": missing column; the header must name the columns '
                f"{', '.join(_CSV_REQUIRED)} (optional: target_true, case_id); found: {', '.join(map(str, header))}"
            )
    records, lines = [], []
    for row in reader:
        i = len(records)
        if None in row:
            raise RequestError(
                f"{path}, record {i} (line {reader.line_num}): has more cells than the header has columns; "
                "quote cells that contain commas"
            )
        if all((v is None or not v.strip()) for v in row.values()):
            continue
        rec = {k: v for k, v in row.items() if v is not None}
        for key in ("target_true", "case_id"):
            if key in rec and not rec[key].strip():
                rec[key] = None
        cid = rec.get("case_id")
        if isinstance(cid, str) and cid.strip().lstrip("-").isdigit():
            rec["case_id"] = int(cid.strip())
        records.append(rec)
        lines.append(reader.line_num)
    return records, lines


def load_requests(path, fmt: str = "auto", zsre_target: str = "answers") -> list[EditRequest]:
    """Edit requests from a file (CounterFact, zsRE, simple JSON / JSONL / CSV; see the module doc).

    `fmt` = "auto" picks the container from the extension (.csv → CSV, .jsonl / .ndjson → JSON
    lines, else a JSON list) and the record format from the first record's shape. "counterfact",
    "zsre" and "simple" force the record format (JSON list or JSON lines by extension); "json",
    "jsonl" and "csv" force the container. `zsre_target`: "answers" (default, MEMIT's mapping:
    target_new = answers[0]) or "alt" (EasyEdit's: target_new = alt, target_true = answers[0]).

    Raises RequestError naming the file, the record and the field on any problem. The requests
    are not yet checked against each other: call `validate_requests`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}; got {fmt!r}")
    path = Path(path)
    suffix = path.suffix.lower()
    container = fmt if fmt in ("json", "jsonl", "csv") else (
        "csv" if suffix == ".csv" else "jsonl" if suffix in (".jsonl", ".ndjson") else "json"
    )
    if container == "csv" and fmt in ("counterfact", "zsre"):
        raise RequestError(f"{path}: {fmt} records cannot be read from CSV; CSV holds simple requests only")
    text = read_text(path)
    kind = fmt if fmt in ("counterfact", "zsre", "simple") else "auto"
    if container == "json":
        return parse_records(read_json_list(path, text), str(path), kind, zsre_target)
    if container == "jsonl":
        records, lines = _load_jsonl(path, text)
    else:
        records, lines = _load_csv(path, text)
        kind = "simple"
    if not records:
        raise RequestError(f"{path}: contains no records; give at least one edit request")
    return _requests(records, [f"{path}, record {i} (line {line})" for i, line in enumerate(lines)], kind, zsre_target)


# --------------------------------------------------------------------------------------------
# validation of a batch


def _list_more(items: list[str], limit: int) -> str:
    shown = "; ".join(items[:limit])
    return shown + (f"; and {len(items) - limit} more" if len(items) > limit else "")


def validate_requests(requests: Sequence[EditRequest], tokenizer=None, max_tokens: Optional[int] = None
                      ) -> list[EditRequest]:
    """Checks a batch before any model is touched; returns it with identical duplicates merged.

    1. field checks on every request (types, non-empty, exactly one "{}");
    2. conflicts — same subject and prompt, different target_new (MEMIT paper, Eqn. 5): a
       RequestError naming both records and both targets (all conflicts are listed);
    3. identical duplicates (same subject, prompt and target_new) are merged, keeping the first,
       with one `warnings.warn` naming the records dropped;
    4. with a tokenizer, every subject must be locatable in its tokenized prompt
       (`massedit.inputs.tokens.encode_prompt`) and must not be or contain a special token ("<|endoftext|>",
       "<s>": the model never saw it as text); else a RequestError naming the record and field "subject"
       (a target_new holding one, or equal to target_true, is accepted with a warning);
    5. with `max_tokens` (the room the model's context leaves after the longest context template),
       the prompt and its target together must fit, else a RequestError naming the longer of the two.

    Subjects and targets are compared after stripping surrounding whitespace (" Paris" and
    "Paris" are scored alike). Order is kept otherwise.
    """
    if requests is None or len(requests) == 0:
        raise RequestError("no edit requests: the request list is empty; give at least one request")
    requests = list(requests)
    for i, req in enumerate(requests):
        if not isinstance(req, EditRequest):
            raise RequestError(f"request {i}: expected an EditRequest, got {type(req).__name__}")
        check_request(req, req.source or f"request {i}")

    def name(i: int) -> str:
        return requests[i].source or f"request {i}"

    seen: dict[tuple[str, str], int] = {}
    kept: list[tuple[int, EditRequest]] = []
    conflicts, duplicates = [], []
    for i, req in enumerate(requests):
        key = (req.subject.strip(), req.prompt)
        first = seen.get(key)
        if first is None:
            seen[key] = i
            kept.append((i, req))
            continue
        other = requests[first]
        if other.target_new.strip() == req.target_new.strip():
            duplicates.append(f"{name(i)} repeats {name(first)}")
        else:
            conflicts.append(
                f"{name(first)} asks for {other.target_new!r} and {name(i)} asks for {req.target_new!r} "
                f"(subject {req.subject!r}, prompt {req.prompt!r})"
            )
    if conflicts:
        raise RequestError(
            f"{len(conflicts)} conflicting request pair(s): the same subject and prompt cannot be edited to two "
            f"different targets in one batch (MEMIT, Eqn. 5): {_list_more(conflicts, 5)}. "
            "Keep one target per (subject, prompt), or edit them in separate runs."
        )
    if duplicates:
        warnings.warn(
            f"merged {len(duplicates)} duplicate request(s) (same subject, prompt and target_new), keeping the "
            f"first of each: {_list_more(duplicates, 10)}",
            stacklevel=2,
        )
    unchanged = [name(i) for i, req in kept
                 if req.target_true is not None and req.target_true.strip() == req.target_new.strip()]
    if unchanged:
        warnings.warn(
            f"{len(unchanged)} request(s) ask for the fact the model should already know (target_new equals "
            f"target_true), so they change nothing that is measured: {_list_more(unchanged, 10)}",
            stacklevel=2,
        )
    if tokenizer is not None:
        special = [t for t in getattr(tokenizer, "all_special_tokens", []) if t and t.strip()]
        for i, req in kept:
            src = name(i)
            token = next((t for t in special if t in req.subject), None)
            if token is not None:
                raise RequestError(
                    f"{where(src, 'subject')}: {req.subject!r} contains the tokenizer's special token {token!r}, "
                    "which the model reads as a control token, not as text; give the subject as plain text"
                )
            token = next((t for t in special if t in req.target_new), None)
            if token is not None:
                warnings.warn(f"{where(src, 'target_new')}: {req.target_new!r} contains the tokenizer's special token "
                              f"{token!r}: the edit teaches the model to emit a control token", stacklevel=2)
            try:
                enc = _tokens.encode_prompt(tokenizer, req.prompt, req.subject)
            except _tokens.SubjectNotFoundError as err:
                raise RequestError(f"{where(src, 'subject')}: {err}") from None
            if max_tokens is not None:
                _check_length(req, src, tokenizer, len(enc.ids), max_tokens)
    return [req for _, req in kept]


def _check_length(req: EditRequest, src: str, tokenizer, prompt_tokens: int, max_tokens: int) -> None:
    target_tokens = len(_tokens.target_ids(tokenizer, req.text(), req.target_new))
    if prompt_tokens + target_tokens <= max_tokens:
        return
    field = "target_new" if target_tokens > prompt_tokens else "prompt"
    raise RequestError(
        f"{where(src, field)}: the prompt ({prompt_tokens} tokens) and target ({target_tokens} tokens) are longer "
        f"than the model's context leaves for them ({max_tokens} tokens after the longest context template); "
        f"shorten the {'target' if field == 'target_new' else 'prompt'}"
    )
