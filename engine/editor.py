"""The Python API: `MassEditor` edits an in-memory model (or one loaded with from_pretrained).

    editor = MassEditor(model, tokenizer, hparams, stats_dir="stats", corpus="corpus.txt")
    result = editor.edit([{"subject": "Michael Jordan", "prompt": "{} plays the sport of",
                           "target_new": "baseball"}])
    result.delta.save("delta.safetensors")
    result.delta.revert(model)
"""
from __future__ import annotations

import numbers
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from massedit import __version__

from massedit.model import parallel
from massedit.model.arch import ModelLayout
from massedit.inputs.templates import ContextTemplates, generate_templates, validate_templates
from massedit.edits.delta import EditDelta, config_hash
from massedit.hparams import MEMITHyperParams, default_for
from massedit.model.devices import execution_device
from massedit.model.loading import LoadOptions, load_model
from massedit.methods import METHODS, EditMethod, get_method  # noqa: F401 - METHODS: massedit.editor.METHODS
from massedit.model.quantized import check_model
from massedit.model.sharded import unwrap
from massedit.inputs.requests import EditRequest, RequestError, parse_records, validate_requests
from massedit.solve.cholesky import SOLVE_DTYPES, LayerSolver
from massedit.compute.stats import layer_covariances, model_name_of
from massedit.compute.targets import frozen_eval

# A request whose final z loss is this many times the early-stop loss (and at least 1) was not
# learned: its target's probability stayed far from 1, so the edit will likely not take.
NOT_CONVERGED_FACTOR = 20.0
# Tokens kept free beyond the longest context template when checking request lengths.
TEMPLATE_SLACK = 4


def not_converged_above(early_stop_loss: float) -> float:
    return max(1.0, NOT_CONVERGED_FACTOR * early_stop_loss)


def check_method(method: Union[str, EditMethod]) -> EditMethod:
    """The registered method; a one-line error for a name that is not registered, or a method that
    does not run in this many processes."""
    impl = get_method(method)
    world = parallel.world()
    if world.size > 1 and not impl.shards_requests:
        raise ValueError(f"method {impl.name!r} is not sharded over {world.size} processes; run it in a single "
                         "process, or use method 'memit'")
    return impl


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
    not_converged_above: float = float("inf")  # z loss above which a request counts as not converged
    details: dict = field(default_factory=dict)  # method-specific results (MEMAT: probe accuracies, heads, ω norms)

    @property
    def not_converged(self) -> int:
        """Requests whose final z loss stayed far above the early-stop loss."""
        return int((self.z_loss > self.not_converged_above).sum())

    def report(self) -> dict:
        return {
            "n_edits": self.n_edits,
            "method": self.method,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "z_loss": {
                "mean": float(self.z_loss.mean()) if len(self.z_loss) else 0.0,
                "max": float(self.z_loss.max()) if len(self.z_loss) else 0.0,
                "not_converged": self.not_converged,
                "not_converged_above": self.not_converged_above,
            },
            "z_steps": {"mean": float(self.z_steps.float().mean()) if len(self.z_steps) else 0.0},
            "layers": self.delta.metadata.get("layers"),
            **({"details": self.details} if self.details else {}),
        }


def _solve_options(dtype: str, device: str) -> tuple[str, Union[str, torch.device]]:
    """Checked `solve_dtype` and `solve_device` ("layer", or a torch device such as "cpu" or "cuda:1")."""
    if dtype not in SOLVE_DTYPES:
        raise ValueError(f"solve_dtype must be one of {', '.join(SOLVE_DTYPES)}, got {dtype!r}")
    if device == "layer":
        return dtype, device
    try:
        return dtype, torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"solve_device must be 'layer' (each edited layer's device) or a device such as 'cpu' or "
                         f"'cuda:1', got {device!r}") from None


