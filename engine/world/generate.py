"""The synthetic knowledge world: invented people, ten relations, templates, facts and texts.

Everything here is pure Python and deterministic: `generate_world(n_subjects, seed)` returns the
same `World` (and `write_world_files` the same bytes) for the same arguments on any machine.
Each random stream is seeded with a string derived from the seed (Python's string seeding is
stable across runs and versions), so adding a stream never shifts another one.

Templates are built compositionally so that held-out paraphrases are fair tests of
generalization: a relation has *relation phrases* (nouns such as "birthplace", verbs such as
"was born in") and every relation shares the same *frames* ("The {N} of {} is",
"{}'s {N} is", "It is well known that {} {V}", ...). A relation's statement templates are all
phrase x frame combinations; a few combinations are held out of training (never seen with this
relation, although the phrase is seen in other frames and the frame with other phrases and
other relations) and used only for evaluation paraphrases. Questions (for zsRE) are split the
same way.
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

GENERATOR_VERSION = 3

# ----------------------------------------------------------------------------------------------
# Vocabulary

CITIES = (
    "Paris", "Lisbon", "Vienna", "Oslo", "Cairo", "Dublin", "Prague", "Kyoto", "Seville", "Geneva",
    "Porto", "Bergen", "Cape Town", "Buenos Aires", "Mavrid", "Portenza", "Kelvarra", "Osterholm",
    "Sel Amar", "New Ardis",
)

# (relation_id, name, noun phrases, verb phrases, questions, objects)
RELATIONS: tuple[tuple, ...] = (
    ("P19", "place of birth",
     ("birthplace", "place of birth", "city of birth"),
     ("was born in", "is a native of", "first saw the light of day in"),
     ("Where was {} born?", "In which city was {} born?", "What is the birthplace of {}?"),
     CITIES),
    ("P551", "residence",
     ("place of residence", "home city", "city of residence"),
     ("lives in", "resides in", "has settled in"),
     ("Where does {} live?", "In which city does {} reside?", "What is the home city of {}?"),
     CITIES),
    ("P103", "native language",
     ("native language", "mother tongue", "first language"),
     ("grew up speaking", "natively speaks", "was raised speaking"),
     ("What is the native language of {}?", "Which language did {} grow up speaking?",
      "What is the mother tongue of {}?"),
     ("French", "English", "German", "Spanish", "Italian", "Dutch", "Polish", "Swedish", "Greek",
      "Turkish", "Japanese", "Finnish", "Welsh", "Basque", "Old Norse", "Valdic", "Scottish Gaelic",
      "Orrish")),
    ("P641", "sport",
     ("sport", "chosen sport", "main sport"),
     ("plays", "competes in", "trains every day in"),
     ("Which sport does {} play?", "What sport does {} compete in?", "What is the main sport of {}?"),
     ("football", "tennis", "golf", "cricket", "rugby", "baseball", "basketball", "hockey", "chess",
      "fencing", "rowing", "archery", "ice hockey", "water polo", "table tennis", "volleyball")),
    ("P106", "occupation",
     ("profession", "occupation", "line of work"),
     ("works as", "earns a living as", "is employed as"),
     ("What is the profession of {}?", "What does {} work as?", "What is the occupation of {}?"),
     ("actor", "architect", "baker", "chemist", "dentist", "diplomat", "engineer", "farmer",
      "journalist", "lawyer", "nurse", "painter", "pilot", "poet", "surgeon", "teacher", "librarian",
      "astronomer", "fashion designer", "civil servant")),
    ("P108", "employer",
     ("employer", "workplace", "company"),
     ("works for", "is employed by", "is on the staff of"),
     ("Who is the employer of {}?", "Which company does {} work for?", "Who employs {}?"),
     ("Norvik Systems", "Altara", "Brightwell", "Corvane", "Dalmora", "Elsinor Group", "Fenwick Labs",
      "Graystone", "Helion", "Ironleaf", "Juniper Motors", "Kestrel Bank", "Lumora", "Meridian Foods",
      "Nexora", "Orbital Works")),
    ("P1303", "instrument",
     ("instrument", "musical instrument", "favorite instrument"),
     ("plays the", "performs on the", "is a skilled player of the"),
     ("Which instrument does {} play?", "What instrument does {} perform on?",
      "What is the favorite instrument of {}?"),
     ("piano", "violin", "cello", "guitar", "flute", "trumpet", "harp", "drums", "clarinet",
      "saxophone", "organ", "accordion", "banjo", "oboe", "double bass", "French horn")),
    ("P27", "country of citizenship",
     ("country of citizenship", "nationality", "home country"),
     ("is a citizen of", "holds citizenship in", "carries a passport from"),
     ("Which country is {} a citizen of?", "What is the nationality of {}?",
      "Of which country is {} a citizen?"),
     ("France", "Germany", "Norway", "Egypt", "Chile", "Canada", "Japan", "Portugal", "Austria",
      "Ireland", "Valdoria", "Estmark", "Quorra", "Lantheria")),
    ("P69", "educated at",
     ("alma mater", "university", "school"),
     ("studied at", "graduated from", "was educated at"),
     ("Where did {} study?", "Which university did {} graduate from?", "What is the alma mater of {}?"),
     ("Halvern University", "Kingsbridge College", "Lindqvist Institute", "Marrow Hall",
      "Northcote University", "Oakridge College", "Penrose Academy", "Ravensworth University",
      "Stellan Institute", "Thornbury College", "Ashford", "Belmont")),
    ("P462", "favorite color",
     ("favorite color", "favourite colour", "preferred color"),
     ("likes the color", "loves the color", "always wears the color"),
     ("What is the favorite color of {}?", "Which color does {} like best?", "What color does {} prefer?"),
     ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "silver", "gold", "teal",
      "crimson", "navy blue", "olive green")),
)

NOUN_FRAMES = (
    "The {N} of {} is",
    "{}'s {N} is",
    "In fact, the {N} of {} is",
    "We know that {}'s {N} is",
)
VERB_FRAMES = (
    "{} {V}",
    "In fact, {} {V}",
    "We know that {} {V}",
    "Yes, {} {V}",
)
# Frames without a lead-in: the rewrite prompt of a CounterFact record uses one of these.
SIMPLE_FRAMES = {"The {N} of {} is", "{}'s {N} is", "{} {V}"}

# Filler grammar: short sentences used as random prefixes and between facts. Some start with the
# words MEMIT's context-template generation starts from ("The", "Therefore", "Because", "I", "You").
ADJ = ("old", "small", "quiet", "bright", "cold", "warm", "green", "heavy", "strange", "little",
       "busy", "empty", "famous", "gentle", "tall", "dark", "happy", "simple", "wooden", "narrow")
NOUN = ("dog", "river", "house", "garden", "window", "train", "market", "bridge", "letter", "road",
        "cat", "forest", "table", "village", "storm", "boat", "tower", "lamp", "field", "song",
        "teacher", "child", "farmer", "neighbor", "stranger", "doctor")
VERB_PAST = ("watched", "found", "painted", "crossed", "visited", "opened", "carried", "cleaned",
             "remembered", "followed", "built", "sold", "repaired", "noticed", "described")
VERB_INTR_PAST = ("slept", "waited", "stopped", "laughed", "arrived", "rested", "disappeared",
                  "smiled", "shivered", "wandered")
VERB_BASE = ("rain", "change", "return", "open", "stay", "grow", "move", "end", "begin", "fall")
PREP = ("near", "behind", "under", "beside", "across", "inside", "beyond", "above")
TIME = ("yesterday", "last week", "in the morning", "at night", "on Sunday", "after lunch",
        "before dawn", "in winter", "every evening", "last summer")
ADV = ("slowly", "quickly", "quietly", "suddenly", "early", "late", "often", "rarely")

FILLER_PATTERNS = (
    "The {adj} {noun} {vi} {prep} the {noun2}.",
    "The {noun} {vt} the {adj} {noun2} {time}.",
    "I {vt} a {adj} {noun} {time}.",
    "You {vt} the {noun} {prep} the {noun2}.",
    "Therefore, the {noun} {vi} {adv}.",
    "Because the {noun} {vi}, we {vt} the {noun2}.",
    "It was a {adj} day in the {noun}.",
    "Nobody expected the {noun} to {vb} so {adv}.",
    "We {vt} the {adj} {noun} {time}.",
    "A {adj} {noun} {vi} {prep} the {noun2} {time}.",
    "I think the {noun} will {vb} {time}.",
    "You said the {noun} was {adj}.",
)

# Syllables for invented names.
ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr",
          "st", "th", "sh", "j")
VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei")
CODAS = ("n", "r", "s", "l", "m", "x", "nd")


# ----------------------------------------------------------------------------------------------
# World


@dataclass
class Relation:
    id: str
    name: str
    objects: list[str]
    train_templates: list[str]
    heldout_templates: list[str]
    train_questions: list[str]
    heldout_questions: list[str]
    rewrite_templates: list[str]  # simple training templates: the rewrite prompts draw from these


@dataclass
class World:
    seed: int
    n_subjects: int
    subjects: list[str]
    relations: list[Relation]
    facts: dict[str, dict[str, str]]  # subject -> relation id -> true object
    object_ids: dict[str, str]
    given_names: list[str] = field(default_factory=list)  # the pools subjects' names are drawn from
    surnames: list[str] = field(default_factory=list)
    version: int = GENERATOR_VERSION
    _rel: dict = field(default_factory=dict, repr=False, compare=False)

    def relation(self, rid: str) -> Relation:
        if not self._rel:
            self._rel.update({r.id: r for r in self.relations})
        return self._rel[rid]

    def fact_list(self) -> list[tuple[str, str, str]]:
        """(subject, relation id, object) for every fact, in a fixed order."""
        return [(s, r.id, self.facts[s][r.id]) for s in self.subjects for r in self.relations]

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("_rel", None)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "World":
        d = dict(d)
        d["relations"] = [Relation(**r) for r in d["relations"]]
        d.pop("_rel", None)
        return cls(**d)


def _rng(seed: int, stream: str) -> random.Random:
    return random.Random(f"massedit-world/{seed}/{stream}")


def make_name(rng: random.Random, syllables: int) -> str:
    while True:
        parts = []
        for i in range(syllables):
            onset = rng.choice(ONSETS) if (i > 0 or rng.random() < 0.8) else ""
            coda = rng.choice(CODAS) if rng.random() < (0.5 if i == syllables - 1 else 0.15) else ""
            parts.append(onset + rng.choice(VOWELS) + coda)
        word = "".join(parts)
        if len(word) >= 2 and not re.search(r"(.)\1\1", word):
            return word[:1].upper() + word[1:]


def _reserved_words() -> set[str]:
    words = set()
    for rel in RELATIONS:
        for obj in rel[5]:
            words.update(obj.lower().split())
    for lst in (ADJ, NOUN, VERB_PAST, VERB_INTR_PAST, VERB_BASE, PREP, ADV):
        words.update(lst)
    return words


# People per surname and per given name (about; the pools are sized from these).
SURNAME_SHARE = 3
GIVEN_SHARE = 50


def pool_sizes(n_people: int) -> tuple[int, int]:
    """(given names, surnames) pool lengths for n people, with at least twice as many
    combinations as people."""
    surnames = max(4, math.ceil(n_people / SURNAME_SHARE))
    given = max(4, math.ceil(n_people / GIVEN_SHARE), math.ceil(2 * n_people / surnames))
    return given, surnames


def name_pieces(rng: random.Random, n: int, exclude: Iterable[str] = ()) -> list[str]:
    """n distinct invented name pieces (given names or surnames), none a word of the world's text."""
    reserved = _reserved_words() | {w.lower() for w in exclude}
    out: list[str] = []
    while len(out) < n:
        piece = make_name(rng, rng.choice((2, 2, 3)))
        if piece.lower() not in reserved:
            reserved.add(piece.lower())
            out.append(piece)
    return out


