"""Compute covariance statistics E[k kᵀ] for the given layers in one pass over a corpus.

Example:
  massedit stats --model ./world/model --corpus ./world/corpus.txt --layers 1,2,3 \\
      --samples 2000 --stats-dir stats
Files land in <stats-dir>/<model-name>/<dataset>_stats/<module>_<dtype>_mom2_<samples>.npz,
the reference MEMIT layout, so existing statistics are reused by `massedit edit`. Each file also
records the model's identity: a file of another model under the same name is refused (pass
another --model-name), and an unmarked file (reference layout) counts as cached only with an
explicit --model-name. A corpus with fewer documents than --samples is used whole, with a
warning; the file keeps the --samples name and records the true number as sample_size.

Under torchrun / accelerate launch each process streams its share of the corpus batches, the
sums are all-reduced and rank 0 writes the files:
  torchrun --nproc_per_node 4 -m massedit.cli stats --model ./world/model --corpus ./world/corpus.txt \
      --layers 1,2,3 --stats-dir stats
"""
from __future__ import annotations

import json

from massedit.model import parallel
from massedit.model.arch import ModelLayout
from massedit.inputs.corpus import BUILTIN, is_builtin
from massedit.model.loading import load_model, model_name_for
from massedit.compute.stats import DTYPES, check_dataset_name, check_model_name, check_storable, covariances, stats_file
from massedit.commands._common import add_deprecated_alias, add_model_arguments, default_corpus, options_from_args
from massedit.publish import check_dir

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
    p.add_argument("--corpus", help=".txt (one document per line), .jsonl ('text'), a saved dataset dir, or a built-in "
                   f"corpus: {' | '.join(BUILTIN)} (the default for the models of `massedit models list`)")
    p.add_argument("--layers", required=True, help="comma-separated layer indices, e.g. 3,4,5")
    p.add_argument("--samples", type=int, default=100000, help="number of corpus documents (default 100000)")
    p.add_argument("--stats-dtype", default="float32", choices=sorted(DTYPES), help="statistics dtype (default float32)")
    add_deprecated_alias(p, "--dtype", "--stats-dtype", "stats_dtype", sorted(DTYPES))
    p.add_argument("--stats-dir", required=True, help="directory of the statistics cache")
    p.add_argument("--dataset", help="dataset name in the file path (hparams' mom2_dataset; default: the built-in "
                   "corpus's name, else wikipedia)")
    p.add_argument("--model-name", help="name in the file path (default: the model directory's name); naming it "
                   "also accepts existing reference-layout files, which carry no model fingerprint")
    p.add_argument("--force", action="store_true", help="recompute even if the files exist")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    add_model_arguments(p)


def run(args) -> int:
    layers = parse_layers(args.layers)
    if args.samples < 1:
        raise ValueError("--samples must be at least 1")
    world = parallel.world()
    check_storable(args.stats_dtype)
    check_dir(args.stats_dir, "--stats-dir")
    name = check_model_name(args.model_name or model_name_for(args.model))
    corpus = default_corpus(args.model, args.corpus)
    if corpus is None:
        raise ValueError(f"--corpus is required for {args.model}: a text file, a saved dataset, or one of {', '.join(BUILTIN)}")
    dataset = args.dataset or (corpus if is_builtin(corpus) else "wikipedia")
    check_dataset_name(dataset)
    model, tok = load_model(args.model, options_from_args(args))
    layout = ModelLayout(model)
    layout.check_layers(layers, "--layers")
    paths = {l: stats_file(args.stats_dir, name, dataset, layout.rewrite_name(l), args.stats_dtype, args.samples)
             for l in layers}
    todo = [l for l in layers if args.force or not paths[l].exists()]
    if todo:  # where the pass writes its checkpoint and files, before the pass
        check_dir(paths[todo[0]].parent, "--stats-dir")
    _, done = covariances(model, layout, tok, layers, args.stats_dir, name, dataset, args.stats_dtype, args.samples,
                          corpus, progress=not args.quiet, explicit_name=args.model_name is not None, force=args.force)
    if not world.main:
        return 0
    summary = {"files": {str(l): str(p) for l, p in paths.items()}, "computed_layers": done.computed,
               "documents": done.documents, "tokens": done.tokens, "processes": world.size,
               "seconds": round(done.seconds, 3)}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for l in layers:
            print(f"layer {l}: {'computed' if l in done.computed else 'cached  '}  {paths[l]}")
        if done.computed:
            print(f"{done.documents} documents, {done.tokens} tokens, {summary['seconds']} s")
    return 0
