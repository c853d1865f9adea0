"""Smoke test of `python -m benchmarks.retention` on a tiny Llama with facts from the real-facts
builder: three rules from the same weights, curves every 2 of 4 training steps, JSON, plot, table."""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks import retention
from massedit.inputs.facts import build_facts
from test_facts import oracle
from tiny import make_model


def test_retention_benchmark_smoke(tmp_path, capsys):
    model, tok = make_model("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    build_facts(oracle(), relations=("P36",), max_per_relation=4, model="tiny").write(tmp_path / "facts")
    out = tmp_path / "retention.json"
    # lr 1e-3 so that 4 steps move a tiny model; threshold 1: every fact not fully edited is re-applied.
    assert retention.main(["--model", str(tmp_path / "model"), "--facts", str(tmp_path / "facts"), "--n", "3",
                           "--steps", "4", "--eval-every", "2", "--lr", "1e-3", "--batch-size", "2",
                           "--max-length", "24", "--heldout", "4", "--threshold", "1", "--corpus", "pydoc",
                           "--samples", "40", "--z-steps", "5", "--threads", "1", "--stats-dir",
                           str(tmp_path / "stats"), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert list(data["rules"]) == ["memit", "alphaedit", "memit-reapply"]
    assert data["settings"]["n"] == 3 and data["facts"]["edited"] == 3
    assert {"ES", "PS", "NS", "loss"} <= set(data["pre"])
    runs = data["rules"].values()
    for run in runs:
        assert [p["step"] for p in run["curve"]] == [0, 2, 4]
        for point in run["curve"]:
            assert {"ES", "PS", "NS"} <= set(point) and point["loss"] > 0
        assert run["curve"][-1]["loss"] != run["curve"][0]["loss"]  # it trained
    memit, alphaedit, reapply = data["rules"].values()
    assert memit["reapplied_total"] == alphaedit["reapplied_total"] == 0
    # The reapply rule re-applies exactly the facts its evaluation found below ES 1.
    for point in reapply["curve"]:
        assert point["reapplied"] == round(3 * (100 - point["ES"]) / 100)
        assert ("after_reapply" in point) == (point["reapplied"] > 0)
    assert reapply["reapplied_total"] > 0 and reapply["reapply_seconds"] > 0
    assert reapply["reapply"] == "below:1.0" and memit["reapply"] == "never"
    # The weights memit trained were restored: both MEMIT rules make the same edit from the unedited weights
    # (evaluated before any re-application).
    assert all(memit["curve"][0][m] == reapply["curve"][0][m] for m in ("ES", "PS", "NS"))
    assert Path(data["plot"]).exists()
    printed = capsys.readouterr().out
    assert "held-out loss" in printed and "memit-reapply" in printed
