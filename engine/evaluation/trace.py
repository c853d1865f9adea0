"""Causal tracing (ROME §2.1, DESIGN §12): which hidden states carry a fact to the output.

A prompt is run clean, then with its subject's token embeddings corrupted by Gaussian noise. For
each (layer, token), restoring the clean value of one state — a block's output (the residual
stream, kind "hidden") or a window of consecutive MLP or attention outputs ("mlp", "attn") — at
that token measures the state's indirect effect P_restored(o) − P_corrupted(o), o the first token
of the true object, averaged over the noise samples.

A restoration at (layer l, token t) leaves every state before l, and every state at a position
before t, equal to the corrupted run's. So `trace_fact` keeps the corrupted run's block outputs
and keys/values, and computes each restoration only from its first changed block on and only at
positions ≥ t, attending to the corrupted keys/values before t; the restorations sharing a first
block and token, × noise samples, run as the rows of one forward (of at most `batch_tokens`
tokens). `trace_fact_serial` runs one whole restoration per forward (its noise samples in the
batch, as ROME's code does): the reference for the tests and for benchmarks/trace_speed.py.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from massedit.inputs import tokens as T
from massedit.model.arch import ModelLayout, UnsupportedModelError, get_module
from massedit.model.devices import execution_device
from massedit.model.hooks import capture_outputs, edit_output, hidden_of, hooks, replayed, run_until, with_hidden
from massedit.model.quantized import cpu_repacking_off
from massedit.inputs.requests import EditRequest
from massedit.compute.targets import cache_inputs, filled_cache, kv_pairs, supports_prefix_reuse

KINDS = ("hidden", "mlp", "attn")
# Token groups of the averaged heat maps (ROME's Figure 1); tokens before the subject are left
# out, as there.
GROUPS = ("first subject tokens", "last subject token", "further tokens", "last token")
# Tokens per batched forward. On a CPU 256 to 1024 ran fastest (larger batches leave the caches;
# 16384 took 1.5x the time on a 6-layer, 128-wide GPT-2); a GPU wants more.
BATCH_TOKENS = 1024


@dataclass(frozen=True)
class TracePrompt:
    """One fact as traced: the filled prompt's ids, its subject's token range and the answer."""

    text: str
    ids: tuple[int, ...]
    subject: tuple[int, int]  # token range [first, last + 1)
    answer: str
    answer_id: int


@dataclass
class FactTrace:
    prompt: TracePrompt
    tokens: list[str]
    p_clean: float
    p_corrupted: float
    effects: dict[str, torch.Tensor]  # kind → [tokens, layers]: P_restored − P_corrupted

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt.text, "tokens": self.tokens, "subject_tokens": list(self.prompt.subject),
            "answer": self.prompt.answer, "p_clean": self.p_clean, "p_corrupted": self.p_corrupted,
            "effects": {k: v.tolist() for k, v in self.effects.items()},
        }


def check_requests(requests: Sequence[EditRequest]) -> None:
    """Every request needs its true object: the trace measures that object's probability."""
    if not requests:
        raise ValueError("no facts to trace: the data file holds no records")
    for request in requests:
        if request.target_true is None:
            raise ValueError(
                f"{request.source or 'request'}: no true object (target_true); causal tracing measures "
                "the probability of the true object, so give target_true in every record"
            )


def prepare(tok, request: EditRequest) -> TracePrompt:
    check_requests([request])
    text, start, end = T.fill(request.prompt, request.subject)
    ids, last = T.subject_last_index(tok, text, start, end)
    _, first = T.subject_last_index(tok, text, start, start + 1)
    return TracePrompt(text, tuple(ids), (first, last + 1), request.target_true,
                       T.target_ids(tok, text, request.target_true)[0])


def default_window(n_layers: int) -> int:
    """ROME's window of 10 MLP / attention layers on 28- to 48-layer models, scaled down with depth."""
    return min(10, max(1, round(10 * n_layers / 28)))


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """The `window` layers centred on `layer`, cut at the model's ends (ROME's clamp)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def make_noise(samples: int, n_tokens: int, width: int, sigma: float, seed: int) -> torch.Tensor:
    """[samples, n_tokens, width] Gaussian noise of std `sigma`, the same on every machine."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(samples, n_tokens, width, generator=gen) * sigma


