"""ROME (DESIGN §3): sequential rank-one edits of one layer (massedit.methods.rome.update)."""
from __future__ import annotations

from massedit.methods.base import EditMethod, register_method
from massedit.methods.rome.update import rome_layer, rome_update


@register_method
class Rome(EditMethod):
    name = "rome"
    hparams_family = "rome"

    def check(self, hp) -> None:
        rome_layer(hp)  # exactly one layer, else a clear error before any work

    def layer_solvers(self, editor, preserved=None):
        return editor.solvers() if editor.hp.mom2_adjustment else {}

    def compute(self, editor, requests, templates, solvers, timings, batch_size):
        # z here is ROME's v* per request; rome_update times its own phases.
        return rome_update(editor.model, editor.layout, editor.tok, editor.hp, requests, templates,
                           solvers.get(rome_layer(editor.hp)), timings, editor.progress)
