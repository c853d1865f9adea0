"""README.md's Python snippet and CLI examples run (smoke sizes), so they cannot rot."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from massedit import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory):
    from massedit.world.build import build_world

    out = tmp_path_factory.mktemp("world") / "gpt2-quick"
    build_world(out, quick=True, threads=1)
    return out


def test_python_snippet_runs(quick_world, tmp_path, monkeypatch):
    snippet = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    assert "worlds/gpt2-default" in snippet
    monkeypatch.chdir(tmp_path)
    code = snippet.replace('"worlds/gpt2-default"', repr(str(quick_world)))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    model, result = namespace["model"], namespace["result"]
    assert (tmp_path / "edit.safetensors").exists()
    assert result.n_edits == 2 and not result.delta.is_applied(model)
    original = type(model).from_pretrained(quick_world / "model")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))


def test_quantized_and_parallel_snippets_run_in_order_in_one_directory(quick_world, tmp_path, monkeypatch):
    """A reader runs the snippets one after the other in one directory: the float model of the
    torchrun snippet must not trip over the 4-bit model's statistics cached in the same stats_dir."""
    pytest.importorskip("bitsandbytes")
    snippets = re.findall(r"```python\n(.*?)```", README, re.S)
    quantized = next(s for s in snippets if "load_in_4bit" in s)
    ranks = next(s for s in snippets if "parallel.world()" in s)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "edits.json").write_text(json.dumps(
        [{"subject": "Mirela Tovan", "prompt": "{} was born in", "target_new": "Ostrava"}]))
    for snippet in (quantized, ranks):
        exec(compile(snippet.replace("worlds/gpt2-default", str(quick_world)), "README.md", "exec"), {})
    assert (tmp_path / "edited-4bit" / "config.json").exists() and (tmp_path / "edit.safetensors").exists()


def test_demo_says_when_n_exceeds_the_worlds_facts(quick_world, tmp_path, capsys):
    import shutil

    world = tmp_path / "world"  # the quick world with 3 facts, so that editing all of them is quick
    shutil.copytree(quick_world, world)
    records = json.loads((world / "counterfact.json").read_text())[:3]
    (world / "counterfact.json").write_text(json.dumps(records))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--world", str(world), "--n", "5", "--out", str(out), "--quiet"]) == 0
    assert "massedit demo: warning: --n 5: the world has 3 facts; editing all 3" in capsys.readouterr().err
    assert json.loads((out / "report.json").read_text())["n_edits"] == 3


def test_every_command_has_help_with_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    for name in cli.COMMANDS:
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        text = capsys.readouterr().out
        assert f"massedit {name}" in text and "Example" in text, name


def test_version():
    out = subprocess.run([sys.executable, "-m", "massedit.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("massedit ")


def test_demo_smoke(quick_world, tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--world", str(quick_world), "--n", "5", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["n_edits"] == 5
    assert set(report["metrics"]["pre"]) >= {"ES", "PS", "NS", "S"}
    assert {"z", "keys", "solve", "total"} <= set(report["timings"])
    assert "ES" in capsys.readouterr().out
