"""What offload costs: one MEMIT edit (3 requests, layers 1-3, statistics excluded) of the tests'
toy-world GPT-2 and Llama (6 layers × 64), plain against the placements of tests/test_devices.py
(edited blocks on disk, embeddings and head on disk, alternate blocks on disk, accelerate.cpu_offload).

    python -m benchmarks.offload

Prints the best of 3 wall times per placement and its ratio to the plain model's, side by side.
"""
from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path

from benchmarks import common

# The placements and the toy world are the device tests' own, so that the costs are of what they check.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_devices import PLACEMENTS, _load  # noqa: E402
from test_pipeline import WORLD_REQUESTS, train_world, world_editor  # noqa: E402


def edit_seconds(path: Path, tok, sentences, placement: str, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        work = Path(tempfile.mkdtemp())
        editor = world_editor(_load(path, placement, work / "offload"), tok, sentences, work / "stats")
        editor.solvers()
        t = time.perf_counter()
        editor.edit(WORLD_REQUESTS)
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> None:
    p = common.parser("offload", __doc__)
    common.add_threads(p, default=None)
    common.set_threads(p.parse_args(argv).threads)
    warnings.filterwarnings("ignore")
    for arch in ("gpt2", "llama"):
        model, tok, sentences = train_world(arch=arch)
        path = Path(tempfile.mkdtemp()) / "model"
        model.save_pretrained(path)
        tok.save_pretrained(path)
        times = {p: edit_seconds(path, tok, sentences, p) for p in ("plain", *PLACEMENTS)}
        print(arch, "  ".join(f"{p} {s:.2f} s ({s / times['plain']:.2f}x)" for p, s in times.items()))


if __name__ == "__main__":
    main()
