"""AlphaEdit (arXiv 2410.02355, ICLR 2025; DESIGN §11): MEMIT's update projected onto the null
space of the knowledge to preserve.

What its public code (jianghoucheng/AlphaEdit: AlphaEdit_main.py, experiments/evaluate.py
`get_project`) computes, and this module reproduces:
- P = Û Ûᵀ per edited layer, Û the singular vectors of C, the unedited model's uncentered second
  moment E[k kᵀ] (the statistics file's sum divided by its count), whose singular values are below
  `nullspace_threshold` (2e-2 in all its hparams files). C is symmetric positive semi-definite, so
  its singular vectors are its eigenvectors: `eigh` in float64 here.
- Per layer, with K [d, n] the round's keys (read on the model edited by the round's earlier
  layers), R the residual spread over the layers left, and K_p K_pᵀ the sum of the earlier rounds'
  keys' outer products (read on the model after each round):
      Δᵀ = solve(P (K Kᵀ + K_p K_pᵀ) + L2·I, P K Rᵀ)
  with no λC term (P already removes C's range) and L2 = 10 in all its hparams files. Both settings
  are hparams keys under the public files' names ("nullspace_threshold", "L2"), so those files load
  as they are; `AlphaEdit(nullspace_threshold=..., l2=...)` overrides them.
Here X = (P (K Kᵀ + K_p K_pᵀ) + L2·I)⁻¹ P K [d, n] is solved in float64 and Δ = R Xᵀ is kept as
its two factors, like every delta. Its code optimizes z one request at a time; here z is batched
(method "memit"'s optimizer), or serial with `AlphaEdit(serial_z=True)` for comparisons.

P depends only on the statistics, so it is computed once per layer and cached beside the
statistics file (`<statistics file>.nullspace-<threshold>.safetensors`), tagged with the SHA-256 of
the statistics file it came from: a projector whose statistics changed is recomputed, never used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from massedit.hparams import MEMITHyperParams, above, at_least, hparam
from massedit.hparams.keys import checked
from massedit.methods.base import register_method
from massedit.methods.memit import Memit
from massedit.compute.stats import stats_file
from massedit.edits.delta import file_digest

_HEADER_KEY = "massedit.nullspace"


@dataclass
class AlphaEditHyperParams(MEMITHyperParams):
    """MEMIT's keys and AlphaEdit's own, under the key names of its public hparams files, with their values."""

    # eigenvalues of C below it span the null space updates go to
    nullspace_threshold: float = hparam(2e-2, check=above(0, "AlphaEdit projects onto the eigenvectors of C with "
                                                               "eigenvalues below it; its public files use 2e-2"))
    # weight of the identity term in AlphaEdit's solve
    L2: float = hparam(10.0, check=at_least(0, "AlphaEdit's regularizer; its public files use 10"))


def null_space_basis(cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """Û [d, r]: the eigenvectors of the symmetric PSD `cov` whose eigenvalues are below `threshold`."""
    values, vectors = torch.linalg.eigh(cov.to(torch.float64))
    return vectors[:, values < threshold].contiguous()


def null_space_solve(projector: torch.Tensor, preserved: Optional[torch.Tensor], keys: torch.Tensor,
                     l2: float) -> torch.Tensor:
    """X = (P (K Kᵀ + K_p K_pᵀ) + l2·I)⁻¹ P K for keys K [d, n], in float64 on P's device."""
    p = projector.to(torch.float64)
    k = keys.to(p.device, torch.float64)
    gram = k @ k.T
    if preserved is not None:
        gram = gram + preserved.to(p.device, torch.float64)
    a = p @ gram + l2 * torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    return torch.linalg.solve(a, p @ k)


