"""benchmarks.memat and benchmarks.sequential on a real model's facts (`--model M --facts DIR`),
smoke-tested on a tiny Llama with the real-facts builder's bilingual output (a stub knowledge check
that knows every fact): MEMAT against MEMIT with its key transfer, the same Catalan file taken by
`massedit edit --method memat --memat-records` unchanged; every sequential rule, AlphaEdit at a
given threshold and at one picked from the covariance spectrum, --hparams with the flags as
overrides, the JSON rewritten after every round; and both benchmarks' one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import memat
from benchmarks import sequential
from massedit.inputs.facts import build_facts
from test_facts import oracle
from tiny import make_model

pytestmark = pytest.mark.filterwarnings("ignore:.*did not converge")

RELATIONS = ("P36", "P30", "P17")


@pytest.fixture(scope="module")
def facts(tmp_path_factory) -> Path:
    """DIR/counterfact.json (en), DIR/ca/counterfact.json, DIR/facts.json, as `massedit data facts
    --languages en,ca` writes them."""
    out = tmp_path_factory.mktemp("facts") / "facts"
    build_facts(oracle(), relations=RELATIONS, languages=("en", "ca"), max_per_relation=4, model="tiny").write(out)
    return out


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """model type -> the directory of a saved tiny model of that type (each saved once)."""
    saved: dict = {}

    def get(model_type: str) -> Path:
        if model_type not in saved:
            out = tmp_path_factory.mktemp("model") / f"tiny-{model_type}"
            model, tok = make_model(model_type)
            model.save_pretrained(out)
            tok.save_pretrained(out)
            saved[model_type] = out
        return saved[model_type]

    return get


@pytest.fixture
def model_dir(saved_model) -> Path:
    return saved_model("llama")


@pytest.fixture(autouse=True)
def small_sampled_corpus(monkeypatch):
    import massedit.inputs.corpus as corpus

    monkeypatch.setattr(corpus, "SAMPLED_DOCS", 6)  # the model-written corpus, small for a smoke test


# ------------------------------------------------------------------------------------------ memat

# Gemma 3 as the model; Llama as the family of SmolLM2. Both get o_proj's bias through their
# attention_bias flag.
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_memat_benchmark_on_real_facts(facts, saved_model, tmp_path, capsys, model_type):
    model_dir = saved_model(model_type)
    result = memat.main(["--model", str(model_dir), "--facts", str(facts), "--n", "10", "--k", "1,2", "--layers", "1,2",
                     "--steps", "4", "--samples", "40", "--stats-dir", str(tmp_path / "stats"), "--threads", "1",
                     "--out-dir", str(tmp_path)])
    data = json.loads(Path(result["json"]).read_text(encoding="utf-8"))
    assert data["model"] == str(model_dir) and data["l2_records"] == str(facts / "ca" / "counterfact.json")
    assert data["facts_build"]["languages"] == ["en", "ca"] and "world_facts" not in data
    assert data["n"] == 10 and data["hparams"]["layers"] == [1, 2] and data["hparams"]["v_num_grad_steps"] == 4
    assert data["memit"]["restored"] is True and set(data["key_transfer"]) == {"1", "2"}
    assert data["wall_seconds"] > 0
    assert Path(data["plot"]).stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "key transfer, layer 1" in printed
    assert [r["k"] for r in data["memat"]] == [1, 2]
    assert data["probe_facts"]["facts_right"] == data["memit"]["l2_right"]
    assert data["probe_facts"]["n_train_facts"] + data["probe_facts"]["n_val_facts"] == data["memit"]["l2_right"]
    for run in data["memat"]:
        assert run["restored"] is True and len(run["details"]["heads"]) == run["k"]
        for lang in memat.LANGUAGES:
            assert run["metrics"][lang]["ES"]["n"] == 10
    assert "probes: trained on" in printed and "| MEMAT K=2 | L2 |" in printed


def test_too_few_facts_right_in_l2_still_reports_memit_and_key_transfer(facts, model_dir, tmp_path, capsys):
    # One edit: MEMAT's probes need two facts right in L2, so MEMAT cannot run.
    result = memat.main(["--model", str(model_dir), "--facts", str(facts), "--n", "1", "--k", "1", "--layers", "1",
                     "--steps", "2", "--samples", "40", "--stats-dir", str(tmp_path / "stats"), "--threads", "1",
                     "--out-dir", str(tmp_path)])
    data = json.loads(Path(result["json"]).read_text(encoding="utf-8"))
    assert data["memat"] == [] and "at least 2" in data["memat_error"]
    assert set(data["key_transfer"]) == {"1"} and Path(data["plot"]).stat().st_size > 1000
    assert "MEMAT did not run" in capsys.readouterr().out


def test_builders_catalan_file_feeds_memat_records_unchanged(facts, model_dir, tmp_path):
    from massedit.cli import main

    hp = {"layers": [1], "v_num_grad_steps": 3, "clamp_norm_factor": 10, "mom2_n_samples": 20,
          "mom2_dataset": "tiny", "memat_top_k": 2, "memat_batch_size": 4}
    (tmp_path / "hp.json").write_text(json.dumps(hp))
    (tmp_path / "corpus.txt").write_text("Paris is the capital of France.\nLisbon is in Europe.\nRoma és a Itàlia.\n")
    (tmp_path / "ctx.json").write_text(json.dumps([["{}"]]))
    args = ["edit", "--model", str(model_dir), "--requests", str(facts / "counterfact.json"), "--method", "memat",
            "--memat-records", str(facts / "ca" / "counterfact.json"), "--hparams", str(tmp_path / "hp.json"),
            "--corpus", str(tmp_path / "corpus.txt"), "--stats-dir", str(tmp_path / "stats"),
            "--context-templates", str(tmp_path / "ctx.json"), "--quiet", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    n = len(json.loads((facts / "counterfact.json").read_text()))
    assert report["details"]["facts"] == n and len(report["details"]["heads"]) == 2


# ------------------------------------------------------------------------------------------ sequential


def _args(model_dir, facts, tmp_path, *extra) -> list[str]:
    return ["--model", str(model_dir), "--facts", str(facts), "--n", "4", "--round-size", "2", "--layers", "1,2",
            "--steps", "2", "--samples", "40", "--stats-dir", str(tmp_path / "stats"), "--threads", "1",
            "--out-dir", str(tmp_path / "out"), *extra]


def test_sequential_benchmark_on_real_facts(facts, model_dir, tmp_path):
    result = sequential.main(_args(model_dir, facts, tmp_path, "--threshold", "2e-2,spectrum", "--null-mass", "0.2"))
    data = json.loads(Path(result["json"]).read_text())
    assert data["model"] == str(model_dir) and data["facts"] == str(facts) and data["n"] == 4
    assert [r["rule"] for r in data["runs"]] == ["memit", "memit-preserve", "alphaedit", "alphaedit"]
    for run in data["runs"]:
        assert [r["n_edits"] for r in run["rounds"]] == [2, 4]
        for r in run["rounds"]:
            assert r["seconds"] > 0 and r["eval_seconds"] > 0
            assert all(r[m] is None or 0 <= r[m] <= 100 for m in sequential.PANELS)
            assert r["ES_first_round"] is not None
    public, picked = data["runs"][2:]
    assert public["threshold"] == 2e-2 and public["L2"] == 10 and public["threshold_from"] == 2e-2
    assert picked["threshold_from"] == "spectrum" and picked["null_mass"] == 0.2 and picked["threshold"] > 0
    for run in (public, picked):
        assert set(run["spectrum"]) == {"1", "2"}
        for layer, s in run["spectrum"].items():
            assert s["null_dim"] == run["null_space_dim"][layer]
    # The picked threshold leaves at most --null-mass of the pooled eigenvalue mass below it.
    pooled = sum(s["null_mass"] * s["trace"] for s in picked["spectrum"].values())
    assert pooled <= 0.2 * sum(s["trace"] for s in picked["spectrum"].values()) + 1e-9
    assert data["serial_z"]["rounds"] == 1 and data["serial_z"]["threshold"] == 2e-2
    assert Path(data["plot"]).stat().st_size > 1000


def test_hparams_file_drives_alphaedit_and_flags_override_it(facts, model_dir, tmp_path, monkeypatch):
    from massedit.edits.sequential import SequentialEditor

    (tmp_path / "hp.json").write_text(json.dumps({"layers": [2], "nullspace_threshold": 0.5, "L2": 3.0,
                                                  "mom2_update_weight": 50.0}))
    edit_round = SequentialEditor.edit_round
    calls = []

    class Stopped(Exception):
        pass

    def stop_after_one(self, batch, *a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise Stopped
        return edit_round(self, batch, *a, **k)

    monkeypatch.setattr(SequentialEditor, "edit_round", stop_after_one)
    with pytest.raises(Stopped):
        sequential.main(_args(model_dir, facts, tmp_path, "--rules", "alphaedit", "--hparams",
                              str(tmp_path / "hp.json"), "--l2", "7", "--serial-rounds", "0"))
    # Stopped in round 2: the file holds round 1.
    [path] = (tmp_path / "out").glob("sequential-*.json")
    data = json.loads(path.read_text())
    [run] = data["runs"]
    assert run["threshold"] == 0.5 and run["threshold_from"] == "hparams" and run["L2"] == 7.0
    assert [r["n_edits"] for r in run["rounds"]] == [2] and data["hparams_file"] == str(tmp_path / "hp.json")


def test_spectrum_threshold_of_a_known_spectrum():
    spectra = {0: torch.tensor([94.0, 1.0, 3.0, 2.0]), 3: torch.tensor([1.0, 2.0, 3.0, 94.0])}
    # Pooled and sorted: 1 1 2 2 3 3 94 94 (sum 200); 1+1+2+2 = 6 is 3% of the mass. The threshold lies
    # halfway to the next eigenvalue, so that no eigenvalue sits on it.
    assert sequential.spectrum_threshold(spectra, 0.03) == 2.5
    assert sequential.spectrum_threshold(spectra, 0.029) == 2.0  # 1 1 2 inside, but 2 ties with the next
    assert sequential.spectrum_threshold(spectra, 0.001) == 0.5  # nothing below the smallest eigenvalue
    assert sequential.spectrum_threshold(spectra, 1.0) == 188.0  # everything below
    summary = sequential.spectrum_summary(spectra, 3.0)
    assert summary["0"]["null_dim"] == 2 and summary["0"]["null_mass"] == pytest.approx(0.03)
    assert summary["3"]["quantiles"]["1"] == 94.0 and summary["3"]["dim"] == 4


@pytest.mark.parametrize("module, extra, message", [
    (memat, ["--world", "{tmp}", "--facts", "{facts}", "--model", "m"], "exactly one of --world and --facts"),
    (memat, [], "exactly one of --world and --facts"),
    (memat, ["--facts", "{facts}"], "--facts needs --model"),
    (memat, ["--world", "{tmp}", "--lam", "1000"], "--lam go with --model and --facts"),
    (memat, ["--facts", "{tmp}", "--model", "m"], "no counterfact.json; build it with `massedit data facts"),
    (memat, ["--facts", "{en}", "--model", "m"], "no ca/counterfact.json; rebuild the facts with both languages"),
    (memat, ["--facts", "{facts}", "--model", "m", "--l2", "fr"], "no fr/counterfact.json"),
    (memat, ["--world", "{tmp}", "--l2", "ca"], "--l2 goes with --facts"),
    (memat, ["--facts", "{facts}", "--model", "m", "--layers", "1,x"], "--layers: comma-separated integers"),
    (sequential, ["--world", "{tmp}", "--facts", "{facts}", "--model", "m"], "exactly one of --world and --facts"),
    (sequential, ["--world", "{tmp}", "--layers", "1"], "--layers go with --model and --facts"),
    (sequential, ["--facts", "{facts}", "--model", "m", "--threshold", "2e-2,gap"],
     "--threshold: comma-separated numbers"),
    (sequential, ["--facts", "{facts}", "--model", "m", "--threshold", "0"], "thresholds must be > 0"),
    (sequential, ["--facts", "{facts}", "--model", "m", "--null-mass", "1.5"], "--null-mass: a share between 0 and 1"),
    (sequential, ["--facts", "{facts}", "--model", "m", "--rules", "rome"], "--rules from memit"),
    (sequential, ["--facts", "{facts}", "--model", "m", "--hparams", "{tmp}/bad.json"],
     'unknown key(s) "nullspace_treshold"'),
])
def test_wrong_arguments_are_one_line_errors(facts, tmp_path, capsys, module, extra, message):
    en = tmp_path / "en"
    en.mkdir()
    (en / "counterfact.json").write_text("[]")
    (tmp_path / "bad.json").write_text(json.dumps({"layers": [1], "nullspace_treshold": 0.1}))
    values = {"{tmp}": str(tmp_path), "{facts}": str(facts), "{en}": str(en)}
    with pytest.raises(SystemExit):
        module.main([values.get(a, a.replace("{tmp}", str(tmp_path))) for a in extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
