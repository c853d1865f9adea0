"""The shared MEMIT / ROME hyperparameters, their JSON / YAML I/O, and the registry of methods' own keys.

Field names are exactly those of the reference MEMIT and ROME hparams files (kmeng01/memit
``hparams/MEMIT/*.json``, kmeng01/rome ``hparams/ROME/*.json``) and of EasyEdit's YAML files
(zjunlp/EasyEdit ``hparams/MEMIT/*.yaml``, ``hparams/ROME/*.yaml``), so users can bring the files
they already have. One class serves both algorithms: a ROME configuration is one with a single
layer in ``layers`` (``mom2_update_weight`` is then unused).

Module paths: ``layer_module_tmp``, ``rewrite_module_tmp``, ``mlp_module_tmp``, ``attn_module_tmp``,
``ln_f_module`` and ``lm_head_module`` replace the architecture table's (``massedit.model.arch``)
when set; None → the table's. ``v_loss_layer``: None → the model's last layer. massedit's own
additions: ``batch_size`` (requests per z-optimization chunk; it does not change results, only
memory and speed), ``z_early_stop_loss`` (the reference's hard-coded 5e-2), ``z_site`` (where
MEMIT's δ is added: "residual", the reference's, or "mlp") and ``context_template_length_params``
(see ``context_template_plan``).

A method with keys of its own (AlphaEdit's ``nullspace_threshold`` and ``L2``, MEMAT's
``memat_*``) declares them in its module, as a subclass of `MEMITHyperParams` that it names as its
``hparams_class``; `massedit.methods.register_method` registers that class here. The reader accepts
the shared keys and every registered method's keys, and returns the class whose keys the file
uses (`MEMITHyperParams` when it has only shared ones); a method turns any hparams into its own
class with `from_hparams`, its keys at their defaults where they are missing.

Keys of EasyEdit (and a few other tools) that massedit does not use are accepted and kept, unused,
in ``extras`` — see ``EXTRA_KEYS`` for the list. Any other key is an error that lists the valid
keys and suggests the closest one.

Note on ``batch_size`` in EasyEdit files: there it is the number of requests EasyEdit edits per
call (it applies MEMIT chunk after chunk). In a file that has EasyEdit's ``alg_name`` key, the
value therefore goes to ``extras["batch_size"]`` and does not set massedit's z chunk size (an
EasyEdit ``batch_size: 1`` would otherwise make the z phase serial); massedit edits all requests
of a run as one batch.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from massedit.hparams.keys import HParamsError, above, at_least, checked, declared, hparam, one_of
from massedit.inputs.names import unsafe
from massedit.model.arch import OVERRIDE_KEYS

__all__ = ["HParamsError", "MEMITHyperParams", "MOM2_DTYPES", "EXTRA_KEYS", "METHOD_HPARAMS", "register_hparams",
           "default_layers"]

MOM2_DTYPES = ("float32", "float64", "float16", "bfloat16")

# Keys accepted from EasyEdit's (and other tools') files, kept in `extras`, not used by massedit.
EXTRA_KEYS: dict[str, str] = {
    "alg_name": "EasyEdit: algorithm name (MEMIT, ROME, AlphaEdit, ...); massedit picks the method by its own API",
    "model_name": "EasyEdit: model path / hub id; massedit takes the model from its caller",
    "stats_dir": "EasyEdit: statistics folder; massedit takes it from its caller / CLI",
    "device": "EasyEdit: CUDA device index; massedit uses the device the model is on",
    "model_parallel": "EasyEdit: multi-GPU loading; massedit uses the model as loaded",
    "max_length": "EasyEdit: max generation / eval length",
    "batch_size": "EasyEdit: requests per editing call (only in files with alg_name; see the module doc)",
    "fp16": "EasyEdit: load the model in half precision",
    "bf16": "EasyEdit: load the model in bfloat16",
    "rewrite_module_tmps": "EasyEdit ROME: several rewrite modules (unsupported variant)",
    "enable_prompt_keys": "EasyEdit ROME: key from the bare prompt only",
    "enable_random_prefix_keys": "EasyEdit ROME: key averaged over prefixes (massedit always does this)",
    "original_implementation": "EasyEdit ROME: reference ROME key handling",
    "use_chat_template": "EasyEdit: wrap prompts in the chat template",
    "enable_thinking": "EasyEdit: chat-template thinking flag",
}


def default_layers(n_layers: int) -> list[int]:
    """Edited layers for a model of `n_layers` blocks, scaled from the references.

    first = round(N/8) (at least 1), last = round(N/4) (at least first + 1), and last <= N - 2 so
    that blocks remain after the z layer to carry δ. N = 32 → [4..8] (the Llama presets);
    N = 28 → [4..7]; N = 12 → [2, 3]; N = 4..9 → [1, 2]; N = 3 → [1]; N <= 2 → [0].
    """
    n = int(n_layers)
    if n < 1:
        raise HParamsError(f"a model needs at least one layer, got n_layers={n_layers}")
    if n <= 3:
        return [max(0, n - 2)]
    first = max(1, (n + 4) // 8)
    last = min(max(first + 1, (n + 2) // 4), n - 2)
    return list(range(first, last + 1))


def _layers(layers: list) -> Optional[str]:
    if not layers:
        return "is empty; list the edited layers, e.g. [3, 4, 5, 6, 7, 8]"
    if any(layer < 0 for layer in layers):
        return f"layer indices must be >= 0, got {layers}"
    if any(b <= a for a, b in zip(layers, layers[1:])):
        return f"must be strictly increasing, without repeats, got {layers}; write {sorted(set(layers))}"
    return None


def _only(value: str, why: str) -> Any:
    return lambda v: None if v == value else f'only "{value}" is supported ({why}), got {v!r}'


def _template(tmp: Optional[str]) -> Optional[str]:
    if tmp is not None and tmp.count("{}") != 1:
        return f'must contain exactly one "{{}}" where the layer index goes, e.g. "model.layers.{{}}.mlp"; got {tmp!r}'
    return None


def _module(path: Optional[str]) -> Optional[str]:
    return "is empty; give a module path or null for the registry's" if path is not None and not path.strip() else None


def _pairs(pairs: list) -> Optional[str]:
    for i, (length, n_gen) in enumerate(pairs):
        if length < 1 or n_gen < 1:
            return f"pair {i} [max_tokens, n_gen] = [{length}, {n_gen}]: both must be >= 1, e.g. [[10, 5]]"
    return None


@dataclass
class MEMITHyperParams:
    """MEMIT / ROME hyperparameters (reference key names; defaults are the reference's common values,
    see massedit.hparams.defaults for per-model ones)."""

    layers: list[int] = hparam(check=_layers)
    layer_selection: str = hparam("all", check=_only("all", "every listed layer is edited"))
    fact_token: str = hparam("subject_last", check=_only("subject_last", (
        'the last token of the subject; massedit does not implement "last", "subject_first" or '
        '"subject_first_after_last"')))
    v_num_grad_steps: int = hparam(20, check=at_least(1))
    v_lr: float = hparam(0.5, check=above(0, "the Adam learning rate for delta, e.g. 0.5"))
    v_loss_layer: Optional[int] = None  # None → last layer of the model
    v_weight_decay: float = hparam(0.5, check=at_least(0))
    clamp_norm_factor: float = hparam(0.75, check=above(0))
    kl_factor: float = hparam(0.0625, check=at_least(0))
    mom2_adjustment: bool = True
    mom2_update_weight: float = hparam(15000, check=above(0))
    rewrite_module_tmp: Optional[str] = hparam(None, check=_template)  # None → from the architecture table
    layer_module_tmp: Optional[str] = hparam(None, check=_template)
    mlp_module_tmp: Optional[str] = hparam(None, check=_template)
    attn_module_tmp: Optional[str] = hparam(None, check=_template)
    ln_f_module: Optional[str] = hparam(None, check=_module)
    lm_head_module: Optional[str] = hparam(None, check=_module)
    # A directory name in the statistics path (massedit.inputs.names).
    mom2_dataset: str = hparam("wikipedia", check=lambda v: unsafe(v) and (
        f'{unsafe(v)}; name the statistics corpus with a plain name, e.g. "wikipedia"'))
    mom2_n_samples: int = hparam(100000, check=at_least(1))
    mom2_dtype: str = hparam("float32", check=one_of(MOM2_DTYPES))
    # massedit additions
    batch_size: int = hparam(64, check=at_least(1, "requests per z-optimization chunk"))  # results do not depend on it
    z_early_stop_loss: float = hparam(5e-2, check=at_least(0))
    # Where MEMIT's δ is optimized: "residual" (block L's output, the reference) or "mlp" (the
    # rewrite module's output at L, as ROME's v*). With a norm after the MLP (Gemma 2/3, OLMo 2) a
    # residual δ can lie beyond what the normed MLP outputs reach; one found before the norm is
    # reachable at layer L by construction (massedit.methods.memit.residual_targets).
    z_site: str = hparam("residual", check=one_of(("residual", "mlp")))
    # The reference key, as pairs [max_tokens, n_gen] (the reference iterates
    # `for length, n_gen in context_template_length_params`). MEMIT's hard-coded value is
    # [(10, 5)]: 5 texts of at most 10 tokens, n_gen // 5 = 1 after each of the 5 starters.
    context_template_length_params: list[list[int]] = hparam(factory=lambda: [[10, 5]], check=_pairs)
    # keys from other tools' files that massedit does not use (see EXTRA_KEYS)
    extras: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for k, v in checked(type(self), {k: getattr(self, k) for k in declared(type(self))}, "hparams").items():
            setattr(self, k, v)
        if not isinstance(self.extras, dict):
            raise HParamsError(f'hparams, key "extras": must be a dict, got {type(self.extras).__name__}')

    # ---------------------------------------------------------------------------------- I/O

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "hparams") -> "MEMITHyperParams":
        """From a dict of reference / EasyEdit / registered methods' keys; `source` names it in error
        messages. The result is of `cls` or of the registered subclass whose keys `data` uses."""
        if not isinstance(data, Mapping):
            raise HParamsError(
                f"{source}: expected a mapping of hyperparameter names to values, got {type(data).__name__}"
            )
        data = dict(data)
        extras = {}
        nested = data.pop("extras", None)
        if nested is not None:
            if not isinstance(nested, Mapping):
                raise HParamsError(f'{source}, key "extras": must be a mapping, got {type(nested).__name__}')
            extras.update(nested)
        easyedit = "alg_name" in data
        keys = _accepted()
        unknown = [k for k in data if k not in keys and k not in EXTRA_KEYS]
        if unknown:
            raise HParamsError(_unknown_message(source, unknown))
        values = {}
        for k, v in data.items():
            if k in keys and not (k == "batch_size" and easyedit):
                values[k] = v
            else:
                extras[k] = v
        _check_alg_name(extras.get("alg_name"), source)
        if "layers" not in values:
            raise HParamsError(
                f'{source}: missing key "layers" (the edited layers, increasing, e.g. [3, 4, 5, 6, 7, 8])'
            )
        return cls._build(values, extras, source)

    @classmethod
    def from_json(cls, path) -> "MEMITHyperParams":
        """A reference MEMIT / ROME JSON file (or one written by `to_json`)."""
        path = Path(path)
        text = _read(path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise HParamsError(
                f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}; fix the syntax there"
            ) from None
        if not isinstance(data, dict):
            raise HParamsError(f"{path}: the top level must be a JSON object of hyperparameters, got {type(data).__name__}")
        return cls.from_dict(data, str(path))

    @classmethod
    def from_yaml(cls, path) -> "MEMITHyperParams":
        """An EasyEdit YAML file (same keys plus EasyEdit's extras, see EXTRA_KEYS)."""
        import yaml

        path = Path(path)
        text = _read(path)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise HParamsError(f"{path}: invalid YAML{where}: {problem}; fix the syntax there") from None
        if not isinstance(data, dict):
            raise HParamsError(
                f"{path}: the top level must be a YAML mapping of hyperparameters (key: value lines), "
                f"got {type(data).__name__}"
            )
        return cls.from_dict(data, str(path))

    @classmethod
    def from_file(cls, path) -> "MEMITHyperParams":
        """Dispatch on the extension: .json → from_json; .yaml / .yml → from_yaml."""
        suffix = Path(path).suffix.lower()
        if suffix == ".json":
            return cls.from_json(path)
        if suffix in (".yaml", ".yml"):
            return cls.from_yaml(path)
        raise HParamsError(f"{path}: unknown hparams file type {suffix or '(none)'!r}; use a .json or .yaml file")

    def to_dict(self) -> dict:
        """All keys in declaration order; `extras` (if any) nested under "extras". Round-trips."""
        out = {k: copy.deepcopy(getattr(self, k)) for k in declared(type(self))}
        if self.extras:
            out["extras"] = copy.deepcopy(self.extras)
        return out

    def to_json(self, path, indent: int = 4) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=indent) + "\n", encoding="utf-8")

    def to_yaml(self, path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")

    # ---------------------------------------------------------------------------------- helpers

    @classmethod
    def _build(cls, values: dict, extras: dict, source: str) -> "MEMITHyperParams":
        target = _class_for(cls, set(values), source)
        return target(**checked(target, copy.deepcopy(values), source), extras=copy.deepcopy(extras))

    def replace(self, **changes) -> "MEMITHyperParams":
        """A checked copy with some values changed (unknown names → HParamsError). A registered method's
        key turns it into that method's class: `hp.replace(memat_top_k=4)`."""
        extras = changes.pop("extras", self.extras)
        unknown = [k for k in changes if k not in _accepted()]
        if unknown:
            raise HParamsError(_unknown_message("replace()", unknown))
        return type(self)._build({**{k: getattr(self, k) for k in declared(type(self))}, **changes}, extras,
                                 "replace()")

    @classmethod
    def from_hparams(cls, hp: "MEMITHyperParams") -> "MEMITHyperParams":
        """`hp` as this class: `hp` itself when it is one, else its values of this class's keys, with
        the keys it lacks (a method's own) at their defaults."""
        if isinstance(hp, cls):
            return hp
        return cls(**{k: copy.deepcopy(getattr(hp, k)) for k in declared(cls) if hasattr(hp, k)},
                   extras=copy.deepcopy(hp.extras))

    def check_depth(self, n_layers: int, model_name: str = "the model") -> None:
        """Layers and v_loss_layer must exist in a model of `n_layers` blocks, and the loss must be read
        at or after the last edited layer. Checked here, with the model's depth known, so that a layer
        beyond the model is reported as such rather than as a v_loss_layer that is too small."""
        bad = [layer for layer in self.layers if layer >= n_layers]
        if bad:
            raise HParamsError(
                f'hparams, key "layers": layer {bad[0]} is out of range: {model_name} has {n_layers} layers '
                f'(0..{n_layers - 1}); fix "layers" (e.g. {default_layers(n_layers)})'
            )
        if self.v_loss_layer is not None and self.v_loss_layer >= n_layers:
            raise HParamsError(
                f'hparams, key "v_loss_layer": {self.v_loss_layer} is out of range: {model_name} has {n_layers} '
                f"layers (0..{n_layers - 1}); use {n_layers - 1} (the last layer) or null"
            )
        if self.v_loss_layer is not None and self.v_loss_layer < max(self.layers):
            raise HParamsError(
                f'hparams, key "v_loss_layer": {self.v_loss_layer} is below the last edited layer '
                f"{max(self.layers)}: the loss must be read at or after the layer z is optimized at; use "
                f"{n_layers - 1} (the model's last layer) or null"
            )

    def module_overrides(self) -> dict:
        """Module-path keys that are set, for `massedit.model.arch.spec_for(model_type, overrides)`."""
        return {k: getattr(self, k) for k in OVERRIDE_KEYS if getattr(self, k)}

    def context_template_plan(self) -> list[tuple[int, int]]:
        """`context_template_length_params` as (max_tokens, n_gen) pairs.

        Meaning in the reference: each pair [length, n_gen] yields n_gen generated texts whose
        tokenized length, the starter included, is at most `length` (the reference's
        generate_fast counts the whole sequence: ``while input_ids.size(1) < max_out_len``).
        MEMIT spreads n_gen over its 5 starters ("The", "Therefore", "Because", "I", "You"),
        n_gen // 5 each, and hard-codes [(10, 5)]; ROME generates n_gen texts from
        "<|endoftext|>" per pair, with [[5, 10], [10, 10]] in its files. massedit uses the MEMIT
        convention for every pair: n_gen // 5 texts per starter (at least 1), each pair a group.
        """
        return [(int(a), int(b)) for a, b in self.context_template_length_params]



# --------------------------------------------------------------------------------------------
# methods' own keys

METHOD_HPARAMS: dict[str, type[MEMITHyperParams]] = {}
"""Method name → its hyperparameters class; filled by `massedit.methods.register_method`."""


def _declarer(cls: type, key: str) -> type:
    return next(c for c in cls.__mro__ if key in c.__dict__.get("__annotations__", {}))


def register_hparams(method: str, cls: type) -> None:
    """Accept the keys of `cls` (a dataclass subclass of MEMITHyperParams, or that class) in hparams
    files, for the method named `method`. A key may be declared by one class only."""
    if not (isinstance(cls, type) and issubclass(cls, MEMITHyperParams) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"method {method!r}: hparams_class must be a dataclass subclass of MEMITHyperParams, "
                        f"got {cls!r}")
    if "__dataclass_fields__" not in cls.__dict__ and cls.__dict__.get("__annotations__"):
        raise TypeError(f"method {method!r}: decorate {cls.__name__} with @dataclass, so that its keys are fields")
    declared(cls)  # a field of a type no file can hold fails here, at registration
    own = set(declared(cls)) - set(declared(MEMITHyperParams))
    for name, other in METHOD_HPARAMS.items():
        for key in own & set(declared(other)):
            if _declarer(cls, key) is not _declarer(other, key):
                raise ValueError(f"method {method!r}: hparams key {key!r} of {cls.__name__} is already declared by "
                                 f"{_declarer(other, key).__name__} (method {name!r}); give it another name")
    METHOD_HPARAMS[method] = cls


def _candidates(cls: type) -> list[type]:
    """`cls` and the registered classes derived from it, `cls` first."""
    out = [cls]
    for c in METHOD_HPARAMS.values():
        if issubclass(c, cls) and c not in out:
            out.append(c)
    return out


def _accepted() -> set:
    """The shared keys and every registered method's."""
    return {k for c in _candidates(MEMITHyperParams) for k in declared(c)}


def _methods_of(key: str) -> str:
    return "/".join(name for name, c in METHOD_HPARAMS.items() if key in declared(c))


def _class_for(cls: type, keys: set, source: str) -> type:
    """The class with the fewest keys that holds all of `keys`: `cls` itself, or a registered method's."""
    holding = [c for c in _candidates(cls) if keys <= set(declared(c))]
    if not holding:
        groups: dict[str, list] = {}
        for k in sorted(keys - set(declared(MEMITHyperParams))):
            groups.setdefault(_methods_of(k), []).append(f'"{k}"')
        raise HParamsError(f"{source}: keys of different methods in one set of hparams: "
                           + "; ".join(f"{m}: {', '.join(ks[:3])}{', ...' if len(ks) > 3 else ''}"
                                       for m, ks in groups.items())
                           + "; keep only those of the method you run")
    return min(holding, key=lambda c: len(declared(c)))


def _check_alg_name(alg: Any, source: str) -> None:
    if alg is None:
        return
    names = ["MEMIT", "ROME"] + [name.upper() for name in METHOD_HPARAMS if name.upper() not in ("MEMIT", "ROME")]
    if not isinstance(alg, str) or alg.upper() not in names:
        raise HParamsError(
            f'{source}, key "alg_name": {alg!r} is not an algorithm massedit implements ({", ".join(names)}); '
            "use a file of one of them"
        )


def _unknown_message(source: str, unknown: list) -> str:
    shared = list(declared(MEMITHyperParams))
    by_class = [(c, [k for k in declared(c) if k not in shared]) for c in _candidates(MEMITHyperParams)[1:]]
    methods = "; ".join(f"{'/'.join(n for n, m in METHOD_HPARAMS.items() if m is c)}: {', '.join(keys)}"
                        for c, keys in by_class if keys)
    valid = shared + [k for _, keys in by_class for k in keys] + list(EXTRA_KEYS)
    parts = []
    for k in unknown:
        close = difflib.get_close_matches(str(k), valid, n=1, cutoff=0.6)
        parts.append(f'"{k}"' + (f' (did you mean "{close[0]}"?)' if close else ""))
    return (
        f"{source}: unknown key(s) {', '.join(parts)}. Valid keys: {', '.join(shared)}"
        + (f"; methods' own keys: {methods}" if methods else "")
        + f"; also accepted and kept unused (EasyEdit): {', '.join(EXTRA_KEYS)}"
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise HParamsError(f"{path}: hparams file not found; check the path") from None
    except IsADirectoryError:
        raise HParamsError(f"{path}: is a directory; give a .json or .yaml hparams file") from None
