"""Covariance statistics C^l = E[k kᵀ] over a text corpus (DESIGN §2.4).

One forward pass per batch of documents, stopped after the deepest edited layer, feeds the keys
of every edited layer into its own accumulator (on that layer's device). Results are cached in
the reference implementation's file layout, so statistics computed by it are reused as they are:

    <stats_dir>/<model_name>/<dataset>_stats/<module>_<dtype>_mom2_<n>.npz
    with mom2.mom2 = Σ k kᵀ, mom2.count = number of tokens, sample_size, mom2.constructor.

The path names a model only by a name (two different models saved in directories both named
`model` get the same one), so every file massedit writes also carries the model's identity, an
extra array "massedit.identity" that the reference ignores: the config hash and a digest of the
weights that determine the layer's keys (embeddings and blocks 0..l, less the rewrite weights
that edits change). A file whose identity is
another model's is refused. A file without one (the reference's, or an older massedit's) is
used only when the caller names the model explicitly (`--model-name`, MassEditor(model_name=...)).
`sample_size` records the number of documents actually used, which is fewer than the number in
the file name when the corpus is shorter (a warning says so).

Statistics always come from the unedited model: callers compute them before any weight changes.
The raw sum is accumulated in float32 or float64; float16 files (which overflow past 65504) are
read but never written, and non-finite statistics are refused when written and when read.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from massedit.model import parallel
from massedit.model.arch import ModelLayout
from massedit.inputs.corpus import corpus_texts
from massedit.inputs.names import check_name
from massedit.edits.delta import config_hash
from massedit.files import written
from massedit.model.devices import execution_device, input_device, read_parameter
from massedit.model.hooks import capture_inputs, run_until
from massedit.model.loading import model_name_for
from massedit.inputs.tokens import pad, pad_id_of
from massedit.kernels.covariance import accumulate_xtx, symmetrize

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}

IDENTITY_KEY = "massedit.identity"
_SAMPLED = 1 << 20  # entries of each weight tensor that enter its model's identity
# The raw sum Σkkᵀ outgrows float16 (max 65504) after a few hundred tokens.
UNSTORABLE = {"float16": "float16 cannot hold the raw sum Σkkᵀ (it overflows past 65504 after a few hundred tokens)"}


class StatsError(ValueError):
    pass


def model_name_of(model) -> str:
    """The statistics name of a loaded model, derived from config._name_or_path like the CLI's."""
    name = str(getattr(model.config, "_name_or_path", "") or "")
    return model_name_for(name) if name.strip("/.") else type(model).__name__


def check_model_name(name: str) -> str:
    """A model name is one directory inside the statistics directory, never a path out of it."""
    return check_name(name, "model name", "pass --model-name NAME (MassEditor(model_name=...)) with a name like "
                      "'gpt2-xl'", StatsError)


def check_dataset_name(name: str) -> str:
    """A dataset name is one directory (NAME_stats) inside the model's, never a path out of it."""
    return check_name(name, "statistics dataset name", 'give a plain name like "wikipedia" (stats --dataset, '
                      'hparams key "mom2_dataset")', StatsError)


