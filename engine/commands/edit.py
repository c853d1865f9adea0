"""Edit facts into a model with MEMIT and save the edited model, the delta and a report.

Examples:
  massedit edit --model ./world/model --requests edits.json --corpus ./world/corpus.txt \\
      --stats-dir stats --out edited
  massedit edit --model gpt2-xl --requests counterfact.json --hparams gpt2-xl.json \\
      --stats-dir data/stats --method memit --batch-size 128 --out out/gpt2xl-edited
  massedit edit --model ./model --requests edits.json --method memat --memat-records edits_l2.json \\
      --corpus corpus.txt --stats-dir stats --out edited-memat

Writes OUT/ (model and tokenizer, save_pretrained), OUT/delta.safetensors (low-rank factors,
revertible) and OUT/report.json (timings in seconds, z losses; with --method memat also the probe
accuracy of every layer and head, the corrected heads and their ω norms, under "details"). OUT appears all at once when the
run finishes (written beside it, then renamed), so an interrupted run leaves OUT as it was; with
--out equal to --model and --force the original model stays in place until the edited one, with
its delta, is complete.

Under torchrun / accelerate launch the requests are sharded over the processes for z and keys
(and the corpus for missing statistics); every process ends with the edited model, rank 0 writes
OUT (and evaluates with --eval):
  torchrun --nproc_per_node 4 -m massedit.cli edit --model ./world/model --requests edits.json \
      --stats-dir stats --out edited
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from massedit.model import parallel
from massedit.inputs.corpus import BUILTIN, is_builtin
from massedit.inputs.templates import load_templates
from massedit.editor import MassEditor, check_method
from massedit.evaluation import evaluate, summary
from massedit.inputs.records import load_records
from massedit.hparams import default_for, load_hparams
from massedit.compute.stats import stats_folder
from massedit.model.loading import check_savable, load_model
from massedit.methods import METHODS, method_names
from massedit.commands._common import add_model_arguments, default_corpus, options_from_args
from massedit.publish import check_dir, check_out, claim, staged
from massedit.edits.ledger import Ledger
from massedit.edits.sequential import SequentialEditor, split_rounds
from massedit.inputs.requests import load_requests, parse_records

NAME = "edit"
HELP = "edit facts into a model (MEMIT) and save model, delta and report"


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="hub name or local directory")
    p.add_argument("--requests", required=True, help="CounterFact / zsRE JSON, or simple JSON, JSONL or CSV requests")
    p.add_argument("--hparams", help="MEMIT hparams: reference JSON or EasyEdit YAML file, or a preset name "
                                     "(e.g. gpt-j-6b); default: chosen for the model")
    p.add_argument("--stats-dir", default="stats", help="covariance statistics cache (default ./stats)")
    p.add_argument("--corpus", help="corpus to compute missing statistics from: a file, a saved dataset, or a built-in "
                   f"corpus ({' | '.join(BUILTIN)}; for the models of `massedit models list` by default the one their preset names)")
    p.add_argument("--context-templates", help='JSON list of lists, e.g. [["{}"], ["Some text. {}"]]')
    p.add_argument("--method", default="memit", choices=method_names())
    # Each method's own options; which method owns which is kept for the check in `_method`.
    p.set_defaults(method_options={name: cls.add_arguments(p) for name, cls in METHODS.items()
                                   if "add_arguments" in vars(cls)})
    p.add_argument("--batch-size", type=int, help="requests per z-optimization chunk (default: as many as fit in free "
                   "memory; on CPU at most the hparams' batch_size)")
    p.add_argument("--seed", type=int, default=0, help="seed for generated context templates")
    p.add_argument("--model-name", help="model name in the statistics path (default: the model directory's name); "
                   "naming it also accepts reference-layout statistics, which carry no model fingerprint")
    p.add_argument("--zsre-target", default="answers", choices=("answers", "alt"),
                   help="zsRE mapping of target_new: answers[0] (MEMIT, default) or alt (EasyEdit)")
    p.add_argument("--out", required=True, help="output directory (must be new or empty unless --force)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out directory")
    p.add_argument("--eval", action="store_true",
                   help="evaluate the edited records before and after (CounterFact or zsRE --requests files)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_model_arguments(p, dtype_alias=True)
    p.add_argument("--ledger", help="edit in rounds, recording each in this ledger directory (resumes a ledger "
                                    "that has rounds: only the unfinished rounds run); see `massedit ledger`")
    p.add_argument("--round-size", type=int, help="requests per round with --ledger (default: all in one round)")


def _metric(value) -> str:
    """A metric the records cannot give (no paraphrase or neighborhood prompts) is None."""
    return "n/a" if value is None else f"{value:.1f}"


def _check_stats_dir(stats_dir: str, computing: bool) -> None:
    """A statistics directory may be a read-only cache unless missing statistics are to be computed."""
    if computing:
        check_dir(stats_dir, "--stats-dir")
    elif Path(stats_dir).exists() and not Path(stats_dir).is_dir():
        raise ValueError(f"--stats-dir {stats_dir}: exists and is not a directory; give the statistics directory")


def _method(args, requests):
    """The method `--method` names, with its own options, checked against the requests before any
    model work; another method's option is an error."""
    for name, dests in args.method_options.items():
        given = [d for d in dests if getattr(args, d, None) is not None]
        if given and name != args.method:
            raise ValueError(f"--{given[0].replace('_', '-')} goes with --method {name}, not --method {args.method}")
    method = METHODS[args.method].from_args(args)
    method.check_requests(requests)
    return method


