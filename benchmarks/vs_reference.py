"""MEMIT in massedit side by side with the public reference implementation (kmeng01/memit): the same
model, requests, cached statistics and context templates, one thread each.

    MASSEDIT_REFERENCE_PYTHON=refenv/bin/python MASSEDIT_REFERENCE_CODE=refcode \\
    python -m benchmarks.vs_reference --model smollm2-135m --facts DIR --layers 4,5,6,7,8 --n 10,50 \\
        --stats-dir stats --corpus pydoc+sampled --samples 2000 [--stats-docs 200] [--threads 1] [--out FILE]

The reference does not run under transformers 5, so it runs in its own environment (transformers
4.57; benchmarks/README.md shows how to make it): this process edits with massedit, then starts
benchmarks/reference_memit.py under --reference-python on a job file (model directory, requests,
templates, the reference's hparams) and reads back its ΔW and timings. That driver lists the
runtime patches the reference needs for a Llama model saved by transformers 5.

For each size n (the first n records of --facts DIR/counterfact.json): the wall time of both edits
and of their phases — z (target vectors; the reference's is one request at a time), keys (K^l and
h^L read per layer), covariance (statistics read from the disk cache; each size starts from a fresh
editor, and the reference's COV_CACHE is cleared), other (the rest: solves, weight writes) — the
ratios reference / massedit, and per edited layer ‖ΔW_massedit − ΔW_ref‖_F / ‖ΔW_ref‖_F.
Statistics are computed once by massedit before any timing (--corpus, --samples) and both read the
same file; context templates are generated once by massedit and given to both.

With --stats-docs N (0 skips it): the statistics pass over the first N documents of --corpus,
massedit's (``second_moments``, all edited layers in one forward) against the reference's
``rome/layer_stats.py`` (one pass per layer, each stopped at its layer): tokens per second, the
ratio, and how far the two sums are apart per layer.

--model takes what massedit's loading takes (catalog name, HF directory, .gguf); the reference
loads the same float32 weights from an HF directory: the directory given, the catalog's converted
one, else this model saved into a temporary one. Before any model is loaded the reference's
environment is checked (python, code, transformers 4.x); the probe texts' ids and logits are
compared across the two environments before any timing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from benchmarks import common

PYTHON_ENV = "MASSEDIT_REFERENCE_PYTHON"
CODE_ENV = "MASSEDIT_REFERENCE_CODE"
DRIVER = "benchmarks.reference_memit"
REPO = Path(__file__).resolve().parents[1]
SETUP = "see benchmarks/README.md, 'MEMIT against the reference'"
# The reference's MEMITHyperParams fields (kmeng01/memit memit/memit_hparams.py), in its order.
REFERENCE_FIELDS = ("layers", "layer_selection", "fact_token", "v_num_grad_steps", "v_lr", "v_loss_layer",
                    "v_weight_decay", "clamp_norm_factor", "kl_factor", "mom2_adjustment", "mom2_update_weight",
                    "rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module",
                    "lm_head_module", "mom2_dataset", "mom2_n_samples", "mom2_dtype")
MODULE_FIELDS = ("rewrite_module_tmp", "layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module",
                 "lm_head_module")
# compute_z stops a request below this loss; it is not a setting there.
REFERENCE_EARLY_STOP = 5e-2
PHASES = ("z", "keys", "covariance", "other", "total")
PROBES = 3


# ----------------------------------------------------------------------------------------------
# the reference's side, as pure functions


def reference_hparams(hp: dict, modules: dict, n_layers: int) -> dict:
    """The reference's MEMITHyperParams fields for massedit's hparams `hp` (MEMITHyperParams.to_dict())
    on a model with `n_layers` blocks whose module paths are `modules` (MODULE_FIELDS, resolved:
    massedit's None means the architecture table's, which the reference has no notion of)."""
    if hp.get("z_early_stop_loss", REFERENCE_EARLY_STOP) != REFERENCE_EARLY_STOP:
        raise ValueError(f"z_early_stop_loss {hp['z_early_stop_loss']:g}: the reference's z loop stops at "
                         f"{REFERENCE_EARLY_STOP:g}, hard-coded; use that")
    if hp.get("z_site", "residual") != "residual":
        raise ValueError(f"z_site {hp['z_site']!r}: the reference optimizes δ on the residual stream only; use "
                         "z_site residual")
    missing = [k for k in MODULE_FIELDS if not modules.get(k)]
    if missing:
        raise ValueError(f"module paths missing for the reference: {', '.join(missing)}")
    out = {}
    for key in REFERENCE_FIELDS:
        if key in MODULE_FIELDS:
            out[key] = modules[key]
        elif key == "v_loss_layer":
            out[key] = n_layers - 1 if hp.get(key) is None else hp[key]
        else:
            out[key] = hp[key]
    out["layers"] = list(out["layers"])
    return out


def module_paths(model, layout) -> dict:
    """The six module paths the reference reads, from massedit's layout of `model`. A tied LM head
    is named by the embedding that owns the weight: named_parameters lists a shared weight once,
    under its first owner, so the reference's lookup of "lm_head.weight" would find nothing."""
    spec = layout.spec
    head = spec.lm_head_module
    embedding = model.get_input_embeddings()
    if embedding is not None and layout.lm_head.weight is embedding.weight:
        head = next(name for name, m in model.named_modules() if m is embedding)
    return {"rewrite_module_tmp": spec.rewrite_module_tmp, "layer_module_tmp": spec.layer_module_tmp,
            "mlp_module_tmp": spec.mlp_module_tmp or spec.rewrite_module_tmp.rsplit(".", 1)[0],
            "attn_module_tmp": spec.attn_module_tmp, "ln_f_module": spec.ln_f_module, "lm_head_module": head}


