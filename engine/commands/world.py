"""Build a synthetic knowledge world and a small model trained on it (no downloads).

Examples:
  massedit world build --out worlds/gpt2                  # 2000 subjects x 3 relations, GPT-2 style
  massedit world build --out worlds/small --subjects 200 --relations all --steps 1400   # the earlier default
  massedit world build --out worlds/llama --arch llama    # Llama style (SentencePiece-like tokenizer)
  massedit world build --out /tmp/w --quick               # tiny smoke world (seconds)
  massedit world build --out worlds/bi --languages 2      # bilingual: L1 and an invented L2
  massedit world recall --world worlds/gpt2 --model edited_model_dir
  massedit world pack --world worlds/gpt2 --out gpt2.tar.xz   # the model as one deterministic archive

`build` writes DIR/model (model + tokenizer, loadable with from_pretrained), DIR/counterfact.json,
DIR/zsre.json, DIR/reference_texts.json, DIR/corpus.txt (for `massedit stats --corpus`),
DIR/world.json and DIR/build.json (args, timings, recall figures). A second call with the same
arguments reuses the build; --force rebuilds. Where a model trained with exactly the asked settings
ships with massedit (the default GPT-2 world), it is unpacked instead of trained; --train trains
anyway (with the recorded thread count, the result packs to the shipped file's bytes). Builds are written to a temporary directory and
renamed into place, so an interrupted build leaves nothing half-written.

Recall figures (teacher-forced, top-1 over every object token) are reported for the CounterFact
rewrite prompts (training templates), held-out paraphrase templates, rewrite prompts after a
random filler sentence, and the zsRE questions (training / held-out), with the mean probability of
the true object; with --languages 2 the same splits in L2 (counterfact.l2.json, zsre.l2.json: the
same case_ids and edits phrased in L2) and the Jaccard overlap of the subjects' tokens in the two
spellings.
"""
from __future__ import annotations

import json

from massedit.commands._common import UserError
from massedit.publish import claim
from massedit.model.loading import dtype_kwargs

NAME = "world"
HELP = "build a synthetic knowledge world and a small model trained on it"


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    b = sub.add_parser("build", help="generate the world, train the tokenizer and the model")
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--subjects", type=int, default=None, help="number of subjects (default 2000; 20 with --quick)")
    b.add_argument("--relations", default=None,
                   help="comma-separated relation ids, or 'all' for the ten (default: P19,P106,P1303)")
    b.add_argument("--names", default="unique", choices=("unique", "pooled"),
                   help="subject names: invented anew (default) or given name + surname from shared pools")
    b.add_argument("--arch", default="gpt2", choices=("gpt2", "llama"), help="model family (default gpt2)")
    b.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    b.add_argument("--quick", action="store_true", help="tiny smoke world: 2-layer model, a few training steps")
    b.add_argument("--force", action="store_true", help="rebuild even if DIR holds a build")
    b.add_argument("--threads", type=int, default=2, help="torch threads for training (default 2)")
    b.add_argument("--steps", type=int, default=None, help="override the training steps (default 6000)")
    b.add_argument("--train", action="store_true",
                   help="train the model even where a model built with these settings ships with massedit")
    b.add_argument("--corpus-docs", type=int, default=None, help="documents in corpus.txt (default 2000)")
    b.add_argument("--languages", type=int, default=1,
                   help="1, or 2 for a second, invented language L2 in the world and the training (default 1)")
    b.add_argument("--quiet", action="store_true", help="no training progress")
    b.add_argument("--json", action="store_true", help="print build.json instead of a summary")
    k = sub.add_parser("pack", help="write a world build's model as one deterministic archive (how shipped models are made)")
    k.add_argument("--world", required=True, help="a world build directory")
    k.add_argument("--out", required=True, help="archive to write (.tar.xz)")
    r = sub.add_parser("recall", help="measure recall of a world's facts for its model or another one")
    r.add_argument("--world", required=True, help="a world build directory")
    r.add_argument("--model", default=None, help="model directory (default: WORLD/model)")
    r.add_argument("--limit", type=int, default=None, help="only the first N facts of each split")
    r.add_argument("--json", action="store_true", help="print JSON")


