"""Target vectors z_i (DESIGN §2.2): batched optimization, the serial baseline, and the z loop they share.

For request i a vector δ_i is added to the output of block L at the subject token of each of its
prompts (every context template + the target tokens but the last, and the KL prompt "{} is a").
Per-request loss = NLL of the target + kl_factor·KL(P_now ‖ P_init) at the KL prompt's subject
token + v_weight_decay·‖δ_i‖/‖h_i‖². Requests are independent and Adam is elementwise, so the
batched engine optimizes all δ_i of a chunk with the sum of their losses, freezes each request
as soon as it stops, and clamps each δ_i on its own: the result equals the serial loop.

`descend` is that loop for every method: Adam on δ clamped to a norm ball, weight decay, a KL
term and an early stop (`Descent`), with the place δ is added and the prompts it is judged on
left to an objective: block L's output (MEMIT, batched or one request at a time), the rewrite
module's output (ROME, `site="mlp"`), or attention heads' outputs (MEMAT's ω,
massedit.methods.memat.method).

The KL term uses the same logits as the NLL (those of block `v_loss_layer`), which are the model's
output logits whenever v_loss_layer is the last layer, as in every reference configuration.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import warnings
import weakref
from dataclasses import dataclass, fields
from typing import Iterator, Optional, Protocol, Sequence

import psutil
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from massedit.model import parallel
from massedit.model.arch import ModelLayout
from massedit.model.devices import execution_device, input_device
from massedit.model.hooks import capture_outputs, edit_output, hidden_of, hooks, replayed, run_until, with_hidden
from massedit.model.quantized import cpu_repacking_off
from massedit.model.sharded import gathered
from massedit.inputs.requests import EditRequest
from massedit.inputs.tokens import Encoded, compose, encode_prompt, fill, pad, pad_id_of, padding_side, target_ids

KL_PROMPT = "{} is a"

# Hyperparameters the z optimization does not read: the solve's (λ, statistics), which layers below
# the z layer are edited (z is found at max(layers)), and the chunk size (z does not depend on it).
NOT_IN_Z = frozenset({"layers", "layer_selection", "mom2_adjustment", "mom2_update_weight", "mom2_dataset",
                      "mom2_n_samples", "mom2_dtype", "batch_size"})


def z_hparams(hparams: dict) -> dict:
    """What of an hparams dict z depends on: MEMIT's keys but NOT_IN_Z (a key added to MEMIT later
    counts as reaching z; a method's own keys act after z) and the z layer."""
    from massedit.hparams import MEMITHyperParams

    memit = {f.name for f in fields(MEMITHyperParams)} - NOT_IN_Z
    return {"z_layer": max(hparams["layers"]), **{k: v for k, v in sorted(hparams.items()) if k in memit}}


@dataclass(frozen=True, kw_only=True)
class Descent:
    """How the z loop moves δ (`descend`).

    Adam (lr) for at most num_grad_steps forwards. Each group of δ rows has one loss: NLL +
    kl_factor·KL + weight_decay·(mean over its rows of ‖δ_r‖/‖s_r‖²), s_r the state row r is added
    to; after each update row r is clamped to the ball of radius clamp_norm_factor·‖s_r‖. With an
    early_stop_loss a group stops (no more updates) once its loss is below it, and every group at
    the last forward, so at most num_grad_steps − 1 updates (the reference's z loop); with None
    every forward is followed by an update (a fixed schedule: MEMAT's epochs)."""

    num_grad_steps: int
    lr: float
    weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    early_stop_loss: Optional[float] = 5e-2


@dataclass(frozen=True, kw_only=True)
class ZSettings(Descent):
    layer: int  # L: δ is added to this block's output (ROME: to its rewrite module's output)
    loss_layer: int

    @classmethod
    def from_hparams(cls, hp, layout: ModelLayout, layer: Optional[int] = None) -> "ZSettings":
        layer = max(hp.layers) if layer is None else layer
        loss_layer = layout.n_layers - 1 if hp.v_loss_layer is None else hp.v_loss_layer
        return cls(
            layer=layer,
            loss_layer=max(loss_layer, layer),
            num_grad_steps=hp.v_num_grad_steps,
            lr=hp.v_lr,
            weight_decay=hp.v_weight_decay,
            clamp_norm_factor=hp.clamp_norm_factor,
            kl_factor=hp.kl_factor,
            early_stop_loss=getattr(hp, "z_early_stop_loss", 5e-2),
        )