class MassEditor:
    """Edits a causal LM with MEMIT. Statistics and Cholesky factors are cached per editor.

    `solve_dtype` ("float64" | "float32") is the precision of each layer's factor of λC and of the
    solves; `solve_device` is where the factors are kept: "cpu" (host memory; the solves still run
    on each layer's device, the factor streamed there in panels), "layer" (each layer's own device:
    fastest, d_ff² × 8 bytes per edited layer there), or a device such as "cuda:1".
    """

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
        solve_dtype: str = "float64",
        solve_device: str = "cpu",
    ):
        model = unwrap(model)  # a DDP replica is edited as the model it wraps; FSDP2 keeps the model itself
        self.model, self.tok = model, tokenizer
        self.hp = hparams if hparams is not None else default_for(model.config)
        self.layout = ModelLayout(model, self.hp.module_overrides())
        self.hp.check_depth(self.layout.n_layers)
        self.layout.check_rewrite_modules(self.hp.layers)
        # A quantization massedit cannot write into is refused here, before statistics or z.
        check_model(model, [self.layout.rewrite_name(l) for l in self.hp.layers])
        if self.tok.pad_token_id is None and self.tok.eos_token_id is not None:
            self.tok.pad_token = self.tok.eos_token
        self.stats_dir, self.corpus = stats_dir, corpus
        # A name the caller gives also vouches for unmarked (reference) statistics files under it.
        self.model_name, self._explicit_name = model_name or model_name_of(model), model_name is not None
        # One progress bar per edit, not one per process.
        self.seed, self.progress, self.reuse_prefix = seed, progress and parallel.world().main, reuse_prefix
        self._templates = validate_templates(context_templates) if context_templates is not None else None
        self._solvers: dict[int, Optional[LayerSolver]] = {}
        self.solve_dtype, self.solve_device = _solve_options(solve_dtype, solve_device)

    @classmethod
    def from_pretrained(cls, name_or_path: str, hparams: Optional[MEMITHyperParams] = None, *,
                        device_map: Union[str, dict, None] = None, max_memory: Union[str, dict, None] = None,
                        offload_folder: Union[str, Path, None] = None, quantization=None, torch_dtype="auto",
                        **editor_kwargs) -> "MassEditor":
        """Load a model (see massedit.model.loading.LoadOptions for the options; all are checked before
        any weight is read) and an editor for it; editor_kwargs go to MassEditor."""
        options = LoadOptions(device_map=device_map, max_memory=max_memory, quantization=quantization,
                              offload_folder=None if offload_folder is None else str(offload_folder),
                              torch_dtype=torch_dtype)
        model, tok = load_model(str(name_or_path), options)
        return cls(model, tok, hparams, **editor_kwargs)

    def context_templates(self) -> ContextTemplates:
        """The context templates every edit of this editor uses: those given, else generated once
        from the model (and cached)."""
        if self._templates is None:
            # Sampled on rank 0 and sent to the others: the same seed need not sample the same
            # text on other hardware, and every rank must edit with the same templates.
            with frozen_eval(self.model):
                self._templates = parallel.from_main(
                    lambda: generate_templates(self.model, self.tok, self.hp.context_template_plan(), self.seed))
        return self._templates

    def set_context_templates(self, templates: ContextTemplates) -> None:
        """Edit with `templates` from now on (checked as the constructor checks them): e.g. those a
        ledger recorded in its first round, or one set shared by several editors."""
        self._templates = validate_templates(templates)

    def solvers(self) -> dict[int, Optional[LayerSolver]]:
        """Factors of λC per edited layer (cached here), from covariances of the unedited model (cached on disk).

        The statistics sums come to the host; each is dropped once its layer's factor is built, in
        one d×d buffer on the layer's device, and the factor is kept where `solve_device` says.
        Under torch.distributed every rank takes part in computing the statistics, but only rank 0
        solves (massedit.solve.spread), so only rank 0 builds factors; the other ranks' entries are None."""
        missing = [l for l in self.hp.layers if l not in self._solvers]
        if missing:
            with frozen_eval(self.model):
                sums = layer_covariances(self.model, self.layout, self.tok, self.hp, self.stats_dir, self.model_name,
                                         self.corpus, self.progress, self._explicit_name)
            main = parallel.world().main
            for l in missing:
                mom2, count = sums.pop(l)
                self._solvers[l] = self.make_solver(l, mom2, count) if main else None
                del mom2
        return self._solvers

    def use_solvers(self, solvers: dict[int, Optional[LayerSolver]]) -> None:
        """Take these factors for their layers instead of building them from statistics: e.g.
        another editor's of the same model, or ones built with `make_solver` on a known covariance."""
        self._solvers.update(solvers)

    def covariances(self) -> dict[int, torch.Tensor]:
        """C^l = E[k kᵀ] (float64, host) per edited layer, read again from the statistics (cached on disk),
        for methods that need C itself rather than the factor of λC (memit-preserve, alphaedit)."""
        with frozen_eval(self.model):
            sums = layer_covariances(self.model, self.layout, self.tok, self.hp, self.stats_dir, self.model_name,
                                     self.corpus, self.progress, self._explicit_name)
        return {l: mom2.double() / count for l, (mom2, count) in sums.items()}

    def make_solver(self, layer: int, cov: torch.Tensor, count: int = 1) -> LayerSolver:
        """The solver of `layer` for C = cov / count (factoring λC, λ = mom2_update_weight), placed and
        typed as this editor's solve options say; not cached (see `use_solvers`)."""
        compute = execution_device(self.layout.rewrite_module(layer))
        keep = compute if self.solve_device == "layer" else self.solve_device
        return LayerSolver(cov, self.hp.mom2_update_weight, layer, count=count, dtype=SOLVE_DTYPES[self.solve_dtype],
                           device=keep, compute_device=compute)

    def validate(self, requests) -> list[EditRequest]:
        """Requests checked against this model and tokenizer (EditRequest objects as they are, dicts parsed
        like a simple requests file); raises RequestError naming the request and field. `edit` calls it
        before any work."""
        if isinstance(requests, (EditRequest, dict, str, bytes)) or not isinstance(requests, Iterable):
            raise RequestError(
                f"requests must be a list of EditRequest objects or dicts, got {type(requests).__name__}; "
                "wrap a single request in a list: edit([request])"
            )
        requests = list(requests)
        if not all(isinstance(r, EditRequest) for r in requests):
            requests = parse_records([asdict(r) if isinstance(r, EditRequest) else r for r in requests], "requests")
        return validate_requests(requests, self.tok, max_tokens=self._max_request_tokens())

    def _max_request_tokens(self) -> Optional[int]:
        """Room for a prompt and its target: the model's context less the longest context template."""
        if self.layout.context_length is None:
            return None
        if self._templates is not None:
            reserve = max(len(self.tok(t.replace("{}", ""))["input_ids"]) for group in self._templates for t in group)
        else:
            reserve = max(length for length, _ in self.hp.context_template_plan())
        # A composed text can tokenize a little longer than its parts, and generated templates end in ". ".
        return self.layout.context_length - reserve - TEMPLATE_SLACK

    def edit(self, requests, method: Union[str, EditMethod] = "memit", batch_size: Optional[int] = None,
             apply: bool = True, *, preserved: Optional[dict[int, torch.Tensor]] = None) -> EditResult:
        """Edit `requests` (EditRequest objects or dicts) into the model.

        Every stage runs in eval mode without parameter gradients; the model's own mode and
        flags are restored afterwards. With apply=False the model is left unchanged and the
        returned delta (which records this model's weights as its base) can be applied later.

        Under torch.distributed (torchrun, accelerate launch) every rank calls this with the same
        requests: z and keys are computed for each rank's share and gathered (massedit.solve.spread,
        massedit.compute.targets), and every rank returns the same delta and applies it.

        `preserved`: per edited layer, the earlier rounds' K_p K_pᵀ, for methods that keep them
        (massedit.edits.sequential passes it).

        A model wrapped by DDP is edited as the model it wraps, the same ΔW on every rank. On a
        model sharded by FSDP2 (DTensor parameters) every rank computes z and keys for its share of
        the requests through the model's own forward, rank 0 solves, and each rank adds to its
        shard of each weight the rows of ΔW that shard holds, from the factors (massedit.model.sharded).
        """
        start = time.perf_counter()
        with frozen_eval(self.model):
            result = self._edit(requests, method, batch_size, preserved)
        # Out of frozen_eval a sharded model's parameters are shards again, which apply writes.
        if apply:
            result.delta.apply(self.model)
        else:
            result.delta.record(self.model)
        result.timings["total"] = time.perf_counter() - start
        return result

    def _edit(self, requests, method: Union[str, EditMethod], batch_size: Optional[int],
              preserved: Optional[dict[int, torch.Tensor]]) -> EditResult:
        impl = check_method(method)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral)
                                       or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer (requests per z-optimization chunk) or None "
                             f"for the default, got {batch_size!r}")
        impl.check(self.hp)
        reqs = self.validate(requests)
        impl.check_requests(reqs, self)
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
        delta = EditDelta(weights, self._metadata(impl.name, len(reqs), templates), impl.additions())
        result = EditResult(delta, impl.name, len(reqs), timings, z.loss, z.steps, z.z, reqs,
                            not_converged_above(self.hp.z_early_stop_loss), impl.details())
        if result.not_converged:
            warnings.warn(
                f"{result.not_converged} of {result.n_edits} request(s) did not converge (final z loss above "
                f"{result.not_converged_above:g}, {NOT_CONVERGED_FACTOR:g}x the early-stop loss); those edits "
                "probably did not take: raise v_num_grad_steps or clamp_norm_factor, or check the targets",
                stacklevel=3,
            )
        return result

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
