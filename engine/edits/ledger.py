"""The edit ledger (DESIGN §11): every round of a sequential edit on disk, in order.

    DIR/ledger.json                 written once, when the first round is recorded: the rule
                                    (method), model name and config hash, edited layers and
                                    weights, hparams, context templates, and the SHA-256 of every
                                    edited weight of the base model
    DIR/rounds/000001/              one directory per round, complete or absent:
        delta.safetensors           the round's EditDelta, saved applied (fix-ups and the
                                    before/after digests of every weight: exact revert)
        keys.safetensors            the round's keys per layer ("layer.<l>", [n, d], read on the
                                    model after the round), for rules that preserve earlier keys
        round.json                  round number, method, n_edits, SHA-256 of the requests,
                                    timings, z loss, the SHA-256 of delta.safetensors and of
                                    round.json's own other fields (a changed file is refused)
    DIR/reverted/                   rounds taken off by `revert`, kept rather than deleted

A round is written into DIR/rounds/.000001.partial and renamed into place: an interruption leaves
either the whole round or none of it (a leftover .partial directory is removed on the next open).
The model state a ledger describes is the base plus all its rounds; each weight's digests chain
from the base through every round's before/after. `check` (run by `rounds`, `replay`, `revert_last`
and, as a list of problems, `verify`) refuses a ledger whose files no longer say that: a missing or
renumbered round, a changed round.json or delta, a broken chain.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file

from massedit.edits.delta import EditDelta, config_hash, file_digest, weight_digest
from massedit.files import write_text

FORMAT_VERSION = 1


class LedgerError(ValueError):
    pass


def requests_digest(requests: Sequence) -> str:
    """SHA-256 of the requests' fields, in order: identifies which requests a round edited."""
    rows = [asdict(r) if not isinstance(r, dict) else r for r in requests]
    rows = [{k: v for k, v in row.items() if k != "source"} for row in rows]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()


def _digests_of(delta_path: Path) -> list[dict]:
    """Per weight of a saved round's delta: {"name", "sha256_before", "sha256_after"}."""
    digests = EditDelta.load(delta_path).digests()
    if not digests:
        raise LedgerError(f"{delta_path} holds a delta without its apply record; a ledger round must be applied")
    return digests


_DAMAGED = "the ledger is damaged: restore the file, or start a new ledger directory"
# The fields each file must have, with their JSON types.
_HEADER_FIELDS = {"method": str, "model_name": str, "config_hash": str, "layers": list, "hparams": dict,
                  "context_templates": list, "base": dict}
_ROUND_FIELDS = {"round": int, "created": (int, float), "method": str, "n_edits": int, "requests_sha256": str,
                 "report": dict}


