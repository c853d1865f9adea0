"""Issue 11 end to end through the CLI: statistics of two different models both saved as `model`,
`--model .`/`..`, short corpora, float16 statistics, corrupt checkpoints under --force, `edit`
killed (SIGKILL) or interrupted (SIGINT) between its writes — in place and not — and
`demo --out` over existing files."""
from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

import massedit.cli as cli
import massedit.publish as outdir
from massedit.edits.delta import EditDelta
from tiny import WORDS, make_model

REQUESTS = [
    {"subject": "Michael Jordan", "prompt": "The sport of {}", "target_new": "baseball"},
    {"subject": "Marie Curie", "prompt": "The native language of {}", "target_new": "Spanish"},
]
N_DOCS = 30
HPARAMS = {"layers": [1, 2], "v_num_grad_steps": 3, "mom2_n_samples": N_DOCS, "mom2_update_weight": 100,
           "clamp_norm_factor": 4.0, "v_weight_decay": 1e-3}


def _save_model(path: Path, seed: int = 0) -> Path:
    model, tok = make_model("gpt2", seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


class Files:
    def __init__(self, root: Path):
        self.root = root
        self.requests = root / "requests.json"
        self.requests.write_text(json.dumps(REQUESTS))
        self.hparams = root / "hparams.json"
        self.hparams.write_text(json.dumps(HPARAMS))
        self.templates = root / "templates.json"
        self.templates.write_text(json.dumps([["{}"], ["The a of. {}"]]))
        self.corpus = root / "corpus.txt"
        self.corpus.write_text("".join(" ".join(WORDS[(5 * i + 3 * j) % len(WORDS)] for j in range(6 + i % 11)) + "\n"
                                       for i in range(N_DOCS + 5)))
        self.stats = root / "stats"

    def edit(self, model: Path, out: Path, *extra: str, corpus: bool = True) -> list[str]:
        argv = ["edit", "--model", str(model), "--requests", str(self.requests), "--hparams", str(self.hparams),
                "--context-templates", str(self.templates), "--stats-dir", str(self.stats), "--out", str(out),
                "--quiet"]
        return argv + (["--corpus", str(self.corpus)] if corpus else []) + list(extra)

    def stats_argv(self, model, *extra: str) -> list[str]:
        return ["stats", "--model", str(model), "--corpus", str(self.corpus), "--layers", "1,2", "--samples",
                str(N_DOCS), "--stats-dir", str(self.stats), "--quiet"] + list(extra)


@pytest.fixture
def files(tmp_path) -> Files:
    return Files(tmp_path)


def _one_line_error(capsys, command: str, *needles: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith(f"massedit {command}: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _tree(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones too) with its content digest."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(path).state_dict())


# ------------------------------------------------------------------------------ statistics


def test_two_models_named_model_do_not_share_statistics(files, tmp_path, capsys):
    first, second = _save_model(tmp_path / "a" / "model", seed=0), _save_model(tmp_path / "b" / "model", seed=1)
    assert cli.main(files.stats_argv(first)) == 0
    written = _tree(files.stats)
    assert written and all(name.startswith("model/") for name in written)
    capsys.readouterr()

    assert cli.main(files.stats_argv(second)) == 2  # not "cached": those are the first model's
    line = _one_line_error(capsys, "stats", "belongs to another model", "--model-name", str(files.stats / "model"))
    assert str(first) in line and str(second) in line  # which model the file belongs to, and this one
    out = tmp_path / "edited-b"
    assert cli.main(files.edit(second, out)) == 2  # with a corpus too: the first model's files are kept
    _one_line_error(capsys, "edit", "belongs to another model", "--model-name")
    assert not out.exists() and _tree(files.stats) == written

    assert cli.main(files.edit(second, out, "--model-name", "model-b")) == 0
    assert cli.main(files.edit(first, tmp_path / "edited-a", corpus=False)) == 0  # its own files, reused
    assert set(_tree(files.stats)) - set(written) == {n.replace("model/", "model-b/", 1) for n in written}


def test_reference_layout_files_need_an_explicit_model_name(files, tmp_path, capsys):
    model_dir = _save_model(tmp_path / "model")
    assert cli.main(files.stats_argv(model_dir)) == 0
    for path in (files.stats / "model").rglob("*.npz"):  # as the reference code writes them: no identity
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files if k != "massedit.identity"}
        np.savez(path, **arrays)
    capsys.readouterr()
    out = tmp_path / "edited"
    assert cli.main(files.edit(model_dir, out, corpus=False)) == 2
    _one_line_error(capsys, "edit", "no model fingerprint", "--model-name model")
    assert not out.exists()
    assert cli.main(files.edit(model_dir, out, "--model-name", "model", corpus=False)) == 0


def test_stats_model_dot_and_dotdot_stay_inside_stats_dir(files, tmp_path, monkeypatch, capsys):
    model_dir = _save_model(tmp_path / "world" / "model")
    (model_dir / "sub").mkdir()
    monkeypatch.chdir(model_dir)
    assert cli.main(files.stats_argv(".")) == 0
    capsys.readouterr()
    monkeypatch.chdir(model_dir / "sub")
    assert cli.main(files.stats_argv("..", "--json")) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["computed_layers"] == []  # the same files, found again
    assert {p.name for p in files.stats.iterdir()} == {"model"}
    assert sorted(p.name for p in (tmp_path / "world").iterdir()) == ["model"]
    assert cli.main(files.stats_argv(model_dir, "--model-name", "..")) == 2
    _one_line_error(capsys, "stats", "'..'", "--model-name")


def test_stats_with_fewer_documents_than_samples_says_so(files, tmp_path, capsys):
    model_dir = _save_model(tmp_path / "model")
    argv = files.stats_argv(model_dir, "--json")
    argv[argv.index("--samples") + 1] = "1000"
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert f"{N_DOCS + 5} documents, fewer than the 1000 samples asked" in captured.err
    path = Path(json.loads(captured.out)["files"]["1"])
    assert path.name.endswith("_mom2_1000.npz")
    with np.load(path, allow_pickle=False) as data:
        assert int(data["sample_size"]) == N_DOCS + 5


def test_stats_float16_is_refused_before_any_work(files, tmp_path, capsys):
    model_dir = _save_model(tmp_path / "model")
    assert cli.main(files.stats_argv(model_dir, "--stats-dtype", "float16")) == 2
    _one_line_error(capsys, "stats", "float16 cannot hold", "float32")
    assert not files.stats.exists()


def test_corrupt_checkpoint_is_discarded_even_with_force(files, tmp_path, capsys):
    model_dir = _save_model(tmp_path / "model")
    assert cli.main(files.stats_argv(model_dir)) == 0
    first = _tree(files.stats)
    folder = files.stats / "model" / "wikipedia_stats"
    checkpoint = folder / "pass_1-2_float32.partial.npz"
    checkpoint.write_bytes(b"PK\x03\x04 interrupted while writing")
    capsys.readouterr()
    assert cli.main(files.stats_argv(model_dir, "--force")) == 0
    assert "massedit stats: warning: discarding unreadable statistics checkpoint" in capsys.readouterr().err
    assert not checkpoint.exists() and _tree(files.stats) == first  # recomputed from scratch: the same files


# ------------------------------------------------------------------------------ atomic edit


@pytest.fixture
def edit_env(files, tmp_path):
    model_dir = _save_model(tmp_path / "model")
    (model_dir / "notes.txt").write_text("the user's own file")
    return files, model_dir


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".massedit-staging-" in p.name)


