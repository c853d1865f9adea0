"""User errors come early and as one line (issue 11, items 6, 7, 10, 11, 12, 13; issue 24): every bad input
is refused before the work it would spoil, with exit code 2, one line on stderr that names the path
or the field, no traceback, and nothing written."""
from __future__ import annotations

import importlib
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest

import massedit.cli as cli
from massedit.editor import MassEditor
from massedit.hparams import HParamsError, load_hparams, preset
from massedit.inputs.requests import EditRequest, RequestError
from massedit.publish import NotWritableError, check_dir, check_file
from tiny import WORDS, make_model, make_tokenizer

REQUESTS = [
    {"subject": "Michael Jordan", "prompt": "The sport of {}", "target_new": "baseball"},
    {"subject": "Lionel Messi", "prompt": "I know the sport of {}", "target_new": "tennis"},
]
TEMPLATES = [["{}"], ["The a of. {}"]]
HPARAMS = {"layers": [1, 2], "v_num_grad_steps": 2, "mom2_n_samples": 20, "mom2_update_weight": 100,
           "clamp_norm_factor": 4.0, "v_weight_decay": 1e-3}
CORPUS = "\n".join(" ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(8)) for i in range(25)) + "\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    model, tok = make_model("gpt2")
    path = tmp_path_factory.mktemp("model") / "tiny-gpt2"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


class Run:
    """Input files of one run under `root`; outputs go to root/out, root/stats, root/metrics.json."""

    def __init__(self, root: Path, model_dir: Path):
        self.root, self.model = root, model_dir
        self.requests = self.write("requests.json", REQUESTS)
        self.hparams = self.write("hparams.json", HPARAMS)
        self.templates = self.write("templates.json", TEMPLATES)
        self.corpus = self.write("corpus.txt", CORPUS)
        self.out, self.stats = root / "out", root / "stats"

    def write(self, name: str, data) -> Path:
        path = self.root / name
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        return path

    def edit(self, *extra) -> list[str]:
        return ["edit", "--model", str(self.model), "--requests", str(self.requests), "--hparams", str(self.hparams),
                "--context-templates", str(self.templates), "--corpus", str(self.corpus), "--stats-dir",
                str(self.stats), "--out", str(self.out), "--quiet", *extra]

    def stats_argv(self, *extra) -> list[str]:
        return ["stats", "--model", str(self.model), "--corpus", str(self.corpus), "--layers", "1,2", "--samples",
                "20", "--stats-dir", str(self.stats), "--quiet", *extra]

    def eval_argv(self, *extra) -> list[str]:
        return ["eval", "--model", str(self.model), "--data", str(self.write("cf.json", _counterfact())), *extra]


def _counterfact() -> list[dict]:
    return [{"case_id": i, "requested_rewrite": {"prompt": r["prompt"], "subject": r["subject"],
                                                 "target_new": {"str": r["target_new"]}, "target_true": {"str": "golf"}}}
            for i, r in enumerate(REQUESTS)]


def _file(run: Run, name: str) -> Path:
    (run.root / name).write_text("a file, not a directory")
    return run.root / name


def _truncated_model(run: Run) -> Path:
    copy = run.root / "truncated-model"
    copy.mkdir()
    for f in run.model.iterdir():
        data = f.read_bytes()
        (copy / f.name).write_bytes(data[: len(data) // 2] if f.name == "model.safetensors" else data)
    return copy


def _hparams(run: Run, **changes) -> str:
    return str(run.write("hparams.json", dict(HPARAMS, **changes)))


# (name, argv from a Run, words the line must contain, words it must not, whether the model may be loaded)
CASES = [
    # item 6: lengths are checked with the requests, before statistics or the z phase
    ("prompt-too-long", lambda r: r.edit("--requests", str(r.write("long.json", [
        dict(REQUESTS[0], prompt="the city of Paris " * 40 + "and {}")]))),
     ["long.json, record 0", 'field "prompt"', "context"], [], True),
    ("target-too-long", lambda r: r.edit("--requests", str(r.write("long.json", [
        dict(REQUESTS[0], target_new="the city of Paris " * 40)]))),
     ["long.json, record 0", 'field "target_new"', "context"], [], True),
    # item 7: output locations are checked before anything is loaded
    ("out-under-a-file", lambda r: r.edit("--out", str(_file(r, "blocker") / "out")),
     ["--out", "blocker", "is a file"], [], False),
    ("stats-dir-is-a-file", lambda r: r.edit("--stats-dir", str(_file(r, "stats-file"))),
     ["--stats-dir", "stats-file", "not a directory"], [], False),
    ("stats-command-stats-dir-is-a-file", lambda r: r.stats_argv("--stats-dir", str(_file(r, "stats-file"))),
     ["--stats-dir", "stats-file", "not a directory"], [], False),
    ("eval-json-is-a-directory", lambda r: r.eval_argv("--json", str(r.root)),
     ["--json", "{root}", "is a directory"], [], False),
    ("truncated-weights", lambda r: r.edit("--model", str(_truncated_model(r))),
     ["truncated-model/model.safetensors", "truncated or corrupt"], [], True),
    ("context-templates-is-a-directory", lambda r: r.edit("--context-templates", str(r.root)),
     ["Is a directory", "{root}"], [], False),
    # item 10: the message blames what is wrong, before statistics are computed
    ("layer-beyond-the-model", lambda r: r.edit("--hparams", _hparams(r, layers=[99], v_loss_layer=3)),
     ['key "layers"', "layer 99 is out of range", "4 layers"], ["v_loss_layer"], True),
    ("v-loss-layer-beyond-the-model", lambda r: r.edit("--hparams", _hparams(r, v_loss_layer=99)),
     ['key "v_loss_layer"', "99 is out of range"], ["fix 'layers'"], True),
    ("stats-layers-flag", lambda r: r.stats_argv("--layers", "1,99"),
     ["layer 99 is out of range", "--layers"], ["hparams"], True),
    ("rewrite-module-is-the-up-projection",
     lambda r: r.edit("--hparams", _hparams(r, rewrite_module_tmp="transformer.h.{}.mlp.c_fc")),
     ["rewrite_module_tmp", "transformer.h.1.mlp.c_fc", "down", "transformer.h.{}.mlp.c_proj"], [], True),
    ("preset-name-is-read-as-a-preset", lambda r: r.edit("--hparams", "gpt2-xl"),
     ['key "layers"', "layer 13 is out of range"], ["file type"], True),
    ("unknown-preset-name", lambda r: r.edit("--hparams", "gpt-j-6bb"),
     ["gpt-j-6bb", "preset", "gpt-j-6b"], [], False),
    # item 11: a special token is not a subject
    ("special-token-subject", lambda r: r.edit("--requests", str(r.write("special.json", [
        {"subject": "<|endoftext|>", "prompt": "The sport of {}", "target_new": "golf"}]))),
     ["special.json, record 0", 'field "subject"', "special token"], [], True),
    # item 13: the corpus and the model path are named
    ("corpus-not-utf8", lambda r: r.stats_argv("--corpus", str(_latin1_corpus(r))),
     ["latin1.txt", "line 3", "UTF-8"], [], True),
    ("mistyped-local-model-path", lambda r: r.edit("--model", str(Path(r.root.name) / "worlds" / "modle")),
     ["worlds/modle", "not found"], [], True),
    # issue 24, item 2: a dataset name is a directory name, never a path
    ("stats-dataset-dotdot", lambda r: r.stats_argv("--dataset", "../x"), ["dataset name", "'../x'", "--dataset"], [],
     False),
    ("stats-dataset-absolute", lambda r: r.stats_argv("--dataset", "/tmp/x"), ["dataset name", "'/tmp/x'"], [], False),
    ("hparams-mom2-dataset-is-a-path", lambda r: r.edit("--hparams", _hparams(r, mom2_dataset="../../../tmp/evil")),
     ["hparams.json", 'key "mom2_dataset"', "path separator"], [], False),
    # issue 24, items 5 and 6: one line naming the file, no traceback
    ("requests-nested-too-deep", lambda r: r.edit("--requests", str(r.write("deep.json", "[" * 100000 + "]" * 100000))),
     ["deep.json", "nested too deeply"], ["RecursionError"], False),
    ("random-bytes-pytorch-model-bin", lambda r: r.edit("--model", str(_model_copy(
        r, "pickled", lambda d: ((d / "model.safetensors").unlink(), (d / "pytorch_model.bin").write_bytes(
            bytes(range(256)) * 40))))),
     ["pickled", "pytorch_model", "not a readable checkpoint"], ["Weights only load failed"], True),
    ("empty-tokenizer-config", lambda r: r.edit("--model", str(_model_copy(
        r, "empty-tok", lambda d: (d / "tokenizer_config.json").write_text("")))),
     ["empty-tok/tokenizer_config.json", "not valid JSON"], [], True),
    ("world-build-zero-steps", lambda r: ["world", "build", "--out", str(r.root / "w"), "--quick", "--steps", "0"],
     ["--steps must be at least 1"], [], False),
    ("ledger-json-is-a-list", lambda r: ["ledger", "list", "--ledger", str(_ledger_dir(r, "[]"))],
     ["ledger.json", "JSON list, not an object"], [], False),
    ("ledger-json-without-fields", lambda r: ["ledger", "list", "--ledger", str(_ledger_dir(r, "{}"))],
     ["ledger.json", "field 'method'"], [], False),
]


def _model_copy(run: Run, name: str, change) -> Path:
    copy = run.root / name
    shutil.copytree(run.model, copy)
    change(copy)
    return copy


def _ledger_dir(run: Run, header: str) -> Path:
    ledger = run.root / "ledger"
    ledger.mkdir()
    (ledger / "ledger.json").write_text(header)
    return ledger


def _latin1_corpus(run: Run) -> Path:
    path = run.root / "latin1.txt"
    lines = CORPUS.splitlines(keepends=True)
    path.write_bytes("".join(lines[:2]).encode() + "Dani\u00e8le Darrieux parle fran\u00e7ais\n".encode("latin-1"))
    return path


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*"))}


def _no_model_loading(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    for name in ("edit", "eval", "stats"):
        monkeypatch.setattr(importlib.import_module(f"massedit.commands.{name}"), "load_model", refuse)


@pytest.mark.parametrize("name, argv, needles, absent, loads_model", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_early_line_and_writes_nothing(name, argv, needles, absent, loads_model, model_dir, tmp_path,
                                                         capsys, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # relative paths (the mistyped model) resolve beside tmp_path
    run = Run(tmp_path, model_dir)
    args = argv(run)
    if not loads_model:
        _no_model_loading(monkeypatch)
    before = _tree(tmp_path)
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"massedit {args[0]}: error: "), lines[0]
    for needle in needles:
        assert needle.replace("{root}", str(tmp_path)) in lines[0], (needle, lines[0])
    for word in absent:
        assert word not in lines[0], (word, lines[0])
    assert _tree(tmp_path) == before  # nothing written: no output, no statistics, no checkpoint


def test_unknown_model_path_never_reaches_the_hub(tmp_path, monkeypatch):
    """A path that looks local fails at once; a hub id ("org/name") is still passed to transformers."""
    from massedit.model.loading import check_local_model, looks_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "worlds").mkdir()
    for name in ("worlds/modle", "./modle", "runs/a/model", "~/no-such-model"):
        assert looks_local(name), name
        with pytest.raises(FileNotFoundError, match="not found or has no config.json"):
            check_local_model(name)
    for name in ("gpt2", "EleutherAI/gpt-j-6B"):
        assert not looks_local(name), name
        check_local_model(name)


def test_os_errors_name_the_path(monkeypatch, capsys):
    """Any OSError the user can cause (a full disk, a read-only file) is one line with its path."""
    eval_cmd = importlib.import_module("massedit.commands.eval")

    def fail(_args):
        raise PermissionError(13, "Permission denied", "runs/metrics.json")

    monkeypatch.setattr(eval_cmd, "run", fail)
    assert cli.main(["eval", "--model", "m", "--data", "d.json"]) == 2
    assert capsys.readouterr().err == "massedit eval: error: Permission denied: runs/metrics.json\n"


@pytest.mark.parametrize("argv, line", [
    (["edit", "--model", "m", "--requests", "r.json", "--out", "o", "--bogus"],
     "massedit edit: error: unrecognized arguments: --bogus (see massedit edit --help)"),
    (["edit", "--model", "m", "--requests", "r.json", "--out", "o", "--method", "nope"],
     "massedit edit: error: argument --method: invalid choice: 'nope'"),
    (["ledger", "lst"], "massedit ledger: error: argument ACTION: invalid choice: 'lst'"),
    (["world", "build", "--out", "w", "--bogus"], "massedit world build: error: unrecognized arguments: --bogus"),
    (["edit"], "massedit edit: error: the following arguments are required: --model, --requests, --out"),
])
def test_usage_mistakes_are_one_line_naming_the_command(argv, line, capsys):
    """argparse prints the whole usage block before its error, and reports unknown flags as the
    top-level command's: the mistake gets one line naming the subcommand, like any other error."""
    with pytest.raises(SystemExit) as exit_info:
        code = cli.main(argv)
        raise SystemExit(code)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line), err


def test_writability_checks(tmp_path, monkeypatch):
    check_dir(tmp_path / "new" / "deeper", "--out")
    check_file(tmp_path / "new" / "metrics.json", "--json")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotWritableError, match="--out .*is a file"):
        check_dir(tmp_path / "f" / "out", "--out")
    with pytest.raises(NotWritableError, match="--json .*is a directory"):
        check_file(tmp_path, "--json")
    # os.access is what a read-only location answers (root passes every permission check, so it is simulated)
    monkeypatch.setattr(os, "access", lambda *_a: False)
    with pytest.raises(NotWritableError, match=f"--stats-dir .*{tmp_path.name} is not writable"):
        check_dir(tmp_path / "stats", "--stats-dir")
    with pytest.raises(NotWritableError, match="not writable"):
        check_file(tmp_path / "f", "--json")


def test_hparams_preset_names():
    assert load_hparams("gpt-j-6b") == preset("gpt-j-6b")
    assert load_hparams("EleutherAI/gpt-j-6B") == preset("gpt-j-6b")
    with pytest.raises(HParamsError, match="not found"):
        load_hparams("my-hparams.json")  # a file name is a file, even when it resembles a preset


# ----------------------------------------------------------------------------- API (item 11)


@pytest.fixture(scope="module")
def editor_parts():
    tok = make_tokenizer("bpe")
    model, _ = make_model("gpt2", tok)
    return model, tok


def _editor(editor_parts, tmp_path, **hparams):
    from massedit.hparams import MEMITHyperParams

    model, tok = editor_parts
    hp = MEMITHyperParams(**dict(HPARAMS, **hparams))
    return MassEditor(model, tok, hp, stats_dir=tmp_path / "stats", corpus=CORPUS.splitlines(),
                      context_templates=TEMPLATES, progress=False)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True, "8"])