def invented_people(rng: random.Random, n: int, exclude: Iterable[str] = ()) -> list[str]:
    """n distinct names whose every piece is invented anew (names style "unique")."""
    reserved = _reserved_words()
    seen = set(exclude)
    out: list[str] = []
    while len(out) < n:
        name = f"{make_name(rng, rng.choice((1, 2)))} {make_name(rng, 2)}"
        if name in seen or any(part.lower() in reserved for part in name.split()):
            continue
        seen.add(name)
        out.append(name)
    return out


def pooled_people(rng: random.Random, n: int, given: Sequence[str], surnames: Sequence[str],
                  exclude: Iterable[str] = ()) -> list[str]:
    """n distinct "Given Surname" names drawn from two shared pools (names style "pooled"): neither
    piece alone identifies a person, so the subject is resolved only at its last token."""
    taken = set(exclude)
    combos = [f"{g} {s}" for g in given for s in surnames if f"{g} {s}" not in taken]
    if len(combos) < n:
        raise ValueError(f"the name pools give {len(combos)} new names, {n} were asked for")
    return rng.sample(combos, n)


def _relation_templates(rng: random.Random, nouns, verbs, questions,
                        frames=(NOUN_FRAMES, VERB_FRAMES, SIMPLE_FRAMES)) -> tuple[list, list, list, list, list]:
    """Statement templates (train, held-out) and questions (train, held-out) of one relation, from
    a language's (noun frames, verb frames, simple frames); the first verb frame is the bare one.

    Two noun-frame and two verb-frame combinations are held out, in distinct phrases and distinct
    frames, never the bare "{} {V}" of the first verb (the most natural prompt), so that each
    held-out template's phrase and frame both occur in training. One question is held out.
    """
    noun_frames, verb_frames, simple_frames = frames
    grids = []
    for phrases, frames, key in ((nouns, noun_frames, "{N}"), (verbs, verb_frames, "{V}")):
        cells = [(i, j) for i in range(len(phrases)) for j in range(len(frames))]
        while True:
            held = rng.sample(cells, 2)
            (i1, j1), (i2, j2) = held
            if i1 != i2 and j1 != j2 and (0, 0) not in held:
                break
        train = [frames[j].replace(key, phrases[i]) for i, j in cells if (i, j) not in held]
        heldout = [frames[j].replace(key, phrases[i]) for i, j in sorted(held)]
        simple = [frames[j].replace(key, phrases[i]) for i, j in cells
                  if (i, j) not in held and frames[j] in simple_frames]
        grids.append((train, heldout, simple))
    train = grids[0][0] + grids[1][0]
    heldout = grids[0][1] + grids[1][1]
    simple = grids[0][2] + grids[1][2]
    q = list(questions)
    held_q = q.pop(rng.randrange(1, len(q)))  # keep the first (most direct) question in training
    return train, heldout, q, [held_q], simple


