"""Target vectors z_i (DESIGN §2.2): batched optimization and the serial reference.

For request i a vector δ_i is added to the output of block L at the subject token of each of its
prompts (every context template + the target tokens but the last, and the KL prompt "{} is a").
Per-request loss = NLL of the target + kl_factor·KL(P_now ‖ P_init) at the KL prompt's subject
token + v_weight_decay·‖δ_i‖/‖h_i‖². Requests are independent and Adam is elementwise, so the
batched engine optimizes all δ_i of a chunk with the sum of their losses, freezes each request
as soon as it stops, and clamps each δ_i on its own: the result equals the serial loop.

The KL term uses the same logits as the NLL (those of block `v_loss_layer`), which are the model's
output logits whenever v_loss_layer is the last layer, as in every reference configuration.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
import weakref
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache

from massedit.model import parallel
from massedit.model.arch import ModelLayout
from massedit.model.devices import execution_device, input_device
from massedit.model.hooks import capture_outputs, edit_output, hidden_of, replayed, run_until, with_hidden
from massedit.model.quantized import cpu_repacking_off
from massedit.inputs.requests import EditRequest
from massedit.inputs.tokens import Encoded, compose, encode_prompt, fill, pad, pad_id_of, padding_side, target_ids

KL_PROMPT = "{} is a"


@dataclass(frozen=True)
class ZSettings:
    layer: int  # L: δ is added to this block's output
    loss_layer: int
    num_grad_steps: int
    lr: float
    weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    early_stop_loss: float = 5e-2

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
    """Eval mode and no parameter gradients while editing; both restored afterwards."""
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
    """Each step runs the whole model on every position (the reference's arithmetic)."""

    def __init__(self, opt: "TargetOptimizer", chunk: PromptChunk):
        self.opt, self.chunk = opt, chunk

    def select(self, chunk: PromptChunk, rows: torch.Tensor) -> "_PlainForward":
        return _PlainForward(self.opt, chunk)

    def __call__(self, delta: torch.Tensor):
        """(loss-block output, column offset of that output, block-L state at first-row subjects)."""
        chunk, store = self.chunk, {}

        def add_delta(h: torch.Tensor) -> torch.Tensor:
            store["h"] = h[chunk.first_row, chunk.first_col].detach()
            values = delta.to(h.device, h.dtype)[chunk.subj_req.to(h.device)]
            return h.index_put((chunk.subj_row.to(h.device), chunk.subj_col.to(h.device)), values, accumulate=True)

        with edit_output(self.opt.block, add_delta), capture_outputs({"out": self.opt.loss_block}, store):
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
        handles = [opt.layout.block(l).register_forward_hook(self._keep(raw, l)) for l in range(opt.s.layer + 1)]
        # Subject alignment left-pads rows; fully masked padding queries can come out NaN (float64
        # eager attention) and would leak into real tokens through 0·NaN. Padding is never
        # attended to, so zeroing it after each block changes nothing else.
        padding = self.chunk.batch.attention_mask == 0
        with contextlib.ExitStack() as stack:
            for l in range(opt.s.loss_layer + 1):
                stack.enter_context(edit_output(opt.layout.block(l), self._zero(padding)))
            cache = DynamicCache()
            try:
                run_until(opt.model, opt.loss_block, **self.chunk.batch.model_inputs(),
                          **cache_inputs(opt.model, cache))
            finally:
                for h in handles:
                    h.remove()
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


@torch.no_grad()
def supports_prefix_reuse(model) -> bool:
    """Whether continuing from a DynamicCache built with `update` reproduces a full forward.

    Older transformers versions keep some families on legacy tuple caches; probing once per model
    is more reliable than a version table."""
    if model in _PREFIX_SUPPORT:
        return _PREFIX_SUPPORT[model]
    device = input_device(model)
    ids = torch.arange(1, 6, device=device)[None] % int(model.config.vocab_size)
    mask = torch.ones_like(ids)
    positions = torch.arange(5, device=device)[None]
    try:
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        cache = DynamicCache()
        model(input_ids=ids[:, :2], attention_mask=mask[:, :2], position_ids=positions[:, :2],
              **cache_inputs(model, cache))
        fresh = filled_cache(kv_pairs(cache))
        rest = model(input_ids=ids[:, 2:], attention_mask=mask, position_ids=positions[:, 2:],
                     **cache_inputs(model, fresh)).logits
        ok = torch.allclose(rest.float(), full[:, 2:].float(), rtol=1e-3, atol=1e-3)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError, RuntimeError):
        ok = False
    _PREFIX_SUPPORT[model] = ok
    return ok


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class TargetOptimizer:
    """Computes z for many requests, `batch_size` requests per forward/backward.

    reuse_prefix=True (the default) runs each step only over what δ can change; False runs the
    whole model each step like the reference. Both give the same z up to float rounding.
    """

    def __init__(self, model, layout: ModelLayout, tok, settings: ZSettings, templates: Sequence[Sequence[str]],
                 reuse_prefix: bool = True):
        self.model, self.layout, self.tok, self.s = model, layout, tok, settings
        self.templates = [t for group in templates for t in group]
        self.pad_id, self.side = pad_id_of(tok), padding_side(tok)
        self.reuse_prefix = reuse_prefix and supports_prefix_reuse(model)
        if reuse_prefix and not self.reuse_prefix:
            warnings.warn(f"{type(model).__name__}: continuing from a key/value cache (passed as "
                          f"`{cache_keyword(model)}`) did not reproduce a full forward, so prefix reuse is off; the z "
                          "phase runs the whole model at each step (same results, slower)")
        self.block = layout.block(settings.layer)
        self.loss_block = layout.block(settings.loss_layer)
        param = next(self.block.parameters())  # its dtype is right even when its values are offloaded
        self.device = execution_device(self.block)
        # δ, Adam state and the loss are float32 at least, wider when the model is (float64 runs
        # make float-order effects negligible, which the equivalence tests rely on).
        self.dtype = torch.promote_types(torch.float32, param.dtype)

    def prompts(self, requests: Sequence[EditRequest]) -> list[ZPrompts]:
        return [build_prompts(self.tok, r, self.templates) for r in requests]

    def _chunk(self, prompts, frame=None) -> PromptChunk:
        return PromptChunk(prompts, self.pad_id, "subject" if self.reuse_prefix else self.side, self.device, frame)

    def _losses(self, forward, delta: torch.Tensor, kl_init, h_norm_sq):
        """One forward: per-request total loss, block-L subject states, KL log-probs."""
        chunk = forward.chunk
        out, offset, h = forward(delta)
        dev = out.device
        picked = torch.cat([out[chunk.lbl_row.to(dev), chunk.lbl_col.to(dev) - offset],
                            out[chunk.kl_row.to(dev), chunk.kl_col.to(dev) - offset]])
        logp = torch.log_softmax(self.layout.logits(picked).to(self.dtype), dim=-1)
        n_lbl = chunk.lbl_row.numel()
        token_lp = logp[:n_lbl].gather(1, chunk.lbl_tok.to(dev)[:, None]).squeeze(1)
        nll = torch.zeros(chunk.n, device=dev, dtype=self.dtype).index_add(
            0, chunk.lbl_req.to(dev), -token_lp * chunk.lbl_w.to(dev, self.dtype)
        )
        kl_logp = logp[n_lbl:]
        h = h.to(dev, self.dtype)
        if kl_init is None:
            kl_init = kl_logp.detach()
            h_norm_sq = h.pow(2).sum(1)
        kl = (kl_logp.exp() * (kl_logp - kl_init)).sum(1)
        wd = self.s.weight_decay * delta.to(dev).norm(dim=1) / h_norm_sq
        return nll + self.s.kl_factor * kl + wd, h, kl_init, h_norm_sq

    def optimize_chunk(self, prompts: Sequence[ZPrompts]) -> ZResult:
        n, d = len(prompts), self.layout.hidden_size
        delta = torch.zeros(n, d, device=self.device, dtype=self.dtype, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=self.s.lr)
        h_init = torch.zeros(n, d, device=self.device, dtype=self.dtype)
        final_loss = torch.zeros(n, dtype=self.dtype)
        steps = torch.zeros(n, dtype=torch.long)
        active = list(range(n))
        chunk = self._chunk(prompts)
        forward = (_PrefixForward if self.reuse_prefix else _PlainForward)(self, chunk)
        kl_init = h_norm_sq = None
        for it in range(self.s.num_grad_steps):
            opt.zero_grad(set_to_none=True)
            idx = torch.tensor(active, device=self.device)
            loss, h, kl_init, h_norm_sq = self._losses(forward, delta[idx], kl_init, h_norm_sq)
            if it == 0:
                h_init.copy_(h.to(self.device))
            values = loss.detach().cpu()
            stop = (values < self.s.early_stop_loss) | (it == self.s.num_grad_steps - 1)
            for j in torch.nonzero(stop).flatten().tolist():
                final_loss[active[j]], steps[active[j]] = values[j], it
            if bool(stop.all()):
                break
            go = ~stop.to(loss.device)
            loss[go].sum().backward()
            keep = [r for j, r in enumerate(active) if not stop[j]]
            with torch.no_grad():
                frozen_rows = torch.ones(n, dtype=torch.bool, device=self.device)
                frozen_rows[keep] = False
                saved = delta[frozen_rows].clone()
            opt.step()
            with torch.no_grad():
                delta[frozen_rows] = saved
                k = torch.tensor(keep, device=self.device)
                max_norm = self.s.clamp_norm_factor * h_init[k].norm(dim=1)
                norms = delta[k].norm(dim=1)
                scale = torch.where(norms > max_norm, max_norm / norms, torch.ones_like(norms))
                delta[k] = delta[k] * scale[:, None]
            if len(keep) < len(active):
                go_idx = torch.nonzero(go).flatten()
                kl_init, h_norm_sq = kl_init[go_idx], h_norm_sq[go_idx]
                per = chunk.rows_per_request
                rows = torch.cat([torch.arange(j * per, (j + 1) * per) for j in go_idx.tolist()])
                chunk = self._chunk([prompts[r] for r in keep], chunk.frame if self.reuse_prefix else None)
                forward = forward.select(chunk, rows)
                active = keep
        return ZResult(h_init + delta.detach(), h_init, final_loss, steps)

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

    def chunk_size(self, prompts: Sequence[ZPrompts], memory_budget: Optional[int] = None) -> int:
        """Requests per chunk that fit `memory_budget` bytes (default: 80% of free CUDA memory)."""
        if memory_budget is None:
            if self.device.type != "cuda":
                return 64
            memory_budget = int(0.8 * torch.cuda.mem_get_info(self.device)[0])
        return max(1, min(len(prompts), memory_budget // max(1, self.bytes_per_request(prompts))))

    def optimize(self, requests: Sequence[EditRequest], batch_size: Optional[int] = None, progress: bool = True,
                 memory_budget: Optional[int] = None) -> ZResult:
        """z for every request. batch_size=None sizes chunks from the memory budget; a chunk that
        runs out of memory anyway is split and retried.

        Under torch.distributed each rank optimizes every world-size-th request of the
        length-sorted order (so shares cost alike) and the results are gathered: every rank
        returns all n rows."""
        world = parallel.world()
        prompts = self.prompts(requests)
        size = batch_size or self.chunk_size(prompts, memory_budget)
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
        """One request at a time, written as the reference code runs it; the equivalence baseline."""
        results = []
        with frozen_eval(self.model):
            for prompts in tqdm(self.prompts(requests), desc="z (serial)", disable=not progress, unit="req"):
                results.append(self._serial_one(prompts))
        return ZResult(*(torch.stack([r[i] for r in results]) for i in range(4)))

    def _serial_one(self, p: ZPrompts):
        rows = list(p.rewrite) + [p.kl]
        batch = pad([r.ids for r in rows], self.pad_id, self.side, self.device)
        shift = batch.shift.tolist()
        cols = [r.subject_index + s for r, s in zip(rows, shift)]
        m, n_rw = len(p.target), len(p.rewrite)
        labels = torch.full(batch.input_ids.shape, -100, dtype=torch.long, device=self.device)
        for i, plen in enumerate(p.prompt_lengths):
            labels[i, shift[i] + plen - 1 : shift[i] + plen - 1 + m] = torch.tensor(p.target)
        labels = labels[:n_rw]
        mask = (labels != -100).float()
        delta = torch.zeros(self.layout.hidden_size, device=self.device, dtype=self.dtype, requires_grad=True)
        opt = torch.optim.Adam([delta], lr=self.s.lr)
        target_init = kl_init = None

        def add_delta(h):
            nonlocal target_init
            if target_init is None:
                target_init = h[0, cols[0]].detach().to(self.dtype).clone()
            h = h.clone()
            for i, c in enumerate(cols):
                h[i, c] += delta.to(h.dtype)
            return h

        for it in range(self.s.num_grad_steps):
            opt.zero_grad()
            store: dict = {}
            with edit_output(self.block, add_delta), capture_outputs({"out": self.loss_block}, store):
                run_until(self.model, self.loss_block, **batch.model_inputs())
            logits = self.layout.logits(store["out"]).to(self.dtype)
            log_probs = torch.log_softmax(logits[:n_rw], dim=2)
            token_lp = torch.gather(log_probs, 2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
            nll = (-(token_lp * mask).sum(1) / m).mean()
            kl_logp = torch.log_softmax(logits[n_rw, cols[-1]], dim=-1)
            if kl_init is None:
                kl_init = kl_logp.detach().clone()
            kl = self.s.kl_factor * (kl_logp.exp() * (kl_logp - kl_init)).sum()
            wd = self.s.weight_decay * (delta.norm() / target_init.norm() ** 2)
            loss = nll + kl + wd
            if loss.item() < self.s.early_stop_loss or it == self.s.num_grad_steps - 1:
                break
            loss.backward()
            opt.step()
            max_norm = self.s.clamp_norm_factor * target_init.norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
        return target_init + delta.detach(), target_init, loss.detach().cpu(), torch.tensor(it)
