"""The Python API: `MassEditor` edits an in-memory model (or one loaded with from_pretrained).

    editor = MassEditor(model, tokenizer, hparams, stats_dir="stats", corpus="corpus.txt")
    result = editor.edit([{"subject": "Michael Jordan", "prompt": "{} plays the sport of",
                           "target_new": "baseball"}])
    result.delta.save("delta.safetensors")
    result.delta.revert(model)
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from massedit import __version__, parallel
from massedit.arch import ModelLayout
from massedit.context import ContextTemplates, generate_templates, validate_templates
from massedit.delta import EditDelta, config_hash
from massedit.hparams import MEMITHyperParams, default_for
from massedit.loading import dtype_kwargs
from massedit.memit import spread_update
from massedit.requests import EditRequest, parse_records, validate_requests
from massedit.rome import rome_layer, rome_update
from massedit.solve import LayerSolver
from massedit.stats import layer_covariances, model_name_of
from massedit.targets import TargetOptimizer, ZSettings, frozen_eval

METHODS = ("memit", "memit-serial", "rome")


def check_method(method: str) -> None:
    """A one-line error for a method that does not exist, or does not run in this many processes."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    world = parallel.world()
    if method != "memit" and world.size > 1:
        raise ValueError(f"method {method!r} edits one request after another and is not sharded over {world.size} "
                         "processes; run it in a single process, or use method 'memit'")


@dataclass
class EditResult:
    delta: EditDelta
    method: str
    n_edits: int
    timings: dict[str, float]
    z_loss: torch.Tensor  # per request, at the iteration that stopped
    z_steps: torch.Tensor
    z: torch.Tensor = field(repr=False, default=None)  # [n, hidden] target vectors
    requests: list[EditRequest] = field(repr=False, default=None)

    def report(self) -> dict:
        return {
            "n_edits": self.n_edits,
            "method": self.method,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "z_loss": {
                "mean": float(self.z_loss.mean()) if len(self.z_loss) else 0.0,
                "max": float(self.z_loss.max()) if len(self.z_loss) else 0.0,
            },
            "z_steps": {"mean": float(self.z_steps.float().mean()) if len(self.z_steps) else 0.0},
            "layers": self.delta.metadata.get("layers"),
        }