class Tracer:
    """Module handles of one model for tracing, and the forwards that trace a prompt."""

    def __init__(self, model: nn.Module, layout: Optional[ModelLayout] = None):
        self.model = model
        self.layout = layout or ModelLayout(model)
        self.n_layers = self.layout.n_layers
        self.embed = model.get_input_embeddings()
        self.last_block = self.layout.block(self.n_layers - 1)
        spec = self.layout.spec
        self._templates = {"hidden": spec.layer_module_tmp, "mlp": spec.mlp_module_tmp, "attn": spec.attn_module_tmp}

    def module(self, kind: str, layer: int) -> nn.Module:
        template = self._templates[kind]
        if not template:
            raise UnsupportedModelError(
                f"the architecture registry has no {kind} module path for model_type "
                f"{self.layout.model_type!r}; add it to massedit.model.arch.REGISTRY, or trace kinds=('hidden',) only"
            )
        return get_module(self.model, template.format(layer))

    def input_ids(self, prompt: TracePrompt, rows: int) -> torch.Tensor:
        ids = torch.tensor([prompt.ids], device=execution_device(self.embed))
        return ids.expand(rows, -1)

    @torch.no_grad()
    def embedding_std(self, prompts: Sequence[TracePrompt]) -> float:
        """Std of the subjects' token embeddings over all prompts (ROME's noise scale)."""
        embs = [self.embed(self.input_ids(p, 1))[0, p.subject[0]:p.subject[1]].float() for p in prompts]
        return float(torch.cat([e.reshape(-1).cpu() for e in embs]).std())

    @torch.no_grad()
    def clean_states(self, prompt: TracePrompt, kinds: Iterable[str]) -> tuple[dict, float]:
        """{(kind, layer): [tokens, width] clean output} and the clean P(answer)."""
        modules = {(k, l): self.module(k, l) for k in kinds for l in range(self.n_layers)}
        store: dict = {}
        with capture_outputs(modules, store):
            p = self.answer_probs(prompt, 1)
        return {key: _by_row(h, 1)[0] for key, h in store.items()}, float(p[0])

    def answer_probs(self, prompt: TracePrompt, rows: int) -> torch.Tensor:
        """P(answer) after the prompt for each of `rows` identical inputs, under the active hooks."""
        return self._final_probs(prompt, input_ids=self.input_ids(prompt, rows), use_cache=False)

    def _final_probs(self, prompt: TracePrompt, **inputs) -> torch.Tensor:
        """The forward stops after the last block and the LM head runs at the last position only."""
        store: dict = {}
        with capture_outputs({"last": self.last_block}, store):
            run_until(self.model, self.last_block, **inputs)
        return self._probs_at_end(prompt, store["last"])

    def _probs_at_end(self, prompt: TracePrompt, last_hidden: torch.Tensor) -> torch.Tensor:
        logits = self.layout.logits(last_hidden[:, -1]).float()
        return torch.softmax(logits, dim=-1)[:, prompt.answer_id].cpu()

    @torch.no_grad()
    def corrupted_run(self, prompt: TracePrompt, noise: torch.Tensor) -> "CorruptedRun":
        outputs: list = [None] * self.n_layers

        def keep(layer):
            return lambda _module, _args, output: outputs.__setitem__(layer, output)

        reuse = supports_prefix_reuse(self.model)
        cache = filled_cache([]) if reuse else None
        inputs = cache_inputs(self.model, cache) if reuse else {"use_cache": False}
        blocks = [self.layout.block(l) for l in range(self.n_layers)]
        with hooks(lambda: [b.register_forward_hook(keep(l)) for l, b in enumerate(blocks)]), \
                self.corrupted(prompt, noise):
            p = self._final_probs(prompt, input_ids=self.input_ids(prompt, noise.shape[0]), **inputs)
        return CorruptedRun(outputs, kv_pairs(cache) if reuse else None, float(p.double().mean()))

    def resumed_probs(self, prompt: TracePrompt, clean: dict, run: "CorruptedRun", noise: torch.Tensor,
                      first: int, start: int, row_cells: Sequence[tuple], sample_of_row: torch.Tensor) -> torch.Tensor:
        """P(answer) of rows that each restore one cell (kind, layer, token, modules) of noise sample
        sample_of_row[r], computed from block `first` on at positions ≥ `start` only.

        Blocks before `first` replay the corrupted run's block first − 1 output (a replayed block
        ignores its input, so only the last one's output matters), in which a "hidden" cell of
        layer first − 1 puts its clean value; positions before `start` are the corrupted run's
        keys/values. Every cell's restored token must be ≥ start, and its first changed block
        ≥ first."""
        n_tokens, rows = len(prompt.ids), len(row_cells)
        plan: dict = {}
        for r, (kind, _, token, modules) in enumerate(row_cells):
            for key in ([] if kind == "hidden" else modules):
                plan.setdefault(key, ([], []))
                plan[key][0].append(r)
                plan[key][1].append(token)
        with contextlib.ExitStack() as stack:
            if first > 0:
                raw = run.outputs[first - 1]
                corrupted = hidden_of(raw)
                hidden = corrupted[sample_of_row.to(corrupted.device), start:]
                restored = [(r, token) for r, (kind, _, token, _) in enumerate(row_cells) if kind == "hidden"]
                if restored:
                    r, toks = (torch.tensor(x) for x in zip(*restored))
                    value = clean[("hidden", first - 1)].to(hidden.device, hidden.dtype)[toks.to(hidden.device)]
                    hidden[r.to(hidden.device), (toks - start).to(hidden.device)] = value
                if first == self.n_layers:
                    return self._probs_at_end(prompt, hidden)
                stack.enter_context(replayed(self.layout, {l: with_hidden(raw, hidden) for l in range(first)}))
            else:
                stack.enter_context(self.corrupted(prompt, noise[sample_of_row], start))
            stack.enter_context(self.restored(clean, {k: (torch.tensor(r), torch.tensor(t)) for k, (r, t) in plan.items()},
                                              rows, start))
            ids = self.input_ids(prompt, rows)
            if start == 0:
                return self._final_probs(prompt, input_ids=ids, use_cache=False)
            cache = filled_cache([(k[sample_of_row.to(k.device), :, :start], v[sample_of_row.to(v.device), :, :start])
                                  for k, v in run.kv])
            positions = torch.arange(start, n_tokens, device=ids.device).expand(rows, -1)
            return self._final_probs(prompt, input_ids=ids[:, start:], attention_mask=torch.ones_like(ids),
                                     position_ids=positions, **cache_inputs(self.model, cache))

    @contextlib.contextmanager
    def corrupted(self, prompt: TracePrompt, noise: torch.Tensor, start: int = 0):
        """Adds noise[row] to the subject's token embeddings of each row, the input holding the
        prompt's positions from `start` on."""
        a, b = prompt.subject
        lo = max(a, start)

        def add(e: torch.Tensor) -> torch.Tensor:
            if lo >= b:
                return e
            e = e.clone()
            e[:, lo - start:b - start] += noise[:, lo - a:].to(e.device, e.dtype)
            return e

        with edit_output(self.embed, add):
            yield

    @contextlib.contextmanager
    def restored(self, clean: dict, plan: dict, n_rows: int, start: int = 0):
        """plan {(kind, layer): (rows, tokens)}: those rows' outputs at those tokens set to clean,
        in a forward of `n_rows` rows whose input holds the prompt's positions from `start` on."""
        with contextlib.ExitStack() as stack:
            for key, (rows, toks) in plan.items():
                def put(h, key=key, rows=rows, toks=toks):
                    value = clean[key].to(h.device, h.dtype)[toks.to(h.device)]
                    edited = _by_row(h, n_rows).index_put((rows.to(h.device), (toks - start).to(h.device)), value)
                    return edited.view(h.shape)

                stack.enter_context(edit_output(self.module(*key), put))
            yield


