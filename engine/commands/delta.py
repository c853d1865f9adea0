"""Apply a saved delta to a checkpoint on disk, or revert it, without loading the model.

Examples:
  massedit delta apply --checkpoint ckpt/step-2000 --delta edited/delta.safetensors --out ckpt/step-2000-edited
  massedit delta revert --checkpoint ckpt/step-2000-edited --delta edited/delta.safetensors --out ckpt/step-2000
  massedit delta apply --checkpoint ckpt/dcp-step-2000 --delta delta.safetensors --out ckpt/dcp-step-2000 --force

--checkpoint is a Hugging Face directory (model.safetensors, or shards and model.safetensors.index.json;
the weights are streamed one block of rows at a time, every other file is copied) or a
torch.distributed.checkpoint directory (loaded and saved in this one process). The result equals
loading the model, applying (reverting) the delta and saving it, bit for bit. Refused, before
anything is written: a checkpoint that already holds the delta (apply) or does not hold it
(revert), and another model's checkpoint (by the weight digests and config hash the delta records).
OUT appears all at once when complete; --out equal to --checkpoint with --force replaces it the same
way, so the original stays until the new one is whole.
"""
from __future__ import annotations

import os
from pathlib import Path

from massedit.publish import check_out, claim, staged
from massedit.edits.checkpoint import prepare, weight_files
from massedit.edits.delta import EditDelta

NAME = "delta"
HELP = "apply or revert a saved delta on a checkpoint directory (safetensors or DCP)"


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for action, help_ in (("apply", "write --checkpoint plus the delta to --out"),
                          ("revert", "write --checkpoint minus the delta (its exact base) to --out")):
        q = sub.add_parser(action, help=help_)
        q.add_argument("--checkpoint", required=True, metavar="DIR", help="safetensors or DCP checkpoint directory")
        q.add_argument("--delta", required=True, metavar="FILE", help="a delta (massedit edit writes OUT/delta.safetensors)")
        q.add_argument("--out", required=True, metavar="DIR", help="new or empty directory (--force: any, "
                       "--checkpoint included)")
        q.add_argument("--force", action="store_true", help="write into a non-empty --out")


def run(args) -> int:
    checkpoint, out = Path(args.checkpoint), Path(args.out)
    if Path(os.path.realpath(checkpoint)) in Path(os.path.realpath(out)).parents:
        raise ValueError(f"--out {out} is inside --checkpoint {checkpoint}; choose a directory outside it")
    check_out(out, args.force)
    with claim(out):
        delta = EditDelta.load(args.delta)
        edit = prepare(checkpoint, delta, revert=args.action == "revert")
        # The old --out's weight files are superseded, even ones this checkpoint's layout does not name.
        with staged(out, owned=weight_files(out) if out.is_dir() else ()) as stage:
            edit.write(stage)
    done = f"reverted {args.delta} from" if edit.revert else f"applied {args.delta} to"
    print(f"{done} {checkpoint} ({edit.format}, {len(delta.weights)} weights): wrote {out}/")
    return 0