@dataclass(frozen=True)
class ZPrompts:
    """Tokenized prompts of one request: rewriting prompts (ids include target[:-1]) and the KL prompt."""

    rewrite: tuple[Encoded, ...]
    prompt_lengths: tuple[int, ...]  # length of each rewriting prompt before the target tokens
    kl: Encoded
    target: tuple[int, ...]


@dataclass
class ZResult:
    z: torch.Tensor  # [n, d] float32
    h: torch.Tensor  # [n, d] block-L output at the subject token before editing
    loss: torch.Tensor  # [n] total loss at the iteration that stopped
    steps: torch.Tensor  # [n] iteration at which each request stopped


def build_prompts(tok, request: EditRequest, templates: Sequence[str]) -> ZPrompts:
    bare_text = fill(request.prompt, request.subject)[0]
    target = tuple(target_ids(tok, bare_text, request.target_new))
    rewrite, lengths = [], []
    for ctx in templates:
        enc = encode_prompt(tok, compose(ctx, request.prompt), request.subject)
        rewrite.append(Encoded(enc.ids + target[:-1], enc.subject_index))
        lengths.append(len(enc.ids))
    kl = encode_prompt(tok, KL_PROMPT, request.subject)
    return ZPrompts(tuple(rewrite), tuple(lengths), kl, target)


@contextlib.contextmanager
def frozen_eval(model) -> Iterator[None]:
    """Eval mode and no parameter gradients while editing; both restored afterwards. An FSDP2
    model's parameters are gathered for the while (massedit.model.sharded.gathered), so that ranks
    editing different requests run different forwards."""
    with gathered(model):
        was_training = model.training
        flags = [(p, p.requires_grad) for p in model.parameters()]
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        try:
            with cpu_repacking_off(model):
                yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            model.train(was_training)


class PromptChunk:
    """Index tensors that place a set of requests' prompts into one padded batch.

    `side` is "left"/"right", or "subject": every row is shifted so that its subject token sits in
    one column S, which splits the batch into a prefix (columns < S) that δ cannot influence and
    a suffix that it can. `frame` = (S, width) keeps that layout when requests drop out.
    """

    def __init__(self, prompts: Sequence[ZPrompts], pad_id: int, side: str, device: torch.device, frame=None):
        seqs, subj_req, subj_pos = [], [], []
        lbl_row, lbl_pos, lbl_tok, lbl_req, lbl_w = [], [], [], [], []
        kl_row, kl_pos, first_row, first_pos = [], [], [], []
        for q, p in enumerate(prompts):
            n_rw, m = len(p.rewrite), len(p.target)
            for i, (enc, plen) in enumerate(zip(p.rewrite, p.prompt_lengths)):
                r = len(seqs)
                if i == 0:
                    first_row.append(r)
                    first_pos.append(enc.subject_index)
                seqs.append(enc.ids)
                subj_req.append(q)
                subj_pos.append(enc.subject_index)
                for t in range(m):
                    lbl_row.append(r)
                    lbl_pos.append(plen - 1 + t)
                    lbl_tok.append(p.target[t])
                    lbl_req.append(q)
                    lbl_w.append(1.0 / (m * n_rw))
            kl_row.append(len(seqs))
            kl_pos.append(p.kl.subject_index)
            seqs.append(p.kl.ids)
            subj_req.append(q)
            subj_pos.append(p.kl.subject_index)
        self.subject_col = None
        if side == "subject":
            self.subject_col, width = frame if frame else (max(subj_pos), None)
            offsets = [self.subject_col - sp for sp in subj_pos]
            self.batch = pad(seqs, pad_id, "right", device, offsets=offsets, width=width)
        else:
            self.batch = pad(seqs, pad_id, side, device)
        shift = self.batch.shift.to(device)
        as_long = lambda xs: torch.tensor(xs, dtype=torch.long, device=device)  # noqa: E731
        self.rows_per_request = len(prompts[0].rewrite) + 1
        self.subj_row = torch.arange(len(seqs), device=device)
        self.subj_col = as_long(subj_pos) + shift
        self.subj_req = as_long(subj_req)
        self.lbl_row = as_long(lbl_row)
        self.lbl_col = as_long(lbl_pos) + shift[self.lbl_row]
        self.lbl_tok = as_long(lbl_tok)
        self.lbl_req = as_long(lbl_req)
        self.lbl_w = torch.tensor(lbl_w, dtype=torch.float32, device=device)
        self.kl_row = as_long(kl_row)
        self.kl_col = as_long(kl_pos) + shift[self.kl_row]
        self.first_row = as_long(first_row)
        self.first_col = as_long(first_pos) + shift[self.first_row]
        self.n = len(prompts)

    @property
    def frame(self):
        return self.subject_col, self.batch.input_ids.shape[1]