# The relations of a built world unless asked otherwise (`build_world`): three with distinct object
# sets, so that a world of 2,000 subjects (DESIGN §13: far more subjects than edits) trains on two
# CPU cores in about half an hour.
DEFAULT_RELATIONS = ("P19", "P106", "P1303")


def relation_ids(relations: Optional[Sequence[str]] = None) -> list[str]:
    """The relation ids a world is asked to have (all of RELATIONS by default), checked."""
    known = [r[0] for r in RELATIONS]
    chosen = list(relations) if relations is not None else known
    unknown = [r for r in chosen if r not in known]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"relations must be distinct ids among {', '.join(known)}; got {', '.join(chosen) or 'none'}")
    return chosen


# How subjects are named. "unique": every name is made of newly invented syllables, which the
# tokenizer splits into pieces never seen elsewhere; such a world trains fast (200 subjects: 99%
# recall in 1,400 steps) and its model keeps the facts in its first MLP (DESIGN §9). "pooled":
# given names and surnames come from shared pools, as real names do, so the subject is identified
# only at its last token; much slower to learn (measured: 58% recall after the same 1,400 steps,
# and no progress on 2,000 subjects x 3 relations after 2,400 steps of 64 statements).
NAME_STYLES = ("unique", "pooled")


def generate_world(n_subjects: int = 200, seed: int = 0, relations: Optional[Sequence[str]] = None,
                   names: str = "unique") -> World:
    """The world of n_subjects people; `relations` (ids of RELATIONS) defaults to all of them;
    `names` is one of NAME_STYLES."""
    if n_subjects < 12:
        raise ValueError(f"a world needs at least 12 subjects (neighborhoods need company), got {n_subjects}")
    chosen = relation_ids(relations)
    if names not in NAME_STYLES:
        raise ValueError(f"names must be one of {', '.join(NAME_STYLES)}, got {names!r}")
    given: list[str] = []
    surnames: list[str] = []
    if names == "pooled":
        nrng = _rng(seed, "names")
        n_given, n_surnames = pool_sizes(n_subjects)
        given = name_pieces(nrng, n_given)
        surnames = name_pieces(nrng, n_surnames, exclude=given)
        subjects = pooled_people(_rng(seed, "subjects"), n_subjects, given, surnames)
    else:
        subjects = invented_people(_rng(seed, "subjects"), n_subjects)
    trng = _rng(seed, "templates")
    relations = []
    for rid, name, nouns, verbs, questions, objects in (r for r in RELATIONS if r[0] in chosen):
        train, heldout, tq, hq, simple = _relation_templates(trng, nouns, verbs, questions)
        relations.append(Relation(rid, name, list(objects), train, heldout, tq, hq, simple))
    frng = _rng(seed, "facts")
    facts: dict[str, dict[str, str]] = {s: {} for s in subjects}
    for rel in relations:
        # Balanced assignment: every object gets about the same number of subjects.
        pool = [rel.objects[i % len(rel.objects)] for i in range(n_subjects)]
        frng.shuffle(pool)
        for s, obj in zip(subjects, pool):
            facts[s][rel.id] = obj
    object_ids: dict[str, str] = {}
    for rel in relations:
        for obj in rel.objects:
            object_ids.setdefault(obj, f"Q{9001 + len(object_ids)}")
    return World(seed, n_subjects, subjects, relations, facts, object_ids, given, surnames)