def _edit_in_rounds(args, editor, requests, out: Path, method) -> int:
    """`--ledger DIR [--round-size N]`: the requests edited in rounds, each recorded in the ledger as
    it completes; a ledger with rounds already is resumed (only unfinished rounds run)."""
    ledger = Ledger(args.ledger)
    seq = SequentialEditor(editor, method, ledger)
    rounds = split_rounds(requests, args.round_size or len(requests))
    pending = seq.pending(rounds)
    done = len(rounds) - len(pending)
    if done:
        print(f"ledger {ledger.path}: {done} of {len(rounds)} round(s) already recorded; running the other {len(pending)}")
    for i, batch in enumerate(pending, done + 1):
        result = seq.edit_round(batch, batch_size=args.batch_size)
        print(f"round {i}/{len(rounds)}: {result.n_edits} edits with {result.method} in {result.timings['total']:.2f} s")
    t0 = time.perf_counter()
    # Published like a plain edit's: a run killed while saving leaves --out as it was (the base model,
    # in place), and the rerun replays the ledger's rounds onto it and publishes again.
    with staged(out, owned=("report.json",)) as stage:
        editor.model.save_pretrained(stage)
        editor.tok.save_pretrained(stage)
        report = {"method": seq.method.name, "n_edits": len(requests), "rounds": ledger.rounds(),
                  "ledger": str(ledger.path), "save_seconds": round(time.perf_counter() - t0, 4)}
        (stage / "report.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out}/ (model, tokenizer: base + {len(ledger)} round(s) of {ledger.path}), {out / 'report.json'}")
    return 0


def run(args) -> int:
    args.corpus = default_corpus(args.model, args.corpus)
    out = Path(args.out)
    check_out(out, args.force)
    _check_stats_dir(args.stats_dir, computing=args.corpus is not None)
    if args.ledger:
        check_dir(args.ledger, "--ledger")
    with claim(out):
        return _run(args, out)


def _run(args, out: Path) -> int:
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    check_method(args.method)
    world = parallel.world()
    if args.round_size is not None and (args.round_size < 1 or not args.ledger):
        raise ValueError("--round-size needs --ledger DIR and must be at least 1")
    if args.ledger and world.size > 1:
        raise ValueError("--ledger edits in rounds in a single process; run it without torchrun")
    if args.ledger and args.eval:
        raise ValueError("--eval is not available with --ledger; evaluate the written model with massedit eval")
    records = None
    if args.eval:  # the file is read once: its records are both the requests and what is scored
        try:
            kind, records = load_records(args.requests)
        except ValueError as err:
            raise ValueError(f"--eval needs a CounterFact or zsRE file as --requests: {err}") from None
        requests = parse_records(records, str(args.requests), kind, zsre_target=args.zsre_target)
    else:
        requests = load_requests(args.requests, zsre_target=args.zsre_target)
    method = _method(args, requests)
    templates = load_templates(args.context_templates) if args.context_templates else None
    hp = load_hparams(args.hparams) if args.hparams else None
    model, tok = load_model(args.model, options_from_args(args))
    check_savable(model, args.model)
    records = records if world.main else None
    if hp is None:
        hp = default_for(model.config, method.hparams_family)
        if is_builtin(args.corpus):  # statistics are filed under the corpus they come from
            hp.mom2_dataset = args.corpus
    editor = MassEditor(
        model, tok, hp, stats_dir=args.stats_dir, corpus=args.corpus,
        model_name=args.model_name, context_templates=templates, seed=args.seed,
        progress=not args.quiet,
    )
    method.check_saved_model(editor.layout)
    if args.corpus is not None:  # where missing statistics go, checked before the work that needs them
        check_dir(stats_folder(args.stats_dir, editor.model_name, hp.mom2_dataset), "--stats-dir")
    requests = editor.validate(requests)
    if args.ledger:
        return _edit_in_rounds(args, editor, requests, out, method)
    pre = summary(evaluate(model, tok, records, zsre_target=args.zsre_target)) if records else None
    result = editor.edit(requests, method=method, batch_size=args.batch_size)

    def publish() -> dict:
        # the settings that made the delta (the method's own keys included), for reruns
        report = {**result.report(), "hparams": method.hparams(editor).to_dict()}
        if records:
            report["metrics"] = {"pre": pre, "post": summary(evaluate(model, tok, records, zsre_target=args.zsre_target))}
        t0 = time.perf_counter()
        with staged(out, owned=("delta.safetensors", "report.json")) as stage:
            result.delta.save(stage / "delta.safetensors")
            model.save_pretrained(stage)
            tok.save_pretrained(stage)
            report["timings"]["save"] = round(time.perf_counter() - t0, 4)
            (stage / "report.json").write_text(json.dumps(report, indent=2))
        return report

    # Rank 0 writes OUT; the other ranks wait for it and end with its outcome, its error included.
    report = parallel.from_main(publish)
    if not world.main:
        return 0
    t = report["timings"]
    print(f"edited {result.n_edits} facts with {result.method} in {t['total']:.2f} s "
          f"(z {t['z']:.2f} s, keys {t.get('keys', 0):.2f} s, solve {t.get('solve', 0):.2f} s, "
          f"covariance {t['covariance']:.2f} s); z loss mean {report['z_loss']['mean']:.4f}")
    if records:
        pre, post = report["metrics"]["pre"], report["metrics"]["post"]
        print("  ".join(f"{k} {_metric(pre[k])} -> {_metric(post[k])}" for k in pre))
    print(f"wrote {out}/ (model, tokenizer), {out / 'delta.safetensors'}, {out / 'report.json'}")
    return 0
