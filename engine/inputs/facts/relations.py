"""The relations of the facts builder and their templates, in English and Catalan.

Each relation has four templates per language, index-aligned (template i in Catalan says what
template i says in English), so that a record and its Catalan twin use the same template. One is
the rewrite prompt; the paraphrase prompts use two of the other three after an unrelated sentence,
as CounterFact's do. A marker before "{}" puts the subject's article in place and `<és|són>` makes a verb agree
with it (grammar.py).
Templates end where the object starts: the object follows as " " + its phrase ("the Netherlands",
"el Japó"), so the Catalan templates end on a verb ("és", "s'anomena", "parla") after which the
object takes its own article, never on a preposition that would contract with it.
"""
from __future__ import annotations

from dataclasses import dataclass

CITY, COUNTRY = "city", "country"


@dataclass(frozen=True)
class Relation:
    id: str  # Wikidata's property id
    name: str
    subject_kind: str  # CITY or COUNTRY: which generation prompts describe the subject
    templates: dict  # language -> tuple of templates with "{}" for the subject
    questions: dict  # language -> (question, rephrased question), zsRE style


RELATIONS = (
    Relation("P17", "country (of a city)", CITY, {
        "en": ("{} is a city in", "{} is located in", "The city of {} lies in", "{}, a large city in"),
        "ca": ("El país on es troba {} és", "El país al qual pertany {} és", "{} és una ciutat, i el seu país és",
               "{} és una gran ciutat. El seu país és"),
    }, {
        "en": ("Which country is {} in?", "In which country is the city of {}?"),
        "ca": ("A quin país és {}?", "En quin país es troba la ciutat <de>{}?"),
    }),
    Relation("P1376", "capital of", CITY, {
        "en": ("{} is the capital of", "{} is the capital city of", "The city of {} is the capital of",
               "{} serves as the capital of"),
        "ca": ("El país que té per capital {} és", "El país la capital del qual és {} és",
               "{} és la capital d'un país. Aquest país és", "El país governat des de {} és"),
    }, {
        "en": ("Which country is {} the capital of?", "Which country has {} as its capital?"),
        "ca": ("De quin país és capital {}?", "Quin país té per capital {}?"),
    }),
    Relation("P36", "capital", COUNTRY, {
        "en": ("The capital of <the>{} is", "The capital city of <the>{} is", "<The>{}'s capital is",
               "The seat of government of <the>{} is in"),
        "ca": ("La capital <de>{} és", "La ciutat capital <de>{} és", "<Art>{} <té|tenen> la capital a",
               "El govern <de>{} té la seu a"),
    }, {
        "en": ("What is the capital of <the>{}?", "Which city is the capital of <the>{}?"),
        "ca": ("Quina és la capital <de>{}?", "Quina ciutat és la capital <de>{}?"),
    }),
    Relation("P30", "continent", COUNTRY, {
        "en": ("<The>{} is a country in", "<The>{} is located in the continent of",
               "The continent where <the>{} lies is", "<The>{} is part of the continent of"),
        "ca": ("El continent on <es troba|es troben> <art>{} és", "El continent al qual <pertany|pertanyen> <art>{} és",
               "<Art>{} <és|són> un país. El seu continent és", "<Art>{} <forma|formen> part del continent anomenat"),
    }, {
        "en": ("On which continent is <the>{}?", "Which continent is <the>{} part of?"),
        "ca": ("A quin continent <és|són> <art>{}?", "De quin continent <forma|formen> part <art>{}?"),
    }),
    Relation("P37", "official language", COUNTRY, {
        "en": ("The official language of <the>{} is", "In <the>{}, people speak",
               "The main language spoken in <the>{} is", "Most people in <the>{} speak"),
        "ca": ("<A>{} es parla oficialment", "La gent <de>{} parla", "A les escoles <de>{} s'ensenya en",
               "Els habitants <de>{} parlen"),
    }, {
        "en": ("What is the official language of <the>{}?", "Which language is spoken in <the>{}?"),
        "ca": ("Quina és la llengua oficial <de>{}?", "Quina llengua es parla <a>{}?"),
    }),
    Relation("P38", "currency", COUNTRY, {
        "en": ("The currency of <the>{} is the", "The official currency of <the>{} is the",
               "In <the>{}, people pay with the", "The money used in <the>{} is called the"),
        "ca": ("La moneda <de>{} s'anomena", "La moneda oficial <de>{} s'anomena",
               "<A>{} la moneda de curs legal s'anomena", "La unitat monetària <de>{} s'anomena"),
    }, {
        "en": ("What is the currency of <the>{}?", "Which currency is used in <the>{}?"),
        "ca": ("Quina és la moneda <de>{}?", "Quina moneda es fa servir <a>{}?"),
    }),
)
RELATION_IDS = tuple(r.id for r in RELATIONS)

# Unrelated sentences put before a held-out template in paraphrase prompts (index-aligned).
PREFIXES = {
    "en": ("The rain stopped just before noon.", "She put the keys on the table.",
           "The meeting lasted longer than expected.", "He finally finished reading the novel.",
           "The shop on the corner opens at nine.", "Nobody answered the phone that evening.",
           "The children played in the garden all day.", "A cold wind blew through the valley.",
           "The train was ten minutes late.", "We ordered coffee and waited."),
    "ca": ("La pluja va parar just abans del migdia.", "Va deixar les claus sobre la taula.",
           "La reunió va durar més del que s'esperava.", "Finalment va acabar de llegir la novel·la.",
           "La botiga de la cantonada obre a les nou.", "Aquell vespre ningú no va respondre el telèfon.",
           "Els nens van jugar al jardí tot el dia.", "Un vent fred bufava per la vall.",
           "El tren va arribar amb deu minuts de retard.", "Vam demanar cafè i vam esperar."),
}

# Open prompts about the subject, for generation metrics (index-aligned).
GENERATION = {
    CITY: {"en": ("{} is", "The city of {} is known for", "People who visit {}"),
           "ca": ("{} és", "La ciutat <de>{} és coneguda per", "La gent que visita {}")},
    COUNTRY: {"en": ("<The>{} is", "<The>{} is known for", "People who live in <the>{}"),
              "ca": ("<Art>{} <és|són>", "<Art>{} <destaca|destaquen> per", "La gent que viu <a>{}")},
}


def relation(rid: str) -> Relation:
    for r in RELATIONS:
        if r.id == rid:
            return r
    raise ValueError(f"unknown relation {rid!r}; valid: {', '.join(RELATION_IDS)}")
