"""Layer solves (DESIGN §2.6, §10.4): X = (λC + K Kᵀ)⁻¹ K through one Cholesky factor per layer.

λC does not depend on the batch, so each layer keeps only the factor L of λC = L Lᵀ, built over
one d×d buffer; C itself is not kept. With M = L⁻¹K,

    (λC + K Kᵀ)⁻¹ K = L⁻ᵀ M (I + MᵀM)⁻¹ = L⁻ᵀ (I + M Mᵀ)⁻¹ M,

the first form (Woodbury: an n×n system) for n < d, the second for n ≥ d. Both Gram matrices have
every eigenvalue ≥ 1, so they factor without a ridge whatever the keys. For n ≥ d this costs about
1.5× the flops of factoring λC + KKᵀ directly (measured on CPU, d = 3072, n = 4096: 24 s against
15 s), the price of never rebuilding λC; MEMIT's batches are almost always narrower than d_ff.

Where the factor is kept is a choice (`device`): a 70B model's five edited layers hold
5 × 6.6 GB of float64 factors that the GPUs of the early layers cannot spare, so the editor keeps
them in host memory by default. The O(d²n) triangular solves still run on the layer's device
(`compute_device`): the factor is streamed there in row panels of at most `panel_bytes`, and
only the d×n and n×n products live there.
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch

SOLVE_DTYPES = {"float64": torch.float64, "float32": torch.float32}
PANEL_BYTES = 256 * 2**20

Device = Union[str, torch.device]


def _cholesky_inplace(a: torch.Tensor) -> bool:
    """Overwrites `a` with its lower Cholesky factor; False (and `a` garbage) if not definite."""
    info = torch.empty((), dtype=torch.int32, device=a.device)
    torch.linalg.cholesky_ex(a, out=(a, info))
    return int(info) == 0


def _scaled_factor(cov: torch.Tensor, count: int, scale: float, dtype: torch.dtype, device: torch.device,
                   what: str) -> torch.Tensor:
    """Lower Cholesky factor of scale·cov/count, in `dtype` on `device`, in a single d×d buffer.

    Keys that never fire leave C singular; a ridge of 1e-10·mean(diag), raised ×100 up to six
    times, restores definiteness while changing the solution far below float32 resolution. A
    failed attempt leaves its buffer unusable, so each attempt rebuilds it from `cov`."""
    ridge = 0.0
    for attempt in range(7):
        a = cov.to(device=device, dtype=dtype, copy=True).div_(count).mul_(scale)
        if attempt == 0:
            base = 1e-10 * float(a.diagonal().abs().mean().clamp(min=1e-30))
        else:
            ridge = base * 100 ** (attempt - 1)
            a.diagonal().add_(ridge)
        if _cholesky_inplace(a):
            if ridge:
                warnings.warn(f"{what} was not positive definite; added a ridge of {ridge:.3g} to factor it")
            return a
        del a
    raise ValueError(
        f"{what} is not positive definite even with a ridge: the covariance statistics are degenerate "
        "(too few corpus tokens?); recompute them with more samples (mom2_n_samples)"
    )


class LayerSolver:
    """Solves for one layer from the Cholesky factor of λC, C = cov / count.

    `cov` may be the raw statistics sum Σkkᵀ (with its token `count`) in any dtype on any device;
    it is read once and not kept. `dtype` is the factor's and the solves' precision, `device`
    where the factor is kept, `compute_device` where the solves run (default: `cov`'s device for
    both)."""

    def __init__(self, cov: torch.Tensor, lam: float, layer: Optional[int] = None, *, count: int = 1,
                 dtype: torch.dtype = torch.float64, device: Optional[Device] = None,
                 compute_device: Optional[Device] = None, panel_bytes: int = PANEL_BYTES):
        if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
            raise ValueError(f"covariance must be square, got {tuple(cov.shape)}")
        if dtype not in SOLVE_DTYPES.values():
            raise ValueError(f"solve dtype must be float64 or float32, got {dtype}")
        self.lam, self.dtype = float(lam), dtype
        self.name = f"λC of layer {layer}" if layer is not None else "λC"
        self.compute_device = torch.device(compute_device) if compute_device is not None else cov.device
        store = torch.device(device) if device is not None else self.compute_device
        # Factored where the solves run (a GPU is ~50× faster at it), then moved to where it is kept.
        factor = _scaled_factor(cov, count, self.lam, dtype, self.compute_device, self.name)
        self.factor = factor.to(store)
        self.panel_rows = max(1, panel_bytes // (self.dim * self.factor.element_size()))

    @property
    def device(self) -> torch.device:
        """Where this solver keeps its state (the factor); results it hands back live there too."""
        return self.factor.device

    @property
    def dim(self) -> int:
        return self.factor.shape[0]

    def _panels(self) -> list[tuple[int, int]]:
        return [(i0, min(self.dim, i0 + self.panel_rows)) for i0 in range(0, self.dim, self.panel_rows)]

    def _panel(self, i0: int, i1: int) -> torch.Tensor:
        """L[i0:i1, :i1] on the compute device (a view when the factor is kept there)."""
        return self.factor[i0:i1, :i1].to(self.compute_device)

    def _forward(self, b: torch.Tensor) -> torch.Tensor:
        """L⁻¹ b, overwriting b (left-looking blocked substitution)."""
        for i0, i1 in self._panels():
            panel = self._panel(i0, i1)
            rhs = b[i0:i1] - panel[:, :i0] @ b[:i0] if i0 else b[i0:i1]
            b[i0:i1] = torch.linalg.solve_triangular(panel[:, i0:i1], rhs, upper=False)
        return b

    def _backward(self, b: torch.Tensor) -> torch.Tensor:
        """L⁻ᵀ b, overwriting b (right-looking blocked substitution, bottom panel first)."""
        for i0, i1 in reversed(self._panels()):
            panel = self._panel(i0, i1)
            b[i0:i1] = torch.linalg.solve_triangular(panel[:, i0:i1].mT, b[i0:i1], upper=True)
            if i0:
                b[:i0] -= panel[:, :i0].mT @ b[i0:i1]
        return b

    def _keys(self, keys: torch.Tensor) -> torch.Tensor:
        if keys.ndim != 2 or keys.shape[0] != self.dim:
            raise ValueError(f"keys are {tuple(keys.shape)} but the covariance is {self.dim} wide")
        # A fresh row-major copy: the solves overwrite it panel by panel, and the callers' keys are
        # often a transposed view.
        return torch.empty(keys.shape, dtype=self.dtype, device=self.compute_device).copy_(keys)

    def cov_solve(self, keys: torch.Tensor) -> torch.Tensor:
        """(λC)⁻¹ K for K = keys [d, n], in float64 on the compute device."""
        return self._backward(self._forward(self._keys(keys))).double()

    def solve(self, keys: torch.Tensor) -> torch.Tensor:
        """(λC + K Kᵀ)⁻¹ K for K = keys [d, n], in float64 on the compute device."""
        m = self._forward(self._keys(keys))  # M = L⁻¹K
        d, n = m.shape
        if n < d:
            gram = torch.addmm(torch.eye(n, dtype=m.dtype, device=m.device), m.T, m)
            mid = torch.cholesky_solve(m.T, self._gram_factor(gram)).T.contiguous()
        else:
            gram = torch.addmm(torch.eye(d, dtype=m.dtype, device=m.device), m, m.T)
            mid = torch.cholesky_solve(m, self._gram_factor(gram))
        del m, gram
        return self._backward(mid).double()

    def _gram_factor(self, gram: torch.Tensor) -> torch.Tensor:
        # Cholesky reads only the lower triangle, so rounding asymmetry needs no symmetrization.
        if not _cholesky_inplace(gram):
            raise ValueError(f"the keys given to the solve for {self.name} are not finite; check the model's "
                             "activations (NaN or inf) before editing")
        return gram