def reference_requests(requests) -> list[dict]:
    """EditRequests in the reference's CounterFact form (it adds the target's leading space itself)."""
    return [{"case_id": i, "prompt": r.prompt, "subject": r.subject, "target_new": {"str": r.target_new}}
            for i, r in enumerate(requests)]


def relative_differences(ours: dict, reference: dict) -> dict[str, float]:
    """‖ours − reference‖_F / ‖reference‖_F per weight name; both must hold the same names and shapes."""
    if set(ours) != set(reference):
        raise ValueError(f"the edits changed different weights: massedit {sorted(ours)}, reference {sorted(reference)}")
    out = {}
    for name in sorted(ours, key=_layer_order):
        a, b = ours[name].double(), reference[name].double()
        if a.shape != b.shape:
            raise ValueError(f"{name}: massedit's ΔW is {tuple(a.shape)}, the reference's {tuple(b.shape)}")
        norm = float(b.norm())
        out[name] = float((a - b).norm()) / norm if norm > 0 else float((a - b).norm())
    return out


def _layer_order(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in name.split("."))


def _layer_of(name: str) -> str:
    """The layer index in a weight name ("model.layers.4.mlp.down_proj.weight" → "4")."""
    return next((p for p in name.split(".") if p.isdigit()), name)


def phase_timings(timings: dict) -> dict:
    """PHASES from an edit's timings; "other" is what the named phases leave of the total."""
    named = {p: float(timings.get(p, 0.0)) for p in ("z", "keys", "covariance")}
    total = float(timings["total"])
    return {**named, "other": total - sum(named.values()), "total": total}


# ----------------------------------------------------------------------------------------------
# the reference's environment


def check_reference(python: Optional[str], code: Optional[str]) -> tuple[Path, Path]:
    """The reference's python and code, checked without loading anything; a one-line error otherwise."""
    if not python:
        raise SystemExit(f"vs_reference: no reference python: pass --reference-python PATH or set {PYTHON_ENV} "
                              f"(a python with transformers 4.57; {SETUP})")
    if not os.access(python, os.X_OK) or Path(python).is_dir():
        raise SystemExit(f"vs_reference: --reference-python {python}: not an executable; create the reference's "
                              f"environment ({SETUP})")
    if not code:
        raise SystemExit(f"vs_reference: no reference code: pass --reference-code DIR or set {CODE_ENV} (a checkout "
                              "of kmeng01/memit)")
    if not (Path(code) / "memit" / "memit_main.py").is_file():
        raise SystemExit(f"vs_reference: --reference-code {code}: no memit/memit_main.py; give a checkout of "
                              "kmeng01/memit (git clone https://github.com/kmeng01/memit DIR)")
    return Path(python), Path(code).resolve()