class MassEditor:
    """Edits a causal LM with MEMIT. Statistics and Cholesky factors are cached per editor."""

    def __init__(
        self,
        model,
        tokenizer,
        hparams: Optional[MEMITHyperParams] = None,
        *,
        stats_dir: Union[str, Path] = "stats",
        corpus: Union[str, Path, Sequence[str], None] = None,
        model_name: Optional[str] = None,
        context_templates: Optional[ContextTemplates] = None,
        seed: int = 0,
        progress: bool = True,
        reuse_prefix: bool = True,
    ):
        self.model, self.tok = model, tokenizer
        self.hp = hparams if hparams is not None else default_for(model.config)
        self.layout = ModelLayout(model, self.hp.module_overrides())
        self.layout.check_layers(self.hp.layers)
        if self.hp.v_loss_layer is not None:
            self.layout.check_layers([self.hp.v_loss_layer])
        if self.tok.pad_token_id is None and self.tok.eos_token_id is not None:
            self.tok.pad_token = self.tok.eos_token
        self.stats_dir, self.corpus = stats_dir, corpus
        self.model_name = model_name or model_name_of(model)
        # One progress bar per edit, not one per process.
        self.seed, self.progress, self.reuse_prefix = seed, progress and parallel.world().main, reuse_prefix
        self._templates = validate_templates(context_templates) if context_templates is not None else None
        self._solvers: dict[int, Optional[LayerSolver]] = {}

    @classmethod
    def from_pretrained(cls, name_or_path: str, hparams=None, *, device_map=None, torch_dtype="auto", **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name_or_path, device_map=device_map, **dtype_kwargs(torch_dtype))
        tok = AutoTokenizer.from_pretrained(name_or_path)
        kwargs.setdefault("model_name", Path(str(name_or_path).rstrip("/")).name)
        return cls(model, tok, hparams, **kwargs)

    def context_templates(self) -> ContextTemplates:
        if self._templates is None:
            # Sampled on rank 0 and sent to the others: the same seed need not sample the same
            # text on other hardware, and every rank must edit with the same templates.
            with frozen_eval(self.model):
                self._templates = parallel.from_main(
                    lambda: generate_templates(self.model, self.tok, self.hp.context_template_plan(), self.seed))
        return self._templates

    def solvers(self) -> dict[int, Optional[LayerSolver]]:
        """Covariances (cached on disk) and their factors (cached here), from the unedited model.

        Under torch.distributed every rank takes part in computing the statistics, but only rank 0
        solves (massedit.memit), so only rank 0 keeps C; the other ranks' entries are None."""
        missing = [l for l in self.hp.layers if l not in self._solvers]
        if missing:
            with frozen_eval(self.model):
                covs = layer_covariances(self.model, self.layout, self.tok, self.hp, self.stats_dir, self.model_name,
                                         self.corpus, self.progress)
            main = parallel.world().main
            for l in missing:
                self._solvers[l] = LayerSolver(covs[l], self.hp.mom2_update_weight, l) if main else None
        return self._solvers

    def _requests(self, requests) -> list[EditRequest]:
        """EditRequest objects as they are; dicts parsed like a simple requests file."""
        if not all(isinstance(r, EditRequest) for r in requests):
            requests = parse_records([asdict(r) if isinstance(r, EditRequest) else r for r in requests], "requests")
        return validate_requests(requests, self.tok)

    def edit(self, requests, method: str = "memit", batch_size: Optional[int] = None, apply: bool = True) -> EditResult:
        """Edit `requests` (EditRequest objects or dicts) into the model.

        Every stage runs in eval mode without parameter gradients; the model's own mode and
        flags are restored afterwards. With apply=False the model is left unchanged and the
        returned delta can be applied later.

        Under torch.distributed (torchrun, accelerate launch) every rank calls this with the same
        requests: z and keys are computed for each rank's share and gathered (massedit.memit,
        massedit.targets), and every rank returns the same delta and applies it.
        """
        with frozen_eval(self.model):
            return self._edit(requests, method, batch_size, apply)

    def _edit(self, requests, method: str, batch_size: Optional[int], apply: bool) -> EditResult:
        check_method(method)
        rome = method == "rome"
        if rome:
            layer = rome_layer(self.hp)  # exactly one layer, else a clear error before any work
        start = time.perf_counter()
        reqs = self._requests(list(requests))
        timings: dict[str, float] = {}

        t = time.perf_counter()
        solvers = self.solvers() if not rome or self.hp.mom2_adjustment else {}
        timings["covariance"] = time.perf_counter() - t

        t = time.perf_counter()
        templates = self.context_templates()
        timings["context_templates"] = time.perf_counter() - t

        if rome:  # sequential rank-one edits (massedit.rome); z here is ROME's v* per request
            weights, z = rome_update(self.model, self.layout, self.tok, self.hp, reqs, templates, solvers.get(layer),
                                     timings, self.progress)
        else:
            t = time.perf_counter()
            optimizer = TargetOptimizer(self.model, self.layout, self.tok,
                                        ZSettings.from_hparams(self.hp, self.layout), templates,
                                        reuse_prefix=self.reuse_prefix)
            if method == "memit-serial":
                z = optimizer.optimize_serial(reqs, progress=self.progress)
            else:
                # On CUDA, chunks are sized from free memory unless a batch size is given.
                on_gpu = optimizer.device.type == "cuda"
                z = optimizer.optimize(reqs, batch_size or (None if on_gpu else self.hp.batch_size),
                                       progress=self.progress)
            timings["z"] = time.perf_counter() - t

            weights = spread_update(self.model, self.layout, self.tok, reqs, self.hp.layers, z.z, solvers, templates,
                                    timings, self.progress)
        delta = EditDelta(weights, self._metadata(method, len(reqs), templates))
        if apply:
            delta.apply(self.model)
        timings["total"] = time.perf_counter() - start
        return EditResult(delta, method, len(reqs), timings, z.loss, z.steps, z.z, reqs)

    def _metadata(self, method: str, n: int, templates) -> dict:
        return {
            "massedit_version": __version__,
            "method": method,
            "model_name": self.model_name,
            "model_type": self.layout.model_type,
            "config_hash": config_hash(self.model),
            "layers": list(self.hp.layers),
            "n_requests": n,
            "hparams": self.hp.to_dict(),
            "context_templates": templates,
        }
