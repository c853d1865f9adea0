"""Issue 24: nothing lost, nothing outside its folder. One test (or more) per defect of the issue:
`edit --ledger` killed inside its save, dataset names that are paths, write checks after the work,
delta values trusted, tracebacks, messages naming the wrong cause, the ledger chain checked only by
`verify`, two writers to one --out, `world build --force` deleting unrelated files, and inputs
accepted without comment. Kills use a subprocess whose save stops midway (os._exit), not timing."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import massedit.cli as cli
import massedit.publish as outputs
import massedit.compute.stats as stats_mod
from massedit.edits.delta import DeltaError, EditDelta, HEADER_KEY
from massedit.edits.ledger import Ledger
from massedit.inputs.requests import EditRequest, validate_requests
from massedit.model.arch import ModelLayout
from test_cli_reliability import Files, _leftovers, _one_line_error, _save_model, _tree
from tiny import make_model, make_tokenizer

LEDGER = ("--method", "alphaedit", "--round-size", "1")


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _same_weights(a: Path, b: Path) -> bool:
    x, y = _state(a), _state(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ------------------------------------------------------------------ 1. --ledger publishes like edit

_KILLED_IN_SAVE = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import massedit.cli as cli
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def save_half_then_die(self, directory, *args, **kwargs):
        real(self, directory, *args, **kwargs)
        weights = Path(directory) / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])  # a save that stops midway
        (Path(directory) / "tokenizer_config.json").write_text("")
        os._exit(9)

    PreTrainedModel.save_pretrained = save_half_then_die
    sys.exit(cli.main(sys.argv[1:]))
    """
)


@pytest.mark.parametrize("in_place", [True, False], ids=["in-place", "new-out"])
def test_ledger_run_killed_inside_its_save_keeps_the_model_and_a_rerun_finishes(in_place, tmp_path):
    files = Files(tmp_path)
    model_dir = _save_model(tmp_path / "model")
    reference = _save_model(tmp_path / "reference-model")  # the same weights, for an uninterrupted run
    out = model_dir if in_place else tmp_path / "edited"
    argv = files.edit(model_dir, out, *LEDGER, "--ledger", str(tmp_path / "ledger"), *(["--force"] * in_place))
    before = _tree(model_dir)
    # The child computes with as many threads as this process, so its rounds equal an in-process run's bit for bit.
    threads = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    child = subprocess.run([sys.executable, "-c", _KILLED_IN_SAVE, *argv], capture_output=True, text=True,
                           timeout=600, env=threads)
    assert child.returncode == 9, child.stderr
    assert _tree(model_dir) == before  # in place: the original model, byte for byte
    assert in_place or not out.exists()
    assert len(Ledger(tmp_path / "ledger")) == 2  # the rounds were recorded before the save

    assert cli.main(argv) == 0  # the rerun replays the recorded rounds and publishes
    assert _leftovers(out.parent) == [] and not list(out.parent.glob(".*massedit-lock"))
    done = tmp_path / "uninterrupted"
    assert cli.main(files.edit(reference, done, *LEDGER, "--ledger", str(tmp_path / "ledger-2"))) == 0
    assert _same_weights(out, done)
    assert cli.main(["ledger", "verify", "--ledger", str(tmp_path / "ledger"), "--model", str(out)]) == 0


# ------------------------------------------------------------------ 2. a dataset name is not a path


@pytest.mark.parametrize("dataset", ["../x", "/tmp/massedit-evil", "a/b", ".."])
def test_stats_dataset_name_that_is_a_path_is_refused(dataset, files, tmp_path, capsys, monkeypatch):
    model_dir = _save_model(tmp_path / "model")
    monkeypatch.setattr("massedit.commands.stats.load_model", _never)
    capsys.readouterr()
    assert cli.main(files.stats_argv(model_dir, "--dataset", dataset)) == 2
    _one_line_error(capsys, "stats", "dataset name", repr(dataset))
    assert not files.stats.exists() and not Path("/tmp/massedit-evil_stats").exists()


