"""Reading practice for the reader adapter: short invented entries in many template families.

Owns the "read" and "counter" training kinds (`model.train_data.TrainingData` draws them). The
first adapter trained on invented people and Wikipedia questions and learned their answer
forms, not reading: on templates it never saw (bench/heldout.py) its sparse memories answered
1% of questions. What reading needs, and these examples give:
- many forms: 14 families, each with two entry wordings and two question wordings per fact,
  so no single form can be learned as the answer;
- answers that must be copied token by token: names of 2-6 invented syllables, numbers,
  dates, codes, all drawn fresh for every example (nothing to memorize across steps);
- hard distractors: the other memories of an example are entries of the same family, 0 to
  `distractors` of them (inference reads 1 to 5), in random order;
- "counter": real countries with an invented capital in memory, asked as the model would be
  asked about the real one, so only reading (not belief) lowers the loss.
Held out from bench/heldout.py by form: no wording here shares three words in a row with its
templates (tests/model/test_heldout_bench.py checks this file too), and its six families (a
town, a ship, a mineral, a festival, a workshop, a mountain) are not among these.
Must not import the engine (`m3db`).
"""

from __future__ import annotations

import random

_ON = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr", "tr", "sh", "gl", "qu"]
_NU = ["a", "e", "i", "o", "u", "ai", "ee", "oo", "ua", "ey"]
_CO = ["", "", "", "n", "r", "l", "m", "ss", "ck", "t"]
_MONTHS = "January February March April May June July August September October November December".split()


def syllables(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_ON) + rng.choice(_NU) + rng.choice(_CO) for _ in range(n)).capitalize()


def _name(rng: random.Random) -> str:
    return f"{syllables(rng, rng.choice((1, 2)))} {syllables(rng, rng.choice((2, 3)))}"


def _date(rng: random.Random) -> str:
    return f"{rng.randrange(1, 29)} {rng.choice(_MONTHS)} {rng.randrange(1500, 2000)}"


def _code(rng: random.Random) -> str:
    letters = "".join(rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(2))
    return f"{rng.randrange(100, 9999)}-{letters}"


