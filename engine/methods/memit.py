"""MEMIT (DESIGN §2) with batched z ("memit") or the reference's one-request-at-a-time z loop
("memit-serial"), and MEMIT with the earlier rounds' keys preserved ("memit-preserve", §11)."""
from __future__ import annotations

import time
from typing import Optional

import torch

from massedit.solve.spread import spread_update
from massedit.methods.base import EditMethod, register_method
from massedit.compute.targets import TargetOptimizer, ZSettings


@register_method
class Memit(EditMethod):
    name = "memit"
    serial_z = False
    shards_requests = True

    def __init__(self, serial_z: Optional[bool] = None):
        if serial_z is not None:
            self.serial_z = serial_z

    def targets(self, editor, requests, templates, batch_size: Optional[int]):
        optimizer = TargetOptimizer(editor.model, editor.layout, editor.tok, ZSettings.from_hparams(editor.hp, editor.layout),
                                    templates, reuse_prefix=editor.reuse_prefix)
        if self.serial_z:
            return optimizer.optimize_serial(requests, progress=editor.progress)
        # On CUDA, chunks are sized from free memory unless a batch size is given.
        on_gpu = optimizer.device.type == "cuda"
        return optimizer.optimize(requests, batch_size or (None if on_gpu else editor.hp.batch_size),
                                  progress=editor.progress)

    def compute(self, editor, requests, templates, solvers, timings, batch_size):
        t = time.perf_counter()
        z = self.targets(editor, requests, templates, batch_size)
        timings["z"] = time.perf_counter() - t
        weights = spread_update(editor.model, editor.layout, editor.tok, requests, editor.hp.layers, z.z, solvers,
                                templates, timings, editor.progress)
        return weights, z


@register_method
class MemitSerial(Memit):
    name = "memit-serial"
    serial_z = True
    shards_requests = False


@register_method
class MemitPreserve(Memit):
    """Solves λC + K_p K_pᵀ + K Kᵀ: the earlier rounds' keys K_p are held like the corpus's (the
    AlphaEdit code's MEMIT_seq with its `cache_c`). With no earlier rounds this is MEMIT."""

    name = "memit-preserve"
    preserves_keys = True
    shards_requests = False

    def layer_solvers(self, editor, preserved=None):
        if not preserved:
            return editor.solvers()
        # A solver factors λ·C, so K_p K_pᵀ enters as C + K_p K_pᵀ / λ.
        lam = editor.hp.mom2_update_weight
        return {l: editor.make_solver(l, c + preserved[l].to(c.device, torch.float64) / lam)
                for l, c in editor.covariances().items()}