_CHILD = textwrap.dedent(
    """
    import sys, time
    import massedit.cli as cli
    import massedit.publish as outdir
    from transformers import PreTrainedModel

    where, marker = sys.argv[1], sys.argv[2]

    def stop_here(*args, **kwargs):
        open(marker, "w").close()
        time.sleep(600)

    if where == "model":  # the delta is written, the model not yet
        PreTrainedModel.save_pretrained = stop_here
    else:  # everything is written beside --out, nothing published yet
        outdir._publish = stop_here
    sys.exit(cli.main(sys.argv[3:]))
    """
)


@pytest.mark.parametrize("where,in_place", [("model", False), ("model", True), ("publish", True)],
                         ids=["model-new-out", "model-in-place", "publish-in-place"])
def test_edit_killed_between_writes_leaves_nothing_finished(where, in_place, edit_env, tmp_path):
    files, model_dir = edit_env
    out = model_dir if in_place else tmp_path / "edited"
    before, original = _tree(model_dir), _weights(model_dir)
    marker = tmp_path / "reached"
    log = tmp_path / "child.log"
    argv = files.edit(model_dir, out, *(["--force"] if in_place else []))
    with open(log, "wb") as err:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, where, str(marker), *argv],
                                 stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the edit never reached the point to kill it at"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert _tree(model_dir) == before  # in place: the original model, byte for byte
    if not in_place:
        assert not out.exists()
    # what the run had written is only in a hidden staging directory beside --out
    assert len(_leftovers(out.parent)) == 1 and _leftovers(out.parent)[0].startswith(f".{out.name}.")

    if not in_place:
        return
    # the next run works, and its delta takes the edited model back to the original
    assert cli.main(argv) == 0
    assert (out / "report.json").is_file()
    edited = AutoModelForCausalLM.from_pretrained(out)
    EditDelta.load(out / "delta.safetensors").revert(edited)
    assert all(torch.equal(v, original[k]) for k, v in edited.state_dict().items())


