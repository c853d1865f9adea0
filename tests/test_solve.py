"""Memory of the solve (DESIGN §10.4): one factor per layer, its precision and place chosen, the
statistics not kept, panels streamed to the compute device giving the unblocked result."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from massedit.editor import MassEditor
from massedit.hparams import default_for
from massedit.solve.cholesky import LayerSolver
from tiny import WORDS, make_model

CORPUS = [" ".join(WORDS[(3 * i + j * (i % 5 + 2)) % len(WORDS)] for j in range(10 + (7 * i) % 29)) for i in range(30)]
REQUESTS = [
    {"subject": "Michael Jordan", "prompt": "{} plays the sport of", "target_new": "baseball"},
    {"subject": "Marie Curie", "prompt": "The native language of {} is", "target_new": "Spanish"},
]


def _moment(d: int, tokens: int, seed: int) -> torch.Tensor:
    """Σ k kᵀ over `tokens` random keys, float32 as statistics files hold it."""
    k = torch.randn(tokens, d, generator=torch.Generator().manual_seed(seed))
    return (k.T @ k).float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("n", [3, 40, 64])  # d = 40: Woodbury for n < d, the d×d form for n >= d
def test_panels_give_the_unblocked_solution(n):
    d, lam, count = 40, 12.0, 500
    mom2 = _moment(d, count, 0)
    keys = torch.randn(d, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    whole = LayerSolver(mom2, lam, 0, count=count)
    assert whole.panel_rows >= d
    # 7 rows per panel: 6 panels, the last one short
    panels = LayerSolver(mom2, lam, 0, count=count, device="cpu", panel_bytes=7 * d * 8)
    assert panels.panel_rows == 7
    c = mom2.double() / count
    expected = torch.linalg.solve(lam * c + keys @ keys.T, keys)
    for solver in (whole, panels):
        got = solver.solve(keys)
        assert got.dtype == torch.float64 and got.shape == (d, n)
        assert _rel(got, expected) <= 1e-10
        assert _rel(solver.cov_solve(keys), torch.linalg.solve(lam * c, keys)) <= 1e-10
    assert _rel(panels.solve(keys), whole.solve(keys)) <= 1e-12


def test_factor_from_the_sum_is_the_factor_of_lambda_c():
    d, lam, count = 24, 3.0, 777
    mom2 = _moment(d, count, 1)
    from_sum = LayerSolver(mom2, lam, 1, count=count).factor
    # C = Σkkᵀ / count in float64, then λC: the previous engine's path, bit for bit
    from_c = LayerSolver(mom2.double() / count, lam, 1).factor
    assert torch.equal(from_sum, from_c)
    torch.testing.assert_close(from_sum @ from_sum.T, lam * mom2.double() / count, rtol=1e-12, atol=1e-12)


def test_statistics_are_not_kept():
    mom2 = _moment(32, 400, 2)
    freed = weakref.ref(mom2)
    solver = LayerSolver(mom2, 5.0, 2, count=400)
    del mom2
    gc.collect()
    assert freed() is None
    tensors = [v for v in vars(solver).values() if isinstance(v, torch.Tensor)]
    assert [t.shape for t in tensors] == [(32, 32)]  # the factor only


def test_float32_solve_is_close_to_float64():
    d, lam, count = 48, 20.0, 2000
    mom2 = _moment(d, count, 3)
    keys = torch.randn(d, 10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    exact = LayerSolver(mom2, lam, 3, count=count).solve(keys)
    single = LayerSolver(mom2, lam, 3, count=count, dtype=torch.float32)
    assert single.factor.dtype == torch.float32
    got = single.solve(keys)
    assert got.dtype == torch.float64
    assert _rel(got, exact) <= 1e-5


def test_unsupported_solve_dtype_is_refused():
    with pytest.raises(ValueError, match="float64 or float32"):
        LayerSolver(_moment(8, 50, 5), 1.0, dtype=torch.float16)


def _editor(tmp_path, **options) -> MassEditor:
    model, tok = make_model("gpt2")
    hp = default_for(model.config).replace(layers=[1, 2], v_num_grad_steps=4, mom2_n_samples=len(CORPUS))
    return MassEditor(model, tok, hp, stats_dir=tmp_path / "stats", corpus=CORPUS, model_name="tiny",
                      context_templates=[["{}"], ["The a of. {}"]], progress=False, **options)


def test_solve_options_edit_like_the_default(tmp_path):
    base = _editor(tmp_path).edit(REQUESTS, apply=False).delta.weights
    for options, tol in (({"solve_device": "layer"}, 1e-12), ({"solve_device": "cpu"}, 1e-12),
                         ({"solve_dtype": "float32"}, 1e-3)):
        editor = _editor(tmp_path, **options)
        solvers = editor.solvers()
        assert all(s.factor.dtype == getattr(torch, options.get("solve_dtype", "float64")) for s in solvers.values())
        got = editor.edit(REQUESTS, apply=False).delta.weights
        for a, b in zip(got, base):
            assert _rel(a.dense(), b.dense()) <= tol, options


@pytest.mark.parametrize("options, message", [
    ({"solve_dtype": "float16"}, "solve_dtype must be one of float64, float32"),
    ({"solve_device": "gpu0"}, "solve_device must be 'layer'"),
])
def test_bad_solve_options_are_refused_before_any_work(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        _editor(tmp_path, **options)
    assert not (tmp_path / "stats").exists()
