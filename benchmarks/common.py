"""Shared helpers of the benchmark suites: machine info, a peak-memory meter, result files,
and the model setup (a world build, or a random fallback with synthetic requests)."""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

RESULTS_DIR = Path(__file__).resolve().parents[1] / "results"
DEFAULT_WORLD = Path("/work/worlds/gpt2-default")


# ----------------------------------------------------------------------------------------------
# machine


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import transformers

    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


# ----------------------------------------------------------------------------------------------
# memory


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def malloc_trim() -> bool:
    """Return the C heap's free memory to the OS (glibc), so that RSS growth shows new use."""
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


class PeakMemory:
    """Peak memory of a block of code, measured from outside the allocator.

    CPU: the process's resident set size (RSS, /proc/self/statm) sampled every `interval` seconds
    by a background thread; `peak_mb` is the highest sample minus the RSS at entry (so memory
    already held, e.g. the model, is not counted; short spikes between samples can be missed).
    Freed C-heap memory is first returned to the OS (glibc malloc_trim), else memory that an
    earlier run freed but the allocator kept would hide this run's use.
    tracemalloc is not used: it sees only Python-object allocations, not torch's tensor memory.
    ru_maxrss (the process's lifetime high-water mark) is also recorded, for reference.
    CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the allocated
    memory at entry (`cuda_peak_mb`).
    """

    def __init__(self, interval: float = 0.01):
        self.interval = interval
        self.result: dict = {}

    def __enter__(self) -> "PeakMemory":
        self._trimmed = malloc_trim()
        self._base = _rss_bytes()
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._cuda_base = torch.cuda.memory_allocated()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        mb = 1 << 20
        self.result = {
            "peak_mb": round((self._peak - self._base) / mb, 2),
            "rss_at_start_mb": round(self._base / mb, 1),
            "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "method": f"RSS sampled every {self.interval * 1000:g} ms, peak minus RSS at start"
                      + (" (after malloc_trim)" if self._trimmed else ""),
        }
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.result["cuda_peak_mb"] = round((torch.cuda.max_memory_allocated() - self._cuda_base) / mb, 2)


# ----------------------------------------------------------------------------------------------
# results


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def newest_result(suite: str, directory: Path = RESULTS_DIR) -> Optional[Path]:
    files = sorted(Path(directory).glob(f"{suite}-*.json"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# models and requests


@dataclass
class Setup:
    model: object
    tok: object
    records: list  # CounterFact records (the edit requests are their requested_rewrite)
    corpus: list  # statistics corpus, one document per item
    info: dict = field(default_factory=dict)
    fallback: bool = False


def world_ready(world: Path) -> bool:
    world = Path(world)
    return all((world / p).exists() for p in ("build.json", "model/config.json", "counterfact.json", "corpus.txt"))


def load_world(world: Path, corpus_docs: Optional[int] = None) -> Setup:
    """A `massedit world build` directory: DIR/model, DIR/counterfact.json, DIR/corpus.txt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from massedit.inputs.corpus import read_corpus

    world = Path(world)
    model = AutoModelForCausalLM.from_pretrained(world / "model", dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(world / "model")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    records = json.loads((world / "counterfact.json").read_text(encoding="utf-8"))
    corpus = read_corpus(world / "corpus.txt", corpus_docs)
    build = json.loads((world / "build.json").read_text(encoding="utf-8"))
    cfg = model.config
    info = {
        "kind": "world", "path": str(world), "model_type": cfg.model_type,
        "n_layer": getattr(cfg, "num_hidden_layers", None), "d_model": getattr(cfg, "hidden_size", None),
        "d_ff": getattr(cfg, "n_inner", None) or getattr(cfg, "intermediate_size", None),
        "vocab_size": len(tok), "records": len(records), "corpus_docs": len(corpus),
        "build_args": build.get("args"), "build_recall": build.get("recall"),
    }
    return Setup(model, tok, records, corpus, info)


def random_fallback(smoke: bool, seed: int = 0, n_subjects: Optional[int] = None) -> Setup:
    """An untrained GPT-2 with the world generator's tokenizer, CounterFact records and corpus.

    For development and smoke tests only: timings are representative of the model size, quality
    figures are meaningless (nothing was learnt, so there are no facts to edit)."""
    from massedit.world.generate import corpus_documents, counterfact_records, generate_world
    from massedit.world.train import make_model, preset, train_tokenizer

    n_subjects = n_subjects or (20 if smoke else 120)
    world = generate_world(n_subjects, seed)
    records = counterfact_records(world)
    corpus = corpus_documents(world, 40 if smoke else 400)
    cfg = preset("gpt2", quick=True)
    if not smoke:  # a mid-size stand-in: 4 layers, 128 wide
        cfg.n_layer, cfg.d_model, cfg.d_ff, cfg.n_head = 4, 128, 512, 4
    tok = train_tokenizer(world, "gpt2", cfg.vocab_size, n_texts=1500 if smoke else 4000)
    model = make_model("gpt2", tok, cfg, seed)
    model.eval()
    info = {
        "kind": "random-fallback",
        "note": "untrained GPT-2 and synthetic requests (massedit.world.generate): timings only; quality "
                "figures are meaningless",
        "model_type": "gpt2", "n_layer": cfg.n_layer, "d_model": cfg.d_model, "d_ff": cfg.d_ff,
        "vocab_size": len(tok), "records": len(records), "corpus_docs": len(corpus),
    }
    return Setup(model, tok, records, corpus, info, fallback=True)
