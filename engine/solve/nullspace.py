"""The null-space projector and solve of AlphaEdit (DESIGN §11; massedit.methods.alphaedit says what
its public code computes): P = Û Ûᵀ from the eigenvectors of C below a threshold, cached beside the
statistics file it came from (tagged with that file's SHA-256, so a projector whose statistics
changed is recomputed, never used), and X = (P (K Kᵀ + K_p K_pᵀ) + L2·I)⁻¹ P K per layer."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from massedit.edits.delta import file_digest
from massedit.files import written

_HEADER_KEY = "massedit.nullspace"


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
    with written(path) as tmp:
        save_file({"basis": basis.cpu().contiguous()}, str(tmp),
                  metadata={_HEADER_KEY: digest, "threshold": repr(float(threshold)), "dim": str(cov.shape[0])})
    return basis
