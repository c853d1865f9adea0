"""`massedit edit --ledger DIR [--round-size N]`: the requests edited in rounds, each recorded in
the ledger as it completes; a ledger with rounds already is resumed (only unfinished rounds run)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from massedit.edits.ledger import Ledger
from massedit.edits.sequential import SequentialEditor, split_rounds


def edit_in_rounds(args, editor, requests, out: Path, method=None) -> int:
    ledger = Ledger(args.ledger)
    seq = SequentialEditor(editor, method or args.method, ledger)
    rounds = split_rounds(requests, args.round_size or len(requests))
    pending = seq.pending(rounds)
    done = len(rounds) - len(pending)
    if done:
        print(f"ledger {ledger.path}: {done} of {len(rounds)} round(s) already recorded; running the other {len(pending)}")
    for i, batch in enumerate(pending, done + 1):
        result = seq.edit_round(batch, batch_size=args.batch_size)
        print(f"round {i}/{len(rounds)}: {result.n_edits} edits with {result.method} in {result.timings['total']:.2f} s")
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    editor.model.save_pretrained(out)
    editor.tok.save_pretrained(out)
    report = {"method": seq.method.name, "n_edits": len(requests), "rounds": ledger.rounds(),
              "ledger": str(ledger.path), "save_seconds": round(time.perf_counter() - t0, 4)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out}/ (model, tokenizer: base + {len(ledger)} round(s) of {ledger.path}), {out / 'report.json'}")
    return 0
