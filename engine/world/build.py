"""Build a world directory: data files, tokenizer, trained model, recall figures; cached, atomic.

Layout of a build directory DIR:
  DIR/model/               save_pretrained model + tokenizer (AutoModelForCausalLM / AutoTokenizer)
  DIR/world.json           the world: subjects, relations, templates, true facts, seed, args
  DIR/counterfact.json     CounterFact-format records (one per fact)
  DIR/zsre.json            zsRE (MEND eval format) records (one per fact)
  DIR/reference_texts.json {object: [texts]} for RS
  DIR/corpus.txt           one document per line, for covariance statistics
  DIR/build.json           args, timings, training info, recall figures
With two languages (`languages=2`, see `languages`) also DIR/world.l2.json, DIR/counterfact.l2.json
and DIR/zsre.l2.json (the same edits phrased in L2); corpus.txt and the training hold both languages,
and build.json reports recall in each ("l2_" splits) and the subjects' token overlap.

A build is written into a sibling temporary directory and renamed into place at the end, so an
interrupted build never leaves a half-written DIR. Calling again with the same arguments returns
the existing build (build.json's args equal and every file present) without retraining.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

# The one publishing mechanism (staging beside OUT, then an atomic swap) of every command that writes a model.
from massedit.publish import staged
from massedit.world import prebuilt
from massedit.world.generate import DEFAULT_RELATIONS, GENERATOR_VERSION, NAME_STYLES, generate_world, relation_ids, write_world_files
from massedit.world.languages import check_languages, second_language, subject_token_jaccard
from massedit.world.train import ARCHS, TrainConfig, preset, recall_all, torch_settings, train_model, train_tokenizer

REQUIRED_FILES = ("world.json", "counterfact.json", "zsre.json", "reference_texts.json", "corpus.txt",
                  "build.json", "model/config.json", "model/tokenizer.json")
L2_FILES = ("world.l2.json", "counterfact.l2.json", "zsre.l2.json")
# Every top-level entry a build writes: what `force` replaces in an existing directory; anything
# else there (the user's files) is kept.
BUILD_ENTRIES = tuple(sorted({f.split("/")[0] for f in REQUIRED_FILES + L2_FILES}))
# Enough people that most objects of the default relations have two holders (neighborhood prompts).
QUICK_SUBJECTS = 40
DEFAULT_SUBJECTS = 2000


class WorldExistsError(ValueError):
    pass


def build_args(n_subjects: int, arch: str, seed: int, quick: bool, cfg: TrainConfig, n_corpus_docs: int,
               relations: Sequence[str] = DEFAULT_RELATIONS, names: str = "unique", languages: int = 1) -> dict:
    """What a build depends on (the cache key). The thread count is not part of it; the name style
    and the language count only where they differ from the defaults."""
    train = cfg.to_json()
    train.pop("threads", None)
    args = {"n_subjects": n_subjects, "arch": arch, "seed": seed, "quick": quick, "corpus_docs": n_corpus_docs,
            "generator_version": GENERATOR_VERSION, "train": train, "relations": list(relations)}
    if names != "unique":
        args["names"] = names
    if languages == 2:
        args["languages"] = 2
    return args


def read_build(out_dir) -> Optional[dict]:
    p = Path(out_dir) / "build.json"
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(out_dir, languages: int = 1) -> bool:
    out = Path(out_dir)
    files = REQUIRED_FILES + (L2_FILES if languages == 2 else ())
    return all((out / f).exists() for f in files) and any((out / "model").glob("*.safetensors"))


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")


def build_world(out_dir, n_subjects: Optional[int] = None, arch: str = "gpt2", seed: int = 0, quick: bool = False,
                force: bool = False, threads: int = 2, log: Optional[Callable[[str], None]] = None,
                n_corpus_docs: Optional[int] = None, train: bool = False, relations: Sequence[str] = DEFAULT_RELATIONS,
                names: str = "unique", languages: int = 1, **overrides) -> dict:
    """Build (or reuse) a world and its trained model in `out_dir`; returns build.json's content
    plus "cached" (True when an existing build was reused) and "dir".

    n_subjects: default 2000 (20 with quick). relations: ids of generate.RELATIONS (default
    generate.DEFAULT_RELATIONS).
    names: how subjects are named, one of generate.NAME_STYLES. languages: 1, or 2 for a bilingual
    world (`massedit.world.languages`). quick: a tiny smoke world (2-layer 64-wide model, a few
    steps) for tests. overrides: TrainConfig fields (e.g. steps=2000, lr=1e-3), part of the cache key.
    An existing out_dir holding a different build (or anything else) is an error unless force.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown world arch {arch!r}; choose one of {', '.join(ARCHS)}")
    check_languages(languages)
    n_subjects = n_subjects if n_subjects is not None else (QUICK_SUBJECTS if quick else DEFAULT_SUBJECTS)
    n_corpus_docs = n_corpus_docs if n_corpus_docs is not None else (200 if quick else 2000)
    if n_corpus_docs < 1:
        raise ValueError(f"the corpus needs at least one document, got {n_corpus_docs}")
    cfg = preset(arch, quick)
    for key, value in overrides.items():
        if not hasattr(cfg, key):
            raise ValueError(f"unknown training setting {key!r}")
        setattr(cfg, key, type(getattr(cfg, key))(value))
    cfg.threads = threads
    relations = relation_ids(relations)
    if names not in NAME_STYLES:
        raise ValueError(f"names must be one of {', '.join(NAME_STYLES)}, got {names!r}")
    args = build_args(n_subjects, arch, seed, quick, cfg, n_corpus_docs, relations, names, languages)
    out = Path(out_dir).expanduser().resolve()
    say = log or (lambda m: None)

    if out.exists() and not out.is_dir():
        raise WorldExistsError(f"{out} exists and is not a directory; choose another --out (a build is a directory)")
    if out.exists() and not force:
        prev = read_build(out)
        if prev is not None and prev.get("args") == args and is_complete(out, languages):
            say(f"reusing the build in {out}")
            return {**prev, "cached": True, "dir": str(out)}
        if prev is not None:
            raise WorldExistsError(f"{out} holds a world built with other arguments; use --force to rebuild it "
                                   "or choose another --out")
        if any(out.iterdir()):
            raise WorldExistsError(f"{out} exists and is not a world build; use --force to replace it "
                                   "or choose another --out")

    archive = None if train else prebuilt.find(args)
    if archive is not None:
        return _unpack_build(out, archive, (n_subjects, seed, relations, names, languages, n_corpus_docs), say)
    if _needs_child(threads):
        return _build_in_child(out, dict(n_subjects=n_subjects, arch=arch, seed=seed, quick=quick, force=force,
                                         threads=threads, n_corpus_docs=n_corpus_docs, train=train,
                                         relations=relations, names=names, languages=languages, **overrides), log)

    t_start = time.perf_counter()
    with staged(out, owned=BUILD_ENTRIES) as tmp:
        timings = {}
        t = time.perf_counter()
        world, files = _write_data(tmp, n_subjects, seed, relations, names, languages, n_corpus_docs)
        timings["generate"] = round(time.perf_counter() - t, 2)
        say(f"world: {n_subjects} subjects x {len(world.relations)} relations = {n_subjects * len(world.relations)} facts")

        t = time.perf_counter()
        tok = train_tokenizer(world, arch, cfg.vocab_size, cfg.tokenizer_texts, languages)
        timings["tokenizer"] = round(time.perf_counter() - t, 2)

        with torch_settings(threads):
            t = time.perf_counter()
            wall0, cpu0 = time.perf_counter(), time.process_time()
            model, info = train_model(world, arch, tok, cfg, seed, log=say, languages=languages)
            timings["train"] = round(time.perf_counter() - wall0, 2)
            timings["train_cpu"] = round(time.process_time() - cpu0, 2)
            t = time.perf_counter()
            figures = recall_all(model, tok, world, languages=languages)
            timings["recall"] = round(time.perf_counter() - t, 2)

        model_dir = tmp / "model"
        model.save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
        timings["total"] = round(time.perf_counter() - t_start, 2)
        n_params = sum(p.numel() for p in model.parameters())
        build = {
            "args": args,
            "threads": threads,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": timings,
            "model": {"arch": arch, "n_layer": cfg.n_layer, "d_model": cfg.d_model, "n_head": cfg.n_head,
                      "d_ff": cfg.d_ff, "vocab_size": len(tok), "parameters": n_params},
            "training": info,
            "recall": figures,
            **({"languages": {"count": 2, "subject_token_jaccard": round(
                subject_token_jaccard(tok, world, second_language(world)), 4)}} if languages == 2 else {}),
            "files": {name: name for name in sorted(Path(f).name for f in files.values())} | {"model": "model"},
            "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                         "tokenizers": _version("tokenizers"), "python": platform.python_version()},
        }
        _write_json(tmp / "build.json", build)
    say(f"wrote {out}")
    return {**build, "cached": False, "dir": str(out)}


