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

from massedit import __version__
from massedit.arch import ModelLayout
from massedit.context import ContextTemplates, generate_templates, validate_templates
from massedit.delta import EditDelta, config_hash
from massedit.hparams import MEMITHyperParams, default_for
from massedit.loading import dtype_kwargs
from massedit.requests import EditRequest, parse_records, validate_requests
from massedit.solve import LayerSolver
from massedit.stats import layer_covariances, model_name_of
from massedit.methods import METHODS, EditMethod, get_method  # noqa: F401 - METHODS: massedit.editor.METHODS
from massedit.targets import frozen_eval


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
        self.seed, self.progress, self.reuse_prefix = seed, progress, reuse_prefix
        self._templates = validate_templates(context_templates) if context_templates is not None else None
        self._solvers: dict[int, LayerSolver] = {}

    @classmethod
    def from_pretrained(cls, name_or_path: str, hparams=None, *, device_map=None, torch_dtype="auto", **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(name_or_path, device_map=device_map, **dtype_kwargs(torch_dtype))
        tok = AutoTokenizer.from_pretrained(name_or_path)
        kwargs.setdefault("model_name", Path(str(name_or_path).rstrip("/")).name)
        return cls(model, tok, hparams, **kwargs)

    def context_templates(self) -> ContextTemplates:
        if self._templates is None:
            with frozen_eval(self.model):
                self._templates = generate_templates(self.model, self.tok, self.hp.context_template_plan(), self.seed)
        return self._templates

    def solvers(self) -> dict[int, LayerSolver]:
        """Covariances (cached on disk) and their factors (cached here), from the unedited model."""
        missing = [l for l in self.hp.layers if l not in self._solvers]
        if missing:
            with frozen_eval(self.model):
                covs = layer_covariances(self.model, self.layout, self.tok, self.hp, self.stats_dir, self.model_name,
                                         self.corpus, self.progress)
            for l in missing:
                self._solvers[l] = LayerSolver(covs[l], self.hp.mom2_update_weight, l)
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
        """
        with frozen_eval(self.model):
            return self._edit(requests, method, batch_size, apply)

    def _edit(self, requests, method: Union[str, EditMethod], batch_size: Optional[int], apply: bool,
              preserved: Optional[dict[int, torch.Tensor]] = None) -> EditResult:
        """`preserved`: per layer, the earlier rounds' K_p K_pᵀ, for methods that keep them (massedit.sequential)."""
        impl = get_method(method)
        impl.check(self.hp)
        start = time.perf_counter()
        reqs = self._requests(list(requests))
        timings: dict[str, float] = {}

        t = time.perf_counter()
        solvers = impl.layer_solvers(self, preserved)
        timings["covariance"] = time.perf_counter() - t

        t = time.perf_counter()
        templates = self.context_templates()
        timings["context_templates"] = time.perf_counter() - t

        weights, z = impl.compute(self, reqs, templates, solvers, timings, batch_size)
        for phase in ("z", "keys", "solve"):  # every report has them, whichever phases a method has
            timings.setdefault(phase, 0.0)
        delta = EditDelta(weights, self._metadata(impl.name, len(reqs), templates))
        if apply:
            delta.apply(self.model)
        timings["total"] = time.perf_counter() - start
        return EditResult(delta, impl.name, len(reqs), timings, z.loss, z.steps, z.z, reqs)

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
