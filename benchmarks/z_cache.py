"""Targets (z) kept on disk between benchmark runs, so that a change which leaves z alone — λ, the
statistics, the layers below the z layer — is measured at n = 1,000 on a real model without another
z phase of an hour or more.

A file holds the z of a run's requests in order, with what they depend on: the model, every
hyperparameter that reaches the z optimization (all of them except the ones listed in
`NOT_IN_Z`, so a field added later counts as reaching it), the context templates, and one
fingerprint per request. A later run reuses them when every one of its requests' fingerprints is
stored (any subset, in any order: a request's z does not depend on the others edited with it);
anything else is a miss, never a wrong z. The edit's metadata (model config hash, hparams, context
templates) is stored too, so that `stored_result` hands the z to `Memit(targets=)`, which checks it
against the editor once more.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch
from massedit.compute.targets import z_hparams
from massedit.files import written


def key(model: str, hparams: dict, templates) -> dict:
    """What z depends on (targets.z_hparams: MEMIT's keys, so a method's own, MEMAT's memat_*, do not count)."""
    z_settings = z_hparams(hparams)
    return {"model": model, "z_layer": z_settings.pop("z_layer"), "templates": templates, "hparams": z_settings}


def fingerprints(requests) -> list[str]:
    """One short hash per request of what its z depends on: prompt, subject and new target."""
    return [hashlib.sha256(json.dumps([r.prompt, r.subject, r.target_new], sort_keys=True).encode()).hexdigest()[:16]
            for r in requests]


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def _prefix(k: dict) -> str:
    return f"z-{k['model']}-L{k['z_layer']}-{_digest(k)}-"


def _files(directory, k: dict) -> list[Path]:
    return sorted(Path(directory).glob(f"{_prefix(k)}*.pt"))


def load(directory, k: dict, requests) -> Optional[dict]:
    """The stored z, z loss and z steps of `requests` (in their order) from a file of `k` that holds
    every one of them, or None."""
    want = fingerprints(requests)
    for path in _files(directory, k):
        data = torch.load(path, map_location="cpu", weights_only=True)
        row = {fp: i for i, fp in enumerate(data["fingerprints"])}
        if data["key"] == json.dumps(k, sort_keys=True) and all(fp in row for fp in want):
            take = torch.tensor([row[fp] for fp in want], dtype=torch.long)
            return {"z": data["z"][take], "z_loss": data["z_loss"][take], "z_steps": data["z_steps"][take],
                    "z_seconds": data["z_seconds"], "stored": len(data["fingerprints"]), "path": str(path),
                    "metadata": json.loads(data.get("metadata", "null"))}
    return None


def stored_result(directory, k: dict, editor, requests):
    """An EditResult holding the stored z of `requests` for `Memit(targets=)` (its delta carries no
    weights, only the metadata of the edit the z came from), and the `load` dict; None where no file
    of `k` holds them all with that metadata."""
    from massedit.edits.delta import EditDelta
    from massedit.editor import EditResult

    stored = load(directory, k, requests)
    if stored is None or stored["metadata"] is None:
        return None
    result = EditResult(delta=EditDelta([], stored["metadata"]), method="memit", n_edits=len(requests),
                        timings={}, z_loss=stored["z_loss"], z_steps=stored["z_steps"], z=stored["z"],
                        requests=editor.validate(requests))
    return result, stored


def save(directory, k: dict, requests, z, z_loss, z_steps, z_seconds: float,
         metadata: Optional[dict] = None) -> Path:
    """A new file per set of requests (other facts never overwrite stored z), written whole or not at
    all: beside, then renamed. `metadata`: the edit's (EditDelta.metadata), for `stored_result`."""
    fps = fingerprints(requests)
    path = Path(directory) / f"{_prefix(k)}{_digest(fps)}.pt"
    with written(path) as tmp:
        torch.save({"key": json.dumps(k, sort_keys=True), "fingerprints": fps, "z": z.detach().cpu(),
                    "z_loss": z_loss.detach().cpu(), "z_steps": z_steps.detach().cpu(),
                    "z_seconds": float(z_seconds), "metadata": json.dumps(metadata, sort_keys=True)}, tmp)
    return path