def check_storable(dtype: str) -> None:
    """Refuse a statistics dtype that cannot be written, before any work."""
    if dtype not in DTYPES:
        raise StatsError(f"mom2_dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype in UNSTORABLE:
        raise StatsError(f"statistics dtype {dtype}: {UNSTORABLE[dtype]}; compute them in float32 "
                         "(--stats-dtype float32, or mom2_dtype in the hparams); existing float16 files are still read")


def stats_folder(stats_dir, model_name: str, dataset: str) -> Path:
    """The directory a model's statistics over one dataset are written into."""
    return Path(stats_dir) / check_model_name(model_name) / f"{check_dataset_name(dataset)}_stats"


def stats_file(stats_dir, model_name: str, dataset: str, module_name: str, dtype: str, n_samples: Optional[int]) -> Path:
    suffix = "" if n_samples is None else f"_{n_samples}"
    return stats_folder(stats_dir, model_name, dataset) / f"{module_name}_{dtype}_mom2{suffix}.npz"


def _atomic_savez(path: Path, arrays: dict) -> None:
    with written(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def write_stats(path: Path, mom2: torch.Tensor, count: int, sample_size: int, identity: Optional[dict] = None) -> None:
    """Atomic write of a reference-layout file, with the model's identity when given; non-finite
    statistics are refused, nothing is written."""
    bad = int((~torch.isfinite(mom2)).sum())
    if bad:
        raise StatsError(
            f"statistics for {path} have {bad} non-finite entries in {mom2.dtype} (the sum overflowed, or the "
            "model's keys are not finite); nothing was written — compute them in float32 or float64"
        )
    arrays = {
        "constructor": np.array("util.runningstats.CombinedStat()"),
        "mom2.constructor": np.array("util.runningstats.SecondMoment()"),
        "mom2.count": np.array(count),
        "mom2.mom2": mom2.cpu().numpy(),
        "sample_size": np.array(sample_size),
    }
    if identity is not None:
        arrays[IDENTITY_KEY] = np.array(json.dumps(identity, sort_keys=True))
    _atomic_savez(path, arrays)


def _digest_value(model, name: str, p: torch.Tensor) -> torch.Tensor:
    """The parameter's stored values (an offloaded one read where Accelerate keeps it); a meta
    weight that nothing holds counts by its name, shape and dtype only."""
    try:
        return read_parameter(model, name)
    except ValueError:
        return p


class ModelIdentity:
    """What identifies a model's statistics for layer l: its config hash and a digest of the
    weights that produce the keys of l (embeddings and other weights before the blocks, blocks
    0..l; not the final norm or LM head). The rewrite weights are left out: they are what edits
    change, and an edited model keeps using its base model's statistics. Floats are hashed as
    float32 (float64 as is), so the same checkpoint loaded in float16 or float32 has one identity.
    Each tensor contributes an evenly strided sample of at most _SAMPLED entries, which keeps the
    digest of a 6B model to seconds: two different models differ almost everywhere, and models
    that differ in a few entries only have practically the same statistics. Per-block digests are
    computed once."""

    def __init__(self, model, layout: ModelLayout, name: str):
        self.model, self.layout, self.name = model, layout, name
        self.config_hash = config_hash(model)
        self._blocks: dict[int, str] = {}
        self._stem: Optional[str] = None

    def _params(self) -> dict[Optional[int], list[tuple[str, torch.Tensor]]]:
        prefixes = {f"{self.layout.block_name(i)}.": i for i in range(self.layout.n_layers)}
        head = {id(p) for m in (self.layout.ln_f, self.layout.lm_head, *self.layout.extra_head) for p in m.parameters()}
        embed = self.model.get_input_embeddings()
        head -= {id(p) for p in (embed.parameters() if embed is not None else ())}
        edited = {self.layout.rewrite_weight_name(i) for i in range(self.layout.n_layers)}
        groups: dict[Optional[int], list] = {}
        for name, p in self.model.named_parameters():
            block = next((i for prefix, i in prefixes.items() if name.startswith(prefix)), None)
            if (block is None and id(p) in head) or name in edited:
                continue
            groups.setdefault(block, []).append((name, p))
        return groups

    def _digest(self, params) -> str:
        h = hashlib.sha256()
        for name, p in params:
            value = _digest_value(self.model, name, p)
            h.update(f"{name}:{tuple(p.shape)}|".encode())
            if value.device.type == "meta":
                h.update(str(p.dtype).encode())
                continue
            flat = value.detach().reshape(-1)
            sample = flat[:: max(1, -(-flat.numel() // _SAMPLED))]
            # As float32: one checkpoint loaded in float16, bfloat16, float32 or float64 keeps one identity.
            if sample.is_floating_point():
                sample = sample.float()
            # A copy: numpy() marks the storage it shares as not resizable, which FSDP2's freeing of
            # the parameters it gathered needs (massedit.model.sharded).
            h.update(sample.to("cpu", copy=True).view(torch.uint8).numpy())
        return h.hexdigest()

    def of_layer(self, layer: int) -> dict:
        missing = [i for i in range(layer + 1) if i not in self._blocks]
        if missing or self._stem is None:
            groups = self._params()
            if self._stem is None:
                self._stem = self._digest(groups.get(None, []))
            for i in missing:
                self._blocks[i] = self._digest(groups.get(i, []))
        h = hashlib.sha256(f"{self.config_hash}|{self._stem}".encode())
        for i in range(layer + 1):
            h.update(self._blocks[i].encode())
        source = str(getattr(self.model.config, "_name_or_path", "") or "")
        return {"model": self.name, "source": source, "config_hash": self.config_hash, "layer": layer,
                "weights_sha256": h.hexdigest()}


def read_identity(path: Path) -> Optional[dict]:
    """The identity stored with a statistics file, or None for a file without one."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if IDENTITY_KEY not in data.files:
                return None
            return json.loads(str(data[IDENTITY_KEY]))
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise StatsError(f"statistics file {path} cannot be read ({err}); delete it to recompute") from None


def check_identity(path: Path, expected: dict, explicit_name: bool) -> None:
    """Refuse a statistics file that belongs to another model, or an unmarked one (reference
    layout) unless the model name was given explicitly."""
    stored = read_identity(path)
    if stored is None:
        if not explicit_name:
            raise StatsError(
                f"statistics file {path} carries no model fingerprint (written by the reference code or an older "
                f"massedit), so nothing shows it belongs to this model; if it does, name the model explicitly "
                f"(--model-name {path.parent.parent.name}, or MassEditor(model_name=...)), else delete it to recompute"
            )
        return
    keys = ("config_hash", "weights_sha256")
    if not isinstance(stored, dict) or any(stored.get(k) != expected[k] for k in keys):
        stored = stored if isinstance(stored, dict) else {}
        owner = stored.get("source") or stored.get("model", "?")
        this = expected["source"] or expected["model"]
        # Same checkpoint, other weights: loaded quantized (its keys differ) or changed since.
        why = (" (the same checkpoint, whose weights differ as loaded now: quantized with --quantize, or changed "
               "since the statistics were computed)" if stored.get("source") and stored.get("source") == expected["source"] else "")
        raise StatsError(
            f"statistics file {path} belongs to another model ({owner}, weights "
            f"{str(stored.get('weights_sha256', '?'))[:12]}), not to this one ({this}, weights "
            f"{expected['weights_sha256'][:12]}){why}; pass another --model-name (or --stats-dir) for this model's "
            "statistics, or delete the file to recompute it"
        )


def read_stats(path: Path, dim: int) -> tuple[torch.Tensor, int]:
    """(Σ k kᵀ, token count) from a reference-layout npz, checked against the key width."""
    try:
        with np.load(path, allow_pickle=False) as data:
            mom2, count = data["mom2.mom2"], int(data["mom2.count"])
    except KeyError as err:
        raise StatsError(f"statistics file {path} lacks {err}; it is not a MEMIT mom2 file — delete it or "
                         "point --stats-dir elsewhere") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise StatsError(f"statistics file {path} cannot be read ({err}); delete it to recompute") from None
    if mom2.shape != (dim, dim):
        raise StatsError(
            f"statistics file {path} has shape {tuple(mom2.shape)} but this layer's key is {dim} wide, so it was "
            f"computed for another model or layer; delete it, or pass another --stats-dir / --model-name"
        )
    if count <= 0:
        raise StatsError(f"statistics file {path} counts {count} tokens; delete it to recompute")
    bad = int((~np.isfinite(mom2)).sum())
    if bad:
        raise StatsError(
            f"statistics file {path} holds {bad} non-finite entries (its {mom2.dtype} sum overflowed — float16 "
            "statistics do past 65504); delete it and recompute in float32"
        )
    return torch.from_numpy(mom2), count


def context_length(model, tok) -> int:
    cfg = model.config
    n = next((getattr(cfg, k) for k in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length")
              if getattr(cfg, k, None)), None) or 2048
    tok_max = getattr(tok, "model_max_length", None)
    if tok_max and tok_max < 1_000_000:
        n = min(n, tok_max)
    return int(n)


def _batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Documents grouped by similar length, at most batch_tokens padded tokens per batch."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > batch_tokens:
            batches.append(cur)
            cur = []
        cur.append(i)
    return batches + [cur] if cur else batches


def _fingerprint(encoded: Sequence[Sequence[int]], layers, dtype, batch_tokens, model_digest: str) -> str:
    h = hashlib.sha256(repr((list(layers), str(dtype), batch_tokens, len(encoded), model_digest)).encode())
    for ids in encoded:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def _contents_digest(count: int, done: int, sums: dict) -> str:
    """SHA-256 of a checkpoint's position and partial sums: what it must still hold when resumed."""
    h = hashlib.sha256(f"{count}|{done}".encode())
    for l in sorted(sums):
        h.update(f"|layer{l}|{sums[l].dtype}|{sums[l].shape}|".encode())
        h.update(np.ascontiguousarray(sums[l]).tobytes())
    return h.hexdigest()


def _save_checkpoint(path: Path, acc: dict, count: int, done: int, fingerprint: str) -> None:
    sums = {l: a.cpu().numpy() for l, a in acc.items()}
    _atomic_savez(path, {"count": np.array(count), "done": np.array(done), "fingerprint": np.array(fingerprint),
                         "contents_sha256": np.array(_contents_digest(count, done, sums)),
                         **{f"layer{l}": v for l, v in sums.items()}})


def _load_checkpoint(path: Optional[Path], acc: dict, fingerprint: str) -> tuple[int, int]:
    """(count, batches done) from a matching checkpoint, else (0, 0). A checkpoint that cannot be
    read (truncated, not an npz, wrong arrays) or whose contents fail the digest written with them is
    discarded with a warning and the pass starts over: it only saves time."""
    if path is None or not path.exists():
        return 0, 0
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["fingerprint"]) != fingerprint:
                warnings.warn(f"ignoring statistics checkpoint {path}: it was made for another model, corpus or settings")
                return 0, 0
            sums = {l: data[f"layer{l}"] for l in acc}
            count, done = int(data["count"]), int(data["done"])
            if str(data["contents_sha256"]) != _contents_digest(count, done, sums):
                raise ValueError("its sums do not match the digest written with them (changed after it was written)")
            for l, a in acc.items():
                a.copy_(torch.from_numpy(sums[l]))
    except (OSError, ValueError, KeyError, EOFError, RuntimeError, zipfile.BadZipFile) as err:
        warnings.warn(f"discarding unreadable statistics checkpoint {path} ({type(err).__name__}: {err}); starting over")
        path.unlink()
        for a in acc.values():
            a.zero_()
        return 0, 0
    return count, done


@torch.no_grad()
def second_moments(
    model,
    layout: ModelLayout,
    tok,
    texts: Sequence[str],
    layers: Sequence[int],
    dtype: torch.dtype = torch.float32,
    batch_tokens: int = 8192,
    progress: bool = True,
    checkpoint: Optional[Path] = None,
    checkpoint_every: int = 200,
    model_digest: str = "",
) -> dict[int, tuple[torch.Tensor, int]]:
    """Σ k kᵀ and the token count for each layer, from one pass over `texts` stopped after max(layers).

    With `checkpoint`, partial sums and the position are saved every `checkpoint_every` batches
    and a rerun resumes from them; the batches are summed in the same order either way, so a
    resumed run gives exactly the uninterrupted result. The checkpoint is removed at the end.
    `model_digest` (the model's identity) keeps another model's checkpoint from being resumed.

    Under torch.distributed each rank runs every world-size-th batch and the sums and counts are
    all-reduced, so every rank returns the totals. Each rank checkpoints its own share to
    `<checkpoint>.rank<r>of<n>.npz` and resumes from it when relaunched with the same world size.
    """
    max_len = context_length(model, tok)
    encoded = [tok(t, truncation=True, max_length=max_len, add_special_tokens=True)["input_ids"] for t in texts]
    encoded = [ids for ids in encoded if ids]
    modules = {str(l): layout.rewrite_module(l) for l in layers}
    acc = {l: torch.zeros(layout.key_dim(l), layout.key_dim(l), dtype=dtype,
                          device=execution_device(layout.rewrite_module(l))) for l in layers}
    world = parallel.world()
    mine = world.shard(_batches([len(ids) for ids in encoded], batch_tokens))
    if checkpoint is not None and world.size > 1:
        checkpoint = checkpoint.with_name(f"{checkpoint.stem}.rank{world.rank}of{world.size}{checkpoint.suffix}")
    fingerprint = _fingerprint(encoded, layers, dtype, batch_tokens, model_digest) if checkpoint else ""
    count, done = _load_checkpoint(checkpoint, acc, fingerprint)
    device = input_device(model)
    stop = layout.block(max(layers))
    bar = tqdm(mine, desc="statistics", disable=not (progress and world.main), unit="batch", initial=done)
    for b, rows in enumerate(bar):
        if b < done:
            continue
        # Built on the host while the device still works on the previous batch: nothing below
        # reads a device value back, so the host never waits for it.
        batch = pad([encoded[i] for i in rows], pad_id_of(tok), "right", device)
        store: dict = {}
        with capture_inputs(modules, store):
            run_until(model, stop, **batch.model_inputs())
        for l in layers:
            keys = store[str(l)]
            mask = batch.attention_mask.to(keys.device).reshape(-1).bool()
            accumulate_xtx(acc[l], keys.reshape(-1, keys.shape[-1]), mask, count=False)
        count += sum(len(encoded[i]) for i in rows)
        if checkpoint is not None and (b + 1) % checkpoint_every == 0 and b + 1 < len(mine):
            _save_checkpoint(checkpoint, acc, count, b + 1, fingerprint)
    for a in acc.values():
        parallel.all_reduce_sum(a)
    count = int(parallel.all_reduce_sum(torch.tensor([count], dtype=torch.long)))
    if checkpoint is not None and checkpoint.exists():
        checkpoint.unlink()
    return {l: (symmetrize(acc[l]), count) for l in layers}


@dataclass
class CovariancePass:
    """What `covariances` did: which layers it computed (the others were cached) from how many
    documents and tokens, in how many seconds."""

    computed: list[int]
    documents: int = 0
    tokens: int = 0
    seconds: float = 0.0


def covariances(
    model,
    layout: ModelLayout,
    tok,
    layers: Sequence[int],
    stats_dir,
    model_name: str,
    dataset: str,
    dtype_name: str,
    n_samples: int,
    corpus=None,
    progress: bool = True,
    explicit_name: bool = False,
    force: bool = False,
) -> tuple[dict[int, tuple[torch.Tensor, int]], CovariancePass]:
    """(Σ k kᵀ on the CPU in the statistics' dtype, token count) per layer, so C^l = sum / count: cached
    files, else computed in one pass over `corpus` (a file, a list of texts, or a built-in corpus name,
    massedit.inputs.corpus.BUILTIN) and written to the cache; with `force`, computed even when cached.
    The sums, not C, are handed over so that the solver builds each layer's factor in its own precision
    on its own device, one layer at a time.

    Cached files must carry this model's identity; unmarked ones (reference layout) are used only
    with `explicit_name` (the caller named the model)."""
    if dtype_name not in DTYPES:
        raise StatsError(f"mom2_dtype {dtype_name!r} is not one of {', '.join(DTYPES)}")
    t0 = time.perf_counter()
    paths = {l: stats_file(stats_dir, model_name, dataset, layout.rewrite_name(l), dtype_name, n_samples) for l in layers}
    identity = ModelIdentity(model, layout, model_name)
    # Rank 0's view of the cache decides, so that all ranks join the same computation.
    missing = parallel.from_main(lambda: [l for l in layers if force or not paths[l].exists()])
    sums = {l: read_stats(p, layout.key_dim(l)) for l, p in paths.items() if l not in missing}
    for l in sums:
        check_identity(paths[l], identity.of_layer(l), explicit_name)
    done = CovariancePass(computed=missing)
    if missing:
        if corpus is None:
            raise StatsError(
                f"no covariance statistics for layer(s) {missing} at {paths[missing[0]]}; pass a corpus "
                "(--corpus FILE) to compute them, or --stats-dir / --model-name pointing at existing statistics"
            )
        check_storable(dtype_name)
        texts = corpus_texts(corpus, n_samples, model, tok, cache_dir=paths[missing[0]].parent)
        if len(texts) < n_samples:
            warnings.warn(f"the corpus has {len(texts)} documents, fewer than the {n_samples} samples asked "
                          f"(--samples / mom2_n_samples): the statistics use all {len(texts)} and are filed under "
                          f"{n_samples} (their sample_size records the true number)")
        acc_dtype = torch.float64 if dtype_name == "float64" else torch.float32
        checkpoint = paths[missing[0]].with_name(f"pass_{'-'.join(map(str, missing))}_{dtype_name}.partial.npz")
        computed = second_moments(model, layout, tok, texts, missing, acc_dtype, progress=progress,
                                  checkpoint=checkpoint, model_digest=identity.of_layer(max(missing))["weights_sha256"])
        for l, (mom2, count) in computed.items():
            if parallel.world().main:
                write_stats(paths[l], mom2.to(DTYPES[dtype_name]), count, len(texts), identity.of_layer(l))
            sums[l] = (mom2, count)
            done.tokens = count
        done.documents = len(texts)
        parallel.barrier()
    done.seconds = time.perf_counter() - t0
    return {l: (sums[l][0].cpu(), sums[l][1]) for l in layers}, done


def layer_covariances(model, layout: ModelLayout, tok, hp, stats_dir, model_name: str, corpus=None,
                      progress: bool = True, explicit_name: bool = False) -> dict[int, tuple[torch.Tensor, int]]:
    """`covariances` of the hparams' edited layers, dataset, dtype and sample count."""
    sums, _ = covariances(model, layout, tok, hp.layers, stats_dir, model_name, hp.mom2_dataset, hp.mom2_dtype,
                          hp.mom2_n_samples, corpus, progress, explicit_name)
    return sums
