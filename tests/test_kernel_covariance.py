"""The Triton x^T x kernel against the torch reference, run under TRITON_INTERPRET on CPU.

conftest.py sets TRITON_INTERPRET=1 before triton is imported, so the Triton path runs in the
interpreter here.  Shapes are chosen to be ragged against the interpreter tiles (BLOCK_D=32,
BLOCK_T=16): d=16 is smaller than a tile, 33 and 70 leave partial tiles, t=1, 7, 100 leave
partial row blocks.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import massedit.kernels.covariance as cov
from massedit.kernels.covariance import accumulate_xtx, accumulate_xtx_torch, accumulate_xtx_triton, symmetrize

REPO = Path(__file__).resolve().parents[1]

DIMS = [16, 33, 70]
ROWS = [1, 7, 64, 100]
INPUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACC_DTYPES = [torch.float32, torch.float64]

# (rtol, atol) for entries of sum_t x x^T with x ~ N(0, 1) and t <= a few hundred rows.  Both
# backends see the same already-rounded inputs, and bf16/fp16 products are exact in fp32, so the
# only discrepancy is the order of the fp32 sum in the kernel (the reference sums in acc's dtype):
# each dtype gets the same budget, a few fp32 ulps of the largest (diagonal, ~t) entries.
TOLERANCES = {
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-5, 1e-4),
    torch.bfloat16: (1e-5, 1e-4),
}


def _keys(t: int, d: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(t, d).to(dtype)


def _mask(t: int, kind: str) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "all":
        return torch.ones(t, dtype=torch.bool)
    if kind == "empty":
        return torch.zeros(t, dtype=torch.bool)
    mask = torch.rand(t) > 0.4
    mask[0] = True  # keep at least one real row so "some" never degenerates to "empty"
    if t > 1:
        mask[-1] = False
    return mask


def _assert_matches(triton_acc, torch_acc, dtype, rows_scale=1):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(symmetrize(triton_acc), torch_acc, rtol=rtol, atol=atol * rows_scale)


@pytest.mark.parametrize("acc_dtype", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("t", ROWS)
@pytest.mark.parametrize("d", DIMS)
def test_triton_matches_torch(d, t, dtype, acc_dtype):
    x = _keys(t, d, dtype)
    mask = _mask(t, "some")
    ref = torch.zeros(d, d, dtype=acc_dtype)
    out = torch.zeros(d, d, dtype=acc_dtype)
    n_ref = accumulate_xtx_torch(ref, x, mask)
    n_out = accumulate_xtx_triton(out, x, mask)
    assert n_out == n_ref == int(mask.sum())
    assert out.dtype == acc_dtype
    _assert_matches(out, ref, dtype)


@pytest.mark.parametrize("mask_kind", ["none", "some", "all", "empty"])
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
@pytest.mark.parametrize("d,t", [(33, 100), (70, 7)])
def test_masks(d, t, dtype, mask_kind):
    x = _keys(t, d, dtype)
    mask = _mask(t, mask_kind)
    ref = torch.zeros(d, d)
    out = torch.zeros(d, d)
    expected_rows = t if mask is None else int(mask.sum())
    assert accumulate_xtx_torch(ref, x, mask) == expected_rows
    assert accumulate_xtx_triton(out, x, mask) == expected_rows
    _assert_matches(out, ref, dtype)
    if mask_kind == "empty":
        assert torch.count_nonzero(out) == 0
    # Padding must be excluded, not merely down-weighted: compare against the compacted rows.
    kept = x if mask is None else x[mask]
    torch.testing.assert_close(ref, kept.float().T @ kept.float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("acc_dtype", ACC_DTYPES, ids=str)
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
def test_repeated_accumulation(dtype, acc_dtype):
    d = 33
    ref = torch.zeros(d, d, dtype=acc_dtype)
    out = torch.zeros(d, d, dtype=acc_dtype)
    total_ref = total_out = 0
    for t, kind in [(64, "some"), (7, "none"), (100, "all"), (5, "empty"), (1, "some")]:
        x = _keys(t, d, dtype)
        mask = _mask(t, kind)
        total_ref += accumulate_xtx_torch(ref, x, mask)
        total_out += accumulate_xtx_triton(out, x, mask)
    assert total_out == total_ref
    _assert_matches(out, ref, dtype, rows_scale=3)


def test_fp64_accumulator_adds_into_existing_values():
    d, t = 33, 64
    start = torch.randn(d, d, dtype=torch.float64)
    start = start + start.T + 1e6  # large offset: fp32 addition would lose the low bits
    x = _keys(t, d, torch.float32)
    ref, out = start.clone(), start.clone()
    accumulate_xtx_torch(ref, x)
    accumulate_xtx_triton(out, x)
    torch.testing.assert_close(symmetrize(out), ref, rtol=0, atol=1e-4)


def test_only_upper_tiles_are_written():
    d, t = 70, 16
    block = cov._INTERPRET_CONFIG["BLOCK_D"]
    sentinel = -123.0
    out = torch.full((d, d), sentinel)
    accumulate_xtx_triton(out, _keys(t, d, torch.float32))
    tile = torch.arange(d) // block
    below_diagonal_tiles = tile[:, None] > tile[None, :]
    assert below_diagonal_tiles.any()
    assert (out[below_diagonal_tiles] == sentinel).all()
    assert not (out[~below_diagonal_tiles] == sentinel).any()


def test_strided_keys():
    d, t = 33, 40
    wide = _keys(t, 2 * d, torch.bfloat16)
    x = wide[:, ::2]  # column stride 2: the kernel must honour strides, not assume contiguity
    mask = _mask(t, "some")
    ref = torch.zeros(d, d)
    out = torch.zeros(d, d)
    accumulate_xtx_torch(ref, x, mask)
    accumulate_xtx_triton(out, x, mask)
    _assert_matches(out, ref, torch.bfloat16)


def test_zero_rows():
    x = torch.zeros(0, 16)
    for fn in (accumulate_xtx_torch, accumulate_xtx_triton):
        acc = torch.zeros(16, 16)
        assert fn(acc, x) == 0
        assert torch.count_nonzero(acc) == 0


def test_symmetrize():
    d = 33
    x = _keys(50, d, torch.float32)
    full = torch.zeros(d, d)
    accumulate_xtx_torch(full, x)
    torch.testing.assert_close(symmetrize(full), full, rtol=0, atol=0)
    strictly_lower = torch.ones(d, d, dtype=torch.bool).tril(-1)
    stale_lower = full.clone()
    stale_lower[strictly_lower] = torch.randn(int(strictly_lower.sum()))
    torch.testing.assert_close(symmetrize(stale_lower), full, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", INPUT_DTYPES, ids=str)
def test_triton_matches_torch_larger(dtype):
    d, t = 200, 500
    x = _keys(t, d, dtype)
    mask = _mask(t, "some")
    ref = torch.zeros(d, d, dtype=torch.float64)
    out = torch.zeros(d, d, dtype=torch.float64)
    accumulate_xtx_torch(ref, x, mask)
    accumulate_xtx_triton(out, x, mask)
    _assert_matches(out, ref, dtype, rows_scale=5)


# ----------------------------------------------------------------------------- dispatcher


@pytest.fixture
def spies(monkeypatch):
    calls = []
    monkeypatch.setattr(cov, "accumulate_xtx_torch", lambda acc, x, mask=None: calls.append("torch") or 0)
    monkeypatch.setattr(cov, "accumulate_xtx_triton", lambda acc, x, mask=None, count=True: calls.append("triton") or 0)
    return calls


def _small():
    return torch.zeros(16, 16), torch.randn(4, 16)


def test_auto_picks_torch_on_cpu(monkeypatch, spies):
    monkeypatch.delenv(cov.BACKEND_ENV, raising=False)
    accumulate_xtx(*_small())
    accumulate_xtx(*_small(), backend="auto")
    assert spies == ["torch", "torch"]


@pytest.mark.parametrize("env,backend,expected", [
    ("torch", "auto", "torch"),
    ("triton", "auto", "triton"),
    ("auto", "auto", "torch"),
    ("TRITON", "auto", "triton"),
    ("triton", "torch", "torch"),  # an explicit backend beats the environment
    ("torch", "triton", "triton"),
])
def test_env_override(monkeypatch, spies, env, backend, expected):
    monkeypatch.setenv(cov.BACKEND_ENV, env)
    accumulate_xtx(*_small(), backend=backend)
    assert spies == [expected]


def test_env_triton_runs_kernel_end_to_end(monkeypatch):
    monkeypatch.setenv(cov.BACKEND_ENV, "triton")
    d = 33
    x = _keys(20, d, torch.float16)
    out = torch.zeros(d, d)
    # Garbage below the diagonal must not matter: symmetrize reads only the upper triangle.
    out[torch.ones(d, d, dtype=torch.bool).tril(-1)] = float("nan")
    assert accumulate_xtx(out, x) == 20
    ref = torch.zeros(d, d)
    accumulate_xtx(ref, x, backend="torch")
    _assert_matches(out, ref, torch.float16)


def test_invalid_backend_and_env(monkeypatch):
    acc, x = _small()
    with pytest.raises(ValueError, match="backend must be one of"):
        accumulate_xtx(acc, x, backend="cuda")
    monkeypatch.setenv(cov.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=cov.BACKEND_ENV):
        accumulate_xtx(acc, x)


def test_forcing_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    acc, x = _small()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        accumulate_xtx(acc, x, backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        accumulate_xtx_triton(acc, x)
    assert accumulate_xtx(acc, x) == 4  # auto still works, through torch


def test_triton_unavailable(monkeypatch):
    monkeypatch.setattr(cov, "_import_triton", lambda: (None, "ImportError: no module named triton"))
    acc, x = _small()
    with pytest.raises(RuntimeError, match="Triton backend is unavailable"):
        accumulate_xtx(acc, x, backend="triton")
    assert accumulate_xtx(acc, x) == 4


def test_import_without_triton():
    # A fresh interpreter in which `import triton` fails: the module must still import and work.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from massedit.kernels.covariance import accumulate_xtx\n"
        "acc = torch.zeros(8, 8); x = torch.randn(3, 8)\n"
        "assert accumulate_xtx(acc, x) == 3\n"
        "try:\n"
        "    accumulate_xtx(acc, x, backend='triton')\n"
        "except RuntimeError as exc:\n"
        "    assert 'unavailable' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('forcing triton without triton must fail')\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


@pytest.mark.parametrize("acc,x,mask,error,match", [
    (torch.zeros(4, 5), torch.randn(3, 4), None, ValueError, "square"),
    (torch.zeros(5, 5), torch.randn(3, 4), None, ValueError, "d=4"),
    (torch.zeros(4, 4, dtype=torch.float16), torch.randn(3, 4), None, TypeError, "float32 or float64"),
    (torch.zeros(4, 4), torch.randn(3, 4, dtype=torch.float64), None, TypeError, "bfloat16, float16 or float32"),
    (torch.zeros(4, 4), torch.randn(4), None, ValueError, "2-D"),
    (torch.zeros(4, 4), torch.randn(3, 4), torch.ones(2, dtype=torch.bool), ValueError, r"\[t\] = \[3\]"),
    (torch.zeros(4, 4), torch.randn(3, 4), torch.ones(3), TypeError, "bool"),
    (torch.zeros(4, 4, device="meta"), torch.randn(3, 4), None, ValueError, "share a device"),
], ids=["non-square", "width", "acc-dtype", "x-dtype", "x-1d", "mask-length", "mask-dtype", "device"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_validation(acc, x, mask, error, match, backend):
    with pytest.raises(error, match=match):
        accumulate_xtx(acc, x, mask, backend=backend)


# ----------------------------------------------------------------------------- benchmark


def test_benchmark_smoke(tmp_path, capsys):
    from benchmarks.covariance_speed import main

    out = tmp_path / "bench.json"
    report = main(["--quick", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["results"] and saved == json.loads(json.dumps(report))
    assert {"cpu", "torch", "torch_threads"} <= saved["machine"].keys()
    assert all(r["torch_ms"] > 0 for r in saved["results"])
    assert "torch TFLOP/s" in capsys.readouterr().out


def test_count_false_skips_the_row_count():
    acc, x = _small()
    mask = torch.tensor([True, False, True, True])
    assert cov.accumulate_xtx(acc, x, mask, backend="triton", count=False) is None
    ref = torch.zeros(16, 16)
    cov.accumulate_xtx_torch(ref, x, mask)
    torch.testing.assert_close(cov.symmetrize(acc), ref, rtol=1e-5, atol=1e-5)
