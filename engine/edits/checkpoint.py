"""Apply or revert an EditDelta on a checkpoint on disk, without loading the model.

Two formats: Hugging Face safetensors (one `model.safetensors`, or shards named in
`model.safetensors.index.json`) and torch.distributed.checkpoint (DCP) directories (`.metadata`
plus `*.distcp` files). Each edited weight is computed by the delta itself (`EditDelta.edited_value`,
`EditDelta.restored_value`: the code apply and revert run on a loaded model), one of the delta's
row blocks at a time (`EditDelta.row_blocks`, the blocks apply computes Δ in), so the result equals
"load, apply, save" bit for bit.

Safetensors are streamed: W + Δ leaves a tensor's dtype and shape, hence the file's header and
every byte offset, unchanged, so each shard holding an edited weight is written as its own header
and data copied verbatim with the edited tensors' bytes put in their place, read, computed and
written one row block at a time with plain reads (a memory map would count the file's pages
towards the process). No weight is ever held whole: the memory taken is one float64 block of Δ
(≤ 64 MiB), one block of the weight's rows and its result (a half or a quarter of that each),
whatever the weight's size (1.3-1.55x a 128 MiB float32 weight to apply, 1.0-1.2x to revert,
measured in tests/test_delta_checkpoint.py). Shards without an edited weight and every other file (config,
tokenizer, index) are copied unchanged. DCP directories are loaded whole with `dcp.load` (single
process, no process group; its API reads and writes whole state dicts) and saved with `dcp.save`,
the edited weights changed in place; their tensor names may carry a wrapper's prefix ("model.",
"module."), matched by suffix when only one tensor fits.

Whether the checkpoint holds the delta is read from its weights: the digests the delta records
say whether each weight is the base, the edited one, or neither (another model, or trained since),
and the config hash, when both sides have one, must agree. `prepare` makes every check (it reads
each edited weight, and computes its result once, streamed as above) before anything is written,
so a refusal leaves nothing behind; `write` reads and computes again rather than hold results.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from massedit.edits.delta import EditDelta, config_hash_of, tensor_digest

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
DCP_METADATA = ".metadata"

_COPY_BYTES = 1 << 20  # the one buffer verbatim byte copies go through
# safetensors' names of the float dtypes (any other dtype is refused: a delta changes float weights).
_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_DCP_FILE = re.compile(r"^(\.metadata|.+\.distcp)$")
_SAFETENSORS_FILE = re.compile(r"^model(-\d+-of-\d+)?\.safetensors(\.index\.json)?$")


class CheckpointError(ValueError):
    """A checkpoint this delta cannot be applied to or reverted from, or one that cannot be read."""


@dataclass(frozen=True)
class CheckpointEdit:
    """A checked apply or revert of `delta` on the checkpoint at `path`; `write` produces it."""

    path: Path
    delta: EditDelta
    revert: bool
    format: str  # "safetensors" or "dcp"
    tensor_names: dict[str, str]  # delta weight name -> the checkpoint's name for it
    shards: dict[str, list[str]]  # safetensors: shard file -> the delta weights it holds

    def write(self, out) -> None:
        """Write the edited (or reverted) checkpoint into the existing empty directory `out`. Links
        are followed (a Hugging Face cache snapshot links its files to blobs): `out` holds files."""
        out = Path(out)
        for entry in sorted(self.path.iterdir()):
            if self.format == "dcp" and _DCP_FILE.match(entry.name):
                continue  # written by dcp.save below
            if entry.name in self.shards:
                _write_shard(self, entry, out / entry.name)
            elif entry.is_dir():
                shutil.copytree(entry, out / entry.name)
            else:
                shutil.copy2(entry, out / entry.name)
        if self.format == "dcp":
            _save_dcp(self, out)

    def _results(self, name: str, read: Callable[[slice], torch.Tensor]) -> Iterator[torch.Tensor]:
        """Weight `name`'s new value, one of the delta's row blocks at a time; `read(rows)` gives
        those rows of its stored value. Nothing here holds a block once it is yielded."""
        compute = self.delta.restored_value if self.revert else self.delta.edited_value
        for rows in self.delta.row_blocks(name):
            yield compute(name, read(rows), rows)


def weight_files(path) -> list[str]:
    """The names of the checkpoint weight files in directory `path` (model.safetensors, its shards
    and index; DCP's .metadata and *.distcp): what a checkpoint written there supersedes."""
    return sorted(p.name for p in Path(path).iterdir() if _SAFETENSORS_FILE.match(p.name) or _DCP_FILE.match(p.name))


def prepare(checkpoint, delta: EditDelta, revert: bool = False) -> CheckpointEdit:
    """Check that `delta` can be applied to (revert=True: reverted from) the checkpoint directory,
    reading the weights it changes one at a time; CheckpointError, one line, when it cannot."""
    path = Path(checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; give a checkpoint directory")
    if delta.additions is not None:
        raise CheckpointError(
            f"{path}: this delta adds {len(delta.additions.parameters)} parameters (e.g. MEMAT's biases), which a "
            "checkpoint cannot take in place; load the model, apply the delta and save_pretrained it instead"
        )
    records = _records(delta)
    if not records and revert:
        raise CheckpointError(f"{path}: the delta carries no apply record (it was never applied), which an exact "
                              "revert needs; nothing to revert")
    if (path / SAFETENSORS_INDEX).is_file() or (path / SAFETENSORS_SINGLE).is_file():
        fmt, file_of = "safetensors", _safetensors_layout(path)
    elif (path / DCP_METADATA).is_file():
        fmt, file_of = "dcp", dict.fromkeys(_dcp_metadata(path).state_dict_metadata)
    else:
        raise CheckpointError(f"{path}: holds no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or DCP "
                              f"{DCP_METADATA}; give a Hugging Face or torch.distributed.checkpoint directory")
    _check_config(path, delta, records)
    names = _match_names(path, [wd.name for wd in delta.weights], list(file_of))
    shards: dict[str, list[str]] = {}
    for wd in delta.weights if fmt == "safetensors" else ():
        shards.setdefault(file_of[names[wd.name]], []).append(wd.name)
    edit = CheckpointEdit(path, delta, revert, fmt, names, shards)
    for wd in delta.weights:
        _check_weight(edit, wd.name, records.get(wd.name))
    return edit


def _records(delta: EditDelta) -> dict[str, dict]:
    return {d["name"]: d for d in delta.digests()}


def _check_config(path: Path, delta: EditDelta, records: dict) -> None:
    expected = delta.metadata.get("config_hash")
    if not (path / "config.json").is_file():
        if not records:
            raise CheckpointError(f"{path}: nothing says the delta was made for this checkpoint (it has no config.json "
                                  "and the delta no apply record with weight digests); apply it to a loaded model")
        return
    if not expected:
        return
    from transformers import AutoConfig

    try:
        actual = config_hash_of(AutoConfig.from_pretrained(path))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path / 'config.json'}: cannot be read as a transformers config ({err})") from None
    if actual != expected:
        raise CheckpointError(
            f"{path}: another model's checkpoint: its config hash is {actual}, the delta was made for {expected} "
            f"({delta.metadata.get('model_name', 'unnamed model')})"
        )


def _check_weight(edit: CheckpointEdit, name: str, record: dict | None) -> None:
    """Refuse unless the stored weight `name` is what the delta goes onto (apply: its base; revert:
    its edited value) and its result is the one the record holds. Streamed: the weight is read once
    to check it (with a record) and once to compute its result (which refuses an overflow)."""
    with _stored(edit, name) as read:
        if record is not None:
            _check_identity(edit, name, tensor_digest(read(rows) for rows in edit.delta.row_blocks(name)), record)
        digest = tensor_digest(edit._results(name, read))
    expected = record and record["sha256_before" if edit.revert else "sha256_after"]
    if expected and digest != expected:
        raise CheckpointError(
            f"{edit.path}: {edit.tensor_names[name]}: recomputing Δ here does not reproduce the "
            f"{'base' if edit.revert else 'edited'} weights the delta recorded (it was applied on another "
            "device type or torch build); run this where the delta was made. Nothing was written."
        )


def _check_kind(edit: CheckpointEdit, name: str, dtype, shape) -> None:
    """Refuse a stored weight of another shape, or not of a float dtype (`dtype`: a torch.dtype, or
    the file's name for one torch cannot edit)."""
    wd = next(wd for wd in edit.delta.weights if wd.name == name)
    if tuple(shape) != wd.shape or not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise CheckpointError(f"{edit.path}: {edit.tensor_names[name]} is {dtype} {tuple(shape)}, the delta changes "
                              f"a float weight of shape {wd.shape}; was it made for another model?")


def _check_identity(edit: CheckpointEdit, name: str, digest: str, record: dict) -> None:
    where = f"{edit.path}: {edit.tensor_names[name]}"
    before, after = record["sha256_before"], record["sha256_after"]
    if edit.revert:
        if digest == after:
            return
        if digest == before:
            raise CheckpointError(f"{where} holds the base weights: the checkpoint does not carry this delta "
                                  "(never applied, or already reverted); nothing to revert")
    else:
        if digest == before:
            return
        if digest == after:
            raise CheckpointError(f"{where} already holds this delta's edited weights: the delta is already applied")
    raise CheckpointError(f"{where} matches neither the base nor the edited weights the delta recorded: "
                          "another model's checkpoint, or trained since")


def _match_names(path: Path, wanted: list[str], present: list[str]) -> dict[str, str]:
    """Each delta weight's name in the checkpoint: itself, or the one name ending in '.' + it."""
    have = set(present)
    names = {}
    for name in wanted:
        hits = [name] if name in have else [p for p in present if p.endswith("." + name)]
        if not hits:
            raise CheckpointError(f"{path}: holds no tensor {name!r} (nor one ending in it); "
                                  "was the delta made for another model?")
        if len(hits) > 1:
            raise CheckpointError(f"{path}: {len(hits)} tensors end in {name!r} ({', '.join(sorted(hits)[:3])}); "
                                  "which one the delta changes is ambiguous")
        names[name] = hits[0]
    return names


@contextlib.contextmanager
def _stored(edit: CheckpointEdit, name: str) -> Iterator[Callable[[slice], torch.Tensor]]:
    """A function giving rows of delta weight `name` as the checkpoint stores it (a DCP weight is
    loaded whole: its API reads whole tensors)."""
    tensor = edit.tensor_names[name]
    if edit.format == "safetensors":
        file = edit.path / next(shard for shard, names in edit.shards.items() if name in names)
        data_start, header = _safetensors_header(file)
        with open(file, "rb") as fin:
            yield _reader(edit, name, fin, data_start, header[tensor])
        return
    w = _load_dcp(edit.path, {tensor})[tensor]
    _check_kind(edit, name, w.dtype, w.shape)
    yield w.__getitem__


# --- safetensors -------------------------------------------------------------------------------

def _safetensors_header(file: Path) -> tuple[int, dict]:
    """(bytes before the data, the header): a u64 little-endian length, then that many bytes of JSON."""
    with open(file, "rb") as f:
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n)) if n <= file.stat().st_size - 8 else None
        except (struct.error, ValueError):
            header = None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a readable safetensors file (truncated or corrupt); restore it")
    return 8 + n, header


