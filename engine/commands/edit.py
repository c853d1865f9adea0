"""Edit facts into a model with MEMIT and save the edited model, the delta and a report.

Examples:
  massedit edit --model ./world/model --requests edits.json --corpus ./world/corpus.txt \\
      --stats-dir stats --out edited
  massedit edit --model gpt2-xl --requests counterfact.json --hparams gpt2-xl.json \\
      --stats-dir data/stats --method memit --batch-size 128 --out out/gpt2xl-edited

Writes OUT/ (model and tokenizer, save_pretrained), OUT/delta.safetensors (low-rank factors,
revertible) and OUT/report.json (timings in seconds, z losses).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from massedit.context import load_templates
from massedit.editor import MassEditor
from massedit.evaluate import evaluate, load_records, summary
from massedit.hparams import MEMITHyperParams, default_for
from massedit.loading import load_model, model_name_for
from massedit.methods import get_method, method_names
from massedit.requests import load_requests, validate_requests

NAME = "edit"
HELP = "edit facts into a model (MEMIT) and save model, delta and report"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="hub name or local directory")
    p.add_argument("--requests", required=True, help="CounterFact / zsRE JSON, or simple JSON, JSONL or CSV requests")
    p.add_argument("--hparams", help="MEMIT hparams (reference JSON or EasyEdit YAML); default: chosen for the model")
    p.add_argument("--stats-dir", default="stats", help="covariance statistics cache (default ./stats)")
    p.add_argument("--corpus", help="corpus to compute missing statistics from")
    p.add_argument("--context-templates", help='JSON list of lists, e.g. [["{}"], ["Some text. {}"]]')
    p.add_argument("--method", default="memit", choices=method_names())
    p.add_argument("--batch-size", type=int, help="requests per z-optimization chunk (default: hparams batch_size)")
    p.add_argument("--seed", type=int, default=0, help="seed for generated context templates")
    p.add_argument("--model-name", help="model name in the statistics path (default: model directory's basename)")
    p.add_argument("--zsre-target", default="answers", choices=("answers", "alt"),
                   help="zsRE mapping of target_new: answers[0] (MEMIT, default) or alt (EasyEdit)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="model dtype: auto | float32 | float16 | bfloat16")
    p.add_argument("--out", required=True, help="output directory (must be new or empty unless --force)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out directory")
    p.add_argument("--eval", action="store_true",
                   help="evaluate the edited records before and after (CounterFact or zsRE --requests files)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--ledger", help="edit in rounds, recording each in this ledger directory (resumes a ledger "
                                    "that has rounds: only the unfinished rounds run); see `massedit ledger`")
    p.add_argument("--round-size", type=int, help="requests per round with --ledger (default: all in one round)")


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {out} is not empty; choose a new directory or pass --force to write into it")


def run(args) -> int:
    out = Path(args.out)
    _check_out(out, args.force)
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    if args.round_size is not None and (args.round_size < 1 or not args.ledger):
        raise ValueError("--round-size needs --ledger DIR and must be at least 1")
    if args.ledger and args.eval:
        raise ValueError("--eval is not available with --ledger; evaluate the written model with massedit eval")
    requests = load_requests(args.requests, zsre_target=args.zsre_target)
    records = None
    if args.eval:
        try:
            _, records = load_records(args.requests)
        except ValueError as err:
            raise ValueError(f"--eval needs a CounterFact or zsRE file as --requests: {err}") from None
    templates = load_templates(args.context_templates) if args.context_templates else None
    hp = MEMITHyperParams.from_file(args.hparams) if args.hparams else None
    model, tok = load_model(args.model, args.device, args.dtype)
    requests = validate_requests(requests, tok)
    hp = hp or default_for(model.config, get_method(args.method).hparams_family)
    editor = MassEditor(
        model, tok, hp, stats_dir=args.stats_dir, corpus=args.corpus,
        model_name=args.model_name or model_name_for(args.model), context_templates=templates, seed=args.seed,
        progress=not args.quiet,
    )
    if args.ledger:
        from massedit.commands.rounds import edit_in_rounds

        return edit_in_rounds(args, editor, requests, out)
    pre = summary(evaluate(model, tok, records, zsre_target=args.zsre_target)) if records else None
    result = editor.edit(requests, method=args.method, batch_size=args.batch_size)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    result.delta.save(out / "delta.safetensors")
    report = result.report()
    report["timings"]["save"] = round(time.perf_counter() - t0, 4)
    if records:
        report["metrics"] = {"pre": pre, "post": summary(evaluate(model, tok, records, zsre_target=args.zsre_target))}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    t = report["timings"]
    print(f"edited {result.n_edits} facts with {result.method} in {t['total']:.2f} s "
          f"(z {t['z']:.2f} s, keys {t.get('keys', 0):.2f} s, solve {t.get('solve', 0):.2f} s, "
          f"covariance {t['covariance']:.2f} s); z loss mean {report['z_loss']['mean']:.4f}")
    if records:
        pre, post = report["metrics"]["pre"], report["metrics"]["post"]
        print("  ".join(f"{k} {pre[k]:.1f} -> {post[k]:.1f}" for k in pre))
    print(f"wrote {out}/ (model, tokenizer), {out / 'delta.safetensors'}, {out / 'report.json'}")
    return 0
