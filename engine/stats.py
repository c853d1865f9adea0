"""Covariance statistics C^l = E[k kᵀ] over a text corpus (DESIGN §2.4).

One forward pass per batch of documents, stopped after the deepest edited layer, feeds the keys
of every edited layer into its own accumulator (on that layer's device). Results are cached in
the reference implementation's file layout, so statistics computed by it are reused as they are:

    <stats_dir>/<model_name>/<dataset>_stats/<module>_<dtype>_mom2_<n>.npz
    with mom2.mom2 = Σ k kᵀ, mom2.count = number of tokens, sample_size, mom2.constructor.

Statistics always come from the unedited model: callers compute them before any weight changes.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from massedit import parallel
from massedit.arch import ModelLayout
from massedit.corpus import read_corpus
from massedit.hooks import capture_inputs, run_until
from massedit.tokens import pad, pad_id_of
from massedit.kernels.covariance import accumulate_xtx, symmetrize

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


class StatsError(ValueError):
    pass


def model_name_of(model) -> str:
    """The reference's model name: config._name_or_path with '/' replaced by '_'."""
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    return str(name).rstrip("/").replace("/", "_")


def stats_file(stats_dir, model_name: str, dataset: str, module_name: str, dtype: str, n_samples: Optional[int]) -> Path:
    suffix = "" if n_samples is None else f"_{n_samples}"
    return Path(stats_dir) / model_name / f"{dataset}_stats" / f"{module_name}_{dtype}_mom2{suffix}.npz"


def write_stats(path: Path, mom2: torch.Tensor, count: int, sample_size: int) -> None:
    """Atomic write: a temp file in the same directory, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                **{
                    "constructor": np.array("util.runningstats.CombinedStat()"),
                    "mom2.constructor": np.array("util.runningstats.SecondMoment()"),
                    "mom2.count": np.array(count),
                    "mom2.mom2": mom2.cpu().numpy(),
                    "sample_size": np.array(sample_size),
                },
            )
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


def _fingerprint(encoded: Sequence[Sequence[int]], layers, dtype, batch_tokens) -> str:
    h = hashlib.sha256(repr((list(layers), str(dtype), batch_tokens, len(encoded))).encode())
    for ids in encoded:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def _save_checkpoint(path: Path, acc: dict, count: int, done: int, fingerprint: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, count=np.array(count), done=np.array(done), fingerprint=np.array(fingerprint),
                     **{f"layer{l}": a.cpu().numpy() for l, a in acc.items()})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_checkpoint(path: Optional[Path], acc: dict, fingerprint: str) -> tuple[int, int]:
    """(count, batches done) from a matching checkpoint, else (0, 0)."""
    if path is None or not path.exists():
        return 0, 0
    with np.load(path, allow_pickle=False) as data:
        if str(data["fingerprint"]) != fingerprint:
            warnings.warn(f"ignoring statistics checkpoint {path}: it was made for another corpus or settings")
            return 0, 0
        for l, a in acc.items():
            a.copy_(torch.from_numpy(data[f"layer{l}"]))
        return int(data["count"]), int(data["done"])


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
) -> dict[int, tuple[torch.Tensor, int]]:
    """Σ k kᵀ and the token count for each layer, from one pass over `texts` stopped after max(layers).

    With `checkpoint`, partial sums and the position are saved every `checkpoint_every` batches
    and a rerun resumes from them; the batches are summed in the same order either way, so a
    resumed run gives exactly the uninterrupted result. The checkpoint is removed at the end.

    Under torch.distributed each rank runs every world-size-th batch and the sums and counts are
    all-reduced, so every rank returns the totals. Each rank checkpoints its own share to
    `<checkpoint>.rank<r>of<n>.npz` and resumes from it when relaunched with the same world size.
    """
    max_len = context_length(model, tok)
    encoded = [tok(t, truncation=True, max_length=max_len, add_special_tokens=True)["input_ids"] for t in texts]
    encoded = [ids for ids in encoded if ids]
    modules = {str(l): layout.rewrite_module(l) for l in layers}
    acc = {l: torch.zeros(layout.key_dim(l), layout.key_dim(l), dtype=dtype, device=layout.device_of(l)) for l in layers}
    world = parallel.world()
    mine = world.shard(_batches([len(ids) for ids in encoded], batch_tokens))
    if checkpoint is not None and world.size > 1:
        checkpoint = checkpoint.with_name(f"{checkpoint.stem}.rank{world.rank}of{world.size}{checkpoint.suffix}")
    fingerprint = _fingerprint(encoded, layers, dtype, batch_tokens) if checkpoint else ""
    count, done = _load_checkpoint(checkpoint, acc, fingerprint)
    device = next(model.parameters()).device
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


def layer_covariances(
    model,
    layout: ModelLayout,
    tok,
    hp,
    stats_dir,
    model_name: str,
    corpus=None,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """C^l (float64, on each layer's device) for every edited layer: cached files, else computed from `corpus`."""
    dtype_name = hp.mom2_dtype
    if dtype_name not in DTYPES:
        raise StatsError(f"mom2_dtype {dtype_name!r} is not one of {', '.join(DTYPES)}")
    paths = {
        l: stats_file(stats_dir, model_name, hp.mom2_dataset, layout.rewrite_name(l), dtype_name, hp.mom2_n_samples)
        for l in hp.layers
    }
    # Rank 0's view of the cache decides, so that all ranks join the same computation.
    missing = parallel.from_main(lambda: [l for l in hp.layers if not paths[l].exists()])
    sums = {l: read_stats(p, layout.key_dim(l)) for l, p in paths.items() if l not in missing}
    if missing:
        if corpus is None:
            raise StatsError(
                f"no covariance statistics for layer(s) {missing} at {paths[missing[0]]}; pass a corpus "
                "(--corpus FILE) to compute them, or --stats-dir / --model-name pointing at existing statistics"
            )
        texts = list(corpus)[: hp.mom2_n_samples] if isinstance(corpus, (list, tuple)) else read_corpus(corpus, hp.mom2_n_samples)
        if len(texts) < hp.mom2_n_samples:
            warnings.warn(f"corpus has {len(texts)} documents, fewer than mom2_n_samples={hp.mom2_n_samples}; using all")
        acc_dtype = torch.float64 if dtype_name == "float64" else torch.float32
        checkpoint = paths[missing[0]].with_name(f"pass_{'-'.join(map(str, missing))}_{dtype_name}.partial.npz")
        computed = second_moments(model, layout, tok, texts, missing, acc_dtype, progress=progress,
                                  checkpoint=checkpoint)
        for l, (mom2, count) in computed.items():
            if parallel.world().main:
                write_stats(paths[l], mom2.to(DTYPES[dtype_name]), count, len(texts))
            sums[l] = (mom2, count)
        parallel.barrier()
    return {l: (sums[l][0].to(layout.device_of(l), torch.float64) / sums[l][1]) for l in hp.layers}
