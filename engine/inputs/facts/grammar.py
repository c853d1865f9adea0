"""How a name sits in a sentence: articles, the prepositions that contract with them, and verbs
that agree with a plural name.

Templates mark the slot before the subject with a marker (`<the>`, `<de>`, ...) so that one template
serves "the capital of France" and "the capital of the United States", or in Catalan "la capital de
França", "la capital d'Itàlia", "la capital del Japó" and "la capital dels Estats Units"; a verb
written `<és|són>` takes its singular or plural form from the subject ("Les Filipines són un país";
English treats such names as singular, "The Philippines is"). Rendering a template for a subject
replaces the markers and keeps "{}" where the subject goes, so the result is a CounterFact prompt
whose subject is the bare name.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

LANGUAGES = ("en", "ca")

# Catalan article -> (after "de", after "a", the article itself); "" is a name without an article.
_CA_FORMS = {
    "": ("de ", "a ", ""),
    "el": ("del ", "al ", "el "),
    "la": ("de la ", "a la ", "la "),
    "l'": ("de l'", "a l'", "l'"),
    "els": ("dels ", "als ", "els "),
    "les": ("de les ", "a les ", "les "),
}
ARTICLES = {"en": ("", "the"), "ca": tuple(_CA_FORMS)}
MARKERS = {"en": ("the", "The"), "ca": ("de", "a", "A", "art", "Art")}
_MARKER = re.compile(r"<(\w+)>")
_AGREEMENT = re.compile(r"<([^<>|]+)\|([^<>|]+)>")
_PLURAL_ARTICLES = ("els", "les")


@dataclass(frozen=True)
class Name:
    """A name in one language and the article it takes ("" for none)."""

    text: str
    article: str = ""

    def phrase(self) -> str:
        """The name as an object of a sentence: 'the United States', 'el Japó', "l'Índia"."""
        if not self.article:
            return self.text
        return self.article + ("" if self.article.endswith("'") else " ") + self.text


def _elides(text: str) -> bool:
    """Catalan "de" becomes "d'" before a vowel or h + vowel, but not before a semivowel i/u + vowel."""
    plain = unicodedata.normalize("NFD", text.lower())
    plain = "".join(c for c in plain if not unicodedata.combining(c))
    if plain[:1] == "h":
        plain = plain[1:]
    if plain[:1] in ("i", "u") and plain[1:2] in tuple("aeiou"):
        return False
    return plain[:1] in tuple("aeiou")


def _form(lang: str, marker: str, name: Name) -> str:
    if lang == "en":
        return "" if not name.article else ("the " if marker == "the" else "The ")
    after_de, after_a, article = _CA_FORMS[name.article]
    if marker == "de":
        return "d'" if not name.article and _elides(name.text) else after_de
    form = {"a": after_a, "A": after_a, "art": article, "Art": article}[marker]
    return form[:1].upper() + form[1:] if marker[0].isupper() else form


def render(template: str, lang: str, name: Name) -> str:
    """`template` with its marker replaced for `name`; "{}" stays where the subject goes."""

    def replace(match: re.Match) -> str:
        if match.group(1) not in MARKERS[lang]:
            raise ValueError(f"template {template!r}: unknown marker <{match.group(1)}> for language {lang!r}; "
                             f"use one of {', '.join(MARKERS[lang])}")
        return _form(lang, match.group(1), name)

    plural = lang == "ca" and name.article in _PLURAL_ARTICLES
    agreed = _AGREEMENT.sub(lambda m: m.group(2 if plural else 1), template)
    return _MARKER.sub(replace, agreed)


def sentence(template: str, lang: str, name: Name) -> str:
    """The template filled with the subject's name: a whole prompt."""
    return render(template, lang, name).replace("{}", name.text, 1)