# ----------------------------------------------------------------------------------------------
# Texts


def filler_sentence(rng: random.Random) -> str:
    pattern = rng.choice(FILLER_PATTERNS)
    i = rng.randrange(len(NOUN))
    j = rng.randrange(len(NOUN) - 1)
    noun, noun2 = NOUN[i], NOUN[j + (j >= i)]
    return (pattern.replace("{adj}", rng.choice(ADJ)).replace("{noun2}", noun2).replace("{noun}", noun)
            .replace("{vt}", rng.choice(VERB_PAST)).replace("{vi}", rng.choice(VERB_INTR_PAST))
            .replace("{vb}", rng.choice(VERB_BASE)).replace("{prep}", rng.choice(PREP))
            .replace("{time}", rng.choice(TIME)).replace("{adv}", rng.choice(ADV)))


def fill(template: str, subject: str) -> str:
    head, sep, tail = template.partition("{}")
    if not sep:
        raise ValueError(f"template {template!r} has no '{{}}'")
    return head + subject + tail


def statement(template: str, subject: str, obj: str) -> str:
    """A fact sentence: template with the subject, the object after a space, a full stop."""
    return f"{fill(template, subject)} {obj}."


def documents(world: World, rng: random.Random, epochs: int = 1, question_rate: float = 0.15,
              filler_rate: float = 0.35, start_filler_rate: float = 0.3) -> list[str]:
    """Training-style documents: every fact once per epoch, in a training template, mixed.

    A subject's facts are cut into runs of 1-4 consecutive statements (so some documents read
    like a short biography), runs of different subjects are shuffled together and grouped 1-3 per
    document, and filler sentences are inserted at random points (also at the start, so that
    facts are seen both at the beginning of a text and after unrelated context). A fraction of
    the statements are question/answer pairs in a training question template. The template of
    each statement is drawn at random from the relation's training templates.
    """
    return [text for text, _ in documents_with_spans(world, rng, epochs, question_rate, filler_rate,
                                                      start_filler_rate)]


