"""Edits inside a training loop (DESIGN §15): the Trainer callback applies a batch of edits, the
edited facts are evaluated as training goes on, and the ones below the threshold are re-applied;
the plain per-step call does the same in a hand-written loop, printing nothing."""
from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from massedit.editor import MassEditor
from massedit.edits.training import EditCallback, TrainingEdits
from test_parallel import CORPUS, TEMPLATES, _hparams
from tiny import make_model


def _record(case_id, subject, prompt, new, true, paraphrase, neighbor):
    return {"case_id": case_id, "paraphrase_prompts": [paraphrase], "neighborhood_prompts": [neighbor],
            "requested_rewrite": {"prompt": prompt, "subject": subject, "target_new": {"str": new},
                                  "target_true": {"str": true}, "relation_id": "P1"}}


RECORDS = [
    _record(0, "Michael Jordan", "{} plays the sport of", "baseball", "basketball", "Michael Jordan is a player of",
            "Lionel Messi plays the sport of"),
    _record(1, "Marie Curie", "The mother tongue of {} is", "Spanish", "French", "Marie Curie speaks",
            "The mother tongue of Albert Einstein is"),
]


@pytest.fixture
def editor(tmp_path):
    model, tok = make_model("gpt2")
    return MassEditor(model, tok, _hparams(model), stats_dir=tmp_path / "stats", corpus=CORPUS, model_name="tiny",
                      context_templates=TEMPLATES, progress=False)


def _recording_evaluations(edits: TrainingEdits) -> list[dict]:
    """Every evaluation `edits` runs, as it returns it."""
    seen, real = [], edits.evaluate

    def evaluate():
        seen.append(real())
        return seen[-1]

    edits.evaluate = evaluate
    return seen


def _subjects(records) -> list[str]:
    return [r["requested_rewrite"]["subject"] if isinstance(r, dict) else r.subject for r in records]


def test_callback_applies_evaluates_and_reapplies_inside_trainer_train(editor, tmp_path):
    model, tok = editor.model, editor.tok
    callback = EditCallback(editor, {0: RECORDS}, eval_every=2, reapply="below:0.5")
    evaluations = _recording_evaluations(callback.edits)
    texts = [tok(t, truncation=True, max_length=24) for t in CORPUS[:16]]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_steps=100, save_strategy="no", report_to="none", use_cpu=True,
                             disable_tqdm=True, seed=0)
    embeddings = model.get_input_embeddings().weight.detach().clone()
    trainer = Trainer(model=model, args=args, train_dataset=texts, callbacks=[callback],
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    trainer.train()

    assert trainer.state.global_step == 4
    assert not torch.equal(model.get_input_embeddings().weight, embeddings)  # it trained
    edits = callback.edits
    assert [h["step"] for h in edits.history] == [0, 2, 4] and len(evaluations) == 3
    assert edits.history[0]["edits/applied"] == len(RECORDS)
    assert _subjects(edits.results[0].requests) == _subjects(RECORDS)
    # Every evaluation re-applies exactly the edits whose efficacy it found below 0.5.
    reapplied = iter(edits.results[1:])
    for h, evaluation in zip(edits.history, evaluations):
        faded = [rec for rec, case in zip(RECORDS, evaluation["per_case"]) if case["ES"] < 0.5]
        assert h["edits/reapplied"] == len(faded)
        assert h["edits/ES"] == evaluation["metrics"]["ES"]["mean"]
        if faded:
            assert _subjects(next(reapplied).requests) == _subjects(faded)
    assert next(reapplied, None) is None
    assert sum(h["edits/reapplied"] for h in edits.history) >= 1  # the tiny model's first edit does not take
    # The metrics reach the trainer's log history, at the steps they were logged.
    logged = [h for h in trainer.state.log_history if any(k.startswith("edits/") for k in h)]
    assert [h["step"] for h in logged] == [2, 4]
    assert logged[0]["edits/applied"] == len(RECORDS) and "edits/NS" in logged[1]


def test_plain_call_in_a_hand_written_loop_prints_nothing(editor, capfd):
    model, tok = editor.model, editor.tok
    edits = TrainingEdits(editor, {1: RECORDS[:1], 2: RECORDS[1:]}, eval_every=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    batch = tok(CORPUS[:4], return_tensors="pt", padding=True)
    model.train()
    out = {}
    for step in range(4):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        out[step] = edits(step)
    assert model.training  # the edits and evaluations leave the model training
    assert out[0] == {} and out[1]["edits/applied"] == 1 and out[2]["edits/applied"] == 1
    assert "edits/applied" not in out[3] and set(out[3]) == {"edits/ES", "edits/PS", "edits/NS"}
    assert [h["step"] for h in edits.history] == [1, 2, 3] and len(edits.records) == 2 and len(edits.results) == 2
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize("kwargs, message", [
    (dict(schedule={0: RECORDS}, reapply="sometimes", eval_every=1), "reapply must be 'never' or 'below:X'"),
    (dict(schedule={0: RECORDS}, reapply="below:1.5", eval_every=1), "0 < X <= 1"),
    (dict(schedule={0: RECORDS}, reapply="below:0.8"), "needs eval_every"),
    (dict(schedule={-1: RECORDS}), "step -1 is not a training step"),
    (dict(schedule={3: RECORDS[0]}), r"schedule\[3\]: must be a non-empty list"),
    (dict(schedule={0: RECORDS}, eval_every=0), "eval_every must be a positive number"),
])
def test_bad_options_are_refused_in_one_line(editor, kwargs, message):
    schedule = kwargs.pop("schedule")
    with pytest.raises(ValueError, match=message):
        TrainingEdits(editor, schedule, **kwargs)
