"""Edits inside a training loop (DESIGN §15): apply batches of edits at chosen steps, watch how the
edited facts hold up as training goes on, and re-apply the ones that fade.

    edits = TrainingEdits(editor, {0: records}, eval_every=50, reapply="below:0.8")
    for step, batch in enumerate(loader, start=1):     # a hand-written loop
        ...; optimizer.step()
        metrics = edits(step)                          # {} at most steps

    trainer = Trainer(model, args, ..., callbacks=[EditCallback(editor, {0: records}, eval_every=50)])

`records` are CounterFact or zsRE records (massedit.inputs.records): the editor edits them and
massedit.evaluation scores them (ES/PS/NS, or zsRE's efficacy/paraphrase/specificity). Nothing is
printed: the metrics are returned, kept in `TrainingEdits.history`, and the callback adds them to
the Trainer's log (the `logs` of `on_log`, hence `state.log_history` and the callbacks after it).

Re-applying edits a fresh delta on the current (trained) weights for the records whose efficacy
per case fell below the threshold; the earlier delta stays in the weights (training has moved
them, so it can no longer be reverted exactly), and the editor's statistics are those of the
model it was made for.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Sequence

from transformers import TrainerCallback

from massedit.compute.targets import frozen_eval
from massedit.editor import EditResult, MassEditor
from massedit.evaluation import evaluate

# The metric each record kind's efficacy is, per case 0-1: what `reapply` compares.
EFFICACY = {"counterfact": "ES", "zsre": "efficacy"}
METRICS = {"counterfact": ("ES", "PS", "NS"), "zsre": ("efficacy", "paraphrase", "specificity")}


def reapply_threshold(policy: str) -> Optional[float]:
    """The efficacy below which an edit is re-applied, from "never" or "below:X" (0 < X <= 1)."""
    if policy == "never":
        return None
    kind, _, value = str(policy).partition(":")
    try:
        threshold = float(value)
    except ValueError:
        threshold = None
    if kind != "below" or threshold is None or not 0 < threshold <= 1:
        raise ValueError(f"reapply must be 'never' or 'below:X' with 0 < X <= 1 (an edit's efficacy, per case), "
                         f"e.g. 'below:0.8'; got {policy!r}")
    return threshold


def _checked_schedule(schedule) -> dict[int, list]:
    if not isinstance(schedule, Mapping) or not schedule:
        raise ValueError("schedule must be a non-empty mapping {step: [records]}, e.g. {0: records} to edit "
                         "before the first training step")
    checked = {}
    for step, records in schedule.items():
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"schedule: step {step!r} is not a training step (an integer >= 0)")
        if isinstance(records, (dict, str)) or not isinstance(records, Sequence) or not records:
            raise ValueError(f"schedule[{step}]: must be a non-empty list of CounterFact or zsRE records")
        checked[step] = list(records)
    return dict(sorted(checked.items()))


class TrainingEdits:
    """Edits applied during training, by step: call it after each optimizer step with the step
    number (`global_step`); it applies the batch scheduled for that step, evaluates the edits made
    so far every `eval_every` steps (and on the step they are made), and re-applies those whose
    efficacy fell below the `reapply` threshold ("never", or "below:X"). Returns the metrics of
    this step, keyed `prefix` + name ({} when nothing happened)."""

    def __init__(self, editor: MassEditor, schedule: Mapping[int, Sequence[dict]], *, eval_every: Optional[int] = None,
                 reapply: str = "never", method: str = "memit", eval_batch_size: int = 64, prefix: str = "edits/"):
        if eval_every is not None and (isinstance(eval_every, bool) or not isinstance(eval_every, int)
                                       or eval_every < 1):
            raise ValueError(f"eval_every must be a positive number of steps or None, got {eval_every!r}")
        self.editor, self.schedule = editor, _checked_schedule(schedule)
        self.eval_every, self.threshold = eval_every, reapply_threshold(reapply)
        if self.threshold is not None and eval_every is None:
            raise ValueError(f"reapply={reapply!r} needs eval_every: edits are re-applied when an evaluation "
                             "finds them faded")
        self.method, self.eval_batch_size, self.prefix = method, eval_batch_size, prefix
        self.records: list[dict] = []  # every record edited so far, in the order edited
        self.results: list[EditResult] = []  # every edit made, re-applications included
        self.history: list[dict] = []  # per step with metrics: {"step": ..., name: value}

    def __call__(self, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        batch = self.schedule.get(step)
        if batch is not None:
            self.results.append(self.editor.edit(batch, method=self.method))
            self.records.extend(batch)
            metrics["applied"] = len(batch)
        if self.records and self.eval_every is not None and (batch is not None or step % self.eval_every == 0):
            metrics.update(self._evaluate_and_reapply())
        if not metrics:
            return {}
        metrics = {self.prefix + name: value for name, value in metrics.items()}
        self.history.append({"step": step, **metrics})
        return metrics

    def _evaluate_and_reapply(self) -> dict[str, float]:
        result = self.evaluate()
        metrics = {name: result["metrics"][name]["mean"] for name in METRICS[result["kind"]]
                   if result["metrics"].get(name, {}).get("mean") is not None}
        if self.threshold is not None:
            efficacy = EFFICACY[result["kind"]]
            faded = [rec for rec, case in zip(self.records, result["per_case"]) if case[efficacy] < self.threshold]
            if faded:
                self.results.append(self.editor.edit(faded, method=self.method))
            metrics["reapplied"] = len(faded)
        return metrics

    def evaluate(self) -> dict:
        """massedit.evaluation.evaluate of every record edited so far, on the model as it is now
        (in eval mode, without parameter gradients, its training state restored afterwards)."""
        with frozen_eval(self.editor.model):
            return evaluate(self.editor.model, self.editor.tok, self.records, batch_size=self.eval_batch_size,
                            source="edited records")


class EditCallback(TrainerCallback):
    """A Hugging Face `TrainerCallback` running `TrainingEdits(editor, schedule, **options)` after
    every optimizer step (step 0: before the first, unless training resumes from a checkpoint).
    The metrics go into the Trainer's next log: the `logs` dict of `on_log` (reporting callbacks
    listed after this one see them) and the entry `state.log_history` holds for that step."""

    def __init__(self, editor: MassEditor, schedule: Mapping[int, Sequence[dict]], **options):
        self.edits = TrainingEdits(editor, schedule, **options)
        self._pending: dict[str, float] = {}

    def _run(self, step: int, control) -> None:
        metrics = self.edits(step)
        if metrics:
            self._pending.update(metrics)
            control.should_log = True

    def on_train_begin(self, args, state, control, **kwargs):
        # A run resumed from a checkpoint already holds the edits of the steps before it.
        if state.global_step == 0:
            self._run(0, control)

    def on_step_end(self, args, state, control, **kwargs):
        self._run(state.global_step, control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending or logs is None:
            return
        logs.update(self._pending)
        # The Trainer appended its copy of `logs` to the history before calling on_log.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self._pending)
        self._pending = {}