@pytest.mark.parametrize("where", ["delta", "model", "report", "exchange"])
def test_edit_interrupted_in_place_keeps_the_original(where, edit_env, monkeypatch, capsys):
    files, model_dir = edit_env
    before = _tree(model_dir)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    target = {"delta": (EditDelta, "save"), "model": (PreTrainedModel, "save_pretrained"),
              "report": (Path, "write_text"), "exchange": (outdir, "_exchange")}[where]
    monkeypatch.setattr(*target, interrupt)
    assert cli.main(files.edit(model_dir, model_dir, "--force")) == 130
    assert _tree(model_dir) == before
    assert _leftovers(model_dir.parent) == []  # an interrupted run cleans up after itself


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_in_place_edit_replaces_the_model_and_keeps_other_files(exchange, edit_env, monkeypatch, tmp_path):
    files, model_dir = edit_env
    if not exchange:
        monkeypatch.setattr(outdir, "_exchange", lambda a, b: False)
    original = _weights(model_dir)
    mode = model_dir.stat().st_mode
    assert cli.main(files.edit(model_dir, model_dir, "--force")) == 0
    assert (model_dir / "notes.txt").read_text() == "the user's own file"
    assert {"delta.safetensors", "report.json", "model.safetensors", "config.json"} <= {p.name for p in model_dir.iterdir()}
    assert model_dir.stat().st_mode == mode and _leftovers(model_dir.parent) == []
    edited = AutoModelForCausalLM.from_pretrained(model_dir)
    assert not all(torch.equal(v, original[k]) for k, v in edited.state_dict().items())
    EditDelta.load(model_dir / "delta.safetensors").revert(edited)
    assert all(torch.equal(v, original[k]) for k, v in edited.state_dict().items())


def test_demo_refuses_a_non_empty_out_without_force(tmp_path, capsys):
    out = tmp_path / "runs"
    out.mkdir()
    (out / "report.json").write_text('{"mine": true}')
    assert cli.main(["demo", "--out", str(out), "--world", str(tmp_path / "world"), "--quick", "--quiet"]) == 2
    _one_line_error(capsys, "demo", "not empty", "--force")
    assert (out / "report.json").read_text() == '{"mine": true}' and not (tmp_path / "world").exists()
