"""The GPU check's smoke mode runs every section on the CPU (each in its own process) and writes
its JSON and table; a section that fails or overruns its time box is recorded and the others
still run; without a GPU the full check exits with code 2."""
import json
from types import SimpleNamespace

import pytest
import torch

from benchmarks import gpu_check


def test_smoke_runs_every_section(tmp_path, capsys):
    out = tmp_path / "check.json"
    result = gpu_check.main(["--smoke", "--out", str(out)])
    table = capsys.readouterr().out
    data = json.loads(out.read_text(encoding="utf-8"))
    assert result["out"] == str(out) and data["smoke"] is True
    sections = data["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    assert {k: v["status"] for k, v in sections.items()} == dict.fromkeys(gpu_check.SECTIONS, "ok"), {
        k: v.get("stderr_tail") for k, v in sections.items()}

    rows = sections["covariance"]["rows"]
    assert {(r["d"], r["masked"]) for r in rows} == {(64, False), (64, True)}
    assert all(r["max_abs_err"] < 1e-3 and r["triton_tflops"] > 0 for r in rows)  # the interpreter ran the kernel
    stats = sections["statistics"]
    assert stats["tokens"] > 0 and stats["tokens_per_s"] > 0 and stats["layers"] == [0]
    for name in ("edit-1000", "edit-4000", "serial-64", "two-gpu"):
        sec = sections[name]
        assert sec["edits"] == gpu_check.SMOKE_EDITS[name] and sec["total_s"] >= sec["z_s"] > 0, name
        assert sec["z_mfu"] is None and sec["z_tokens_per_s"] > 0, name
    assert sections["serial-64"]["ratio_total"] > 0 and "measured" in sections["serial-64"]["note"]
    assert sections["two-gpu"]["device_map"] == ["cpu"]
    for name in gpu_check.SECTIONS:
        assert name in table


def test_failed_and_timed_out_sections_are_recorded(tmp_path):
    args = SimpleNamespace(smoke=False, z_steps=1)
    # not smoke on a machine without CUDA: the section raises in its process
    failed = gpu_check._child("covariance", args, timeout=120, workdir=tmp_path)
    assert failed["status"] == "failed" and failed["returncode"] != 0 and failed["stderr_tail"]
    late = gpu_check._child("statistics", SimpleNamespace(smoke=True, z_steps=1), timeout=0.05, workdir=tmp_path)
    assert late["status"] == "timeout" and late["timeout_s"] == 0.05


def test_one_failure_does_not_stop_the_others(tmp_path, monkeypatch):
    seen = []

    def fake_child(name, args, timeout, workdir):
        seen.append(name)
        written = json.loads(out.read_text(encoding="utf-8"))["sections"] if out.exists() else {}
        assert list(written) == seen[:-1]  # the JSON holds every section finished so far
        if name == "statistics":
            return {"status": "failed", "wall_s": 1.0, "returncode": 1, "stderr_tail": "CUDA out of memory"}
        if name == "covariance":
            return {"status": "ok", "wall_s": 1.0, "rows": [], "peak_bf16_dense_flops": None}
        return {"status": "timeout", "wall_s": timeout, "timeout_s": timeout}

    out = tmp_path / "check.json"
    monkeypatch.setattr(gpu_check, "_child", fake_child)
    gpu_check.main(["--smoke", "--out", str(out)])
    data = json.loads(out.read_text(encoding="utf-8"))
    assert seen == list(gpu_check.SECTIONS)
    assert data["sections"]["statistics"]["status"] == "failed"
    assert data["sections"]["edit-4000"]["status"] == "timeout"


def test_time_left_flows_to_the_sections_after():
    everything = list(gpu_check.SECTIONS)
    assert gpu_check.time_box("covariance", everything, 480) == pytest.approx(480 * 0.08)
    # two-gpu skipped: its weight goes to those still to run
    rest = ["edit-4000", "serial-64"]
    assert gpu_check.time_box("edit-4000", rest, 300) == pytest.approx(300 * 0.42 / 0.56)
    assert gpu_check.time_box("serial-64", ["serial-64"], 90) == pytest.approx(90)
    assert gpu_check.time_box("serial-64", ["serial-64"], -5) == 1.0  # overran: still a short try


def test_full_check_needs_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as err:
        gpu_check.main([])
    assert err.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
