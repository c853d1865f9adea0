"""One command that checks massedit on a GPU machine, in under 8 minutes, with no downloads.

    python -m benchmarks.gpu_check [--budget SECONDS] [--z-steps K] [--smoke] [--out FILE]

Sections, each run in its own process with its own time box (a crash, an out-of-memory error or a
hang in one is recorded and the next still runs; the JSON is rewritten after every section):

* covariance: the Triton x^T x kernel against torch on bf16 keys, d = 16384, blocks of 8192 and
  16384 tokens, in TFLOP/s and as a fraction of the GPU's dense bf16 peak
  (benchmarks/covariance_speed.py's `bench_pairs`);
* statistics: massedit's statistics pass (`massedit.compute.stats.second_moments`, the preset's five
  layers in one pass) on a Llama-3-8B-shaped model in bf16, in tokens per second;
* edit-1000, edit-4000: `benchmarks/gpu_scale.py` on Llama-3-8B (real configuration, random
  weights, bf16, statistics injected): z phase and whole edit, z tokens/s and MFU;
* serial-64: the same at n = 64 with the serial path measured on all 64 requests, so the
  serial / batched ratio is measured, not extrapolated;
* two-gpu: gpu_scale with the model spread over the GPUs by Accelerate (`--device-map balanced`),
  n = 64; skipped with fewer than two GPUs.

`--z-steps` (default 10, the preset has 25) sets the z iterations of the edit sections: a random
model never stops early, every iteration costs the same, so tokens/s and MFU do not depend on it,
and 10 keeps the 4,000-request edit inside the budget; the whole-edit times are for that many.
`--budget` (default 480 s) is split between the sections by weight (`SECTIONS`); time a section
does not use, or a skipped section's share, goes to the sections after it.

`--smoke` runs every section on the CPU at tiny sizes (the Triton kernel in its interpreter,
TRITON_INTERPRET=1; gpu_scale's smoke configuration; the two-gpu section with a CPU-only map), in
well under a minute: the same code paths, no meaningful figures. Without a GPU and without
--smoke the check exits with code 2. Writes benchmarks/results/gpu_check-<time>.json (or --out)
and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import torch

from benchmarks import common, gpu_scale
from benchmarks.common import fmt

# Section name → weight in the split of the budget: each section gets the time still left in
# proportion to its weight among the sections still to run (so unused time flows on).
SECTIONS = {"covariance": 0.08, "statistics": 0.08, "edit-1000": 0.2, "edit-4000": 0.42, "serial-64": 0.14,
            "two-gpu": 0.08}
EDITS = {"edit-1000": 1000, "edit-4000": 4000, "serial-64": 64, "two-gpu": 64}
SMOKE_EDITS = {"edit-1000": 4, "edit-4000": 8, "serial-64": 4, "two-gpu": 4}
SMOKE_SECTION_S = 90
STATS_DOCUMENTS, STATS_DOC_SENTENCES = 256, 60

NO_GPU_MESSAGE = ("gpu_check needs a CUDA GPU (torch.cuda.is_available() is False here); "
                  "`python -m benchmarks.gpu_check --smoke` runs the same sections on the CPU at tiny sizes")


# ----------------------------------------------------------------------------------------------
# sections (each runs in a child process: `--section NAME --section-out FILE`)


def section_covariance(smoke: bool) -> dict:
    from benchmarks.covariance_speed import bench_pairs
    from massedit.kernels import covariance

    if smoke:
        rows = bench_pairs(torch.device("cpu"), [64], [32], 1, 1, with_triton=True)
        peak = None
    else:
        device = torch.device("cuda")
        with_triton = covariance._triton_usable_for(torch.empty(0, device=device))
        rows = bench_pairs(device, [16384], [8192, 16384], 3, 10, with_triton)
        peak = gpu_scale.peak_flops(torch.cuda.get_device_name(device))
    for r in rows:
        for key in ("torch", "triton"):
            if f"{key}_tflops" in r and peak:
                r[f"{key}_fraction_of_peak"] = r[f"{key}_tflops"] * 1e12 / peak
    return {"rows": rows, "peak_bf16_dense_flops": peak,
            "flop_count": "2·t·d² per call for both backends (covariance_speed's convention)"}


def section_statistics(smoke: bool) -> dict:
    from massedit.model.arch import ModelLayout
    from massedit.hparams import preset
    from massedit.compute.stats import second_moments

    device = torch.device("cpu") if smoke else torch.device("cuda")
    n_docs, per_doc = (8, 6) if smoke else (STATS_DOCUMENTS, STATS_DOC_SENTENCES)
    sentences = gpu_scale.tokenizer_corpus(300 if smoke else 20000, 0)
    tok = common.train_tokenizer(sentences, 800 if smoke else 8192)
    docs = [" ".join(sentences[(i * per_doc + j) % len(sentences)] for j in range(per_doc)) for i in range(n_docs)]
    cfg = gpu_scale.model_config("llama-8b", smoke, len(tok))
    model = gpu_scale.build_model(cfg, device, torch.bfloat16, 0)
    hp = preset("llama-3-8b")
    layers = [0] if smoke else list(hp.layers)
    layout = ModelLayout(model, hp.module_overrides())
    second_moments(model, layout, tok, docs[:2], layers, progress=False)  # warm-up: kernels, allocator
    gpu_scale.sync(device)
    t = time.perf_counter()
    sums = second_moments(model, layout, tok, docs, layers, progress=False)
    gpu_scale.sync(device)
    seconds = time.perf_counter() - t
    tokens = sums[layers[0]][1]
    return {"model": "Llama-3-8B configuration, random weights, bfloat16" if not smoke else "tiny Llama (smoke)",
            "layers": layers, "key_dim": layout.key_dim(layers[0]), "documents": n_docs, "tokens": tokens,
            "seconds": seconds, "tokens_per_s": tokens / seconds, "batch_tokens": 8192}


def section_edit(name: str, smoke: bool, z_steps: int, out: Path) -> dict:
    n = (SMOKE_EDITS if smoke else EDITS)[name]
    argv = ["--arch", "llama-8b", "--edits", str(n), "--serial-sample", str(n if name == "serial-64" else 1),
            "--out", str(out)]
    argv += ["--smoke"] if smoke else ["--z-steps", str(z_steps)]
    if name == "two-gpu":
        argv += ["--device-map", "balanced"]
    r = gpu_scale.main(argv)
    b, z, s = r["batched"], r["z_phase"], r["serial"]
    peak = z["peak_flops"]
    summary = {
        "edits": n, "z_steps": r["hparams"]["v_num_grad_steps"], "z_s": b["z_s"], "keys_s": b["keys_s"],
        "solve_s": b["solve_s"], "total_s": b["total_s"], "z_tokens_per_s": z["tokens_per_s"], "z_mfu": z["mfu"],
        "edit_mfu": (z["flops"] / b["total_s"] / peak) if peak and b["total_s"] > 0 else None,
        "peak_memory_bytes": r["memory"]["batched_peak_bytes"], "device_map": r["model"]["device_map"],
        "gpu_scale_json": str(out),
    }
    if name == "serial-64":
        summary.update(serial_total_s=s["measured"]["total_s"], serial_z_s=s["measured"]["z_s"],
                       ratio_total=s["ratio_extrapolated_serial_over_batched"]["total"],
                       ratio_z=s["ratio_extrapolated_serial_over_batched"]["z"],
                       note="serial measured on all n requests (K = N): the ratio is measured, not extrapolated")
    return summary


def run_section(name: str, smoke: bool, z_steps: int, out: Path) -> dict:
    if name == "covariance":
        return section_covariance(smoke)
    if name == "statistics":
        return section_statistics(smoke)
    return section_edit(name, smoke, z_steps, out.with_name(out.stem + "-gpu_scale.json"))


# ----------------------------------------------------------------------------------------------
# orchestration


def _skip_reason(name: str, smoke: bool) -> Optional[str]:
    if name == "two-gpu" and not smoke and torch.cuda.device_count() < 2:
        return f"needs two GPUs, {torch.cuda.device_count()} visible"
    return None


def time_box(name: str, to_run: Sequence[str], left: float) -> float:
    """Seconds for `name`: the time left, in proportion to its weight among the sections still to run."""
    ahead = sum(SECTIONS[n] for n in to_run[list(to_run).index(name):])
    return max(1.0, left * SECTIONS[name] / ahead)


def _child(name: str, args, timeout: float, workdir: Path) -> dict:
    out = workdir / f"{name}.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--section", name, "--section-out", str(out),
           "--z-steps", str(args.z_steps)] + (["--smoke"] if args.smoke else [])
    env = dict(os.environ)
    if args.smoke:
        env["TRITON_INTERPRET"] = "1"
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        tail = (err.stderr or b"")[-2000:]
        return {"status": "timeout", "wall_s": time.perf_counter() - t, "timeout_s": timeout,
                "stderr_tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    wall = time.perf_counter() - t
    if proc.returncode != 0 or not out.exists():
        return {"status": "failed", "wall_s": wall, "returncode": proc.returncode,
                "stderr_tail": proc.stderr[-2000:]}
    return {"status": "ok", "wall_s": wall, "timeout_s": timeout, **json.loads(out.read_text(encoding="utf-8"))}


def format_table(result: dict) -> str:
    lines = [f"gpu_check{' (SMOKE: tiny sizes on CPU, figures meaningless)' if result['smoke'] else ''} on "
             f"{result['machine'].get('gpu') or 'CPU'}; {result['machine'].get('gpu_count', 0)} GPU(s)", ""]
    for name in SECTIONS:
        sec = result["sections"].get(name)
        if sec is None:
            continue
        status = sec["status"]
        if status != "ok":
            why = sec.get("reason") or f"{status} after {sec.get('wall_s', 0):.0f} s"
            lines.append(f"{name:<11} {status.upper()}: {why}")
            continue
        if name == "covariance":
            for r in sec["rows"]:
                lines.append(f"{name:<11} d={r['d']} t={r['t']} masked={r['masked']}: torch "
                             f"{r['torch_tflops']:.1f} TFLOP/s, Triton {fmt(r.get('triton_tflops'), '.1f')} TFLOP/s "
                             f"({fmt(r.get('triton_fraction_of_peak'), '.0%')} of bf16 peak), "
                             f"torch/Triton {fmt(r.get('speedup'), '.2f')}x")
        elif name == "statistics":
            lines.append(f"{name:<11} {sec['tokens']:,} tokens, layers {sec['layers']} in one pass: "
                         f"{sec['tokens_per_s']:,.0f} tokens/s ({sec['model']})")
        else:
            lines.append(f"{name:<11} n={sec['edits']}, {sec['z_steps']} z steps: z {sec['z_s']:.1f} s, keys "
                         f"{sec['keys_s']:.1f} s, solve {sec['solve_s']:.1f} s, edit {sec['total_s']:.1f} s; z "
                         f"{fmt(sec['z_tokens_per_s'], ',.0f')} tokens/s, z MFU {fmt(sec['z_mfu'], '.1%')}, "
                         f"edit MFU {fmt(sec['edit_mfu'], '.1%')}")
            if name == "serial-64":
                lines.append(f"{'':<11} serial {sec['serial_total_s']:.1f} s vs batched {sec['total_s']:.1f} s: "
                             f"{fmt(sec['ratio_total'], '.1f')}x (z {fmt(sec['ratio_z'], '.1f')}x), measured")
            if sec.get("device_map"):
                lines.append(f"{'':<11} devices: {', '.join(sec['device_map'])}")
    return "\n".join(lines)


def _parse(argv):
    p = common.parser("gpu_check", __doc__)
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all sections together (default 480)")
    p.add_argument("--z-steps", type=int, default=10, help="z iterations in the edit sections (default 10)")
    p.add_argument("--smoke", action="store_true", help="every section at tiny sizes on the CPU")
    p.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/gpu_check-<time>.json)")
    p.add_argument("--section", choices=tuple(SECTIONS), help=argparse.SUPPRESS)
    p.add_argument("--section-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget <= 0 or args.z_steps < 1:
        p.error("--budget must be positive and --z-steps at least 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = _parse(argv)
    if args.section:
        common.write_json(args.section_out, run_section(args.section, args.smoke, args.z_steps, args.section_out))
        return {}
    if not args.smoke and not torch.cuda.is_available():
        print(NO_GPU_MESSAGE, file=sys.stderr)
        raise SystemExit(2)
    device = torch.device("cpu") if args.smoke else torch.device("cuda", torch.cuda.current_device())
    out = common.result_path("gpu_check", args.out)
    result = {"benchmark": "gpu_check", "smoke": args.smoke, "budget_s": args.budget, "z_steps": args.z_steps,
              "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": gpu_scale.machine_info(device), "sections": {}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        to_run = [n for n in SECTIONS if not _skip_reason(n, args.smoke)]
        for name in SECTIONS:
            if name not in to_run:
                result["sections"][name] = {"status": "skipped", "reason": _skip_reason(name, args.smoke)}
            else:
                left = args.budget - (time.perf_counter() - start)
                timeout = SMOKE_SECTION_S if args.smoke else time_box(name, to_run, left)
                result["sections"][name] = _child(name, args, timeout, Path(workdir))
            result["wall_s"] = time.perf_counter() - start
            common.write_json(out, result)
            print(f"  {name}: {result['sections'][name]['status']}", flush=True)
    print()
    print(format_table(result))
    print(f"wrote {out}")
    result["out"] = str(out)
    return result


if __name__ == "__main__":
    main()
