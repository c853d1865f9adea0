"""Micro-benchmarks of single phases (pytest-benchmark): z, keys, statistics, solve, apply.

    python -m benchmarks.phases [extra pytest args]       # = pytest benchmarks/test_phases.py
    pytest benchmarks/ --benchmark-only                   # the same, directly
    pytest benchmarks/ --benchmark-only --benchmark-compare  # against the last saved run

`python -m benchmarks.phases` saves each run under benchmarks/results/phases/ (pytest-benchmark's
storage, --benchmark-autosave) so the next run can be compared with --benchmark-compare.

Each phase runs alone on a small random GPT-2 (4 layers, 128 wide, d_ff 512; world-generator
tokenizer and requests): sizes are kept small so the suite takes about a minute on a CPU. On a GPU
set MASSEDIT_BENCH_DEVICE=cuda (and larger MASSEDIT_BENCH_SCALE, e.g. 4) to time there.
The bodies below take pytest-benchmark's `benchmark` fixture, or any callable `benchmark(fn)`
that runs fn, so they can also be called without the plugin (tests/test_benchmarks_smoke.py).
"""
from __future__ import annotations

import functools
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.common import RESULTS_DIR

TEMPLATES = [["{}"], ["The river was quiet. {}", "Because it rained, we stayed. {}"]]
LAYER = 1
SCALE = int(os.environ.get("MASSEDIT_BENCH_SCALE", "1"))
Z_SIZES = (1, 8 * SCALE)
KEY_SIZES = (8 * SCALE, 64 * SCALE)
STAT_DOCS = (32 * SCALE, 128 * SCALE)
SOLVE_SIZES = (1, 32 * SCALE, 512 * SCALE)
APPLY_SIZES = (1, 64 * SCALE)
Z_METHODS = ("memit", "memit-serial", "rome")


@dataclass
class PhaseSetup:
    model: object
    tok: object
    layout: object
    requests: list
    corpus: list
    cov: torch.Tensor  # [d_ff, d_ff] float64, from the corpus


@functools.lru_cache(maxsize=None)
def setup(seed: int = 0, device: str = os.environ.get("MASSEDIT_BENCH_DEVICE", "cpu")) -> PhaseSetup:
    from massedit.model.arch import ModelLayout
    from massedit.inputs.requests import parse_records
    from massedit.compute.stats import second_moments
    from massedit.world.generate import corpus_documents, counterfact_records, generate_world
    from massedit.world.train import make_model, preset, train_tokenizer

    world = generate_world(80, seed)
    cfg = preset("gpt2", quick=True)
    cfg.n_layer, cfg.d_model, cfg.d_ff, cfg.n_head = 4, 128, 512, 4
    tok = train_tokenizer(world, "gpt2", cfg.vocab_size, n_texts=1500)
    model = make_model("gpt2", tok, cfg, seed).to(device)
    model.eval()
    layout = ModelLayout(model)
    requests = parse_records(counterfact_records(world), "bench")
    corpus = corpus_documents(world, max(STAT_DOCS))
    mom2, count = second_moments(model, layout, tok, corpus[:64], [LAYER], progress=False)[LAYER]
    return PhaseSetup(model, tok, layout, requests, corpus, mom2.double() / count)


def _settings(layer: int, steps: int = 5):
    from massedit.compute.targets import ZSettings

    return ZSettings(layer=layer, loss_layer=3, num_grad_steps=steps, lr=0.5, weight_decay=0.5,
                     clamp_norm_factor=0.75, kl_factor=0.0625, early_stop_loss=0.0)


def bench_z(benchmark, method: str, n: int):
    """z for n requests, 5 Adam steps each (no early stop): batched, serial, and ROME's v*."""
    from massedit.methods.rome.update import optimize_target
    from massedit.compute.targets import TargetOptimizer, frozen_eval

    s = setup()
    reqs = s.requests[:n]
    flat = [t for g in TEMPLATES for t in g]
    if method == "rome":
        def fn():
            with frozen_eval(s.model):
                return [optimize_target(s.model, s.layout, s.tok, r, flat, _settings(LAYER)) for r in reqs]
    else:
        opt = TargetOptimizer(s.model, s.layout, s.tok, _settings(LAYER), TEMPLATES)
        fn = (lambda: opt.optimize_serial(reqs, progress=False)) if method == "memit-serial" else \
            (lambda: opt.optimize(reqs, batch_size=n, progress=False))
    return benchmark(fn)


def bench_keys(benchmark, n: int):
    """Keys k̄ at one layer for n requests × the context templates (one no-grad forward batch)."""
    from massedit.compute.keys import subject_keys

    s = setup()
    return benchmark(lambda: subject_keys(s.model, s.layout, s.tok, s.requests[:n], TEMPLATES, LAYER))


def bench_statistics(benchmark, docs: int):
    """Σ k kᵀ over `docs` corpus documents for two layers in one pass (stopped after the deeper)."""
    from massedit.compute.stats import second_moments

    s = setup()
    return benchmark(lambda: second_moments(s.model, s.layout, s.tok, s.corpus[:docs], [1, 2], progress=False))


def bench_solve(benchmark, n: int):
    """(λC + KKᵀ)⁻¹K for n keys, the λC factor already cached (as across a run's batches)."""
    from massedit.solve.cholesky import LayerSolver

    s = setup()
    solver = LayerSolver(s.cov, 200.0, LAYER)
    _ = solver.factor
    g = torch.Generator().manual_seed(n)
    keys = torch.randn(s.cov.shape[0], n, generator=g, dtype=torch.float64).abs().to(s.cov.device)
    return benchmark(lambda: solver.solve(keys))


def bench_apply(benchmark, n: int):
    """Apply then revert (bit-exact, with digests and fix-ups) a rank-n delta of one rewrite weight."""
    from massedit.edits.delta import EditDelta, WeightDelta

    s = setup()
    d_model, d_ff = s.layout.hidden_size, s.layout.key_dim(LAYER)
    g = torch.Generator().manual_seed(n)
    wd = WeightDelta(s.layout.rewrite_weight_name(LAYER), 1e-3 * torch.randn(d_model, n, generator=g, dtype=torch.float64),
                     torch.randn(d_ff, n, generator=g, dtype=torch.float64), s.layout.rewrite_is_conv1d(LAYER))

    def fn():
        delta = EditDelta([wd])
        delta.apply(s.model)
        delta.revert(s.model)

    return benchmark(fn)


def main(argv=None) -> int:
    """Runs benchmarks/test_phases.py under pytest-benchmark; arguments other than --help go to pytest."""
    import pytest

    _, pytest_args = common.parser("phases", __doc__).parse_known_args(argv)
    storage = RESULTS_DIR / "phases"
    args = [str(Path(__file__).resolve().parents[1] / "test_phases.py"), "--benchmark-only", "-q",
            f"--benchmark-storage=file://{storage}", "--benchmark-autosave",
            "--benchmark-columns=min,median,mean,stddev,rounds", "-p", "no:cacheprovider", *pytest_args]
    print("pytest " + " ".join(args), flush=True)
    return int(pytest.main(args))


if __name__ == "__main__":
    sys.exit(main())
