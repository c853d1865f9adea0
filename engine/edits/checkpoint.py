"""Apply or revert an EditDelta on a checkpoint on disk, without loading the model.

Two formats: Hugging Face safetensors (one `model.safetensors`, or shards named in
`model.safetensors.index.json`) and torch.distributed.checkpoint (DCP) directories (`.metadata`
plus `*.distcp` files). Each edited weight is computed by the delta itself (`EditDelta.edited_value`,
`EditDelta.restored_value`: the code apply and revert run on a loaded model), so the result equals
"load, apply, save" bit for bit.

Safetensors are streamed: W + Δ leaves a tensor's dtype and shape, hence the file's header and
every byte offset, unchanged, so each shard holding an edited weight is written as its own header
and data copied verbatim with the edited tensors' bytes put in their place. One weight (and the
delta's bounded float64 chunks) is in memory at a time; shards without an edited weight and every
other file (config, tokenizer, index) are copied unchanged. DCP directories are loaded whole with
`dcp.load` (single process, no process group) and saved with `dcp.save`; their tensor names may
carry a wrapper's prefix ("model.", "module."), matched by suffix when only one tensor fits.

Whether the checkpoint holds the delta is read from its weights: the digests the delta records
say whether each weight is the base, the edited one, or neither (another model, or trained since),
and the config hash, when both sides have one, must agree. `prepare` makes every check (it reads,
and computes every result once) before anything is written, so a refusal leaves nothing behind.
"""
from __future__ import annotations

import json
import re
import shutil
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open

from massedit.edits.delta import EditDelta, config_hash_of, tensor_digest

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
DCP_METADATA = ".metadata"

_COPY_BYTES = 1 << 20  # the one buffer verbatim byte copies go through
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
                _write_shard(entry, out / entry.name, {self.tensor_names[n]: n for n in self.shards[entry.name]},
                             self._result)
            elif entry.is_dir():
                shutil.copytree(entry, out / entry.name)
            else:
                shutil.copy2(entry, out / entry.name)
        if self.format == "dcp":
            _save_dcp(self, out)

    def _result(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """Weight `name`'s new value from its stored value `w`, checked against the delta's record."""
        new = self.delta.restored_value(name, w) if self.revert else self.delta.edited_value(name, w)
        record = _records(self.delta).get(name)
        expected = record and record["sha256_before" if self.revert else "sha256_after"]
        if expected and tensor_digest(new) != expected:
            raise CheckpointError(
                f"{self.path}: {self.tensor_names[name]}: recomputing Δ here does not reproduce the "
                f"{'base' if self.revert else 'edited'} weights the delta recorded (it was applied on another "
                "device type or torch build); run this where the delta was made. Nothing was written."
            )
        return new


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
    for name, w in _stored(edit):
        _check_identity(edit, name, w)
        edit._result(name, w)
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


def _check_identity(edit: CheckpointEdit, name: str, w: torch.Tensor) -> None:
    where = f"{edit.path}: {edit.tensor_names[name]}"
    wd = next(wd for wd in edit.delta.weights if wd.name == name)
    if tuple(w.shape) != wd.shape or not w.is_floating_point():
        raise CheckpointError(f"{where} is {w.dtype} {tuple(w.shape)}, the delta changes a float weight of shape "
                              f"{wd.shape}; was it made for another model?")
    record = _records(edit.delta).get(name)
    if record is None:
        return
    digest, before, after = tensor_digest(w), record["sha256_before"], record["sha256_after"]
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
    raise CheckpointError(f"{where} ({w.dtype}) matches neither the base nor the edited weights the delta recorded: "
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


def _stored(edit: CheckpointEdit) -> Iterator[tuple[str, torch.Tensor]]:
    """The delta's weights as the checkpoint stores them, one at a time."""
    if edit.format == "safetensors":
        for shard, delta_names in edit.shards.items():
            with safe_open(str(edit.path / shard), framework="pt") as f:
                for name in delta_names:
                    yield name, f.get_tensor(edit.tensor_names[name])
        return
    state = _load_dcp(edit.path, {edit.tensor_names[wd.name] for wd in edit.delta.weights})
    for wd in edit.delta.weights:
        yield wd.name, state.pop(edit.tensor_names[wd.name])


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


def _write_shard(src: Path, dst: Path, edited: dict[str, str],
                 result: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """Copy the shard `src` to `dst` with each tensor of `edited` (checkpoint name -> delta weight
    name) replaced by `result(delta name, stored value)`; header and every other byte verbatim."""
    data_start, header = _safetensors_header(src)
    spans = sorted((header[t]["data_offsets"], t) for t in edited)
    buffer = memoryview(bytearray(_COPY_BYTES))
    with open(src, "rb") as fin, open(dst, "wb") as fout, safe_open(str(src), framework="pt") as st:
        for (begin, end), tensor in spans:
            _copy_bytes(fin, fout, data_start + begin - fin.tell(), buffer)
            new = result(edited[tensor], st.get_tensor(tensor))
            raw = new.contiguous().reshape(-1).view(torch.uint8).numpy()
            assert raw.nbytes == end - begin, f"{tensor}: the edited value changed size"
            fout.write(memoryview(raw))
            del new, raw
            fin.seek(data_start + end)
        _copy_bytes(fin, fout, src.stat().st_size - fin.tell(), buffer)


def _copy_bytes(fin, fout, n: int, buffer: memoryview) -> None:
    """Copy the next n bytes of fin through `buffer` (no allocation per chunk)."""
    while n > 0:
        got = fin.readinto(buffer[: min(n, len(buffer))])
        if not got:
            raise CheckpointError(f"{fin.name}: ends before its header says; the shard is truncated")
        fout.write(buffer[:got])
        n -= got


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
        state[key] = edit._result(name, state[key])
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
