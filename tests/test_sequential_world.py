"""On the quick world: README's sequential-editing and add-a-method snippets run, and
benchmarks/sequential.py runs end to end and writes what it promises (no timing assertions)."""
import json
import re
from pathlib import Path

import pytest

from benchmarks.sequential import main
from massedit.methods import METHODS
from massedit.world.build import build_world

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def quick_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "gpt2-quick"
    build_world(out, quick=True, threads=1)
    return out


def _snippet(heading: str, index: int = 0) -> str:
    section = README.split(f"## {heading}", 1)[1]
    return re.findall(r"```python\n(.*?)```", section, re.S)[index]


def test_readme_sequential_snippet_runs(quick_world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _snippet("Sequential editing").replace('"worlds/gpt2-default"', repr(str(quick_world)))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert len(namespace["seq"].ledger) == 1 and (tmp_path / "ledger" / "reverted").is_dir()


def test_readme_method_example_registers_and_edits(quick_world, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from massedit import MassEditor, world_preset

    namespace: dict = {}
    exec(compile(_snippet("Sequential editing", 1), "README.md", "exec"), namespace)
    try:
        model = AutoModelForCausalLM.from_pretrained(quick_world / "model")
        tok = AutoTokenizer.from_pretrained(quick_world / "model")
        editor = MassEditor(model, tok, world_preset(model.config).replace(v_num_grad_steps=3), stats_dir=tmp_path,
                            corpus=quick_world / "corpus.txt", progress=False)
        request = [{"subject": "Mirela Tovan", "prompt": "{} was born in", "target_new": "Ostrava"}]
        half = editor.edit(request, method="half-memit", apply=False).delta.weights[0]
        full = editor.edit(request, method="memit", apply=False).delta.weights[0]
        assert (half.dense() * 2 - full.dense()).abs().max() <= 1e-6 * full.dense().abs().max()
    finally:
        METHODS.pop("half-memit")


def test_sequential_benchmark_smoke(quick_world, tmp_path):
    result = main(["--world", str(quick_world), "--n", "4", "--round-size", "2", "--steps", "3", "--samples", "50",
                   "--stats-dir", str(tmp_path / "stats"), "--out-dir", str(tmp_path / "out")])
    data = json.loads(Path(result["json"]).read_text())
    assert [r["rule"] for r in data["runs"]] == ["memit", "memit-preserve", "alphaedit"]
    for run in data["runs"]:
        assert [r["n_edits"] for r in run["rounds"]] == [2, 4]
        for r in run["rounds"]:
            assert r["seconds"] > 0 and all(0 <= r[m] <= 100 for m in ("ES", "PS", "NS", "ES_first_round"))
    assert data["serial_z"]["rounds"] == 1 and data["serial_z"]["ratio"] > 0
    assert Path(data["plot"]).stat().st_size > 1000
