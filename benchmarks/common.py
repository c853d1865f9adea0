"""What every benchmark shares. Each benchmark is a module run as `python -m benchmarks.NAME`
(`--help` gives its usage) that builds its parser here, sets torch's threads here, writes its
result to RESULTS_DIR/NAME-<timestamp>.json (or --out) here, and prints its tables with the
helpers below. Also here: machine info, a peak-memory meter, and the models and requests
benchmarks run on (a world build, a real model with its settings and facts, a random fallback,
generated subjects and a BPE tokenizer)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

# No hub lookups inside a timing, and no tokenizers thread pool competing with torch's threads;
# set before transformers is imported.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from massedit.files import write_text

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_WORLD = Path("/work/worlds/gpt2-default")


# ----------------------------------------------------------------------------------------------
# command line


def parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The parser of `python -m benchmarks.NAME`; its help is the module docstring."""
    return argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_threads(p: argparse.ArgumentParser, default: Optional[int] = 1) -> None:
    p.add_argument("--threads", type=int, default=default,
                   help="torch threads" + (f" (default {default})" if default else " (default: torch's choice)"))


def add_z_cache(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--z-cache", help=f"folder of stored targets (benchmarks.z_cache): {what}, and a later run whose "
                                     "z would be the same (model, facts, z settings, z layer) reuses it")


def check_z_cache(p: argparse.ArgumentParser, args) -> None:
    if args.z_cache and Path(args.z_cache).exists() and not Path(args.z_cache).is_dir():
        p.error(f"--z-cache {args.z_cache}: a file, not a folder; give a folder (it is created if missing)")


def read_hparams(p: argparse.ArgumentParser, path: Optional[str]):
    """The --hparams file's settings (None without one); a one-line usage error for a bad file,
    before anything is loaded."""
    if path is None:
        return None
    from massedit.hparams import HParamsError, load_hparams

    try:
        return load_hparams(path)
    except (HParamsError, OSError, ValueError) as err:
        p.error(f"--hparams {path}: {err}" if path not in str(err) else str(err))


def set_threads(threads: Optional[int]) -> None:
    """On a shared machine one thread is the default: two OpenMP threads spinning while other
    processes hold the cores made an edit 20-45x slower (benchmarks/README.md)."""
    if threads:
        torch.set_num_threads(threads)


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


def result_path(name: str, out=None, directory=RESULTS_DIR, suffix: str = ".json") -> Path:
    """`out` when given, else DIRECTORY/NAME-<timestamp>SUFFIX."""
    return Path(out) if out else Path(directory) / f"{name}-{stamp()}{suffix}"


def newest_result(suite: str, directory: Path = RESULTS_DIR) -> Optional[Path]:
    files = sorted(Path(directory).glob(f"{suite}-*.json"), key=lambda p: p.stat().st_mtime)
    return files[-1] if files else None


