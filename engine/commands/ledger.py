"""Inspect, verify and revert an edit ledger (the rounds `massedit edit --ledger DIR` records).

Examples:
  massedit ledger list --ledger runs/ledger
  massedit ledger verify --ledger runs/ledger --model runs/edited
  massedit ledger revert --ledger runs/ledger --last 2 --model runs/edited --out runs/edited-minus-2

`verify` exits 0 when the model's edited weights are the ledger's base plus every round, bit for
bit (it recomputes each round), else 1 with one line per problem. `revert` undoes the last K
rounds of a model at the ledger's head exactly, writes the result to --out (a new directory) and
then moves those rounds to DIR/reverted/, so the ledger describes the written model.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from massedit.edits.ledger import Ledger
from massedit.commands._common import add_model_arguments, options_from_args
from massedit.publish import check_out, claim, staged
from massedit.model.loading import check_savable, load_model

NAME = "ledger"
HELP = "list, verify or revert the rounds of an edit ledger"


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="one line per round")
    ls.add_argument("--json", action="store_true", help="print the rounds' records as JSON")
    verify = sub.add_parser("verify", help="is --model the base plus every round, bit for bit?")
    revert = sub.add_parser("revert", help="revert the last K rounds of --model, write --out")
    revert.add_argument("--last", type=int, required=True, metavar="K", help="how many rounds to revert")
    revert.add_argument("--out", required=True, help="new (or empty) directory for the reverted model")
    for q in (ls, verify, revert):
        q.add_argument("--ledger", required=True, help="ledger directory (massedit edit --ledger)")
    for q in (verify, revert):
        q.add_argument("--model", required=True, help="the edited model (directory written by massedit edit)")
        add_model_arguments(q)


def _open(path: str) -> Ledger:
    # Checked before Ledger(), whose refusal of a non-empty directory speaks of creating a ledger.
    if not (Path(path) / "ledger.json").is_file():
        raise ValueError(f"--ledger {path} holds no ledger (no ledger.json); massedit edit --ledger DIR creates one")
    return Ledger(path)


def run(args) -> int:
    ledger = _open(args.ledger)
    if args.action == "list":
        rounds = ledger.rounds()
        if args.json:
            print(json.dumps(rounds, indent=2))
            return 0
        h = ledger.header
        print(f"ledger {ledger.path}: {h['method']} on {h['model_name']}, layers {h['layers']}, {len(rounds)} round(s)")
        for r in rounds:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"]))
            seconds = r["report"].get("timings", {}).get("total", float("nan"))
            print(f"  round {r['round']:>4}  {r['n_edits']:>6} edits  {seconds:9.2f} s  {stamp}"
                  f"  requests {r['requests_sha256'][:12]}")
        return 0
    if args.action == "verify":
        return _verify(args, ledger)
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty; ledger revert writes a new directory: choose one")
    check_out(out, force=False)
    if not 1 <= args.last <= len(ledger):
        raise ValueError(f"--last must be between 1 and the number of rounds ({len(ledger)}), got {args.last}")
    ledger.check()
    with claim(out):
        return _revert(args, ledger, out)


def _verify(args, ledger: Ledger) -> int:
    model, _ = load_model(args.model, options_from_args(args))
    problems = ledger.verify(model)
    for p in problems:
        print(f"massedit ledger verify: {p}", file=sys.stderr)
    if not problems:
        print(f"ok: {args.model} is the base of {ledger.path} plus its {len(ledger)} round(s), bit for bit")
    return 1 if problems else 0


def _revert(args, ledger: Ledger, out: Path) -> int:
    model, tok = load_model(args.model, options_from_args(args))
    check_savable(model, args.model)
    ledger.revert_last(model, args.last, drop=False)
    with staged(out) as stage:
        model.save_pretrained(stage)
        tok.save_pretrained(stage)
    ledger.drop_last(args.last)
    print(f"reverted the last {args.last} round(s); wrote {out}/; {len(ledger)} round(s) remain in {ledger.path}")
    return 0
