"""MEMAT (DESIGN §4; Hernando, Tamayo et al., arXiv 2502.02173): MEMIT, then corrections added to
a few attention heads, chosen and trained on prompts in a second language (L2).

    from massedit.methods.memat.method import Memat
    result = editor.edit(requests, method=Memat(l2_records))   # CounterFact dicts, or a JSON path
    result.details["probe_accuracy"]                           # [n_layers][n_heads] validation accuracy

The L2 records are CounterFact records whose `case_id`s are those of the requests; their
`requested_rewrite` (prompt, subject, target_new, target_true) is the same fact in L2. Steps, on
the model with MEMIT's deltas applied for the duration (the model is unchanged when compute
returns or raises):

1. Features. For each fact, the L2 rewrite prompt with the L2 subject is scored with both objects;
   the fact counts as **right** when the edited model gives the new object a higher mean-token
   probability p̄ = exp(−mean NLL) than the true one (CounterFact's efficacy test, in L2). For the
   right facts, every head's output (`massedit.methods.memat.heads`) is read at the last token of
   prompt + " " + new object (label 1) and of prompt + " " + true object (label 0).
2. Probes. The right facts are split by fact (both labels on the same side) with a permutation
   seeded by the editor's seed: `memat_val_fraction` (0.3) for validation, the rest for training.
   One logistic regression per (layer, head), all fitted at once (`massedit.methods.memat.probes`); heads are
   ranked by validation accuracy (ties: lower layer, then lower head) and the top `memat_top_k`
   kept.
3. Corrections. One ω_h [head_dim] per kept head, shared by the batch, added to the head's
   output at every position (as the folded bias acts at inference), trained with Adam
   (`memat_lr`) on mini-batches of `memat_batch_size` requests for `memat_epochs` epochs. Loss per
   mini-batch: mean over its requests of [NLL of the L2 new object over the L2 rewriting prompts
   built with the context templates as MEMIT's z step does + `memat_kl_factor`·KL(P_now ‖ P_0) at
   the L2 subject's last token of "{} is a", P_0 that request's own distribution with ω = 0]
   + (`memat_weight_decay`/K)·Σ_h ‖ω_h‖/‖a_0,h‖². ‖a_0,h‖ is the mean norm of head h's output over
   the feature rows of step 1. After each step ‖ω_h‖ is clamped to `memat_clamp_norm_factor`·‖a_0,h‖.
4. Folding. b_l += Σ_{h in layer l} W_O[:, slice_h]·ω_h, as bias entries of the same EditDelta as
   MEMIT's weights. A family without that bias gets it added (`ParameterAdditions`): with its
   config flag where one exists (Llama, Gemma: `attention_bias`, which also creates zero q/k/v
   biases; Falcon: `bias`), so save_pretrained reloads with plain from_pretrained; Mistral, Qwen2,
   Phi-3 and GPT-J have no such flag, so there the correction lives in memory and in the delta,
   and `massedit edit` refuses to save such a model.

Where the public code (dtamayo-nlp/MEMAT) differs, on purpose: it adds ω only at the last padded
column in training but at every position at inference (here: every position in both); it
overwrites the bias when two heads share a layer (here: summed); its KL compares every request
with the first request's distribution and carries no gradient (here: each request against its own
ω = 0 distribution, with gradient); its ‖a_0‖ is one head output of the first prompt (here: a mean
over the feature rows).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from massedit.edits.delta import EditDelta, ParameterAdditions, applied
from massedit.hparams import MEMITHyperParams, above, at_least, between, hparam
from massedit.model.devices import execution_device
from massedit.evaluation.scoring import score_continuations
from massedit.inputs.records import check_records, read_json_list
from massedit.methods.memat.heads import fold_into_bias, head_corrections, head_outputs, logits_at
from massedit.methods.base import register_method
from massedit.methods.memit import Memit
from massedit.methods.memat.probes import fit_logistic
from massedit.inputs.requests import EditRequest, RequestError, parse_records, validate_requests
from massedit.compute.targets import Descent, PromptChunk, build_prompts, descend, kl_from, target_nll
from massedit.inputs.tokens import pad_id_of, padding_side, spaced_target

# The fewest right facts that leave one for training and one for validation.
MIN_RIGHT_FACTS = 2


@dataclass
class MematHyperParams(MEMITHyperParams):
    """MEMIT's keys and MEMAT's (DESIGN §4): the heads corrected, and the correction's optimization and
    probes. Defaults are the MEMAT paper's public code (dtamayo-nlp/MEMAT: hparams/MEMIT/aguila.json and
    attention_translation/multiple_head_optimization.py); its probes are scikit-learn's default logistic
    regression (C = 1) on a 70/30 split."""

    memat_top_k: int = hparam(16, check=at_least(1, "heads to correct"))  # K: heads kept, by validation accuracy
    memat_lr: float = hparam(0.2, check=above(0))  # Adam learning rate for the ω vectors
    memat_weight_decay: float = hparam(1e-3, check=at_least(0))  # λ_ω: penalty (λ_ω/K)·Σ‖ω_h‖/‖a_0,h‖²
    memat_clamp_norm_factor: float = hparam(0.75, check=above(0))  # ‖ω_h‖ ≤ factor·‖a_0,h‖
    memat_kl_factor: float = hparam(0.0625, check=at_least(0))  # weight of KL(P_now ‖ P_before ω) on "{} is a"
    memat_batch_size: int = hparam(32, check=at_least(1, "requests per ω step"))
    memat_epochs: int = hparam(1, check=at_least(1, "passes over the requests"))
    memat_probe_c: float = hparam(1.0, check=above(0))  # inverse L2 strength of the probes (scikit-learn's C)
    # share of the correctly edited facts held out to rank heads
    memat_val_fraction: float = hparam(0.3, check=between(0, 1, "0.3"))


def load_l2_records(path: Union[str, Path]) -> list[dict]:
    """A CounterFact JSON list from `path`; one-line errors for a missing or ill-formed file."""
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"--memat-records {path}: no such file; give the second-language CounterFact records")
    return read_json_list(path)


def parse_l2_records(records: Union[Sequence[dict], str, Path], source: str = "memat records") -> dict:
    """case_id -> EditRequest in L2, from CounterFact records (or a path to a JSON list of them).
    Every record needs an integer case_id, unique, and a target_true."""
    if isinstance(records, (str, Path)):
        source, records = str(records), load_l2_records(records)
    try:
        records = records if isinstance(records, list) else list(records)
        check_records(records, "counterfact", source)
    except (TypeError, ValueError) as err:
        raise RequestError(f"{source}: {err}" if source not in str(err) else str(err)) from None
    by_case: dict = {}
    for i, req in enumerate(parse_records(records, source, fmt="counterfact")):
        if req.case_id is None:
            raise RequestError(f"{source}, record {i}: has no case_id; MEMAT pairs each request with the L2 record "
                               "of the same case_id")
        if req.case_id in by_case:
            raise RequestError(f"{source}, record {i}: case_id {req.case_id!r} repeats an earlier record; "
                               "give each fact one L2 record")
        if req.target_true is None:
            raise RequestError(f"{source}, record {i}: has no requested_rewrite.target_true; MEMAT's probes "
                               "need the true object in L2")
        by_case[req.case_id] = req
    return by_case


def match_l2(requests: Sequence[EditRequest], by_case: dict, source: str = "memat records") -> list[EditRequest]:
    """The L2 request of each request, by case_id; a one-line error for the first that has none."""
    out = []
    for i, req in enumerate(requests):
        where = req.source or f"request {i}"
        if req.case_id is None:
            raise RequestError(f"{where}: has no case_id; MEMAT pairs each request with its L2 record by case_id")
        if req.case_id not in by_case:
            raise RequestError(f"{where}: case_id {req.case_id!r} has no record in {source}; give an L2 record "
                               "for every edited fact")
        out.append(by_case[req.case_id])
    return out


@register_method
class Memat(Memit):
    """MEMIT followed by attention-head corrections learned from L2 records (see the module doc)."""

    name = "memat"
    hparams_class = MematHyperParams
    shards_requests = False
    # Its rounds would change the model's structure (added biases, config flags) under the ledger.
    edits_in_rounds = False

    def __init__(self, records: Union[Sequence[dict], str, Path, None] = None, serial_z: Optional[bool] = None,
                 targets=None):
        """targets: a MEMIT EditResult of the same requests (Memit's `targets`), so that MEMAT at several
        K runs its MEMIT phase's z optimization once."""
        super().__init__(serial_z, targets)
        self.source = str(records) if isinstance(records, (str, Path)) else "memat records"
        self.l2 = None if records is None else parse_l2_records(records, self.source)
        self._additions: Optional[ParameterAdditions] = None
        self._details: dict = {}

    @classmethod
    def add_arguments(cls, parser) -> list[str]:
        parser.add_argument("--memat-records", metavar="FILE",
                            help="--method memat: CounterFact JSON of the same facts in the second language, "
                                 "with the requests' case_ids")
        return ["memat_records"]

    @classmethod
    def from_args(cls, args) -> "Memat":
        return cls(args.memat_records)

    def check_requests(self, requests, editor=None) -> None:
        super().check_requests(requests, editor)
        if self.l2 is None:
            raise RequestError("method 'memat' needs the second-language records: pass method=Memat(records) "
                               "(API) or --memat-records FILE (CLI)")
        l2 = match_l2(requests, self.l2, self.source)
        if editor is None:
            return
        validate_requests(l2, editor.tok)
        editor.layout.check_heads()
        n_heads = editor.layout.n_layers * editor.layout.n_heads
        top_k = self.hparams(editor).memat_top_k
        if top_k > n_heads:
            raise RequestError(f'hparams, key "memat_top_k": {top_k} heads asked, the model has '
                               f"{n_heads} ({editor.layout.n_layers} layers x {editor.layout.n_heads}); lower it")

    def check_saved_model(self, layout) -> None:
        additions = layout.attn_out_bias_additions()
        if additions is not None and not additions[0]:
            raise ValueError(f"method memat: {layout.model_type} has no attention output bias and no config flag "
                             "that makes from_pretrained load one, so the saved model would lose the head "
                             "corrections; use the Python API (the delta keeps them) or another family")

    def additions(self) -> Optional[ParameterAdditions]:
        return self._additions

    def details(self) -> dict:
        return self._details

    def compute(self, editor, requests, templates, solvers, timings, batch_size):
        t = time.perf_counter()
        weights, z = super().compute(editor, requests, templates, solvers, timings, batch_size)
        timings["memit"] = time.perf_counter() - t
        l2 = match_l2(requests, self.l2, self.source)
        with applied(editor.model, [EditDelta(weights)]):
            heads, omega, details = self._corrections(editor, l2, templates, timings)
        found = editor.layout.attn_out_bias_additions()
        self._additions = None if found is None else ParameterAdditions(found[1], found[0])
        details["reloadable"] = self._additions is None or self._additions.reloadable
        self._details = details
        return weights + fold_into_bias(editor.model, editor.layout, heads, omega), z

    def _corrections(self, editor, l2: list[EditRequest], templates, timings: dict):
        hp, layout = self.hparams(editor), editor.layout
        t = time.perf_counter()
        features, labels, fact_of_row, n_right = _features(editor, l2)
        a0 = features.norm(dim=-1).mean(dim=-1)  # [L, H]
        timings["memat_features"] = time.perf_counter() - t

        t = time.perf_counter()
        facts = sorted(set(fact_of_row.tolist()))
        order = torch.randperm(len(facts), generator=torch.Generator().manual_seed(editor.seed)).tolist()
        n_val = min(len(facts) - 1, max(1, round(hp.memat_val_fraction * len(facts))))
        val_facts = {facts[i] for i in order[:n_val]}
        val = torch.tensor([int(f) in val_facts for f in fact_of_row.tolist()])
        flat = features.flatten(0, 1)  # [L·H, n, head_dim]
        device = execution_device(layout.attn_out_module(0))
        probes = fit_logistic(flat[:, ~val].to(device), labels[~val], c=hp.memat_probe_c)
        accuracy = probes.accuracy(flat[:, val].to(device), labels[val]).cpu()
        ranked = torch.sort(accuracy, descending=True, stable=True).indices[: hp.memat_top_k].tolist()
        heads = [divmod(i, layout.n_heads) for i in ranked]
        timings["memat_probes"] = time.perf_counter() - t

        t = time.perf_counter()
        a0_heads = torch.stack([a0[l, h] for l, h in heads])
        omega, losses = _optimize_omega(editor, l2, templates, heads, a0_heads)
        timings["memat_omega"] = time.perf_counter() - t
        details = {
            "facts": len(l2),
            "facts_right": n_right,
            "n_train_facts": len(facts) - n_val,
            "n_val_facts": n_val,
            "probe_accuracy": accuracy.view(layout.n_layers, layout.n_heads).tolist(),
            "probe_iterations": probes.iterations,
            "best_val_accuracy": float(accuracy.max()),
            "heads": [list(h) for h in heads],
            "omega_norms": omega.norm(dim=1).tolist(),
            "a0_norms": a0_heads.tolist(),
            "omega_loss": losses,
        }
        return heads, omega, details


def _features(editor, l2: list[EditRequest]):
    """Head outputs [L, H, 2·right, head_dim], labels [2·right] (1: new object), the fact of each row,
    and how many facts were right."""
    model, tok = editor.model, editor.tok
    prompts = [r.text() for r in l2]
    pairs = [(p, r.target_new) for p, r in zip(prompts, l2)] + [(p, r.target_true) for p, r in zip(prompts, l2)]
    scores = score_continuations(model, tok, pairs)
    right = [i for i in range(len(l2)) if scores[i].prob > scores[len(l2) + i].prob]
    if len(right) < MIN_RIGHT_FACTS:
        raise RequestError(
            f"MEMAT: the MEMIT-edited model prefers the new object over the true one on only {len(right)} of "
            f"{len(l2)} L2 rewrite prompts; its head probes need at least {MIN_RIGHT_FACTS} such facts: edit more "
            "facts, or check that the L2 records state the same facts")
    texts, labels, fact_of_row = [], [], []
    for i in right:
        for obj, label in ((l2[i].target_new, 1.0), (l2[i].target_true, 0.0)):
            texts.append(prompts[i] + spaced_target(prompts[i], obj))
            labels.append(label)
            fact_of_row.append(i)
    features = head_outputs(model, editor.layout, tok, texts)
    return features, torch.tensor(labels), torch.tensor(fact_of_row), len(right)


class _OmegaObjective:
    """MEMAT's ω loss (module doc, step 3) for the z loop: every request shares ω, so there is one
    group; step i trains on mini-batch i mod the number of mini-batches (epoch after epoch)."""

    groups = 1

    def __init__(self, editor, l2: list[EditRequest], templates, heads, a0: torch.Tensor):
        self.model, self.layout, self.heads, self.norms = editor.model, editor.layout, heads, a0
        tok, size = editor.tok, MematHyperParams.from_hparams(editor.hp).memat_batch_size
        flat = [t for group in templates for t in group]  # the NLL is a plain mean over all, as in the z step
        prompts = [build_prompts(tok, r, flat) for r in l2]
        self.chunks = [PromptChunk(prompts[start : start + size], pad_id_of(tok), padding_side(tok), a0.device)
                       for start in range(0, len(prompts), size)]
        # P_0 of each mini-batch's KL prompts: the distributions with ω = 0.
        with torch.no_grad():
            self.before = [logits_at(self.model, self.layout, c.batch, c.kl_row, c.kl_col).float().log_softmax(-1)
                           for c in self.chunks]

    def __call__(self, step: int, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i = step % len(self.chunks)
        chunk = self.chunks[i]
        rows, cols = torch.cat([chunk.lbl_row, chunk.kl_row]), torch.cat([chunk.lbl_col, chunk.kl_col])
        with head_corrections(self.layout, self.heads, omega):
            logp = logits_at(self.model, self.layout, chunk.batch, rows, cols).float().log_softmax(-1)
        nll, now = target_nll(logp, chunk)
        return nll.mean()[None], kl_from(now, self.before[i]).mean()[None]


def _optimize_omega(editor, l2: list[EditRequest], templates, heads, a0: torch.Tensor):
    """ω [K, head_dim] (float32) and the loss of each step (see the module doc, step 3)."""
    hp, layout = MematHyperParams.from_hparams(editor.hp), editor.layout
    device = execution_device(layout.attn_out_module(heads[0][0]))
    # A head that never outputs anything gets no room to move rather than a division by zero.
    objective = _OmegaObjective(editor, l2, templates, heads, a0.to(device).clamp_min(1e-12))
    omega = torch.zeros(len(heads), layout.head_dim, device=device, requires_grad=True)
    schedule = Descent(num_grad_steps=hp.memat_epochs * len(objective.chunks), lr=hp.memat_lr,
                       weight_decay=hp.memat_weight_decay, clamp_norm_factor=hp.memat_clamp_norm_factor,
                       kl_factor=hp.memat_kl_factor, early_stop_loss=None)
    return omega.detach(), descend(omega, schedule, objective).history