def _by_row(h: torch.Tensor, n_rows: int) -> torch.Tensor:
    """A module output as [rows, positions, width]: OPT's MLP works on rows × positions flattened."""
    return h.reshape(n_rows, -1, h.shape[-1])


@dataclass
class CorruptedRun:
    """The corrupted run of one prompt: each block's output as the block returned it (rows: noise
    samples), each layer's (keys, values) or None where the model cannot continue from a cache
    (targets.supports_prefix_reuse), and the mean P(answer)."""

    outputs: list
    kv: Optional[list]
    p: float


def _restorations(kinds: Sequence[str], n_layers: int, n_tokens: int, window: int) -> list[tuple]:
    """(kind, layer, token, modules) for every cell of the kinds' heat maps."""
    out = []
    for kind in kinds:
        for layer in range(n_layers):
            span = [layer] if kind == "hidden" else window_layers(layer, window, n_layers)
            for token in range(n_tokens):
                out.append((kind, layer, token, [(kind, j) for j in span]))
    return out


def _check_kinds(kinds: Sequence[str]) -> None:
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be some of {', '.join(KINDS)}; got {', '.join(kinds) or 'none'}")


def _result(tracer: Tracer, tok, prompt: TracePrompt, p_clean: float, p_corrupted: float, cells: list,
            probs: Sequence[float], kinds: Sequence[str]) -> FactTrace:
    n_tokens = len(prompt.ids)
    effects = {k: torch.zeros(n_tokens, tracer.n_layers, dtype=torch.float64) for k in kinds}
    for (kind, layer, token, _), p in zip(cells, probs):
        effects[kind][token, layer] = float(p) - p_corrupted
    tokens = [tok.decode([i]) for i in prompt.ids]
    return FactTrace(prompt, tokens, p_clean, p_corrupted, effects)


