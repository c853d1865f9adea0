"""The loading options of `stats`, `edit`, `eval` and MassEditor.from_pretrained: device maps
(named, JSON files), --max-memory, --offload-folder, --quantize, --model-dtype and the deprecated
--dtype spellings; bad options are one-line errors (exit 2) before any weight is read."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

import massedit.cli as cli
from massedit import MassEditor
from massedit.edits.delta import EditDelta
from massedit.model.devices import read_parameter
from massedit.model.loading import parse_max_memory
from test_cli_edit import Files, _edit_argv, _save_model
from test_evaluate import RECORDS


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return _save_model("gpt2", tmp_path_factory.mktemp("model"))


def _disk_map(tmp_path: Path) -> Path:
    """Blocks 1 and 2 (the edited ones) on disk, the rest on the CPU."""
    names = ["transformer.wte", "transformer.wpe", "transformer.drop", "transformer.ln_f", "lm_head"]
    device_map = {n: "cpu" for n in names} | {f"transformer.h.{i}": "disk" if i in (1, 2) else "cpu" for i in range(4)}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(device_map))
    return path


def test_edit_stats_eval_with_a_disk_offloading_device_map(gpt2_dir, tmp_path, capsys):
    files = Files(tmp_path)
    placement = ["--device-map", str(_disk_map(tmp_path)), "--offload-folder", str(tmp_path / "offload"),
                 "--model-dtype", "float32"]
    code = cli.main(["stats", "--model", str(gpt2_dir), "--corpus", str(files.corpus), "--layers", "1,2",
                     "--samples", "30", "--stats-dir", str(files.stats), "--quiet", *placement])
    assert code == 0, capsys.readouterr().err
    code = cli.main(_edit_argv(gpt2_dir, files, *placement))
    assert code == 0, capsys.readouterr().err
    # The saved model holds the edit that the delta describes, applied to the original weights.
    delta = EditDelta.load(files.out / "delta.safetensors")
    plain = transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir)
    edited = transformers.AutoModelForCausalLM.from_pretrained(files.out)
    EditDelta(delta.weights, delta.metadata).apply(plain)
    for wd in delta.weights:
        assert torch.equal(read_parameter(edited, wd.name), read_parameter(plain, wd.name)), wd.name

    data = tmp_path / "cf.json"
    data.write_text(json.dumps(RECORDS))
    capsys.readouterr()
    code = cli.main(["eval", "--model", str(files.out), "--data", str(data), "--device-map", "auto",
                     "--max-memory", "cpu=8GiB"])
    assert code == 0, capsys.readouterr().err
    assert "counterfact: 3 case(s)" in capsys.readouterr().out


def test_from_pretrained_takes_the_loading_options(gpt2_dir, tmp_path):
    device_map = json.loads(_disk_map(tmp_path).read_text())
    editor = MassEditor.from_pretrained(gpt2_dir, device_map=device_map, offload_folder=tmp_path / "offload",
                                        max_memory={"cpu": "8GiB"}, torch_dtype="float32")
    assert editor.model.get_parameter("transformer.h.1.mlp.c_proj.weight").device.type == "meta"
    assert editor.model_name == gpt2_dir.name


@pytest.fixture
def no_weights(monkeypatch):
    """Fails the test if any weights are loaded: the errors below must come first."""
    def refuse(*_a, **_k):
        raise AssertionError("weights were loaded before the error")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _one_line_error(capsys, command, *needles) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"massedit {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _argv(command, model_dir, tmp_path) -> list[str]:
    files = Files(tmp_path)
    if command == "stats":
        return ["stats", "--model", str(model_dir), "--corpus", str(files.corpus), "--layers", "1",
                "--stats-dir", str(files.stats)]
    if command == "eval":
        data = tmp_path / "cf.json"
        data.write_text(json.dumps(RECORDS))
        return ["eval", "--model", str(model_dir), "--data", str(data)]
    return _edit_argv(model_dir, files)


BAD = {
    "unknown module": (lambda t: ["--device-map", str(_json(t, {"transformer.h.9": "cpu", "lm_head": "cpu"}))],
                       ("'transformer.h.9'", "top-level modules: lm_head, transformer")),
    "unknown device": (lambda t: ["--device-map", str(_json(t, {"transformer": "gpu7", "lm_head": "cpu"}))],
                       ("'gpu7' is not a device",)),
    "missing map file": (lambda t: ["--device-map", str(t / "nope.json")], ("no such JSON file",)),
    "bad device": (lambda t: ["--device", "bogus"], ("--device: 'bogus' is not a device",)),
    "device and map": (lambda t: ["--device", "cpu", "--device-map", "auto"], ("either --device or --device-map",)),
    "bad max memory": (lambda t: ["--max-memory", "cpu:64GiB"], ("--max-memory", "DEVICE=SIZE")),
    "bad size": (lambda t: ["--max-memory", "cpu=lots"], ("'lots' is not a size",)),
    "max memory without a map": (lambda t: ["--max-memory", "cpu=8GiB"], ("--max-memory budgets a device map",
                                                                          "--device-map auto")),
    "disk without folder": (lambda t: ["--device-map", str(_json(t, {"transformer": "disk", "lm_head": "cpu"}))],
                            ("give --offload-folder DIR",)),
    "unwritable folder": (lambda t: ["--offload-folder", str(_json(t, {}) / "sub")], ("cannot write there",)),
}


def _json(tmp_path: Path, obj) -> Path:
    path = tmp_path / "map.json"
    path.write_text(json.dumps(obj))
    return path


@pytest.mark.parametrize("command", ["stats", "edit", "eval"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_loading_options_are_one_line_errors_before_loading(command, case, gpt2_dir, tmp_path, capsys,
                                                                no_weights):
    flags, needles = BAD[case]
    assert cli.main(_argv(command, gpt2_dir, tmp_path) + flags(tmp_path)) == 2
    _one_line_error(capsys, command, *needles)


def test_named_map_spilling_to_disk_without_folder_is_refused_before_the_edit(gpt2_dir, tmp_path, capsys):
    """--device-map auto with a small --max-memory puts blocks on disk at load time; without an
    offload folder the edit of a disk weight could not be written, so it is refused before z runs."""
    files = Files(tmp_path)
    assert cli.main(_edit_argv(gpt2_dir, files) + ["--device-map", "auto", "--max-memory", "cpu=100KB"]) == 2
    _one_line_error(capsys, "edit", "modules went to disk", "--offload-folder")
    assert not files.out.exists() and not files.stats.exists()


def test_quantize_without_bitsandbytes_is_a_one_line_error(gpt2_dir, tmp_path):
    """bitsandbytes made unimportable in a child process, as on a machine without it."""
    code = ("import sys; sys.modules['bitsandbytes'] = None; import massedit.cli as cli; "
            f"sys.exit(cli.main(sys.argv[1:]))")
    argv = _argv("edit", gpt2_dir, tmp_path) + ["--quantize", "8bit"]
    run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert lines == ["massedit edit: error: --quantize 8bit needs bitsandbytes, which is not installed; "
                     "pip install bitsandbytes (or leave out --quantize)"]


@pytest.mark.parametrize("command,old,dest,value", [
    ("stats", "--dtype", "stats_dtype", "float64"),
    ("edit", "--dtype", "model_dtype", "bfloat16"),
    ("eval", "--dtype", "model_dtype", "float16"),
])
def test_old_dtype_spelling_keeps_its_meaning_with_a_note(command, old, dest, value, gpt2_dir, tmp_path, capsys):
    args = cli.build_parser().parse_args(_argv(command, gpt2_dir, tmp_path) + [old, value])
    assert getattr(args, dest) == value
    new = "--stats-dtype" if dest == "stats_dtype" else "--model-dtype"
    assert f"{old} is deprecated here; use {new}" in capsys.readouterr().err
    args = cli.build_parser().parse_args(_argv(command, gpt2_dir, tmp_path) + [new, value])
    assert getattr(args, dest) == value and not capsys.readouterr().err


def test_max_memory_spec():
    assert parse_max_memory("0=20GiB, cpu=64GiB") == {0: "20GiB", "cpu": "64GiB"}
    with pytest.raises(ValueError, match="is empty"):
        parse_max_memory(" , ")


def test_readme_loading_snippet_runs(tmp_path, monkeypatch):
    import re

    from massedit.world.build import build_world

    world = tmp_path / "world"
    build_world(world, quick=True, threads=1)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    snippet = next(s for s in re.findall(r"```python\n(.*?)```", readme, re.S) if "offload_folder" in s)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    hparams = 'world_preset(AutoConfig.from_pretrained(f"{path}/model"))'
    assert hparams in snippet
    code = snippet.replace('"worlds/gpt2-default"', repr(str(world))).replace(
        hparams, f"{hparams}.replace(v_num_grad_steps=5, mom2_n_samples=50)")  # smoke sizes
    exec(compile(code, "README.md", "exec"), namespace)
    editor, result = namespace["editor"], namespace["result"]
    assert any(p.device.type == "meta" for p in editor.model.parameters()), "nothing was offloaded"
    assert list((tmp_path / "offload").iterdir())
    saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "edited")
    plain = transformers.AutoModelForCausalLM.from_pretrained(world / "model")
    changed = {n for n, p in saved.named_parameters() if not torch.equal(p, plain.get_parameter(n))}
    assert changed == {wd.name for wd in result.delta.weights}
