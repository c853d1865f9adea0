"""A second language ("L2") for the knowledge world, for cross-lingual editing (DESIGN §4).

L2 is an invented, Esperanto-like language: every relation has its own hand-written noun and
verb phrases, frames and questions (split into training and held-out parts as L1's are, by
`generate._relation_templates`), every object has an L2 name, and every subject an L2 spelling:
its given name and surname are re-spelled separately by a fixed letter permutation (vowels
rotated, consonants swapped in pairs) plus an ending, so that the two spellings of one person
share few tokens (`subject_token_jaccard` measures it, as the MEMAT paper does) while the pools'
structure (shared given names and surnames) carries over.

`second_language(world)` is the L2 `World` (same seed, subjects in the same order, same relation
ids and object ids), computed from the L1 world alone, so nothing new needs storing to recover it.
Its CounterFact and zsRE records are the L1 records' edits (same case_ids, same target_new and
target_true objects) phrased in L2 (`l2_counterfact_records`, `l2_zsre_records`). Filler text
(prefix sentences) stays in the shared filler grammar of `generate`.

Training in two languages halves each language's exposures per step. Measured (400 subjects x 4
relations, default 6 x 128 GPT-2, 2 shared cores): rewrite recall L1 / L2 was 38% / 25% after
1400 steps and 51% / 43% after 1800, the object loss still falling steadily at the end, so a
bilingual world needs several times the one-language steps (`--steps`).
"""
from __future__ import annotations

import re
from typing import Sequence

from massedit.world.generate import (
    Relation,
    World,
    _relation_templates,
    _rng,
    corpus_documents,
    counterfact_records,
    record_order,
    zsre_records,
)

LANGUAGES = (1, 2)

NOUN_FRAMES = (
    "La {N} de {} estas",
    "De {} la {N} estas",
    "Fakte, la {N} de {} estas",
    "Ni scias ke la {N} de {} estas",
)
VERB_FRAMES = (
    "{} {V}",
    "Fakte, {} {V}",
    "Ni scias ke {} {V}",
    "Jes, {} {V}",
)
SIMPLE_FRAMES = {"La {N} de {} estas", "De {} la {N} estas", "{} {V}"}

CITIES = {
    "Paris": "Parizo", "Lisbon": "Lisbono", "Vienna": "Vieno", "Oslo": "Oslumo", "Cairo": "Kairo",
    "Dublin": "Dublino", "Prague": "Prago", "Kyoto": "Kioto", "Seville": "Sevilo", "Geneva": "Genevo",
    "Porto": "Portuo", "Bergen": "Bergeno", "Cape Town": "Kaburbo", "Buenos Aires": "Bonaero",
    "Mavrid": "Mavrido", "Portenza": "Portenzo", "Kelvarra": "Kelvaro", "Osterholm": "Osterholmo",
    "Sel Amar": "Selamaro", "New Ardis": "Nov-Ardiso",
}

