"""The embedded synthetic world: fictional entities, one document each, and questions about them.

The default run needs data a small model cannot answer from memory, so that searching (and
the information gain it brings) is the only way to the gold answer. Every name here is built
from syllable tables, every fact is drawn from a seeded generator, and the same seed always
gives the same world, corpus and questions.

Entities and the facts their documents state:
  country     capital city
  city        country, river
  university  city, founding year
  company     headquarters city, founder (a person), founding year, industry
  person      birthplace city, birth year, alma mater, employer, occupation
One-hop questions are answered by the question entity's own document; two-hop questions by
the document of an entity that the first document names, and by no single document. Each
question template has a name (QUESTION_KINDS, e.g. "person.birthplace", "company.founder.university");
`question_kinds` asks only those named (the documents stay the same).

Held out: the test questions are about entities that no training question asks about. A share
of each kind's entities is set aside; a test question's supporting documents all belong to set-
aside entities and a training question's to none (so validation measures a skill, searching and
reading, not facts memorised from training rewards). The share is the smallest multiple of 0.05
(at least `test_fraction`) that leaves enough questions of each kind on both sides.

Outputs (`write_world`): train.parquet and test.parquet in the reference's format (see
igpo_jax.data.examples), and corpus.jsonl in Search-R1's wiki-18 format ({"id", "contents"} with
contents = '"Title"\\ntext') for the embedded retriever.

    python -m igpo_jax.world --out=/tmp/world --seed=0 [--question_kinds=person.birthplace,...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from igpo_jax.data import examples as examples_lib

T = TypeVar("T")

ONE_HOP_SOURCE = "synthetic_1hop"
TWO_HOP_SOURCE = "synthetic_2hop"

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "tr", "th", "sh", "st", "kl", "qu")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "o", "ai", "ei", "ou", "ae")
_CODAS = ("n", "r", "l", "s", "th", "m", "k", "x", "nd", "rn")
_COUNTRY_ENDINGS = ("ia", "ora", "esh", "and", "avia", "urin")
_RIVER_ENDINGS = ("", "a", "el", "in")
_UNIVERSITY_KINDS = ("University", "Institute of Technology", "College")
_COMPANY_KINDS = ("Industries", "Systems", "Labs", "Works", "Holdings", "Dynamics", "Group")
_INDUSTRIES = ("shipping", "software", "textile", "mining", "pharmaceutical", "aerospace",
               "food", "publishing", "energy", "glassware", "robotics", "insurance")
# Real places and firms that the syllable tables can spell. The facts would still be random,
# but a model's prior ("Paris is in France") would then fight the retrieved document.
_REAL_NAMES = frozenset((
    "paris", "milan", "berlin", "boston", "london", "lisbon", "denver", "dallas", "toronto",
    "sudan", "peru", "mali", "togo", "gabon", "benin", "nepal", "tunis", "dakar", "lagos",
    "baku", "kabul", "manila", "tirana", "panama", "tuvalu", "sumatra", "bali", "malta",
    "dubai", "mumbai", "kolkata", "riga", "lima", "rome", "doha", "gaza", "kobe", "kodak",
    "samsung", "tesla", "roma", "kenya", "sparta", "dover", "salem", "kansas",
))
# Syllables glued at random can spell rude words; names containing these are redrawn.
_RUDE_FRAGMENTS = ("fuk", "fuc", "shit", "cunt", "kunt", "nig", "rape", "fag", "cum", "dik",
                   "puss", "slut", "twat", "wank", "poo", "tit", "sex", "nazi")
_OCCUPATIONS = ("engineer", "chemist", "architect", "historian", "painter", "economist",
                "geologist", "composer", "surgeon", "botanist", "journalist", "mathematician")


class _Draw:
    """Seeded choices built only on `random.Random.random()`.

    Python guarantees that method's sequence across versions, unlike choice/shuffle/randrange,
    so a world (and the runs trained on it) is reproducible after an interpreter upgrade.
    """

    def __init__(self, seed: int):
        self._rng = random.Random(seed)

    def integer(self, low: int, high: int) -> int:
        """Uniform in [low, high]."""
        return low + int(self._rng.random() * (high - low + 1))

    def choice(self, options: Sequence[T]) -> T:
        return options[int(self._rng.random() * len(options))]

    def chance(self, probability: float) -> bool:
        return self._rng.random() < probability

    def shuffled(self, items: Sequence[T]) -> list[T]:
        keys = [self._rng.random() for _ in items]
        return [items[i] for i in sorted(range(len(items)), key=keys.__getitem__)]


class _NameMaker:
    """Pronounceable made-up words, no one of which contains another.

    The containment rule keeps answer checks exact: finding an answer in a document can then
    never be an accident of one name hiding inside a longer one.
    """

    def __init__(self, draw: _Draw):
        self._draw = draw
        self._used: list[str] = []

    def word(self, syllables: int, ending: str = "") -> str:
        for _ in range(1000):
            parts = []
            for i in range(syllables):
                coda_chance = 0.6 if i == syllables - 1 and not ending else 0.25
                coda = self._draw.choice(_CODAS) if self._draw.chance(coda_chance) else ""
                parts.append(self._draw.choice(_ONSETS) + self._draw.choice(_VOWELS) + coda)
            candidate = ("".join(parts) + ending).capitalize()
            lowered = candidate.lower()
            if (re.search("[aeiou]{3}", lowered) or lowered in _REAL_NAMES
                    or any(fragment in lowered for fragment in _RUDE_FRAGMENTS)):
                continue  # hard to say, a real place a model has opinions about, or rude
            if all(lowered not in used and used not in lowered for used in self._used):
                self._used.append(lowered)
                return candidate
        raise RuntimeError("ran out of distinct names; enlarge the syllable tables")


@dataclasses.dataclass(frozen=True)
class WorldShape:
    """How many entities of each kind (every one but rivers gets a document)."""

    countries: int = 10
    cities: int = 40
    rivers: int = 15
    universities: int = 20
    companies: int = 40
    people: int = 90
    # distractors: companies that share an existing company's short name ("Pemdo Labs" and "Pemdo
    # Works"), with their own city, founder and year. A second hop that names the bridge company
    # in full finds its document; one that names only the shared word may find the namesake's,
    # a plausible wrong place or year. 0 keeps the world (and its seeded draws) as it was.
    namesakes: int = 0


@dataclasses.dataclass(frozen=True)
class Document:
    id: str
    title: str
    text: str

    @property
    def contents(self) -> str:
        return f'"{self.title}"\n{self.text}'

    def corpus_row(self) -> dict[str, str]:
        return {"id": self.id, "contents": self.contents}


@dataclasses.dataclass(frozen=True)
class WorldQuestion:
    """A question, its gold aliases, and the documents that answer it, in reading order.

    `supporting_doc_ids[0]` is the question entity's document; for two hops the second
    document is the one that states the answer.
    """

    index: str
    question: str
    answers: tuple[str, ...]
    supporting_doc_ids: tuple[str, ...]
    split: str
    kind: str = ""  # its template's name (QUESTION_KINDS); not written to the parquet files

    @property
    def hops(self) -> int:
        return len(self.supporting_doc_ids)

    @property
    def data_source(self) -> str:
        return ONE_HOP_SOURCE if self.hops == 1 else TWO_HOP_SOURCE

    def to_example(self) -> examples_lib.Example:
        return examples_lib.Example(index=self.index, data_source=self.data_source,
                                    question=self.question, golden_answers=self.answers,
                                    prompt=(examples_lib.Message("user", self.question),), split=self.split,
                                    supporting_doc_ids=self.supporting_doc_ids)


@dataclasses.dataclass(frozen=True)
class World:
    seed: int
    documents: tuple[Document, ...]
    questions: tuple[WorldQuestion, ...]

    def document(self, doc_id: str) -> Document:
        return self.documents[int(doc_id)]


@dataclasses.dataclass(frozen=True)
class WorldFiles:
    train: Path
    test: Path
    corpus: Path


# --- Entities (internal: only documents and questions leave this module) ----------------------

@dataclasses.dataclass
class _Entity:
    name: str
    doc_id: str = ""


@dataclasses.dataclass
class _Country(_Entity):
    capital: _City | None = None


@dataclasses.dataclass
class _City(_Entity):
    country: _Country | None = None
    river: str = ""


@dataclasses.dataclass
class _University(_Entity):
    city: _City | None = None
    founded: int = 0


@dataclasses.dataclass
class _Company(_Entity):
    short_name: str = ""
    short_name_shared: bool = False  # a namesake exists (WorldShape.namesakes): not an alias then
    city: _City | None = None
    founder: _Person | None = None
    founded: int = 0
    industry: str = ""


@dataclasses.dataclass
class _Person(_Entity):
    family_name: str = ""
    birthplace: _City | None = None
    born: int = 0
    university: _University | None = None
    employer: _Company | None = None
    occupation: str = ""


@dataclasses.dataclass
class _Entities:
    countries: list[_Country]
    cities: list[_City]
    universities: list[_University]
    companies: list[_Company]
    people: list[_Person]

    def all(self) -> list[_Entity]:
        return [*self.countries, *self.cities, *self.universities, *self.companies, *self.people]


def _make_entities(draw: _Draw, shape: WorldShape) -> _Entities:
    counts = dataclasses.astuple(shape)[:-1]  # every kind of entity, not the namesakes
    if min(counts) < 1 or shape.cities < shape.countries or shape.namesakes < 0 \
            or shape.people < shape.companies + shape.namesakes or shape.namesakes > shape.companies:
        raise ValueError(f"{shape}: every kind needs at least one entity, every country a city, "
                         "every company a founder (people >= companies + namesakes), and at most "
                         "one namesake per company")
    names = _NameMaker(draw)
    rivers = [names.word(2, draw.choice(_RIVER_ENDINGS)) + " River" for _ in range(shape.rivers)]
    countries = [_Country(names.word(2, draw.choice(_COUNTRY_ENDINGS)))
                 for _ in range(shape.countries)]
    cities = []
    for i in range(shape.cities):
        # The first city of each country is its capital, so every country has one.
        country = countries[i] if i < len(countries) else draw.choice(countries)
        city = _City(names.word(draw.integer(2, 3)), country=country, river=draw.choice(rivers))
        country.capital = country.capital or city
        cities.append(city)
    universities = [_University(f"{names.word(2)} {draw.choice(_UNIVERSITY_KINDS)}",
                                city=draw.choice(cities), founded=draw.integer(1650, 1960))
                    for _ in range(shape.universities)]
    companies = []
    for _ in range(shape.companies):
        short_name = names.word(draw.integer(2, 3))
        companies.append(_Company(f"{short_name} {draw.choice(_COMPANY_KINDS)}",
                                  short_name=short_name, city=draw.choice(cities),
                                  industry=draw.choice(_INDUSTRIES)))
    people = []
    for _ in range(shape.people):
        family_name = names.word(3)
        people.append(_Person(f"{names.word(2)} {family_name}", family_name=family_name,
                              birthplace=draw.choice(cities), born=draw.integer(1930, 1999),
                              university=draw.choice(universities),
                              employer=draw.choice(companies),
                              occupation=draw.choice(_OCCUPATIONS)))
    # The first people found the companies (and work there); founding follows their birth and
    # precedes today, so founders are born early enough.
    for company, founder in zip(companies, people):
        company.founder = founder
        founder.born = draw.integer(1930, 1975)
        company.founded = founder.born + draw.integer(25, 45)
        founder.employer = company
    companies += _namesakes(draw, companies, people[len(companies):], cities, shape.namesakes)
    entities = _Entities(countries, cities, universities, companies, people)
    for doc_id, entity in enumerate(entities.all()):
        entity.doc_id = str(doc_id)
    return entities


def _namesakes(draw: _Draw, companies: list[_Company], non_founders: list[_Person],
               cities: list[_City], count: int) -> list[_Company]:
    """`count` distractor companies, each sharing the short name of a different company (module
    doc: WorldShape.namesakes), in another city, founded by a person who founded nothing else (who
    then works there) in another year."""
    made = []
    if not count:
        return made  # no draws: a world without namesakes is the one it was before they existed
    for original, founder in zip(draw.shuffled(companies)[:count], draw.shuffled(non_founders)):
        kind = draw.choice([k for k in _COMPANY_KINDS if not original.name.endswith(" " + k)])
        city = draw.choice([c for c in cities if c is not original.city])
        founded = founder.born + draw.integer(25, 45)
        if founded == original.founded:
            founded += 1  # a namesake's year must not be the answer by accident
        namesake = _Company(f"{original.short_name} {kind}", short_name=original.short_name,
                            short_name_shared=True, city=city, founder=founder, founded=founded,
                            industry=draw.choice(_INDUSTRIES))
        original.short_name_shared = True
        founder.employer = namesake
        made.append(namesake)
    return made


def _document_text(draw: _Draw, entity: _Entity) -> str:
    # The two phrasings of a kind share their content words and differ only in order: a
    # question's words then match every document of that kind alike, and BM25 ranks by the
    # entity's (rare) name instead of favouring whichever phrasing echoes the question.
    if isinstance(entity, _Country):
        return draw.choice((
            f"{entity.name} is a country whose capital is {entity.capital.name}.",
            f"The capital of the country {entity.name} is {entity.capital.name}.",
        ))
    if isinstance(entity, _City):
        return draw.choice((
            f"{entity.name} is a city in {entity.country.name}. "
            f"The {entity.river} flows through {entity.name}.",
            f"The {entity.river} flows through {entity.name}, a city in {entity.country.name}.",
        ))
    if isinstance(entity, _University):
        return draw.choice((
            f"{entity.name} is a university in {entity.city.name}, founded in {entity.founded}.",
            f"Founded in {entity.founded}, {entity.name} is a university in {entity.city.name}.",
        ))
    if isinstance(entity, _Company):
        article = "an" if entity.industry[0] in "aeiou" else "a"
        return draw.choice((
            f"{entity.name} is {article} {entity.industry} company headquartered in "
            f"{entity.city.name}. It was founded in {entity.founded} by {entity.founder.name}.",
            f"Founded by {entity.founder.name} in {entity.founded}, {entity.name} is "
            f"{article} {entity.industry} company headquartered in {entity.city.name}.",
        ))
    if isinstance(entity, _Person):
        article = "an" if entity.occupation[0] in "aeiou" else "a"
        return draw.choice((
            f"{entity.name} is {article} {entity.occupation} born in {entity.born} in "
            f"{entity.birthplace.name}. {entity.family_name} studied at "
            f"{entity.university.name} and works for {entity.employer.name}.",
            f"{entity.name} was born in {entity.birthplace.name} in {entity.born}. "
            f"The {entity.occupation} studied at {entity.university.name} and works for "
            f"{entity.employer.name}.",
        ))
    raise TypeError(f"no document template for {type(entity).__name__}")


# --- Questions --------------------------------------------------------------------------------

# A template turns an entity into (question, gold aliases, supporting entities in reading order).
_Template = Callable[[_Entity], tuple[str, tuple[str, ...], tuple[_Entity, ...]]]


def _company_aliases(company: _Company) -> tuple[str, ...]:
    # a short name that a namesake shares names two companies: not an answer to either
    return (company.name,) if company.short_name_shared else (company.name, company.short_name)


def _university_aliases(university: _University) -> tuple[str, ...]:
    return university.name, university.name.split(" ")[0]


def _person_aliases(person: _Person) -> tuple[str, ...]:
    return person.name, person.family_name


def _river_aliases(river: str) -> tuple[str, ...]:
    return river, river.removesuffix(" River")


# Every template has a name, "<entity kind>.<fact>" (one hop) or "<kind>.<fact>.<fact>" (two hops), so
# a run can ask for a subset (`question_kinds`): a rung of difficulty, say the facts a base model
# can already write, whose rewards then reach every group.
_ONE_HOP: dict[type, dict[str, _Template]] = {
    _Person: {
        "person.birthplace": lambda p: (f"Where was {p.name} born?", (p.birthplace.name,), (p,)),
        "person.birth_year": lambda p: (f"In which year was {p.name} born?", (str(p.born),), (p,)),
        "person.employer": lambda p: (f"Which company does {p.name} work for?",
                                      _company_aliases(p.employer), (p,)),
        "person.university": lambda p: (f"Which university did {p.name} attend?",
                                        _university_aliases(p.university), (p,)),
    },
    _Company: {
        "company.city": lambda c: (f"In which city is {c.name} headquartered?", (c.city.name,), (c,)),
        "company.founder": lambda c: (f"Who founded {c.name}?", _person_aliases(c.founder), (c,)),
        "company.founded": lambda c: (f"In which year was {c.name} founded?", (str(c.founded),), (c,)),
    },
    _City: {
        "city.country": lambda c: (f"In which country is {c.name}?", (c.country.name,), (c,)),
        "city.river": lambda c: (f"Which river flows through {c.name}?", _river_aliases(c.river), (c,)),
    },
    _Country: {
        "country.capital": lambda c: (f"What is the capital of {c.name}?", (c.capital.name,), (c,)),
    },
    _University: {
        "university.city": lambda u: (f"In which city is {u.name}?", (u.city.name,), (u,)),
        "university.founded": lambda u: (f"In which year was {u.name} founded?",
                                         (str(u.founded),), (u,)),
    },
}

_TWO_HOP: dict[type, dict[str, _Template]] = {
    _Person: {
        "person.birthplace.country": lambda p: (f"In which country was {p.name} born?",
                                                (p.birthplace.country.name,), (p, p.birthplace)),
        "person.birthplace.river": lambda p: (
            f"Which river flows through the city where {p.name} was born?",
            _river_aliases(p.birthplace.river), (p, p.birthplace)),
        "person.employer.founder": lambda p: (f"Who founded the company that employs {p.name}?",
                                              _person_aliases(p.employer.founder), (p, p.employer)),
        "person.employer.city": lambda p: (
            f"Where is the company that employs {p.name} headquartered?",
            (p.employer.city.name,), (p, p.employer)),
        "person.employer.founded": lambda p: (
            f"In which year was the company that employs {p.name} founded?",
            (str(p.employer.founded),), (p, p.employer)),
        "person.university.city": lambda p: (
            f"In which city is the university that {p.name} attended?",
            (p.university.city.name,), (p, p.university)),
    },
    _Company: {
        "company.founder.birthplace": lambda c: (
            f"In which city was the founder of {c.name} born?",
            (c.founder.birthplace.name,), (c, c.founder)),
        "company.founder.university": lambda c: (
            f"Which university did the founder of {c.name} attend?",
            _university_aliases(c.founder.university), (c, c.founder)),
        "company.city.country": lambda c: (f"In which country is {c.name} headquartered?",
                                           (c.city.country.name,), (c, c.city)),
    },
    _University: {
        "university.city.country": lambda u: (f"In which country is {u.name}?",
                                              (u.city.country.name,), (u, u.city)),
    },
}

QUESTION_KINDS = tuple(name for templates in (_ONE_HOP, _TWO_HOP)
                       for kind_templates in templates.values() for name in kind_templates)


@dataclasses.dataclass(frozen=True)
class _Candidate:
    question: str
    answers: tuple[str, ...]
    doc_ids: tuple[str, ...]
    kind: str


def _candidates(entities: _Entities, templates: dict[type, dict[str, _Template]],
                documents: Sequence[Document], wanted: frozenset[str]) -> list[list[_Candidate]]:
    """All usable questions of the `wanted` kinds, one list per template."""
    texts = [d.contents.lower() for d in documents]
    per_template = []
    for kind, kind_templates in templates.items():
        members = [e for e in entities.all() if type(e) is kind]
        for name, template in kind_templates.items():
            if name not in wanted:
                continue
            usable = []
            for entity in members:
                question, answers, support = template(entity)
                # A two-hop question that one document answers (the question entity's own, or
                # say a company's naming its founder and its city) is really one-hop: skip it.
                if len(support) > 1 and any(
                        entity.name.lower() in text and any(a.lower() in text for a in answers)
                        for text in texts):
                    continue
                usable.append(_Candidate(question, answers, tuple(e.doc_id for e in support), name))
            per_template.append(usable)
    return per_template


def _pick(draw: _Draw, per_template: list[list[_Candidate]], count: int,
          kind: str) -> list[_Candidate]:
    """`count` questions taken round-robin over templates, so every question type is asked."""
    available = sum(len(c) for c in per_template)
    if count > available:
        raise ValueError(f"asked for {count} {kind} questions, but this world has only "
                         f"{available}; enlarge WorldShape")
    queues = [draw.shuffled(c) for c in per_template]
    picked: list[_Candidate] = []
    while len(picked) < count:
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop())
    return picked


def _held_out(draw: _Draw, entities: _Entities, share: float) -> set[str]:
    """Doc ids of the first `share` of each kind's entities in one seeded order per kind; a larger
    share holds out a superset, so searching upwards for a share that suffices is well defined."""
    held = set()
    for kind in (entities.countries, entities.cities, entities.universities, entities.companies,
                 entities.people):
        order = draw.shuffled([e.doc_id for e in kind])
        held.update(order[:round(len(order) * share)])
    return held


def _split_candidates(per_template: list[list[_Candidate]],
                      held: set[str]) -> tuple[list[list[_Candidate]], list[list[_Candidate]]]:
    """(test, train) candidates per template: all documents held out, or none; mixed ones drop."""
    test = [[c for c in cands if set(c.doc_ids) <= held] for cands in per_template]
    train = [[c for c in cands if not set(c.doc_ids) & held] for cands in per_template]
    return test, train


def _wanted_kinds(question_kinds: Sequence[str], two_hop_fraction: float) -> frozenset[str]:
    """The template names asked for (all when none are named), checked against QUESTION_KINDS."""
    wanted = frozenset(question_kinds or QUESTION_KINDS)
    unknown = sorted(wanted - set(QUESTION_KINDS))
    if unknown:
        raise ValueError(f"unknown world question kind(s) {unknown}; expected names from "
                         f"{', '.join(QUESTION_KINDS)}")
    for hops, templates, share in ((1, _ONE_HOP, 1.0 - two_hop_fraction), (2, _TWO_HOP, two_hop_fraction)):
        if share > 0 and not wanted & {name for t in templates.values() for name in t}:
            raise ValueError(f"{share:.0%} of the questions are {hops}-hop, but none of the question "
                             f"kinds asked for ({', '.join(sorted(wanted))}) is {hops}-hop")
    return wanted


def build_world(seed: int = 0, num_questions: int = 400, two_hop_fraction: float = 0.5,
                test_fraction: float = 0.1, shape: WorldShape = WorldShape(),
                question_kinds: Sequence[str] = ()) -> World:
    """The world for `seed`: one document per entity and `num_questions` questions, of which
    round(num_questions · test_fraction) are test questions on held-out entities (module doc).
    `question_kinds` (names from QUESTION_KINDS; all when empty) restricts the questions asked;
    the entities, documents and corpus stay the same."""
    if not 0.0 <= two_hop_fraction <= 1.0 or not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"two_hop_fraction ({two_hop_fraction}) must be in [0, 1] and "
                         f"test_fraction ({test_fraction}) in [0, 1)")
    wanted_kinds = _wanted_kinds(question_kinds, two_hop_fraction)
    draw = _Draw(seed)
    entities = _make_entities(draw, shape)
    documents = tuple(Document(id=e.doc_id, title=e.name, text=_document_text(draw, e))
                      for e in entities.all())

    num_two_hop = round(num_questions * two_hop_fraction)
    num_test = round(num_questions * test_fraction)
    num_test_two_hop = round(num_test * two_hop_fraction)
    wanted = {  # hops → (test, train) counts
        1: (num_test - num_test_two_hop, num_questions - num_two_hop - (num_test - num_test_two_hop)),
        2: (num_test_two_hop, num_two_hop - num_test_two_hop)}
    pools = {1: _candidates(entities, _ONE_HOP, documents, wanted_kinds),
             2: _candidates(entities, _TWO_HOP, documents, wanted_kinds)}
    entity_seed = draw.integer(0, 2**31 - 1)  # the held-out order: the same for every share tried
    share = max(0.05, math.ceil(test_fraction / 0.05 - 1e-9) * 0.05)
    while True:
        held = _held_out(_Draw(entity_seed), entities, share) if num_test else set()
        splits = {hops: _split_candidates(pools[hops], held) for hops in pools}
        enough_test = all(sum(map(len, splits[h][0])) >= wanted[h][0] for h in pools)
        if enough_test or share >= 0.95:
            break
        share = round(share + 0.05, 2)
    picked_test, picked_train = [], []
    for hops, kind in ((1, "one-hop"), (2, "two-hop")):
        test_cands, train_cands = splits[hops]
        picked_test += _pick(draw, test_cands, wanted[hops][0], f"held-out {kind}")
        picked_train += _pick(draw, train_cands, wanted[hops][1], f"training {kind} (with "
                              f"{share:.0%} of the entities held out for {num_test} test questions)")
    picked = ([(c, "test") for c in draw.shuffled(picked_test)]
              + [(c, "train") for c in draw.shuffled(picked_train)])
    questions = []
    counters = {ONE_HOP_SOURCE: 0, TWO_HOP_SOURCE: 0}
    for candidate, split in picked:
        source = ONE_HOP_SOURCE if len(candidate.doc_ids) == 1 else TWO_HOP_SOURCE
        questions.append(WorldQuestion(
            index=f"{source}_{counters[source]}", question=candidate.question,
            answers=candidate.answers, supporting_doc_ids=candidate.doc_ids, split=split,
            kind=candidate.kind))
        counters[source] += 1
    return World(seed=seed, documents=documents, questions=tuple(questions))


def write_world(out_dir: str | os.PathLike, seed: int = 0, num_questions: int = 400,
                two_hop_fraction: float = 0.5, test_fraction: float = 0.1,
                shape: WorldShape = WorldShape(), question_kinds: Sequence[str] = ()) -> WorldFiles:
    """Writes train.parquet, test.parquet and corpus.jsonl into `out_dir`."""
    world = build_world(seed, num_questions, two_hop_fraction, test_fraction, shape, question_kinds)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = WorldFiles(train=out / "train.parquet", test=out / "test.parquet",
                       corpus=out / "corpus.jsonl")
    for split, path in (("train", files.train), ("test", files.test)):
        examples_lib.write_examples(path, [q.to_example() for q in world.questions if q.split == split])
    with open(files.corpus, "w", encoding="utf-8") as corpus:
        for document in world.documents:
            corpus.write(json.dumps(document.corpus_row(), ensure_ascii=False) + "\n")
    return files


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_questions", type=int, default=400)
    parser.add_argument("--two_hop_fraction", type=float, default=0.5)
    parser.add_argument("--test_fraction", type=float, default=0.1)
    parser.add_argument("--question_kinds", default="",
                        help="comma-separated names from QUESTION_KINDS; empty: every kind")
    args = parser.parse_args(argv)
    kinds = tuple(k.strip() for k in args.question_kinds.split(",") if k.strip())
    files = write_world(args.out, args.seed, args.num_questions, args.two_hop_fraction,
                        args.test_fraction, question_kinds=kinds)
    print(f"wrote {files.train}, {files.test}, {files.corpus}")


if __name__ == "__main__":
    main()
