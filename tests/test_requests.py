"""Request loading (CounterFact, zsRE, simple JSON / JSONL / CSV) and batch validation."""
import json
import warnings

import pytest

import massedit.inputs.tokens as tokens
from massedit.inputs.records import case_id_of, load_records
from massedit.inputs.requests import EditRequest, RequestError, load_requests, parse_records, validate_requests
from tiny import make_tokenizer

CF = [
    {
        "case_id": 0,
        "requested_rewrite": {
            "prompt": "The mother tongue of {} is",
            "relation_id": "P103",
            "target_new": {"str": "English", "id": "Q1860"},
            "target_true": {"str": "French", "id": "Q150"},
            "subject": "Danielle Darrieux",
        },
        "paraphrase_prompts": ["a", "b"],
        "neighborhood_prompts": ["c"],
    },
    {
        "case_id": 7,
        "requested_rewrite": {
            "prompt": "{} plays the sport of",
            "target_new": {"str": "baseball"},
            "target_true": {"str": "basketball"},
            "subject": "Michael Jordan",
        },
    },
]

ZSRE = [
    {
        "subject": "Watts Humphrey",
        "src": "What university did Watts Humphrey attend?",
        "pred": "Trinity College",
        "rephrase": "What university did Watts Humphrey take part in?",
        "alt": "University of Michigan",
        "answers": ["Illinois Institute of Technology"],
        "loc": "nq question: who played desmond doss father in hacksaw ridge",
        "loc_ans": "Hugo Weaving",
        "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?",
    }
]


