"""The record schema: what a CounterFact, zsRE or simple record holds, checked once for editing and
evaluation alike.

Shapes (DESIGN §5; the public files are kmeng01/memit's ``counterfact.json`` and MEND's
``zsre_mend_eval.json``):

* **CounterFact** — ``{"case_id", "requested_rewrite": {"prompt", "subject", "target_new": {"str"},
  "target_true": {"str"}[, "relation_id"]}, "paraphrase_prompts", "neighborhood_prompts",
  "attribute_prompts", "generation_prompts"[, "reference_texts": {object: [texts]}]}``. The prompt
  holds exactly one ``"{}"``; a target may also be a plain string. The prompt lists may be absent
  (their metrics are then missing).
* **zsRE** — ``{"subject", "src", "pred", "rephrase", "alt", "answers", "loc", "loc_ans",
  "cond"}``. ``rephrase``, ``loc``, ``alt`` and ``pred`` may be empty strings; ``loc`` needs
  ``loc_ans``. The edit prompt is ``src`` with the first occurrence of the subject replaced by
  ``"{}"``. Targets: ``zsre_target="answers"`` (MEMIT's mapping, the default) edits toward
  ``answers[0]`` with no true object; ``"alt"`` (EasyEdit's) toward ``alt``, the true object
  being ``answers[0]`` when given.
* **Simple** — ``{"subject", "prompt", "target_new"[, "target_true"][, "case_id"]}``, a target a
  string or ``{"str": ...}``. Unknown keys are ignored in every shape.

A CounterFact or zsRE record's case id is its ``"case_id"``, else its index in the file (MEMIT's
zsRE loader numbers records so); a simple record has one only when it gives it. Case ids are
integers or strings.

Every error is a one-line `RequestError` naming the file, the record and the field, and saying how
to fix it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

__all__ = [
    "RequestError",
    "Rewrite",
    "KINDS",
    "ZSRE_TARGETS",
    "where",
    "detect_kind",
    "check_fields",
    "check_list",
    "check_records",
    "rewrite",
    "zsre_targets",
    "read_text",
    "read_json_list",
    "load_records",
    "case_id_of",
]

KINDS = ("counterfact", "zsre")
ZSRE_TARGETS = ("answers", "alt")
_PROMPT_EXAMPLE = '"{} plays the sport of"'
_NAMES = {"counterfact": "CounterFact", "zsre": "zsRE", "simple": "simple"}
_PROMPT_LISTS = ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts", "attribute_prompts")
_LIST_EXAMPLE = '[{"subject": "Michael Jordan", "prompt": "{} plays the sport of", "target_new": "baseball"}]'


class RequestError(ValueError):
    """A request or record file, or a request list, is not usable; the message says where and how to fix it."""


class Rewrite(NamedTuple):
    """What one record asks to edit."""

    subject: str
    prompt: str  # exactly one "{}" where the subject goes
    target_new: str
    target_true: Optional[str]
    case_id: Optional[Union[int, str]]


def where(source: str, field: str) -> str:
    """`source` (e.g. "file.json, record 3") and a field, as the messages name them."""
    return f'{source}, field "{field}"'


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# --------------------------------------------------------------------------------------------
# field checks


def _require_str(value: Any, at: str, what: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{at}: must be a string ({what}), got {_type_name(value)} {value!r}"[:400])
    if not allow_empty and not value.strip():
        raise RequestError(f"{at}: is empty; give {what}")
    return value


def _check_prompt(prompt: str, at: str, subject: Optional[str] = None) -> None:
    n = prompt.count("{}")
    if n == 1:
        return
    hint = ""
    if n == 0:
        if "{0}" in prompt or "{subject}" in prompt:
            hint = ' (write the marker as "{}", not "{0}" or "{subject}")'
        elif isinstance(subject, str) and subject.strip() and subject in prompt:
            hint = f' (the prompt contains the subject {subject!r} itself: replace it with "{{}}")'
    else:
        hint = " (keep one marker; write the subject itself where it appears again)"
    raise RequestError(
        f'{at}: must contain exactly one "{{}}" marking where the subject goes, found {n}{hint}; '
        f"e.g. {_PROMPT_EXAMPLE}; got {prompt!r}"
    )


def _target(value: Any, at: str, what: str) -> str:
    """A target given as a string or as {"str": ...} (CounterFact style)."""
    if isinstance(value, dict):
        if "str" not in value:
            raise RequestError(f'{at}: an object target needs a "str" key, e.g. {{"str": "Paris"}}; '
                               f"got keys {sorted(value)}")
        return _require_str(value["str"], f'{at[:-1]}.str"', what)
    if not isinstance(value, str):
        raise RequestError(f'{at}: must be a string or {{"str": ...}} ({what}), got {_type_name(value)} {value!r}'[:400])
    return _require_str(value, at, what)


def _check_case_id(value: Any, at: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, str))):
        raise RequestError(f"{at}: must be an integer or a string, got {_type_name(value)} {value!r}")


def _str_list(value: Any, source: str, field: str) -> None:
    if not isinstance(value, list):
        raise RequestError(f"{where(source, field)}: must be a list of strings, got {_type_name(value)}")
    for j, item in enumerate(value):
        _require_str(item, where(source, f"{field}[{j}]"), "a text")


def _get(record: dict, key: str, source: str, kind: str, path: str = "") -> Any:
    if key not in record:
        raise RequestError(
            f"{where(source, path + key)}: missing (read as {_NAMES[kind]} records; "
            f"keys present: {', '.join(map(str, record)) or 'none'})"
        )
    return record[key]


def check_fields(subject: Any, prompt: Any, target_new: Any, target_true: Any = None, case_id: Any = None,
                 source: str = "request", path: str = "") -> None:
    """An edit's fields: strings, non-empty, exactly one "{}" in the prompt; `path` prefixes field names."""
    _require_str(subject, where(source, path + "subject"), 'the subject, e.g. "Michael Jordan"')
    _require_str(prompt, where(source, path + "prompt"), f"the prompt template, e.g. {_PROMPT_EXAMPLE}")
    _check_prompt(prompt, where(source, path + "prompt"), subject)
    _require_str(target_new, where(source, path + "target_new"), 'the new object, e.g. "baseball"')
    if target_true is not None:
        _require_str(target_true, where(source, path + "target_true"), "the true object, or leave it out")
    _check_case_id(case_id, where(source, "case_id"))