# family: (fields(rng) -> dict, [entry wordings], [([question wordings], lead, answer field)])
FAMILIES = {
    "river": (
        lambda r: {
            "name": syllables(r, 2),
            "source": syllables(r, 2) + " Fell",
            "km": str(r.randrange(40, 3900)),
            "sea": syllables(r, 2),
        },
        [
            "The {name} rises on {source} and runs {km} kilometres before it empties into the {sea} Sea.",
            "Rising on {source}, the {name} flows for {km} kilometres and ends in the {sea} Sea.",
        ],
        [
            (["How long is the {name}?", "What length does the {name} have?"], "The {name} runs for", "km"),
            (["Where does the {name} rise?", "What is the source of the {name}?"], "The {name} rises on", "source"),
            (
                ["Into which sea does the {name} flow?", "Where does the {name} end?"],
                "The {name} empties into the",
                "sea",
            ),
        ],
    ),
    "firm": (
        lambda r: {
            "name": syllables(r, 2),
            "by": _name(r),
            "year": str(r.randrange(1700, 2010)),
            "town": syllables(r, 3),
        },
        [
            "{name} and Sons, a maker of brass lamps, was started by {by} in {year}. Its works stand in {town}.",
            "Started in {year} by {by}, {name} and Sons still makes brass lamps at its works in {town}.",
        ],
        [
            (
                ["Who started {name} and Sons?", "Whose firm was {name} and Sons at first?"],
                "{name} and Sons was started by",
                "by",
            ),
            (
                ["When was {name} and Sons started?", "Since which year has {name} and Sons existed?"],
                "{name} and Sons dates from",
                "year",
            ),
            (
                ["Where are the works of {name} and Sons?", "Which town has the {name} and Sons works?"],
                "The works of {name} and Sons are in",
                "town",
            ),
        ],
    ),
    "novel": (
        lambda r: {
            "title": f"{syllables(r, 2)} {syllables(r, 2)}",
            "author": _name(r),
            "year": str(r.randrange(1600, 2020)),
            "press": syllables(r, 2),
        },
        [
            "{title} is a novel by {author}, first printed in {year} by {press} Press.",
            "The novel {title} came out in {year} from {press} Press; its author is {author}.",
        ],
        [
            (["Who wrote {title}?", "Who is the author of the novel {title}?"], "{title} was written by", "author"),
            (
                ["When did {title} first come out?", "In which year was {title} first printed?"],
                "{title} came out in",
                "year",
            ),
            (["Which press printed {title}?", "Who published {title}?"], "{title} was printed by", "press"),
        ],
    ),
    "owl": (
        lambda r: {
            "name": syllables(r, 2) + " owl",
            "island": syllables(r, 3),
            "grams": str(r.randrange(60, 2400)),
            "namer": _name(r),
        },
        [
            "The {name} is found only on {island}. It weighs about {grams} grams and was named by {namer}.",
            "Named by {namer}, the {name} lives nowhere but {island} and weighs about {grams} grams.",
        ],
        [
            (["Where does the {name} live?", "On which island is the {name} found?"], "The {name} lives on", "island"),
            (["What does the {name} weigh?", "How heavy is the {name}?"], "The {name} weighs about", "grams"),
            (
                ["Who named the {name}?", "Which naturalist gave the {name} its name?"],
                "The {name} was named by",
                "namer",
            ),
        ],
    ),
    "bridge": (
        lambda r: {
            "name": syllables(r, 2),
            "span": str(r.randrange(80, 4000)),
            "strait": syllables(r, 2),
            "year": str(r.randrange(1780, 2020)),
            "engineer": _name(r),
        },
        [
            "The {name} Bridge crosses the {strait} Strait with a span of {span} metres. "
            "It opened in {year}, to a design by {engineer}.",
            "Designed by {engineer} and opened in {year}, "
            "the {name} Bridge carries traffic {span} metres over the {strait} Strait.",
        ],
        [
            (
                ["Who designed the {name} Bridge?", "Whose design is the {name} Bridge?"],
                "The {name} Bridge was designed by",
                "engineer",
            ),
            (
                ["When did the {name} Bridge open?", "What year did traffic first cross the {name} Bridge?"],
                "The {name} Bridge opened in",
                "year",
            ),
            (
                ["What does the {name} Bridge cross?", "Which strait does the {name} Bridge span?"],
                "The {name} Bridge crosses the",
                "strait",
            ),
        ],
    ),
    "island": (
        lambda r: {
            "name": syllables(r, 3),
            "km2": str(r.randrange(3, 9000)),
            "harbour": syllables(r, 2),
            "residents": str(r.randrange(40, 250000)),
        },
        [
            "{name} is an island of {km2} square kilometres. "
            "Its harbour town is {harbour}, and {residents} residents live there.",
            "Some {residents} residents live on {name}, "
            "an island of {km2} square kilometres whose harbour town is {harbour}.",
        ],
        [
            (
                ["What is the harbour town of {name}?", "Where do ships dock on {name}?"],
                "The harbour town of {name} is",
                "harbour",
            ),
            (["How many residents does {name} have?", "What is the population of {name}?"], "{name} has", "residents"),
            (["How big is {name}?", "What area does the island of {name} cover?"], "{name} covers", "km2"),
        ],
    ),
    "battle": (
        lambda r: {"name": syllables(r, 2), "date": _date(r), "general": _name(r), "plain": syllables(r, 2)},
        [
            "The Battle of {name} took place on {date} on the plain of {plain}. {general} led the side that won.",
            "On {date} the armies met at {name}, on the plain of {plain}; the victor was {general}.",
        ],
        [
            (
                ["When was the Battle of {name}?", "On what day was the Battle of {name} fought?"],
                "The Battle of {name} took place on",
                "date",
            ),
            (
                ["Who won the Battle of {name}?", "Which commander was victorious at {name}?"],
                "The Battle of {name} was won by",
                "general",
            ),
            (
                ["Where was the Battle of {name}?", "On which plain did the Battle of {name} happen?"],
                "The Battle of {name} happened on the plain of",
                "plain",
            ),
        ],
    ),
    "academy": (
        lambda r: {
            "name": syllables(r, 2),
            "town": syllables(r, 2),
            "pupils": str(r.randrange(30, 5000)),
            "head": _name(r),
        },
        [
            "The {name} Academy teaches music to {pupils} pupils in {town}. Its first director was {head}.",
            "{head} was the first director of the {name} Academy, a music school in {town} with {pupils} pupils.",
        ],
        [
            (
                ["Who was the first director of the {name} Academy?", "Who led the {name} Academy first?"],
                "The first director of the {name} Academy was",
                "head",
            ),
            (
                ["How many pupils does the {name} Academy teach?", "How many pupils attend the {name} Academy?"],
                "The {name} Academy teaches",
                "pupils",
            ),
            (
                ["Where is the {name} Academy?", "Which town is home to the {name} Academy?"],
                "The {name} Academy is in",
                "town",
            ),
        ],
    ),
    "comet": (
        lambda r: {
            "name": syllables(r, 3),
            "period": str(r.randrange(3, 900)),
            "finder": _name(r),
            "observatory": syllables(r, 2),
        },
        [
            "Comet {name} comes back every {period} years. "
            "{finder} spotted it first, from the observatory at {observatory}.",
            "First spotted by {finder} at the {observatory} observatory, Comet {name} returns every {period} years.",
        ],
        [
            (
                ["Who spotted Comet {name} first?", "Who discovered Comet {name}?"],
                "Comet {name} was first spotted by",
                "finder",
            ),
            (
                ["How often does Comet {name} return?", "What is the period of Comet {name}?"],
                "Comet {name} returns every",
                "period",
            ),
            (
                ["From which observatory was Comet {name} first seen?", "Where was Comet {name} discovered?"],
                "Comet {name} was first seen from",
                "observatory",
            ),
        ],
    ),
    "vault": (
        lambda r: {"name": syllables(r, 2), "code": _code(r), "keeper": _name(r), "street": syllables(r, 2)},
        [
            "The vault of the {name} Bank on {street} Street opens with the code {code}. "
            "Only {keeper} holds its second key.",
            "Only {keeper} holds the second key to the {name} Bank vault on {street} Street; its code is {code}.",
        ],
        [
            (
                ["What code opens the {name} Bank vault?", "What is the vault code of the {name} Bank?"],
                "The {name} Bank vault opens with the code",
                "code",
            ),
            (
                ["Who holds the second key of the {name} Bank?", "Who keeps the second vault key at the {name} Bank?"],
                "The second key is held by",
                "keeper",
            ),
            (
                ["On which street is the {name} Bank?", "Where does the {name} Bank stand?"],
                "The {name} Bank is on",
                "street",
            ),
        ],
    ),
    "painting": (
        lambda r: {
            "title": f"{syllables(r, 2)} at Dusk",
            "painter": _name(r),
            "year": str(r.randrange(1400, 2000)),
            "gallery": syllables(r, 2),
        },
        [
            "{title} is an oil painting by {painter}, finished in {year}. It hangs in the {gallery} Gallery.",
            "The {gallery} Gallery shows {title}, which {painter} finished in {year}.",
        ],
        [
            (["Who painted {title}?", "Which artist made {title}?"], "{title} was painted by", "painter"),
            (
                ["When was {title} finished?", "What year did the painter complete {title}?"],
                "{title} was finished in",
                "year",
            ),
            (["Where does {title} hang?", "Which gallery shows {title}?"], "{title} hangs in the", "gallery"),
        ],
    ),
    "treaty": (
        lambda r: {
            "name": syllables(r, 2),
            "date": _date(r),
            "states": str(r.randrange(2, 40)),
            "war": syllables(r, 2),
        },
        [
            "The Treaty of {name} was signed on {date} by {states} states and ended the {war} War.",
            "{states} states put their names to the Treaty of {name} on {date}, ending the {war} War.",
        ],
        [
            (
                ["When was the Treaty of {name} signed?", "When did the states sign the Treaty of {name}?"],
                "The Treaty of {name} was signed on",
                "date",
            ),
            (
                ["Which war did the Treaty of {name} end?", "What conflict came to an end with the Treaty of {name}?"],
                "The Treaty of {name} ended the",
                "war",
            ),
            (
                ["How many states signed the Treaty of {name}?", "How many signatories did the Treaty of {name} have?"],
                "The Treaty of {name} was signed by",
                "states",
            ),
        ],
    ),
    "tongue": (
        lambda r: {
            "name": syllables(r, 2) + "ic",
            "speakers": str(r.randrange(200, 900000)),
            "valley": syllables(r, 2),
            "letters": str(r.randrange(18, 60)),
        },
        [
            "{name} is spoken by about {speakers} people in the {valley} valley. It is written with {letters} letters.",
            "In the {valley} valley about {speakers} people speak {name}, a tongue written with {letters} letters.",
        ],
        [
            (
                ["How many people speak {name}?", "What is the number of {name} speakers?"],
                "{name} is spoken by about",
                "speakers",
            ),
            (
                ["Where is {name} spoken?", "In which valley do people speak {name}?"],
                "{name} is spoken in the",
                "valley",
            ),
            (
                ["How many letters does {name} use?", "How many letters are there in the {name} alphabet?"],
                "{name} is written with",
                "letters",
            ),
        ],
    ),
    "stew": (
        lambda r: {
            "name": syllables(r, 2).lower(),
            "coast": syllables(r, 2),
            "fish": syllables(r, 2).lower(),
            "cook": _name(r),
        },
        [
            "{name} is a stew from the {coast} coast made with {fish}, a small river fish. "
            "The cook {cook} wrote its best known recipe.",
            "The best known recipe for {name}, a stew of the {coast} coast, is by the cook {cook}; its fish is {fish}.",
        ],
        [
            (["Which fish goes into {name}?", "What fish is {name} made with?"], "{name} is made with", "fish"),
            (["Where does {name} come from?", "Which coast is {name} from?"], "{name} comes from the", "coast"),
            (
                ["Who wrote the best known recipe for {name}?", "Whose recipe for {name} is famous?"],
                "The best known recipe for {name} is by",
                "cook",
            ),
        ],
    ),
}