def write(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return p


def assert_names(err, *parts):
    msg = str(err.value)
    for part in parts:
        assert part in msg, f"{part!r} not in {msg!r}"


# ------------------------------------------------------------------------------------ loaders


def test_counterfact(tmp_path):
    p = write(tmp_path, "cf.json", CF)
    reqs = load_requests(p)
    assert reqs[0] == EditRequest(
        "Danielle Darrieux", "The mother tongue of {} is", "English", "French", 0, f"{p}, record 0"
    )
    assert reqs[1].case_id == 7 and reqs[1].target_new == "baseball" and reqs[1].target_true == "basketball"
    assert reqs[0].text() == "The mother tongue of Danielle Darrieux is"
    assert load_requests(p, fmt="counterfact") == reqs


def test_zsre_both_mappings(tmp_path):
    p = write(tmp_path, "zsre_mend_eval.json", ZSRE)
    (memit,) = load_requests(p)
    assert memit.prompt == "What university did {} attend?"
    assert memit.subject == "Watts Humphrey"
    assert memit.target_new == "Illinois Institute of Technology" and memit.target_true is None
    assert memit.case_id == 0
    (easy,) = load_requests(p, zsre_target="alt")
    assert easy.target_new == "University of Michigan" and easy.target_true == "Illinois Institute of Technology"
    with pytest.raises(ValueError, match="zsre_target"):
        load_requests(p, zsre_target="pred")


def test_zsre_subject_missing_from_src(tmp_path):
    bad = [dict(ZSRE[0], subject="Watts Hunphrey")]
    p = write(tmp_path, "z.json", bad)
    with pytest.raises(RequestError) as err:
        load_requests(p)
    assert_names(err, "z.json", "record 0", '"subject"', "does not occur", "src")


def test_zsre_subject_twice_replaces_first():
    rec = dict(ZSRE[0], src="Watts Humphrey and Watts Humphrey?")
    (r,) = parse_records([rec], "mem")
    assert r.prompt == "{} and Watts Humphrey?" and r.text() == rec["src"]


def test_requests_and_evaluation_read_records_by_one_schema(tmp_path):
    """massedit.inputs.records: the edit and the evaluation accept and refuse the same records."""
    # a zsRE record without "answers" is zsRE still; EasyEdit's mapping edits it toward "alt"
    p = write(tmp_path, "alt.json", [{k: v for k, v in ZSRE[0].items() if k != "answers"}])
    (req,) = load_requests(p, zsre_target="alt")
    assert req.target_new == "University of Michigan" and req.target_true is None
    assert load_records(p)[0] == "zsre"
    # a CounterFact record without case_id is numbered by its index, as evaluation numbers it
    cf = json.loads(json.dumps(CF))
    del cf[1]["case_id"]
    assert load_requests(write(tmp_path, "ids.json", cf))[1].case_id == 1 == case_id_of(cf[1], 1)
    # malformed records: the same one-line error from both
    for field, change in (("neighborhood_prompts[1]", lambda r: r.__setitem__("neighborhood_prompts", ["a", 7])),
                          ("requested_rewrite.target_true", lambda r: r["requested_rewrite"].pop("target_true"))):
        cf = json.loads(json.dumps(CF))
        change(cf[1])
        p = write(tmp_path, "bad.json", cf)
        with pytest.raises(RequestError) as edit_err:
            load_requests(p)
        with pytest.raises(RequestError) as eval_err:
            load_records(p)
        assert str(edit_err.value) == str(eval_err.value)
        assert_names(edit_err, "bad.json", "record 1", f'field "{field}"')


def test_simple_json_jsonl_csv(tmp_path):
    recs = [
        {"subject": "Michael Jordan", "prompt": "{} plays the sport of", "target_new": "baseball"},
        {"subject": "Lionel Messi", "prompt": "{} plays for", "target_new": {"str": "Nokia"},
         "target_true": "Barcelona", "case_id": "m1", "note": "unknown keys are fine"},
    ]
    a = load_requests(write(tmp_path, "r.json", recs))
    lines = "\n".join(json.dumps(r) for r in recs) + "\n\n"
    b = load_requests(write(tmp_path, "r.jsonl", lines))
    csv_text = (
        "subject,prompt,target_new,target_true,case_id,extra\n"
        "Michael Jordan,{} plays the sport of,baseball,,,x\n"
        'Lionel Messi,"{} plays for",Nokia,Barcelona,m1,\n'
        '"Smith, John",{} works for,Sony,,12,\n'
    )
    c = load_requests(write(tmp_path, "r.csv", csv_text))
    for reqs in (a, b, c):
        assert [r.subject for r in reqs[:2]] == ["Michael Jordan", "Lionel Messi"]
        assert reqs[1].target_new == "Nokia" and reqs[1].target_true == "Barcelona" and reqs[1].case_id == "m1"
        assert reqs[0].target_true is None and reqs[0].case_id is None
    assert c[2].subject == "Smith, John" and c[2].case_id == 12
    assert b[1].source.endswith("record 1 (line 2)") and c[1].source.endswith("record 1 (line 3)")
    # forced containers: a JSON-lines file with another extension
    assert load_requests(write(tmp_path, "r.txt", lines), fmt="jsonl") == [
        EditRequest(r.subject, r.prompt, r.target_new, r.target_true, r.case_id, r.source.replace("r.jsonl", "r.txt"))
        for r in b
    ]


def test_parse_records_in_memory():
    reqs = parse_records(CF, "mem")
    assert reqs[1].source == "mem, record 1" and reqs[1].subject == "Michael Jordan"
    with pytest.raises(RequestError, match="single object"):
        parse_records(CF[0], "mem")


# ------------------------------------------------------------------------------------ errors


def test_file_errors(tmp_path):
    with pytest.raises(RequestError) as err:
        load_requests(tmp_path / "nope.json")
    assert_names(err, "nope.json", "not found")

    p = write(tmp_path, "broken.json", '[\n  {"subject": "a",\n   "prompt": "{} x" "target_new": "b"}\n]')
    with pytest.raises(RequestError) as err:
        load_requests(p)
    assert_names(err, "broken.json", "invalid JSON", "line 3", "column")

    p = write(tmp_path, "obj.json", {"subject": "a", "prompt": "{} x", "target_new": "b"})
    with pytest.raises(RequestError) as err:
        load_requests(p)
    assert_names(err, "obj.json", "JSON object", "list")

    p = write(tmp_path, "lines.json", '{"a": 1}\n{"a": 2}\n')
    with pytest.raises(RequestError) as err:
        load_requests(p)
    assert_names(err, "lines.json", ".jsonl")

    p = write(tmp_path, "empty.json", "[]")
    with pytest.raises(RequestError) as err:
        load_requests(p)
    assert_names(err, "empty.json", "no records")

    p = write(tmp_path, "bad.jsonl", '{"subject": "a", "prompt": "{} x", "target_new": "b"}\n{"subject": \n')
    with pytest.raises(RequestError) as err:
        load_requests(p)
    assert_names(err, "bad.jsonl", "line 2", "record 1", "invalid JSON")

    p = write(tmp_path, "nohdr.csv", "subject,target_new\nA,b\n")
    with pytest.raises(RequestError) as err:
        load_requests(p)
    assert_names(err, "nohdr.csv", "header", '"prompt"', "missing column")

    p = write(tmp_path, "cells.csv", "subject,prompt,target_new\nA,{} x,b,extra\n")
    with pytest.raises(RequestError) as err:
        load_requests(p)
    assert_names(err, "cells.csv", "record 0", "line 2", "more cells")


GOOD = {"subject": "Michael Jordan", "prompt": "{} plays the sport of", "target_new": "baseball"}


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"prompt": "Michael Jordan plays the sport of"}, "prompt", ['exactly one "{}"', "found 0", "replace it"]),
        ({"prompt": "{} plays {} the sport of"}, "prompt", ['exactly one "{}"', "found 2"]),
        ({"prompt": "{0} plays"}, "prompt", ["found 0", '"{0}"']),
        ({"subject": "   "}, "subject", ["empty"]),
        ({"target_new": " "}, "target_new", ["empty"]),
        ({"target_new": {"id": "Q1"}}, "target_new", ['"str"']),
        ({"target_new": {"str": ""}}, "target_new.str", ["empty"]),
        ({"target_new": 5}, "target_new", ["must be a string"]),
        ({"subject": ["a"]}, "subject", ["must be a string", "list"]),
        ({"target_true": 3}, "target_true", ["must be a string"]),
        ({"case_id": 1.5}, "case_id", ["integer or a string"]),
        ({"case_id": True}, "case_id", ["integer or a string"]),
    ],
)
def test_field_errors(tmp_path, change, field, words):
    recs = [GOOD, GOOD, dict(GOOD, **change)]
    p = write(tmp_path, "requests.json", recs)
    with pytest.raises(RequestError) as err:
        load_requests(p)
    assert_names(err, "requests.json", "record 2", f'field "{field}"', *words)