# relation id -> (noun phrases, verb phrases, questions, {L1 object: L2 object})
RELATIONS: dict[str, tuple] = {
    "P19": (("naskigurbo", "naskiga loko", "devena urbo"),
            ("naskigis en", "devenas el", "unue vidis la lumon en"),
            ("Kie naskigis {}?", "En kiu urbo naskigis {}?", "Kio estas la naskigurbo de {}?"),
            CITIES),
    "P551": (("logurbo", "hejmurbo", "restadejo"),
             ("logas en", "restadas en", "eklogis en"),
             ("Kie logas {}?", "En kiu urbo restadas {}?", "Kio estas la hejmurbo de {}?"),
             CITIES),
    "P103": (("gepatra lingvo", "denaska lingvo", "unua lingvo"),
             ("kreskis parolante", "denaske parolas", "estis edukita parolante"),
             ("Kio estas la gepatra lingvo de {}?", "Kiun lingvon parolis {} infane?",
              "Kio estas la denaska lingvo de {}?"),
             {"French": "franca", "English": "angla", "German": "germana", "Spanish": "hispana",
              "Italian": "itala", "Dutch": "nederlanda", "Polish": "pola", "Swedish": "sveda", "Greek": "greka",
              "Turkish": "turka", "Japanese": "japana", "Finnish": "finna", "Welsh": "kimra", "Basque": "euska",
              "Old Norse": "malnovnordia", "Valdic": "valdika", "Scottish Gaelic": "skotgaela", "Orrish": "orisa"}),
    "P641": (("sporto", "elektita sporto", "cefa sporto"),
             ("ludas", "konkursas en", "trejnas ciutage en"),
             ("Kiun sporton ludas {}?", "En kiu sporto konkursas {}?", "Kio estas la cefa sporto de {}?"),
             {"football": "piedpilko", "tennis": "teniso", "golf": "golfludo", "cricket": "kriketo",
              "rugby": "rugbeo", "baseball": "basbalo", "basketball": "korbopilko", "hockey": "hokeo",
              "chess": "sakoludo", "fencing": "skermado", "rowing": "remado", "archery": "arkpafado",
              "ice hockey": "glacihokeo", "water polo": "akvopolo", "table tennis": "tabloteniso",
              "volleyball": "flugpilko"}),
    "P106": (("profesio", "okupo", "laborkampo"),
             ("laboras kiel", "perlaboras sian vivon kiel", "estas dungita kiel"),
             ("Kio estas la profesio de {}?", "Kiel laboras {}?", "Kio estas la okupo de {}?"),
             {"actor": "aktoro", "architect": "arkitekto", "baker": "bakisto", "chemist": "kemiisto",
              "dentist": "dentisto", "diplomat": "diplomato", "engineer": "ingeniero", "farmer": "kamparano",
              "journalist": "gazetisto", "lawyer": "advokato", "nurse": "flegisto", "painter": "pentristo",
              "pilot": "aviadisto", "poet": "poeto", "surgeon": "kirurgo", "teacher": "instruisto",
              "librarian": "bibliotekisto", "astronomer": "astronomo", "fashion designer": "modokreanto",
              "civil servant": "statoficisto"}),
    "P108": (("dunganto", "laborejo", "firmao"),
             ("laboras por", "estas dungita de", "apartenas al la stabo de"),
             ("Kiu estas la dunganto de {}?", "Por kiu firmao laboras {}?", "Kiu dungas {}?"),
             {"Norvik Systems": "Norvikaj Sistemoj", "Altara": "Altaro", "Brightwell": "Brilputo",
              "Corvane": "Korvano", "Dalmora": "Dalmoro", "Elsinor Group": "Elsinora Grupo",
              "Fenwick Labs": "Fenvika Laboratorio", "Graystone": "Grizstono", "Helion": "Heliono",
              "Ironleaf": "Ferfolio", "Juniper Motors": "Juniperaj Motoroj", "Kestrel Bank": "Turfalka Banko",
              "Lumora": "Lumoro", "Meridian Foods": "Meridianaj Nutrajoj", "Nexora": "Neksoro",
              "Orbital Works": "Orbitaj Verkejoj"}),
    "P1303": (("instrumento", "muzika instrumento", "favora instrumento"),
              ("ludas la", "prezentas sur la", "estas lerta ludanto de la"),
              ("Kiun instrumenton ludas {}?", "Sur kiu instrumento prezentas {}?",
               "Kio estas la favora instrumento de {}?"),
              {"piano": "fortepiano", "violin": "violono", "cello": "violoncelo", "guitar": "gitaro",
               "flute": "fluto", "trumpet": "trumpeto", "harp": "harpo", "drums": "tamburoj",
               "clarinet": "klarneto", "saxophone": "saksofono", "organ": "orgeno", "accordion": "akordiono",
               "banjo": "bangxo", "oboe": "hobojo", "double bass": "kontrabaso", "French horn": "franca korno"}),
    "P27": (("civitaneco", "nacieco", "hejmlando"),
            ("estas civitano de", "havas civitanecon en", "portas pasporton de"),
            ("De kiu lando {} estas civitano?", "Kio estas la nacieco de {}?", "De kiu lando estas civitano {}?"),
            {"France": "Francujo", "Germany": "Germanujo", "Norway": "Norvegujo", "Egypt": "Egiptujo",
             "Chile": "Cilio", "Canada": "Kanado", "Japan": "Japanujo", "Portugal": "Portugalujo",
             "Austria": "Austrujo", "Ireland": "Irlando", "Valdoria": "Valdorio", "Estmark": "Estmarko",
             "Quorra": "Kvoro", "Lantheria": "Lanterio"}),
    "P69": (("studejo", "universitato", "lernejo"),
            ("studis en", "diplomigis el", "estis edukita en"),
            ("Kie studis {}?", "El kiu universitato diplomigis {}?", "Kio estas la studejo de {}?"),
            {"Halvern University": "Universitato Halverna", "Kingsbridge College": "Kolegio Regponta",
             "Lindqvist Institute": "Instituto Lindkvista", "Marrow Hall": "Halo Marova",
             "Northcote University": "Universitato Nordkota", "Oakridge College": "Kolegio Kverkkresta",
             "Penrose Academy": "Akademio Penroza", "Ravensworth University": "Universitato Korvovala",
             "Stellan Institute": "Instituto Stelana", "Thornbury College": "Kolegio Dornburga",
             "Ashford": "Asforda", "Belmont": "Belmonto"}),
    "P462": (("favora koloro", "plej amata koloro", "preferata koloro"),
             ("satas la koloron", "amas la koloron", "ciam portas la koloron"),
             ("Kio estas la favora koloro de {}?", "Kiun koloron {} plej satas?", "Kiun koloron preferas {}?"),
             {"red": "rugxa", "blue": "blua", "green": "verda", "yellow": "flava", "purple": "purpura",
              "orange": "oranga", "black": "nigra", "white": "blanka", "silver": "argxenta", "gold": "orkolora",
              "teal": "bluverda", "crimson": "karmezina", "navy blue": "marblua", "olive green": "olivverda"}),
}