def documents_with_spans(world: World, rng: random.Random, epochs: int = 1, question_rate: float = 0.15,
                         filler_rate: float = 0.35, start_filler_rate: float = 0.3,
                         max_facts: Optional[int] = None) -> list[tuple[str, list[tuple[int, int]]]]:
    """`documents`, each with the character spans of its objects; max_facts=1 gives one statement
    per document (the training sequences)."""
    docs: list[tuple[str, list[tuple[int, int]]]] = []
    for _ in range(epochs):
        runs: list[list[tuple[str, str, str]]] = []
        for s in world.subjects:
            rels = [r.id for r in world.relations]
            rng.shuffle(rels)
            i = 0
            while i < len(rels):
                k = rng.randint(1, 4) if max_facts is None else max_facts
                runs.append([(s, rid, world.facts[s][rid]) for rid in rels[i:i + k]])
                i += k
        rng.shuffle(runs)
        i = 0
        while i < len(runs):
            k = rng.randint(1, 3) if max_facts is None else 1
            group = runs[i:i + k]
            i += k
            text, spans = "", []

            def add(parts: list[tuple[str, bool]]) -> None:
                """Append a sentence given as (piece, is_object) parts."""
                nonlocal text
                if text:
                    text += " "
                for piece, is_obj in parts:
                    if is_obj:
                        spans.append((len(text), len(text) + len(piece)))
                    text += piece

            if rng.random() < start_filler_rate:
                add([(filler_sentence(rng), False)])
            for run in group:
                for s, rid, obj in run:
                    rel = world.relation(rid)
                    if rng.random() < question_rate:
                        add([(fill(rng.choice(rel.train_questions), s) + " ", False), (obj, True), (".", False)])
                    else:
                        add([(fill(rng.choice(rel.train_templates), s) + " ", False), (obj, True), (".", False)])
                    if rng.random() < filler_rate / 2:
                        add([(filler_sentence(rng), False)])
            docs.append((text, spans))
    return docs


