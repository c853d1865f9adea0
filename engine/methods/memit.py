"""MEMIT (DESIGN §2) with batched z ("memit") or the reference's one-request-at-a-time z loop
("memit-serial"), and MEMIT with the earlier rounds' keys preserved ("memit-preserve", §11)."""
from __future__ import annotations

import time
from typing import Optional

import torch

from massedit.solve.spread import spread_update
from massedit.methods.base import EditMethod, register_method
from massedit.compute.keys import subject_hidden
from massedit.compute.targets import TargetOptimizer, ZResult, ZSettings, z_hparams
from massedit.edits.delta import config_hash
from massedit.inputs.requests import RequestError
from massedit.inputs.tokens import encode_prompt, pad, pad_id_of
from massedit.model.devices import input_device
from massedit.model.hooks import capture_outputs, edit_output, run_until


@torch.no_grad()
def residual_targets(editor, requests, found: ZResult, batch_size: int = 256) -> torch.Tensor:
    """MEMIT's targets on the residual stream for δ found at the rewrite module's output (z_site
    "mlp"): block L's output at each rewrite prompt's subject's last token with that module's output
    moved by δ there, so what spreading asks of layer L is what δ did, reachable through a norm after
    the MLP (measured on Gemma-3-270M with δ on the residual: the update realised 36% of it).
    Not `collect_at_subject`: it computes identical prompt cuts once, and two requests with the same
    prompt and subject carry different δ."""
    layout, top = editor.layout, max(editor.hp.layers)
    rows = [e.ids[: e.subject_index + 1] for e in (encode_prompt(editor.tok, r.prompt, r.subject) for r in requests)]
    delta = found.z - found.h
    out = torch.empty_like(found.z)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        batch = pad(chunk, pad_id_of(editor.tok), "right", input_device(editor.model))
        take, cols = torch.arange(len(chunk)), torch.tensor([len(r) - 1 for r in chunk])
        moved = delta[start: start + len(chunk)]

        def add(u: torch.Tensor) -> torch.Tensor:
            shaped = u.reshape(len(chunk), batch.input_ids.shape[1], -1).clone()  # OPT feeds its MLP [batch·seq, d]
            shaped[take.to(u.device), cols.to(u.device)] += moved.to(u.device, u.dtype)
            return shaped.reshape(u.shape)

        store: dict = {}
        with edit_output(layout.rewrite_module(top), add), capture_outputs({"h": layout.block(top)}, store):
            run_until(editor.model, layout.block(top), **batch.model_inputs())
        h = store["h"]
        out[start: start + len(chunk)] = h[take.to(h.device), cols.to(h.device)].to(out)
    return out


@register_method
class Memit(EditMethod):
    name = "memit"
    serial_z = False
    shards_requests = True

    def __init__(self, serial_z: Optional[bool] = None, targets=None):
        """targets: an EditResult of an earlier edit of the same requests with the same z settings on
        the same unedited model (e.g. a MEMIT run to compare against); its z is used instead of
        optimizing again (z depends on none of λ, statistics or what a method adds after MEMIT)."""
        if serial_z is not None:
            self.serial_z = serial_z
        if targets is not None and (getattr(targets, "z", None) is None or getattr(targets, "delta", None) is None):
            raise TypeError(f"targets= takes the EditResult of an earlier edit (MassEditor.edit's return value), "
                            f"got {type(targets).__name__}")
        self.given = targets

    def check_requests(self, requests, editor=None) -> None:
        if self.given is None or editor is None:
            return
        # Before statistics: targets of another edit would give a wrong ΔW with no sign of it.
        given, meta = self.given, self.given.delta.metadata
        mine = {"requests": list(requests), "model config": config_hash(editor.model),
                "z settings": z_hparams(editor.hp.to_dict()), "context templates": list(editor.context_templates())}
        theirs = {"requests": list(given.requests or []), "model config": meta.get("config_hash"),
                  "z settings": z_hparams(meta["hparams"]), "context templates": list(meta.get("context_templates") or [])}
        differ = [k for k in mine if mine[k] != theirs[k]]
        if differ:
            raise RequestError(f"targets= come from another edit ({', '.join(differ)} differ): pass the EditResult "
                               "of these requests on this model, or targets=None to optimize z")

    def _given_targets(self, editor, requests) -> ZResult:
        given = self.given
        h = subject_hidden(editor.model, editor.layout, editor.tok, requests, max(editor.hp.layers))
        return ZResult(given.z.to(h), h, given.z_loss, given.z_steps)

    def targets(self, editor, requests, templates, batch_size: Optional[int]):
        optimizer = TargetOptimizer(editor.model, editor.layout, editor.tok, ZSettings.from_hparams(editor.hp, editor.layout),
                                    templates, reuse_prefix=editor.reuse_prefix, site=editor.hp.z_site)
        if self.serial_z:
            return optimizer.optimize_serial(requests, progress=editor.progress)
        # Chunks are sized from free memory unless a batch size is given; on CPU also at most
        # hp.batch_size requests, past which a larger chunk is no faster.
        on_gpu = optimizer.device.type == "cuda"
        return optimizer.optimize(requests, batch_size, progress=editor.progress,
                                  max_chunk=None if on_gpu else editor.hp.batch_size)

    def compute(self, editor, requests, templates, solvers, timings, batch_size):
        t = time.perf_counter()
        if self.given is not None:
            z = self._given_targets(editor, requests)
        else:
            z = self.targets(editor, requests, templates, batch_size)
        if self.given is None and editor.hp.z_site == "mlp":
            # h as ZResult has it for the residual site (block L's output), so z − h stays the move asked of it.
            h = subject_hidden(editor.model, editor.layout, editor.tok, requests, max(editor.hp.layers))
            z = ZResult(residual_targets(editor, requests, z), h.to(z.h), z.loss, z.steps)
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