def run_driver(python: Path, code: Path, args: Sequence[str], threads: int, log: Optional[Path] = None) -> str:
    """The driver's stdout; its one-line error (or its log's last line) as ours when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.pop("PYTHONPATH", None)  # our venv's packages must not leak into the reference's
    cmd = [str(python), "-m", DRIVER, "--reference-code", str(code), "--threads", str(threads), *args]
    with open(log or os.devnull, "w", encoding="utf-8") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err if log else subprocess.PIPE, text=True, env=env,
                              cwd=REPO)
    if proc.returncode == 0:
        return proc.stdout
    said = [line[len("error: "):] for line in proc.stdout.splitlines() if line.startswith("error: ")]
    if not said:
        lines = (log.read_text(encoding="utf-8") if log else proc.stderr or "").strip().splitlines()
        said = [(lines[-1] if lines else f"exit status {proc.returncode}")
                + (f" (log: {log})" if log else f"; check the reference's environment ({SETUP})")]
    raise SystemExit(f"vs_reference: reference: {said[-1]}")


def reference_versions(python: Path, code: Path) -> dict:
    versions = json.loads(run_driver(python, code, ["--check"], 1))
    if not versions["transformers"].startswith("4."):
        raise SystemExit(f"vs_reference: {python} has transformers {versions['transformers']}; the reference needs "
                              f"4.x (4.57; {SETUP})")
    return versions


# ----------------------------------------------------------------------------------------------
# the run


def reference_model_dir(name: str, model, tok, scratch: Path) -> Path:
    """An HF directory with the float32 weights massedit loaded for `name`."""
    from massedit.model import catalog

    if catalog.is_catalog_name(name):
        return Path(catalog.resolve(name))
    if (Path(name) / "config.json").is_file() and (Path(name) / "tokenizer.json").is_file():
        return Path(name)
    folder = scratch / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise SystemExit(f"vs_reference: --n: comma-separated sizes, e.g. 10,50, got {text!r}") from None
    if sizes[0] < 1:
        raise SystemExit(f"vs_reference: --n: sizes must be at least 1, got {text!r}")
    return sizes


def _probe(model, tok, requests, folder: Path) -> dict:
    """Texts whose ids and logits the driver must reproduce."""
    from safetensors.torch import save_file

    texts = [r.text() for r in requests[:PROBES]]
    ids = [list(tok(t)["input_ids"]) for t in texts]
    if ids[0] != list(tok(texts[0], add_special_tokens=False)["input_ids"]):
        raise SystemExit("vs_reference: the tokenizer adds special tokens (BOS/EOS), and the reference's token positions "
                         "assume one that adds none (GPT-2's, SmolLM2's): its subject index would be off by them")
    with torch.no_grad():
        logits = {f"probe{i}": model(torch.tensor([row])).logits[0].contiguous() for i, row in enumerate(ids)}
    save_file(logits, str(folder / "probe-logits.safetensors"))
    return {"texts": texts, "ids": ids, "logits_file": str(folder / "probe-logits.safetensors")}


def _massedit_edit(model, tok, hp, args, corpus: str, name: str, templates, requests) -> tuple[dict, dict, dict]:
    """(phase timings, ΔW per weight name, z FLOPs of massedit's path and of the reference's structure
    at the same steps) of massedit's MEMIT edit, from a fresh editor."""
    from massedit import MassEditor
    from massedit.compute.targets import supports_prefix_reuse

    editor = MassEditor(model, tok, hp, stats_dir=args.stats_dir, corpus=corpus, model_name=name, progress=False)
    editor.set_context_templates(templates)
    result = editor.edit(requests, apply=False)
    layout, z_layer = editor.layout, max(hp.layers)
    loss_layer = layout.n_layers - 1 if hp.v_loss_layer is None else hp.v_loss_layer
    path = "prefix" if editor.reuse_prefix and supports_prefix_reuse(model) else "plain"
    flops = {side: common.z_accounting(tok, result.requests, templates, result.z_steps.tolist(), kind,
                                       common.block_params(layout, range(0, loss_layer + 1)),
                                       common.block_params(layout, range(z_layer + 1, loss_layer + 1)),
                                       layout.lm_head.weight.numel())["flops"]
             for side, kind in (("massedit", path), ("reference", "reference"))}
    return (phase_timings(result.timings), {wd.name: wd.dense(torch.float64) for wd in result.delta.weights},
            {"massedit_path": path, **flops})