def _safetensors_layout(path: Path) -> dict[str, str]:
    """Tensor name -> the file holding it."""
    index = path / SAFETENSORS_INDEX
    if not index.is_file():
        return {name: SAFETENSORS_SINGLE for name in _safetensors_header(path / SAFETENSORS_SINGLE)[1]
                if name != "__metadata__"}
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{index}: not an index (JSON with a 'weight_map' object); restore it") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' is not an object; restore it")
    for shard in sorted(set(map(str, weight_map.values()))):
        if Path(shard).name != shard:
            raise CheckpointError(f"{index}: names the shard {shard!r}, not a file beside the index; restore the index")
        if not (path / shard).is_file():
            raise CheckpointError(f"{index}: names the shard {shard}, which is missing from {path}")
    return weight_map


def _reader(edit: CheckpointEdit, name: str, fin, data_start: int, info: dict) -> Callable[[slice], torch.Tensor]:
    """A function reading rows of delta weight `name`, its header entry `info`, from the shard open
    as fin (plain reads: a memory map would count the file's pages towards the process)."""
    dtype, shape = _SAFETENSORS_FLOATS.get(info["dtype"], info["dtype"]), info["shape"]
    _check_kind(edit, name, dtype, shape)
    begin, end = info["data_offsets"]
    if end - begin != torch.Size(shape).numel() * dtype.itemsize:
        raise CheckpointError(f"{fin.name}: {edit.tensor_names[name]}: its header's shape and byte span disagree "
                              "(a corrupt shard); restore it")
    row_bytes = torch.Size(shape[1:]).numel() * dtype.itemsize

    def read(rows: slice) -> torch.Tensor:
        fin.seek(data_start + begin + rows.start * row_bytes)
        w = torch.empty((rows.stop - rows.start, *shape[1:]), dtype=dtype)
        _read_into(fin, memoryview(w.reshape(-1).view(torch.uint8).numpy()))
        return w

    return read


