"""Causal tracing: every restoration of a prompt batched into few forwards vs one per forward.

    python -m benchmarks.trace_speed [--facts 10] [--samples 10] [--threads 1] [--smoke]
    python -m benchmarks.trace_speed --model smollm2-135m --facts-dir DIR --facts 2 --modes batched,"one restoration / forward"

Model: an untrained GPT-2 of the default knowledge world's size (6 layers, 128 wide, d_ff 512,
the world's tokenizer), on the world generator's CounterFact prompts; random weights are fine for
timing, the work per forward does not depend on them; or, with --model, a real model on the known facts
`massedit data facts` wrote for it. Two references: one restoration per forward
with the noise samples as its batch, as ROME's code does, and one restoration of one noise sample
per forward. Each fact runs all three in turn so that machine load hits them alike; their effects
are checked to agree to 1e-5. Besides the seconds it counts the work: the (row, position) pairs
each mode runs through each block, summed over blocks, and the rows that reach the LM head, so
that a ratio of seconds can be read against the ratio of arithmetic it is bounded by.
Writes benchmarks/results/trace_speed-<timestamp>.json.
"""
from __future__ import annotations

import os
import time

from benchmarks import common
from benchmarks.common import machine_info
from massedit.model.hooks import hidden_of, hooks
from massedit.inputs.requests import parse_records
from massedit.evaluation.trace import BATCH_TOKENS, KINDS, Tracer, default_window, make_noise, prepare, trace_fact, trace_fact_serial

MODES = ("batched", "one restoration / forward", "one sample / forward")


def _setup(smoke: bool):
    from massedit.world.generate import counterfact_records, generate_world
    from massedit.world.train import make_model, preset, train_tokenizer

    world = generate_world(20 if smoke else 200, seed=0)
    cfg = preset("gpt2", quick=smoke)
    tok = train_tokenizer(world, "gpt2", cfg.vocab_size, n_texts=1500 if smoke else 4000)
    model = make_model("gpt2", tok, cfg, seed=0).eval()
    records = counterfact_records(world)
    described = {"kind": "gpt2, random weights (world size)", "n_layer": cfg.n_layer, "d_model": cfg.d_model,
                 "d_ff": cfg.d_ff, "vocab_size": len(tok)}
    return model, tok, parse_records(records, "world generator", fmt="counterfact"), described


def _setup_real(name: str, facts: str):
    """A real model (catalog name, directory or .gguf) and the facts `massedit data facts` wrote."""
    import json
    from pathlib import Path

    from massedit.model.loading import LoadOptions, load_model

    model, tok = load_model(name, LoadOptions(torch_dtype="float32"))
    records = json.loads((Path(facts) / "counterfact.json").read_text())
    cfg = model.config
    described = {"kind": f"{name} (pretrained)", "n_layer": cfg.num_hidden_layers, "d_model": cfg.hidden_size,
                 "d_ff": cfg.intermediate_size, "vocab_size": cfg.vocab_size}
    return model.eval(), tok, parse_records(records, str(facts), fmt="counterfact"), described


def _counting(tracer, counts: dict):
    """Adds to counts["block positions"] the rows × positions of every block call, and to
    counts["head rows"] the rows of every LM-head call."""

    def block(_module, args, kwargs):
        x = hidden_of(args[0] if args else next(iter(kwargs.values())))
        counts["block positions"] += x.shape[0] * x.shape[1]

    def head(_module, args):
        counts["head rows"] += args[0].shape[0]

    blocks = [tracer.layout.block(l) for l in range(tracer.n_layers)]
    return hooks(lambda: [b.register_forward_pre_hook(block, with_kwargs=True) for b in blocks]
                 + [tracer.layout.ln_f.register_forward_pre_hook(head)])