def write_json(path: Path, data: dict) -> Path:
    """Whole file or nothing (written beside, then renamed), so a file rewritten after every
    section of a long run is never half-written."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def write_result(name: str, result: dict, out=None, directory=RESULTS_DIR, plot=None) -> Path:
    """`result` as JSON at `out` or DIRECTORY/NAME-<timestamp>.json and, given `plot(result, path)`,
    its figure beside it (.png); their paths are added to `result` ("plot" also in the file)."""
    path = result_path(name, out, directory)
    if plot is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        plot(result, path.with_suffix(".png"))
        result["plot"] = str(path.with_suffix(".png"))
    write_json(path, result)
    result["json"] = str(path)
    print(f"wrote {path}" + (f" and {result['plot']}" if plot is not None else ""))
    return path


# ----------------------------------------------------------------------------------------------
# printing


def fmt(x, spec: str = ".3g", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def ratio(a: float, b: float) -> Optional[float]:
    return a / b if b > 0 else None


def pyplot():
    """matplotlib's pyplot drawing to files only (the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi: int = 110) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return str(path)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Right-aligned columns under a rule, for the terminal."""
    cells = [list(header)] + [list(r) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


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


def load_pretrained(model_dir: Path):
    """(model, tokenizer) of a saved model directory: float32, eval mode, a pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def distinct_subject_records(directory: Path, n: int):
    """The first `n` CounterFact records of DIRECTORY/counterfact.json (a world build or a
    `massedit data facts` directory) with distinct subjects (so that no two edits conflict), and
    their requests."""
    from massedit.inputs.records import load_records
    from massedit.inputs.requests import parse_records

    path = Path(directory) / "counterfact.json"
    _, records = load_records(path)
    seen, chosen = set(), []
    for rec in records:
        subject = rec["requested_rewrite"]["subject"]
        if subject not in seen:
            seen.add(subject)
            chosen.append(rec)
    chosen = chosen[:n]
    return chosen, parse_records(chosen, str(path), fmt="counterfact")


def world_editor(model, tok, world: Path, stats_dir=None, steps: Optional[int] = None,
                 samples: Optional[int] = None, context_templates=None, hparams=None):
    """A MassEditor on a world build's model with `hparams` (default: the world preset): statistics
    from DIR/corpus.txt cached in `stats_dir` (default DIR/stats); `steps` and `samples` override
    v_num_grad_steps and mom2_n_samples (smoke runs); `context_templates` make runs share templates."""
    from massedit.editor import MassEditor
    from massedit.hparams import world_preset

    hp = _changed(hparams or world_preset(model.config), v_num_grad_steps=steps, mom2_n_samples=samples)
    return MassEditor(model, tok, hp, stats_dir=stats_dir or world / "stats", corpus=world / "corpus.txt",
                      model_name=f"world-{world.name}", context_templates=context_templates, progress=False)


def _changed(hp, **changes):
    """`hp` with the changes that are given (not None)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return hp.replace(**changes) if changes else hp


# Real pretrained models (benchmarks.real, and benchmarks.memat / benchmarks.sequential with --model).

REAL_CLAMP, REAL_SAMPLES, REAL_STEPS = 4.0, 2000, 25


def load_real(name: str):
    """(model, tokenizer) of a catalog name, HF directory or .gguf, in float32."""
    from massedit.model.loading import LoadOptions, load_model

    return load_model(name, LoadOptions(torch_dtype="float32"))


def real_corpus(model, corpus: Optional[str] = None) -> str:
    """The statistics corpus of a real model: `corpus`, else the built-in one its preset names."""
    from massedit.commands._common import preset_corpus
    from massedit.hparams import default_for

    return corpus or preset_corpus(default_for(model.config))


def real_hparams(model, layers: Optional[Sequence[int]] = None, corpus: Optional[str] = None,
                 clamp: float = REAL_CLAMP, lam: Optional[float] = None, samples: int = REAL_SAMPLES,
                 steps: Optional[int] = REAL_STEPS, algorithm: str = "memit"):
    """default_for's settings with the MEMIT paper's z optimization (`steps` steps, None: default_for's;
    lr 0.5, KL 0.0625), clamp `clamp`, λ `lam` (None: default_for's), `samples` statistics texts
    labelled with the built-in `corpus`; MEMIT edits `layers` (None: default_for's), ROME their middle one."""
    from massedit.hparams import default_for
    from massedit.inputs.corpus import is_builtin

    hp = default_for(model.config, algorithm)
    layers = list(layers) if layers else default_for(model.config).layers
    hp.layers = layers if algorithm == "memit" else [layers[(len(layers) - 1) // 2]]
    hp.v_num_grad_steps, hp.v_lr, hp.kl_factor = steps or hp.v_num_grad_steps, 0.5, 0.0625
    hp.clamp_norm_factor = clamp
    if lam is not None:
        hp.mom2_update_weight = lam
    hp.mom2_n_samples = samples
    corpus = real_corpus(model, corpus)
    if is_builtin(corpus):
        hp.mom2_dataset = corpus
    return hp


def real_editor(model, tok, name: str, hp, stats_dir, corpus: Optional[str] = None, context_templates=None):
    """A MassEditor on a real model (`name` as given to load_real) with statistics of `corpus`
    (default: the real models' built-in one) filed under the model's name in `stats_dir`."""
    from massedit.editor import MassEditor
    from massedit.model.loading import model_name_for

    return MassEditor(model, tok, hp, stats_dir=stats_dir, corpus=real_corpus(model, corpus), model_name=model_name_for(name),
                      context_templates=context_templates, progress=False)


# Where a benchmark's model and facts come from: a world build (--world DIR) or a real model with
# facts from `massedit data facts` (--model NAME --facts DIR).


def add_source_arguments(p: argparse.ArgumentParser, world_help: str) -> None:
    """--world, or --model with --facts, the editor's options, --threads and --out-dir."""
    p.add_argument("--world", help=world_help)
    p.add_argument("--model", help="a real model (with --facts): catalog name (massedit models list), HF directory "
                                   "or .gguf")
    p.add_argument("--facts", help="with --model: a directory written by `massedit data facts --model M --out DIR`")
    p.add_argument("--layers", help="--model: edited layers, e.g. 1,2,3,4,5 (default: default_for's)")
    p.add_argument("--lam", type=float, help="--model: λ, mom2_update_weight (default: default_for's)")
    p.add_argument("--clamp", type=float, help=f"--model: clamp_norm_factor (default {REAL_CLAMP:g})")
    p.add_argument("--steps", type=int, help=f"v_num_grad_steps (default: the world preset's; --model: the model's "
                   f"preset's, the paper's {REAL_STEPS} for SmolLM2-135M, 50 for Gemma-3-270M)")
    p.add_argument("--samples", type=int, help=f"mom2_n_samples (default: the world preset's; --model: {REAL_SAMPLES})")
    p.add_argument("--stats-dir", help="covariance cache (default: WORLD/stats; --model: ./stats)")
    add_threads(p, default=None)
    p.add_argument("--out-dir", default=str(RESULTS_DIR), help=f"results directory (default {RESULTS_DIR})")


def check_source(p: argparse.ArgumentParser, args, world_files: Sequence[str],
                 world_build: str = "massedit world build --out DIR") -> None:
    """Exactly one of --world and --facts (with --model), the files each must hold (`world_build`:
    the command that makes a world with them), and --layers as integers (args.layer_list); a
    one-line usage error otherwise, before anything is loaded."""
    if (args.world is None) == (args.facts is None):
        p.error("give either --world DIR or --model NAME --facts DIR (exactly one of --world and --facts)")
    if args.world is not None:
        real_only = [f"--{k}" for k in ("model", "layers", "lam", "clamp") if getattr(args, k) is not None]
        if real_only:
            p.error(f"{', '.join(real_only)} go with --model and --facts; a world has its own model and preset")
        for name in world_files:
            if not (Path(args.world) / name).exists():
                p.error(f"--world {args.world}: no {name}; build the world with `{world_build}`")
    else:
        if args.model is None:
            p.error("--facts needs --model: the model the facts were built for, e.g. --model smollm2-135m")
        if not (Path(args.facts) / "counterfact.json").is_file():
            p.error(f"--facts {args.facts}: no counterfact.json; build it with "
                    "`massedit data facts --model M --out DIR`")
    try:
        args.layer_list = None if args.layers is None else [int(x) for x in args.layers.split(",")]
    except ValueError:
        p.error(f"--layers: comma-separated integers, e.g. 1,2,3,4,5, got {args.layers!r}")


def source_directory(args) -> Path:
    """The directory the records come from: the world build or the facts."""
    return Path(args.world if args.world is not None else args.facts)


def source_name(args) -> str:
    """The world's directory name, or the real model's statistics name."""
    from massedit.model.loading import model_name_for

    return Path(args.world).name if args.world is not None else model_name_for(args.model)


def source_info(args) -> dict:
    """What the JSON says about the source: the world, or the model and the facts' build report."""
    if args.world is not None:
        return {"world": str(args.world)}
    report = Path(args.facts) / "facts.json"
    built = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else {}
    return {"model": args.model, "facts": str(args.facts),
            "facts_build": {k: built.get(k) for k in ("model", "languages", "n_records", "knowledge_test", "counts")}}


def source_model(args):
    """(model, tokenizer): the world's, or the real model."""
    return load_pretrained(Path(args.world) / "model") if args.world is not None else load_real(args.model)


def source_editor(args, model, tok, hparams=None, context_templates=None):
    """The MassEditor of the source: with `hparams` (e.g. a --hparams file) or the source's default
    (the world preset; for a real model `real_hparams`), the command line's options overriding them."""
    if args.world is not None:
        return world_editor(model, tok, Path(args.world), args.stats_dir, args.steps, args.samples, context_templates,
                            hparams)
    if hparams is None:
        hp = real_hparams(model, args.layer_list, clamp=args.clamp or REAL_CLAMP, lam=args.lam,
                          samples=args.samples or REAL_SAMPLES, steps=args.steps)
    else:
        hp = _changed(hparams, layers=args.layer_list, mom2_update_weight=args.lam, clamp_norm_factor=args.clamp,
                      v_num_grad_steps=args.steps, mom2_n_samples=args.samples, mom2_dataset=real_corpus(model))
    return real_editor(model, tok, args.model, hp, args.stats_dir or "stats", context_templates=context_templates)


def load_world(world: Path, corpus_docs: Optional[int] = None) -> Setup:
    """A `massedit world build` directory: DIR/model, DIR/counterfact.json, DIR/corpus.txt."""
    from massedit.inputs.corpus import read_corpus

    world = Path(world)
    model, tok = load_pretrained(world / "model")
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


# ----------------------------------------------------------------------------------------------
# generated requests and a tokenizer for randomly initialized models (no download)

# ["{}"] + five short sentences (~8 tokens each), one after each of MEMIT's starters ("The",
# "Therefore", "Because", "I", "You"), as generated context templates look (DESIGN §2.1).
CONTEXT_TEMPLATES = [
    ["{}"],
    [
        "The weather was cold that morning. {}",
        "Therefore, we went back home early. {}",
        "Because of the rain, the game stopped. {}",
        "I read the whole book last night. {}",
        "You can find it in the old town. {}",
    ],
]

_SYLLABLES = (
    "ka ri mo zen tal vor qui lix dra pen sol um bar eth nys gor fal wen ost ril ach ved lun thra "
    "mir cal dor sen bel tho gra vin pel har ust kel ob ran fen li sar mek tor ise aud ny pha "
    "bro jas wil ket zar oon ema rud shi cor plu"
).split()

CITIES = ("Paris", "Lisbon", "Vienna", "Cape Town", "Buenos Aires", "New Ardis", "Sel Amar", "Kelvarra",
          "Osterholm", "Porto Velho", "San Miraldo", "Dublin", "Kyoto", "Mavrid", "Port Elsby")
LANGUAGES = ("French", "Scottish Gaelic", "Old Norse", "Valdic", "Basque", "Brazilian Portuguese",
             "Swiss German", "Orrish", "Finnish", "Welsh", "Low Saxon", "Tamil")
SPORTS = ("ice hockey", "water polo", "table tennis", "rugby union", "beach volleyball", "cricket",
          "Gaelic football", "figure skating", "lacrosse", "field hockey")
PROFESSIONS = ("marine biologist", "session drummer", "tax attorney", "landscape architect", "stage actor",
               "software engineer", "court stenographer", "glass blower", "film director", "beekeeper")
COUNTRIES = ("New Zealand", "Argentina", "the Czech Republic", "South Korea", "Estovia", "Marrenland",
             "the Faroe Islands", "Costa Rica", "Uzbekistan", "Brevania")
INSTRUMENTS = ("bass clarinet", "hurdy-gurdy", "steel guitar", "French horn", "harpsichord", "theremin",
               "double bass", "bagpipes")
EMPLOYERS = ("Nokia", "Vantrel Systems", "the Royal Mint", "Oslo Opera House", "Quillmark Labs",
             "Tessaro Motors", "the BBC", "Harlow & Finch")
SCHOOLS = ("the University of Kelvarra", "Trinity College Dublin", "the Sorbonne", "Heidelberg University",
           "the Royal Academy of Music", "Osterholm Polytechnic", "Kyoto University")
GENRES = ("jazz fusion", "baroque opera", "bluegrass", "synth pop", "Afrobeat", "Delta blues", "drum and bass",
          "Gregorian chant")

# 20 relation templates (subject at the start, in the middle, after a possessive: varied subject
# positions and prompt lengths), each with its pool of objects. edit_speed uses the first twelve,
# the set its published figures were measured with.
RELATIONS = (
    ("{} was born in", CITIES),
    ("The mother tongue of {} is", LANGUAGES),
    ("{} plays the sport of", SPORTS),
    ("{} works as a", PROFESSIONS),
    ("{} is a citizen of", COUNTRIES),
    ("{}'s favorite instrument is the", INSTRUMENTS),
    ("In the end, {} moved to", CITIES),
    ("Everyone knows that {} speaks", LANGUAGES),
    ("The employer of {} is", EMPLOYERS),
    ("{} is a professional", PROFESSIONS),
    ("Many years ago, {} started playing", SPORTS),
    ("The home country of {} is", COUNTRIES),
    ("{} died in the city of", CITIES),
    ("{} was educated at", SCHOOLS),
    ("After graduating, {} joined", EMPLOYERS),
    ("{} is best known for playing the", INSTRUMENTS),
    ("{} writes novels in", LANGUAGES),
    ("The music of {} is usually described as", GENRES),
    ("Critics say that {} studied at", SCHOOLS),
    ("{} performs", GENRES),
)

FILLER = (
    "the a of in on was is were had has after before during while city river market school station "
    "people morning evening season year village museum library garden harbor bridge team club music "
    "often rarely quietly later early new old small large long short famous local public private"
).split()


def _name(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(lo, hi))).capitalize()


def make_subjects(n: int, seed: int) -> list[str]:
    """n distinct invented names of two or three words (several tokens each)."""
    rng = random.Random(f"subjects-{seed}")
    out, seen = [], set()
    while len(out) < n:
        parts = [_name(rng, 2, 3), _name(rng, 2, 4)]
        if rng.random() < 0.2:
            parts.insert(1, _name(rng, 1, 2))
        s = " ".join(parts)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def make_requests(subjects: Sequence[str], seed: int, relations=RELATIONS) -> list[dict]:
    """One request per subject (distinct subjects, so none conflict): a relation template and a new
    object (often multi-word) from its pool."""
    rng = random.Random(f"requests-{seed}")
    reqs = []
    for i, subject in enumerate(subjects):
        template, objects = relations[rng.randrange(len(relations))]
        target = rng.choice(objects)
        true = rng.choice([o for o in objects if o != target])
        reqs.append({"subject": subject, "prompt": template, "target_new": target, "target_true": true,
                     "case_id": i})
    return reqs


def train_tokenizer(texts: Sequence[str], vocab_size: int):
    """A GPT-2-like byte-level BPE trained on `texts` (no download); pad = eos = <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


# ----------------------------------------------------------------------------------------------
# z-phase FLOPs


def block_params(layout, layers) -> int:
    return sum(p.numel() for l in layers for p in layout.block(l).parameters())


FLOPS_FORMULA = (
    "P(blocks) = parameters of those blocks, H = LM-head weight size (d·V), L = z layer, loss = v_loss_layer; "
    "per request i: full_i = tokens of its prompts (rewriting prompts + KL prompt), suffix_i = their tokens from the "
    "subject's last token on, labels_i = len(target)·(rewriting prompts) + 1, it_i = z_steps_i + 1 iterations, "
    "bw_i = z_steps_i backward passes. Forward = 2·params FLOPs per token; backward = 2·params per token (activation "
    "gradients only: the weights are frozen while editing). Prefix reuse: Σ_i 2·P(0..loss)·full_i (one no-grad "
    "record pass) + (it_i + bw_i)·2·(P(L+1..loss)·suffix_i + H·labels_i). Plain path: Σ_i it_i·2·(P(0..loss)·full_i "
    "+ H·labels_i) + bw_i·2·(P(L+1..loss)·full_i + H·labels_i). The reference's structure (kmeng01/memit compute_z, "
    "logits and their log-softmax at every position): Σ_i (it_i + bw_i)·2·H·full_i + it_i·2·P(0..loss)·full_i + "
    "bw_i·2·P(L+1..loss)·full_i, with the same steps. Not counted: attention scores (4·context·d per token "
    "per block, <1% here), norms, softmax, Adam, padding. mfu_backward_4x counts backward as 4·params per token (the "
    "6·N·T training convention, whose weight gradients are not computed here). MFU = FLOPs / z seconds / peak."
)


def z_accounting(tok, requests, templates, steps, path: str, p_through_loss: int, p_after_z: int,
                 head: int) -> dict:
    """Tokens and model FLOPs of the batched z phase, from the prompts and the iterations run.

    Per request i: rows = its rewriting prompts (one per context template, prompt + target[:-1])
    and its KL prompt; full_i = their tokens; suffix_i = their tokens from the subject's last token
    on; labels_i = len(target)·(rewriting prompts) + 1 (the KL position). Iterations it_i =
    z_steps_i + 1 (iteration z_steps_i is forward only); backward passes bw_i = z_steps_i.

    Tokens (tokens per second): Σ_i it_i·T_i, T_i = suffix_i with prefix reuse (each iteration runs
    forward, and backward, over the suffix only), full_i on the plain path (whole prompts). A
    token's forward and the backward that follows it in the same iteration count once.

    FLOPs, with P(blocks) = parameters of those blocks, H = LM-head weight size (d·V):
      a linear layer costs 2·params FLOPs per token forward; backward computes only activation
      gradients (weights are frozen: requires_grad=False while editing), another 2·params.
      prefix reuse:  Σ_i 2·P(0..loss)·full_i                       (one no-grad record pass)
                   + (it_i + bw_i)·2·(P(L+1..loss)·suffix_i + H·labels_i)
      plain path:    Σ_i it_i·2·(P(0..loss)·full_i + H·labels_i) + bw_i·2·(P(L+1..loss)·full_i + H·labels_i)
      "reference":   the plain path with the LM head at every position (the public compute_z takes the
                     log-softmax of all logits, then gathers the target positions), H·full_i for H·labels_i
    L = z layer, loss = v_loss_layer. Not counted: attention scores (4·context·d per token per
    block, < 1% at these prompt lengths), norms, softmax, Adam, padding positions.
    `flops_backward_4x` repeats the sum with backward = 4·params per token (the "6·N·T" training
    convention, which includes weight gradients that are not computed here) for comparison.
    """
    from massedit.compute.targets import build_prompts

    flat = [t for group in templates for t in group]
    full = suffix = labels = tokens = 0
    f_record = f_fwd = f_bwd = 0
    for req, s in zip(requests, [int(x) for x in steps]):
        p = build_prompts(tok, req, flat)
        rows = list(p.rewrite) + [p.kl]
        full_i = sum(len(e.ids) for e in rows)
        suffix_i = sum(len(e.ids) - e.subject_index for e in rows)
        labels_i = len(p.target) * len(p.rewrite) + 1
        it, bw = s + 1, s
        full, suffix, labels = full + full_i, suffix + suffix_i, labels + labels_i
        if path == "prefix":
            tokens += it * suffix_i
            f_record += 2 * p_through_loss * full_i
            f_fwd += it * 2 * (p_after_z * suffix_i + head * labels_i)
            f_bwd += bw * 2 * (p_after_z * suffix_i + head * labels_i)
        else:
            tokens += it * full_i
            at_head = full_i if path == "reference" else labels_i
            f_fwd += it * 2 * (p_through_loss * full_i + head * at_head)
            f_bwd += bw * 2 * (p_after_z * full_i + head * at_head)
    return {
        "path": path,
        "tokens": tokens,
        "prompt_tokens": full,
        "suffix_tokens": suffix,
        "label_positions": labels,
        "iterations_total": sum(int(x) + 1 for x in steps),
        "flops_record": float(f_record),
        "flops_forward": float(f_fwd),
        "flops_backward": float(f_bwd),
        "flops": float(f_record + f_fwd + f_bwd),
        "flops_backward_4x": float(f_record + f_fwd + 2 * f_bwd),
    }


def cpu_matmul_flops(seconds: float = 2.0, size: int = 1024) -> float:
    """This CPU's float32 matmul throughput (FLOP/s) at the current torch thread count: the ceiling
    the z phase's achieved FLOP/s is compared with (a size × size product, best of the repeats)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: the first product allocates
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best