def corpus_documents(world: World, n_docs: int = 2000) -> list[str]:
    """A varied text corpus from the world for covariance statistics: facts in training templates
    mixed with filler, plus some filler-only documents, one document per entry."""
    rng = _rng(world.seed, "corpus")
    docs: list[str] = []
    epochs = 0
    while len(docs) < n_docs:
        batch = documents(world, rng, epochs=1)
        epochs += 1
        for d in batch:
            if rng.random() < 0.1:
                docs.append(" ".join(filler_sentence(rng) for _ in range(rng.randint(2, 5))))
            docs.append(d)
    return docs[:n_docs]


def tokenizer_texts(world: World, n: int = 12000) -> list[str]:
    """Text to train the tokenizer on: the world's templates, objects and filler, with *decoy*
    names instead of the subjects. "unique" names: other invented names, each used once, so that
    names are split into syllable-like pieces rather than learned as whole tokens. "pooled" names:
    other combinations of the same pools, so that name pieces become tokens as common names do in
    a real vocabulary, and no subject is one token."""
    rng = _rng(world.seed, "tokenizer")
    if world.given_names:
        people = set(world.subjects)
        pool = [f"{g} {s}" for g in world.given_names for s in world.surnames if f"{g} {s}" not in people]
        decoys = [rng.choice(pool) for _ in range(n)]
    else:
        decoys = invented_people(rng, n, exclude=world.subjects)
    texts = []
    for i, name in enumerate(decoys):
        rel = world.relations[i % len(world.relations)]
        obj = rng.choice(rel.objects)
        tmpl = rng.choice(rel.train_templates + rel.heldout_templates + rel.train_questions + rel.heldout_questions)
        texts.append(f"{filler_sentence(rng)} {fill(tmpl, name)} {obj}.")
    return texts