def _read_json(path: Path, fields: dict) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LedgerError(f"{path}: missing; {_DAMAGED}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise LedgerError(f"{path}: not valid JSON ({str(err).splitlines()[0]}); {_DAMAGED}") from None
    if not isinstance(data, dict):
        raise LedgerError(f"{path}: holds a JSON {type(data).__name__}, not an object; {_DAMAGED}")
    for key, kind in fields.items():
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise LedgerError(f"{path}: field {key!r} is missing or not a {getattr(kind, '__name__', 'number')}; "
                              f"{_DAMAGED}")
    return data


def _record_digest(info: dict) -> str:
    """SHA-256 of a round.json's fields other than this digest itself."""
    rest = {k: v for k, v in info.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


class Ledger:
    """An edit ledger in directory `path` (created on the first recorded round)."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise LedgerError(f"ledger {self.path} exists and is not a directory")
        if self.path.is_dir() and any(self.path.iterdir()) and not (self.path / "ledger.json").is_file():
            raise LedgerError(f"{self.path} is not empty and holds no ledger.json: choose a new directory for the ledger")
        for partial in (self.path / "rounds").glob(".*.partial"):
            shutil.rmtree(partial)  # an interrupted round: never part of the ledger

    # ------------------------------------------------------------------ reading

    @property
    def header(self) -> Optional[dict]:
        f = self.path / "ledger.json"
        return _read_json(f, _HEADER_FIELDS) if f.is_file() else None

    def round_dirs(self) -> list[Path]:
        rounds = self.path / "rounds"
        return sorted(p for p in rounds.iterdir() if p.is_dir() and p.name.isdigit()) if rounds.is_dir() else []

    def __len__(self) -> int:
        return len(self.round_dirs())

    def rounds(self) -> list[dict]:
        """round.json of every round, in order; the ledger is checked first (`check`)."""
        self.check()
        return [_read_json(d / "round.json", _ROUND_FIELDS) for d in self.round_dirs()]

    def delta(self, index: int) -> EditDelta:
        """Round `index` (1-based)'s delta, as saved (applied)."""
        return EditDelta.load(self.round_dirs()[index - 1] / "delta.safetensors")

    def keys(self, index: int) -> dict[int, torch.Tensor]:
        f = self.round_dirs()[index - 1] / "keys.safetensors"
        return {int(k.split(".")[1]): v for k, v in load_file(str(f)).items()} if f.is_file() else {}

    def head_digests(self) -> dict[str, str]:
        """Per edited weight, its digest after the last round (the base's with no rounds)."""
        digests = dict(self.header["base"])
        for d in self.round_dirs():
            for w in _digests_of(d / "delta.safetensors"):
                digests[w["name"]] = w["sha256_after"]
        return digests

    # ------------------------------------------------------------------ checks

    def problems(self) -> list[str]:
        """What keeps the ledger's files from describing base + rounds (empty: nothing): rounds
        numbered 1..n without a gap, each round.json and delta as written, and each weight's digests
        chaining from the base through every round's before/after. The model is not read."""
        h = self.header
        if h is None:
            return [f"{self.path} holds no ledger (no ledger.json)"]
        previous = dict(h["base"])
        for index, d in enumerate(self.round_dirs(), 1):
            if d.name != f"{index:06d}":
                return [f"ledger {self.path}: round {index:06d} is missing (the next is {d.name}); {_DAMAGED}"]
            try:
                info = _read_json(d / "round.json", _ROUND_FIELDS)
            except LedgerError as err:
                return [str(err)]
            if info["round"] != index:
                return [f"{d / 'round.json'}: field 'round' is {info['round']}, the directory is round {index}; {_DAMAGED}"]
            if "record_sha256" in info and info["record_sha256"] != _record_digest(info):
                return [f"{d / 'round.json'}: changed since the round was recorded (its fields do not match "
                        f"record_sha256); {_DAMAGED}"]
            delta = d / "delta.safetensors"
            if not delta.is_file():
                return [f"{delta}: missing; {_DAMAGED}"]
            if "delta_sha256" in info and info["delta_sha256"] != file_digest(delta):
                return [f"{delta}: changed since the round was recorded (not the file round.json's delta_sha256 "
                        f"names); {_DAMAGED}"]
            try:
                digests = _digests_of(delta)
            except ValueError as err:
                return [str(err).splitlines()[0]]
            for w in digests:
                if previous.get(w["name"]) != w["sha256_before"]:
                    return [f"round {d.name}: {w['name']} was not applied on the previous round's result"]
                previous[w["name"]] = w["sha256_after"]
        return []

    def check(self) -> None:
        """LedgerError (one line) at the first of `problems`; nothing for a ledger not started yet."""
        if self.header is None:
            return
        problems = self.problems()
        if problems:
            raise LedgerError(problems[0])

    def _params(self, model) -> dict[str, torch.nn.Parameter]:
        named = dict(model.named_parameters())
        missing = [n for n in self.header["base"] if n not in named]
        if missing:
            raise LedgerError(f"ledger {self.path}: the model has no weight {missing[0]}; it was made for another model")
        return {n: named[n] for n in self.header["base"]}

    def state_of(self, model) -> str:
        """'base', 'head' (base + every round) or 'other', from the edited weights' digests."""
        current = {n: weight_digest(model, n) for n in self._params(model)}
        if current == self.head_digests():
            return "head"
        return "base" if current == self.header["base"] else "other"

    def check_model(self, model, method: str, hparams) -> None:
        """A one-line error unless this ledger was started with this rule, model and layers."""
        h = self.header
        if h is None:
            return
        if h["method"] != method:
            raise LedgerError(f"ledger {self.path} records rounds of {h['method']!r}, not {method!r}; "
                              f"use --method {h['method']} or a new ledger directory")
        if h["config_hash"] != config_hash(model):
            raise LedgerError(f"ledger {self.path} was made for another model (config hash {h['config_hash']}, "
                              f"this model's is {config_hash(model)})")
        if list(h["layers"]) != list(hparams.layers):
            raise LedgerError(f"ledger {self.path} edits layers {h['layers']}, the hparams give {list(hparams.layers)}")

    # ------------------------------------------------------------------ writing

    def start(self, model, weight_names: Sequence[str], method: str, hparams, templates, model_name: str) -> None:
        """Write ledger.json for a model at its base state (once; a no-op for a started ledger)."""
        if self.header is not None:
            return
        header = {
            "format_version": FORMAT_VERSION,
            "method": method,
            "model_name": model_name,
            "config_hash": config_hash(model),
            "layers": list(hparams.layers),
            "hparams": hparams.to_dict(),
            "context_templates": [list(g) for g in templates],
            "base": {n: weight_digest(model, n) for n in weight_names},
        }
        self.path.mkdir(parents=True, exist_ok=True)
        write_text(self.path / "ledger.json", json.dumps(header, indent=2))

    def append(self, delta: EditDelta, keys: dict[int, torch.Tensor], info: dict) -> Path:
        """Record an applied round, atomically; returns its directory."""
        if not delta.digests():
            raise LedgerError("only an applied delta can be recorded as a round")
        index = len(self) + 1
        rounds = self.path / "rounds"
        rounds.mkdir(parents=True, exist_ok=True)
        final = rounds / f"{index:06d}"
        partial = rounds / f".{index:06d}.partial"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
        delta.save(partial / "delta.safetensors")
        if keys:
            save_file({f"layer.{l}": k.detach().cpu().contiguous() for l, k in keys.items()},
                      str(partial / "keys.safetensors"))
        record = {"round": index, "created": time.time(), **info,
                  "delta_sha256": file_digest(partial / "delta.safetensors")}
        record["record_sha256"] = _record_digest(record)
        (partial / "round.json").write_text(json.dumps(record, indent=2))
        os.replace(partial, final)
        return final

    # ------------------------------------------------------------------ model operations

    def replay(self, model) -> None:
        """Apply every round to a model at the base state; afterwards it is at the head, bit for bit."""
        self.check()
        state = self.state_of(model)
        if state == "head":
            return
        if state != "base":
            raise LedgerError(f"the model is neither the base of ledger {self.path} nor base + its rounds")
        applied: list[EditDelta] = []
        try:
            for d in self.round_dirs():
                saved = EditDelta.load(d / "delta.safetensors")
                fresh = EditDelta(saved.weights, saved.metadata, saved.additions)
                fresh.apply(model)
                applied.append(fresh)
                self._check_digests(model, d, "sha256_after")
        except BaseException:
            for delta in reversed(applied):
                delta.revert(model)
            raise

    def _check_digests(self, model, round_dir: Path, which: str) -> None:
        self._params(model)
        for w in _digests_of(round_dir / "delta.safetensors"):
            if weight_digest(model, w["name"]) != w[which]:
                raise LedgerError(f"round {round_dir.name}: {w['name']} does not match the ledger "
                                  f"({which.removeprefix('sha256_')} the round); recomputing the round's Δ "
                                  "needs the device type and torch build it was made with")

    def revert_last(self, model, k: int, drop: bool = True) -> None:
        """Revert the last `k` rounds on a model at the head, bit for bit; with drop=True the rounds
        are then moved to DIR/reverted/ so the ledger describes the model again."""
        n = len(self)
        if not 1 <= k <= n:
            raise LedgerError(f"--last must be between 1 and the number of rounds ({n}), got {k}")
        self.check()
        if self.state_of(model) != "head":
            raise LedgerError(f"the model is not base + the {n} rounds of ledger {self.path}; "
                              "revert needs the model the ledger's last round produced")
        dirs = self.round_dirs()[n - k:]
        reverted: list[tuple[EditDelta, Path]] = []
        try:
            for d in reversed(dirs):
                delta = EditDelta.load(d / "delta.safetensors")
                delta.revert(model)
                reverted.append((delta, d))
        except BaseException:
            for delta, d in reversed(reverted):
                fresh = EditDelta(delta.weights, delta.metadata, delta.additions)
                fresh.apply(model)
            raise
        if drop:
            self.drop_last(k)

    def drop_last(self, k: int) -> None:
        """Move the last `k` rounds to DIR/reverted/, last round first (a prefix always remains)."""
        trash = self.path / "reverted" / time.strftime("%Y%m%d-%H%M%S")
        trash.mkdir(parents=True, exist_ok=True)
        for d in reversed(self.round_dirs()[len(self) - k:]):
            os.replace(d, trash / d.name)

    def verify(self, model) -> list[str]:
        """Problems found (empty: the model's edited weights are the base plus every round, bit for bit).

        Checks the ledger's files (`problems`: the digest chain base → round 1 → … → last round among
        them), the model's weights against the last round's digests, and then recomputes: every round is reverted exactly (each revert
        checks the weights it restores) down to the base and re-applied, leaving the model as it was.
        """
        problems = self.problems()
        if problems:
            return problems
        state = self.state_of(model)
        if state != "head":
            return [f"the model's edited weights are {'the base, without the rounds' if state == 'base' else 'not base + the rounds'}"
                    f" of ledger {self.path} ({len(self)} rounds)"]
        if len(self):
            try:
                self.revert_last(model, len(self), drop=False)
            except ValueError as err:
                return [str(err).splitlines()[0]]
            self.replay(model)
        return []