def _rewrite_at(obj: dict, path: str, source: str, kind: str, case_id: Any, need_true: bool) -> Rewrite:
    subject, prompt = _get(obj, "subject", source, kind, path), _get(obj, "prompt", source, kind, path)
    new = _target(_get(obj, "target_new", source, kind, path), where(source, path + "target_new"),
                  'the new object, e.g. "baseball"')
    true = obj.get("target_true") if not need_true else _get(obj, "target_true", source, kind, path)
    if true is not None:
        true = _target(true, where(source, path + "target_true"), "the true object")
    found = Rewrite(subject, prompt, new, true, case_id)
    check_fields(*found, source=source, path=path)
    return found


# --------------------------------------------------------------------------------------------
# one record


def detect_kind(record: Any) -> Optional[str]:
    """"counterfact" (has "requested_rewrite"), "zsre" (has "src" and one of "answers", "alt",
    "loc"), or None."""
    if isinstance(record, dict):
        if "requested_rewrite" in record:
            return "counterfact"
        if "src" in record and ("answers" in record or "alt" in record or "loc" in record):
            return "zsre"
    return None


def case_id_of(record: dict, index: int) -> Union[int, str]:
    """A CounterFact or zsRE record's case id: its "case_id", else its index."""
    case_id = record.get("case_id")
    return index if case_id is None else case_id