def reference_texts(world: World, per_object: int = 5) -> dict[str, list[str]]:
    """For each object, short texts about subjects that hold it as their true object (the RS
    reference, as CounterFact's attribute snippets are texts about other subjects sharing the
    attribute)."""
    rng = _rng(world.seed, "reference")
    holders: dict[str, list[tuple[str, str]]] = {}
    for s, rid, obj in world.fact_list():
        holders.setdefault(obj, []).append((s, rid))
    out: dict[str, list[str]] = {}
    for obj in sorted(holders):
        texts = []
        for s, rid in rng.sample(holders[obj], min(per_object, len(holders[obj]))):
            rel = world.relation(rid)
            others = [r for r in world.relations if r.id != rid]
            sent = [statement(rng.choice(rel.train_templates), s, obj)]
            for r2 in rng.sample(others, 2):
                sent.append(statement(rng.choice(r2.train_templates), s, world.facts[s][r2.id]))
            texts.append(" ".join(sent))
        out[obj] = texts
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation datasets


def record_order(world: World) -> list[tuple[str, str]]:
    """(subject, relation id) of every fact, in rounds: each round holds every subject once (with a
    relation it has not had yet), shuffled, so any prefix of up to n_subjects records has distinct
    subjects (MEMIT's keys at the subject's last token coincide for two requests on one subject when
    the templates begin with the subject)."""
    rng = _rng(world.seed, "order")
    per_subject = {}
    for s in world.subjects:
        rels = [r.id for r in world.relations]
        rng.shuffle(rels)
        per_subject[s] = rels
    order = []
    for k in range(len(world.relations)):
        subjects = list(world.subjects)
        rng.shuffle(subjects)
        order.extend((s, per_subject[s][k]) for s in subjects)
    return order


def _edits(world: World, rng: random.Random, edits: Optional[Sequence[tuple[str, str, str]]]):
    """(subject, relation id, new object) per record: the given ones, or `record_order` with a new
    object drawn from rng as each record is built (lazily, so the draws interleave as they always did)."""
    if edits is not None:
        yield from edits
        return
    for s, rid in record_order(world):
        true = world.facts[s][rid]
        yield s, rid, rng.choice([o for o in world.relation(rid).objects if o != true])


def counterfact_records(world: World, edits: Optional[Sequence[tuple[str, str, str]]] = None) -> list[dict]:
    """CounterFact-format records, one per fact (subject x relation), in `record_order`; with
    `edits` ((subject, relation id, target_new) per record), those edits phrased in this world.

    - prompt: a simple training template of the relation (no lead-in);
    - target_new: another object of the same relation, at random; target_true: the true object;
    - paraphrase_prompts: [a different training template of the relation after a random filler
      sentence, a held-out template (never seen with this relation in training)];
    - neighborhood_prompts: up to 10 other subjects with the same true object for this relation, on
      the rewrite template;
    - attribute_prompts: up to 10 subjects whose true object for this relation is target_new, on the
      rewrite template;
    - generation_prompts: 4 prompts about the subject (2 training templates, 1 held-out, 1 after
      filler), for fluency / RS.
    """
    rng = _rng(world.seed, "counterfact")
    by_obj: dict[tuple[str, str], list[str]] = {}
    for s, rid, obj in world.fact_list():
        by_obj.setdefault((rid, obj), []).append(s)
    records = []
    for case_id, (s, rid, new) in enumerate(_edits(world, rng, edits)):
        rel = world.relation(rid)
        true = world.facts[s][rid]
        prompt = rng.choice(rel.rewrite_templates)
        para_train = rng.choice([t for t in rel.train_templates if t != prompt])
        para_held = rng.choice(rel.heldout_templates)
        neighbors = [x for x in by_obj[(rid, true)] if x != s]
        neighbors = rng.sample(neighbors, min(10, len(neighbors)))
        attrs = by_obj.get((rid, new), [])
        attrs = rng.sample(attrs, min(10, len(attrs)))
        gen = rng.sample(rel.train_templates, 2) + [rng.choice(rel.heldout_templates)]
        records.append({
            "case_id": case_id,
            "requested_rewrite": {
                "prompt": prompt,
                "relation_id": rid,
                "target_new": {"str": new, "id": world.object_ids[new]},
                "target_true": {"str": true, "id": world.object_ids[true]},
                "subject": s,
            },
            "paraphrase_prompts": [f"{filler_sentence(rng)} {fill(para_train, s)}", fill(para_held, s)],
            "neighborhood_prompts": [fill(prompt, x) for x in neighbors],
            "attribute_prompts": [fill(prompt, x) for x in attrs],
            "generation_prompts": [fill(t, s) for t in gen] + [f"{filler_sentence(rng)} {s} is"],
        })
    return records


