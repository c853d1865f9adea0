"""Causal tracing (massedit.evaluation.trace, `massedit trace`): a fact planted in one layer's MLP is found
there; the batched trace equals one restoration per forward; the CLI writes its files."""
import json

import pytest
import torch

from massedit.inputs import tokens as T
from massedit.cli import main
from massedit.hparams import MEMITHyperParams
from massedit.inputs.requests import EditRequest
from massedit.evaluation.trace import (GROUPS, KINDS, Tracer, default_window, make_noise, prepare, suggest_layers, trace,
                            trace_fact, trace_fact_serial, window_layers)
from tiny import MODEL_TYPES, make_model

PLANTED = 1  # the layer whose MLP holds the facts
SUBJECTS = tuple("Michael " + w for w in ("Jordan", "Danielle", "Darrieux", "city", "mother", "basketball"))
OBJECTS = ("French", "German", "Italian", "Spanish", "English", "Japanese")
PROMPTS = ("{} speaks", "The mother tongue of {} is")


def _facts() -> list[EditRequest]:
    return [EditRequest(s, p, "Tokyo", o) for s, o in zip(SUBJECTS, OBJECTS) for p in PROMPTS]


@pytest.fixture(scope="module")
def planted():
    """A 4-layer GPT-2 that can only recall its facts with layer PLANTED's MLP at the subject.

    The other MLPs output zero, and so do the attentions up to PLANTED: at that layer each position
    still holds only its own token, so the subject's last token (the one piece that tells the
    subjects apart) is the only place where the MLP can look the object up; later attentions carry
    it to the last token."""
    model, tok = make_model("gpt2", seed=0)
    for layer, block in enumerate(model.transformer.h):
        silenced = ([block.attn.c_proj] if layer <= PLANTED else []) + ([block.mlp.c_proj] if layer != PLANTED else [])
        for module in silenced:
            for p in module.parameters():
                p.data.zero_()
                p.requires_grad = False
    rows = []
    for req in _facts():
        text = req.text()
        rows.append((tok(text)["input_ids"], T.target_ids(tok, text, req.target_true)[0]))
    width = max(len(ids) for ids, _ in rows)
    # Right padding needs no mask: causal attention never lets a real token see the padding after it.
    ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in rows])
    last = torch.tensor([len(ids) - 1 for ids, _ in rows])
    answers = torch.tensor([a for _, a in rows])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(200):
        logits = model(ids).logits[torch.arange(len(rows)), last]
        loss = torch.nn.functional.cross_entropy(logits, answers)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.requires_grad_(False)
    return model, tok


def test_mlp_effect_at_the_subjects_last_token_peaks_at_the_planted_layer(planted):
    model, tok = planted
    result = trace(model, tok, _facts(), samples=5, window=1)
    assert min(t.p_clean for t in result.traces) > 0.9
    mlp = result.averaged("mlp")[GROUPS.index("last subject token")]
    assert int(mlp.argmax()) == PLANTED
    assert mlp[PLANTED] > 0.1 and mlp[PLANTED] > 10 * mlp.abs()[torch.arange(4) != PLANTED].max()
    assert result.suggested_layers(1) == [PLANTED]
    for t in result.traces:
        # Restoring the whole last residual at the last token restores the clean output.
        assert t.effects["hidden"][-1, -1] == pytest.approx(t.p_clean - t.p_corrupted, abs=1e-6)
        assert t.effects["hidden"].shape == (len(t.prompt.ids), 4) and "".join(t.tokens) == t.prompt.text


def test_last_subject_only_traces_the_layer_row_alone_and_equal_to_the_full_trace(planted):
    model, tok = planted
    full = trace(model, tok, _facts(), samples=3, window=1, kinds=("mlp",))
    row_only = trace(model, tok, _facts(), samples=3, window=1, kinds=("mlp",), last_subject_only=True)
    for a, b in zip(full.traces, row_only.traces):
        last = a.prompt.subject[1] - 1
        torch.testing.assert_close(b.effects["mlp"][last], a.effects["mlp"][last], rtol=0, atol=1e-6)
        others = torch.ones(len(a.prompt.ids), dtype=torch.bool)
        others[last] = False
        assert torch.isnan(b.effects["mlp"][others]).all()
    assert row_only.suggested_layers(1) == full.suggested_layers(1) == [PLANTED]


