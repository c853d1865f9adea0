"""Evaluate a model on CounterFact or zsRE records (ES/PS/NS/S, EM/PM/NM; GE/RS; zsRE accuracies).

The data format is detected from the file: a CounterFact JSON list (records with
"requested_rewrite") or a zsRE JSON list (zsre_mend_eval.json: "src", "answers", "loc", ...).
Aggregates are percentages (x100, as the MEMIT paper reports them) with a 95% interval and the
number of cases that contributed; see the modules of engine/evaluation/ for the exact conventions.

Examples:
  massedit eval --model gpt2-xl --data counterfact.json --limit 1000 --json results.json
  massedit eval --model ./edited-model --data zsre_mend_eval.json --device cuda --model-dtype bfloat16
  massedit eval --model ./edited-model --data cf.json --case-ids 0,5,17 --generation
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from massedit.commands._common import UserError, add_model_arguments, options_from_args
from massedit.publish import check_file
from massedit.model.loading import load_model

NAME = "eval"
HELP = "score a model on CounterFact / zsRE records (efficacy, generalization, specificity)"


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="M", help="model directory or hub name (AutoModelForCausalLM)")
    parser.add_argument("--data", required=True, metavar="FILE", help="CounterFact or zsRE JSON list")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate only the first N records")
    parser.add_argument("--case-ids", default=None, metavar="IDS",
                        help="comma-separated case ids to evaluate (e.g. the edited ones)")
    parser.add_argument("--generation", action="store_true",
                        help="also generate text and compute GE (n-gram entropy) and RS (TF-IDF similarity); slow")
    parser.add_argument("--reference-texts", default=None, metavar="FILE",
                        help="JSON {object: [texts]} of reference texts for RS (with --generation)")
    parser.add_argument("--batch-size", type=int, default=64, metavar="B", help="sequences per forward pass (default 64)")
    parser.add_argument("--zsre-target", choices=("answers", "alt"), default="answers",
                        help="zsRE target: answers[0] (MEMIT, default) or alt (EasyEdit)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed for --generation (default 0)")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the metrics and full details to OUT")
    add_model_arguments(parser, dtype_alias=True)


def _fmt(value, width=8) -> str:
    return f"{value:{width}.2f}" if value is not None else f"{'-':>{width}}"


def format_table(result: dict) -> str:
    lines = [f"{'metric':<12} {'mean':>8}   {'95% CI':<19} {'n':>6}"]
    for name, stat in result["metrics"].items():
        ci = stat["ci95"]
        ci_text = f"[{ci[0]:7.2f}, {ci[1]:7.2f}]" if ci else f"{'-':<19}"
        lines.append(f"{name:<12} {_fmt(stat['mean'])}   {ci_text:<19} {stat['n']:>6}")
    return "\n".join(lines)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--case-ids must be comma-separated integers, got {text!r}") from None


def run(args) -> int:
    from massedit.evaluation import evaluate, summary
    from massedit.inputs.records import load_records

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if args.reference_texts and not args.generation:
        raise UserError("--reference-texts is only used with --generation")
    if args.json:
        check_file(args.json, "--json")
    kind, records = load_records(args.data)
    if args.limit is not None:
        records = records[: args.limit]
    reference_texts = None
    if args.reference_texts:
        try:
            reference_texts = json.loads(Path(args.reference_texts).read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise UserError(f"{args.reference_texts}: not valid JSON: {err}") from None
    case_ids = _parse_ids(args.case_ids) if args.case_ids else None

    import torch

    torch.manual_seed(args.seed)
    model, tok = load_model(args.model, options_from_args(args))
    result = evaluate(
        model, tok, records, kind=kind, batch_size=args.batch_size, generation=args.generation,
        case_ids=case_ids, reference_texts=reference_texts, zsre_target=args.zsre_target, seed=args.seed,
        source=str(args.data),
    )
    print(f"{kind}: {result['n_cases']} case(s), model {args.model}")
    print(format_table(result))
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        out = dict(summary(result))
        out["details"] = result
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1), encoding="utf-8")
        print(f"wrote {args.json}")
    return 0