def zsre_records(world: World, edits: Optional[Sequence[tuple[str, str, str]]] = None) -> list[dict]:
    """zsRE (MEND eval format) records, one per fact, in `record_order` (or for the given `edits`,
    as `counterfact_records`).

    MEMIT's mapping is followed: the edit target is answers[0], so answers = [counterfactual object]
    and alt = the same object; pred = the true object (what the unedited world model answers).
    src = a training question about the subject, rephrase = the relation's held-out question,
    loc = a training question about another subject (random relation), loc_ans its true object,
    cond = "pred >> alt || src" as in the MEND file.
    """
    rng = _rng(world.seed, "zsre")
    records = []
    for s, rid, new in _edits(world, rng, edits):
        rel = world.relation(rid)
        true = world.facts[s][rid]
        src = fill(rng.choice(rel.train_questions), s)
        other = rng.choice([x for x in world.subjects if x != s])
        orel = rng.choice(world.relations)
        records.append({
            "subject": s,
            "src": src,
            "pred": true,
            "rephrase": fill(rng.choice(rel.heldout_questions), s),
            "alt": new,
            "answers": [new],
            "loc": fill(rng.choice(orel.train_questions), other),
            "loc_ans": world.facts[other][orel.id],
            "cond": f"{true} >> {new} || {src}",
        })
    return records


def _dump(obj) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False) + "\n"


def write_world_files(world: World, out_dir, n_corpus_docs: int = 2000, args: Optional[dict] = None,
                      languages: int = 1) -> dict:
    """Write world.json, counterfact.json, zsre.json, reference_texts.json and corpus.txt; with
    languages=2 also world.l2.json, counterfact.l2.json and zsre.l2.json (`languages`), and a
    corpus of both languages."""
    from massedit.world import languages as lang

    lang.check_languages(languages)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "world.json": _dump({"args": args or {"n_subjects": world.n_subjects, "seed": world.seed},
                             **world.to_json()}),
        "counterfact.json": _dump(counterfact_records(world)),
        "zsre.json": _dump(zsre_records(world)),
        "reference_texts.json": _dump(reference_texts(world)),
    }
    if languages == 2:
        l2 = lang.second_language(world)
        files["world.l2.json"] = _dump(l2.to_json())
        files["counterfact.l2.json"] = _dump(lang.l2_counterfact_records(world, l2))
        files["zsre.l2.json"] = _dump(lang.l2_zsre_records(world, l2))
        docs = lang.bilingual_corpus(world, l2, n_corpus_docs)
    else:
        docs = corpus_documents(world, n_corpus_docs)
    files["corpus.txt"] = "".join(d + "\n" for d in docs)
    for name, text in files.items():
        (out / name).write_text(text, encoding="utf-8")
    return {name: str(out / name) for name in files}


def load_world(path) -> World:
    """The World of a build directory (or of its world.json)."""
    p = Path(path)
    if p.is_dir():
        p = p / "world.json"
    d = json.loads(p.read_text(encoding="utf-8"))
    d.pop("args", None)
    return World.from_json(d)