def test_hparams_mom2_dataset_that_is_a_path_is_refused(files, tmp_path, capsys, monkeypatch):
    model_dir = _save_model(tmp_path / "model")
    files.hparams.write_text(json.dumps({**json.loads(files.hparams.read_text()), "mom2_dataset": "../../evil"}))
    monkeypatch.setattr("massedit.commands.edit.load_model", _never)
    capsys.readouterr()
    assert cli.main(files.edit(model_dir, tmp_path / "out")) == 2
    _one_line_error(capsys, "edit", str(files.hparams), "mom2_dataset", "path separator")
    assert not files.stats.exists() and not (tmp_path.parent / "evil_stats").exists()


def _never(*_args, **_kwargs):
    raise AssertionError("reached the work the check should have come before")


@pytest.fixture
def files(tmp_path) -> Files:
    return Files(tmp_path)


# ------------------------------------------------------------------ 3. write checks before the work


def _read_only(monkeypatch, *paths: Path) -> None:
    """os.access as a read-only directory answers (root passes every permission check)."""
    real, denied = os.access, {os.path.realpath(p) for p in paths}
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: os.path.realpath(p) not in denied and real(p, mode, **kw))


def test_out_whose_parent_is_not_writable_is_refused_before_loading(files, tmp_path, capsys, monkeypatch):
    model_dir = _save_model(tmp_path / "model")
    out = tmp_path / "locked" / "out"
    out.mkdir(parents=True)
    _read_only(monkeypatch, out.parent)
    monkeypatch.setattr("massedit.commands.edit.load_model", _never)
    capsys.readouterr()
    assert cli.main(files.edit(model_dir, out, "--force")) == 2
    _one_line_error(capsys, "edit", "--out", "parent", "not writable")


def test_read_only_model_statistics_folder_is_refused_before_the_work(files, tmp_path, capsys, monkeypatch):
    model_dir = _save_model(tmp_path / "model")
    folder = files.stats / "model" / "wikipedia_stats"
    folder.mkdir(parents=True)
    _read_only(monkeypatch, folder)
    monkeypatch.setattr(stats_mod, "second_moments", _never)
    capsys.readouterr()
    assert cli.main(files.stats_argv(model_dir)) == 2
    _one_line_error(capsys, "stats", "--stats-dir", "wikipedia_stats", "not writable")
    monkeypatch.setattr("massedit.editor.MassEditor.edit", _never)
    capsys.readouterr()
    assert cli.main(files.edit(model_dir, tmp_path / "out")) == 2
    _one_line_error(capsys, "edit", "--stats-dir", "wikipedia_stats", "not writable")


# ------------------------------------------------------------------ 4. delta values are checked


@pytest.fixture
def edited(tmp_path):
    """A tiny model, and the delta of an edit saved applied (what `massedit edit` writes)."""
    from massedit.edits.delta import WeightDelta

    model, _ = make_model("gpt2", seed=0)
    layout = ModelLayout(model)

    def delta(seed: int, keep: bool = False, layer: int = 1) -> Path:
        """A delta made on the model as it is, saved applied; left applied with `keep`."""
        g = torch.Generator().manual_seed(seed)
        name = layout.rewrite_weight_name(layer)
        rows, cols = dict(model.named_parameters())[name].shape
        wd = WeightDelta(name, torch.randn(cols, 2, generator=g) * 1e-2, torch.randn(rows, 2, generator=g) * 1e-2,
                         transposed=True)
        d = EditDelta([wd], {"model_name": "tiny"})
        d.apply(model)
        path = tmp_path / f"delta-{seed}.safetensors"
        d.save(path)
        if not keep:
            d.revert(model)
        return path

    return model, delta


def _rewrite_tensors(path: Path, change) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(change(tensors), str(path), metadata=header)


