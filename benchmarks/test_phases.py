"""pytest-benchmark micro-benchmarks of the editing phases; see benchmarks/phases.py.

    pytest benchmarks/ --benchmark-only [--benchmark-compare]
"""
import pytest

from benchmarks import phases as P


@pytest.mark.parametrize("n", P.Z_SIZES)
@pytest.mark.parametrize("method", P.Z_METHODS)
def test_z(benchmark, method, n):
    benchmark.group = f"z n={n}"
    P.bench_z(benchmark, method, n)


@pytest.mark.parametrize("n", P.KEY_SIZES)
def test_keys(benchmark, n):
    benchmark.group = "keys"
    P.bench_keys(benchmark, n)


@pytest.mark.parametrize("docs", P.STAT_DOCS)
def test_statistics(benchmark, docs):
    benchmark.group = "statistics"
    P.bench_statistics(benchmark, docs)


@pytest.mark.parametrize("n", P.SOLVE_SIZES)
def test_solve(benchmark, n):
    benchmark.group = "solve"
    P.bench_solve(benchmark, n)


@pytest.mark.parametrize("n", P.APPLY_SIZES)
def test_apply(benchmark, n):
    benchmark.group = "apply"
    P.bench_apply(benchmark, n)
