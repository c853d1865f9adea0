"""Smoke test of benchmarks/memat.py on a quick bilingual world: it runs end to end, restores the
model between runs, and writes what it promises. No timing assertions."""
import json
from pathlib import Path

import pytest

from benchmarks import memat as B
from massedit.world.build import build_world


@pytest.fixture(scope="module")
def bilingual_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "bi-quick"
    build_world(out, quick=True, languages=2, threads=1)
    return out


def test_memat_benchmark_smoke(bilingual_world, tmp_path, capsys):
    result = B.main(["--world", str(bilingual_world), "--n", "6", "--k", "1,2", "--steps", "5", "--samples", "50",
                     "--stats-dir", str(tmp_path / "stats"), "--threads", "1", "--out-dir", str(tmp_path)])
    data = json.loads(Path(result["json"]).read_text(encoding="utf-8"))
    assert Path(data["plot"]).stat().st_size > 1000
    assert data["n"] == 6 and data["k"] == [1, 2]
    for part in [data["pre"], data["memit"]["metrics"]] + [r["metrics"] for r in data["memat"]]:
        assert set(part) == set(B.LANGUAGES)
        for lang in B.LANGUAGES:
            assert set(part[lang]) == set(B.METRICS)
            assert part[lang]["ES"]["n"] == 6
    assert data["memit"]["restored"] is True
    for layer in data["hparams"]["layers"]:
        keys = data["key_transfer"][str(layer)]
        assert -1 <= keys["cos_same_fact"] <= 1 and keys["edit_reach_l2_over_l1_median"] >= 0
    assert [r["k"] for r in data["memat"]] == [1, 2]
    for run in data["memat"]:
        # One z optimization for every K: the MEMIT phase writes exactly what the MEMIT run did.
        assert run["restored"] is True and run["memit_phase_identical"] is True and run["memit_phase_rel_diff"] == 0
        assert len(run["details"]["heads"]) == run["k"]
        assert set(B.PHASES) <= set(run["timings"])
        grid = run["probe_accuracy"]
        assert len(grid) == data["n_layers"] and all(len(row) == data["n_heads"] for row in grid)
        assert run["details"]["best_val_accuracy"] == max(max(row) for row in grid)
        # The benchmark's count of facts MEMIT gets right in L2 is the one MEMAT's probes train on.
        assert run["details"]["facts_right"] == data["memit"]["l2_right"]
        split = run["l2_em_gain_by_transfer"]
        assert split["right_after_memit"]["n"] + split["wrong_after_memit"]["n"] == 6
        for lang in B.LANGUAGES:
            mine, base = run["metrics"][lang]["EM"]["mean"], data["memit"]["metrics"][lang]["EM"]["mean"]
            assert run["gains"][lang]["EM_diff"] == pytest.approx(mine - base)
    out = capsys.readouterr().out
    assert "| MEMAT K=2 | L2 |" in out and "wrote" in out


def test_k_values():
    assert B.k_values(None, 24) == [4, 8, 16, 24]
    assert B.k_values(None, 32) == [4, 8, 16, 32]
    assert B.k_values(None, 64) == [4, 8, 16, 32]
    assert B.k_values([2, 2, 3], 4) == [2, 3]
    with pytest.raises(SystemExit, match="--k 8: the model has 4 heads"):
        B.k_values([2, 8], 4)


def test_relative_gain():
    assert B.relative_gain(11.0, 10.0) == pytest.approx(10.0)
    assert B.relative_gain(-1.0, -2.0) == pytest.approx(50.0)
    assert B.relative_gain(1.0, 0.0) is None and B.relative_gain(None, 1.0) is None


def test_monolingual_world_is_refused(tmp_path, capsys):
    (tmp_path / "counterfact.json").write_text("[]")
    with pytest.raises(SystemExit):
        B.main(["--world", str(tmp_path)])
    assert "counterfact.l2.json" in capsys.readouterr().err


def test_stored_z_and_an_hparams_file(bilingual_world, tmp_path):
    """--z-cache: the second run takes the first's z (MEMIT scores the same) and MEMAT's keys come
    from --hparams."""
    common = ["--world", str(bilingual_world), "--n", "6", "--k", "1", "--steps", "5", "--samples", "50",
              "--stats-dir", str(tmp_path / "stats"), "--threads", "1", "--out-dir", str(tmp_path),
              "--z-cache", str(tmp_path / "z")]
    first = json.loads(Path(B.main(common)["json"]).read_text(encoding="utf-8"))
    assert first["memit"]["z"] == "optimized" and len(list((tmp_path / "z").glob("z-*.pt"))) == 1
    hp = {**first["hparams"], "memat_lr": 0.05, "memat_epochs": 2}
    (tmp_path / "hp.json").write_text(json.dumps(hp), encoding="utf-8")
    second = json.loads(Path(B.main(common + ["--hparams", str(tmp_path / "hp.json")])["json"]).read_text())
    assert second["memit"]["z"].startswith("stored: ")
    assert second["memit"]["metrics"] == first["memit"]["metrics"]
    assert second["hparams"]["memat_lr"] == 0.05 and second["hparams"]["memat_epochs"] == 2
    assert second["hparams_file"] == str(tmp_path / "hp.json") and first["hparams_file"] is None
    # Two epochs of one mini-batch (6 requests < 32): two ω steps.
    assert second["memat"][0]["omega_steps"] == 2


def test_an_hparams_file_with_an_unknown_key_is_one_line(tmp_path, capsys):
    for name in ("counterfact.json", "counterfact.l2.json"):
        (tmp_path / name).write_text("[]", encoding="utf-8")
    (tmp_path / "model").mkdir()
    (tmp_path / "hp.json").write_text('{"memat_learning_rate": 0.1}', encoding="utf-8")
    with pytest.raises(SystemExit):
        B.main(["--world", str(tmp_path), "--hparams", str(tmp_path / "hp.json")])
    assert "memat_learning_rate" in capsys.readouterr().err
