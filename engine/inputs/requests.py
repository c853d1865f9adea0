"""Edit requests: loading (CounterFact, zsRE, simple JSON / JSONL / CSV) and validation.

Everything here runs before any model is touched: a bad file fails in milliseconds, with a message
that names the file, the record and the field and says how to fix it.

Formats (DESIGN §5):

* **CounterFact** — a JSON list of records with ``"requested_rewrite": {"prompt", "subject",
  "target_new": {"str"}, "target_true": {"str"}}`` and ``"case_id"``. Other keys (paraphrase,
  neighborhood, generation prompts) are ignored here; the evaluation reads them itself.
* **zsRE** (MEND's ``zsre_mend_eval.json``) — a JSON list of ``{"subject", "src", "pred",
  "rephrase", "alt", "answers", "loc", "loc_ans", "cond"}``. The prompt is ``src`` with the first
  occurrence of the subject replaced by ``"{}"`` (the filled text is identical to ``src``, and the
  subject token is that of the first occurrence, as in the reference's ``prompt.index("{}")``).
  **Default mapping (MEMIT's):** ``target_new = answers[0]``, no ``target_true``.
  ``zsre_target="alt"`` gives EasyEdit's mapping: ``target_new = alt``, ``target_true = answers[0]``.
  ``case_id`` is the record index, as in MEMIT's zsRE loader.
* **Simple** — a JSON list, or JSON lines (``.jsonl``), of ``{"subject", "prompt", "target_new"
  [, "target_true"][, "case_id"]}`` where a target is a string or ``{"str": ...}``; or a CSV file
  (``.csv``) with those column names. Unknown keys / columns are ignored.

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
from typing import Any, Optional, Sequence, Union

from massedit.inputs import tokens as _tokens

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
ZSRE_TARGETS = ("answers", "alt")
_PROMPT_EXAMPLE = '"{} plays the sport of"'


class RequestError(ValueError):
    """A request file or request list is not usable; the message says where and how to fix it."""


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


# --------------------------------------------------------------------------------------------
# field checks shared by the loaders and validate_requests


def _where(source: str, field: str) -> str:
    return f'{source}, field "{field}"'


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_prompt(prompt: str, where: str, subject: Optional[str] = None) -> None:
    n = prompt.count("{}")
    if n == 1:
        return
    hint = ""
    if n == 0:
        if "{0}" in prompt or "{subject}" in prompt:
            hint = ' (write the marker as "{}", not "{0}" or "{subject}")'
        elif subject and subject.strip() and subject in prompt:
            hint = f' (the prompt contains the subject {subject!r} itself: replace it with "{{}}")'
    else:
        hint = " (keep one marker; write the subject itself where it appears again)"
    raise RequestError(
        f'{where}: must contain exactly one "{{}}" marking where the subject goes, found {n}{hint}; '
        f"e.g. {_PROMPT_EXAMPLE}; got {prompt!r}"
    )


def _require_str(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{where}: must be a string ({what}), got {_type_name(value)} {value!r}")
    if not value.strip():
        raise RequestError(f"{where}: is empty; give {what}")
    return value


def _target(value: Any, where: str, what: str, optional: bool = False) -> Optional[str]:
    """A target given as a string or as {"str": ...} (CounterFact style)."""
    if value is None and optional:
        return None
    if isinstance(value, dict):
        if "str" not in value:
            raise RequestError(
                f'{where}: an object target needs a "str" key, e.g. {{"str": "Paris"}}; '
                f"got keys {sorted(value)}"
            )
        return _require_str(value["str"], f"{where[:-1]}.str\"", what)
    if not isinstance(value, str):
        raise RequestError(
            f'{where}: must be a string or {{"str": ...}} ({what}), got {_type_name(value)} {value!r}'
        )
    return _require_str(value, where, what)


def _case_id(value: Any, where: str) -> Optional[Union[int, str]]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RequestError(f"{where}: must be an integer or a string, got {_type_name(value)} {value!r}")
    return value


def check_request(req: EditRequest, source: Optional[str] = None) -> None:
    """Field checks for one request (types, non-empty, exactly one "{}")."""
    src = source or req.source or "request"
    _require_str(req.subject, _where(src, "subject"), "the subject, e.g. \"Michael Jordan\"")
    _require_str(req.prompt, _where(src, "prompt"), f"the prompt template, e.g. {_PROMPT_EXAMPLE}")
    _check_prompt(req.prompt, _where(src, "prompt"), req.subject)
    _require_str(req.target_new, _where(src, "target_new"), "the new object, e.g. \"baseball\"")
    if req.target_true is not None:
        _require_str(req.target_true, _where(src, "target_true"), "the true object, or leave it out")
    _case_id(req.case_id, _where(src, "case_id"))


# --------------------------------------------------------------------------------------------
# record parsers


def _get(record: dict, key: str, src: str, fmt: str, path: str = "") -> Any:
    if key not in record:
        full = f"{path}{key}"
        raise RequestError(
            f"{_where(src, full)}: missing (read as {fmt} records; "
            f"keys present: {', '.join(map(str, record)) or 'none'})"
        )
    return record[key]


def _parse_simple(record: dict, src: str) -> EditRequest:
    fmt = "simple"
    subject = _require_str(_get(record, "subject", src, fmt), _where(src, "subject"), 'the subject, e.g. "Michael Jordan"')
    prompt = _require_str(_get(record, "prompt", src, fmt), _where(src, "prompt"), f"the prompt template, e.g. {_PROMPT_EXAMPLE}")
    _check_prompt(prompt, _where(src, "prompt"), subject)
    target_new = _target(_get(record, "target_new", src, fmt), _where(src, "target_new"), 'the new object, e.g. "baseball"')
    target_true = _target(record.get("target_true"), _where(src, "target_true"), "the true object", optional=True)
    case_id = _case_id(record.get("case_id"), _where(src, "case_id"))
    return EditRequest(subject, prompt, target_new, target_true, case_id, src)


def _parse_counterfact(record: dict, src: str) -> EditRequest:
    fmt = "CounterFact"
    rw = _get(record, "requested_rewrite", src, fmt)
    if not isinstance(rw, dict):
        raise RequestError(
            f"{_where(src, 'requested_rewrite')}: must be an object with prompt, subject, target_new, "
            f"target_true; got {_type_name(rw)}"
        )
    p = "requested_rewrite."
    subject = _require_str(_get(rw, "subject", src, fmt, p), _where(src, p + "subject"), "the subject")
    prompt = _require_str(_get(rw, "prompt", src, fmt, p), _where(src, p + "prompt"), f"the prompt template, e.g. {_PROMPT_EXAMPLE}")
    _check_prompt(prompt, _where(src, p + "prompt"), subject)
    target_new = _target(_get(rw, "target_new", src, fmt, p), _where(src, p + "target_new"), "the new object")
    target_true = _target(rw.get("target_true"), _where(src, p + "target_true"), "the true object", optional=True)
    case_id = _case_id(record.get("case_id"), _where(src, "case_id"))
    return EditRequest(subject, prompt, target_new, target_true, case_id, src)


def _parse_zsre(record: dict, src: str, index: int, zsre_target: str) -> EditRequest:
    fmt = "zsRE"
    subject = _require_str(_get(record, "subject", src, fmt), _where(src, "subject"), "the subject")
    question = _require_str(_get(record, "src", src, fmt), _where(src, "src"), "the question")
    if subject not in question:
        raise RequestError(
            f'{_where(src, "subject")}: the subject {subject!r} does not occur in "src" {question!r}, so '
            'the prompt cannot be built (prompt = src with the subject replaced by "{}"); fix the subject '
            "or the question so that the subject appears in it verbatim (case and spacing included)"
        )
    prompt = question.replace(subject, "{}", 1)
    if prompt.count("{}") != 1:
        raise RequestError(
            f'{_where(src, "src")}: the question already contains "{{}}"; remove the braces from {question!r}'
        )
    answers = record.get("answers")
    first_answer = None
    if zsre_target == "answers" or answers is not None:
        answers = _get(record, "answers", src, fmt)
        if not isinstance(answers, list) or not answers:
            raise RequestError(
                f'{_where(src, "answers")}: must be a non-empty list of strings, got {_type_name(answers)} {answers!r}'
            )
        first_answer = _require_str(answers[0], _where(src, "answers[0]"), "the answer")
    if zsre_target == "answers":
        target_new, target_true = first_answer, None
    else:
        target_new = _require_str(_get(record, "alt", src, fmt), _where(src, "alt"), "the alternative answer")
        target_true = first_answer
    return EditRequest(subject, prompt, target_new, target_true, index, src)


def _detect(record: Any) -> str:
    if isinstance(record, dict):
        if "requested_rewrite" in record:
            return "counterfact"
        if "src" in record and "answers" in record:
            return "zsre"
    return "simple"


def parse_records(records: list, source: str, fmt: str = "auto", zsre_target: str = "answers") -> list[EditRequest]:
    """Requests from in-memory records (a list of dicts); `source` names them in messages.

    `fmt`: "auto" (by the first record's shape: "requested_rewrite" → CounterFact; "src" and
    "answers" → zsRE; else simple), "counterfact", "zsre" or "simple" ("json", "jsonl" and "csv"
    only choose a container and mean "auto" here). `zsre_target`: "answers" (MEMIT's mapping,
    target_new = answers[0], the default) or "alt" (EasyEdit's, target_new = alt).
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if zsre_target not in ZSRE_TARGETS:
        raise ValueError(
            f"zsre_target must be 'answers' (MEMIT: target_new = answers[0]) or 'alt' (EasyEdit: "
            f"target_new = alt); got {zsre_target!r}"
        )
    if isinstance(records, dict):
        raise RequestError(
            f"{source}: the top level is a single object; expected a list of records, e.g. "
            '[{"subject": "Michael Jordan", "prompt": "{} plays the sport of", "target_new": "baseball"}]'
            " — wrap the object in [ ]"
        )
    if not isinstance(records, (list, tuple)):
        raise RequestError(f"{source}: expected a list of records, got {_type_name(records)}")
    if not records:
        raise RequestError(f"{source}: contains no records; give at least one edit request")
    kind = fmt if fmt in ("counterfact", "zsre", "simple") else _detect(records[0])
    out = []
    for i, record in enumerate(records):
        src = f"{source}, record {i}"
        out.append(_parse_one(record, src, i, kind, zsre_target))
    return out


def _parse_one(record: Any, src: str, index: int, kind: str, zsre_target: str) -> EditRequest:
    if not isinstance(record, dict):
        raise RequestError(
            f"{src}: expected an object with subject, prompt, target_new; got {_type_name(record)} {record!r}"[:400]
        )
    if kind == "counterfact":
        return _parse_counterfact(record, src)
    if kind == "zsre":
        return _parse_zsre(record, src, index, zsre_target)
    return _parse_simple(record, src)


# --------------------------------------------------------------------------------------------
# files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise RequestError(f"{path}: request file not found; check the path") from None
    except IsADirectoryError:
        raise RequestError(f"{path}: is a directory; give the path of a .json, .jsonl or .csv file") from None
    except UnicodeDecodeError as err:
        raise RequestError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None


def _load_json(path: Path, text: str) -> list:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        hint = ""
        if err.msg.startswith("Extra data") and text.lstrip().startswith("{"):
            hint = " (one object per line? then it is JSON lines: name the file .jsonl or pass fmt='jsonl')"
        raise RequestError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}{hint}; fix the syntax there"
        ) from None
    if isinstance(data, dict):
        raise RequestError(
            f"{path}: the top level is a JSON object; expected a JSON list of records, e.g. "
            '[{"subject": "Michael Jordan", "prompt": "{} plays the sport of", "target_new": "baseball"}]'
            " — wrap the object in [ ]"
        )
    if not isinstance(data, list):
        raise RequestError(f"{path}: the top level is {_type_name(data)}; expected a JSON list of records")
    return data


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
    text = _read_text(path)
    kind = fmt if fmt in ("counterfact", "zsre", "simple") else "auto"
    if container == "json":
        records = _load_json(path, text)
        return parse_records(records, str(path), kind, zsre_target)
    if container == "jsonl":
        records, lines = _load_jsonl(path, text)
    else:
        records, lines = _load_csv(path, text)
        kind = "simple"
    if not records:
        raise RequestError(f"{path}: contains no records; give at least one edit request")
    kind = kind if kind != "auto" else _detect(records[0])
    return [
        _parse_one(rec, f"{path}, record {i} (line {line})", i, kind, zsre_target)
        for i, (rec, line) in enumerate(zip(records, lines))
    ]


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
       "<s>": the model never saw it as text); else a RequestError naming the record and field "subject";
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
            raise RequestError(f"request {i}: expected an EditRequest, got {_type_name(req)}")
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
    if tokenizer is not None:
        special = [t for t in getattr(tokenizer, "all_special_tokens", []) if t and t.strip()]
        for i, req in kept:
            src = name(i)
            token = next((t for t in special if t in req.subject), None)
            if token is not None:
                raise RequestError(
                    f"{_where(src, 'subject')}: {req.subject!r} contains the tokenizer's special token {token!r}, "
                    "which the model reads as a control token, not as text; give the subject as plain text"
                )
            try:
                enc = _tokens.encode_prompt(tokenizer, req.prompt, req.subject)
            except _tokens.SubjectNotFoundError as err:
                raise RequestError(f"{_where(src, 'subject')}: {err}") from None
            if max_tokens is not None:
                _check_length(req, src, tokenizer, len(enc.ids), max_tokens)
    return [req for _, req in kept]


def _check_length(req: EditRequest, src: str, tokenizer, prompt_tokens: int, max_tokens: int) -> None:
    target_tokens = len(_tokens.target_ids(tokenizer, req.text(), req.target_new))
    if prompt_tokens + target_tokens <= max_tokens:
        return
    field = "target_new" if target_tokens > prompt_tokens else "prompt"
    raise RequestError(
        f"{_where(src, field)}: the prompt ({prompt_tokens} tokens) and target ({target_tokens} tokens) are longer "
        f"than the model's context leaves for them ({max_tokens} tokens after the longest context template); "
        f"shorten the {'target' if field == 'target_new' else 'prompt'}"
    )
