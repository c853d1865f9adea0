"""What the subcommands share on the command line: the user-error type the entry point prints as
one line, and the model-loading flags turned into `LoadOptions` (the library's loading takes no
argparse)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from massedit.model import catalog, parallel
from massedit.model.loading import DEVICE_MAPS, DTYPES, QUANTIZE, LoadOptions

# For a real model whose preset names no built-in corpus; each catalog model's preset names the one
# measured best for it (README, "Real models": SmolLM2-135M pydoc, Gemma-3-270M pydoc+sampled).
REAL_MODEL_CORPUS = "pydoc"


class UserError(Exception):
    """An error caused by the user's input: printed as one line, exit code 2."""


class _Deprecated(argparse.Action):
    """An old spelling of a flag: stores into the new flag's dest, with a note on stderr."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"massedit: note: {option_string} is deprecated here; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser, old: str, new: str, dest: str, choices) -> None:
    parser.add_argument(old, dest=dest, action=_Deprecated, new=new, choices=choices, default=argparse.SUPPRESS,
                        help=f"deprecated spelling of {new}")


def add_model_arguments(parser, dtype_alias: bool = False) -> None:
    """The loading flags of every command that loads a model. dtype_alias: the command took the
    model dtype as --dtype before; that spelling keeps working, with a note."""
    g = parser.add_argument_group("model loading")
    g.add_argument("--device", default="auto",
                   help="auto (GPUs when available, sharded with Accelerate) | cpu | cuda | cuda:N")
    g.add_argument("--device-map", metavar="MAP",
                   help=f"{' | '.join(DEVICE_MAPS)} | FILE.json (module name → GPU index, cuda:N, cpu or disk)")
    g.add_argument("--max-memory", metavar="SPEC", help='per-device memory for a device map, e.g. "0=20GiB,cpu=64GiB"')
    g.add_argument("--offload-folder", metavar="DIR", help="where a device map's disk-offloaded weights (and edits "
                   "to them) are kept")
    g.add_argument("--quantize", choices=QUANTIZE, help="load the base in 8-bit or 4-bit (nf4) with bitsandbytes")
    g.add_argument("--model-dtype", default="auto", choices=tuple(DTYPES),
                   help="auto (checkpoint's dtype on GPU, float32 on CPU) | float32 | float16 | bfloat16")
    if dtype_alias:
        add_deprecated_alias(g, "--dtype", "--model-dtype", "model_dtype", tuple(DTYPES))


def preset_corpus(hp) -> str:
    """The built-in corpus of a real model's statistics: the one its hparams (its preset) name, else
    REAL_MODEL_CORPUS."""
    from massedit.inputs.corpus import is_builtin

    return hp.mom2_dataset if is_builtin(hp.mom2_dataset) else REAL_MODEL_CORPUS


def default_corpus(model: str, corpus: Optional[str]) -> Optional[str]:
    """The corpus for missing statistics: the one given, else for a model of the catalog (massedit models
    list), whose pretraining text cannot be had offline, the built-in corpus its preset names."""
    if corpus is not None or not catalog.is_catalog_name(model):
        return corpus
    from massedit.hparams import preset

    return preset_corpus(preset(catalog.get_spec(model).name))


def options_from_args(args) -> LoadOptions:
    # Under torchrun each rank loads onto its own GPU unless told otherwise (massedit.model.parallel).
    return LoadOptions(device=parallel.local_device(args.device), device_map=args.device_map, max_memory=args.max_memory,
                       offload_folder=args.offload_folder, quantization=args.quantize, torch_dtype=args.model_dtype)