def _massedit_statistics(model, layout, tok, texts: list, layers) -> tuple[dict, dict]:
    from massedit.compute.stats import second_moments

    t0 = time.perf_counter()
    sums = second_moments(model, layout, tok, texts, layers, torch.float32, progress=False)
    seconds = time.perf_counter() - t0
    tokens = next(iter(sums.values()))[1]
    return {"documents": len(texts), "seconds": seconds, "tokens": tokens}, sums


def _statistics_row(ours: dict, ours_sums: dict, reference: dict) -> dict:
    from safetensors.torch import load_file

    ref_sums = load_file(reference["sums_file"])
    ref_tokens = reference["tokens"]
    agreement = relative_differences({str(l): s / c for l, (s, c) in ours_sums.items()},
                                     {l: s / ref_tokens for l, s in ref_sums.items()})
    row = {"massedit": {**ours, "tokens_per_s": ours["tokens"] / ours["seconds"]},
           "reference": {k: v for k, v in reference.items() if k != "sums_file"}}
    row["reference"]["tokens_per_s"] = ref_tokens / reference["seconds"]
    row["ratio"] = reference["seconds"] / ours["seconds"]
    row["covariance_rel_diff"] = agreement
    return row


def z_flops_row(flops: dict, ours_s: float, ref_s: float, peak: float) -> dict:
    """Each side's z FLOPs (common.FLOPS_FORMULA) over its z time, as a fraction of this CPU's float32
    matmul throughput: where both run near it, the z ratio cannot pass the FLOP ratio."""
    row = {"formula": common.FLOPS_FORMULA, "cpu_matmul_flops_per_s": peak, "massedit_path": flops["massedit_path"],
           "flop_ratio": common.ratio(flops["reference"], flops["massedit"])}
    for side, seconds in (("massedit", ours_s), ("reference", ref_s)):
        rate = flops[side] / seconds if seconds else None
        row[side] = {"flops": flops[side], "flops_per_s": rate, "fraction_of_matmul": rate / peak if rate else None}
    return row


def _size_table(row: dict) -> str:
    ours, ref = row["massedit"], row["reference"]
    lines = [[p, common.fmt(ours[p], ".2f"), common.fmt(ref[p], ".2f"), common.fmt(common.ratio(ref[p], ours[p]), ".2f")]
             for p in PHASES]
    diffs = ", ".join(f"{_layer_of(name)}: {d:.2g}" for name, d in row["delta_rel_diff"].items())
    f = row["z_flops"]
    return (f"n = {row['n']}\n" + common.text_table(["phase", "massedit s", "reference s", "reference/massedit"], lines)
            + f"\nΔW relative difference per layer: {diffs}"
            + f"\nz FLOPs: massedit {f['massedit']['flops'] / 1e12:.2f} T ({f['massedit_path']} path, "
              f"{100 * f['massedit']['fraction_of_matmul']:.0f}% of this CPU's matmul), reference structure "
              f"{f['reference']['flops'] / 1e12:.2f} T ({100 * f['reference']['fraction_of_matmul']:.0f}%): "
              f"FLOP ratio {f['flop_ratio']:.2f}, the z ratio where both run at the same fraction")