def _write_data(tmp: Path, n_subjects: int, seed: int, relations, names: str, languages: int, n_corpus_docs: int):
    """The world and its data files (not the model) in tmp; (world, {file name: path})."""
    world = generate_world(n_subjects, seed, relations, names)
    world_args = {"n_subjects": n_subjects, "seed": seed, **({"languages": 2} if languages == 2 else {})}
    return world, write_world_files(world, tmp, n_corpus_docs, args=world_args, languages=languages)


def _unpack_build(out: Path, archive: Path, data_args: tuple, say) -> dict:
    """A build from a shipped model: the world's files generated, the model unpacked."""
    t_start = time.perf_counter()
    with staged(out, owned=BUILD_ENTRIES) as tmp:
        _write_data(tmp, *data_args)
        build = prebuilt.unpack(archive, tmp)
        build["prebuilt"] = {"archive": archive.name, "sha256": prebuilt.sha256(archive)}
        build["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        build["seconds"] = {"total": round(time.perf_counter() - t_start, 2)}
        _write_json(tmp / "build.json", build)
    say(f"unpacked the shipped model {archive.name} into {out} (trained with these settings; "
        "`--train` trains it again)")
    return {**build, "cached": False, "dir": str(out)}


# OpenMP threads that busy-wait at every barrier are ruinous when the cores are shared: measured on
# this 2-core machine with other jobs running, 2 spinning threads trained at 145-186 tok/s against
# 860-1130 tok/s for one thread, and 560 tok/s for 2 threads with OMP_WAIT_POLICY=PASSIVE (equal to
# one thread under that load); idle, 2 threads are 1.7x faster than one. The policy is read once, when
# torch loads its OpenMP runtime, so a multi-threaded build runs in a child process that has it set.
_CHILD_ENV = "MASSEDIT_WORLD_CHILD"


def _needs_child(threads: int) -> bool:
    return threads > 1 and "OMP_WAIT_POLICY" not in os.environ and not os.environ.get(_CHILD_ENV)


def _build_in_child(out: Path, kwargs: dict, log) -> dict:
    import subprocess
    import sys

    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **{_CHILD_ENV: "1"})
    payload = json.dumps({"out": str(out), "verbose": log is not None, "kwargs": kwargs})
    code = "import sys; from massedit.world.build import _child_main; sys.exit(_child_main(sys.argv[1]))"
    proc = subprocess.Popen([sys.executable, "-c", code, payload], env=env)
    try:
        returncode = proc.wait()
    except BaseException:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for leftover in out.parent.glob(f".{out.name}.massedit-staging-*"):  # the stopped child's
            shutil.rmtree(leftover, ignore_errors=True)
        raise
    if returncode != 0:
        raise RuntimeError(f"the world build in a child process failed (exit code {returncode}); "
                           "its error is printed above")
    build = read_build(out)
    if build is None:
        raise RuntimeError(f"the world build in a child process left no {out / 'build.json'}")
    return {**build, "cached": False, "dir": str(out)}


def _child_main(payload: str) -> int:
    spec = json.loads(payload)
    log = (lambda m: print(m, flush=True)) if spec["verbose"] else None
    build_world(spec["out"], log=log, **spec["kwargs"])
    return 0


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # pragma: no cover
        return "unknown"


def load_world_model(out_dir, device: str = "cpu"):
    """(model, tokenizer, world) of a build directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from massedit.world.generate import load_world

    out = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model").to(device).eval()
    return model, tok, load_world(out)