def _counterfact(record: dict, source: str, index: int) -> Rewrite:
    rw = _get(record, "requested_rewrite", source, "counterfact")
    if not isinstance(rw, dict):
        raise RequestError(f"{where(source, 'requested_rewrite')}: must be an object with prompt, subject, "
                           f"target_new, target_true; got {_type_name(rw)}")
    found = _rewrite_at(rw, "requested_rewrite.", source, "counterfact", case_id_of(record, index), need_true=True)
    if rw.get("relation_id") is not None:
        _require_str(rw["relation_id"], where(source, "requested_rewrite.relation_id"), 'the relation, e.g. "P103"')
    for field in _PROMPT_LISTS:
        if record.get(field) is not None:
            _str_list(record[field], source, field)
    refs = record.get("reference_texts")
    if refs is not None:
        if not isinstance(refs, dict):
            raise RequestError(f"{where(source, 'reference_texts')}: must be an object {{object: [texts]}}, "
                               f"got {_type_name(refs)}")
        for key, texts in refs.items():
            _str_list(texts, source, f"reference_texts.{key}")
    return found


def _check_zsre(record: dict, source: str, zsre_target: Optional[str]) -> None:
    _require_str(_get(record, "subject", source, "zsre"), where(source, "subject"), "the subject")
    _require_str(_get(record, "src", source, "zsre"), where(source, "src"), "the question")
    for field in ("rephrase", "loc", "alt", "pred"):
        if record.get(field) is not None:
            _require_str(record[field], where(source, field), "a text, or leave it out", allow_empty=True)
    if "answers" in record:
        answers = record["answers"]
        if isinstance(answers, list) and not answers:
            raise RequestError(f"{where(source, 'answers')}: is an empty list; give at least one answer")
        _str_list(answers, source, "answers")
    if record.get("loc"):
        _require_str(_get(record, "loc_ans", source, "zsre"), where(source, "loc_ans"), "the answer to loc")
    if zsre_target == "answers" or (zsre_target is None and not record.get("alt")):
        _get(record, "answers", source, "zsre")
    if zsre_target == "alt":
        _require_str(_get(record, "alt", source, "zsre"), where(source, "alt"),
                     "the alternative answer (needed with zsre_target='alt')")
    _check_case_id(record.get("case_id"), where(source, "case_id"))


def _zsre(record: dict, source: str, index: int, zsre_target: str) -> Rewrite:
    _check_zsre(record, source, zsre_target)
    subject, question = record["subject"], record["src"]
    if subject not in question:
        raise RequestError(
            f'{where(source, "subject")}: the subject {subject!r} does not occur in "src" {question!r}, so '
            'the prompt cannot be built (prompt = src with the subject replaced by "{}"); fix the subject '
            "or the question so that the subject appears in it verbatim (case and spacing included)"
        )
    prompt = question.replace(subject, "{}", 1)
    if prompt.count("{}") != 1:
        raise RequestError(f'{where(source, "src")}: the question already contains "{{}}"; remove the braces '
                           f"from {question!r}")
    return Rewrite(subject, prompt, *zsre_targets(record, zsre_target), case_id_of(record, index))


def zsre_targets(record: dict, zsre_target: str) -> tuple[str, Optional[str]]:
    """(target_new, target_true) of a checked zsRE record: MEMIT's mapping ("answers":
    answers[0], none) or EasyEdit's ("alt": alt, answers[0] when given)."""
    first = record["answers"][0] if record.get("answers") else None
    return (first, None) if zsre_target == "answers" else (record["alt"], first)


def _check_zsre_target(zsre_target: str) -> None:
    if zsre_target not in ZSRE_TARGETS:
        raise ValueError(f"zsre_target must be 'answers' (MEMIT: target_new = answers[0]) or 'alt' (EasyEdit: "
                         f"target_new = alt); got {zsre_target!r}")


def _need_object(record: Any, source: str, kind: str) -> None:
    if not isinstance(record, dict):
        shape = {"counterfact": "with requested_rewrite", "zsre": "with subject, src, answers"}.get(
            kind, "with subject, prompt, target_new")
        raise RequestError(f"{source}: expected an object {shape}; got {_type_name(record)} {record!r}"[:400])


