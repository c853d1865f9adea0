"""Judging edits: CounterFact and zsRE metrics from raw records (DESIGN §4, §5, §6).

Everything rests on one batched, teacher-forced scorer, `score_continuations`: every
(prompt, target) pair of every case is flattened into one list, deduplicated, sorted by length
(little padding), padded on the tokenizer's side with explicit position ids, and run many per
forward under `torch.no_grad()`. Only the logits at the target positions are kept; log-softmax is
taken over those rows only, in float32, whatever the model's dtype. `batch_size=1` is the "one
prompt at a time" mode (no padding at all).

Conventions (and what the reference, kmeng01/memit, does):

* **Object tokens.** The object is scored as a continuation of the prompt with a leading space
  (`massedit.inputs.tokens.target_ids`), token by token: the input is prompt ids + target ids[:-1] and the
  log-probs are read at the last len(target) positions. The reference builds
  `f"{prefix} {target}"` and tokenizes " target" separately (which, for tokenizers with a BOS,
  scores the BOS too); here the target ids are the suffix of tokenize(prompt + " " + target).
* **ES / PS / NS** (reference `experiments/summarize.py`): per prompt, the reference stores the
  *mean token NLL* of each object; a rewrite/paraphrase prompt succeeds when
  `nll(o_true) > nll(o_new)` (strictly), a neighborhood prompt when `nll(o_true) < nll(o_new)`.
  So "P(o)" is the geometric-mean token probability exp(-mean NLL). Per case: the fraction of its
  prompts that succeed (ES over the one rewrite prompt is 0 or 1). Aggregate: mean over cases.
* **EM / PM / NM** (DESIGN §4; the reference's `*_diff`): per prompt p̄(o_new) − p̄(o_true)
  (neighborhood: p̄(o_true) − p̄(o_new)) with p̄ = exp(−mean token NLL), averaged over the
  case's prompts, then over cases.
* **S** = harmonic mean of the aggregate ES, PS, NS means, as the reference computes its
  "score" (not a mean of per-case harmonic means); 0 if any of them is 0.
* **Scale and intervals.** Per-case values are fractions (0–1); aggregates are multiplied by 100,
  as the reference's summarize does for every metric (so GE is reported ×100 too: the paper's
  GE 619.9). The 95% interval of a per-case metric is the normal approximation
  mean ± 1.96·s/√n (s: sample standard deviation, ddof=1; None when n < 2; not clipped to the
  metric's range, so a small-n success rate may show a bound below 0). For the composite
  S (and zsRE score) it is a percentile bootstrap over cases (1000 resamples, seed 0); its `n` is
  the smallest number of cases behind any of its parts.
* **Missing prompts.** A case without paraphrase (or neighborhood) prompts has PS/PM (or NS/NM)
  = None; aggregates skip it and report how many cases contributed (`n`).
* **GE** (reference `n_gram_entropy` / `compute_n_gram_entropy`): per generated text,
  mean(2/3·H₂, 4/3·H₃) with Hₙ the base-2 entropy of the n-gram frequency distribution; the case
  value is the arithmetic mean over its texts. NOTE: the reference takes the *mean* of the two
  weighted entropies, i.e. half of the sum written in DESIGN §6; we follow the reference (it is
  what makes the paper's ≈620 come out). Words are split by a regex approximating
  `nltk.word_tokenize` (word runs, hyphenated words, clitics like "'s", single punctuation
  marks); nltk is not a dependency. A text with fewer than n words contributes Hₙ = 0.
* **Generation** (reference `generate_fast`: top-k = 5 sampling, max_out_len = 100 tokens
  *including* the prompt, one sample per prompt, text = decoded prompt + continuation). Here
  `model.generate` with the same settings (top_k=0 means greedy), seeded (`seed`) inside a forked
  RNG so the caller's RNG state is untouched; prompts are batched by equal token length, so no
  padding is ever needed; generation stops early if every row emits EOS. Text is NFKD-normalized
  and "\\n\\n" replaced by a space, as the reference does.
* **RS** (reference: TF-IDF cosine between the joined generations and the joined Wikipedia
  snippets about o_new, with a vectorizer fitted on Wikipedia). Here the reference texts come
  from `reference_texts={object: [texts]}` and/or a record's own `"reference_texts"`; the IDF is
  fitted on all those texts (each text a document) with sklearn's defaults re-implemented in
  numpy: lowercase, tokens `\\b\\w\\w+\\b`, raw counts, idf = ln((1+N)/(1+df)) + 1, l2 norm.
  Without texts for a case's o_new its RS is None and a note says so.
* **zsRE** (reference `dsets/zsre.py` and `experiments/py/eval_utils_zsre.py`): target =
  answers[0] (`zsre_target="alt"` uses "alt", as EasyEdit does); efficacy / paraphrase = the
  fraction of target tokens that are the top-1 prediction given src / rephrase, teacher forced;
  specificity = the same for " " + loc_ans given `loc + "?"` — MEMIT appends "?" to the loc
  question, which in zsre_mend_eval.json already starts with "nq question: " (not added again;
  "?" is not doubled when loc already ends with one). Per case: mean over its target tokens;
  score = harmonic mean of the three aggregate means.
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from massedit.inputs import tokens as T
from massedit.model.arch import ModelLayout, UnsupportedModelError
from massedit.model.devices import input_device
from massedit.model.hooks import capture_outputs, run_until
from massedit.model.quantized import cpu_repacking_off

CF_METRICS = ("ES", "PS", "NS", "EM", "PM", "NM")
GEN_METRICS = ("GE", "RS")
ZSRE_METRICS = ("efficacy", "paraphrase", "specificity")
BOOTSTRAP_SAMPLES = 1000


# --------------------------------------------------------------------------------------------
# Teacher-forced scoring
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ContScore:
    """Teacher-forced score of one target continuation of one prompt."""

    prompt: str
    target: str
    target_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # log P(target_t | prompt, target_<t), one per target token
    correct: tuple[bool, ...]  # argmax at that position == target_t

    @property
    def nll(self) -> float:
        """Mean token negative log-likelihood (the reference's per-prompt 'prob')."""
        return -sum(self.logprobs) / len(self.logprobs)

    @property
    def prob(self) -> float:
        """p̄ = exp(-mean token NLL): the geometric-mean token probability."""
        return math.exp(-self.nll)

    @property
    def accuracy(self) -> float:
        """Fraction of target tokens predicted top-1."""
        return sum(self.correct) / len(self.correct)

    @property
    def all_correct(self) -> bool:
        return all(self.correct)


def _encode_prompt(tok, prompt: str) -> list[int]:
    prompt_ids = list(tok(prompt, add_special_tokens=True)["input_ids"])
    if not prompt_ids:
        raise ValueError(f"prompt {prompt!r} tokenizes to nothing: there is no position to predict the target from")
    return prompt_ids


def _head_at(model):
    """A function (batch inputs, rows, cols) -> logits at those positions only.

    Registry models run their blocks and apply the final norm and the LM head at the scored
    positions alone; other models fall back to full logits."""
    try:
        layout = ModelLayout(model)
    except (UnsupportedModelError, AttributeError):
        layout = None

    def full(inputs, rows, cols):
        logits = model(**inputs, use_cache=False).logits
        return logits[rows.to(logits.device), cols.to(logits.device)]

    if layout is None:
        return full

    def positions(inputs, rows, cols):
        store: dict = {}
        last = layout.block(layout.n_layers - 1)
        with capture_outputs({"h": last}, store):
            run_until(model, last, **inputs, use_cache=False)
        h = store["h"]
        return layout.logits(h[rows.to(h.device), cols.to(h.device)])

    return positions


def score_continuations(model, tok, pairs: Sequence[tuple[str, str]], batch_size: int = 64) -> list[ContScore]:
    """Per-token log-probs and top-1 correctness of each target given its prompt.

    Pairs are deduplicated; pairs whose inputs (prompt + target[:-1]) are the same token sequence,
    such as two single-token objects after one prompt, share one row. Rows are sorted by length and
    scored `batch_size` per forward. Returns one ContScore per input pair, in input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pairs = [(str(p), str(t)) for p, t in pairs]
    unique = list(dict.fromkeys(pairs))
    if not unique:
        return []
    prompt_cache: dict[str, list[int]] = {}
    rows_of: dict[tuple[int, ...], list[int]] = {}  # input sequence -> indices into `unique`
    targets: list[list[int]] = []
    for i, (prompt, target) in enumerate(unique):
        if prompt not in prompt_cache:
            prompt_cache[prompt] = _encode_prompt(tok, prompt)
        tids = list(T.target_ids(tok, prompt, target))
        targets.append(tids)
        rows_of.setdefault(tuple(prompt_cache[prompt] + tids[:-1]), []).append(i)
    seqs = sorted(rows_of, key=len)
    device = input_device(model)
    side, pad_id = T.padding_side(tok), T.pad_id_of(tok)
    head = _head_at(model)
    scored: list[Optional[ContScore]] = [None] * len(unique)
    with torch.no_grad():
        for start in range(0, len(seqs), batch_size):
            chunk = seqs[start : start + batch_size]
            batch = T.pad(chunk, pad_id, side, device=device)
            rows, cols, tgt, spans = [], [], [], []
            for r, seq in enumerate(chunk):
                for i in rows_of[seq]:
                    tids = targets[i]
                    first = int(batch.shift[r]) + len(seq) - len(tids)
                    spans.append((i, len(tgt), len(tids)))
                    rows.extend([r] * len(tids))
                    cols.extend(range(first, first + len(tids)))
                    tgt.extend(tids)
            picked = head(batch.model_inputs(), torch.tensor(rows), torch.tensor(cols)).float()
            tgt_t = torch.tensor(tgt, device=picked.device)
            logp = picked.log_softmax(dim=-1).gather(1, tgt_t[:, None]).squeeze(1).tolist()
            hits = (picked.argmax(dim=-1) == tgt_t).tolist()
            for i, offset, n in spans:
                prompt, target = unique[i]
                scored[i] = ContScore(prompt, target, tuple(targets[i]), tuple(logp[offset : offset + n]),
                                      tuple(bool(h) for h in hits[offset : offset + n]))
    by_pair = dict(zip(unique, scored))
    return [by_pair[p] for p in pairs]


# --------------------------------------------------------------------------------------------
# Loading and validating records
# --------------------------------------------------------------------------------------------
def _fail(source: str, index, field: str, message: str):
    where = f"record {index}" if index is not None else "file"
    raise ValueError(f"{source}: {where}: field '{field}': {message}")


def _type_name(value) -> str:
    return type(value).__name__


def _need_str(source, i, field, value, allow_empty=False) -> None:
    if not isinstance(value, str):
        _fail(source, i, field, f"expected a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        _fail(source, i, field, "is empty")


def _need_str_list(source, i, field, value, allow_empty=True) -> None:
    if not isinstance(value, list):
        _fail(source, i, field, f"expected a list of strings, got {_type_name(value)}")
    if not value and not allow_empty:
        _fail(source, i, field, "is an empty list; at least one entry is required")
    for j, item in enumerate(value):
        _need_str(source, i, f"{field}[{j}]", item)


def _object_str(value) -> str:
    return value["str"] if isinstance(value, dict) else value


def _check_object(source, i, field, rr) -> None:
    if field not in rr:
        _fail(source, i, f"requested_rewrite.{field}", "is missing")
    value = rr[field]
    if isinstance(value, dict):
        if "str" not in value:
            _fail(source, i, f"requested_rewrite.{field}.str", "is missing")
        _need_str(source, i, f"requested_rewrite.{field}.str", value["str"])
    else:
        _need_str(source, i, f"requested_rewrite.{field}", value)


def detect_kind(record, source: str = "records", index: int = 0) -> str:
    if isinstance(record, dict):
        if "requested_rewrite" in record:
            return "counterfact"
        if "src" in record and ("answers" in record or "alt" in record or "loc" in record):
            return "zsre"
    raise ValueError(
        f"{source}: record {index}: cannot tell the format: expected a CounterFact record "
        "(with 'requested_rewrite') or a zsRE record (with 'src', 'answers', 'loc')"
    )


def _check_counterfact(source, i, rec) -> None:
    rr = rec.get("requested_rewrite")
    if rr is None:
        _fail(source, i, "requested_rewrite", "is missing")
    if not isinstance(rr, dict):
        _fail(source, i, "requested_rewrite", f"expected an object, got {_type_name(rr)}")
    for field in ("prompt", "subject"):
        if field not in rr:
            _fail(source, i, f"requested_rewrite.{field}", "is missing")
        _need_str(source, i, f"requested_rewrite.{field}", rr[field])
    if "{}" not in rr["prompt"]:
        _fail(source, i, "requested_rewrite.prompt", f"{rr['prompt']!r} has no '{{}}' where the subject goes")
    _check_object(source, i, "target_new", rr)
    _check_object(source, i, "target_true", rr)
    if "relation_id" in rr and not isinstance(rr["relation_id"], str):
        _fail(source, i, "requested_rewrite.relation_id", f"expected a string, got {_type_name(rr['relation_id'])}")
    for field in ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts", "attribute_prompts"):
        if field in rec and rec[field] is not None:
            _need_str_list(source, i, field, rec[field])
    _check_reference_texts(source, i, rec)


def _check_reference_texts(source, i, rec) -> None:
    refs = rec.get("reference_texts")
    if refs is None:
        return
    if not isinstance(refs, dict):
        _fail(source, i, "reference_texts", f"expected an object {{object: [texts]}}, got {_type_name(refs)}")
    for key, texts in refs.items():
        _need_str_list(source, i, f"reference_texts.{key}", texts)


def _check_zsre(source, i, rec, zsre_target: Optional[str]) -> None:
    if "src" not in rec:
        _fail(source, i, "src", "is missing")
    _need_str(source, i, "src", rec["src"])
    for field in ("subject", "rephrase", "loc", "alt", "pred"):
        if field in rec and rec[field] is not None:
            _need_str(source, i, field, rec[field], allow_empty=field != "subject")
    if "answers" in rec:
        _need_str_list(source, i, "answers", rec["answers"], allow_empty=False)
    if rec.get("loc"):
        if "loc_ans" not in rec:
            _fail(source, i, "loc_ans", "is missing (required with 'loc')")
        _need_str(source, i, "loc_ans", rec["loc_ans"])
    if zsre_target == "answers" and "answers" not in rec:
        _fail(source, i, "answers", "is missing")
    if zsre_target == "alt":
        if "alt" not in rec or rec["alt"] is None:
            _fail(source, i, "alt", "is missing (needed with zsre_target='alt')")
    if zsre_target is None and "answers" not in rec and not rec.get("alt"):
        _fail(source, i, "answers", "is missing (and no 'alt' either)")


def validate_records(records, kind: str = "auto", source: str = "records", zsre_target: Optional[str] = None) -> str:
    """Check every record; returns the kind. Errors name the source, the record index and the field."""
    if not isinstance(records, list):
        raise ValueError(f"{source}: expected a JSON list of records, got {_type_name(records)}")
    if not records:
        raise ValueError(f"{source}: the list of records is empty")
    if kind not in ("auto", "counterfact", "zsre"):
        raise ValueError(f"kind must be 'auto', 'counterfact' or 'zsre', got {kind!r}")
    if kind == "auto":
        kind = detect_kind(records[0], source, 0)
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            _fail(source, i, "(record)", f"expected an object, got {_type_name(rec)}")
        if "case_id" in rec and (not isinstance(rec["case_id"], int) or isinstance(rec["case_id"], bool)):
            _fail(source, i, "case_id", f"expected an integer, got {_type_name(rec['case_id'])}")
        if kind == "counterfact":
            _check_counterfact(source, i, rec)
        else:
            _check_zsre(source, i, rec, zsre_target)
    return kind


def load_records(path) -> tuple[str, list[dict]]:
    """Read a CounterFact or zsRE JSON list; returns (kind, records). Malformed → ValueError."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, "r", encoding="utf-8") as f:
            records = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None
    kind = validate_records(records, "auto", str(path))
    return kind, records


def case_id_of(record: dict, index: int) -> int:
    return record.get("case_id", index)


# --------------------------------------------------------------------------------------------
# Generation metrics: n-gram entropy and TF-IDF similarity
# --------------------------------------------------------------------------------------------
_WORD_RE = re.compile(r"\w+(?:-\w+)*|'\w+|[^\w\s]")


def word_tokenize(text: str) -> list[str]:
    """Regex approximation of nltk.word_tokenize (see the module docstring)."""
    return _WORD_RE.findall(text)


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Reference `compute_n_gram_entropy`: mean over n of weight_n · H_n (bits)."""
    words = word_tokenize(text)
    values = []
    for n, w in zip(ns, weights):
        counts = Counter(tuple(words[k : k + n]) for k in range(len(words) - n + 1))
        freqs = np.array(list(counts.values()), dtype=np.float64)
        h = float(-(freqs / freqs.sum() * np.log2(freqs / freqs.sum())).sum()) if freqs.size else 0.0
        values.append(w * h)
    return float(np.mean(values))


def n_gram_entropy(texts: Sequence[str]) -> Optional[float]:
    """Reference `n_gram_entropy` (arithmetic mean over texts)."""
    return float(np.mean([ngram_entropy(t) for t in texts])) if texts else None


_TFIDF_RE = re.compile(r"(?u)\b\w\w+\b")


class Tfidf:
    """sklearn TfidfVectorizer defaults in numpy: lowercase, `\\b\\w\\w+\\b`, smooth idf, l2 norm."""

    def __init__(self, documents: Iterable[str]):
        documents = list(documents)
        df: Counter = Counter()
        for doc in documents:
            df.update(set(self.tokenize(doc)))
        self.vocabulary = {w: k for k, w in enumerate(sorted(df))}
        n = len(documents)
        self.idf = np.array([math.log((1 + n) / (1 + df[w])) + 1.0 for w in sorted(df)], dtype=np.float64)

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return _TFIDF_RE.findall(text.lower())

    def transform(self, text: str) -> np.ndarray:
        vec = np.zeros(len(self.vocabulary), dtype=np.float64)
        for word, count in Counter(self.tokenize(text)).items():
            k = self.vocabulary.get(word)
            if k is not None:
                vec[k] = count
        vec *= self.idf
        norm = np.linalg.norm(vec)
        return vec / norm if norm > 0 else vec

    def similarity(self, text_a: str, text_b: str) -> float:
        """Cosine of the two TF-IDF vectors; 0 when either has no known word."""
        a, b = self.transform(text_a), self.transform(text_b)
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


def generate_texts(model, tok, prompts: Sequence[str], max_length: int = 100, top_k: int = 5, seed: int = 0,
                   batch_size: int = 64) -> list[str]:
    """One text (prompt + continuation, max_length tokens in all) per prompt, like generate_fast."""
    device = input_device(model)
    encoded = [list(tok(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"generation prompt {prompts[i]!r} tokenizes to nothing")
        groups[len(ids)].append(i)
    outputs: list[Optional[list[int]]] = [None] * len(prompts)
    sampling = dict(do_sample=True, top_k=top_k, top_p=1.0, temperature=1.0) if top_k and top_k > 0 else dict(do_sample=False)
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices), torch.no_grad():
        torch.manual_seed(seed)
        for length in sorted(groups):
            idx = groups[length]
            new_tokens = max_length - length
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                if new_tokens <= 0:
                    for i in chunk:
                        outputs[i] = encoded[i]
                    continue
                ids = torch.tensor([encoded[i] for i in chunk], dtype=torch.long, device=device)
                out = model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                    pad_token_id=T.pad_id_of(tok), **sampling,
                )
                for r, i in enumerate(chunk):
                    outputs[i] = out[r].tolist()
    texts = []
    for ids in outputs:
        text = tok.decode(ids, skip_special_tokens=True)
        texts.append(unicodedata.normalize("NFKD", text).replace("\n\n", " "))
    return texts


# --------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------
def hmean(values: Sequence[float]) -> float:
    values = [float(v) for v in values]
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def _stat(values: Sequence[float], scale: float = 100.0) -> dict:
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": None, "n": 0}
    arr = np.asarray(values, dtype=np.float64) * scale
    mean = float(arr.mean())
    if n < 2:
        return {"mean": mean, "ci95": None, "n": 1}
    half = 1.96 * float(arr.std(ddof=1)) / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": n}


def _hmean_stat(per_case: Sequence[dict], parts: Sequence[str], stats: dict, scale: float = 100.0) -> dict:
    means = [stats[p]["mean"] for p in parts]
    n = min(stats[p]["n"] for p in parts)
    if any(m is None for m in means):
        return {"mean": None, "ci95": None, "n": 0}
    mean = hmean(means)
    table = np.array([[np.nan if c.get(p) is None else float(c[p]) for p in parts] for c in per_case], dtype=np.float64)
    ci = None
    if len(per_case) >= 2:
        rng = np.random.default_rng(0)
        draws = []
        chunk = max(1, min(BOOTSTRAP_SAMPLES, 4_000_000 // max(1, table.size)))
        done = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            while done < BOOTSTRAP_SAMPLES:
                k = min(chunk, BOOTSTRAP_SAMPLES - done)
                idx = rng.integers(0, len(per_case), size=(k, len(per_case)))
                part_means = np.nanmean(table[idx], axis=1) * scale  # (k, parts)
                for row in part_means:
                    if not np.isnan(row).any():
                        draws.append(hmean(row))
                done += k
        if draws:
            lo, hi = np.percentile(draws, [2.5, 97.5])
            ci = [float(lo), float(hi)]
    return {"mean": mean, "ci95": ci, "n": n}


def aggregate(per_case: Sequence[dict], names: Sequence[str], composite: Optional[tuple[str, Sequence[str]]] = None) -> dict:
    """Mean (×100), 95% interval and count of each metric over the cases that have it."""
    stats = {name: _stat([c[name] for c in per_case if c.get(name) is not None]) for name in names}
    if composite is None:
        return stats
    comp_name, parts = composite
    out = {}
    for name in names:  # the composite right after its parts, for readable tables
        out[name] = stats[name]
        if name == parts[-1]:
            out[comp_name] = _hmean_stat(per_case, parts, stats)
    out.setdefault(comp_name, _hmean_stat(per_case, parts, stats))
    return out


# --------------------------------------------------------------------------------------------
# CounterFact
# --------------------------------------------------------------------------------------------
def _cf_prompts(rec: dict) -> dict[str, list[str]]:
    rr = rec["requested_rewrite"]
    return {
        "rewrite": [T.fill(rr["prompt"], rr["subject"])[0]],
        "paraphrase": list(rec.get("paraphrase_prompts") or []),
        "neighborhood": list(rec.get("neighborhood_prompts") or []),
    }


def _mean_or_none(values: list[float]) -> Optional[float]:
    return float(np.mean(values)) if values else None


def _eval_counterfact(model, tok, cases, batch_size, generation, reference_texts, gen_opts, notes) -> list[dict]:
    prepared = []
    pairs = []
    for case_id, rec in cases:
        rr = rec["requested_rewrite"]
        new, true = _object_str(rr["target_new"]), _object_str(rr["target_true"])
        prompts = _cf_prompts(rec)
        prepared.append((case_id, rec, new, true, prompts))
        for group in prompts.values():
            for p in group:
                pairs.extend([(p, new), (p, true)])
    scores = dict(zip(pairs, score_continuations(model, tok, pairs, batch_size)))

    per_case = []
    for case_id, rec, new, true, prompts in prepared:
        rr = rec["requested_rewrite"]
        case = {
            "case_id": case_id,
            "relation_id": rr.get("relation_id", "unknown"),
            "subject": rr["subject"],
            "target_new": new,
            "target_true": true,
        }
        details = {}
        for group, plist in prompts.items():
            rows = []
            for p in plist:
                s_new, s_true = scores[(p, new)], scores[(p, true)]
                rows.append({
                    "prompt": p, "nll_new": s_new.nll, "nll_true": s_true.nll,
                    "prob_new": s_new.prob, "prob_true": s_true.prob,
                    "new_correct": s_new.all_correct, "true_correct": s_true.all_correct,
                })
            details[group] = rows
        for succ, mag, group, want_new in (("ES", "EM", "rewrite", True), ("PS", "PM", "paraphrase", True),
                                           ("NS", "NM", "neighborhood", False)):
            rows = details[group]
            if want_new:
                case[succ] = _mean_or_none([float(r["nll_true"] > r["nll_new"]) for r in rows])
                case[mag] = _mean_or_none([r["prob_new"] - r["prob_true"] for r in rows])
            else:
                case[succ] = _mean_or_none([float(r["nll_true"] < r["nll_new"]) for r in rows])
                case[mag] = _mean_or_none([r["prob_true"] - r["prob_new"] for r in rows])
        case.update({f"{g}_prompts": rows for g, rows in details.items()})
        per_case.append(case)

    if generation:
        _add_generation(model, tok, prepared, per_case, batch_size, reference_texts, gen_opts, notes)
    return per_case


def _add_generation(model, tok, prepared, per_case, batch_size, reference_texts, gen_opts, notes) -> None:
    refs: dict[str, list[str]] = defaultdict(list)
    for obj, texts in (reference_texts or {}).items():
        refs[obj].extend(texts)
    for _, rec, *_ in prepared:
        for obj, texts in (rec.get("reference_texts") or {}).items():
            refs[obj].extend(t for t in texts if t not in refs[obj])
    tfidf = Tfidf(dict.fromkeys(t for texts in refs.values() for t in texts)) if refs else None

    flat, owners = [], []
    for k, (_, rec, *_rest) in enumerate(prepared):
        for p in rec.get("generation_prompts") or []:
            flat.append(p)
            owners.append(k)
    texts = generate_texts(model, tok, flat, batch_size=batch_size, **gen_opts) if flat else []
    by_case: dict[int, list[str]] = defaultdict(list)
    for k, text in zip(owners, texts):
        by_case[k].append(text)

    no_prompts, no_refs = 0, 0
    for k, ((_, rec, new, _true, _p), case) in enumerate(zip(prepared, per_case)):
        gen = by_case.get(k, [])
        case["generated_texts"] = gen
        case["GE"] = n_gram_entropy(gen)
        if not gen:
            no_prompts += 1
            case["RS"] = None
            continue
        if tfidf is None or not refs.get(new):
            no_refs += 1
            case["RS"] = None
        else:
            case["RS"] = tfidf.similarity(" ".join(gen), " ".join(refs[new]))
    if no_prompts:
        notes.append(f"{no_prompts} case(s) have no generation_prompts: GE and RS are missing for them")
    if no_refs:
        notes.append(
            f"RS missing for {no_refs} case(s): no reference texts about their target_new "
            "(pass reference_texts={object: [texts]} or put 'reference_texts' in the records)"
        )


# --------------------------------------------------------------------------------------------
# zsRE
# --------------------------------------------------------------------------------------------
def _loc_prompt(loc: str) -> str:
    return loc if loc.endswith("?") else loc + "?"


def _eval_zsre(model, tok, cases, batch_size, zsre_target) -> list[dict]:
    prepared, pairs = [], []
    for case_id, rec in cases:
        target = rec["answers"][0] if zsre_target == "answers" else rec["alt"]
        groups = {"efficacy": [(rec["src"], target)]}
        groups["paraphrase"] = [(rec["rephrase"], target)] if rec.get("rephrase") else []
        groups["specificity"] = [(_loc_prompt(rec["loc"]), rec["loc_ans"])] if rec.get("loc") else []
        prepared.append((case_id, rec, target, groups))
        for group in groups.values():
            pairs.extend(group)
    scores = dict(zip(pairs, score_continuations(model, tok, pairs, batch_size)))
    per_case = []
    for case_id, rec, target, groups in prepared:
        case = {"case_id": case_id, "subject": rec.get("subject"), "target": target}
        for name, group in groups.items():
            correct = [c for pair in group for c in scores[pair].correct]
            case[name] = float(np.mean(correct)) if correct else None
            case[f"{name}_tokens_correct"] = correct
            case[f"{name}_prompts"] = [{"prompt": p, "target": t, "nll": scores[(p, t)].nll} for p, t in group]
        per_case.append(case)
    return per_case


# --------------------------------------------------------------------------------------------
# API
# --------------------------------------------------------------------------------------------
def evaluate(model, tok, records: list, kind: str = "auto", batch_size: int = 64, generation: bool = False,
             case_ids: Optional[Iterable[int]] = None, reference_texts: Optional[dict] = None, *,
             zsre_target: str = "answers", generation_max_length: int = 100, generation_top_k: int = 5,
             seed: int = 0, source: str = "records") -> dict:
    """Evaluate `model` on CounterFact or zsRE records (see the module docstring for conventions).

    Returns {"kind", "n_cases", "metrics": {name: {"mean", "ci95", "n"}}, "by_relation",
    "per_case", "notes"}; aggregate means are in percent (×100), per-case values in 0–1.
    """
    if zsre_target not in ("answers", "alt"):
        raise ValueError(f"zsre_target must be 'answers' or 'alt', got {zsre_target!r}")
    kind = validate_records(records, kind, source, zsre_target)
    if kind == "zsre" and generation:
        raise ValueError("generation metrics (GE, RS) are defined for CounterFact only, not zsRE")
    if reference_texts is not None:
        if not isinstance(reference_texts, dict) or not all(
            isinstance(v, list) and all(isinstance(t, str) for t in v) for v in reference_texts.values()
        ):
            raise ValueError("reference_texts must be a dict {object: [texts]}")
    cases = [(case_id_of(rec, i), rec) for i, rec in enumerate(records)]
    if case_ids is not None:
        wanted = list(dict.fromkeys(case_ids))
        present = {cid for cid, _ in cases}
        missing = [c for c in wanted if c not in present]
        if missing:
            raise ValueError(f"{source}: case ids not found: {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
        keep = set(wanted)
        cases = [(cid, rec) for cid, rec in cases if cid in keep]

    notes: list[str] = []
    # Evaluating before an edit (edit --eval, demo) must leave a 4-bit model editable.
    with cpu_repacking_off(model):
        if kind == "counterfact":
            gen_opts = dict(max_length=generation_max_length, top_k=generation_top_k, seed=seed)
            per_case = _eval_counterfact(model, tok, cases, batch_size, generation, reference_texts, gen_opts, notes)
            names = CF_METRICS + (GEN_METRICS if generation else ())
            composite = ("S", ("ES", "PS", "NS"))
        else:
            per_case = _eval_zsre(model, tok, cases, batch_size, zsre_target)
            names, composite = ZSRE_METRICS, ("score", ZSRE_METRICS)

    by_relation = {}
    if kind == "counterfact":
        groups: dict[str, list[dict]] = defaultdict(list)
        for case in per_case:
            groups[case["relation_id"]].append(case)
        by_relation = {
            rel: {"n_cases": len(cs), "metrics": aggregate(cs, names, composite)} for rel, cs in sorted(groups.items())
        }
    for name in names:
        missing = sum(1 for c in per_case if c.get(name) is None)
        if missing and name not in ("RS", "GE"):
            notes.append(f"{name} missing for {missing} of {len(per_case)} case(s) (no prompts); the aggregate skips them")
    return {
        "kind": kind,
        "n_cases": len(per_case),
        "metrics": aggregate(per_case, names, composite),
        "by_relation": by_relation,
        "per_case": per_case,
        "notes": notes,
    }


def summary(result: dict) -> dict:
    """Flat {metric: mean (percent)} from an `evaluate` result."""
    return {name: stat["mean"] for name, stat in result["metrics"].items()}