# Re-spelling of name pieces: a letter permutation (vowels rotated, consonants swapped in pairs)
# keeps distinct pieces distinct; given names end in "o", surnames in one of four two-letter
# endings (picked by the piece), so no given name equals a surname.
_LETTERS = str.maketrans("aeioubvdtfpgkhjlrmnszxq", "oaueivbtdpfkgjhrlnmzsqx")
_SURNAME_ENDINGS = ("ek", "ov", "in", "as")


def check_languages(languages: int) -> int:
    if languages not in LANGUAGES:
        raise ValueError(f"languages must be 1 or 2 (the world's own language, or it and L2), got {languages}")
    return languages


def _l2_words() -> set[str]:
    words: set[str] = set()
    for nouns, verbs, questions, objects in RELATIONS.values():
        for text in (*nouns, *verbs, *questions, *objects.values(), *NOUN_FRAMES, *VERB_FRAMES):
            words.update(w.lower() for w in re.findall(r"[A-Za-z]+", text))
    return words


def respell(piece: str, surname: bool, reserved: frozenset = frozenset()) -> str:
    """The L2 spelling of one name piece; a piece that would be an L2 word gets an "h" (no other
    piece of its kind ends in "h", so distinct pieces stay distinct)."""
    core = piece.lower().translate(_LETTERS)
    word = core + (_SURNAME_ENDINGS[sum(map(ord, core)) % len(_SURNAME_ENDINGS)] if surname else "o")
    if word in reserved:
        word += "h"
    return word[:1].upper() + word[1:]


def l2_subject(name: str, reserved: frozenset = frozenset()) -> str:
    """The L2 spelling of a "Given Surname" subject (each piece re-spelled on its own)."""
    given, _, surname = name.partition(" ")
    if not surname:
        return respell(given, True, reserved)
    return f"{respell(given, False, reserved)} {respell(surname, True, reserved)}"


def object_names(relation_id: str) -> dict[str, str]:
    return RELATIONS[relation_id][3]


def second_language(world: World) -> World:
    """The world in L2: same seed, subjects (re-spelled, same order), relations (L2 phrasing,
    objects in the same order), facts and object ids."""
    reserved = frozenset(_l2_words())
    subjects = [l2_subject(s, reserved) for s in world.subjects]
    rng = _rng(world.seed, "templates-l2")
    relations = []
    for rel in world.relations:
        nouns, verbs, questions, names = RELATIONS[rel.id]
        train, heldout, tq, hq, simple = _relation_templates(rng, nouns, verbs, questions,
                                                             (NOUN_FRAMES, VERB_FRAMES, SIMPLE_FRAMES))
        relations.append(Relation(rel.id, rel.name, [names[o] for o in rel.objects], train, heldout, tq, hq, simple))
    facts = {l2: {rid: object_names(rid)[obj] for rid, obj in world.facts[s].items()}
             for s, l2 in zip(world.subjects, subjects)}
    object_ids = {}
    for rel in world.relations:
        for obj in rel.objects:
            object_ids.setdefault(object_names(rel.id)[obj], world.object_ids[obj])
    return World(world.seed, world.n_subjects, subjects, relations, facts, object_ids,
                 [respell(g, False, reserved) for g in world.given_names],
                 [respell(s, True, reserved) for s in world.surnames], world.version)


def _translated(world: World, l2: World, edits: Sequence[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    subject = dict(zip(world.subjects, l2.subjects))
    return [(subject[s], rid, object_names(rid)[new]) for s, rid, new in edits]


def l2_counterfact_records(world: World, l2: World) -> list[dict]:
    """counterfact.json's records (same case_ids, same target_new / target_true objects) in L2."""
    edits = [(r["requested_rewrite"]["subject"], r["requested_rewrite"]["relation_id"],
              r["requested_rewrite"]["target_new"]["str"]) for r in counterfact_records(world)]
    return counterfact_records(l2, _translated(world, l2, edits))


def l2_zsre_records(world: World, l2: World) -> list[dict]:
    """zsre.json's records (same order, same edit targets) in L2."""
    edits = [(s, rid, r["alt"]) for (s, rid), r in zip(record_order(world), zsre_records(world))]
    return zsre_records(l2, _translated(world, l2, edits))


def bilingual_corpus(world: World, l2: World, n_docs: int) -> list[str]:
    """n_docs documents, alternately from the L1 and the L2 corpus (the even ones of one and the odd
    ones of the other: the two corpora start alike, and a document next to its own translation
    would be a near duplicate)."""
    first, second = corpus_documents(world, n_docs), corpus_documents(l2, n_docs)
    return [(first if i % 2 == 0 else second)[i] for i in range(n_docs)]


def subject_token_jaccard(tok, world: World, l2: World) -> float:
    """Mean over subjects of |T1 ∩ T2| / |T1 ∪ T2|, T the set of token ids of the subject's
    spelling (after a space, as inside a sentence) in L1 and in L2 (the MEMAT paper's measure)."""
    def tokens(names: list[str]) -> list[set]:
        return [set(ids) for ids in tok([" " + n for n in names], add_special_tokens=False)["input_ids"]]

    pairs = zip(tokens(world.subjects), tokens(l2.subjects))
    scores = [len(a & b) / len(a | b) for a, b in pairs]
    return sum(scores) / len(scores)