def test_api_batch_size_is_checked(batch_size, editor_parts, tmp_path):
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        _editor(editor_parts, tmp_path).edit(REQUESTS, batch_size=batch_size)
    assert not (tmp_path / "stats").exists()


@pytest.mark.parametrize("requests, words", [
    (None, ["NoneType", "list"]),
    (REQUESTS[0], ["dict", "wrap a single request in a list"]),
    (EditRequest("Michael Jordan", "The sport of {}", "golf"), ["EditRequest", "wrap"]),
    ("requests.json", ["str", "list"]),
    ([], ["empty"]),
])
def test_api_requests_must_be_a_list(requests, words, editor_parts, tmp_path):
    with pytest.raises(RequestError) as err:
        _editor(editor_parts, tmp_path).edit(requests)
    for w in words:
        assert w in str(err.value), str(err.value)
    assert not (tmp_path / "stats").exists()


@pytest.mark.parametrize("subject", ["<|endoftext|>", "Jordan<|endoftext|>"])
def test_api_special_token_subject_is_refused(subject, editor_parts, tmp_path):
    with pytest.raises(RequestError, match='record 0, field "subject".*special token'):
        _editor(editor_parts, tmp_path).edit([{"subject": subject, "prompt": "{} plays", "target_new": "golf"}])


