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

from dataclasses import dataclass
from typing import Optional

import torch

from massedit.hparams import MEMITHyperParams, above, at_least, hparam
from massedit.hparams.keys import checked
from massedit.methods.base import register_method
from massedit.methods.memit import Memit
from massedit.compute.stats import stats_file
from massedit.solve.nullspace import NullSpaceSolver, cached_basis


@dataclass
class AlphaEditHyperParams(MEMITHyperParams):
    """MEMIT's keys and AlphaEdit's own, under the key names of its public hparams files, with their values."""

    # eigenvalues of C below it span the null space updates go to
    nullspace_threshold: float = hparam(2e-2, check=above(0, "AlphaEdit projects onto the eigenvectors of C with "
                                                               "eigenvalues below it; its public files use 2e-2"))
    # weight of the identity term in AlphaEdit's solve
    L2: float = hparam(10.0, check=at_least(0, "AlphaEdit's regularizer; its public files use 10"))


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