def _statistics_table(row: dict) -> str:
    ours, ref = row["massedit"], row["reference"]
    lines = [["massedit (one pass)", str(ours["tokens"]), f"{ours['seconds']:.2f}", f"{ours['tokens_per_s']:.0f}"],
             [f"reference ({len(ref['passes'])} passes)", str(ref["tokens"]), f"{ref['seconds']:.2f}",
              f"{ref['tokens_per_s']:.0f}"]]
    diffs = ", ".join(f"{l}: {d:.2g}" for l, d in row["covariance_rel_diff"].items())
    return (f"statistics over {ours['documents']} documents: reference/massedit time {row['ratio']:.2f}\n"
            + common.text_table(["", "tokens", "seconds", "tokens/s"], lines)
            + f"\ncovariance relative difference per layer: {diffs}")


def _compare(args, model, tok, hp, ref_hp: dict, layout, corpus: str, name: str, templates, requests,
             sizes: list[int], python: Path, code: Path, scratch: Path, result: dict) -> None:
    """massedit's edits (and statistics pass), then the reference's on the same job; their rows into `result`."""
    from safetensors.torch import load_file

    from massedit.compute.stats import stats_folder
    from massedit.inputs.corpus import corpus_texts

    probe = _probe(model, tok, requests, scratch)  # its tokenizer check comes before any timing
    ours = {}
    for n in sizes:
        print(f"massedit: MEMIT on {n} requests", flush=True)
        ours[n] = _massedit_edit(model, tok, hp, args, corpus, name, templates, requests[:n])
    stats_texts, ours_stats = [], None
    if args.stats_docs:
        stats_texts = corpus_texts(corpus, args.stats_docs, model, tok,
                                   cache_dir=stats_folder(args.stats_dir, name, hp.mom2_dataset))
        print(f"massedit: statistics over {len(stats_texts)} documents", flush=True)
        ours_stats = _massedit_statistics(model, layout, tok, stats_texts, hp.layers)
    job = {"model_dir": str(reference_model_dir(args.model, model, tok, scratch).resolve()), "model_name": name,
           "attn_implementation": model.config._attn_implementation,
           "special_tokens": {k: str(v) for k, v in tok.special_tokens_map.items()
                              if k in ("bos_token", "eos_token", "unk_token", "pad_token")},
           "stats_dir": str(Path(args.stats_dir).resolve()), "hparams": ref_hp, "context_templates": templates,
           "requests": reference_requests(requests), "sizes": sizes, "stats_texts": stats_texts,
           "probe": probe}
    (scratch / "job.json").write_text(json.dumps(job), encoding="utf-8")
    print(f"reference: MEMIT on {', '.join(map(str, sizes))} requests"
          + (f", statistics over {len(stats_texts)} documents" if stats_texts else ""), flush=True)
    run_driver(python, code, ["--job", str(scratch / "job.json")], args.threads, scratch / "reference.log")
    reference = json.loads((scratch / "reference.json").read_text(encoding="utf-8"))
    result["checks"] = reference["checks"]

    peak = common.cpu_matmul_flops()
    for ref_row in reference["sizes"]:
        n = ref_row["n"]
        timings, delta, flops = ours[n]
        row = {"n": n, "massedit": timings, "reference": phase_timings(ref_row["timings"]),
               "delta_rel_diff": relative_differences(delta, load_file(ref_row["delta_file"]))}
        row["ratio"] = {p: common.ratio(row["reference"][p], timings[p]) for p in PHASES}
        row["z_flops"] = z_flops_row(flops, timings["z"], row["reference"]["z"], peak)
        result["sizes"].append(row)
        print(_size_table(row), flush=True)
    if ours_stats is not None:
        result["statistics"] = _statistics_row(*ours_stats, reference["statistics"])
        print(_statistics_table(result["statistics"]), flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    p = common.parser("vs_reference", __doc__)
    p.add_argument("--model", required=True, help="catalog name (massedit models list), HF directory or .gguf")
    p.add_argument("--facts", required=True, help="directory with counterfact.json (`massedit data facts`)")
    p.add_argument("--n", default="10", help="comma-separated edit sizes, the first n records (default 10)")
    p.add_argument("--layers", help="edited layers, e.g. 4,5,6,7,8 (default: default_for's)")
    p.add_argument("--steps", type=int, default=common.REAL_STEPS,
                   help=f"v_num_grad_steps (default {common.REAL_STEPS}, the paper's)")
    p.add_argument("--stats-dir", default="stats", help="statistics cache (default ./stats)")
    p.add_argument("--corpus", help="statistics corpus (default: the real models' built-in one)")
    p.add_argument("--samples", type=int, default=common.REAL_SAMPLES,
                   help=f"mom2_n_samples (default {common.REAL_SAMPLES})")
    p.add_argument("--stats-docs", type=int, default=0,
                   help="documents for the statistics-speed part (default 0: skipped)")
    p.add_argument("--reference-python", default=os.environ.get(PYTHON_ENV),
                   help=f"python of the reference's environment (default ${PYTHON_ENV})")
    p.add_argument("--reference-code", default=os.environ.get(CODE_ENV),
                   help=f"a checkout of kmeng01/memit (default ${CODE_ENV})")
    p.add_argument("--out", help="JSON path (default benchmarks/results/vs_reference-<time>.json)")
    common.add_threads(p)
    args = p.parse_args(argv)
    sizes = _sizes(args.n)
    try:
        layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    except ValueError:
        p.error(f"--layers: comma-separated integers, e.g. 4,5,6,7,8, got {args.layers!r}")
    if args.stats_docs < 0 or args.samples < 1 or args.steps < 1:
        p.error("--stats-docs must be >= 0, --samples and --steps >= 1")
    facts = Path(args.facts) / "counterfact.json"
    if not facts.is_file():
        p.error(f"--facts {args.facts}: no counterfact.json; build it with `massedit data facts --model M --out DIR`")
    python, code = check_reference(args.reference_python, args.reference_code)
    versions = reference_versions(python, code)
    common.set_threads(args.threads)

    from massedit import MassEditor
    from massedit.inputs.requests import parse_records
    from massedit.model.arch import ModelLayout
    from massedit.model.loading import LoadOptions, load_model, model_name_for

    records = json.loads(facts.read_text(encoding="utf-8"))[: sizes[-1]]
    if len(records) < sizes[-1]:
        raise SystemExit(f"vs_reference: --n {args.n}: {facts} holds {len(records)} records; ask for at most that many")
    name = model_name_for(args.model)
    model, tok = load_model(args.model, LoadOptions(torch_dtype="float32"))
    corpus = common.real_corpus(model, args.corpus)
    requests = parse_records(records, str(facts))
    hp = common.real_hparams(model, layers, corpus, samples=args.samples, steps=args.steps)
    layout = ModelLayout(model, hp.module_overrides())
    try:
        ref_hp = reference_hparams(hp.to_dict(), module_paths(model, layout), layout.n_layers)
    except ValueError as err:
        raise SystemExit(f"vs_reference: {err}") from None

    editor = MassEditor(model, tok, hp, stats_dir=args.stats_dir, corpus=corpus, model_name=name, progress=False)
    t0 = time.perf_counter()
    editor.solvers()  # statistics computed here once (then cached on disk), before any timing
    statistics_seconds = time.perf_counter() - t0
    templates = editor.context_templates()
    result: dict = {"benchmark": "vs_reference", "model": args.model, "facts": str(facts.resolve()),
                    "machine": common.machine_info(), "reference": versions, "hparams": hp.to_dict(), "reference_hparams": ref_hp,
                    "context_templates": templates, "statistics_seconds": round(statistics_seconds, 1), "sizes": []}

    scratch = Path(tempfile.mkdtemp(prefix="vs_reference-"))
    try:
        _compare(args, model, tok, hp, ref_hp, layout, corpus, name, templates, requests, sizes, python, code, scratch,
                 result)
    except BaseException:
        if not (scratch / "reference.log").exists():  # else kept: the error names the log
            shutil.rmtree(scratch)
        raise
    shutil.rmtree(scratch)
    common.write_result("vs_reference", result, out=args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
