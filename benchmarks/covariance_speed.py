"""Benchmark the key second-moment accumulation (``acc += x^T x``) used for MEMIT covariances.

    python -m benchmarks.covariance_speed [--quick] [--out FILE] [--threads N]

On a CUDA machine this times the torch reference against the Triton kernel on bf16 keys, with
and without a padding mask.  Elsewhere only the torch reference is timed: on CPU, or with
TRITON_INTERPRET set, Triton runs in its interpreter, a correctness tool whose timings would say
nothing about the kernel (and would take hours at these sizes).

FLOP convention: every row reports ``2 * t * d * d``, the cost of the full product over all
``t`` rows, for both backends.  The Triton kernel skips the lower-triangular tiles and torch
skips masked rows, so neither executes exactly that many; the common count makes TFLOP/s
directly comparable as "equivalent throughput".
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from benchmarks import common
from massedit.kernels import covariance
from massedit.kernels.covariance import accumulate_xtx_torch, accumulate_xtx_triton, symmetrize

# One padded row in ten: typical of batches of variable-length prompts.
PAD_FRACTION = 0.1


def machine_info() -> dict:
    info = common.machine_info()
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001 - any failure means the Triton column is absent
        info["triton"] = f"unavailable ({type(exc).__name__})"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _time_cpu(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _time_cuda(fn, warmup: int, reps: int) -> float:
    # Warmup also absorbs Triton's compile and autotune on the first call.
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def _make_mask(t: int, device: torch.device, masked: bool) -> torch.Tensor | None:
    if not masked:
        return None
    mask = torch.ones(t, dtype=torch.bool, device=device)
    mask[int(t * (1 - PAD_FRACTION)):] = False
    return mask


def _tflops(t: int, d: int, seconds: float) -> float:
    return 2.0 * t * d * d / seconds / 1e12


def bench_cuda(quick: bool, with_triton: bool) -> list[dict]:
    dims = [4096] if quick else [4096, 16384]
    rows_per_block = [2048] if quick else [2048, 8192]
    warmup, reps = (2, 5) if quick else (3, 20)
    return bench_pairs(torch.device("cuda"), dims, rows_per_block, warmup, reps, with_triton)


def bench_pairs(device: torch.device, dims, rows_per_block, warmup: int, reps: int, with_triton: bool) -> list[dict]:
    """torch (and Triton) on bf16 keys into an fp32 accumulator, for every (d, t, masked); on CPU
    the Triton column runs in its interpreter (TRITON_INTERPRET=1): a check that the path runs,
    not a speed."""
    timer = _time_cuda if device.type == "cuda" else _time_cpu
    results = []
    for d in dims:
        acc_torch = torch.zeros(d, d, dtype=torch.float32, device=device)
        acc_triton = torch.zeros_like(acc_torch) if with_triton else None
        for t in rows_per_block:
            x = torch.randn(t, d, device=device).to(torch.bfloat16)
            for masked in (False, True):
                mask = _make_mask(t, device, masked)
                s_torch = timer(lambda: accumulate_xtx_torch(acc_torch, x, mask), warmup, reps)
                row = {"d": d, "t": t, "dtype": "bfloat16", "acc_dtype": "float32", "masked": masked,
                       "torch_ms": s_torch * 1e3, "torch_tflops": _tflops(t, d, s_torch)}
                if with_triton:
                    acc_torch.zero_()
                    acc_triton.zero_()
                    accumulate_xtx_torch(acc_torch, x, mask)
                    accumulate_xtx_triton(acc_triton, x, mask)
                    max_abs_err = (symmetrize(acc_triton) - acc_torch).abs().max().item()
                    s_triton = timer(lambda: accumulate_xtx_triton(acc_triton, x, mask), warmup, reps)
                    row.update({"triton_ms": s_triton * 1e3, "triton_tflops": _tflops(t, d, s_triton),
                                "speedup": s_torch / s_triton, "max_abs_err": max_abs_err})
                results.append(row)
            del x
        del acc_torch, acc_triton
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def bench_cpu(quick: bool) -> list[dict]:
    dims = [128] if quick else [1024, 4096]
    rows_per_block = [64] if quick else [512, 2048]
    warmup, reps = (1, 2) if quick else (1, 5)
    results = []
    for d in dims:
        acc = torch.zeros(d, d, dtype=torch.float32)
        for t in rows_per_block:
            x = torch.randn(t, d).to(torch.bfloat16)
            for masked in (False, True):
                mask = _make_mask(t, x.device, masked)
                s_torch = _time_cpu(lambda: accumulate_xtx_torch(acc, x, mask), warmup, reps)
                results.append({
                    "d": d, "t": t, "dtype": "bfloat16", "acc_dtype": "float32", "masked": masked,
                    "torch_ms": s_torch * 1e3, "torch_tflops": _tflops(t, d, s_torch),
                })
    return results


def format_table(rows: list[dict]) -> str:
    columns = [("d", "d", "{}"), ("t", "t", "{}"), ("masked", "masked", "{}"),
               ("torch_ms", "torch ms", "{:.3f}"), ("torch_tflops", "torch TFLOP/s", "{:.3f}"),
               ("triton_ms", "triton ms", "{:.3f}"), ("triton_tflops", "triton TFLOP/s", "{:.3f}"),
               ("speedup", "torch/triton", "{:.2f}x"), ("max_abs_err", "max |err|", "{:.2e}")]
    columns = [c for c in columns if any(c[0] in r for r in rows)]
    return common.text_table([head for _, head, _ in columns],
                             [[f.format(r[key]) for key, _, f in columns] for r in rows])


def main(argv: list[str] | None = None) -> dict:
    parser = common.parser("covariance_speed", __doc__)
    parser.add_argument("--quick", action="store_true", help="one small shape, few repetitions")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default: benchmarks/results/covariance_speed-<timestamp>.json)")
    common.add_threads(parser, default=None)
    args = parser.parse_args(argv)
    common.set_threads(args.threads)

    on_gpu = torch.cuda.is_available()
    with_triton = on_gpu and covariance._triton_usable_for(torch.empty(0, device="cuda"))
    if with_triton:
        note = "CUDA: torch reference vs Triton kernel, bf16 keys, fp32 accumulator."
        rows = bench_cuda(args.quick, with_triton=True)
    elif on_gpu:
        note = ("CUDA: torch reference timings only; Triton is not timed because it is unavailable "
                "or TRITON_INTERPRET is set (the interpreter is not a speed path).")
        rows = bench_cuda(args.quick, with_triton=False)
    else:
        note = ("CPU only: torch reference timings; the Triton kernel is not timed because on CPU it "
                "runs only in the TRITON_INTERPRET interpreter, which is not a speed path.")
        rows = bench_cpu(args.quick)
    report = {
        "benchmark": "covariance_speed",
        "timestamp": common.stamp(),
        "device": "cuda" if on_gpu else "cpu",
        "quick": args.quick,
        "note": note,
        "flop_count": "2*t*d*d per call (full x^T x over all t rows), for both backends",
        "pad_fraction_when_masked": PAD_FRACTION,
        "machine": machine_info(),
        "results": rows,
    }
    out = common.write_json(common.result_path("covariance_speed", args.out), report)

    print(note)
    print(f"FLOPs counted: {report['flop_count']}; masked rows pad {PAD_FRACTION:.0%} of each block.")
    print(format_table(rows))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