class NullSpaceSolver:
    """One layer's AlphaEdit solve, with the projector and the earlier rounds' K_p K_pᵀ fixed."""

    def __init__(self, projector: torch.Tensor, preserved: Optional[torch.Tensor], l2: float):
        self.projector, self.preserved, self.l2 = projector, preserved, float(l2)

    @property
    def device(self) -> torch.device:
        return self.projector.device

    def solve(self, keys: torch.Tensor) -> torch.Tensor:
        if keys.shape[0] != self.projector.shape[0]:
            raise ValueError(f"keys are {keys.shape[0]} wide but the projector is {self.projector.shape[0]} wide")
        return null_space_solve(self.projector, self.preserved, keys, self.l2)


def projector_file(stats_path: Path, threshold: float) -> Path:
    return stats_path.with_name(f"{stats_path.name}.nullspace-{threshold:g}.safetensors")


def cached_basis(stats_path: Optional[Path], cov: torch.Tensor, threshold: float) -> torch.Tensor:
    """Û for `cov`, read from beside `stats_path` when it was computed from that very file, else
    computed (and written there, atomically)."""
    if stats_path is None or not stats_path.exists():
        return null_space_basis(cov, threshold)
    digest = file_digest(stats_path)
    path = projector_file(stats_path, threshold)
    if path.exists():
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if (meta.get(_HEADER_KEY) == digest and meta.get("threshold") == repr(float(threshold))
                    and meta.get("dim") == str(cov.shape[0])):
                return f.get_tensor("basis").to(cov.device)
    basis = null_space_basis(cov, threshold)
    tmp = path.with_name(path.name + ".tmp")
    save_file({"basis": basis.cpu().contiguous()}, str(tmp),
              metadata={_HEADER_KEY: digest, "threshold": repr(float(threshold)), "dim": str(cov.shape[0])})
    os.replace(tmp, path)
    return basis


@register_method
class AlphaEdit(Memit):
    name = "alphaedit"
    hparams_class = AlphaEditHyperParams
    preserves_keys = True
    shards_requests = False

    def __init__(self, serial_z: Optional[bool] = None, nullspace_threshold: Optional[float] = None,
                 l2: Optional[float] = None):
        """nullspace_threshold and l2 default to the editor's hparams (keys "nullspace_threshold" and
        "L2", as in AlphaEdit's own hparams files)."""
        super().__init__(serial_z)
        given = {k: v for k, v in (("nullspace_threshold", nullspace_threshold), ("L2", l2)) if v is not None}
        given = checked(AlphaEditHyperParams, given, "AlphaEdit()")
        self.threshold, self.l2 = given.get("nullspace_threshold"), given.get("L2")
        self._projectors: dict[tuple[int, float], torch.Tensor] = {}
        self._editor = None

    def settings(self, editor) -> tuple[float, float]:
        """(nullspace_threshold, L2) this method uses with `editor`."""
        hp = self.hparams(editor)
        return (hp.nullspace_threshold if self.threshold is None else self.threshold,
                hp.L2 if self.l2 is None else self.l2)

    def projectors(self, editor) -> dict[int, torch.Tensor]:
        """P per edited layer, on the layer's covariance device (computed once per editor, layer and
        threshold)."""
        if self._editor is not editor:
            self._projectors, self._editor = {}, editor
        threshold = self.settings(editor)[0]
        missing = [l for l in editor.hp.layers if (l, threshold) not in self._projectors]
        covs = editor.covariances() if missing else {}
        for layer in missing:
            path = stats_file(editor.stats_dir, editor.model_name, editor.hp.mom2_dataset,
                              editor.layout.rewrite_name(layer), editor.hp.mom2_dtype, editor.hp.mom2_n_samples)
            basis = cached_basis(path, covs[layer], threshold)
            self._projectors[layer, threshold] = basis @ basis.T
        return {l: self._projectors[l, threshold] for l in editor.hp.layers}

    def layer_solvers(self, editor, preserved=None):
        preserved = preserved or {}
        l2 = self.settings(editor)[1]
        return {l: NullSpaceSolver(p, preserved.get(l), l2) for l, p in self.projectors(editor).items()}
