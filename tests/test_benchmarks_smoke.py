"""Smoke tests of the benchmarks: they run end to end, fast, and write what they promise, and
every `python -m benchmarks.NAME` answers --help. No timing assertions."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import phases as P
from benchmarks import scaling, table
from benchmarks.table import render


def test_scaling_suite_smoke(tmp_path, capsys):
    result = scaling.main(["--smoke", "--out-dir", str(tmp_path), "--single", "1"])
    data = json.loads(Path(result["json"]).read_text(encoding="utf-8"))
    assert data["suite"] == "scaling" and data["fallback"] is True
    assert data["model"]["kind"] == "random-fallback"
    for key in ("cpu", "cpu_count", "torch_threads", "torch", "transformers", "python"):
        assert key in data["machine"], key
    assert data["sizes"] == [1, 2]
    assert {(r["method"], r["n"]) for r in data["runs"]} == {
        (m, n) for m in ("rome", "memit-serial", "memit") for n in (1, 2)}
    for r in data["runs"]:
        assert r["restored"] is True
        assert r["edit_s"] > 0 and r["timings"]["z"] > 0 and r["timings"]["total"] > 0
        assert r["memory"]["peak_mb"] >= 0 and "method" in r["memory"]
        assert set(r["metrics"]) >= {"ES", "PS", "NS", "S"} and set(r["pre_metrics"]) >= {"ES", "PS", "NS", "S"}
    per_n = data["ratios"]["per_n"]["2"]
    assert per_n["memit-serial/memit"] > 0 and per_n["rome/memit"] > 0
    assert data["ratios"]["largest_common"]["rome/memit"]["n"] == 2
    assert data["rome_single"]["k"] == 1
    for png in data["plots"].values():
        assert Path(png).stat().st_size > 1000
    out = capsys.readouterr().out
    assert "RANDOM FALLBACK" in out and "rome / memit" in out
    # The table command renders the newest JSON of a directory.
    text = table.main(["--dir", str(tmp_path)])
    assert text == render(data)
    assert "| 2 |" in text


class _Stub:
    """Stands in for pytest-benchmark's fixture: runs the function once."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn, *args, **kwargs):
        self.calls += 1
        return fn(*args, **kwargs)


def test_phase_benchmarks_run_without_the_plugin():
    stub = _Stub()
    solved = P.bench_solve(stub, 4)
    assert solved.shape == (P.setup().cov.shape[0], 4) and torch.isfinite(solved).all()
    before = P.setup().layout.rewrite_module(P.LAYER).weight.detach().clone()
    P.bench_apply(stub, 2)
    assert torch.equal(P.setup().layout.rewrite_module(P.LAYER).weight, before)  # apply + revert
    z = P.bench_z(stub, "rome", 1)
    assert len(z) == 1 and torch.isfinite(z[0].z).all()
    assert stub.calls == 3


BENCHMARKS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")
                    if p.stem not in ("__init__", "common", "conftest", "z_cache") and not p.stem.startswith("test_"))


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_is_a_module_with_help(name, capsys):
    module = importlib.import_module(f"benchmarks.{name}")
    assert 'if __name__ == "__main__":' in Path(module.__file__).read_text(encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert f"python -m benchmarks.{name}" in capsys.readouterr().out


def test_help_through_python_m():
    out = subprocess.run([sys.executable, "-m", "benchmarks.table", "--help"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.startswith("usage: python -m benchmarks.table")
