"""Compute covariance statistics E[k kᵀ] for the given layers in one pass over a corpus.

Example:
  massedit stats --model ./world/model --corpus ./world/corpus.txt --layers 1,2,3 \\
      --samples 2000 --stats-dir stats
Files land in <stats-dir>/<model-name>/<dataset>_stats/<module>_<dtype>_mom2_<samples>.npz,
the reference MEMIT layout, so existing statistics are reused by `massedit edit`.

Under torchrun / accelerate launch each process streams its share of the corpus batches, the
sums are all-reduced and rank 0 writes the files:
  torchrun --nproc_per_node 4 -m massedit.cli stats --model ./world/model --corpus ./world/corpus.txt \
      --layers 1,2,3 --stats-dir stats
"""
from __future__ import annotations

import json
import time

import torch

from massedit import parallel
from massedit.arch import ModelLayout
from massedit.corpus import read_corpus
from massedit.loading import load_model, model_name_for
from massedit.stats import DTYPES, second_moments, stats_file, write_stats

NAME = "stats"
HELP = "compute and cache covariance statistics for edited layers"


def parse_layers(text: str) -> list[int]:
    try:
        layers = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"--layers must be comma-separated integers like 3,4,5; got {text!r}") from None
    if not layers:
        raise ValueError("--layers is empty; give e.g. --layers 3,4,5")
    return sorted(set(layers))


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="hub name or local directory")
    p.add_argument("--corpus", required=True, help=".txt (one document per line), .jsonl ('text'), or a saved dataset dir")
    p.add_argument("--layers", required=True, help="comma-separated layer indices, e.g. 3,4,5")
    p.add_argument("--samples", type=int, default=100000, help="number of corpus documents (default 100000)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="statistics dtype (default float32)")
    p.add_argument("--stats-dir", required=True, help="directory of the statistics cache")
    p.add_argument("--dataset", default="wikipedia", help="dataset name in the file path (hparams' mom2_dataset)")
    p.add_argument("--model-name", help="name in the file path (default: model directory's basename)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--model-dtype", default="auto", help="auto | float32 | float16 | bfloat16")
    p.add_argument("--force", action="store_true", help="recompute even if the files exist")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")


def run(args) -> int:
    layers = parse_layers(args.layers)
    if args.samples < 1:
        raise ValueError("--samples must be at least 1")
    world = parallel.world()
    model, tok = load_model(args.model, parallel.local_device(args.device), args.model_dtype)
    layout = ModelLayout(model)
    layout.check_layers(layers)
    name = args.model_name or model_name_for(args.model)
    paths = {l: stats_file(args.stats_dir, name, args.dataset, layout.rewrite_name(l), args.dtype, args.samples)
             for l in layers}
    # Rank 0's view of the cache decides, so that all ranks join the same pass.
    todo = parallel.from_main(lambda: [l for l in layers if args.force or not paths[l].exists()])
    t0 = time.perf_counter()
    n_docs = tokens = 0
    if todo:
        texts = read_corpus(args.corpus, args.samples)
        n_docs = len(texts)
        acc = torch.float64 if args.dtype == "float64" else torch.float32
        checkpoint = paths[todo[0]].with_name(f"pass_{'-'.join(map(str, todo))}_{args.dtype}.partial.npz")
        moments = second_moments(model, layout, tok, texts, todo, acc, progress=not args.quiet, checkpoint=checkpoint)
        for l, (mom2, count) in moments.items():
            if world.main:
                write_stats(paths[l], mom2.to(DTYPES[args.dtype]), count, n_docs)
            tokens = count
        parallel.barrier()
    if not world.main:
        return 0
    summary = {"files": {str(l): str(p) for l, p in paths.items()}, "computed_layers": todo, "documents": n_docs,
               "tokens": tokens, "processes": world.size, "seconds": round(time.perf_counter() - t0, 3)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for l in layers:
            print(f"layer {l}: {'computed' if l in todo else 'cached  '}  {paths[l]}")
        if todo:
            print(f"{n_docs} documents, {tokens} tokens, {summary['seconds']} s")
    return 0
