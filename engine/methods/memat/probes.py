"""Logistic-regression probes, many at once (MEMAT's head classifiers, DESIGN §4 step 3).

Each probe p fits weights w_p and an intercept b_p to features x [n, d] and labels y ∈ {0, 1} by
minimizing scikit-learn's `LogisticRegression(C=c)` objective (L2 penalty, lbfgs' problem):

    Σ_i [log(1 + exp(z_i)) − y_i z_i] + ‖w‖² / (2c),    z_i = x_i·w + b   (b is not penalized).

The objective is strictly convex, so every solver that converges finds the same optimum. All
probes are solved together by Newton's method on [P, d + 1] in float64: one batched gradient,
one batched Hessian and one batched Cholesky solve per iteration, with a per-probe backtracking
step so that no probe's loss goes up. Probes are taken in chunks so that the float64 features
and Hessians stay within a memory budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_CHUNK_BYTES = 256 << 20


@dataclass
class Probes:
    weight: torch.Tensor  # [P, d] float64
    bias: torch.Tensor  # [P] float64
    iterations: int  # Newton iterations of the slowest chunk

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """z [P, n] for features x [P, n, d]."""
        x = x.to(self.weight.device, torch.float64)
        return torch.einsum("pnd,pd->pn", x, self.weight) + self.bias[:, None]

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Fraction of x [P, n, d] classified as y [n] (z > 0 means label 1), per probe [P]."""
        predicted = self.logits(x) > 0
        return (predicted == y.to(predicted.device).bool()[None, :]).double().mean(dim=1)


def _objective(x1: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    z = torch.einsum("pnd,pd->pn", x1, theta)
    return (F.softplus(z) - y * z).sum(dim=1) + 0.5 * (penalty * theta * theta).sum(dim=1)


def _fit_chunk(x: torch.Tensor, y: torch.Tensor, c: float, max_iter: int, tol: float) -> tuple[torch.Tensor, int]:
    p, n, d = x.shape
    x1 = torch.cat([x, torch.ones(p, n, 1, dtype=x.dtype, device=x.device)], dim=2)
    penalty = torch.full((d + 1,), 1.0 / c, dtype=x.dtype, device=x.device)
    penalty[-1] = 0.0
    theta = torch.zeros(p, d + 1, dtype=x.dtype, device=x.device)
    loss = _objective(x1, y, theta, penalty)
    for it in range(1, max_iter + 1):
        z = torch.einsum("pnd,pd->pn", x1, theta)
        s = torch.sigmoid(z)
        grad = torch.einsum("pnd,pn->pd", x1, s - y) + penalty * theta
        if float(grad.abs().max()) < tol:
            return theta, it - 1
        hess = torch.einsum("pnd,pn,pne->pde", x1, s * (1 - s), x1) + torch.diag(penalty)
        # The intercept's direction has no penalty; a tiny ridge keeps a fully saturated probe factorable.
        hess = hess + 1e-12 * torch.eye(d + 1, dtype=x.dtype, device=x.device)
        step = torch.cholesky_solve(grad[:, :, None], torch.linalg.cholesky(hess))[:, :, 0]
        t = torch.ones(p, dtype=x.dtype, device=x.device)
        for _ in range(30):
            candidate = _objective(x1, y, theta - t[:, None] * step, penalty)
            # Only a real increase shortens a step: near the optimum the decrease is below the loss's
            # rounding, and a sufficient-decrease test would stall a probe that has converged.
            worse = candidate > loss + 1e-12 * loss.abs()
            if not bool(worse.any()):
                break
            t = torch.where(worse, t / 2, t)
        theta = theta - t[:, None] * step
        loss = _objective(x1, y, theta, penalty)
    return theta, max_iter


def fit_logistic(x: torch.Tensor, y: torch.Tensor, c: float = 1.0, max_iter: int = 100, tol: float = 1e-9) -> Probes:
    """One L2-regularized logistic regression per probe: x [P, n, d] (each probe its own features),
    y [n] labels in {0, 1} shared by all probes. Runs on x's device, in float64."""
    if x.dim() != 3 or y.shape != x.shape[1:2]:
        raise ValueError(f"need features [P, n, d] and labels [n], got {tuple(x.shape)} and {tuple(y.shape)}")
    if c <= 0:
        raise ValueError(f"the inverse regularization strength c must be > 0, got {c}")
    p, n, d = x.shape
    y = y.to(x.device, torch.float64)
    per_probe = 8 * (n * (d + 1) * 3 + (d + 1) ** 2 * 2)
    chunk = max(1, _CHUNK_BYTES // per_probe)
    thetas, iterations = [], 0
    for start in range(0, p, chunk):
        theta, it = _fit_chunk(x[start : start + chunk].to(torch.float64), y, c, max_iter, tol)
        thetas.append(theta)
        iterations = max(iterations, it)
    theta = torch.cat(thetas)
    return Probes(theta[:, :d].contiguous(), theta[:, d].contiguous(), iterations)
