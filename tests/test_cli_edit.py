"""`massedit edit` and `massedit stats` end to end, on every registry architecture, and their
error paths (exit code 2, one line on stderr)."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import massedit.cli as cli
import massedit.compute.stats as stats_mod
from massedit.edits.delta import EditDelta
from massedit.hparams import MEMITHyperParams
from massedit.inputs.tokens import fill, target_ids
from tiny import MODEL_TYPES, WORDS, make_model, make_tokenizer

# Random tiny models barely let δ at the subject token reach a later answer position (one block
# after layer 2, near-uniform attention: the target's log-prob moves by ~0.01), so the prompts end
# with the subject: the answer is read at the subject token itself. GPT-J's v_weight_decay 0.5 is
# divided by ‖h‖² ≈ 0.01–0.05 in these models and swamps the NLL: use the Llama value 1e-3. With
# these settings every architecture raises each target's log-prob by ~0.4–0.7 nats in 8 steps.
REQUESTS = [
    {"subject": "Michael Jordan", "prompt": "The sport of {}", "target_new": "baseball"},
    {"subject": "Lionel Messi", "prompt": "I know the sport of {}", "target_new": "tennis"},
    {"subject": "Marie Curie", "prompt": "The native language of {}", "target_new": "Spanish"},
]
TEMPLATES = [["{}"], ["The a of. {}", "I you it. {}"]]
N_DOCS = 30
HPARAMS = {"layers": [1, 2], "v_num_grad_steps": 8, "mom2_n_samples": N_DOCS, "mom2_update_weight": 100,
           "clamp_norm_factor": 4.0, "v_weight_decay": 1e-3}
MIN_GAIN = 0.1  # nats

# engine/commands/world.py is written by someone else; load only the subcommands that import.
_REQUIRED = ("stats", "edit")


@pytest.fixture(autouse=True)
def _importable_commands(monkeypatch):
    present = []
    for name in cli.COMMANDS:
        try:
            importlib.import_module(f"massedit.commands.{name}")
        except Exception:  # noqa: BLE001 - a module being written may fail in any way
            if name in _REQUIRED:
                raise
            continue
        present.append(name)
    monkeypatch.setattr(cli, "COMMANDS", tuple(present))


def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _corpus_text() -> str:
    lines = [" ".join(WORDS[(5 * i + j * (i % 7 + 1)) % len(WORDS)] for j in range(6 + (7 * i) % 25))
             for i in range(N_DOCS + 5)]
    return "\n".join(lines) + "\n"


def _save_model(kind: str, root: Path) -> Path:
    model, tok = make_model(kind)
    path = root / f"tiny-{kind}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


class Files:
    def __init__(self, root: Path, hparams=None, requests=None):
        self.root = root
        self.requests = _write(root / "requests.json", REQUESTS if requests is None else requests)
        self.corpus = _write(root / "corpus.txt", _corpus_text())
        self.templates = _write(root / "templates.json", TEMPLATES)
        self.hparams = _write(root / "hparams.json", HPARAMS if hparams is None else hparams)
        self.stats = root / "stats"
        self.out = root / "out"


def _edit_argv(model_dir, files: Files, *extra, corpus=True) -> list[str]:
    argv = ["edit", "--model", str(model_dir), "--requests", str(files.requests), "--stats-dir", str(files.stats),
            "--out", str(files.out), "--quiet", "--context-templates", str(files.templates),
            "--hparams", str(files.hparams)]
    if corpus:
        argv += ["--corpus", str(files.corpus)]
    return argv + list(extra)


@torch.no_grad()
def _target_logprobs(model_dir: Path) -> list[float]:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for r in REQUESTS:
        text = fill(r["prompt"], r["subject"])[0]
        prompt_ids = list(tok(text)["input_ids"])
        tids = target_ids(tok, text, r["target_new"])
        logp = model(input_ids=torch.tensor([prompt_ids + tids])).logits[0].float().log_softmax(-1)
        out.append(sum(float(logp[len(prompt_ids) - 1 + t, tid]) for t, tid in enumerate(tids)))
    return out


@pytest.mark.parametrize("kind", MODEL_TYPES)
def test_edit_cli_every_architecture(kind, tmp_path, capsys):
    model_dir = _save_model(kind, tmp_path)
    files = Files(tmp_path)
    code = cli.main(_edit_argv(model_dir, files))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = files.out
    assert (out / "config.json").is_file()
    assert list(out.glob("*.safetensors")) and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    assert (out / "delta.safetensors").is_file()
    report = json.loads((out / "report.json").read_text())
    assert report["n_edits"] == 3 and report["method"] == "memit"
    assert {"context_templates", "z", "keys", "covariance", "solve", "total"} <= set(report["timings"])
    assert all(v >= 0 for v in report["timings"].values())
    assert set(report["z_loss"]) >= {"mean", "max"} and report["z_loss"]["max"] >= report["z_loss"]["mean"]
    assert MEMITHyperParams.from_dict(report["hparams"]).layers == [1, 2]  # a rerun can take them as they are
    delta = EditDelta.load(out / "delta.safetensors")
    assert delta.is_applied(AutoModelForCausalLM.from_pretrained(out)) and delta.metadata["n_requests"] == 3 and delta.metadata["layers"] == [1, 2]
    assert delta.metadata["model_type"] == kind

    before, after = _target_logprobs(model_dir), _target_logprobs(out)
    assert all(a > b + MIN_GAIN for a, b in zip(after, before)), (before, after)


def test_saved_delta_reverts_and_reproduces_the_saved_model(tmp_path):
    model_dir = _save_model("gpt2", tmp_path)
    files = Files(tmp_path)
    assert cli.main(_edit_argv(model_dir, files)) == 0
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    edited = AutoModelForCausalLM.from_pretrained(files.out)
    saved = EditDelta.load(files.out / "delta.safetensors")
    assert saved.is_applied(edited)  # its apply record matches the saved model: it reverts it exactly
    saved.revert(edited)
    for (name, a), (_, b) in zip(original.state_dict().items(), edited.state_dict().items()):
        assert torch.equal(a, b), name
    # and its factors, applied afresh to the original model, give the saved model's weights
    EditDelta(saved.weights, saved.metadata).apply(original)
    edited = AutoModelForCausalLM.from_pretrained(files.out)
    for (name, a), (_, b) in zip(original.state_dict().items(), edited.state_dict().items()):
        assert torch.equal(a, b), name


def test_stats_cli_then_edit_reuses_statistics(tmp_path, monkeypatch, capsys):
    model_dir = _save_model("gpt2", tmp_path)
    files = Files(tmp_path)
    code = cli.main(["stats", "--model", str(model_dir), "--corpus", str(files.corpus), "--layers", "2,1",
                     "--samples", str(N_DOCS), "--stats-dir", str(files.stats), "--quiet"])
    assert code == 0, capsys.readouterr().err
    paths = {l: files.stats / model_dir.name / "wikipedia_stats" / f"transformer.h.{l}.mlp.c_proj_float32_mom2_{N_DOCS}.npz"
             for l in (1, 2)}
    for path in paths.values():
        assert path.is_file()
        with np.load(path, allow_pickle=False) as data:
            assert {"mom2.mom2", "mom2.count", "sample_size", "mom2.constructor"} <= set(data.files)
            assert data["mom2.mom2"].shape == (64, 64) and int(data["sample_size"]) == N_DOCS
            assert int(data["mom2.count"]) > 0
    mtimes = {l: p.stat().st_mtime_ns for l, p in paths.items()}

    def no_recompute(*_a, **_k):
        raise AssertionError("statistics recomputed although `massedit stats` wrote them")

    monkeypatch.setattr(stats_mod, "second_moments", no_recompute)
    code = cli.main(_edit_argv(model_dir, files, corpus=False))
    assert code == 0, capsys.readouterr().err
    assert {l: p.stat().st_mtime_ns for l, p in paths.items()} == mtimes
    assert json.loads((files.out / "report.json").read_text())["n_edits"] == 3

    # a second `stats` run finds the files and computes nothing
    capsys.readouterr()
    code = cli.main(["stats", "--model", str(model_dir), "--corpus", str(files.corpus), "--layers", "1,2",
                     "--samples", str(N_DOCS), "--stats-dir", str(files.stats), "--quiet", "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["computed_layers"] == []


def test_memit_serial_through_cli(tmp_path, capsys):
    model_dir = _save_model("gpt2", tmp_path)
    files = Files(tmp_path)
    code = cli.main(_edit_argv(model_dir, files, "--method", "memit-serial"))
    assert code == 0, capsys.readouterr().err
    report = json.loads((files.out / "report.json").read_text())
    assert report["method"] == "memit-serial" and report["n_edits"] == 3
    assert EditDelta.load(files.out / "delta.safetensors").metadata["method"] == "memit-serial"
    before, after = _target_logprobs(model_dir), _target_logprobs(files.out)
    assert all(a > b + MIN_GAIN for a, b in zip(after, before)), (before, after)


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return _save_model("gpt2", tmp_path_factory.mktemp("model"))


def _is_loading_bar(line: str) -> bool:
    # transformers 5's weight-loading tqdm bar; see test_quiet_run_prints_nothing_but_the_error
    return line.startswith("Loading weights")


def _one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not _is_loading_bar(line)]
    assert len(lines) == 1, err  # one line: no traceback, no multi-line message
    assert lines[0].startswith("massedit edit: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def test_error_missing_requests_file(gpt2_dir, tmp_path, capsys):
    files = Files(tmp_path)
    files.requests = tmp_path / "no-such-requests.json"
    assert cli.main(_edit_argv(gpt2_dir, files)) == 2
    _one_line_error(capsys, "no-such-requests.json", "not found")
    assert not files.out.exists()


def test_error_bad_json(gpt2_dir, tmp_path, capsys):
    files = Files(tmp_path, requests='[{"subject": "Michael Jordan", "prompt": "{} plays",')
    assert cli.main(_edit_argv(gpt2_dir, files)) == 2
    _one_line_error(capsys, "requests.json", "invalid JSON", "line 1")
    assert not files.out.exists()


def test_error_conflicting_requests(gpt2_dir, tmp_path, capsys):
    conflicting = [REQUESTS[0], REQUESTS[2], dict(REQUESTS[0], target_new="golf")]
    files = Files(tmp_path, requests=conflicting)
    assert cli.main(_edit_argv(gpt2_dir, files)) == 2
    line = _one_line_error(capsys, "conflicting", "'baseball'", "'golf'")
    assert "record 0" in line and "record 2" in line, line
    assert not files.out.exists()


def test_error_missing_statistics_without_corpus(gpt2_dir, tmp_path, capsys):
    files = Files(tmp_path)
    assert cli.main(_edit_argv(gpt2_dir, files, corpus=False)) == 2
    _one_line_error(capsys, "statistics", "--corpus")
    assert not files.out.exists()


def test_error_non_empty_out_without_force(gpt2_dir, tmp_path, capsys):
    files = Files(tmp_path)
    files.out.mkdir()
    (files.out / "keep.txt").write_text("do not overwrite")
    assert cli.main(_edit_argv(gpt2_dir, files)) == 2
    _one_line_error(capsys, "not empty", "--force")
    assert sorted(p.name for p in files.out.iterdir()) == ["keep.txt"]
    # with --force it writes
    assert cli.main(_edit_argv(gpt2_dir, files, "--force")) == 0
    assert (files.out / "report.json").is_file() and (files.out / "keep.txt").read_text() == "do not overwrite"


def test_error_unknown_hparams_key(gpt2_dir, tmp_path, capsys):
    files = Files(tmp_path, hparams=dict(HPARAMS, v_num_grad_stepz=3))
    assert cli.main(_edit_argv(gpt2_dir, files)) == 2
    _one_line_error(capsys, "v_num_grad_stepz", "v_num_grad_steps", "hparams.json")
    assert not files.out.exists()


def test_error_layer_out_of_range(gpt2_dir, tmp_path, capsys):
    files = Files(tmp_path, hparams=dict(HPARAMS, layers=[2, 9]))
    assert cli.main(_edit_argv(gpt2_dir, files)) == 2
    _one_line_error(capsys, "layer 9", "out of range", "4 layers")
    assert not files.out.exists()
    assert not files.stats.exists()  # nothing computed for a run that cannot succeed


def test_error_unknown_model_directory(tmp_path, capsys):
    files = Files(tmp_path)
    missing = tmp_path / "no-such-model"
    assert cli.main(_edit_argv(missing, files)) == 2
    _one_line_error(capsys, "no-such-model")
    assert not files.out.exists()


def test_quiet_run_prints_nothing_but_the_error(gpt2_dir, tmp_path, capsys):
    files = Files(tmp_path, hparams=dict(HPARAMS, layers=[2, 9]))  # fails after the model is loaded
    assert cli.main(_edit_argv(gpt2_dir, files)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("massedit edit: error: hparams, key \"layers\": layer 9"), repr(err)


def test_error_unknown_model_type(tmp_path, capsys):
    """A causal LM outside the registry: the message says which modules to name in the hparams."""
    from transformers import BloomConfig, BloomForCausalLM

    tok = make_tokenizer("bpe")
    model_dir = tmp_path / "bloom"
    BloomForCausalLM(BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=3, n_head=4)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    files = Files(tmp_path)
    assert cli.main(_edit_argv(model_dir, files)) == 2
    _one_line_error(capsys, "'bloom'", "not in massedit's architecture registry", "rewrite_module_tmp")
    assert not files.out.exists()