def _noise(tracer, prompt):
    sigma = 3 * tracer.embedding_std([prompt])
    return make_noise(3, prompt.subject[1] - prompt.subject[0], tracer.embed.weight.shape[-1], sigma, seed=1)


def _agree(model, tok, req, window, batch_tokens):
    tracer = Tracer(model)
    prompt = prepare(tok, req)
    noise = _noise(tracer, prompt)
    batched = trace_fact(tracer, tok, prompt, noise, KINDS, window, batch_tokens)
    serial = trace_fact_serial(tracer, tok, prompt, noise, KINDS, window)
    assert batched.p_corrupted == pytest.approx(serial.p_corrupted, abs=1e-5)
    for kind in KINDS:
        assert torch.allclose(batched.effects[kind], serial.effects[kind], atol=1e-5, rtol=0), kind
    return batched


def test_batched_trace_equals_one_restoration_per_forward_on_the_planted_model(planted):
    model, tok = planted
    batched = _agree(model, tok, _facts()[1], window=3, batch_tokens=50)
    assert batched.effects["mlp"].abs().max() > 0.01  # a trace with something in it


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_batched_trace_equals_serial_on_other_architectures(model_type):
    model, tok = make_model(model_type)
    _agree(model, tok, EditRequest("Michael Jordan", "{} plays the sport of", "chess", "basketball"), 2, 64)


MID_SUBJECT = EditRequest("Danielle Darrieux", "The mother tongue of {} is", "English", "French")


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
@pytest.mark.parametrize("batch_tokens", [1, 1024])
def test_restorations_resume_from_the_corrupted_keys_and_values(model_type, batch_tokens):
    """Learned (GPT-2) and rotary (Llama) positions; a subject in mid-prompt, so restorations start
    at tokens inside and after it; one row per forward or whole groups per forward."""
    model, tok = make_model(model_type)
    tracer = Tracer(model)
    prompt = prepare(tok, MID_SUBJECT)
    assert prompt.subject[0] > 0 and prompt.subject[1] < len(prompt.ids)
    assert tracer.corrupted_run(prompt, _noise(tracer, prompt)).kv is not None
    _agree(model, tok, MID_SUBJECT, 3, batch_tokens)


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_a_model_that_cannot_continue_from_a_cache_recomputes_every_position(model_type, monkeypatch):
    import massedit.evaluation.trace as trace_module

    monkeypatch.setattr(trace_module, "supports_prefix_reuse", lambda _model: False)
    model, tok = make_model(model_type)
    tracer = Tracer(model)
    prompt = prepare(tok, MID_SUBJECT)
    assert tracer.corrupted_run(prompt, _noise(tracer, prompt)).kv is None
    _agree(model, tok, MID_SUBJECT, 2, 64)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_clean_states_hold_one_vector_per_token(model_type):
    """OPT's MLP output comes flattened over rows × positions; the states are per token all the same."""
    model, tok = make_model(model_type)
    tracer = Tracer(model)
    prompt = prepare(tok, MID_SUBJECT)
    clean, _ = tracer.clean_states(prompt, KINDS)
    width = tracer.embed.weight.shape[-1]
    assert {tuple(h.shape) for h in clean.values()} == {(len(prompt.ids), width)}


def test_windows_clamp_at_the_ends_like_rome():
    assert list(window_layers(0, 10, 28)) == list(range(0, 5))
    assert list(window_layers(12, 10, 28)) == list(range(7, 17))
    assert list(window_layers(27, 10, 28)) == list(range(22, 28))
    assert list(window_layers(3, 1, 6)) == [3]
    assert [default_window(n) for n in (4, 6, 12, 28, 48)] == [1, 2, 4, 10, 10]


