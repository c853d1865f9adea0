"""Edit deltas: the low-rank weight changes of an edit, applied and reverted bit-exactly.

MEMIT changes each rewrite weight by Δ = U Vᵀ (U: [d_model, n], V: [d_ff, n]); GPT-2's Conv1D
stores its weight as [in, out] and receives Δᵀ. A delta keeps only the factors.

Applying computes W' = round(W + Δ) in float64 and rounds once to W's dtype. Subtracting Δ again
does not always give W back (the rounding of W' loses W's low bits where W + Δ crossed into a
coarser binade, and ties may round the other way), so apply also records *fix-ups*: the flat
indices where round(W' - Δ) differs from W and W's values there. Revert recomputes
round(W' - Δ) with the very same code, patches the fix-ups, and checks SHA-256 digests of the
weights before and after: the original weights come back bit for bit, or nothing is written.
Exactness needs Δ recomputed identically, i.e. on the same kind of device and the same
torch/BLAS build as at apply time; the digest check refuses a revert where that does not hold.

Whether a delta is applied is a property of the model's weights, not of the delta object or
file: the apply record holds SHA-256 digests of each weight before and after the edit, so apply
refuses weights that already equal the edited digest (wherever the delta came from) and revert
refuses weights that equal the base digest. `EditDelta.record(model)` computes the record without
changing the model (edits made with apply=False carry one too).

A delta may also change 1-D parameters (biases: `WeightDelta(vector=True)`, Δb = u vᵀ read as a
column, so a sum of per-head contributions is kept as its terms) and may add parameters the model
lacks (`ParameterAdditions`: MEMAT's correction lives in an output-projection bias that Llama-like
families do not have). Apply creates those as zeros and sets the config flags that make
transformers build and load them, then edits them like any weight; revert restores the zeros bit
for bit, deletes the added parameters and puts the flags back.

File format: a single safetensors file.
  tensors  "weight.<i>.u", "weight.<i>.v"    the factors, as given (float32 typically);
           "fixup.<i>.index", "fixup.<i>.value"  only with a record: int64 flat indices into
                                                 weight i (own layout, row-major) and the base
                                                 values there, in the weight's dtype.
  header   metadata key "massedit.edits.delta", a JSON object:
           {"format_version": 3, "metadata": {...the caller's metadata...},
            "weights": [{"name": ..., "transposed": ..., "vector": ...}, ...],
            "additions": null, or {"config": {key: [value before, value after]},
                                   "parameters": [{"name": ..., "shape": [...]}, ...]},
            "record": null, or per weight {"dtype", "sha256_before", "sha256_after", "device"}}
  Version 2 files (no "vector", no "additions") and version 1 files (the record under "applied")
  are read too. Loading checks the header against
  the tensors (names, counts, shapes, dtypes) and raises DeltaError naming the file and field.
  Read the header with safetensors.safe_open(path, "pt").metadata()["massedit.edits.delta"].
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from massedit.model import quantized
from massedit.model.arch import REGISTRY
from massedit.model.devices import read_parameter, write_parameter
from massedit.model.sharded import local_part, unwrap
from massedit.files import written

FORMAT_VERSION = 3
# Version 1 named the apply record "applied"; version 3 added bias entries and parameter additions.
_RECORD_KEYS = {1: "applied", 2: "record", 3: "record"}
HEADER_KEY = "massedit.edits.delta"

# Bounds every float64 temporary (one chunk of Δ and its companions) regardless of weight size.
_CHUNK_BYTES = 64 << 20
# W ± Δ and its checks take this much of a chunk of Δ at a time (elementwise, hence the same bits
# however a chunk is split): their float64 companions stay small beside the chunk, which is then
# the only large temporary, and stay in cache (faster than whole chunks, measured).
_PIECE_BYTES = 1 << 20

# Config entries that differ between loads of the same weights (paths, versions, runtime flags,
# load dtype); underscore-prefixed keys are transformers' private bookkeeping.
_VOLATILE_CONFIG_KEYS = frozenset({
    "transformers_version", "torch_dtype", "dtype", "architectures",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "quantization_config",
})

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

# The config keys a delta's additions may set, and only to true: the flags that make a family build
# the parameters a method adds (MEMAT's attention-output biases: "attention_bias" for Llama-like
# families, "bias" for those whose flag biases every linear layer). Any other key (n_layer, ...)
# would change the architecture the saved model reloads as, so a delta file setting one is refused.
ADDITION_CONFIG_KEYS = frozenset(spec.attn_bias_flag for spec in REGISTRY.values() if spec.attn_bias_flag)


class DeltaError(ValueError):
    """A delta that cannot be applied to, or reverted from, this model as asked."""


@dataclass
class WeightDelta:
    name: str  # parameter name, e.g. "transformer.h.3.mlp.c_proj.weight"
    u: torch.Tensor  # [d_model, n]
    v: torch.Tensor  # [d_ff, n]
    transposed: bool = False  # Conv1D weight stored [in, out]: receives (u vᵀ)ᵀ
    vector: bool = False  # a 1-D parameter (a bias) of length d_model: receives (u vᵀ)[:, 0], v is [1, n]

    def __post_init__(self):
        if self.u.dim() != 2 or self.v.dim() != 2 or self.u.shape[1] != self.v.shape[1]:
            raise DeltaError(
                f"{self.name}: factors must be u [d_model, n] and v [d_ff, n], got "
                f"{tuple(self.u.shape)} and {tuple(self.v.shape)}"
            )
        if self.vector and (self.transposed or self.v.shape[0] != 1):
            raise DeltaError(f"{self.name}: a vector (bias) delta needs v [1, n] and no transpose, got "
                             f"v {tuple(self.v.shape)}, transposed={self.transposed}")

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the weight this delta is for, in the weight's own layout."""
        if self.vector:
            return (self.u.shape[0],)
        return self.matrix_shape

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """`shape` as a matrix: a vector is one column."""
        d_model, d_ff = self.u.shape[0], self.v.shape[0]
        return (d_ff, d_model) if self.transposed else (d_model, d_ff)

    def dense(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """Δ in the weight's own layout."""
        device = self.u.device if device is None else device
        return torch.cat([rows for _, rows in _dense_rows(self, device)]).to(dtype).reshape(self.shape)

    def part(self, index: tuple[slice, ...]) -> "WeightDelta":
        """The delta of the block `index` (a slice per dimension of `shape`) of the weight, e.g. the
        shard one process holds: its factors cut (rows of Δ are rows of u, columns rows of v;
        the other way round when transposed), Δ itself never formed."""
        if self.vector:
            return dataclasses.replace(self, u=self.u[index[0]])
        rows, cols = index
        if self.transposed:
            return dataclasses.replace(self, u=self.u[cols], v=self.v[rows])
        return dataclasses.replace(self, u=self.u[rows], v=self.v[cols])


def _held(wd: WeightDelta, param: torch.Tensor) -> WeightDelta:
    """`wd` for the part of the weight this process holds: all of it, or a DTensor's shard."""
    index = local_part(param)
    return wd if index is None else wd.part(index)


def _row_blocks(wd: WeightDelta) -> list[slice]:
    """The fixed-size blocks of rows (of `matrix_shape`) Δ is computed in."""
    n_rows, n_cols = wd.matrix_shape
    step = max(1, _CHUNK_BYTES // (8 * n_cols))
    return [slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


def _dense_rows(wd: WeightDelta, device) -> Iterator[tuple[slice, torch.Tensor]]:
    """Δ in float64, in the weight's layout, one block of `_row_blocks` at a time.

    Apply and revert both take Δ from here: the chunking depends on the shape alone, so the same
    device and build give the same float64 values bit for bit, which exact revert relies on."""
    left, right = (wd.v, wd.u) if wd.transposed else (wd.u, wd.v)
    left = left.detach().to(device=device, dtype=torch.float64)
    right_t = right.detach().to(device=device, dtype=torch.float64).T
    for rows in _row_blocks(wd):
        yield rows, left[rows] @ right_t


def _dense_pieces(wd: WeightDelta, device) -> Iterator[tuple[slice, torch.Tensor]]:
    """`_dense_rows` cut into blocks of rows of at most `_PIECE_BYTES`."""
    for rows, d in _dense_rows(wd, device):
        step = max(1, _PIECE_BYTES // (8 * d.shape[1]))
        for start in range(0, d.shape[0], step):
            yield slice(rows.start + start, rows.start + min(start + step, d.shape[0])), d[start : start + step]


def _bits(t: torch.Tensor) -> torch.Tensor:
    # Compared as integers so that -0.0 vs 0.0 and NaN payloads count as differences.
    return t.view(_INT_OF_SIZE[t.element_size()])


def _edited(w: torch.Tensor, wd: WeightDelta) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """round(W + Δ) in W's dtype, and the fix-ups (flat indices, values) that let `_restored`
    return exactly W from it."""
    if wd.vector:
        new, index, value = _edited(w.reshape(wd.matrix_shape), dataclasses.replace(wd, vector=False))
        return new.reshape(w.shape), index, value
    new = torch.empty_like(w)
    index, value = [], []
    for rows, d in _dense_pieces(wd, w.device):
        old = w[rows]
        new[rows] = (old.double() + d).to(w.dtype)
        overflow = ~torch.isfinite(new[rows]) & torch.isfinite(old)
        if overflow.any():
            raise DeltaError(
                f"{wd.name}: W + Δ overflows {w.dtype} at {int(overflow.sum())} entries; "
                "the edit is too large for this dtype (load the model in a wider dtype)"
            )
        back = (new[rows].double() - d).to(w.dtype)
        miss = (_bits(back) != _bits(old)).reshape(-1).nonzero().squeeze(1)
        index.append(miss + rows.start * w.shape[1])
        value.append(old.reshape(-1)[miss])
    return new, torch.cat(index).cpu(), torch.cat(value).cpu()


def _restored(w: torch.Tensor, wd: WeightDelta, index=None, value=None) -> torch.Tensor:
    """round(W' - Δ) in W's dtype, with the fix-ups from `_edited` patched in when given."""
    if wd.vector:
        return _restored(w.reshape(wd.matrix_shape), dataclasses.replace(wd, vector=False), index, value).reshape(w.shape)
    old = torch.empty_like(w)
    for rows, d in _dense_pieces(wd, w.device):
        old[rows] = (w[rows].double() - d).to(w.dtype)
    if index is not None:
        old.view(-1)[index.to(w.device)] = value.to(w.device)
    return old


def _sha256(t: torch.Tensor) -> str:
    """Digest of the row-major bytes, streamed to the host in bounded chunks."""
    return _sha256_of((t,))


def _sha256_of(parts: Iterable[torch.Tensor]) -> str:
    """`_sha256` of `parts` one after another, taken from the iterable one at a time."""
    h = hashlib.sha256()
    for t in parts:
        flat = t.detach().reshape(-1)
        step = max(1, _CHUNK_BYTES // t.element_size())
        for start in range(0, flat.numel(), step):
            # A copy: numpy() marks the storage it shares as not resizable, and FSDP2 frees the storage
            # of the parameters it gathered by resizing it.
            h.update(flat[start : start + step].to("cpu", copy=True).view(torch.uint8).numpy())
        del t, flat  # before the iterable makes the next part, not after
    return h.hexdigest()


def tensor_digest(t) -> str:
    """SHA-256 of a weight's values as `digests()` records them, for a weight held outside a model
    (e.g. one tensor read from a checkpoint file): the tensor, or an iterable of its consecutive
    blocks of rows (a weight streamed from a file, never held whole)."""
    return _sha256(t) if isinstance(t, torch.Tensor) else _sha256_of(t)


def file_digest(path) -> str:
    """SHA-256 of a file's bytes, read in blocks (a saved delta, a statistics file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def weight_digest(model: nn.Module, name: str) -> str:
    """SHA-256 of parameter `name`'s values as a delta records them for the base and the edited
    weight: stored values wherever they live (offloaded ones included), and for a bitsandbytes
    weight the dense value its edits start from."""
    dense = quantized.editable_value(model, name)
    return _sha256(dense if dense is not None else read_parameter(model, name))


def _strip_volatile(obj):
    if isinstance(obj, dict):
        return {
            str(k): _strip_volatile(v)
            for k, v in obj.items()
            if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS
        }
    if isinstance(obj, (list, tuple)):
        return [_strip_volatile(v) for v in obj]
    return obj


def config_hash(model: nn.Module) -> str:
    """A stable digest of the model's config: what identifies the architecture and its sizes,
    not where or how it was loaded (see _VOLATILE_CONFIG_KEYS)."""
    return config_hash_of(model.config)


def config_hash_of(config) -> str:
    """`config_hash` from a transformers config alone (e.g. a checkpoint's config.json, weights unread)."""
    cfg = _strip_volatile(config.to_dict())
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class ParameterAdditions:
    """Parameters a delta adds to a model that lacks them, as zeros, and config values it sets so
    that the family builds and loads them after save_pretrained (Llama's `attention_bias` adds the
    q/k/v/o biases of every layer, so all of them are added). An empty `config` means no flag
    makes the family load them: the edit then lives in memory and in the delta only."""

    parameters: dict[str, tuple[int, ...]]  # name -> shape; created with the dtype and device of the module's weight
    config: dict[str, tuple] = field(default_factory=dict)  # key -> (value before, value after)

    @property
    def reloadable(self) -> bool:
        return bool(self.config)

    def header(self) -> dict:
        return {"config": {k: list(v) for k, v in self.config.items()},
                "parameters": [{"name": n, "shape": list(s)} for n, s in self.parameters.items()]}

    def _owner(self, model: nn.Module, name: str) -> tuple[nn.Module, str]:
        path, _, leaf = name.rpartition(".")
        try:
            return model.get_submodule(path), leaf
        except AttributeError:
            raise DeltaError(f"{name}: the delta adds this parameter, but the model has no module {path!r}; "
                             "was this delta made for another model?") from None

    def add(self, model: nn.Module) -> None:
        """Create every parameter as zeros and set the config values; refused if one already exists."""
        owners = [self._owner(model, name) for name in self.parameters]
        for name, (module, leaf) in zip(self.parameters, owners):
            if getattr(module, leaf, None) is not None:
                raise DeltaError(f"{name}: the delta adds this parameter but the model already has it "
                                 "(is this delta, or another that adds it, already applied?)")
            ref = getattr(module, "weight", None)
            if ref is None or ref.device.type == "meta":
                raise DeltaError(f"{name}: cannot add a parameter beside a missing or offloaded weight; "
                                 "load the model without offloading")
        for (name, shape), (module, leaf) in zip(self.parameters.items(), owners):
            ref = module.weight
            setattr(module, leaf, nn.Parameter(torch.zeros(shape, dtype=ref.dtype, device=ref.device),
                                               requires_grad=ref.requires_grad))
        for key, (_, after) in self.config.items():
            setattr(model.config, key, after)

    def remove(self, model: nn.Module) -> None:
        """Delete the added parameters and put the config values back."""
        for name in self.parameters:
            module, leaf = self._owner(model, name)
            setattr(module, leaf, None)
        for key, (before, _) in self.config.items():
            setattr(model.config, key, before)

    def present(self, model: nn.Module) -> bool:
        named = dict(model.named_parameters())
        return all(name in named for name in self.parameters)


@dataclass
class _Applied:
    """What apply records for one weight: the digests that say whether it holds the base or the
    edited values, and all that an exact revert needs besides Δ."""

    dtype: torch.dtype
    sha256_before: str
    sha256_after: str
    fix_index: torch.Tensor  # int64, flat indices into the weight
    fix_value: torch.Tensor  # the original values there, in `dtype`
    device: str  # device type Δ was computed on; revert must recompute it on the same
    # A float32 weight's record also holds the digests of its values cast to float16 and bfloat16,
    # {dtype: (before, after)}, so that a half-precision copy of the edited model is known to hold it.
    as_half: dict = field(default_factory=dict)

    def header(self) -> dict:
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "sha256_before": self.sha256_before,
            "sha256_after": self.sha256_after,
            "device": self.device,
            **({"as_half": {k: list(v) for k, v in self.as_half.items()}} if self.as_half else {}),
        }

    def holds_edit(self, dtype: torch.dtype, digest: str) -> bool:
        """Whether a weight of `dtype` with `digest` holds the edit (of this dtype, or a half copy)."""
        after = self.sha256_after if dtype == self.dtype else self.as_half.get(_dtype_name(dtype), (None, None))[1]
        return digest == after


_HALF = (torch.float16, torch.bfloat16)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _half_digests(before: torch.Tensor, after: torch.Tensor) -> dict:
    """For float32 weights, the digests of their values cast to each half dtype (see _Applied.as_half)."""
    if before.dtype != torch.float32:
        return {}
    return {_dtype_name(d): (_sha256(before.to(d)), _sha256(after.to(d))) for d in _HALF}


class EditDelta:
    """The weight changes of one edit run, with the record that makes them exactly revertible."""

    def __init__(self, weights: list[WeightDelta], metadata: Optional[dict] = None,
                 additions: Optional[ParameterAdditions] = None):
        self.weights = list(weights)
        self.metadata = dict(metadata or {})
        self.additions = additions if additions is not None and additions.parameters else None
        names = [wd.name for wd in self.weights]
        if len(set(names)) != len(names):
            repeated = sorted({n for n in names if names.count(n) > 1})
            raise DeltaError(f"a delta may change each weight once; repeated: {repeated}")
        try:
            json.dumps(self.metadata)
        except TypeError as err:
            raise DeltaError(f"delta metadata must be JSON-serializable: {err}") from err
        self._record: Optional[list[_Applied]] = None
        # Whether the record is of this process's shards of sharded weights, which no file holds.
        self._record_of_shards = False

    @property
    def n_fixups(self) -> int:
        """How many weight entries need a fix-up for an exact revert (0 without a record)."""
        return sum(a.fix_index.numel() for a in self._record or [])

    def digests(self) -> list[dict]:
        """Per weight: its name and the digests of its base and edited values ([] without a record)."""
        return [{"name": wd.name, "sha256_before": r.sha256_before, "sha256_after": r.sha256_after}
                for wd, r in zip(self.weights, self._record or [])]

    def row_blocks(self, name: str) -> list[slice]:
        """The blocks of rows (of the weight's first dimension) in which Δ of weight `name` is
        computed: given one of them as `rows`, `edited_value` and `restored_value` take and return
        just those rows, bit for bit the rows of the whole weight's result."""
        return _row_blocks(self.weights[self._index(name)])

    def edited_value(self, name: str, w: torch.Tensor, rows: Optional[slice] = None) -> torch.Tensor:
        """round(W + Δ) for weight `name` from its stored value `w` (a tensor outside any model, e.g.
        read from a checkpoint file), computed as apply computes it; `w` is the rows `rows` (one of
        `row_blocks(name)`) of the weight when given."""
        return _edited(w, self._block(name, rows))[0]

    def restored_value(self, name: str, w: torch.Tensor, rows: Optional[slice] = None) -> torch.Tensor:
        """Weight `name`'s base value from its edited value `w`, as exact revert computes it (Δ
        recomputed, the record's fix-ups patched in); `w` is the rows `rows` (one of `row_blocks(name)`)
        of the weight when given. Compare its digest with `digests()` before use."""
        if self._record is None:
            raise DeltaError("this delta carries no apply record, which an exact revert needs")
        wd, record = self._block(name, rows), self._record[self._index(name)]
        index, value = record.fix_index, record.fix_value
        if rows is not None:
            # The fix-ups are flat indices into the whole weight: keep this block's, made local to it.
            start, stop = (r * wd.matrix_shape[1] for r in (rows.start, rows.stop))
            inside = (index >= start) & (index < stop)
            index, value = index[inside] - start, value[inside]
        return _restored(w, wd, index, value)

    def _block(self, name: str, rows: Optional[slice]) -> WeightDelta:
        """Weight `name`'s delta, or that of its rows `rows` when given (one of `row_blocks(name)`:
        other rows could compute Δ in other blocks, hence other bits)."""
        wd = self.weights[self._index(name)]
        if rows is None:
            return wd
        if rows not in _row_blocks(wd):
            raise DeltaError(f"{name}: rows {rows.start}:{rows.stop} are not one of the delta's row blocks "
                             "(row_blocks); Δ is computed in those only")
        return wd.part((rows, slice(None)))

    def _index(self, name: str) -> int:
        for i, wd in enumerate(self.weights):
            if wd.name == name:
                return i
        raise DeltaError(f"{name}: this delta does not change that weight")

    def is_applied(self, model: nn.Module) -> bool:
        """Whether every weight of `model` this delta changes holds its edited values."""
        if self._record is None:
            return False
        model = unwrap(model)
        named = dict(model.named_parameters())
        if any(wd.name not in named for wd in self.weights):
            return False  # parameters this delta adds are absent
        if any(not named[wd.name].is_floating_point() for wd in self.weights if wd.name in named):
            return False  # a quantized weight holds no edit: edits live in dense stand-ins
        params = self._params(model)
        return all(r.holds_edit(p.dtype, _sha256(read_parameter(model, wd.name)))
                   for wd, p, r in zip(self.weights, params, self._record))

    def _params(self, model: nn.Module) -> list[nn.Parameter]:
        named = dict(model.named_parameters())
        params = []
        for wd in self.weights:
            p = named.get(wd.name)
            if p is None:
                raise DeltaError(
                    f"{wd.name}: no such parameter in {type(model).__name__}; "
                    "was this delta made for another model?"
                )
            if tuple(p.shape) != wd.shape:
                raise DeltaError(
                    f"{wd.name}: the delta expects shape {wd.shape}, the model's weight has shape "
                    f"{tuple(p.shape)}; was this delta made for another model?"
                )
            if not p.is_floating_point():
                raise DeltaError(f"{wd.name}: cannot edit a {p.dtype} weight (quantized?): floats only")
            params.append(p)
        return params

    def _check_config_hash(self, model: nn.Module, force: bool) -> None:
        expected = self.metadata.get("config_hash")
        if expected and not force:
            actual = config_hash(model)
            if actual != expected:
                raise DeltaError(
                    f"config hash mismatch: the delta was made for a model with config hash {expected} "
                    f"({self.metadata.get('model_name', 'unnamed model')}), this model's is {actual}; "
                    "pass force=True to apply it anyway"
                )

    def _checked_params(self, model: nn.Module) -> list[nn.Parameter]:
        params = self._params(model)
        for wd in self.weights:
            for factor in (wd.u, wd.v):
                if not factor.is_floating_point() or not torch.isfinite(factor).all():
                    raise DeltaError(f"{wd.name}: the delta's factors contain NaN/inf (or are not floats)")
        return params

    def _refuse_if_applied(self, model: nn.Module, params: list[nn.Parameter]) -> list[str]:
        """The weights' current digests; an error if any already holds this delta's edit."""
        digests = [_sha256(read_parameter(model, wd.name)) for wd in self.weights]
        for wd, p, digest, r in zip(self.weights, params, digests, self._record or []):
            # A weight the delta leaves unchanged (Δ rounds away) holds its edit whether applied or not.
            if r.sha256_after != r.sha256_before and r.holds_edit(p.dtype, digest):
                copy = "" if p.dtype == r.dtype else f", as a {_dtype_name(p.dtype)} copy of the edited weights"
                raise DeltaError(
                    f"this delta is already applied to this model ({wd.name} holds its edited values{copy}); "
                    "revert it before applying it again"
                )
        return digests

    def record(self, model: nn.Module, force: bool = False) -> None:
        """Compute what apply would record for `model` (digests of the base and the edited weights,
        fix-ups) without changing it, so that a saved unapplied delta knows its base too."""
        model, names = unwrap(model), [wd.name for wd in self.weights]
        self._check_config_hash(model, force)
        added = self._add(model)
        try:
            quantized.make_editable(model, names)
            try:
                params = self._checked_params(model)
                digests = self._refuse_if_applied(model, params)
                records = []
                for wd, p, before in zip(self.weights, params, digests):
                    w = read_parameter(model, wd.name)
                    new, index, value = _edited(w, _held(wd, p))
                    records.append(_Applied(w.dtype, before, _sha256(new), index, value, w.device.type,
                                            _half_digests(w, new)))
            finally:
                quantized.restore_unchanged(model, names)
        finally:
            if added:
                self.additions.remove(model)
        self._record, self._record_of_shards = records, any(local_part(p) is not None for p in params)

    def _add(self, model: nn.Module) -> bool:
        """Add this delta's parameters (as zeros) when it has some; whether it did."""
        if self.additions is None:
            return False
        self.additions.add(model)
        return True

    def apply(self, model: nn.Module, force: bool = False) -> None:
        """W ← round(W + Δ) for every weight, all or nothing: on any error the weights already
        written are restored exactly. Refused when the weights already hold the edit. A delta with
        an apply record is checked against it: on its recorded base the result must have the recorded
        edited digest (altered factors are refused), and weights other than that base (other edits
        since, or this delta beneath them) are refused. The model's config hash must match
        metadata["config_hash"] when the delta has one. force=True skips the config hash and base
        checks."""
        model, names = unwrap(model), [wd.name for wd in self.weights]
        self._check_config_hash(model, force)
        added = self._add(model)
        done: list[tuple[WeightDelta, _Applied]] = []
        try:
            # Quantized (bitsandbytes) modules take an edit through dense stand-ins (massedit.model.quantized).
            quantized.make_editable(model, names)
            params = self._checked_params(model)
            digests = self._refuse_if_applied(model, params)
            recorded = self._record or [None] * len(self.weights)
            # A quantized model's weights are a dequantized approximation of any float base: deltas
            # made on the float model transfer to it by design, so its base is not held to the record.
            transfer = getattr(getattr(model, "config", None), "quantization_config", None) is not None
            for wd, p, before, r in zip(self.weights, params, digests, recorded):
                elsewhere = (r is not None and not transfer and p.dtype == r.dtype
                             and before != r.sha256_before != r.sha256_after)
                if elsewhere and not force:
                    raise DeltaError(
                        f"{wd.name} is not the weight this delta was made on (base digest {r.sha256_before[:12]}, "
                        f"the model's {before[:12]}): the model changed since (other edits, training), or this delta "
                        "is already applied beneath later edits; pass force=True to apply it on these weights anyway"
                    )
                w = read_parameter(model, wd.name)
                part = _held(wd, p)
                new, index, value = _edited(w, part)
                record = _Applied(w.dtype, before, _sha256(new), index, value, w.device.type, _half_digests(w, new))
                # On its own base, on the device type it was made on, the delta must reproduce the edited
                # weights it recorded: otherwise its factors are not the ones that made that record.
                if r is not None and before == r.sha256_before and (r.dtype, r.device) == (w.dtype, w.device.type) \
                        and record.sha256_after != r.sha256_after:
                    raise DeltaError(
                        f"{wd.name}: this delta does not produce the edited weights its record names (digest "
                        f"{r.sha256_after[:12]}, got {record.sha256_after[:12]}): its factors were changed after it was "
                        "saved; use the delta file the edit wrote. No weight was changed."
                    )
                write_parameter(model, wd.name, new)
                done.append((part, record))
        except BaseException:
            for wd, record in reversed(done):
                write_parameter(model, wd.name,
                                _restored(read_parameter(model, wd.name), wd, record.fix_index, record.fix_value))
            quantized.restore_unchanged(model, names)
            if added:
                self.additions.remove(model)
            raise
        self._record = [record for _, record in done]
        self._record_of_shards = any(local_part(p) is not None for p in params)

    def revert(self, model: nn.Module, exact: bool = True) -> None:
        """Restore the weights from before apply, bit for bit; nothing is written unless every
        weight can be (so one restored copy of each edited weight is held meanwhile).
        exact=False subtracts Δ instead (approximate), for weights that changed since apply."""
        if self._record is None:
            raise DeltaError(
                "this delta is not applied: it carries no apply record (never applied), nothing to revert"
            )
        model = unwrap(model)
        params = self._params(model)
        digests = [_sha256(read_parameter(model, wd.name)) for wd in self.weights]
        changing = [(p, d, r) for p, d, r in zip(params, digests, self._record) if r.sha256_before != r.sha256_after]
        if changing and all(p.dtype == r.dtype and d == r.sha256_before for p, d, r in changing):
            raise DeltaError(
                "this delta is not applied to this model: its weights equal the base weights "
                "(already reverted, or never applied); nothing to revert"
            )
        self._check_additions_unchanged(model)
        if not exact:
            for wd, p in zip(self.weights, params):
                write_parameter(model, wd.name, _restored(read_parameter(model, wd.name), _held(wd, p)))
            quantized.restore_unchanged(model, [wd.name for wd in self.weights])
            self._remove(model)
            return
        for wd, p, digest, record in zip(self.weights, params, digests, self._record):
            if p.dtype != record.dtype:
                raise DeltaError(
                    f"{wd.name}: the delta was applied to a {record.dtype} weight, this one is "
                    f"{p.dtype}; exact revert needs the same dtype (or use revert(model, exact=False))"
                )
            if digest != record.sha256_after:
                raise DeltaError(
                    f"{wd.name} has changed since this delta was applied (training steps, another "
                    "edit?): an exact revert is impossible; revert(model, exact=False) subtracts "
                    "Δ approximately. No weight was changed."
                )
        originals = []
        for wd, p, record in zip(self.weights, params, self._record):
            stored = read_parameter(model, wd.name)
            old = _restored(stored, _held(wd, p), record.fix_index, record.fix_value)
            if _sha256(old) != record.sha256_before:
                raise DeltaError(
                    f"{wd.name}: recomputing Δ did not reproduce the original weight; the delta "
                    f"was applied on {record.device!r}, and exact revert needs the same device type "
                    f"and torch build (this weight is on {stored.device.type!r}). No weight was changed; "
                    "revert(model, exact=False) subtracts Δ approximately."
                )
            originals.append(old)
        for wd, old in zip(self.weights, originals):
            write_parameter(model, wd.name, old)
        quantized.restore_unchanged(model, [wd.name for wd in self.weights])
        self._remove(model)

    def _check_additions_unchanged(self, model: nn.Module) -> None:
        """Added parameters the delta does not edit must still be zeros: removing them loses nothing."""
        edited = {wd.name for wd in self.weights}
        for name in (self.additions.parameters if self.additions else {}):
            if name not in edited and bool(read_parameter(model, name).any()):
                raise DeltaError(f"{name} was added as zeros by this delta and has changed since (training?); "
                                 "reverting would delete it. No weight was changed.")

    def _remove(self, model: nn.Module) -> None:
        if self.additions is not None:
            self.additions.remove(model)

    def save(self, path) -> None:
        """Write the delta (and its apply record, if it has one) to one safetensors file. A record
        made on a sharded model (DTensor weights) holds this process's shards only and is not
        written: the file is then the delta as an unapplied edit makes it, factors and metadata."""
        records = None if self._record_of_shards else self._record
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, wd in enumerate(self.weights):
            # Own contiguous copies: safetensors refuses views and tensors sharing storage.
            tensors[f"weight.{i}.u"] = wd.u.detach().cpu().contiguous().clone()
            tensors[f"weight.{i}.v"] = wd.v.detach().cpu().contiguous().clone()
        for i, record in enumerate(records or []):
            tensors[f"fixup.{i}.index"] = record.fix_index.contiguous()
            tensors[f"fixup.{i}.value"] = record.fix_value.contiguous()
        header = {
            "format_version": FORMAT_VERSION,
            "metadata": self.metadata,
            "weights": [{"name": wd.name, "transposed": wd.transposed, "vector": wd.vector} for wd in self.weights],
            "additions": None if self.additions is None else self.additions.header(),
            "record": None if records is None else [r.header() for r in records],
        }
        with written(path) as tmp:  # an interrupted save never leaves a truncated delta behind
            save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header)})

    @classmethod
    def load(cls, path) -> "EditDelta":
        """Read a delta, checking its header against its tensors: DeltaError names the file and field."""
        try:
            with safe_open(str(path), framework="pt") as f:
                return _parse(path, (f.metadata() or {}).get(HEADER_KEY), set(f.keys()), f.get_tensor)
        except SafetensorError as err:
            raise DeltaError(f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt") from None


_SHA256_HEX = frozenset("0123456789abcdef")


class AppliedDeltas:
    """The deltas applied so far inside an `applied` block; more can be applied as the block goes."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.deltas: list[EditDelta] = []

    def apply(self, delta: EditDelta) -> None:
        delta.apply(self.model)
        self.deltas.append(delta)


@contextlib.contextmanager
def applied(model: nn.Module, deltas: Iterable[EditDelta] = ()) -> Iterator[AppliedDeltas]:
    """Apply `deltas` (and whatever the block applies through the yielded `AppliedDeltas`) for the
    duration of the block; on leaving it, also by an exception, revert every one that was applied,
    last first, so the model comes back bit for bit."""
    stack = AppliedDeltas(model)
    try:
        for delta in deltas:
            stack.apply(delta)
        yield stack
    finally:
        for delta in reversed(stack.deltas):
            delta.revert(model)


def _parse(path, raw: Optional[str], keys: set, get_tensor) -> EditDelta:
    def bad(field: str, why: str) -> DeltaError:
        return DeltaError(f"{path}: delta header field {field} {why}; the file is damaged or not a massedit delta")

    if raw is None:
        raise DeltaError(f"{path} is not a massedit delta (no {HEADER_KEY!r} in its safetensors header)")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as err:
        raise bad("(the header itself)", f"is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise bad("(the header itself)", "is not a JSON object")
    version = header.get("format_version")
    if version not in _RECORD_KEYS:
        raise DeltaError(
            f"{path}: delta format version {version} is not supported "
            f"(this massedit reads versions {', '.join(map(str, _RECORD_KEYS))})"
        )
    metadata, entries, records = header.get("metadata"), header.get("weights"), header.get(_RECORD_KEYS[version])
    if not isinstance(metadata, dict):
        raise bad("'metadata'", "is missing or not an object")
    if not isinstance(entries, list):
        raise bad("'weights'", "is missing or not a list")
    expected = set()
    weights = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise bad(f"'weights'[{i}].name", "is missing or not a non-empty string")
        if not isinstance(entry.get("transposed"), bool):
            raise bad(f"'weights'[{i}].transposed", "is missing or not true/false")
        if not isinstance(entry.get("vector", False), bool):
            raise bad(f"'weights'[{i}].vector", "is not true/false")
        factors = []
        for side in ("u", "v"):
            key = f"weight.{i}.{side}"
            expected.add(key)
            if key not in keys:
                raise bad(f"'weights'[{i}]", f"has no tensor {key!r} in the file")
            t = get_tensor(key)
            if t.dim() != 2 or not t.is_floating_point():
                raise bad(f"'weights'[{i}]", f"has tensor {key!r} of shape {tuple(t.shape)} and dtype {t.dtype}; "
                          "expected a 2-D float matrix")
            factors.append(t)
        try:
            weights.append(WeightDelta(entry["name"], factors[0], factors[1], entry["transposed"],
                                       entry.get("vector", False)))
        except DeltaError as err:
            raise bad(f"'weights'[{i}]", f"does not match its tensors ({err})") from None
    try:
        delta = EditDelta(weights, metadata, _parse_additions(bad, header.get("additions")))
    except DeltaError as err:
        raise bad("'weights'", f"is invalid ({err})") from None
    if records is not None:
        if not isinstance(records, list) or len(records) != len(weights):
            raise bad(f"{_RECORD_KEYS[version]!r}", f"must be null or a list of {len(weights)} entries, one per weight")
        delta._record = [_parse_record(bad, f"{_RECORD_KEYS[version]!r}[{i}]", i, r, wd, keys, get_tensor, expected)
                         for i, (r, wd) in enumerate(zip(records, weights))]
    extra = sorted(keys - expected)
    if extra:
        raise bad("'weights'", f"does not account for the tensors {extra} in the file")
    return delta


def _parse_record(bad, field: str, i: int, r, wd: WeightDelta, keys: set, get_tensor, expected: set) -> _Applied:
    if not isinstance(r, dict):
        raise bad(field, "is not an object")
    dtype = getattr(torch, str(r.get("dtype")), None)
    if not isinstance(dtype, torch.dtype):
        raise bad(f"{field}.dtype", f"is {r.get('dtype')!r}, not a torch dtype")
    for k in ("sha256_before", "sha256_after"):
        digest = r.get(k)
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _SHA256_HEX:
            raise bad(f"{field}.{k}", "is not a SHA-256 hex digest")
    if not isinstance(r.get("device"), str):
        raise bad(f"{field}.device", "is missing or not a string")
    index_key, value_key = f"fixup.{i}.index", f"fixup.{i}.value"
    expected.update((index_key, value_key))
    for key in (index_key, value_key):
        if key not in keys:
            raise bad(field, f"has no tensor {key!r} in the file")
    index, value = get_tensor(index_key), get_tensor(value_key)
    n = math.prod(wd.shape)
    if index.dtype != torch.int64 or index.dim() != 1:
        raise bad(field, f"has {index_key!r} of dtype {index.dtype} and shape {tuple(index.shape)}; expected int64 [k]")
    if value.dtype != dtype or tuple(value.shape) != tuple(index.shape):
        raise bad(field, f"has {value_key!r} of dtype {value.dtype} and shape {tuple(value.shape)}; "
                  f"expected {dtype} {tuple(index.shape)}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        raise bad(field, f"has {index_key!r} pointing outside the {wd.shape} weight")
    as_half = r.get("as_half", {})
    if not isinstance(as_half, dict) or not all(
            k in map(_dtype_name, _HALF) and isinstance(v, list) and len(v) == 2
            and all(isinstance(d, str) and len(d) == 64 and set(d) <= _SHA256_HEX for d in v) for k, v in as_half.items()):
        raise bad(f"{field}.as_half", 'must be {"float16" or "bfloat16": [SHA-256 before, SHA-256 after]}')
    return _Applied(dtype, r["sha256_before"], r["sha256_after"], index, value, r["device"],
                    {k: tuple(v) for k, v in as_half.items()})


def _parse_additions(bad, raw) -> Optional[ParameterAdditions]:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("config"), dict) or not isinstance(raw.get("parameters"), list):
        raise bad("'additions'", 'must be null or {"config": {...}, "parameters": [...]}')
    config = {}
    for key, pair in raw["config"].items():
        if not isinstance(pair, list) or len(pair) != 2:
            raise bad(f"'additions'.config.{key}", "must be [value before, value after]")
        if key not in ADDITION_CONFIG_KEYS or pair[1] is not True:
            raise bad(f"'additions'.config.{key}", f"sets {key!r} to {pair[1]!r}; a delta may only set a bias flag "
                      f"({', '.join(sorted(ADDITION_CONFIG_KEYS))}) to true")
        config[key] = tuple(pair)
    parameters = {}
    for i, entry in enumerate(raw["parameters"]):
        if (not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]
                or not isinstance(entry.get("shape"), list)
                or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in entry["shape"])):
            raise bad(f"'additions'.parameters[{i}]", "must be {\"name\": ..., \"shape\": [positive integers]}")
        parameters[entry["name"]] = tuple(entry["shape"])
    return ParameterAdditions(parameters, config)
