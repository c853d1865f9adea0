"""Smoke test of the editing benchmark: it runs end to end and writes the expected JSON (no timing checks)."""
import json

from benchmarks.edit_speed import main


def test_bench_edit_smoke(tmp_path):
    out = tmp_path / "r.json"
    result = main(["--smoke", "--out", str(out)])
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["benchmark"] == "edit_speed"
    assert result["edit"]["n"] == data["edit"]["n"] == 8

    for key in ("timestamp", "machine", "model", "hparams", "context_templates", "requests", "edit",
                "reference_update", "statistics", "goals"):
        assert key in data, key
    for key in ("cpu", "torch_threads", "torch", "transformers", "python"):
        assert key in data["machine"], key

    edit = data["edit"]
    for method in ("serial", "batched"):
        phases = edit[method]
        for key in ("total_s", "z_s", "keys_s", "solve_s", "update_s"):
            assert phases[key] > 0, (method, key)
    for key in ("total", "z", "keys", "solve", "update"):
        assert edit["ratio_serial_over_batched"][key] > 0, key
    assert edit["weights_unchanged"] is True
    assert set(edit["delta_rel_diff"]) == {"transformer.h.0.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.weight"}
    assert all(v >= 0 for v in edit["delta_rel_diff"].values())

    stats = data["statistics"]
    assert stats["one_pass_all_layers_s"] > 0 and stats["one_pass_per_layer_s"] > 0 and stats["speedup"] > 0
    assert stats["tokens"] > 0
    assert data["reference_update"]["ours_update_s"] > 0
    work = data["z_workload"]
    assert 0 < work["real_tokens_per_step"] <= work["serial_padded_tokens_per_step"]
    assert work["real_tokens_per_step"] <= work["batched_padded_tokens_per_step"]
    assert set(data["goals"]) == {"z_speedup", "update_vs_reference", "stats_speedup"}