def test_suggested_layers_maximize_the_summed_effect_and_leave_room_after_them():
    assert suggest_layers([0.0, 0.1, 0.5, 0.4, 0.0, 0.0], 2, 6) == [2, 3]
    assert suggest_layers([0.0, 0.0, 0.0, 0.0, 0.2, 1.0], 1, 6) == [4]
    assert suggest_layers([0.3, 0.0, 0.0, 0.0], 3, 4) == [0, 1, 2]


def test_cli_writes_the_trace_heat_maps_and_a_usable_hparams_file(planted, tmp_path, capsys):
    model, tok = planted
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    records = [{"case_id": i, "requested_rewrite": {"prompt": r.prompt, "subject": r.subject,
                                                    "target_new": {"str": r.target_new},
                                                    "target_true": {"str": r.target_true}}}
               for i, r in enumerate(_facts())]
    data = tmp_path / "facts.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "trace"
    argv = ["trace", "--model", str(tmp_path / "model"), "--data", str(data), "--n", "6", "--samples", "3",
            "--window", "1", "--span", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert f"suggested layers: [{PLANTED}]" in stdout
    report = json.loads((out / "trace.json").read_text())
    assert report["suggested_layers"] == [PLANTED] and report["settings"]["facts"] == 6
    assert len(report["facts"]) == 6 and set(report["facts"][0]["effects"]) == set(KINDS)
    assert set(report["averaged"]["mlp"]) == set(GROUPS)
    for kind in KINDS:
        assert (out / f"trace_{kind}.png").stat().st_size > 1000
    hp = MEMITHyperParams.from_file(out / "hparams.json")
    assert hp.layers == [PLANTED] and hp.v_loss_layer == 3

    # A second run into the same directory would overwrite: refused without --force.
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err

    # The fast way to choose layers: the MLP kind alone, the subject's last token's row alone.
    assert main(argv + ["--force", "--kinds", "mlp", "--last-subject-only"]) == 0
    assert f"suggested layers: [{PLANTED}]" in capsys.readouterr().out
    assert set(json.loads((out / "trace.json").read_text())["facts"][0]["effects"]) == {"mlp"}
    assert main(argv + ["--force", "--kinds", "attn"]) == 2
    assert "--kinds must include mlp" in capsys.readouterr().err


def test_cli_rejects_facts_without_a_true_object_before_loading_the_model(tmp_path, capsys):
    data = tmp_path / "facts.jsonl"
    data.write_text(json.dumps({"subject": "Michael Jordan", "prompt": "{} plays", "target_new": "chess"}) + "\n")
    code = main(["trace", "--model", str(tmp_path / "no-model"), "--data", str(data), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "target_true" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_benchmark_smoke(tmp_path):
    from benchmarks.trace_speed import main as bench

    report = bench(["--smoke", "--out", str(tmp_path / "bench.json")])
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["max_abs_difference"] <= 1e-5 and saved["speedup"]["one restoration / forward / batched"]["cpu"] > 0
    assert saved["restorations"] == report["restorations"] > 0 and "load_average_at_end" in saved["machine"]


def test_benchmark_on_a_model_and_its_facts(tmp_path):
    """--model/--facts-dir: a saved model and the facts builder's records, two of the three modes."""
    from benchmarks.trace_speed import main as bench
    from massedit.inputs.facts import build_facts
    from test_facts import oracle
    from tiny import make_model as tiny_model

    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    build_facts(oracle(), relations=("P36",), max_per_relation=2, model="tiny").write(tmp_path / "facts")
    out = tmp_path / "bench.json"
    bench(["--model", str(tmp_path / "model"), "--facts-dir", str(tmp_path / "facts"), "--facts", "1", "--samples", "2",
           "--modes", "batched,one restoration / forward", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["max_abs_difference"] <= 1e-5 and list(saved["seconds"]) == ["batched", "one restoration / forward"]
    assert saved["model"]["n_layer"] == model.config.num_hidden_layers


def test_benchmark_model_needs_its_facts(capsys):
    from benchmarks.trace_speed import main as bench

    with pytest.raises(SystemExit):
        bench(["--model", "smollm2-135m"])
    assert "--model and --facts-dir go together" in capsys.readouterr().err