def rewrite(record: Any, kind: str, source: str, index: int = 0, zsre_target: str = "answers") -> Rewrite:
    """Checks one record of `kind` ("counterfact", "zsre" or "simple"; `source` names it, e.g.
    "file.json, record 3") and returns the edit it asks for."""
    _check_zsre_target(zsre_target)
    _need_object(record, source, kind)
    if kind == "counterfact":
        return _counterfact(record, source, index)
    if kind == "zsre":
        return _zsre(record, source, index, zsre_target)
    return _rewrite_at(record, "", source, "simple", record.get("case_id"), need_true=False)


# --------------------------------------------------------------------------------------------
# lists and files


def check_list(records: Any, source: str) -> list:
    """`records` as a non-empty list, or a RequestError saying what the top level should be."""
    if isinstance(records, dict):
        raise RequestError(f"{source}: the top level is a single object; expected a list of records, e.g. "
                           f"{_LIST_EXAMPLE} — wrap the object in [ ]")
    if not isinstance(records, (list, tuple)):
        raise RequestError(f"{source}: expected a list of records, got {_type_name(records)}")
    if not records:
        raise RequestError(f"{source}: contains no records; give at least one")
    return list(records)


def check_records(records: Any, kind: str = "auto", source: str = "records",
                  zsre_target: Optional[str] = None) -> str:
    """Checks every CounterFact or zsRE record; returns the kind ("auto": by the first record).

    `zsre_target` None accepts a zsRE record with either "answers" or "alt"."""
    if kind not in ("auto",) + KINDS:
        raise ValueError(f"kind must be 'auto', 'counterfact' or 'zsre', got {kind!r}")
    if zsre_target is not None:
        _check_zsre_target(zsre_target)
    records = check_list(records, source)
    if kind == "auto":
        kind = detect_kind(records[0])
        if kind is None:
            raise RequestError(f"{source}, record 0: cannot tell the format: expected a CounterFact record "
                               "(with 'requested_rewrite') or a zsRE record (with 'src', 'answers', 'loc')")
    for i, record in enumerate(records):
        at = f"{source}, record {i}"
        _need_object(record, at, kind)
        if kind == "counterfact":
            _counterfact(record, at, i)
        else:
            _check_zsre(record, at, zsre_target)
    return kind


def read_text(path: Path) -> str:
    """A UTF-8 text file (a byte-order mark is skipped); one-line errors for what is not."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise RequestError(f"{path}: file not found; check the path") from None
    except IsADirectoryError:
        raise RequestError(f"{path}: is a directory; give the path of a .json, .jsonl or .csv file") from None
    except UnicodeDecodeError as err:
        raise RequestError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None


def read_json_list(path: Path, text: Optional[str] = None) -> list:
    """The JSON list in `path` (or in `text`, read from it)."""
    text = read_text(path) if text is None else text
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        hint = ""
        if err.msg.startswith("Extra data") and text.lstrip().startswith("{"):
            hint = " (one object per line? then it is JSON lines: name the file .jsonl or pass fmt='jsonl')"
        raise RequestError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}{hint}; fix the syntax there"
        ) from None
    except RecursionError:
        raise RequestError(f"{path}: the JSON is nested too deeply to read; records are a flat list of objects, e.g. "
                           f"{_LIST_EXAMPLE}") from None
    if isinstance(data, dict):
        raise RequestError(f"{path}: the top level is a JSON object; expected a JSON list of records, e.g. "
                           f"{_LIST_EXAMPLE} — wrap the object in [ ]")
    if not isinstance(data, list):
        raise RequestError(f"{path}: the top level is {_type_name(data)}; expected a JSON list of records")
    return data


def load_records(path: Union[str, Path], kind: str = "auto") -> tuple[str, list[dict]]:
    """A CounterFact or zsRE JSON list, every record checked; returns (kind, records)."""
    records = read_json_list(Path(path))
    return check_records(records, kind, str(path)), records