@pytest.mark.parametrize("how", ["scaled", "random"])
def test_delta_with_altered_factors_is_refused_on_apply(how, edited):
    model, delta = edited
    path = delta(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _rewrite_tensors(path, lambda t: {k: (v * 100 if how == "scaled" else torch.randn_like(v)) if ".u" in k else v
                                      for k, v in t.items()})
    with pytest.raises(DeltaError, match="factors were changed"):
        EditDelta.load(path).apply(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_delta_applied_again_beneath_other_edits_is_refused_unless_forced(edited):
    model, delta = edited
    a = delta(1)
    EditDelta.load(a).apply(model)
    delta(2, keep=True)  # another edit on top of A
    with pytest.raises(DeltaError, match="already applied beneath later edits.*force=True"):
        EditDelta.load(a).apply(model)
    EditDelta.load(a).apply(model, force=True)  # asked for: applied on these weights


def test_delta_additions_may_only_set_a_bias_flag(edited, tmp_path):
    model, delta = edited
    path = delta(1)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()[HEADER_KEY])
    header["additions"] = {"config": {"n_layer": [4, 7]}, "parameters": [{"name": "transformer.h.0.attn.bias2",
                                                                          "shape": [4]}]}
    _rewrite_tensors(path, lambda t: t)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(header)})
    with pytest.raises(DeltaError, match=r"additions'.config.n_layer.*may only set a bias flag.*attention_bias"):
        EditDelta.load(path)


# ------------------------------------------------------------------ 5-7. the ledger's files are checked


@pytest.fixture
def ledger_run(tmp_path):
    """A 3-round ledger and the model it describes."""
    files = Files(tmp_path)
    files.requests.write_text(json.dumps(json.loads(files.requests.read_text()) + [
        {"subject": "Lionel Messi", "prompt": "The sport of {}", "target_new": "tennis"}]))
    model_dir = _save_model(tmp_path / "model")
    ledger, out = tmp_path / "ledger", tmp_path / "edited"
    assert cli.main(files.edit(model_dir, out, *LEDGER, "--ledger", str(ledger))) == 0
    assert len(Ledger(ledger)) == 3
    return ledger, out


def _ledger(*argv) -> list[str]:
    return ["ledger", *argv]


def test_ledger_list_and_revert_refuse_a_ledger_with_a_missing_round(ledger_run, tmp_path, capsys):
    ledger, out = ledger_run
    shutil.rmtree(ledger / "rounds" / "000002")
    capsys.readouterr()
    assert cli.main(_ledger("list", "--ledger", str(ledger))) == 2
    _one_line_error(capsys, "ledger", "round 000002 is missing")
    assert cli.main(_ledger("revert", "--ledger", str(ledger), "--last", "1", "--model", str(out), "--out",
                            str(tmp_path / "reverted"))) == 2
    _one_line_error(capsys, "ledger", "round 000002 is missing")
    assert (ledger / "rounds" / "000003").is_dir() and not (ledger / "reverted").exists()
    assert cli.main(_ledger("verify", "--ledger", str(ledger), "--model", str(out))) == 1


def test_ledger_verify_finds_an_edited_round_record(ledger_run, capsys):
    ledger, out = ledger_run
    record = ledger / "rounds" / "000002" / "round.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "n_edits": 999}))
    capsys.readouterr()
    assert cli.main(_ledger("verify", "--ledger", str(ledger), "--model", str(out))) == 1
    assert "round.json: changed since the round was recorded" in capsys.readouterr().err


def test_a_tampered_round_delta_is_named_as_such(ledger_run, capsys):
    ledger, out = ledger_run
    delta = ledger / "rounds" / "000002" / "delta.safetensors"
    _rewrite_tensors(delta, lambda t: {k: v * 100 if k.endswith(".u") else v for k, v in t.items()})
    capsys.readouterr()
    assert cli.main(_ledger("list", "--ledger", str(ledger))) == 2
    line = _one_line_error(capsys, "ledger", "delta.safetensors: changed since the round was recorded")
    assert "device type" not in line


@pytest.mark.parametrize("file, content, words", [
    ("ledger.json", "[]", ["ledger.json", "JSON list, not an object"]),
    ("ledger.json", "{}", ["ledger.json", "field 'method'"]),
    ("rounds/000001/round.json", "{}", ["round.json", "field 'round'"]),
    ("ledger.json", "", ["ledger.json", "not valid JSON"]),
])
def test_damaged_ledger_files_are_one_line_naming_file_and_field(file, content, words, ledger_run, capsys):
    ledger, out = ledger_run
    (ledger / file).write_text(content)
    capsys.readouterr()
    assert cli.main(_ledger("list", "--ledger", str(ledger))) == 2
    _one_line_error(capsys, "ledger", *words)