def _table(figures: dict) -> list[str]:
    lines = [f"  {'split':<20} {'n':>5} {'first':>7} {'full':>7} {'p_true':>7}"]
    for split, f in figures.items():
        lines.append(f"  {split:<20} {f['n']:>5} {f['first_top1']:>7.3f} {f['full_top1']:>7.3f} {f['p_true']:>7.3f}")
    return lines


def run(args) -> int:
    if args.action == "build":
        return _build(args)
    if args.action == "recall":
        return _recall(args)
    if args.action == "pack":
        return _pack(args)
    raise UserError("give an action: massedit world build --out DIR | massedit world recall --world DIR | "
                    "massedit world pack --world DIR --out FILE")


def _relations(text):
    from massedit.world.generate import DEFAULT_RELATIONS, RELATIONS

    if text is None:
        return DEFAULT_RELATIONS
    return [r[0] for r in RELATIONS] if text == "all" else text.split(",")


def _pack(args) -> int:
    from massedit.world import prebuilt

    if not str(args.out).endswith(".tar.xz"):
        raise UserError(f"--out {args.out}: the archive's name must end in .tar.xz")
    try:
        digest = prebuilt.pack(args.world, args.out)
    except ValueError as e:
        raise UserError(str(e)) from None
    print(f"wrote {args.out}  sha256 {digest}")
    return 0


def _build(args) -> int:
    from massedit.world.build import build_world

    if args.subjects is not None and args.subjects < 12:
        raise UserError(f"--subjects must be at least 12, got {args.subjects}")
    if args.threads < 1:
        raise UserError("--threads must be at least 1")
    if args.languages not in (1, 2):
        raise UserError(f"--languages must be 1 or 2, got {args.languages}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    overrides = {"steps": args.steps} if args.steps is not None else {}
    log = None if (args.quiet or args.json) else print
    with claim(args.out):
        info = build_world(args.out, n_subjects=args.subjects, arch=args.arch, seed=args.seed, quick=args.quick,
                           force=args.force, threads=args.threads, log=log, n_corpus_docs=args.corpus_docs,
                           train=args.train, relations=_relations(args.relations), names=args.names,
                           languages=args.languages, **overrides)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    d = info["dir"]
    m = info["model"]
    print(f"{'reused' if info['cached'] else 'built'} world in {d}")
    print(f"  model:       {d}/model  ({m['arch']}, {m['n_layer']} layers, {m['d_model']} wide, "
          f"{m['parameters'] / 1e6:.1f}M parameters, vocab {m['vocab_size']})")
    for name in ("counterfact.json", "zsre.json", "reference_texts.json", "corpus.txt", "world.json", "build.json"):
        print(f"  {name + ':':<21}{d}/{name}")
    if "languages" in info:
        print(f"  second language:   {d}/counterfact.l2.json, {d}/zsre.l2.json; subject token Jaccard "
              f"L1/L2 {info['languages']['subject_token_jaccard']:.3f}")
    s = info["seconds"]
    if info.get("prebuilt"):
        print(f"  model shipped with massedit ({info['prebuilt']['archive']}, trained with {info['threads']} threads), "
              f"unpacked in {s['total']:.0f} s; --train trains it here")
    else:
        print(f"  training {s['train']:.0f} s wall ({s['train_cpu']:.0f} s CPU, {info['threads']} threads), "
              f"total {s['total']:.0f} s")
    print("recall of the true object (top-1, teacher forced):")
    print("\n".join(_table(info["recall"])))
    return 0


def _recall(args) -> int:
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from massedit.world.generate import load_world
    from massedit.world.train import recall_all

    world_dir = Path(args.world)
    if not (world_dir / "world.json").exists():
        raise UserError(f"{world_dir} is not a world build (no world.json)")
    model_dir = Path(args.model) if args.model else world_dir / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **dtype_kwargs(torch.float32)).eval()
    languages = json.loads((world_dir / "world.json").read_text(encoding="utf-8")).get("args", {}).get("languages", 1)
    figures = recall_all(model, tok, load_world(world_dir), limit=args.limit, languages=languages)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(f"recall of {model_dir} on {world_dir}:")
        print("\n".join(_table(figures)))
    return 0