def entry(family: str, rng: random.Random) -> tuple[dict, str]:
    """An invented entity of `family` and its entry text in one of the family's wordings."""
    fields, wordings, _ = FAMILIES[family]
    f = fields(rng)
    return f, rng.choice(wordings).format(**f)


def reading_example(rng: random.Random, distractors: int) -> tuple[str, tuple[str, ...], str, str, str]:
    """(family, references with the answer's first, question, lead, answer): one question about
    a fresh entry, read among 0..`distractors` fresh entries of the same family."""
    family = rng.choice(sorted(FAMILIES))
    f, text = entry(family, rng)
    others, n = [], rng.randint(0, distractors)
    while len(others) < n:
        g, other = entry(family, rng)
        if all(g[k] != f[k] for k in f):  # no distractor shares an answer
            others.append(other)
    questions, lead, key = rng.choice(FAMILIES[family][2])
    return family, (text, *others), rng.choice(questions).format(**f), lead.format(**f), f[key]


def counterfactual_capital(
    rng: random.Random, countries: list[tuple[str, str]], distractors: int
) -> tuple[tuple[str, ...], str, str, str]:
    """(references, question, lead, answer): a real country whose memory names an invented
    capital; the model's belief gives the real one, so only reading lowers the loss."""
    picked = rng.sample(countries, min(len(countries), 1 + rng.randint(0, distractors)))
    refs, answer = [], ""
    for i, (country, _) in enumerate(picked):
        capital = syllables(rng, rng.choice((2, 3)))
        refs.append(
            rng.choice(
                [
                    f"{country} is governed from {capital}, its capital city and largest port.",
                    f"The seat of government of {country} is {capital}, which is also its capital city.",
                ]
            )
        )
        if i == 0:
            answer = capital
    country = picked[0][0]
    question = rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?"])
    return tuple(refs), question, f"The capital of {country} is", answer
