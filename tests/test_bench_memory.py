"""The memory benchmark's quick mode: GPT-J-6B built on the meta device, its table printed, and
its solve and statistics figures equal to the ones worked out by hand from GPT-J's published shape
(h = 4096, d_ff = 16384, six edited layers, 6,050,882,784 parameters)."""
import json

import pytest

from benchmarks import memory

H, D, E, N = 4096, 16384, 6, 1000


def test_quick_mode_matches_hand_computed_figures(tmp_path, capsys):
    out = tmp_path / "memory.json"
    result = memory.main(["--quick", "--edits", str(N), "--out", str(out)])
    table = capsys.readouterr().out
    data = json.loads(out.read_text(encoding="utf-8"))
    assert result["out"] == str(out) and [m["shapes"]["config"] for m in data["models"]] == ["gpt-j-6b"]
    (gptj,) = data["models"]
    s = gptj["shapes"]
    assert (s["hidden"], s["key_dim"], len(s["edited_layers"]), s["params"]) == (H, D, E, 6_050_882_784)
    assert s["mlp_tensors"] == 2 and s["vocab"] == 50400

    ours, layer, ref = (gptj[k]["phases"] for k in ("massedit", "massedit_factors_on_layer", "reference"))
    assert ours["weights"]["device_bytes"] == 6_050_882_784 * 2
    assert ref["weights"]["device_bytes"] == 6_050_882_784 * 4
    # solve, factors on the host: one d×d float64 buffer being factored, keys (float32), M and the
    # result (float64), the n×n Gram matrix, this layer's ΔW factors, one 256 MiB panel
    assert ours["solve"]["device_bytes"] == 8 * D * D + 4 * D * N + 16 * D * N + 8 * N * N + 8 * N * (H + D) + 2**28
    assert ours["solve"]["device_bytes"] == 2_915_439_104
    assert ours["solve"]["host_bytes"] == E * 8 * D * D + E * 8 * N * (H + D) == 13_867_941_888
    # factors on the GPU: the other five layers' factors and ΔW factors instead of the panel
    assert layer["solve"]["device_bytes"] == 2_915_439_104 - 2**28 + 5 * 8 * D * D + 5 * 8 * N * (H + D)
    # reference: original weights (float32), C (float32), λC + KKᵀ and both terms, LU copy, K and result
    assert ref["solve"]["device_bytes"] == E * 4 * H * D + 4 * D * D + 24 * D * D + 8 * D * D + 16 * D * N
    assert ref["solve"]["device_bytes"] == 11_536_433_152
    assert ref["solve"]["host_bytes"] == E * 4 * D * D
    assert ours["statistics"]["components"]["accumulators, E·4d²"] == E * 4 * D * D
    assert gptj["previous_engine_solve_state_bytes"] == E * 16 * D * D

    rows = {tuple(line.split()[:2]): line.split()[2:] for line in table.splitlines() if line.startswith("gpt-j-6b")}
    assert rows[("gpt-j-6b", "solve")][:2] == ["2.72", "12.92"]  # GiB: 2,915,439,104 B on the GPU, 13.87 GB host
    assert rows[("gpt-j-6b", "solve")][3] == "10.74"  # the reference's 11,536,433,152 B
    assert ("gpt-j-6b", "PEAK") in rows


def test_unknown_config_is_refused(capsys):
    with pytest.raises(SystemExit) as err:
        memory.main(["--configs", "gpt-5"])
    assert err.value.code == 2
    assert "unknown config" in capsys.readouterr().err