def _write_shard(edit: CheckpointEdit, src: Path, dst: Path) -> None:
    """Copy the shard `src` to `dst` with the delta's weights in it replaced by their results, one
    row block at a time; header and every other byte verbatim."""
    data_start, header = _safetensors_header(src)
    names = {edit.tensor_names[name]: name for name in edit.shards[src.name]}
    spans = sorted((header[tensor]["data_offsets"][0], tensor) for tensor in names)
    buffer = memoryview(bytearray(_COPY_BYTES))
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for begin, tensor in spans:
            _copy_bytes(fin, fout, data_start + begin - fin.tell(), buffer)
            for new in edit._results(names[tensor], _reader(edit, names[tensor], fin, data_start, header[tensor])):
                fout.write(memoryview(new.contiguous().reshape(-1).view(torch.uint8).numpy()))
                del new  # before the next block is computed, not after
        _copy_bytes(fin, fout, src.stat().st_size - fin.tell(), buffer)


def _copy_bytes(fin, fout, n: int, buffer: memoryview) -> None:
    """Copy the next n bytes of fin through `buffer` (no allocation per chunk)."""
    while n > 0:
        chunk = buffer[: min(n, len(buffer))]
        _read_into(fin, chunk)
        fout.write(chunk)
        n -= len(chunk)


