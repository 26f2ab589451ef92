"""A made-up world for the RAG demo: people with invented names and four attributes each.

Every fact lives in one passage (`Vokari Teslun lives in Drammo, works as a weaver, likes teal
and owns 17 goats.`), so a question about a person held out of training (`Where does Vokari
Teslun live?`) can only be answered from the corpus: a model that never read that passage can
do no better than guess among the attribute values. Names are random syllable strings, so no
pretrained knowledge helps either. Deterministic in the seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ptjax.rag.corpus import Passage

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
          "kr", "st", "th", "sh")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
CODAS = ("", "", "", "n", "r", "s", "l", "m", "x")
JOBS = ("weaver", "baker", "tanner", "miller", "potter", "sailor", "mason", "farmer", "smith",
        "healer", "scribe", "hunter", "brewer", "cooper", "carver", "fisher", "dyer", "roofer",
        "glazier", "herder")
COLORS = ("red", "blue", "green", "teal", "amber", "violet", "ochre", "grey", "white", "black",
          "pink", "gold")
ATTRIBUTES = ("city", "job", "color", "goats")
QUESTIONS = {
    "city": "Where does {name} live?",
    "job": "What is the job of {name}?",
    "color": "Which color does {name} like?",
    "goats": "How many goats does {name} own?",
}
RECAPS = {
    "city": "{name} lives in {value}.",
    "job": "{name} works as a {value}.",
    "color": "{name} likes {value}.",
    "goats": "{name} owns {value} goats.",
}


@dataclasses.dataclass(frozen=True)
class Entity:
    """One made-up person; `id` is the id of the passage that describes them."""

    id: str
    name: str
    city: str
    job: str
    color: str
    goats: str

    def passage(self) -> Passage:
        return Passage(self.id, f"{self.name} lives in {self.city}, works as a {self.job}, "
                                f"likes {self.color} and owns {self.goats} goats.")

    def question(self, attribute: str) -> tuple[str, str]:
        """(question text, answer) about one attribute."""
        return QUESTIONS[attribute].format(name=self.name), getattr(self, attribute)


def _word(rng: np.random.Generator, syllables: int) -> str:
    parts = [ONSETS[rng.integers(len(ONSETS))] + VOWELS[rng.integers(len(VOWELS))]
             for _ in range(syllables)]
    return ("".join(parts) + CODAS[rng.integers(len(CODAS))]).capitalize()


def towns(seed: int, count: int = 40) -> list[str]:
    """`count` distinct invented town names (the values of the `city` attribute)."""
    rng = np.random.default_rng(seed)
    names: list[str] = []
    while len(names) < count:
        town = _word(rng, 2)
        if town not in names:
            names.append(town)
    return names


def _person(rng: np.random.Generator, pid: str, name: str, cities: list[str]) -> Entity:
    return Entity(pid, name, cities[rng.integers(len(cities))], JOBS[rng.integers(len(JOBS))],
                  COLORS[rng.integers(len(COLORS))], str(int(rng.integers(2, 50))))


def _name(rng: np.random.Generator) -> str:
    return f"{_word(rng, 2)} {_word(rng, int(rng.integers(2, 4)))}"


def entities(n: int, seed: int, cities: int = 40) -> list[Entity]:
    """`n` people with distinct names and attributes drawn uniformly (cities from `cities`
    invented town names, `towns(seed)`); passage ids are `p00000`, `p00001`, ..."""
    rng = np.random.default_rng(seed)
    places = towns(seed, cities)
    names: set[str] = set()
    people = []
    while len(people) < n:
        name = _name(rng)
        if name not in names:
            names.add(name)
            people.append(_person(rng, f"p{len(people):05d}", name, places))
    return people


def questions(people: list[Entity], seed: int, per_entity: int = 1):
    """(question, answer, (gold passage id,)) triples: `per_entity` distinct attributes of each
    person (all four with per_entity=4), drawn with the seed."""
    rng = np.random.default_rng(seed)
    out = []
    for person in people:
        for attribute in rng.permutation(ATTRIBUTES)[:per_entity]:
            q, a = person.question(str(attribute))
            out.append((q, a, (person.id,)))
    return out


def copy_drills(n: int, seed: int, vocab_size: int, bos: int, eos: int, length: int = 20):
    """`n` (ids, loss mask) examples `BOS s s EOS` of a random token string `s` repeated, the
    loss on the repeat only: it can be predicted only by copying from the first half.

    Why: a model pretrained from scratch on the demo's texts alone did not learn to copy a fact
    out of a passage within the demo's budget (0.29 of answers from one passage after 600
    steps, 0.30 after 1,500); after 400 steps of these drills, with drills kept in the mix, it
    answered all of them after 600. An induction (copy) circuit forms on pure repeats within a
    few hundred steps, and copying a value out of a prompt is what it does.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = rng.integers(3, vocab_size, length)  # ids 0-2 are PAD, BOS, EOS
        ids = np.concatenate([[bos], s, s, [eos]]).astype(np.int32)
        mask = np.zeros(len(ids), bool)
        mask[length + 2:] = True  # the repeat from its second token (the first is unforeseeable)
        out.append((ids, mask))
    return out


def pretraining_texts(n: int, seed: int, cities: list[str], passages: int = 2,
                      recaps: tuple[int, int] = (2, 3)) -> list[str]:
    """`n` raw texts, each about `passages` people made up for that text alone: their passages,
    then `recaps` (low, high inclusive) sentences restating an attribute of one of them.

    Why people made up per text: facts about people seen in many texts get memorized, and
    then the model answers from memory rather than from the text (a base pretrained on a fixed
    set of 3,000 people copied a fact from two passages before it 2% of the time). With
    strangers, the restated facts can only be predicted by finding the person's passage
    earlier in the text and copying, the skill reading retrieved passages needs.
    """
    rng = np.random.default_rng(seed)
    texts = []
    for _ in range(n):
        chosen = [_person(rng, "", _name(rng), cities) for _ in range(passages)]
        lines = [p.passage().text for p in chosen]
        for _ in range(int(rng.integers(recaps[0], recaps[1] + 1))):
            person = chosen[rng.integers(len(chosen))]
            attribute = ATTRIBUTES[rng.integers(len(ATTRIBUTES))]
            lines.append(RECAPS[attribute].format(name=person.name,
                                                  value=getattr(person, attribute)))
        texts.append("\n".join(lines))
    return texts