def test_missing_fields(tmp_path):
    rec = dict(GOOD)
    del rec["target_new"]
    with pytest.raises(RequestError) as err:
        load_requests(write(tmp_path, "requests.json", [GOOD, rec]))
    assert_names(err, "requests.json", "record 1", 'field "target_new"', "missing")

    cf = json.loads(json.dumps(CF))
    del cf[1]["requested_rewrite"]["subject"]
    with pytest.raises(RequestError) as err:
        load_requests(write(tmp_path, "cf.json", cf))
    assert_names(err, "cf.json", "record 1", 'field "requested_rewrite.subject"', "missing")

    cf = json.loads(json.dumps(CF))
    cf[0]["requested_rewrite"]["prompt"] = "The mother tongue of is"
    with pytest.raises(RequestError) as err:
        load_requests(write(tmp_path, "cf2.json", cf))
    assert_names(err, "cf2.json", "record 0", 'field "requested_rewrite.prompt"', "found 0")

    with pytest.raises(RequestError) as err:
        load_requests(write(tmp_path, "notobj.json", [GOOD, "oops"]))
    assert_names(err, "notobj.json", "record 1", "expected an object")


# ------------------------------------------------------------------------------------ validation


def test_conflict_names_both_records(tmp_path):
    recs = [GOOD, dict(GOOD, subject="Lionel Messi"), dict(GOOD, target_new="golf")]
    reqs = load_requests(write(tmp_path, "batch.json", recs))
    with pytest.raises(RequestError) as err:
        validate_requests(reqs)
    assert_names(err, "batch.json, record 0", "batch.json, record 2", "'baseball'", "'golf'", "Eqn. 5")


def test_duplicates_merged_with_warning(tmp_path):
    recs = [GOOD, dict(GOOD, subject="Lionel Messi"), dict(GOOD, target_new=" baseball"), GOOD]
    reqs = load_requests(write(tmp_path, "dups.json", recs))
    with pytest.warns(UserWarning) as rec:
        out = validate_requests(reqs)
    assert out == reqs[:2]
    msg = str(rec[0].message)
    assert "2 duplicate" in msg and "dups.json, record 2" in msg and "dups.json, record 3" in msg
    assert "dups.json, record 0" in msg


def test_validate_plain_and_empty():
    reqs = [EditRequest("Michael Jordan", "{} plays", "golf"), EditRequest("Lionel Messi", "{} plays", "golf")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert validate_requests(reqs) == reqs
    with pytest.raises(RequestError, match="empty"):
        validate_requests([])
    with pytest.raises(RequestError) as err:
        validate_requests([EditRequest("A", "no marker", "b", source="mine.json, record 4")])
    assert_names(err, "mine.json, record 4", 'field "prompt"', "found 0")


@pytest.mark.parametrize("style", ["bpe", "sentencepiece"])
def test_tokenizer_check(style, tmp_path, monkeypatch):
    tok = make_tokenizer(style)
    reqs = load_requests(write(tmp_path, "tok.json", [GOOD, dict(GOOD, subject="Lionel Messi", prompt="Hello {}, plays")]))
    assert validate_requests(reqs, tok) == reqs  # locatable with both tokenizers

    real = tokens.subject_last_index

    def fail_for_messi(tok_, text, start, end):
        if text[start:end] == "Lionel Messi":
            raise tokens.SubjectNotFoundError(f"cannot locate the subject {text[start:end]!r} in {text!r}")
        return real(tok_, text, start, end)

    monkeypatch.setattr(tokens, "subject_last_index", fail_for_messi)
    with pytest.raises(RequestError) as err:
        validate_requests(reqs, tok)
    assert_names(err, "tok.json, record 1", 'field "subject"', "cannot locate", "Lionel Messi")


@pytest.mark.parametrize("field, says", [("subject", 'give the subject, e.g. "Michael Jordan"'),
                                          ("target_new", 'give the new object, e.g. "baseball"')])
def test_empty_field_message_reads_as_a_sentence(field, says):
    record = {"subject": "Michael Jordan", "prompt": "{} plays", "target_new": "baseball"} | {field: " "}
    with pytest.raises(RequestError) as info:
        parse_records([record], "r.json")
    assert f'field "{field}": is empty; {says}' in str(info.value)