def kv_pairs(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def filled_cache(pairs) -> DynamicCache:
    """A DynamicCache holding the given (keys, values) of every layer, as a forward would leave it."""
    cache = DynamicCache()
    for i, (k, v) in enumerate(pairs):
        cache.update(k, v, i)
    return cache


class _PlainForward:
    """Each step runs the whole model on every position (the reference's arithmetic), δ added to
    the optimizer's site (block L's output, or its rewrite module's output)."""

    def __init__(self, opt: "TargetOptimizer", chunk: PromptChunk):
        self.opt, self.chunk = opt, chunk

    def select(self, chunk: PromptChunk, rows: torch.Tensor) -> "_PlainForward":
        return _PlainForward(self.opt, chunk)

    def __call__(self, delta: torch.Tensor):
        """(loss-block output, column offset of that output, the site's state at first-row subjects)."""
        chunk, store = self.chunk, {}

        def add_delta(h: torch.Tensor) -> torch.Tensor:
            store["h"] = h[chunk.first_row, chunk.first_col].detach()
            values = delta.to(h.device, h.dtype)[chunk.subj_req.to(h.device)]
            return h.index_put((chunk.subj_row.to(h.device), chunk.subj_col.to(h.device)), values, accumulate=True)

        with edit_output(self.opt.site, add_delta), capture_outputs({"out": self.opt.loss_block}, store):
            run_until(self.opt.model, self.opt.loss_block, **chunk.batch.model_inputs())
        return store["out"], 0, store["h"]


class _PrefixForward:
    """Computes only what δ can change (DESIGN §7).

    One no-grad forward per chunk records the block-L output on the suffix columns and every
    layer's keys/values on the prefix columns. Each step then replays blocks 0..L from that
    record (adding δ at the subject column) and runs blocks L+1..loss_layer on the suffix only,
    attending to the recorded prefix keys/values.
    """

    def __init__(self, opt: "TargetOptimizer", chunk: PromptChunk, state=None):
        self.opt, self.chunk = opt, chunk
        self.S = chunk.subject_col
        if state is None:
            state = self._record()
        self.h_suffix, self.structs, self.kv = state

    @torch.no_grad()
    def _record(self):
        opt, S = self.opt, self.S
        raw: dict = {}
        # Subject alignment left-pads rows; fully masked padding queries can come out NaN (float64
        # eager attention) and would leak into real tokens through 0·NaN. Padding is never
        # attended to, so zeroing it after each block changes nothing else.
        padding = self.chunk.batch.attention_mask == 0
        cache = DynamicCache()
        with contextlib.ExitStack() as stack:
            # Registered first, so each block's output is kept as the block returned it.
            stack.enter_context(hooks(lambda: [opt.layout.block(l).register_forward_hook(self._keep(raw, l))
                                               for l in range(opt.s.layer + 1)]))
            for l in range(opt.s.loss_layer + 1):
                stack.enter_context(edit_output(opt.layout.block(l), self._zero(padding)))
            run_until(opt.model, opt.loss_block, **self.chunk.batch.model_inputs(), **cache_inputs(opt.model, cache))
        h_suffix = hidden_of(raw[opt.s.layer])[:, S:].detach()
        structs = {l: with_hidden(out, None) for l, out in raw.items()}
        kv = [(k[:, :, :S], v[:, :, :S]) for k, v in kv_pairs(cache)]
        return h_suffix, structs, kv

    @staticmethod
    def _keep(store, layer):
        def hook(_module, _args, output):
            store[layer] = output

        return hook

    @staticmethod
    def _zero(padding: torch.Tensor):
        def fn(h):
            return h.masked_fill(padding.to(h.device)[..., None], 0)

        return fn

    def select(self, chunk: PromptChunk, rows: torch.Tensor) -> "_PrefixForward":
        def pick(t):
            return t[rows.to(t.device)]

        kv = [(pick(k), pick(v)) for k, v in self.kv]
        return _PrefixForward(self.opt, chunk, (pick(self.h_suffix), self.structs, kv))

    def __call__(self, delta: torch.Tensor):
        opt, chunk, S = self.opt, self.chunk, self.S
        h = self.h_suffix
        dev = h.device
        values = delta.to(dev, h.dtype)[chunk.subj_req.to(dev)]
        edited = h.index_put((chunk.subj_row.to(dev), chunk.subj_col.to(dev) - S), values, accumulate=True)
        cache = filled_cache(self.kv)
        replays = {l: with_hidden(struct, edited if l == opt.s.layer else h) for l, struct in self.structs.items()}
        b = chunk.batch
        store: dict = {}
        with replayed(opt.layout, replays):
            if opt.s.loss_layer == opt.s.layer:
                store["out"] = edited
            else:
                with capture_outputs({"out": opt.loss_block}, store):
                    run_until(opt.model, opt.loss_block, input_ids=b.input_ids[:, S:], attention_mask=b.attention_mask,
                              position_ids=b.position_ids[:, S:], **cache_inputs(opt.model, cache))
        h_first = h[chunk.first_row.to(dev), chunk.first_col.to(dev) - S]
        return store["out"], S, h_first


_PREFIX_SUPPORT: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()


def cache_keyword(model) -> str:
    """The forward keyword that takes the key/value cache: `cache` in newer transformers (5.24 still
    accepts `past_key_values` with a deprecation warning, later versions drop it), `past_key_values`
    before. Read from the forward's signature, so it follows the installed version."""
    # Read once per model: the z phase asks at every step.
    if model not in _CACHE_KEYWORD:
        _CACHE_KEYWORD[model] = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return _CACHE_KEYWORD[model]


_CACHE_KEYWORD: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def cache_inputs(model, cache) -> dict:
    return {cache_keyword(model): cache, "use_cache": True}


# Continuing from a correct cache sums in another order than the full forward, so the logits differ
# by rounding, which grows with their scale and the depth. Measured with the probe below in float32
# (in units of eps·max|logit|·n_layers): SmolLM2-135M 13 (1.4e-3 on logits up to 31, which an
# absolute 1e-3 tolerance took for a wrong cache), Gemma-3-270M 1.0, the tiny test models < 1; in
# bfloat16 all of them continued bit-exactly.
PREFIX_ROUNDING = 64
# The rounding bound is loose in bfloat16 (eps 2^-7); a cache that is ignored or read from the wrong
# layers also moves the logits by a good part of what dropping the prefix moves them.
PREFIX_GAP_FRACTION = 0.05


@torch.no_grad()
def supports_prefix_reuse(model) -> bool:
    """Whether continuing from a DynamicCache built with `update` reproduces a full forward.

    Older transformers versions keep some families on legacy tuple caches; probing once per model
    is more reliable than a version table. On a 5-token probe whose first 2 tokens are the prefix,
    the continued logits must be within rounding of the full forward's (PREFIX_ROUNDING·eps of the
    model's dtype·max|logit|·n_layers) and within PREFIX_GAP_FRACTION of how far the logits move
    when the prefix is dropped, compared in float64."""
    if model in _PREFIX_SUPPORT:
        return _PREFIX_SUPPORT[model]
    device = input_device(model)
    ids = torch.arange(1, 6, device=device)[None] % int(model.config.vocab_size)
    mask = torch.ones_like(ids)
    positions = torch.arange(5, device=device)[None]
    try:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        full = logits[:, 2:].double()
        cache = DynamicCache()
        model(input_ids=ids[:, :2], attention_mask=mask[:, :2], position_ids=positions[:, :2],
              **cache_inputs(model, cache))
        fresh = filled_cache(kv_pairs(cache))
        rest = model(input_ids=ids[:, 2:], attention_mask=mask, position_ids=positions[:, 2:],
                     **cache_inputs(model, fresh)).logits.double()
        alone = model(input_ids=ids[:, 2:], attention_mask=mask[:, 2:], position_ids=positions[:, 2:]).logits.double()
        error, gap = (rest - full).abs().max(), (alone - full).abs().max()
        depth = int(getattr(model.config.get_text_config(), "num_hidden_layers", 1))
        rounding = PREFIX_ROUNDING * torch.finfo(logits.dtype).eps * full.abs().max() * depth
        ok = bool(error <= torch.minimum(rounding, PREFIX_GAP_FRACTION * gap))
    except (KeyError, TypeError, AttributeError, ValueError, IndexError, RuntimeError):
        ok = False
    _PREFIX_SUPPORT[model] = ok
    return ok


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def log_probs_at(layout: ModelLayout, out: torch.Tensor, chunk: PromptChunk, offset: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """Log-probabilities from a loss-block output `out` (its columns start at `offset`) at the
    chunk's label positions, then at its KL positions: [labels + requests, vocab]."""
    dev = out.device
    picked = torch.cat([out[chunk.lbl_row.to(dev), chunk.lbl_col.to(dev) - offset],
                        out[chunk.kl_row.to(dev), chunk.kl_col.to(dev) - offset]])
    return torch.log_softmax(layout.logits(picked).to(dtype), dim=-1)


def target_nll(logp: torch.Tensor, chunk: PromptChunk) -> tuple[torch.Tensor, torch.Tensor]:
    """Per request of the chunk, the target's NLL (mean over rewriting prompts of the mean token
    NLL), and the log-probabilities at its KL prompt's subject token."""
    dev, n_lbl = logp.device, chunk.lbl_row.numel()
    token_lp = logp[:n_lbl].gather(1, chunk.lbl_tok.to(dev)[:, None]).squeeze(1)
    nll = torch.zeros(chunk.n, device=dev, dtype=logp.dtype).index_add(
        0, chunk.lbl_req.to(dev), -token_lp * chunk.lbl_w.to(dev, logp.dtype))
    return nll, logp[n_lbl:]


def kl_from(logp: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ P_init) per row, from log-probabilities."""
    return (logp.exp() * (logp - init.to(logp.device))).sum(1)


class Objective(Protocol):
    """What `descend` differentiates: where δ is added, and on which prompts.

    δ has `groups` groups of equally many consecutive rows; each group has one loss and stops on
    its own. `norms` [rows]: ‖s_r‖ of the state each row is added to, read after the first call.
    """

    groups: int
    norms: torch.Tensor

    def __call__(self, step: int, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(NLL, KL) per group still moving, `delta` being those groups' rows."""

    def drop(self, moving: torch.Tensor) -> None:
        """Keep only the groups still moving where `moving` (a bool per group of the last call) is
        true; called only with an early stop."""


@dataclass
class Descended:
    loss: torch.Tensor  # [groups] total loss at the forward each group stopped (the last one it ran)
    steps: torch.Tensor  # [groups] that forward's index
    history: list[float]  # per forward, the summed loss of the groups it ran


def _group_rows(groups: list[int], per: int, device) -> torch.Tensor:
    return torch.tensor([g * per + r for g in groups for r in range(per)], dtype=torch.long, device=device)


def descend(delta: torch.Tensor, d: Descent, objective: Objective) -> Descended:
    """The z loop (see `Descent`): optimizes the leaf tensor `delta` [rows, width] in place."""
    n = objective.groups
    per = delta.shape[0] // n
    opt = torch.optim.Adam([delta], lr=d.lr)
    final_loss = torch.zeros(n, dtype=delta.dtype)
    steps = torch.zeros(n, dtype=torch.long)
    history: list[float] = []
    active = list(range(n))
    for it in range(d.num_grad_steps):
        opt.zero_grad(set_to_none=True)
        rows = _group_rows(active, per, delta.device)
        nll, kl = objective(it, delta[rows])
        dev = nll.device
        decay = delta[rows].to(dev).norm(dim=1) / objective.norms[rows].to(dev, nll.dtype) ** 2
        loss = nll + d.kl_factor * kl + d.weight_decay * decay.view(len(active), per).mean(1)
        values = loss.detach().cpu()
        final_loss[active], steps[active] = values.to(final_loss.dtype), it
        history.append(float(values.sum()))
        if d.early_stop_loss is None:
            stop = torch.zeros(len(active), dtype=torch.bool)
        else:
            stop = (values < d.early_stop_loss) | (it == d.num_grad_steps - 1)
        if bool(stop.all()):
            break
        go = ~stop
        loss[go.to(dev)].sum().backward()
        keep = [g for g, s in zip(active, stop.tolist()) if not s]
        moving = _group_rows(keep, per, delta.device)
        with torch.no_grad():
            # Adam's moments would move a stopped group's rows on: they are put back after the step.
            frozen = torch.ones(delta.shape[0], dtype=torch.bool, device=delta.device)
            frozen[moving] = False
            saved = delta[frozen].clone()
        opt.step()
        with torch.no_grad():
            delta[frozen] = saved
            radius = d.clamp_norm_factor * objective.norms[moving].to(delta.device, delta.dtype)
            norms = delta[moving].norm(dim=1)
            scale = torch.where(norms > radius, radius / norms, torch.ones_like(norms))
            delta[moving] = delta[moving] * scale[:, None]
        if len(keep) < len(active):
            objective.drop(go)
            active = keep
    return Descended(final_loss, steps, history)


class _RequestChunk:
    """The z objective of a chunk of requests: one group per request, δ_i at its subject tokens
    (module doc); the KL reference and the states s_i are those of the first forward (δ = 0)."""

    def __init__(self, opt: "TargetOptimizer", prompts: Sequence[ZPrompts], prefix: bool):
        self.opt, self.prompts, self.prefix = opt, list(prompts), prefix
        self.groups = len(prompts)
        self.forward = (_PrefixForward if prefix else _PlainForward)(opt, opt._chunk(prompts, prefix))
        self.kl_init: Optional[torch.Tensor] = None
        self.init: Optional[torch.Tensor] = None  # [n, d] s_i: the site's state at request i's first subject token
        self.norms: Optional[torch.Tensor] = None

    def __call__(self, step: int, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.forward.chunk
        out, offset, h = self.forward(delta)
        nll, kl_logp = target_nll(log_probs_at(self.opt.layout, out, chunk, offset, self.opt.dtype), chunk)
        if self.kl_init is None:
            self.kl_init = kl_logp.detach()
            self.init = h.detach().to(self.opt.device, self.opt.dtype)
            self.norms = self.init.norm(dim=1)
        return nll, kl_from(kl_logp, self.kl_init)

    def drop(self, moving: torch.Tensor) -> None:
        go = torch.nonzero(moving).flatten()
        self.kl_init = self.kl_init[go.to(self.kl_init.device)]
        per = self.forward.chunk.rows_per_request
        rows = torch.cat([torch.arange(j * per, (j + 1) * per) for j in go.tolist()])
        self.prompts = [self.prompts[j] for j in go.tolist()]
        frame = self.forward.chunk.frame if self.prefix else None
        self.forward = self.forward.select(self.opt._chunk(self.prompts, self.prefix, frame), rows)


class TargetOptimizer:
    """Computes z for many requests, `batch_size` requests per forward/backward.

    reuse_prefix=True (the default) runs each step only over what δ can change; False runs the
    whole model each step like the reference. Both give the same z up to float rounding.
    site="residual" adds δ to block L's output (MEMIT); "mlp" to its rewrite module's output
    (ROME's v*: z is then that module's output plus δ, and every step runs the whole model).
    """

    SITES = ("residual", "mlp")

    def __init__(self, model, layout: ModelLayout, tok, settings: ZSettings, templates: Sequence[Sequence[str]],
                 reuse_prefix: bool = True, site: str = "residual"):
        if site not in self.SITES:
            raise ValueError(f"site must be one of {', '.join(self.SITES)}, got {site!r}")
        self.model, self.layout, self.tok, self.s = model, layout, tok, settings
        self.templates = [t for group in templates for t in group]
        self.pad_id, self.side = pad_id_of(tok), padding_side(tok)
        # The prefix path replays whole blocks, so it serves δ on the residual stream only.
        wants_prefix = reuse_prefix and site == "residual"
        self.reuse_prefix = wants_prefix and supports_prefix_reuse(model)
        if wants_prefix and not self.reuse_prefix:
            warnings.warn(f"{type(model).__name__}: continuing from a key/value cache (passed as "
                          f"`{cache_keyword(model)}`) did not reproduce a full forward, so prefix reuse is off; the z "
                          "phase runs the whole model at each step (same results, slower)")
        self.block = layout.block(settings.layer)
        self.site = self.block if site == "residual" else layout.rewrite_module(settings.layer)
        self.loss_block = layout.block(settings.loss_layer)
        param = next(self.site.parameters())  # its dtype is right even when its values are offloaded
        self.device = execution_device(self.block)
        # δ, Adam state and the loss are float32 at least, wider when the model is (float64 runs
        # make float-order effects negligible, which the equivalence tests rely on).
        self.dtype = torch.promote_types(torch.float32, param.dtype)

    def prompts(self, requests: Sequence[EditRequest]) -> list[ZPrompts]:
        return [build_prompts(self.tok, r, self.templates) for r in requests]

    def _chunk(self, prompts, prefix: bool, frame=None) -> PromptChunk:
        return PromptChunk(prompts, self.pad_id, "subject" if prefix else self.side, self.device, frame)

    def optimize_chunk(self, prompts: Sequence[ZPrompts]) -> ZResult:
        return self._descend(prompts, self.reuse_prefix)

    def _descend(self, prompts: Sequence[ZPrompts], prefix: bool) -> ZResult:
        delta = torch.zeros(len(prompts), self.layout.hidden_size, device=self.device, dtype=self.dtype,
                            requires_grad=True)
        objective = _RequestChunk(self, prompts, prefix)
        run = descend(delta, self.s, objective)
        return ZResult(objective.init + delta.detach(), objective.init, run.loss, run.steps)

    def _optimize_split(self, prompts: Sequence[ZPrompts]) -> list[ZResult]:
        """Optimize a chunk; on out-of-memory, halve it and retry (requests are independent)."""
        try:
            return [self.optimize_chunk(prompts)]
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err) or len(prompts) == 1:
                raise
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(prompts) // 2
        return self._optimize_split(prompts[:half]) + self._optimize_split(prompts[half:])

    def bytes_per_request(self, prompts: Sequence[ZPrompts]) -> int:
        """Rough peak memory of one request in a chunk: activations kept for backward over the
        blocks a step runs, plus full-vocabulary log-probs at its label and KL positions."""
        cfg = self.model.config
        rows = len(prompts[0].rewrite) + 1
        tokens = rows * max(len(e.ids) for p in prompts for e in p.rewrite)
        width = self.layout.hidden_size
        blocks = self.s.loss_layer - self.s.layer + 1
        itemsize = next(self.model.parameters()).element_size()
        activations = tokens * width * blocks * 16 * itemsize  # ~16 hidden-sized tensors per block
        labels = sum(len(p.target) for p in prompts[:1]) * rows + 1
        vocab = int(getattr(cfg, "vocab_size", 50000))
        return activations + labels * vocab * 4 * 3

    def chunk_size(self, prompts: Sequence[ZPrompts], memory_budget: Optional[int] = None,
                   max_chunk: Optional[int] = None) -> int:
        """Requests per chunk (at most `max_chunk`) that fit `memory_budget` bytes (default: 80% of free
        CUDA memory on a GPU; elsewhere half of the machine's available memory, shared by the
        processes torchrun started on it, because a process that runs out of host memory is killed
        rather than given an error to split the chunk on)."""
        if memory_budget is None:
            if self.device.type == "cuda":
                memory_budget = int(0.8 * torch.cuda.mem_get_info(self.device)[0])
            else:
                local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
                memory_budget = int(0.5 * psutil.virtual_memory().available / max(1, local_processes))
        fit = memory_budget // max(1, self.bytes_per_request(prompts))
        return max(1, min(len(prompts), max_chunk or len(prompts), fit))

    def optimize(self, requests: Sequence[EditRequest], batch_size: Optional[int] = None, progress: bool = True,
                 memory_budget: Optional[int] = None, max_chunk: Optional[int] = None) -> ZResult:
        """z for every request. batch_size=None sizes chunks from the memory budget (at most
        `max_chunk` requests); a chunk that runs out of memory anyway is split and retried.

        Under torch.distributed each rank optimizes every world-size-th request of the
        length-sorted order (so shares cost alike) and the results are gathered: every rank
        returns all n rows."""
        world = parallel.world()
        prompts = self.prompts(requests)
        size = batch_size or self.chunk_size(prompts, memory_budget, max_chunk)
        # Requests of similar length share a chunk, so little of each chunk is padding.
        ranked = sorted(range(len(prompts)), key=lambda i: self._length_key(prompts[i]))
        order = world.shard(ranked)
        parts = [self._empty_result()]
        with frozen_eval(self.model), tqdm(total=len(order), desc="z", disable=not progress, unit="req") as bar:
            for start in range(0, len(order), size):
                parts += self._optimize_split([prompts[i] for i in order[start : start + size]])
                bar.update(min(size, len(order) - start))
        mine = [torch.cat([getattr(p, f) for p in parts]) for f in ("z", "h", "loss", "steps")]
        inverse = torch.empty(len(prompts), dtype=torch.long)
        inverse[torch.tensor(ranked, dtype=torch.long)] = torch.arange(len(prompts))
        return ZResult(*(parallel.gather_sharded(t, len(prompts))[inverse.to(t.device)] for t in mine))

    def _empty_result(self) -> ZResult:
        """No rows: the neutral part for a rank whose share of the requests is empty."""
        d = self.layout.hidden_size
        return ZResult(torch.zeros(0, d, device=self.device, dtype=self.dtype),
                       torch.zeros(0, d, device=self.device, dtype=self.dtype),
                       torch.zeros(0, dtype=self.dtype), torch.zeros(0, dtype=torch.long))

    def _length_key(self, p: ZPrompts) -> tuple[int, int]:
        """Steps cost what the suffix costs when the prefix is reused, the whole row otherwise."""
        rows = list(p.rewrite) + [p.kl]
        longest = max(len(e.ids) for e in rows)
        if not self.reuse_prefix:
            return longest, 0
        return max(len(e.ids) - e.subject_index for e in rows), max(e.subject_index for e in rows)

    def optimize_serial(self, requests: Sequence[EditRequest], progress: bool = True) -> ZResult:
        """One request at a time on the whole model, padded as the tokenizer pads, as the reference
        code runs it; the equivalence baseline."""
        with frozen_eval(self.model):
            results = [self._descend([p], prefix=False)
                       for p in tqdm(self.prompts(requests), desc="z (serial)", disable=not progress, unit="req")]
        return ZResult(*(torch.cat([getattr(r, f) for r in results]) for f in ("z", "h", "loss", "steps")))
