"""Smoke test of benchmarks/sequential.py on the quick world: it runs end to end and writes what it
promises. No timing assertions."""
import json
from pathlib import Path

from benchmarks.sequential import main
from massedit.world.build import build_world


def test_sequential_benchmark_smoke(tmp_path):
    world = tmp_path / "world"
    build_world(world, quick=True, threads=1)
    result = main(["--world", str(world), "--n", "4", "--round-size", "2", "--steps", "3", "--samples", "50",
                   "--stats-dir", str(tmp_path / "stats"), "--out-dir", str(tmp_path / "out")])
    data = json.loads(Path(result["json"]).read_text())
    assert [r["rule"] for r in data["runs"]] == ["memit", "memit-preserve", "alphaedit"]
    for run in data["runs"]:
        assert [r["n_edits"] for r in run["rounds"]] == [2, 4]
        for r in run["rounds"]:
            assert r["seconds"] > 0 and all(0 <= r[m] <= 100 for m in ("ES", "PS", "NS", "ES_first_round"))
    assert data["serial_z"]["rounds"] == 1 and data["serial_z"]["ratio"] > 0
    assert Path(data["plot"]).stat().st_size > 1000