@torch.no_grad()
def trace_fact(tracer: Tracer, tok, prompt: TracePrompt, noise: torch.Tensor, kinds: Sequence[str] = KINDS,
               window: int = 1, batch_tokens: int = BATCH_TOKENS, last_subject_only: bool = False) -> FactTrace:
    """Every restoration × noise sample of `prompt`, each computed only where it differs from the
    corrupted run (Tracer.resumed_probs), those sharing a first block and token as rows of one
    forward of at most `batch_tokens` tokens.

    A "hidden" cell at layer l first changes block l + 1's input, an MLP or attention window
    first changes its first layer's block. Restorations at tokens before the subject are not run:
    the noise cannot reach them under causal attention, so their effect is exactly 0. A model that
    cannot continue from a key/value cache recomputes every position of its restorations.
    `last_subject_only`: only the restorations at the subject's last token, the row layers are
    chosen from (the other cells come out NaN): n_tokens times fewer forwards."""
    _check_kinds(kinds)
    samples, n_tokens = noise.shape[0], len(prompt.ids)
    clean, p_clean = tracer.clean_states(prompt, kinds)
    run = tracer.corrupted_run(prompt, noise)
    cells = _restorations(kinds, tracer.n_layers, n_tokens, window)
    groups: dict = {}
    skipped = []
    for i, (kind, layer, token, modules) in enumerate(cells):
        if last_subject_only and token != prompt.subject[1] - 1:
            skipped.append(i)
        elif token >= prompt.subject[0]:
            first = layer + 1 if kind == "hidden" else modules[0][1]
            groups.setdefault((first, token if run.kv is not None else 0), []).append(i)
    probs = torch.full((len(cells),), run.p, dtype=torch.float64)
    probs[skipped] = float("nan")
    for (first, start), members in groups.items():
        row_cells = [cells[i] for i in members for _ in range(samples)]
        row_probs = torch.empty(len(row_cells), dtype=torch.float64)
        step = max(1, batch_tokens // (n_tokens - start))
        for a in range(0, len(row_cells), step):
            b = min(len(row_cells), a + step)
            row_probs[a:b] = tracer.resumed_probs(prompt, clean, run, noise, first, start, row_cells[a:b],
                                                  torch.arange(a, b) % samples).double()
        probs[torch.tensor(members)] = row_probs.view(len(members), samples).mean(dim=1)
    return _result(tracer, tok, prompt, p_clean, run.p, cells, probs.tolist(), kinds)


@torch.no_grad()
def trace_fact_serial(tracer: Tracer, tok, prompt: TracePrompt, noise: torch.Tensor, kinds: Sequence[str] = KINDS,
                      window: int = 1, samples_per_forward: Optional[int] = None) -> FactTrace:
    """The reference: one forward per restoration, its batch the noise samples as in ROME's code
    (or `samples_per_forward` of them per forward); every cell is computed, nothing replayed."""
    _check_kinds(kinds)
    samples = noise.shape[0]
    step = samples_per_forward or samples
    clean, p_clean = tracer.clean_states(prompt, kinds)

    def mean_prob(modules: list, token: int) -> float:
        total = 0.0
        for s in range(0, samples, step):
            part = noise[s:s + step]
            rows = torch.arange(part.shape[0])
            plan = {key: (rows, torch.full_like(rows, token)) for key in modules}
            with tracer.corrupted(prompt, part), tracer.restored(clean, plan, part.shape[0]):
                total += float(tracer.answer_probs(prompt, part.shape[0]).double().sum())
        return total / samples

    p_corrupted = mean_prob([], 0)
    cells = _restorations(kinds, tracer.n_layers, len(prompt.ids), window)
    probs = [mean_prob(modules, token) for _, _, token, modules in cells]
    return _result(tracer, tok, prompt, p_clean, p_corrupted, cells, probs, kinds)


def token_groups(prompt: TracePrompt) -> dict[str, list[int]]:
    """Token indices of each heat-map group (GROUPS) in one prompt; a group may be empty."""
    first, end = prompt.subject
    last = len(prompt.ids) - 1
    return {
        GROUPS[0]: list(range(first, end - 1)),
        GROUPS[1]: [end - 1],
        GROUPS[2]: list(range(end, last)),
        GROUPS[3]: [last],
    }


def average_effects(traces: Sequence[FactTrace], kind: str) -> torch.Tensor:
    """[groups, layers] mean effect over facts, each fact's group averaged over its tokens first;
    NaN where no fact has a token in the group (e.g. single-token subjects only)."""
    n_layers = traces[0].effects[kind].shape[1]
    out = torch.full((len(GROUPS), n_layers), float("nan"), dtype=torch.float64)
    for g, name in enumerate(GROUPS):
        rows = [t.effects[kind][token_groups(t.prompt)[name]].mean(0) for t in traces if token_groups(t.prompt)[name]]
        if rows:
            out[g] = torch.stack(rows).mean(0)
    return out


def suggest_layers(mlp_effect: Sequence[float], span: int, n_layers: int) -> list[int]:
    """The `span` consecutive layers with the largest summed MLP effect at the subject's last token.

    The window's last layer stays at most n_layers − 2 (when the model has 3 or more layers), so
    that blocks remain after the z layer to carry δ to the output, as `default_layers` does."""
    span = max(1, min(span, n_layers))
    last_allowed = n_layers - 2 if n_layers >= 3 else n_layers - 1
    starts = range(0, max(0, last_allowed - span + 1) + 1)
    best = max(starts, key=lambda s: (sum(mlp_effect[s:s + span]), -s))
    return list(range(best, min(n_layers, best + span)))


@dataclass
class TraceResult:
    traces: list[FactTrace]
    sigma: float  # noise std: noise_scale × the subjects' embedding std
    samples: int
    window: int
    seed: int

    def averaged(self, kind: str) -> torch.Tensor:
        return average_effects(self.traces, kind)

    def suggested_layers(self, span: int) -> list[int]:
        mlp_last_subject = self.averaged("mlp")[GROUPS.index("last subject token")]
        return suggest_layers(mlp_last_subject.tolist(), span, self.traces[0].effects["mlp"].shape[1])


def trace(model: nn.Module, tok, requests: Sequence[EditRequest], samples: int = 10, window: Optional[int] = None,
          noise_scale: float = 3.0, seed: int = 0, kinds: Sequence[str] = KINDS, batch_tokens: int = BATCH_TOKENS,
          progress: bool = False, last_subject_only: bool = False) -> TraceResult:
    """Causal traces of `requests` (each needs target_true). Fact i's noise is seeded with seed + i;
    `window` defaults to `default_window(n_layers)`. `last_subject_only`: only the subject's last
    token's row, what `suggested_layers` reads (trace_fact)."""
    _check_kinds(kinds)
    for name, value in (("samples", samples), ("batch_tokens", batch_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if noise_scale <= 0:
        raise ValueError(f"noise_scale must be positive, got {noise_scale}")
    check_requests(requests)
    tracer = Tracer(model)
    window = default_window(tracer.n_layers) if window is None else window
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    prompts = [prepare(tok, r) for r in requests]
    # Tracing before editing (e.g. choosing layers) must leave a 4-bit model editable.
    with cpu_repacking_off(model):
        sigma = noise_scale * tracer.embedding_std(prompts)
        width = tracer.embed.weight.shape[-1]  # the noise is added to the embedding module's output
        if progress:
            from tqdm.auto import tqdm

            prompts = tqdm(prompts, desc="tracing", unit="fact")
        traces = [trace_fact(tracer, tok, p, make_noise(samples, p.subject[1] - p.subject[0], width, sigma, seed + i),
                             kinds, window, batch_tokens, last_subject_only) for i, p in enumerate(prompts)]
    return TraceResult(traces, sigma, samples, window, seed)
