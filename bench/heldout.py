"""Held-out reading quality: facts no model has seen, in templates no training example uses.

    python bench/heldout.py                  # the full run: 84 questions (~45 min here; docs/quality.md)
    python bench/heldout.py --quick          # smoke test: 12 questions, 4 conditions
    python bench/heldout.py --only none,dense5,dense1   # a subset of the conditions
    python bench/heldout.py --from-json bench/out/heldout.json   # tables of a saved run
    # compressed configurations of your own: NAME=LAYERS:TOKENS:CODEC[:own] (CODEC int4, int8
    # or pqK/V; pq's codebook trained on bench/codec_sample.py's texts, or with :own on the
    # bench's 42 entries as `m3db recompress` would), read through --memory-adapter (a, d or a file)
    python bench/heldout.py --memory l18=18-29:32:pq8/16 --ks 1 --only l18_1+m
    # relevance gates (issue 28): each k=5 memory condition that runs gets NAME@GATE, its recall
    # list cut to the memories scoring >= top score - M (marginM) and/or >= F (floorF)
    python bench/heldout.py --only dense5,dense1 --gates margin0.1,margin0.2,floor0.5
    python bench/heldout.py --recall-only --seed 15 --gates margin0.1   # recall's scores only, no model run

What it measures, and why it cannot be learned by form:
- Knowledge base: short encyclopedia entries about invented things (towns, ships, minerals,
  festivals, workshops, mountains), one entry = one reference, with names made of invented
  syllables (several tokens each: a reader must copy them token by token), numbers and dates
  drawn by a seeded RNG. The six template families, their questions and their answer lead-ins
  are written here only: model/train_data.py trains the reader adapter on invented *people*
  ("X was a <trade> born in <place> in <year>"), Wikipedia capitals, "what is" and
  fill-in-the-blank, none of which appears below (tests/model/test_heldout_bench.py checks that
  no evaluation template's fixed wording occurs in the training data's). The syllables differ
  from train_data's too. No model can know an answer, so with no memory every answer is a guess.
- Each question is asked (a) with k=5: 1 relevant + 4 distractor entries, the top of the
  engine's own recall (`db.recall(question)`: all-MiniLM-L6-v2 + USearch) with the relevant
  entry put in the last place if recall missed it (the hit rate is printed), in recall order,
  as at inference; and (b) with k=1: the relevant entry alone.
- A gated condition (`--gates`) reads the same k=5 list cut by a relevance gate on recall's
  scores (cosine to the question): kept in recall order, the top one always; a relevant entry
  forced in is scored as recall scores it (recall restricted to it). The run prints, per gate,
  the memories kept and how often the relevant one stayed, and the score distribution of
  relevant entries against distractors that gate values are chosen from (`--recall-only`
  prints it alone, for another seed, without encoding or generating anything).
- Memories are written and read through m3db's own code paths: one database per memory setting
  (`m3db.connect(model=..., codec=...)`, `db.add_documents`), memories read back decoded from
  the segments (`db.get_many`, codec applied), placed and read by the generation loop
  (`MemoryModel.generate_many` / `m3db.model.score.answer_logprobs`, the loop `db.generate`
  drives) through a retriever that hands each question its fixed list (the DB adds nothing else
  here: recall is done once, so every condition reads exactly the same entries).

Conditions (same weights, same questions, one run): none; text RAG (the same entries' text
prepended); dense default (every layer, 32 tokens per head, int4: `m3db.connect`'s default);
the full K/V ceiling (every token of every layer, `MemorySettings(tokens_per_head=128)`,
int8); the sparse mode (8 tokens per head, layers 15-29, int4) through the shipped reader
adapter, with none and RAG through the same adapter (so its memory's own gain is measured
against the same weights); and token-selection variants (`--selection`, see docs/quality.md).

Metrics per question, then mean over questions with a 95% bootstrap interval (2,000 resamples
of the questions, seeded); differences are paired (the same resample for both sides):
  EM       the gold answer (casefolded \\w+ words) appears in the greedy reply to the chat
           question (24 new tokens);
  logprob  log p(answer | chat question, assistant lead-in, memories), natural log, summed
           over the answer's tokens, teacher-forced through the generation loop;
  gain     the memory's own gain: logprob (and EM) with memory minus without, same weights
           and adapter (none for the base weights, none + adapter for the sparse mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import sys
import tempfile
import time
import unicodedata

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from codec_sample import codec_sample  # noqa: E402

import m3db  # noqa: E402
from m3db.model.adapter import BUNDLED_FILE, ReaderAdapter  # noqa: E402
from m3db.model.embedder import Embedder  # noqa: E402
from m3db.model.generate import chunk_query  # noqa: E402
from m3db.model.memory import EncodedMemory  # noqa: E402
from m3db.model.memory_model import MemoryModel  # noqa: E402
from m3db.model.score import answer_logprobs  # noqa: E402
from m3db.model.settings import MemorySettings  # noqa: E402

GEN_TOKENS = 24
BOOTSTRAP = 2000

# -- invented entities -------------------------------------------------------------------------
# syllables of their own (train_data.py draws people from other onsets and vowels)
_ON = ["v", "k", "t", "m", "sk", "gr", "h", "j", "w", "ch", "pl", "fl", "c", "y", "z", "dr"]
_NU = ["o", "a", "e", "i", "u", "oa", "ye", "io", "au", "y"]
_CO = ["", "", "", "r", "n", "sk", "lt", "v", "rn", "p"]
_MONTHS = "January February March April May June July August September October November December".split()


def syl(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_ON) + rng.choice(_NU) + rng.choice(_CO) for _ in range(n)).capitalize()


def person(rng):
    return f"{syl(rng, 2)} {syl(rng, rng.choice((2, 3)))}"


def date(rng):
    return f"{rng.randrange(1, 29)} {rng.choice(_MONTHS)} {rng.randrange(1701, 1950)}"


# Each family: fields(rng) -> dict; the entry's text; its questions as (question, lead, answer field).
# Words of these templates are checked against train_data's in tests/model/test_heldout_bench.py.
FAMILIES = {
    "town": (
        lambda r: {
            "name": syl(r, 3),
            "river": syl(r, 2),
            "province": syl(r, 2) + " " + r.choice(["March", "Reach", "Vale"]),
            "year": str(r.randrange(900, 1900)),
            "people": str(r.randrange(1200, 98000)),
        },
        "{name} is a market town on the {river} river in the province of {province}. The town was founded "
        "in {year} and counted {people} inhabitants at the last census.",
        [
            ("Which province is {name} in?", "{name} is in the province of", "province"),
            (
                "How many inhabitants did {name} count at the last census?",
                "At the last census {name} counted",
                "people",
            ),
            ("On which river is {name}?", "{name} is on the", "river"),
        ],
    ),
    "ship": (
        lambda r: {
            "name": syl(r, 2) + " " + syl(r, 2),
            "yard": syl(r, 2),
            "date": date(r),
            "isle": syl(r, 3),
        },
        "The {name} was a three-masted barque built at the {yard} yard. She was launched on {date} and ran "
        "aground near the isle of {isle}.",
        [
            ("On what date was the {name} launched?", "The {name} was launched on", "date"),
            ("Near which isle did the {name} run aground?", "The {name} ran aground near the isle of", "isle"),
            ("Which yard built the {name}?", "The {name} was built at the", "yard"),
        ],
    ),
    "mineral": (
        lambda r: {
            "name": syl(r, 3) + "ite",
            "by": person(r),
            "hardness": f"{r.randrange(2, 9)}.{r.randrange(1, 10)}",
            "mine": syl(r, 2),
        },
        "{name} is a pale green mineral, first described by {by}. It has a Mohs hardness of {hardness} and "
        "is quarried near {mine}.",
        [
            ("Who first described {name}?", "{name} was first described by", "by"),
            ("How hard is {name} on the Mohs scale?", "On the Mohs scale {name} has a hardness of", "hardness"),
            ("Near which place is {name} quarried?", "{name} is quarried near", "mine"),
        ],
    ),
    "festival": (
        lambda r: {
            "name": syl(r, 2),
            "day": f"{r.randrange(1, 29)} {r.choice(_MONTHS)}",
            "village": syl(r, 3),
            "dish": syl(r, 2).lower(),
        },
        "The {name} Festival is held each year on {day} in the hill village of {village}. Guests are served "
        "{dish}, a sweet bread baked in ash.",
        [
            ("On which day is the {name} Festival held?", "The {name} Festival is held on", "day"),
            (
                "In which village is the {name} Festival held?",
                "The {name} Festival is held in the village of",
                "village",
            ),
            ("What bread is served at the {name} Festival?", "At the {name} Festival guests are served", "dish"),
        ],
    ),
    "workshop": (
        lambda r: {
            "name": syl(r, 2),
            "city": syl(r, 2),
            "founder": person(r),
            "staff": str(r.randrange(40, 9000)),
        },
        "{name} Brothers is a workshop making weighing scales in the city of {city}. It was set up by "
        "{founder} and today has a staff of {staff}.",
        [
            ("Who set up {name} Brothers?", "{name} Brothers was set up by", "founder"),
            ("How large is the staff of {name} Brothers?", "The staff of {name} Brothers numbers", "staff"),
            ("In which city does {name} Brothers make scales?", "{name} Brothers makes scales in the city of", "city"),
        ],
    ),
    "mountain": (
        lambda r: {
            "name": syl(r, 2),
            "metres": str(r.randrange(1500, 8800)),
            "range": syl(r, 2),
            "climber": person(r),
            "year": str(r.randrange(1780, 1990)),
        },
        "Mount {name} is a summit of {metres} metres in the {range} range. The first climber to reach its "
        "top was {climber}, in {year}.",
        [
            ("How many metres high is Mount {name}?", "Mount {name} rises to", "metres"),
            ("Who first reached the top of Mount {name}?", "The first to reach the top of Mount {name} was", "climber"),
            ("In what year was Mount {name} first climbed?", "Mount {name} was first climbed in", "year"),
        ],
    ),
}


@dataclasses.dataclass(frozen=True)
class Question:
    family: str
    entry: str  # the reference text that answers it
    question: str
    lead: str
    answer: str  # the gold string (scored after the lead with a leading space)


def build(entities: int, per_entity: int, seed: int) -> tuple[list[str], list[Question]]:
    """Entries (the knowledge base) and questions: `entities` per family, `per_entity`
    questions each (of the family's three, seeded)."""
    rng = random.Random(seed)
    entries, questions, names = [], [], set()
    for fam, (fields, text, qs) in FAMILIES.items():
        made = 0
        while made < entities:
            f = fields(rng)
            if f["name"] in names:  # two entries with one name would make a question ambiguous
                continue
            names.add(f["name"])
            made += 1
            entry = text.format(**f)
            entries.append(entry)
            for q, lead, key in rng.sample(qs, per_entity):
                questions.append(Question(fam, entry, q.format(**f), lead.format(**f), f[key]))
    return entries, questions


# -- metrics ----------------------------------------------------------------------------------


def normalize(text: str) -> str:
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return " ".join(re.findall(r"\w+", text.casefold()))


def exact_match(reply: str, gold: str) -> bool:
    g = normalize(gold)
    return bool(g) and f" {g} " in f" {normalize(reply)} "


def bootstrap(values: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95% percentile interval over resampled questions (rows of `values`)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(BOOTSTRAP, len(values)))
    means = values[idx].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


# -- conditions --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Condition:
    name: str
    label: str
    mode: str  # none | rag | memory
    k: int = 5
    settings: str = "dense"  # a key of `settings_table`
    codec: str = "int4"
    adapter: str = ""  # "" base weights; "a" the sparse reader adapter (--adapter); "d" the dense one
    # (--dense-adapter); "m" --memory-adapter's
    base: str = "none"  # the condition its memory's own gain is measured against
    gate: str = ""  # a relevance gate (--gates) filtering the k=5 recall list; "" reads all k


def settings_table(n_layer: int) -> dict[str, MemorySettings]:
    return {
        "dense": MemorySettings(),
        "full": MemorySettings(tokens_per_head=128),
        "sparse": MemorySettings.sparse(n_layer),
        "sparse16": MemorySettings.sparse(n_layer).with_(tokens_per_head=16),
        "sparse32": MemorySettings.sparse(n_layer).with_(tokens_per_head=32),
        "dense16": MemorySettings(tokens_per_head=16),
        "dense64": MemorySettings(tokens_per_head=64),
    }


def parse_layers(text: str) -> tuple[int, ...]:
    """ "15-29" or "15,17,19-21" -> the layer numbers."""
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return tuple(sorted(set(out)))


def memory_conditions(specs: list[str], ks: list[int]) -> tuple[dict[str, MemorySettings], list[Condition]]:
    """--memory NAME=LAYERS:TOKENS:CODEC[:own]: settings and a condition per k (NAME_k+m), read
    through --memory-adapter and measured against none through the same adapter."""
    table, out = {}, []
    for spec in specs:
        name, _, rest = spec.partition("=")
        layers, tokens, codec, *flags = rest.split(":")
        if flags not in ([], ["own"]) or not (codec in ("int4", "int8") or re.fullmatch(r"pq\d+/\d+", codec)):
            raise SystemExit(f"--memory {spec!r}: expected NAME=LAYERS:TOKENS:int4|int8|pqK/V[:own]")
        table[name] = MemorySettings(memory_layers=parse_layers(layers), tokens_per_head=int(tokens))
        codec = ":".join([codec, *flags])
        for k in ks:
            label = f"L{layers} {tokens}/head {codec}"
            out.append(Condition(f"{name}_{k}+m", f"{label} + adapter, k={k}", "memory", k, name, codec, "m", "none+m"))
    return table, out


def curve_conditions() -> list[Condition]:
    """--curve: more points of quality against bytes per memory, through the adapters (the dense
    adapter was trained at 32 tokens per head, the sparse one at 8: these read other budgets)."""
    out = []
    for k in (5, 1):
        for settings, codec in (("dense16", "int4"), ("dense64", "int4"), ("full", "int4"), ("dense", "int8")):
            per_head = {"full": "every token"}.get(settings, f"{settings[5:] or 32}/head")
            out.append(
                Condition(
                    f"{settings}-{codec}_{k}+d",
                    f"dense {per_head}, all layers, {codec} + dense adapter, k={k}",
                    "memory",
                    k,
                    settings,
                    codec,
                    adapter="d",
                    base="none+d",
                )
            )
        out.append(
            Condition(
                f"sparse32_{k}+a",
                f"sparse at 32/head (L15-29, int4) + the 8/head adapter, k={k}",
                "memory",
                k,
                "sparse32",
                adapter="a",
                base="none+a",
            )
        )
    return out


def conditions(dense_adapter: bool = False) -> list[Condition]:
    out = [Condition("none", "none", "none")]
    for k in (5, 1):
        out += [
            Condition(f"rag{k}", f"text RAG, k={k}", "rag", k),
            Condition(f"dense{k}", f"dense default (32/head, all layers, int4), k={k}", "memory", k),
            Condition(
                f"full{k}", f"full K/V ceiling (every token, every layer, int8), k={k}", "memory", k, "full", "int8"
            ),
        ]
    out.append(Condition("none+a", "none + adapter", "none", adapter="a", base="none+a"))
    for k in (5, 1):
        out += [
            Condition(f"rag{k}+a", f"text RAG + adapter, k={k}", "rag", k, adapter="a", base="none+a"),
            Condition(
                f"sparse{k}+a",
                f"sparse (8/head, L15-29, int4) + adapter, k={k}",
                "memory",
                k,
                "sparse",
                adapter="a",
                base="none+a",
            ),
            Condition(
                f"sparse16_{k}+a",
                f"sparse at 16/head (L15-29, int4) + the 8/head adapter, k={k}",
                "memory",
                k,
                "sparse16",
                adapter="a",
                base="none+a",
            ),
        ]
    if dense_adapter:
        out.append(Condition("none+d", "none + dense adapter", "none", adapter="d", base="none+d"))
        for k in (5, 1):
            out += [
                Condition(f"rag{k}+d", f"text RAG + dense adapter, k={k}", "rag", k, adapter="d", base="none+d"),
                Condition(
                    f"dense{k}+d",
                    f"dense (32/head, all layers, int4) + dense adapter, k={k}",
                    "memory",
                    k,
                    adapter="d",
                    base="none+d",
                ),
                Condition(
                    f"full{k}+d",
                    f"full K/V (every token, every layer, int8) + dense adapter, k={k}",
                    "memory",
                    k,
                    "full",
                    "int8",
                    adapter="d",
                    base="none+d",
                ),
            ]
    return out


# -- reading ----------------------------------------------------------------------------------


class FixedRetriever:
    """Each question's fixed memories, handed to the generation loop for its prompt chunk.

    Prompts are at most one chunk (checked), so the loop asks once per row with the prompt's
    decoded text; any other query (a generated chunk) is an error, never a silent recall."""

    def __init__(self, tokenizer, chunk_length: int):
        self.tok, self.C, self.by_text = tokenizer, chunk_length, {}

    def bind(self, prompt_ids: list[list[int]], items: list[list]) -> None:
        self.by_text = {}
        for ids, its in zip(prompt_ids, items):
            if len(ids) > self.C:
                raise SystemExit(f"a prompt has {len(ids)} tokens, over one chunk ({self.C}): shorten the question")
            text = chunk_query(self.tok, ids)  # what the loop recalls with (the chat scaffolding left out)
            if text in self.by_text and [m.id for m in self.by_text[text]] != [m.id for m in its]:
                raise SystemExit(f"two questions share the prompt {text[-60:]!r}")
            self.by_text[text] = its

    def __call__(self, query: str, k: int):
        if query not in self.by_text:
            raise RuntimeError(f"unexpected retrieval query {query[-60:]!r}: only prompt chunks are expected")
        return self.by_text[query][:k]


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def evaluate(model, cond: Condition, questions, memories, batch_size: int, say) -> list[dict]:
    """Per question: the answer's log-prob (sum over its tokens), the greedy reply, EM."""
    tok = model.tokenizer
    retriever = FixedRetriever(tok, model.settings.chunk_length) if cond.mode != "none" else None
    out = []
    t0 = time.perf_counter()
    for s in range(0, len(questions), batch_size):
        qs = questions[s : s + batch_size]
        prompts = [chat(q.question) for q in qs]
        ids = [model.prompt_ids(p) for p in prompts]
        # the lead-in and the answer are fed as one reply; only the answer's tokens are summed
        # (the answer tokenized on its own, with its leading space, as score.py does)
        lead_ids = [tok.encode(q.lead) for q in qs]
        ans_ids = [tok.encode(" " + q.answer) for q in qs]
        if retriever is not None:
            retriever.bind(ids, [memories[q][: cond.k] for q in qs])
        lps = answer_logprobs(
            model, prompts, [a + b for a, b in zip(lead_ids, ans_ids)], retriever=retriever, mode=cond.mode
        )
        gens = model.generate_many(prompts, retriever=retriever, mode=cond.mode, max_tokens=GEN_TOKENS)
        for q, lp, a, g in zip(qs, lps, ans_ids, gens):
            out.append(
                {
                    "family": q.family,
                    "question": q.question,
                    "answer": q.answer,
                    "logprob": float(sum(lp[-len(a) :])),
                    "answer_tokens": len(a),
                    "reply": g.text,
                    "em": exact_match(g.text, q.answer),
                }
            )
    say(f"  {cond.name}: {len(questions)} questions in {time.perf_counter() - t0:.0f} s")
    return out


# -- the run ----------------------------------------------------------------------------------


class SharedEmbeddings:
    """The embedder, each text embedded once for all databases."""

    def __init__(self, embedder):
        self.embedder, self.dim, self.fingerprint, self.memo = embedder, embedder.dim, embedder.fingerprint, {}

    def embed(self, texts):
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if todo:
            self.memo.update(zip(todo, self.embedder.embed(todo)))
        return np.stack([self.memo[t] for t in texts])


def recall_lists(db, questions, k: int) -> tuple[dict, float, dict]:
    """Per question, the texts of its k memories: recall's top k, the relevant entry forced in
    last if recall missed it. Returns ({question: [text]}, hit rate of plain recall,
    {question: [score]}): each memory's recall score (cosine to the question); a relevant entry
    forced in gets the score recall gives it (recall restricted to it), so a gate sees it as
    recall would, never as a free pass."""
    out, hits, scores = {}, 0, {}
    known = {q.entry for q in questions}
    for q in questions:
        # a database may hold other texts too (a pq codebook's sample): only the bench's entries count
        found = [(m.text, m.score) for m in db.recall(q.question, k=k + 60) if m.text in known][:k]
        if q.entry in [t for t, _ in found]:
            hits += 1
        else:
            (own,) = db.recall(q.question, k=1, where="text = ?", params=[q.entry])
            found = found[: k - 1] + [(q.entry, own.score)]
        out[q], scores[q] = [t for t, _ in found], [s for _, s in found]
    return out, hits / len(questions), scores


def parse_gate(spec: str) -> tuple[float, float]:
    """A --gates spec: "marginM" (keep a memory scoring >= top score - M), "floorF" (>= F), or
    both joined by "_" ("margin0.1_floor0.3"). Returns (margin, floor); inf / -inf when absent."""
    margin, floor = float("inf"), float("-inf")
    for part in spec.split("_"):
        m = re.fullmatch(r"(margin|floor)(-?\d+(?:\.\d*)?|-?\.\d+)", part)
        if not m:
            raise SystemExit(f"--gates {spec!r}: expected marginM, floorF or marginM_floorF (M, F numbers)")
        if m[1] == "margin":
            margin = float(m[2])
        else:
            floor = float(m[2])
    return margin, floor


def gate(texts: list[str], scores: list[float], spec: str) -> list[str]:
    """The memories of a recall list that pass the gate, in recall order; the top one always
    stays (a gate never leaves a question with no memory)."""
    margin, floor = parse_gate(spec)
    top = scores[0]
    return [t for i, (t, s) in enumerate(zip(texts, scores)) if i == 0 or (s >= top - margin and s >= floor)]


def score_summary(questions, lists: dict, scores: dict) -> dict:
    """The recall scores of relevant entries against distractors (the other entries of the k=5
    lists), absolute and below the list's top score: what a gate's values are chosen from."""
    rel, dis, rel_gap, dis_gap, best_dis, top = [], [], [], [], [], []
    for q in questions:
        s = scores[q]
        top.append(s[0])
        d = [x for t, x in zip(lists[q], s) if t != q.entry]
        r = s[lists[q].index(q.entry)]
        rel.append(r)
        rel_gap.append(s[0] - r)
        dis += d
        dis_gap += [s[0] - x for x in d]
        best_dis.append(max(d) if d else float("nan"))
    pct = (0, 10, 25, 50, 75, 90, 100)

    def dist(x):
        x = np.asarray(x, dtype=float)
        x = x[np.isfinite(x)]
        return {f"p{p}": round(float(np.percentile(x, p)), 4) for p in pct} | {"n": len(x)}

    return {
        "relevant": dist(rel),
        "distractor": dist(dis),
        "best distractor": dist(best_dis),
        "top": dist(top),
        "relevant, top - score": dist(rel_gap),
        "distractor, top - score": dist(dis_gap),
        "relevant is top": float(np.mean([g == 0 for g in rel_gap])),
        # each margin M keeps the relevant entry where its gap <= M and drops distractors past M
        "margins": {
            f"{m:.2f}": {
                "relevant kept": float(np.mean(np.asarray(rel_gap) <= m)),
                "distractors kept": float(np.mean(np.asarray(dis_gap) <= m)),
            }
            for m in (0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3)
        },
    }


def score_lines(summary: dict) -> list[str]:
    keys = [k for k, v in summary.items() if isinstance(v, dict) and "p50" in v]
    pct = [k for k in summary[keys[0]] if k != "n"]
    lines = [
        "| recall score (cosine) | n | " + " | ".join(pct) + " |",
        "|---|---|" + "---|" * len(pct),
    ]
    for k in keys:
        v = summary[k]
        lines.append(f"| {k} | {v['n']} | " + " | ".join(f"{v[p]:.3f}" for p in pct) + " |")
    lines += [
        "",
        f"the relevant entry is recall's top for {100 * summary['relevant is top']:.1f}% of questions",
        "",
        "| margin | relevant kept % | distractors kept % |",
        "|---|---|---|",
    ]
    for m, v in summary["margins"].items():
        lines.append(f"| {m} | {100 * v['relevant kept']:.1f} | {100 * v['distractors kept']:.1f} |")
    return lines


def gate_stats(questions, gated: dict) -> dict:
    """Per gate: memories kept per question (mean and counts) and how often the relevant one stayed."""
    return {
        g: {
            "kept": float(np.mean([len(lst[q]) for q in questions])),
            "kept_counts": {str(n): sum(len(lst[q]) == n for q in questions) for n in range(1, 6)},
            "relevant_kept": float(np.mean([q.entry in lst[q] for q in questions])),
        }
        for g, lst in gated.items()
    }


def recall_only(args, say) -> dict:
    """--recall-only: the score distribution of recall's k=5 lists, no memory encoded (a cold
    database: text and embedding only) and nothing generated."""
    base = MemoryModel.load(adapter=None)
    entries, questions = build(args.entities, args.per_entity, args.seed)
    say(f"{len(entries)} entries, {len(questions)} questions ({len(FAMILIES)} families)")
    with tempfile.TemporaryDirectory(prefix="m3db-heldout-") as tmp:
        db = m3db.connect(os.path.join(tmp, "recall.m3db"), model=base, embedder=Embedder())
        db.add_documents(
            [{"text": e, "source": f"entry/{i}"} for i, e in enumerate(entries)], progress=False, cold=True
        )
        lists, hit, scores = recall_lists(db, questions, 5)
        db.close()
    say(f"recall: the relevant entry is in the top 5 for {hit:.1%} of questions")
    gated = {g: {q: gate(lists[q], scores[q], g) for q in questions} for g in args.gates}
    return {
        "questions": len(questions),
        "entries": len(entries),
        "recall_hit": hit,
        "scores": score_summary(questions, lists, scores),
        "gates": gate_stats(questions, gated),
        "args": vars(args),
    }


def run(args, say) -> dict:
    torch.manual_seed(args.seed)
    base = MemoryModel.load(adapter=None)
    n_layer = base.decoder.cfg.n_layer
    table = settings_table(n_layer)
    for sel in args.selection:
        for key in ("dense", "sparse"):
            table[f"{key}-{sel}"] = table[key].with_(token_selection=sel)
    conds = conditions(dense_adapter=bool(args.dense_adapter))
    if args.memory:
        extra, mem_conds = memory_conditions(args.memory, args.ks)
        table.update(extra)
        conds += [Condition("none+m", "none + memory adapter", "none", adapter="m", base="none+m")]
        for k in args.ks:
            conds.append(
                Condition(f"rag{k}+m", f"text RAG + memory adapter, k={k}", "rag", k, adapter="m", base="none+m")
            )
        conds += mem_conds
    if args.curve:
        if not args.dense_adapter:
            raise SystemExit("--curve reads through the dense adapter: give --dense-adapter FILE")
        conds += curve_conditions()
    for sel in args.selection:
        for k in (5, 1):
            conds.append(Condition(f"dense{k}-{sel}", f"dense, selection {sel}, k={k}", "memory", k, f"dense-{sel}"))
            conds.append(
                Condition(
                    f"sparse{k}-{sel}+a",
                    f"sparse, selection {sel}, + adapter, k={k}",
                    "memory",
                    k,
                    f"sparse-{sel}",
                    adapter="a",
                    base="none+a",
                )
            )
    for g in args.gates:
        parse_gate(g)  # an error before anything runs
    # --gates: each k=5 memory condition gets a gated twin NAME@GATE, right after it
    conds = [
        x
        for c in conds
        for x in [c]
        + [
            dataclasses.replace(c, name=f"{c.name}@{g}", label=f"{c.label}, gate {g}", gate=g)
            for g in (args.gates if c.mode == "memory" and c.k > 1 else [])
        ]
    ]
    if args.only:
        keep = set(args.only.split(","))
        # a gated twin runs when its condition is named (or it is named itself)
        run_ = {c.name for c in conds if c.name in keep or c.name.split("@")[0] in keep}
        bases = {c.base for c in conds if c.name in run_} | {"none"}
        conds = [c for c in conds if c.name in run_ or c.name in bases]
    adapters = {
        name: ReaderAdapter.load(path, base.decoder.cfg, base_fingerprint=base.fingerprint)
        for name, path in (
            ("a", args.adapter),
            ("d", args.dense_adapter),
            ("m", {"a": args.adapter, "d": args.dense_adapter}.get(args.memory_adapter, args.memory_adapter)),
        )
        if any(c.adapter == name for c in conds)
    }
    entries, questions = build(args.entities, args.per_entity, args.seed)
    say(f"{len(entries)} entries, {len(questions)} questions ({len(FAMILIES)} families)")
    embedder = SharedEmbeddings(Embedder())
    tmp = tempfile.TemporaryDirectory(prefix="m3db-heldout-")
    dbs = {}
    models = {}
    for c in conds:
        key = (c.settings, c.codec) if c.mode == "memory" else ("dense", "int4")
        if (c.settings if c.mode == "memory" else "text", c.adapter) not in models:
            s = table[c.settings] if c.mode == "memory" else table["dense"]
            models[c.settings if c.mode == "memory" else "text", c.adapter] = base.with_settings(
                s, adapter=adapters.get(c.adapter)
            )
        if key in dbs:
            continue
        t = time.perf_counter()
        codec, _, own = key[1].partition(":")
        pq = codec.startswith("pq")
        model_w = base.with_settings(table[key[0]], adapter=None)
        db = m3db.connect(
            os.path.join(tmp.name, f"{key[0]}-{key[1].replace('/', '-').replace(':', '-')}.m3db"),
            model=model_w,
            embedder=embedder,
            codec="f16" if pq else codec,  # pq: written in f16, then recompressed by a trained codebook
        )
        m = dict(zip(("keys", "values"), (int(x) for x in codec[2:].split("/")))) if pq else None
        if pq and not own:  # the codebook learns other memories first; the bench's are encoded with it
            sample = codec_sample(args.pq_sample, model_w.count_tokens)
            db.add_documents([{"text": x, "source": f"sample/{i}"} for i, x in enumerate(sample)], progress=False)
            rep = db.train_codec("pq", sample=10 * len(sample), m=m, seed=0)
            say(f"  pq {m} trained on {len(sample)} other texts: error {rep['error']}")
        rep = db.add_documents([{"text": e, "source": f"entry/{i}"} for i, e in enumerate(entries)], progress=False)
        if rep.memories_added != len(entries):
            raise SystemExit(f"{key}: {rep.memories_added} memories from {len(entries)} entries: an entry was chunked")
        if pq and own:  # `m3db recompress --codec pq` on this knowledge base: trained on its own memories
            rep = db.train_codec("pq", sample=len(entries), m=m, seed=0)
            say(f"  pq {m} trained on the bench's own {len(entries)} entries: error {rep['error']}")
        lengths = dict(db.sql("SELECT text, length FROM memories"))
        size = float(np.mean([lengths[e] for e in entries]))
        dbs[key] = (db, size)
        say(f"built {key[0]} {key[1]} in {time.perf_counter() - t:.0f} s: {size:,.0f} bytes per memory")
    first = dbs[("dense", "int4")][0] if ("dense", "int4") in dbs else next(iter(dbs.values()))[0]
    lists, hit, scores = recall_lists(first, questions, 5)
    say(f"recall: the relevant entry is in the top 5 for {hit:.1%} of questions")
    summary = score_summary(questions, lists, scores)
    gates = sorted({c.gate for c in conds if c.gate}, key=args.gates.index)
    gated = {g: {q: gate(lists[q], scores[q], g) for q in questions} for g in gates}
    stats = gate_stats(questions, gated)
    for g, v in stats.items():
        say(f"gate {g}: {v['kept']:.2f} memories kept per question, the relevant one in {v['relevant_kept']:.1%}")
    # per database: the decoded memories (codec applied) of every entry, read from its segments
    decoded = {}
    for key, (db, _) in dbs.items():
        ids = {t: i for i, t in db.sql("SELECT id, text FROM memories")}
        mems = db.get_many([ids[e] for e in entries])
        decoded[key] = {
            e: EncodedMemory(int(m.id), m.text, int(m.token_count), m.positions, m.keys, m.values)
            for e, m in zip(entries, mems)
        }
    results = {}
    for c in conds:
        key = (c.settings, c.codec) if c.mode == "memory" else ("dense", "int4")
        model = models[c.settings if c.mode == "memory" else "text", c.adapter]
        chosen = gated[c.gate] if c.gate else lists
        by_q = {q: [decoded[key][t] for t in (chosen[q] if c.k > 1 else [q.entry])] for q in questions}
        results[c.name] = {
            "condition": dataclasses.asdict(c),
            "rows": evaluate(model, c, questions, by_q, args.batch_size, say),
        }
        results[c.name]["bytes"] = dbs[key][1] if c.mode == "memory" else None
    return {
        "questions": len(questions),
        "entries": len(entries),
        "recall_hit": hit,
        "scores": summary,
        "gates": stats,
        "results": results,
        "args": vars(args),
    }


def _suffix(cond: dict) -> str:
    """The name suffix of a condition's adapter ("+a", "+d" or none; True in runs saved before "d")."""
    a = cond["adapter"]
    return "+a" if a is True else f"+{a}" if a else ""


def gate_lines(data: dict) -> list[str]:
    """--gates' cuts (memories kept, the relevant one kept) and recall's score distribution."""
    lines = []
    if data.get("gates"):
        lines += ["", "| gate | memories kept per question (mean) | questions keeping 1/2/3/4/5 | relevant kept % |"]
        lines.append("|---|---|---|---|")
        for g, v in data["gates"].items():
            counts = "/".join(str(v["kept_counts"][str(n)]) for n in range(1, 6))
            lines.append(f"| {g} | {v['kept']:.2f} | {counts} | {100 * v['relevant_kept']:.1f} |")
    if data.get("scores"):
        lines += ["", *score_lines(data["scores"])]
    return lines


def report(data: dict) -> str:
    """Markdown tables of a run: per condition, then the paired differences that matter."""
    res = data["results"]
    em = {n: np.array([r["em"] for r in v["rows"]], dtype=float) for n, v in res.items()}
    lp = {n: np.array([r["logprob"] for r in v["rows"]]) for n, v in res.items()}

    def ci(x, pct=False):
        m, lo, hi = bootstrap(x)
        f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:+.2f}")
        return f"{f(m)} [{f(lo)}, {f(hi)}]"

    lines = [
        f"{data['questions']} questions about {data['entries']} invented entries; "
        f"recall put the relevant entry in the top 5 for {100 * data['recall_hit']:.1f}% "
        "(95% bootstrap intervals over questions; gains paired on the same questions)",
        "",
        "| condition | bytes/memory | EM % | answer logprob | memory's own gain, logprob | own gain, EM points |",
        "|---|---|---|---|---|---|",
    ]
    for n, v in res.items():
        c = v["condition"]
        b = c["base"]
        own = "-" if n == b or b not in res else ci(lp[n] - lp[b])
        own_em = "-" if n == b or b not in res else ci(em[n] - em[b], pct=True)
        size = f"{v['bytes']:,.0f}" if v.get("bytes") else "-"
        lines.append(f"| {c['label']} | {size} | {ci(em[n], pct=True)} | {ci(lp[n])} | {own} | {own_em} |")
    pairs = []
    for n, v in res.items():
        c = v["condition"]
        if c["mode"] != "memory":
            continue
        if c.get("gate"):  # against all k memories, and against the relevant one alone
            parent = n.split("@")[0]
            alone = [
                m
                for m, w in res.items()
                if w["condition"] | {"name": "", "label": "", "k": 0}
                == c | {"name": "", "label": "", "k": 0, "gate": ""}
                and w["condition"]["k"] == 1
            ]
            pairs += [(f"{n} - {b}", n, b) for b in [parent] + alone if b in res]
            continue
        rag = f"rag{c['k']}" + _suffix(c)
        if rag in res:
            pairs.append((f"{n} - {rag}", n, rag))
        if "-" in c["settings"]:  # a selection variant against today's selection
            ref = n.split("-")[0] + _suffix(c)
            if ref in res:
                pairs.append((f"{n} - {ref}", n, ref))
        if n.startswith("sparse16_"):  # twice the bytes, the same adapter
            ref = f"sparse{c['k']}+a"
            if ref in res:
                pairs.append((f"{n} - {ref}", n, ref))
        if n.startswith("dense"):
            for full in (f"full{c['k']}", f"full{c['k']}" + _suffix(c)):
                if full in res and (n, full) not in [p[1:] for p in pairs]:
                    pairs.append((f"{n} - {full}", n, full))
            plain = f"dense{c['k']}"
            if n != plain and plain in res:  # what the adapter adds to the same memories
                pairs.append((f"{n} - {plain}", n, plain))
    if pairs:
        lines += [
            "",
            "| paired difference | EM points | logprob | questions better / worse (logprob) |",
            "|---|---|---|---|",
        ]
        for label, a, b in pairs:
            d = lp[a] - lp[b]
            lines.append(
                f"| {label} | {ci(em[a] - em[b], pct=True)} | {ci(d)} | {int((d > 0).sum())} / {int((d < 0).sum())} |"
            )
    lines += gate_lines(data)
    fams = sorted({r["family"] for v in res.values() for r in v["rows"]})
    lines += ["", "| condition (EM %) | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
    for n, v in res.items():
        cells = []
        for f in fams:
            x = [r["em"] for r in v["rows"] if r["family"] == f]
            cells.append(f"{100 * sum(x) / len(x):.0f}")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entities", type=int, default=7, help="entries per family with questions")
    ap.add_argument("--per-entity", type=int, default=2, help="questions per entry (of 3)")
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--selection", default="", help="token-selection variants to add, comma-separated")
    ap.add_argument("--only", default="", help="condition names to run (comma-separated); their baselines are kept")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--adapter", default=BUNDLED_FILE, help="the sparse reader adapter (default: the bundled one)")
    ap.add_argument(
        "--dense-adapter", default=None, help="a reader adapter for the dense default: adds its conditions (+d)"
    )
    ap.add_argument("--curve", action="store_true", help="add bytes/quality points through the adapters")
    ap.add_argument(
        "--memory",
        action="append",
        default=[],
        help="a configuration to measure, NAME=LAYERS:TOKENS:CODEC[:own] (conditions NAME_K+m); repeatable",
    )
    ap.add_argument("--memory-adapter", default="a", help="what --memory reads through: a, d or an adapter file")
    ap.add_argument("--ks", default="5,1", help="--memory's k values")
    ap.add_argument("--pq-sample", type=int, default=300, help="texts a pq codebook trains on (bench/codec_sample.py)")
    ap.add_argument(
        "--gates",
        default="",
        help="relevance gates, comma-separated (marginM, floorF, marginM_floorF): each adds NAME@GATE to every "
        "k=5 memory condition that runs, its recall list cut to the memories scoring >= top - M and >= F",
    )
    ap.add_argument(
        "--recall-only", action="store_true", help="print recall's score distribution (and --gates' cuts), no model run"
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "heldout.json"))
    ap.add_argument("--from-json", default=None)
    args = ap.parse_args()
    args.selection = [s for s in args.selection.split(",") if s]
    args.ks = [int(k) for k in args.ks.split(",") if k]
    args.gates = list(dict.fromkeys(g for g in args.gates.split(",") if g))
    for g in args.gates:
        parse_gate(g)
    t0 = time.perf_counter()

    def say(msg):
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)

    if args.recall_only:
        if args.quick:
            args.entities, args.per_entity = 2, 1
        torch.set_num_threads(args.threads)
        data = recall_only(args, say)
        print(
            f"{data['questions']} questions about {data['entries']} entries (seed {args.seed}); "
            f"recall put the relevant entry in the top 5 for {100 * data['recall_hit']:.1f}%\n"
        )
        print("\n".join(gate_lines(data)))
        return
    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
    else:
        if args.quick:
            args.entities, args.per_entity = 2, 1
            args.only = args.only or "none,rag5,dense5,dense1"
        # one thread: on this shared 2-core machine two OpenMP threads spin against other
        # engineers' jobs and ran a decode step 5x slower than one (measured)
        torch.set_num_threads(args.threads)
        data = run(args, say)
        data["seconds"] = round(time.perf_counter() - t0)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)
        say(f"wrote {args.out}")
    print(report(data))


if __name__ == "__main__":
    main()