def _read_into(fin, buffer: memoryview) -> None:
    """Fill `buffer` from fin."""
    while len(buffer):
        got = fin.readinto(buffer)
        if not got:
            raise CheckpointError(f"{fin.name}: ends before its header says; the shard is truncated")
        buffer = buffer[got:]


# --- torch.distributed.checkpoint --------------------------------------------------------------

def _dcp_metadata(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # noqa: BLE001 - any failure to unpickle means the same to the user
        raise CheckpointError(f"{path / DCP_METADATA}: not a readable DCP metadata file ({err}); restore it") from None


def _load_dcp(path: Path, names=None) -> dict:
    """The checkpoint's flat state dict (only `names`, when given), read in this single process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    state = {}
    for name, item in _dcp_metadata(path).state_dict_metadata.items():
        if names is None or name in names:
            state[name] = (torch.empty(item.size, dtype=item.properties.dtype)
                           if isinstance(item, TensorStorageMetadata) else None)
    with warnings.catch_warnings():
        # "torch.distributed is ... uninitialized, assuming ... a single process": exactly the intent.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state


def _save_dcp(edit: CheckpointEdit, out: Path) -> None:
    import torch.distributed.checkpoint as dcp

    state = _load_dcp(edit.path)
    for name, key in edit.tensor_names.items():
        w = state[key]
        for rows, new in zip(edit.delta.row_blocks(name), edit._results(name, w.__getitem__)):
            w[rows] = new  # in place: each block reads only its own rows
    # Nested again as the training job saved it (e.g. {"model": ..., "optim": ...}), so its planner
    # data, and a nested dcp.load of the result, are what they were.
    paths = _dcp_metadata(edit.path).planner_data or {}
    nested: dict = {}
    for key, value in state.items():
        *parents, leaf = paths.get(key, (key,))
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    dcp.save(nested, checkpoint_id=str(out), no_dist=True)