# ------------------------------------------------------------------ 8. one writer per --out

_HOLDS_OUT = textwrap.dedent(
    """
    import sys, time
    import massedit.cli as cli
    from transformers import PreTrainedModel

    def wait(*args, **kwargs):
        open(sys.argv[1], "w").close()
        time.sleep(600)

    PreTrainedModel.save_pretrained = wait
    sys.exit(cli.main(sys.argv[2:]))
    """
)


def test_a_second_edit_to_the_same_out_is_refused_while_the_first_runs(files, tmp_path, capsys):
    model_dir = _save_model(tmp_path / "model")
    out, marker = tmp_path / "edited", tmp_path / "saving"
    first = subprocess.Popen([sys.executable, "-c", _HOLDS_OUT, str(marker), *files.edit(model_dir, out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        capsys.readouterr()
        assert cli.main(files.edit(model_dir, out)) == 2
        _one_line_error(capsys, "edit", str(out), "another massedit run", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert not out.exists()
    # the killed run's lock is stale, its staging directory a leftover: the next run takes over and cleans up
    assert (tmp_path / ".edited.massedit-lock").exists() and len(_leftovers(tmp_path)) == 1
    assert cli.main(files.edit(model_dir, out)) == 0
    assert (out / "report.json").is_file() and _leftovers(tmp_path) == []
    assert not (tmp_path / ".edited.massedit-lock").exists()


def test_claim_is_exclusive_within_a_process_too(tmp_path):
    with outputs.claim(tmp_path / "out"):
        with pytest.raises(ValueError, match=f"pid {os.getpid()}"):
            with outputs.claim(tmp_path / "out"):
                pass
    with outputs.claim(tmp_path / "out"):  # released on exit
        pass


# ------------------------------------------------------------------ 9. world build --force


def test_world_build_force_replaces_only_the_build(tmp_path, capsys):
    out = tmp_path / "world"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "corpus.txt").write_text("an older build's corpus")
    argv = ["world", "build", "--out", str(out), "--quick", "--steps", "1", "--subjects", "12", "--corpus-docs", "5",
            "--threads", "1", "--quiet", "--json"]
    assert cli.main(argv + ["--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "corpus.txt").read_text() != "an older build's corpus" and (out / "model" / "config.json").is_file()
    plain = tmp_path / "plain-file"
    plain.write_text("not a directory")
    capsys.readouterr()
    assert cli.main(["world", "build", "--out", str(plain), "--quick", "--force", "--quiet"]) == 2
    _one_line_error(capsys, "world", "not a directory")
    assert plain.read_text() == "not a directory"


# ------------------------------------------------------------------ 10. accepted with a warning


def test_target_new_equal_to_target_true_is_warned_about():
    requests = [EditRequest("Michael Jordan", "The sport of {}", "basketball", "basketball", source="r.json, record 0"),
                EditRequest("Marie Curie", "The language of {}", "Spanish", "Polish")]
    with pytest.warns(UserWarning, match=r"1 request\(s\) ask for the fact the model should already know.*record 0"):
        validate_requests(requests)


def test_target_new_with_a_special_token_is_warned_about():
    tok = make_tokenizer("bpe")
    requests = [EditRequest("Michael Jordan", "The sport of {}", "golf<|endoftext|>", source="r.json, record 0")]
    with pytest.warns(UserWarning, match=r'r.json, record 0, field "target_new".*special token'):
        validate_requests(requests, tokenizer=tok)


def test_statistics_checkpoint_with_changed_contents_is_recomputed(tmp_path, monkeypatch):
    model, tok = make_model("gpt2", seed=0)
    layout = ModelLayout(model)
    texts = [" ".join(["the", "a", "of"] * (1 + i % 5)) for i in range(12)]
    checkpoint = tmp_path / "pass.partial.npz"
    whole = stats_mod.second_moments(model, layout, tok, texts, [1], progress=False, batch_tokens=16)

    real = stats_mod._save_checkpoint

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(stats_mod, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        stats_mod.second_moments(model, layout, tok, texts, [1], progress=False, batch_tokens=16,
                                 checkpoint=checkpoint, checkpoint_every=2)
    monkeypatch.setattr(stats_mod, "_save_checkpoint", real)
    with np.load(checkpoint) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["layer1"] = arrays["layer1"] * 0.25  # finite garbage, the fingerprint and digest kept
    arrays["count"] = np.array(int(arrays["count"]) // 4)
    np.savez(checkpoint, **arrays)
    with pytest.warns(UserWarning, match="do not match the digest written with them"):
        resumed = stats_mod.second_moments(model, layout, tok, texts, [1], progress=False, batch_tokens=16,
                                           checkpoint=checkpoint, checkpoint_every=2)
    assert resumed[1][1] == whole[1][1] and torch.equal(resumed[1][0], whole[1][0])


def test_unknown_keys_of_simple_requests_are_warned_about_once():
    from massedit.inputs.requests import parse_records

    records = [{"subject": "Michael Jordan", "prompt": "The sport of {}", "target_new": "golf"},
               {"subject": "Marie Curie", "prompt": "The language of {}", "target_new": "Spanish", "target_ture": "x"},
               {"subject": "Lionel Messi", "prompt": "The sport of {}", "target_new": "tennis", "note": 1}]
    with pytest.warns(UserWarning) as caught:
        parse_records(records, "r.json")
    assert len(caught) == 1
    assert str(caught[0].message).startswith("r.json, record 1: ignoring key(s) a request does not have: 'note', "
                                             "'target_ture'")


# ------------------------------------------------------------------ also reported: rank 0 failing to write

_RANK_0_CANNOT_WRITE = textwrap.dedent(
    """
    import os, sys
    import massedit.cli as cli
    from transformers import PreTrainedModel

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", "edited/model.safetensors")

    if os.environ["RANK"] == "0":
        PreTrainedModel.save_pretrained = disk_full
    sys.exit(cli.main(sys.argv[1:]))
    """
)


def test_an_error_on_rank_0_while_writing_ends_every_rank(files, tmp_path):
    """Under torchrun the other ranks used to wait at a barrier for a rank 0 that had failed."""
    from test_parallel import _free_port

    model_dir = _save_model(tmp_path / "model")
    script = tmp_path / "rank0_cannot_write.py"
    script.write_text(_RANK_0_CANNOT_WRITE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           str(script), *files.edit(model_dir, tmp_path / "edited")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("massedit edit: error:")]
    assert len(errors) == 2 and all("No space left on device: edited/model.safetensors" in e for e in errors), \
        done.stderr[-3000:]
    assert not (tmp_path / "edited").exists() and _leftovers(tmp_path) == []


# ------------------------------------------------------------------ also reported: a bare name not on the hub


@pytest.mark.parametrize("hub", ["unknown", "unreachable"])
def test_a_bare_model_name_the_hub_cannot_give_fails_at_once(hub, files, tmp_path, capsys, monkeypatch):
    """One request, one line: transformers would retry for about a minute, printing each retry."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def model_info(name, timeout=None):
        if hub == "unknown":
            raise RepositoryNotFoundError.__new__(RepositoryNotFoundError, f"404: {name}")
        raise ConnectionRefusedError("the hub is down")

    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", _never)
    capsys.readouterr()
    assert cli.main(files.edit("no-such-model-xyz", tmp_path / "out")) == 2
    _one_line_error(capsys, "edit", "'no-such-model-xyz'",
                    "no such model on the Hugging Face hub" if hub == "unknown" else "hub cannot be reached")


# ------------------------------------------------------------------ also reported: a half-precision copy


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_copy_of_the_edited_model_holds_the_delta(dtype, edited):
    model, delta = edited
    path = delta(1, keep=True)  # recorded on float32 weights, left applied
    copy = model.to(dtype)
    loaded = EditDelta.load(path)
    assert loaded.is_applied(copy)
    with pytest.raises(DeltaError, match=f"already applied.*as a {str(dtype)[6:]} copy"):
        loaded.apply(copy)