def main(argv=None) -> dict:
    ap = common.parser("trace_speed", __doc__)
    ap.add_argument("--facts", type=int, default=6)
    ap.add_argument("--samples", type=int, default=10, help="noise samples per fact (ROME: 10)")
    ap.add_argument("--window", type=int, help="MLP / attention window (default: massedit.evaluation.trace.default_window)")
    ap.add_argument("--batch-tokens", type=int, default=BATCH_TOKENS)
    common.add_threads(ap)
    ap.add_argument("--smoke", action="store_true", help="2-layer 64-wide model, 2 facts, 2 samples: seconds")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/trace_speed-<timestamp>.json)")
    ap.add_argument("--model", help="a real model (catalog name, directory or .gguf) instead of the world-size GPT-2")
    ap.add_argument("--facts-dir", help="with --model: a directory written by `massedit data facts` for it")
    ap.add_argument("--modes", default=",".join(MODES),
                    help=f"comma-separated, from {', '.join(MODES)} (on a 30-layer model one sample per forward "
                         "takes tens of minutes a fact)")
    args = ap.parse_args(argv)
    if bool(args.model) != bool(args.facts_dir):
        ap.error("--model and --facts-dir go together: --model smollm2-135m --facts-dir DIR (massedit data facts)")
    chosen = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "batched" not in chosen or any(m not in MODES for m in chosen):
        ap.error(f"--modes: 'batched' and any of {', '.join(MODES[1:])}, got {args.modes!r}")
    common.set_threads(args.threads)
    facts, samples = (2, 2) if args.smoke else (args.facts, args.samples)
    model, tok, requests, described = _setup_real(args.model, args.facts_dir) if args.model else _setup(args.smoke)
    tracer = Tracer(model)
    window = args.window or default_window(tracer.n_layers)
    prompts = [prepare(tok, r) for r in requests[:facts]]
    sigma = 3 * tracer.embedding_std(prompts)
    machine = machine_info()

    every = {
        "batched": lambda p, noise: trace_fact(tracer, tok, p, noise, KINDS, window, args.batch_tokens),
        "one restoration / forward": lambda p, noise: trace_fact_serial(tracer, tok, p, noise, KINDS, window),
        "one sample / forward": lambda p, noise: trace_fact_serial(tracer, tok, p, noise, KINDS, window, 1),
    }
    modes = {name: every[name] for name in MODES if name in chosen}
    d_model = described["d_model"]
    # One untimed fact of each, so that none pays the first-call costs.
    warm = make_noise(samples, prompts[0].subject[1] - prompts[0].subject[0], d_model, sigma, seed=-1)
    for run in modes.values():
        run(prompts[0], warm)

    seconds = dict.fromkeys(modes, 0.0)
    cpu_seconds = dict.fromkeys(modes, 0.0)  # on a shared machine, less disturbed by load than wall time
    work = {name: {"block positions": 0, "head rows": 0} for name in modes}
    max_diff = 0.0
    for i, prompt in enumerate(prompts):
        noise = make_noise(samples, prompt.subject[1] - prompt.subject[0], d_model, sigma, seed=i)
        results = {}
        for name, run in modes.items():
            t, c = time.perf_counter(), time.process_time()
            results[name] = run(prompt, noise)
            seconds[name] += time.perf_counter() - t
            cpu_seconds[name] += time.process_time() - c
            with _counting(tracer, work[name]):  # counted in an untimed rerun: the hooks cost time
                run(prompt, noise)
        max_diff = max([max_diff] + [float((r.effects[k] - results["batched"].effects[k]).abs().max())
                                     for r in results.values() for k in KINDS])
    if max_diff > 1e-5:
        raise AssertionError(f"batched and one-per-forward traces differ by {max_diff:.2e} (> 1e-5)")

    tokens = sum(len(p.ids) for p in prompts)
    restorations = len(KINDS) * tracer.n_layers * tokens
    report = {
        "benchmark": "trace_speed", "smoke": args.smoke,
        "model": described,
        "facts": len(prompts), "mean_prompt_tokens": round(tokens / len(prompts), 2), "samples": samples,
        "window": window, "kinds": list(KINDS), "batch_tokens": args.batch_tokens, "restorations": restorations,
        "seconds": {name: round(v, 3) for name, v in seconds.items()},
        "cpu_seconds": {name: round(v, 3) for name, v in cpu_seconds.items()},
        "speedup": {f"{name} / batched": {"wall": round(seconds[name] / seconds["batched"], 2),
                                          "cpu": round(cpu_seconds[name] / cpu_seconds["batched"], 2)}
                    for name in modes if name != "batched"},
        "work": work,
        "work_ratio": {f"{name} / batched": {k: round(v / work["batched"][k], 2) for k, v in work[name].items()}
                       for name in modes if name != "batched"},
        "max_abs_difference": max_diff,
        "machine": {**machine, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
    }
    print(f"{'mode':<26}{'wall s':>9}{'ratio':>8}{'CPU s':>9}{'ratio':>8}{'block pos.':>12}{'ratio':>8}")
    for name in modes:
        positions = work[name]["block positions"]
        print(f"{name:<26}{seconds[name]:>9.2f}{seconds[name] / seconds['batched']:>7.1f}x"
              f"{cpu_seconds[name]:>9.2f}{cpu_seconds[name] / cpu_seconds['batched']:>7.1f}x"
              f"{positions:>12}{positions / work['batched']['block positions']:>7.1f}x")
    print(f"{len(prompts)} facts, {restorations} restorations x {samples} noise "
          f"samples, window {window}, {described['n_layer']} layers x {d_model}; max |difference| {max_diff:.1e}; "
          f"load average {machine.get('load_average_at_start')} -> {report['machine']['load_average_at_end']}")
    out = common.write_json(common.result_path("trace_speed", args.out), report)
    report["json"] = str(out)
    return report


if __name__ == "__main__":
    main()