def test_api_over_long_request_is_refused_before_statistics(editor_parts, tmp_path):
    long = {"subject": "Michael Jordan", "prompt": "the city of Paris " * 40 + "and {}", "target_new": "golf"}
    with pytest.raises(RequestError, match='record 1, field "prompt".*context'):
        _editor(editor_parts, tmp_path).edit([REQUESTS[0], long])
    assert not (tmp_path / "stats").exists()


def test_longest_accepted_request_runs(editor_parts, tmp_path):
    """The length limit is not too loose: the longest request it lets through goes through the z phase."""
    editor = _editor(editor_parts, tmp_path)

    def request(k):
        return {"subject": "Michael Jordan", "prompt": "the city " * k + "and {}", "target_new": "golf tennis"}

    accepted = []
    for k in range(1, 100):
        try:
            accepted = editor.validate([request(k)])
        except RequestError:
            break
    assert accepted and k < 99
    with pytest.warns(UserWarning, match="did not converge"):
        assert editor.edit(accepted, apply=False).n_edits == 1


def test_not_converged_requests_are_reported(editor_parts, tmp_path):
    """Two steps cannot teach a random model anything: every request ends far above the early stop."""
    with pytest.warns(UserWarning, match="2 of 2 request.s. did not converge"):
        result = _editor(editor_parts, tmp_path).edit(REQUESTS, apply=False)
    report = result.report()["z_loss"]
    assert report["not_converged"] == 2 and report["not_converged_above"] == 1.0
    assert report["max"] > report["not_converged_above"]
    # with an early stop that high every request stops at once, converged
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = _editor(editor_parts, tmp_path, z_early_stop_loss=50.0).edit(REQUESTS, apply=False)
    assert result.report()["z_loss"]["not_converged"] == 0


def test_cli_reports_not_converged_on_stderr_and_in_the_report(model_dir, tmp_path, capsys):
    run = Run(tmp_path, model_dir)
    assert cli.main(run.edit()) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("Loading weights")]
    assert [line for line in err if "did not converge" in line] == [
        line for line in err if line.startswith("massedit edit: warning: 2 of 2 request(s) did not converge")], err
    assert len(err) == 1, err
    assert json.loads((run.out / "report.json").read_text())["z_loss"]["not_converged"] == 2


# ----------------------------------------------------------------------------- item 12


def test_edit_eval_without_paraphrase_or_neighborhood_prompts(model_dir, tmp_path, capsys):
    """Plain CounterFact requested_rewrite records: metrics that need other prompts show as n/a."""
    run = Run(tmp_path, model_dir)
    run.requests = run.write("cf.json", _counterfact())
    assert cli.main(run.edit("--eval")) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "PS n/a -> n/a" in out and "NS n/a -> n/a" in out, out
    metrics = json.loads((run.out / "report.json").read_text())["metrics"]
    assert metrics["pre"]["PS"] is None and metrics["post"]["ES"] is not None
