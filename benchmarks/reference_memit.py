"""The public reference MEMIT (kmeng01/memit) on a job written by benchmarks.vs_reference.

    REFERENCE_PYTHON -m benchmarks.reference_memit --reference-code DIR --job JOB.json --threads 1
    REFERENCE_PYTHON -m benchmarks.reference_memit --reference-code DIR --check

Runs in the reference's own environment (transformers 4.57: the reference does not run under
transformers 5), from the repository's root, so it imports nothing from massedit or benchmarks. The job names the model directory, the
requests, the context templates, the reference's hparams and the statistics directory; for each
size n it runs ``memit.memit_main.execute_memit`` on the first n requests and writes ΔW per layer
(JOB_DIR/reference-delta-n<n>.safetensors) and, in JOB_DIR/reference.json, the wall time of the
edit and of its phases: z (compute_z calls), keys (compute_ks and the h^L read per layer), the
statistics read (get_cov). With statistics texts in the job it also times the reference's
``rome/layer_stats.py`` over them, one pass per layer, and writes its sums
(JOB_DIR/reference-mom2.safetensors). ``--check`` only imports the reference with the patches
below and prints the versions: the parent's check before it loads any model.

The reference's files are not edited; these runtime patches make it run here, on CPU, on a Llama
model (SmolLM2-135M: LlamaForCausalLM, tied embeddings) saved by transformers 5:

* CUDA → CPU. compute_z and get_cov hard-code "cuda" (``.to("cuda")``, ``device="cuda"``):
  Tensor.to, BatchEncoding.to, torch.tensor and torch.zeros map a CUDA device to the CPU.
* ``datasets``: rome/layer_stats.py imports it at module level and calls load_dataset only when a
  statistics file is missing. A stub module stands in whose load_dataset raises (no download of
  wikipedia, ever); the statistics part passes its texts in place of load_dataset's result.
  layer_stats is always called with download=False (it would fetch a missing file from
  memit.baulab.info), and its DataLoader runs without worker processes and pinning: one thread
  each, as massedit's pass runs, its tokenization inside the timed loop like massedit's.
* Config aliases: the reference reads ``n_embd`` (compute_z's δ) and ``n_positions``
  (layer_stats), which a Llama config calls hidden_size and max_position_embeddings.
* RoPE θ: transformers 5 writes ``rope_parameters`` in config.json, which 4.57 ignores, silently
  using θ = 1e4 instead of the model's (SmolLM2: 1e5; logits off by up to 2.95). rope_theta (and
  rope_scaling, for a non-default RoPE type) is set from it before the model is built.
* Decoder layers return a bare tensor in 4.57, while the reference's hooks on "model.layers.{}"
  expect a tuple (compute_z does ``cur_out[0][i, idx, :] += delta`` and reads ``output[0]``). A
  forward hook registered first on each layer wraps its output in a 1-tuple, so every hook the
  reference adds later sees (and edits in place) output[0]; forward pre-hooks on the next layer and
  on the final norm unwrap it, so the model's loop runs on. Checked at load: logits unchanged by
  the patch, and a change written into output[0] of a layer reaches the logits.
* Tokenizer: transformers 5 writes the class ``TokenizersBackend``, which 4.57 does not know; the
  tokenizer is PreTrainedTokenizerFast(tokenizer_file=tokenizer.json) with the special tokens the
  parent's tokenizer has, padding on the right (compute_z places the targets by the attention
  mask's length, which assumes it). Checked: the ids of the job's probe texts equal the parent's.
* Tied LM head: named parameters list a tied weight once, under the embedding, so
  ``get_parameter(model, "lm_head.weight")`` finds nothing; the parent names the embedding as
  lm_head_module (it has no bias, so compute_z's bias lookup falls back to zeros, as for lm_head).
* Statistics: get_cov files the model under ``config._name_or_path``, so that is set to the name
  massedit files its statistics under, and STATS_DIR to the job's directory: both read one cached
  file; a missing one is an error before the model is loaded. massedit names a file by the sample
  count asked (mom2_n_samples) and records in sample_size the documents it had (fewer for a shorter
  corpus), while the reference's tally takes a file whose sample_size differs from the count asked
  for a cache miss and would recompute: layer_stats's tally is asked for the file's own sample_size.
* Context templates: CONTEXT_TEMPLATES_CACHE is set to massedit's, so nothing is generated and z
  is optimized on the same prompts.

The logits of the job's probe texts are compared with the parent's (same weights, same RoPE).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
import types
from collections import defaultdict
from pathlib import Path
from typing import Callable, Optional

# No hub lookups, no tokenizers thread pool beside torch's one thread.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

REFERENCE_FILES = ("memit/memit_main.py", "memit/compute_z.py", "memit/compute_ks.py", "rome/layer_stats.py",
                   "rome/repr_tools.py", "util/nethook.py", "globals.yml")
# The largest |Δlogit| between the parent's model and the one loaded here that counts as the same
# weights and config: float32 kernels of two transformers versions may differ in the last bits,
# while RoPE at θ = 1e4 instead of 1e5 moves even a random 4-layer Llama's logits by 9e-4.
LOGITS_TOLERANCE = 1e-4


class DriverError(RuntimeError):
    """What is wrong, in one line, and how to fix it."""


def check_reference_code(code: Path) -> None:
    missing = [f for f in REFERENCE_FILES if not (code / f).is_file()]
    if missing:
        raise DriverError(f"--reference-code {code}: no {', '.join(missing)}; give a checkout of kmeng01/memit "
                          "(git clone https://github.com/kmeng01/memit DIR)")


# ----------------------------------------------------------------------------------------------
# patches that apply before the reference is imported


def _cpu(device):
    return "cpu" if isinstance(device, (str, torch.device)) and str(device).startswith("cuda") else device


def pin_to_cpu() -> None:
    """The reference's hard-coded "cuda" devices become the CPU."""
    from transformers import BatchEncoding

    def to_cpu(method: Callable) -> Callable:
        def to(self, *args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu(kwargs["device"])
            return method(self, *(_cpu(a) for a in args), **kwargs)
        return to

    def made_on_cpu(factory: Callable) -> Callable:
        def make(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu(kwargs["device"])
            return factory(*args, **kwargs)
        return make

    torch.Tensor.to = to_cpu(torch.Tensor.to)
    BatchEncoding.to = to_cpu(BatchEncoding.to)
    torch.tensor = made_on_cpu(torch.tensor)
    torch.zeros = made_on_cpu(torch.zeros)


def stub_datasets() -> None:
    def load_dataset(*args, **kwargs):
        raise DriverError("the reference asked for a dataset (it would compute statistics from wikipedia): a "
                          "statistics file is missing or does not match; compute them with massedit first")

    sys.modules["datasets"] = types.SimpleNamespace(load_dataset=load_dataset, __name__="datasets")


def import_reference(code: Path) -> types.SimpleNamespace:
    """The reference's modules, patched; util.globals reads globals.yml from the working directory."""
    check_reference_code(code)
    pin_to_cpu()
    stub_datasets()
    sys.path.insert(0, str(code))
    cwd = os.getcwd()
    os.chdir(code)
    try:
        import memit.memit_main as memit_main
        import rome.layer_stats as layer_stats
        from memit.memit_hparams import MEMITHyperParams
        from util import nethook
    finally:
        os.chdir(cwd)
    return types.SimpleNamespace(memit_main=memit_main, layer_stats=layer_stats, nethook=nethook,
                                 MEMITHyperParams=MEMITHyperParams)


def code_digest(code: Path) -> str:
    h = hashlib.sha256()
    for f in REFERENCE_FILES:
        h.update((code / f).read_bytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# the model and tokenizer as the reference must see them


def load_config(model_dir: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    written = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    rope = written.get("rope_parameters")
    if rope and "rope_theta" not in written:
        config.rope_theta = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config.rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    config.n_embd = config.hidden_size
    config.n_positions = config.max_position_embeddings
    return config


def load_tokenizer(model_dir: Path, special_tokens: dict):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), **special_tokens)
    tok.padding_side = "right"
    return tok


def tuple_layer_outputs(model) -> None:
    """Each decoder layer's output as its hooks see it: a 1-tuple (see the module docstring)."""
    def as_tuple(module, args, output):
        return (output,) if isinstance(output, torch.Tensor) else output

    def untuple(module, args, kwargs):
        if args and isinstance(args[0], tuple):
            return (args[0][0], *args[1:]), kwargs
        return None

    for layer in model.model.layers:
        layer.register_forward_hook(as_tuple, prepend=True)
        layer.register_forward_pre_hook(untuple, with_kwargs=True)
    model.model.norm.register_forward_pre_hook(untuple, with_kwargs=True)


def check_tuple_patch(model, ref, ids: torch.Tensor, plain_logits: torch.Tensor) -> None:
    """The patched model computes what it did before, and a change to output[0] reaches the logits."""
    with torch.no_grad():
        if not torch.equal(model(ids).logits, plain_logits):
            raise DriverError("the 1-tuple patch of the decoder layers changed the logits; it must not")
        layer = f"model.layers.{len(model.model.layers) // 2}"

        def nudge(output, layer):
            output[0][:, -1, :] += 1.0
            return output

        with ref.nethook.Trace(model, layer, edit_output=nudge):
            edited = model(ids).logits
    if torch.equal(edited[:, -1], plain_logits[:, -1]) or not torch.equal(edited[:, :-1], plain_logits[:, :-1]):
        raise DriverError(f"an edit of {layer}'s output[0] does not reach the logits as it should; the 1-tuple patch "
                          "no longer matches this transformers version's decoder loop")


def load_model(job: dict, ref):
    from transformers import AutoModelForCausalLM

    model_dir = Path(job["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=load_config(model_dir), dtype=torch.float32,
                                                 attn_implementation=job["attn_implementation"])
    model.eval()
    # get_cov files statistics under this name.
    model.config._name_or_path = job["model_name"]
    tok = load_tokenizer(model_dir, job["special_tokens"])
    probe = job["probe"]
    ids = [tok(text)["input_ids"] for text in probe["texts"]]
    if ids != probe["ids"]:
        raise DriverError(f"the tokenizer loaded from {model_dir / 'tokenizer.json'} does not give the parent's token "
                          f"ids for {probe['texts'][0]!r} and the other probe texts")
    from safetensors.torch import load_file

    expected = load_file(probe["logits_file"])
    checks = {}
    for i, row in enumerate(ids):
        x = torch.tensor([row])
        with torch.no_grad():
            logits = model(x).logits
        if i == 0:
            tuple_layer_outputs(model)
            check_tuple_patch(model, ref, x, logits)
        diff = float((logits[0] - expected[f"probe{i}"]).abs().max())
        checks["logits_max_abs_diff"] = max(checks.get("logits_max_abs_diff", 0.0), diff)
    if checks["logits_max_abs_diff"] > LOGITS_TOLERANCE:
        raise DriverError(f"the model loaded here gives logits up to {checks['logits_max_abs_diff']:.3g} away from the "
                          f"parent's on the probe texts (tolerance {LOGITS_TOLERANCE:g}): not the same weights or "
                          "config (RoPE?)")
    return model, tok, checks


# ----------------------------------------------------------------------------------------------
# the edit


def check_statistics(job: dict) -> dict[str, int]:
    """The documents behind each statistics file the edit reads; a missing file is an error (the
    reference would compute it from a downloaded wikipedia)."""
    hp = job["hparams"]
    folder = Path(job["stats_dir"]) / job["model_name"] / f"{hp['mom2_dataset']}_stats"
    documents = {}
    for layer in hp["layers"]:
        module = hp["rewrite_module_tmp"].format(layer)
        path = folder / f"{module}_{hp['mom2_dtype']}_mom2_{hp['mom2_n_samples']}.npz"
        if not path.is_file():
            raise DriverError(f"no statistics file {path}; compute it with massedit first")
        documents[str(layer)] = sample_size(path)
    return documents


def sample_size(path) -> int:
    import numpy as np

    with np.load(path) as data:
        return int(data["sample_size"])


def cached_as_filed(tally: Callable) -> Callable:
    """tally asked for the sample_size a cached file records (see the module docstring)."""
    def call(stat, dataset, cache=None, **kwargs):
        if cache is not None and Path(cache).is_file():
            kwargs["sample_size"] = sample_size(cache)
        return tally(stat, dataset, cache=cache, **kwargs)
    return call


def no_download(layer_stats: Callable) -> Callable:
    def call(*args, **kwargs):
        return layer_stats(*args, **{**kwargs, "download": False})
    return call


def timed(fn: Callable, phase: str, timings: dict) -> Callable:
    def call(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            timings[phase] += time.perf_counter() - t0
    return call


def edit(ref, model, tok, job: dict, n: int) -> tuple[dict, dict]:
    """(ΔW per weight name in the weight's layout, timings) of execute_memit on the first n requests."""
    main = ref.memit_main
    hp = ref.MEMITHyperParams(**job["hparams"])
    timings: dict = defaultdict(float)
    originals = {name: getattr(main, name) for name in ("compute_z", "compute_ks", "get_module_input_output_at_words",
                                                         "get_cov")}
    main.compute_z = timed(originals["compute_z"], "z", timings)
    main.compute_ks = timed(originals["compute_ks"], "keys", timings)
    # execute_memit's own call: h^L at the z layer, read again for every edited layer.
    main.get_module_input_output_at_words = timed(originals["get_module_input_output_at_words"], "keys", timings)
    main.get_cov = timed(originals["get_cov"], "covariance", timings)
    main.COV_CACHE.clear()  # each size reads its statistics from disk, as massedit's fresh editor does
    try:
        t0 = time.perf_counter()
        deltas = main.execute_memit(model, tok, job["requests"][:n], hp)
        timings["total"] = time.perf_counter() - t0
    finally:
        for name, fn in originals.items():
            setattr(main, name, fn)
    weights = dict(model.named_parameters())
    # What apply_memit_to_model adds to each weight.
    dw = {name: main.upd_matrix_match_shape(adj_k @ resid.T, weights[name].shape).float().contiguous()
          for name, (adj_k, resid) in deltas.items()}
    return dw, dict(timings)


# ----------------------------------------------------------------------------------------------
# statistics


def quiet(loader, total=None):
    """layer_stats's progress bar, off (its own progress=None fails: it is called with total=)."""
    return loader


def statistics(ref, model, tok, job: dict, out: Path) -> dict:
    """rome/layer_stats.py over the job's texts, one pass per layer (its structure), timed."""
    from safetensors.torch import save_file

    texts = job["stats_texts"]
    module = ref.layer_stats
    load, tally = module.load_dataset, module.tally
    module.load_dataset = lambda *args, **kwargs: {"train": [{"text": t} for t in texts]}
    module.tally = lambda *args, **kwargs: tally(*args, **{**kwargs, "num_workers": 0, "pin_memory": False})
    passes, sums = [], {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for layer in job["hparams"]["layers"]:
                name = job["hparams"]["rewrite_module_tmp"].format(layer)
                t0 = time.perf_counter()
                # "wikipedia": a name layer_stats knows (it looks up the name's config before calling
                # load_dataset, which returns the job's texts here); the directory is empty and thrown away.
                stat = module.layer_stats(model, tok, name, tmp, "wikipedia", ["mom2"], sample_size=len(texts),
                                          precision="float32", download=False, progress=quiet, force_recompute=True)
                seconds = time.perf_counter() - t0
                passes.append({"layer": layer, "seconds": seconds, "tokens": int(stat.mom2.count)})
                sums[str(layer)] = stat.mom2.mom2.contiguous()
    finally:
        module.load_dataset, module.tally = load, tally
    save_file(sums, str(out / "reference-mom2.safetensors"))
    return {"documents": len(texts), "passes": passes, "seconds": sum(p["seconds"] for p in passes),
            "tokens": passes[0]["tokens"] if passes else 0, "sums_file": str(out / "reference-mom2.safetensors")}


# ----------------------------------------------------------------------------------------------


def versions(code: Path) -> dict:
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
            "reference_code": str(code), "reference_code_sha256": code_digest(code)}


def run(job_path: Path, code: Path) -> dict:
    from safetensors.torch import save_file

    job = json.loads(job_path.read_text(encoding="utf-8"))
    out = job_path.parent
    documents = check_statistics(job)
    ref = import_reference(code)
    ref.memit_main.STATS_DIR = Path(job["stats_dir"])
    ref.memit_main.layer_stats = no_download(ref.memit_main.layer_stats)
    ref.layer_stats.tally = cached_as_filed(ref.layer_stats.tally)
    ref.memit_main.CONTEXT_TEMPLATES_CACHE = job["context_templates"]
    model, tok, checks = load_model(job, ref)
    checks["statistics_documents"] = documents
    result = {"versions": versions(code), "checks": checks, "sizes": []}
    for n in job["sizes"]:
        print(f"reference: MEMIT on {n} requests", file=sys.stderr, flush=True)
        dw, timings = edit(ref, model, tok, job, n)
        path = out / f"reference-delta-n{n}.safetensors"
        save_file(dw, str(path))
        result["sizes"].append({"n": n, "timings": timings, "delta_file": str(path)})
    if job.get("stats_texts"):
        print(f"reference: statistics over {len(job['stats_texts'])} documents", file=sys.stderr, flush=True)
        result["statistics"] = statistics(ref, model, tok, job, out)
    (out / "reference.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.reference_memit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-code", required=True, help="a checkout of kmeng01/memit")
    p.add_argument("--job", help="the job file benchmarks.vs_reference wrote")
    p.add_argument("--check", action="store_true", help="import the reference, print the versions, stop")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if not args.check and not args.job:
        p.error("give --job JOB.json (or --check)")
    torch.set_num_threads(args.threads)
    code = Path(args.reference_code).resolve()
    # The reference prints every z step; those lines go to stderr's log, not to the parent's stdout.
    try:
        if args.check:
            import_reference(code)
            print(json.dumps(versions(code)))
            return 0
        with contextlib.redirect_stdout(sys.stderr):
            run(Path(args.job).resolve(), code)
    except DriverError as err:
        print(f"error: {err}")  # the parent's one-line message
        return 2
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
