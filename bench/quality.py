"""Answer quality with explicit memory against no memory and text RAG, on the same weights.

Questions are built at run time from packaged data (sorted, then a seeded sample):
  capital  "What is the capital of X?" for the countries of the countryinfo package whose
           capital appears in X's Wikipedia summary; scored answer after the lead-in
           "The capital of X is": " <capital>".
  whatis   "What is X?" (or "Who is X?" for people) answered by the summary's short
           description, for descriptions of 2+ words that appear in the summary's text;
           lead-in "X is", scored answer: " [a|an|the] <description as the text spells it>".
  blank    a sentence of a summary with one word blanked (a name, a number or a long word not
           in the title); lead-in "The missing word is", scored answer " <word>". A question
           whose own source reference would be dropped by the leakage filter is not asked.
Questions are asked only about articles and countries in m3db-train's held-out set
(`m3db.model.train_data.held_out`), so a reader trained with memory is measured on the same
questions without having seen them. The knowledge base holds the questions' summaries plus
distractor summaries (any article), chunked to <= 128 tokens by the engine
(`db.add_documents`), one database per (memory settings, codec) in a temporary directory, all
reading the same decoder weights (loaded once): the base model, and the same weights read
through the reader adapter (`--adapter`, default the bundled one; docs/adapter.md) in the
conditions marked "+ adapter".

Conditions, one run: none (no memory); rag (the 5 references' text prepended); both again
through the adapter; memory with the paper's settings (layers 0-14, 8 tokens per head) and
m3db's sparse mode (layers 15-29, 8 tokens per head), each read by the base weights and
through the adapter; the sparse mode through the adapter at int8 and int4, at 16 and 32 tokens
per head, and on all 30 layers; and the dense default (all layers, 32 tokens per head, int4).
Plus perplexity without memory, base against adapter, on held-out Wikipedia summaries (the
training domain) and on Python's own documentation (`pydoc_data.topics`: another domain).
Retrieval is the engine's (`db.recall`: all-MiniLM-L6-v2 + USearch), then the paper's leakage
filter (m3db.knowledge.leakage: a reference whose LCS with the question covers > 2/3 of its words is
dropped; recall fetches extra candidates so every chunk still reads 5), then the kept
memories are read from the database's segments (`db.get_many`; the RAM cache of decoded
memories is off, so every read decodes a record from disk or the page cache).

Metrics per condition:
  logprob   log p(gold answer | chat prompt + lead-in, memories), natural log, teacher-forced
            through the generation loop (`m3db.model.score`); mean per question and per token;
  vs none, vs RAG   logprob minus that of no memory, of text RAG: mean ± standard error of
            the per-question difference (nats per question);
  EM        greedy reply to the chat prompt (`m3db ask`'s phrasing, 20 tokens at most)
            contains the gold answer, both normalized (NFKD, accents and case folded, \\w+
            words, articles a/an/the dropped, compared as whole words);
  hit       the gold article is among the references the last prompt chunk read;
  bytes     stored record bytes per memory (catalog `length`: framed record with its text),
            and the ratio of all records to the full fp16 K/V of the same references
            (30 layers x K,V x 3 heads x 64 dims x 2 bytes per token);
  tok/s     decoding throughput at batch 1: 64 new tokens (no stop token) after
            a question, memories read from disk, all conditions in lockstep (one step of each
            in turn) so the shared CPU's drift hits all alike; prefill and retrievals included.

    python bench/quality.py              # the full run (about 20 min on this 2-core machine)
    python bench/quality.py --quick      # smoke test: 4 questions per task, small KB
    python bench/quality.py --from-json bench/out/quality.json   # tables + plot of a saved run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
import unicodedata

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import m3db  # noqa: E402
from m3db.knowledge.answer import Retrieved  # noqa: E402
from m3db.knowledge.chunk import chunk_text  # noqa: E402
from m3db.knowledge.leakage import leaks  # noqa: E402
from m3db.knowledge.sources import wikipedia  # noqa: E402
from m3db.model.adapter import BUNDLED_FILE, ReaderAdapter  # noqa: E402
from m3db.model.embedder import Embedder  # noqa: E402
from m3db.model.generate import Sampling, chunk_query, content_mask, run  # noqa: E402
from m3db.model.memory_model import MemoryModel  # noqa: E402
from m3db.model.score import answer_logprobs  # noqa: E402
from m3db.model.settings import MemorySettings  # noqa: E402
from m3db.model.train_data import capitals, held_out  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TASKS = ("capital", "whatis", "blank")
GEN_TOKENS = 20  # greedy reply cap: room for "The capital of X is Y." or "X is a <description>"; < one chunk
EXTRA = 5  # candidates recalled beyond k, so that the leakage filter can drop some and keep k
ARTICLES = {"a", "an", "the"}
STOPWORDS = set(
    """about after also among and been before being between both called during each from
have into itself known many more most other over since such than that their them then there these
they this those through under until used very were what when where which while with within would""".split()
)


# -- questions -------------------------------------------------------------------------------


@dataclasses.dataclass
class Question:
    task: str
    title: str  # the Wikipedia article that holds the answer
    question: str  # what the user asks (the leakage filter compares references with this)
    lead: str  # the start of the assistant's reply before the scored answer
    answer: str  # scored after the lead, with its leading space
    gold: str  # what exact match looks for in the greedy reply


def normalize(text):
    """Exact-match normal form: NFKD without accents, casefolded \\w+ words, no articles."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    return " ".join(w for w in re.findall(r"\w+", text.casefold()) if w not in ARTICLES)


def exact_match(reply, gold):
    g = normalize(gold)
    return bool(g) and f" {g} " in f" {normalize(reply)} "


def countries():
    """(name, capital) from the countryinfo package's data files (read, never imported)."""
    out = capitals()
    if not out:
        raise SystemExit("countryinfo is not installed: pip install --no-deps countryinfo")
    return out


def capital_questions(wiki):
    qs = []
    for name, capital in countries():
        doc = wiki.get(name)
        if doc is None or capital not in doc["text"]:
            continue
        qs.append(
            Question(
                "capital", name, f"What is the capital of {name}?", f"The capital of {name} is", f" {capital}", capital
            )
        )
    return qs


def whatis_questions(wiki, exclude):
    qs = []
    for title, doc in wiki.items():
        desc = (doc["metadata"].get("description") or "").strip()
        if title in exclude or len(desc.split()) < 2:
            continue
        at = doc["text"].lower().find(desc.lower())
        if at < 0:
            continue
        span = doc["text"][at : at + len(desc)]  # the summary's own spelling and case
        before = doc["text"][:at].split()[-1:]
        article = before[0] if before and before[0].lower() in ARTICLES else None
        who = "Who" if doc["metadata"].get("topic") == "People" else "What"
        qs.append(
            Question(
                "whatis",
                title,
                f"{who} is {title}?",
                f"{title} is",
                f" {article} {span}" if article else f" {span}",
                span,
            )
        )
    return qs


def blank_questions(wiki, exclude, count_tokens, rng, limit):
    """Fill-in-the-blank questions; at most one per article, tried in a seeded order."""
    titles = [t for t in sorted(wiki) if t not in exclude]
    rng.shuffle(titles)
    qs, skipped = [], 0
    for title in titles:
        if len(qs) >= limit:
            break
        text = wiki[title]["text"]
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if 8 <= len(s.split()) <= 30]
        if not sentences:
            continue
        sentence = rng.choice(sentences)
        title_words = {w.casefold() for w in re.findall(r"\w+", title)}
        cands = [
            m
            for m in re.finditer(r"\w+", sentence)
            if m.group().casefold() not in title_words
            and m.group().casefold() not in STOPWORDS
            and (m.group()[0].isupper() and m.start() > 0 or m.group().isdigit() or len(m.group()) >= 7)
            and len(m.group()) >= 3
        ]
        if not cands:
            continue
        m = rng.choice(cands)
        masked = sentence[: m.start()] + "____" + sentence[m.end() :]
        question = (
            f'Fill in the blank in this sentence from the Wikipedia article "{title}": "{masked}" '
            "What is the missing word?"
        )
        # the question quotes its source: when the reference holding that sentence is little
        # more than the sentence, the leakage filter would drop it, and the question could not
        # be answered from memory by construction; such questions are not asked
        chunks = chunk_text(text, count_tokens, 128)
        source = next((c.text for c in chunks if sentence in c.text), None)
        if source is None or leaks(question, source):
            skipped += 1
            continue
        qs.append(Question("blank", title, question, "The missing word is", f" {m.group()}", m.group()))
    return qs, skipped


def build_questions(n, distractors, count_tokens, seed):
    wiki = {d["title"]: d for d in wikipedia()}
    rng = random.Random(seed)
    # questions only about the articles and countries that training with memory never sees
    # (m3db-train's held-out set), so a trained reader is measured on the same questions
    trained = {t for t in wiki if not held_out(t)}
    cap = [q for q in capital_questions(wiki) if held_out(q.title)]
    cap = sorted(rng.sample(cap, min(n, len(cap))), key=lambda q: q.title)
    used = {q.title for q in cap}
    what = whatis_questions(wiki, used | trained)
    what = sorted(rng.sample(what, min(n, len(what))), key=lambda q: q.title)
    used |= {q.title for q in what}
    blank, skipped = blank_questions(wiki, used | trained, count_tokens, rng, n)
    blank = sorted(blank, key=lambda q: q.title)
    used |= {q.title for q in blank}
    rest = sorted(set(wiki) - used)
    extra = sorted(rng.sample(rest, min(distractors, len(rest))))
    docs = [wiki[t] for t in sorted(used | set(extra))]
    return cap + what + blank, docs, skipped


# -- databases: one per (settings, codec), sharing the decoder and the encoding work -----------


class SharedEncoding:
    """What `connect(model=...)` needs of a MemoryModel, with `encode` answered from arrays
    computed once per settings and shared by every codec's database (the codec is applied by
    the database). `layers` takes a subset of a source that encoded more layers: a layer's
    kept tokens depend only on that layer's scores, so the subset equals encoding those
    layers alone (checked by `verify_subset`)."""

    def __init__(self, variant, source, store, layers=None):
        self.variant, self.source, self.store, self.layers = variant, source, store, layers

    def memory_spec_fields(self):
        return self.variant.memory_spec_fields()

    def count_tokens(self, text):
        return self.variant.count_tokens(text)

    def encode(self, texts):
        todo = [t for t in dict.fromkeys(texts) if t not in self.store]
        if todo:
            self.store.update(zip(todo, self.source.encode(todo)))
        return [self._cut(self.store[t]) for t in texts]

    def _cut(self, e):
        if self.layers is None:
            return e
        rows = [list(self.source.settings.memory_layers).index(i) for i in self.layers]
        return dict(e, positions=e["positions"][rows], keys=e["keys"][rows], values=e["values"][rows])

    def generate(self, prompt, **kwargs):
        return self.variant.generate(prompt, **kwargs)


class SharedEmbeddings:
    """The embedder, with each text embedded once for all the databases."""

    def __init__(self, embedder):
        self.embedder, self.dim, self.fingerprint, self.memo = embedder, embedder.dim, embedder.fingerprint, {}

    def embed(self, texts):
        todo = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if todo:
            self.memo.update(zip(todo, self.embedder.embed(todo)))
        return np.stack([self.memo[t] for t in texts])


def verify_subset(wrapper, texts):
    """The layer subset of a shared encoding equals the variant's own encoding."""
    own = wrapper.variant.encode(texts)
    for t, a in zip(texts, own):
        b = wrapper.encode([t])[0]
        if not (
            np.array_equal(a["positions"], b["positions"])
            and np.allclose(a["keys"], b["keys"], atol=1e-4)
            and np.allclose(a["values"], b["values"], atol=1e-4)
        ):
            raise SystemExit(f"layer subset of the shared encoding differs from encoding layers {wrapper.layers} alone")


@dataclasses.dataclass
class Condition:
    name: str
    mode: str
    settings: str | None = None  # a key of SETTINGS
    codec: str | None = None
    adapter: bool = False  # read through the reader adapter
    throughput: bool = False  # among the conditions whose decoding speed is measured


def settings_table(n_layer):
    half = n_layer // 2
    upper = tuple(range(n_layer - half, n_layer))
    return {
        "paper": MemorySettings.paper(n_layer),
        "sparse": MemorySettings.sparse(n_layer),
        "upper16": MemorySettings(memory_layers=upper, tokens_per_head=16),
        "upper32": MemorySettings(memory_layers=upper, tokens_per_head=32),
        "all8": MemorySettings(tokens_per_head=8),
        "all16": MemorySettings(tokens_per_head=16),
        "all32": MemorySettings(tokens_per_head=32),
        "all64": MemorySettings(tokens_per_head=64),
        "all128": MemorySettings(tokens_per_head=128),
    }


A = " + adapter"
CONDITIONS = [
    Condition("none", "none", throughput=True),
    Condition("rag", "rag", throughput=True),
    Condition("none" + A, "none", adapter=True),
    Condition("rag" + A, "rag", adapter=True),
    Condition("paper L0-14 8/head int8", "memory", "paper", "int8"),
    Condition("paper L0-14 8/head int8" + A, "memory", "paper", "int8", adapter=True),
    Condition("sparse L15-29 8/head int8", "memory", "sparse", "int8"),
    Condition("sparse L15-29 8/head int8" + A, "memory", "sparse", "int8", adapter=True),
    Condition("sparse L15-29 8/head int4" + A, "memory", "sparse", "int4", adapter=True, throughput=True),
    Condition("L15-29 16/head int8" + A, "memory", "upper16", "int8", adapter=True),
    Condition("L15-29 32/head int8" + A, "memory", "upper32", "int8", adapter=True),
    Condition("L0-29 8/head int8" + A, "memory", "all8", "int8", adapter=True),
    Condition("L0-29 32/head int4 (dense default)", "memory", "all32", "int4", throughput=True),
]
# --all-layers: every layer through the adapter at three budgets, for a dense-mode adapter
# (`--adapter model/adapters/reader-smollm2-135m-dense.safetensors`): how reading 128-token
# references grows with the tokens kept
ALL_LAYERS = [
    Condition("L0-29 32/head int4" + A, "memory", "all32", "int4", adapter=True),
    Condition("L0-29 64/head int4" + A, "memory", "all64", "int4", adapter=True),
    Condition("L0-29 every token int4" + A, "memory", "all128", "int4", adapter=True),
]
DEFAULT = "L0-29 32/head int4 (dense default)"  # connect()'s default: MemorySettings(), int4
# which settings' arrays each settings is cut from (None: encoded itself): a layer's kept
# tokens depend only on that layer's scores
SOURCE = {
    "all8": None,
    "all16": None,
    "all32": None,
    "all64": None,
    "all128": None,
    "paper": "all8",
    "sparse": "all8",
    "upper16": "all16",
    "upper32": "all32",
}


# -- retrieval with the leakage filter ----------------------------------------------------------


class FilteredRetriever:
    """The engine's recall, minus leaking references, as the decoder's Retriever.

    The generation loop asks with a chunk's text only; `bind` says which questions a batch
    holds, and maps every query text the loop will send (each prompt chunk's decoded text, as
    the loop decodes it) to the questions whose prompts produce it. A chunk shared by several
    rows (the chat template's system prompt) is filtered against all of their questions. A
    query the loop was not expected to send is an error, never an unfiltered recall.
    """

    def __init__(self, db, model, *, decode):
        self.db, self.model, self.decode = db, model, decode
        self.by_text, self.only, self.log = {}, None, {}
        self.recalls = self.dropped = 0
        self.documents = {i: s.removeprefix("wikipedia/") for i, s in db.sql("SELECT id, source FROM documents")}

    def chunk_texts(self, ids, mode):
        C = self.model.settings.chunk_length
        if mode == "rag":  # the loop retrieves once, with the last prompt chunk
            spans = [(max(0, len(ids) - C), len(ids))]
        else:  # chunks aligned on the prompt's end, as `GenerationLoop._prefill_memory` cuts them
            spans = [(max(0, e - C), e) for e in range(len(ids), 0, -C)][::-1]
        # what the loop recalls with: each chunk's messages, the chat scaffolding left out
        kept = content_mask(self.model.tokenizer, ids)
        return [chunk_query(self.model.tokenizer, ids[a:b], kept[a:b]) for a, b in spans]

    def bind(self, questions, prompt_ids, mode):
        """A batch: each query text belongs to the questions whose prompt chunks produce it."""
        self.by_text, self.only, self.log = {}, None, {}
        for q, ids in zip(questions, prompt_ids):
            for text in self.chunk_texts(ids, mode):
                self.by_text.setdefault(text, set()).add(q)

    def bind_one(self, question):
        """One row: every query (prompt chunks, and generated chunks after 64 new tokens) is
        this question's."""
        self.by_text, self.only, self.log = {}, question, {}

    def __call__(self, query, k):
        if self.only is None and query not in self.by_text:
            raise RuntimeError(f"unexpected retrieval query {query[:60]!r}: the bench only expects prompt chunks")
        if query in self.log:  # the same chunk text in the same batch: the same references
            kept = self.log[query]
        else:
            questions = {self.only} if self.only is not None else self.by_text[query]
            matches = self.db.recall(query, k=k + EXTRA)
            kept, dropped = [], 0
            for m in matches:
                if len(kept) == k:
                    break
                if any(leaks(q, m.text) for q in questions):
                    dropped += 1
                else:
                    kept.append(m)
            self.recalls += 1
            self.dropped += dropped
            self.log[query] = kept
        if self.decode:
            # read the kept memories' arrays from the segments (decoded, checksummed)
            memories = self.db.get_many([m.id for m in kept])
            return [Retrieved(dataclasses.replace(m, memory=mem)) for m, mem in zip(kept, memories)]
        return [Retrieved(m) for m in kept]


# -- evaluation ---------------------------------------------------------------------------------


def chat(question):
    return [{"role": "user", "content": question}]


def evaluate(cond, model, retriever, questions, batch_size, say):
    """Per question: answer log-probs (per token), greedy reply, exact match, retrieval hit."""
    tok = model.tokenizer
    # batches of one task and similar prompt lengths: little padding, and a batch of short
    # answers stops early instead of waiting for a long one
    order = sorted(range(len(questions)), key=lambda i: (questions[i].task, len(tok.encode(questions[i].question)), i))
    out = [None] * len(questions)
    t0, t_score, t_gen = time.perf_counter(), 0.0, 0.0
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        qs = [questions[i] for i in idx]
        gen_ids = [model.prompt_ids(chat(q.question)) for q in qs]
        score_prompts = [tok.apply_chat_template(chat(q.question), add_generation_prompt=True) + q.lead for q in qs]
        r = None
        if retriever is not None:
            r = retriever
            retriever.bind(
                [q.question for q in qs] * 2, gen_ids + [model.prompt_ids(p) for p in score_prompts], cond.mode
            )
        t = time.perf_counter()
        lps = answer_logprobs(model, score_prompts, [q.answer for q in qs], retriever=r, mode=cond.mode)
        t_score += time.perf_counter() - t
        t = time.perf_counter()
        gens = model.generate_many([chat(q.question) for q in qs], retriever=r, mode=cond.mode, max_tokens=GEN_TOKENS)
        t_gen += time.perf_counter() - t
        for i, q, ids, lp, g in zip(idx, qs, gen_ids, lps, gens):
            hit = None
            if retriever is not None:
                last = retriever.chunk_texts(ids, cond.mode)[-1]
                hit = any(retriever.documents.get(m.document_id) == q.title for m in retriever.log[last])
            out[i] = {
                "task": q.task,
                "title": q.title,
                "logprob": sum(lp),
                "tokens": len(lp),
                "reply": g.text,
                "em": exact_match(g.text, q.gold),
                "hit": hit,
            }
        say(
            f"  {cond.name}: {min(s + batch_size, len(order))}/{len(order)} questions, "
            f"{time.perf_counter() - t0:.0f} s "
            f"(scoring {t_score:.0f} s, generating {t_gen:.0f} s)"
        )
    return out


def throughput(conds, models, retrievers, questions, new_tokens, say):
    """Tokens/s per condition at batch 1, all conditions stepped in lockstep per question."""
    spent = {c.name: 0.0 for c in conds}
    made = {c.name: 0 for c in conds}
    for qi, q in enumerate([questions[0]] + list(questions)):  # the first round warms up, uncounted
        warm = qi == 0
        steps = {}
        for c in conds:
            m, r = models[c.name], retrievers.get(c.name)
            if r is not None:
                r.bind_one(q.question)
            steps[c.name] = run(
                m,
                [m.prompt_ids(chat(q.question))],
                mode=c.mode,
                retriever=r,
                sampling=Sampling(max_tokens=4 if warm else new_tokens, stop_tokens=()),
            )[1]
        live, turn = [c.name for c in conds], qi
        while live:
            order = live[turn % len(live) :] + live[: turn % len(live)]  # who goes first rotates
            for name in order:
                t = time.perf_counter()
                try:
                    out = next(steps[name])
                    made[name] += 0 if warm else sum(x is not None for x in out)
                except StopIteration:
                    live.remove(name)
                spent[name] += 0.0 if warm else time.perf_counter() - t
            turn += 1
        if not warm:
            say(f"  throughput: question {qi}/{len(questions)} done")
    return {n: made[n] / spent[n] for n in spent}


def general_texts(n):
    """Python's documentation topics (`pydoc_data.topics`, shipped with Python): English prose
    of another domain than the Wikipedia summaries training reads. Sorted by name, every
    len/n-th one."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    return [topics[k] for k in names[:: max(1, len(names) // n)][:n]]


@torch.no_grad()
def perplexities(base, adapter, n):
    """Perplexity without memory on the first 128 tokens of each text, base against adapter:
    held-out Wikipedia summaries (training's domain, articles it never saw) and `general_texts`."""
    wiki = {d["title"]: d for d in wikipedia()}
    domains = {
        "held-out Wikipedia summaries": [wiki[t]["text"] for t in sorted(wiki) if held_out(t)][-n:],
        "Python documentation (pydoc_data.topics)": general_texts(n),
    }
    out = {}
    for name, texts in domains.items():
        ids = [torch.tensor([base.tokenizer.encode(t)[:128]]) for t in texts]
        row = {"texts": len(texts), "tokens": sum(x.shape[1] - 1 for x in ids)}
        for key, a in (("base", None), ("adapter", adapter)):
            nll = sum(
                float(torch.nn.functional.cross_entropy(base.decoder(x, adapter=a)[0, :-1], x[0, 1:], reduction="sum"))
                for x in ids
            )
            row[key] = float(np.exp(nll / row["tokens"]))
        out[name] = row
    return out


# -- report ---------------------------------------------------------------------------------------


def summarize(rows, by_task=True):
    lp = [r["logprob"] for r in rows]
    out = {
        "n": len(rows),
        "logprob": statistics.mean(lp),
        "logprob_per_token": sum(lp) / sum(r["tokens"] for r in rows),
        "em": statistics.mean(r["em"] for r in rows),
    }
    hits = [r["hit"] for r in rows if r["hit"] is not None]
    out["hit"] = statistics.mean(hits) if hits else None
    if by_task:
        out["tasks"] = {
            t: summarize([r for r in rows if r["task"] == t], False) for t in TASKS if any(r["task"] == t for r in rows)
        }
    return out


def paired(results, name, base, task=None):
    """Mean and standard error of the per-question log-likelihood difference name - base
    (every condition answers the same questions in the same order)."""
    if name == base:
        return "-"
    d = [
        a["logprob"] - b["logprob"]
        for a, b in zip(results[name]["rows"], results[base]["rows"])
        if task is None or a["task"] == task
    ]
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return f"{statistics.mean(d):+.2f} ± {se:.2f}"


def table(results):
    cols = [
        "condition",
        "bytes/memory",
        "vs fp16 KV",
        "logprob/q",
        "vs none",
        "vs RAG",
        "logprob/tok",
        "EM all",
        *(f"EM {t}" for t in TASKS),
        "hit",
        "tok/s",
        "x none",
        "x RAG",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, r in results.items():
        s, b, tps = r["summary"], r.get("bytes"), r.get("tok_s")
        cells = [name]
        cells += [f"{b['per_memory']:,.0f}", f"{b['vs_fp16_kv']:.4f}"] if b else [r.get("bytes_note", "-"), "-"]
        cells += [
            f"{s['logprob']:.2f}",
            paired(results, name, "none"),
            paired(results, name, "rag"),
            f"{s['logprob_per_token']:.3f}",
            f"{s['em']:.3f}",
        ]
        cells += [f"{s['tasks'][t]['em']:.3f}" if t in s["tasks"] else "-" for t in TASKS]
        cells += [f"{s['hit']:.2f}" if s["hit"] is not None else "-"]
        cells += (
            [f"{tps:.1f}", f"{tps / results['none']['tok_s']:.2f}", f"{tps / results['rag']['tok_s']:.2f}"]
            if tps
            else ["-", "-", "-"]
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table_tasks(results):
    """Mean answer log-likelihood per task (nats per question), and its distance to RAG's
    (mean ± standard error of the paired per-question difference)."""
    cols = ["condition", *(f"logprob {t}" for t in TASKS), *(f"vs RAG {t}" for t in TASKS)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lp = {n: r["summary"]["tasks"] for n, r in results.items()}
    for name in results:
        cells = [name] + [f"{lp[name][t]['logprob']:.2f}" for t in TASKS]
        cells += [paired(results, name, "rag", t) for t in TASKS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab10").colors
    markers = {"f32": "s", "f16": "D", "int8": "o", "int4": "v"}
    for ax, key, label in (
        (axes[0], "logprob", "mean answer log-likelihood (nats per question)"),
        (axes[1], "em", "exact match (share of questions)"),
    ):
        for base, style in (("none", ":"), ("rag", "--")):
            y = results[base]["summary"][key]
            ax.axhline(
                y,
                linestyle=style,
                color="gray",
                label=f"{base} (no stored memory)" if base == "none" else "text RAG, 5 references",
            )
        for i, (name, r) in enumerate(n for n in results.items() if "bytes" in n[1]):
            codec = next((c for c in markers if f" {c}" in name), "int8")
            ax.plot(
                r["bytes"]["per_memory"],
                r["summary"][key],
                markers[codec],
                color=colors[i % 10],
                markersize=8,
                fillstyle="full" if A in name else "none",
                label=name,
            )
        ax.set_xscale("log")
        ax.set_xlabel("stored bytes per memory (log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(
        "SmolLM2-135M-Instruct: answer quality vs bytes per memory (hollow: base weights; filled: + reader adapter)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(results, header, args, say, ppl=None):
    print(header)
    print(table(results))
    print()
    print(table_tasks(results))
    print(
        "\nBytes per memory (mean): the stored record, the reference text inside it, the full fp16 K/V of the same "
        "reference, and how many times smaller the record is, with and without its text:\n"
    )
    print(
        "| condition | record | text | full fp16 K/V | x smaller | x smaller without text |\n|---|---|---|---|---|---|"
    )
    for name, r in results.items():
        b = r.get("bytes")
        if b and "text_per_memory" in b:
            print(
                f"| {name} | {b['per_memory']:,.0f} | {b['text_per_memory']:,.0f} | {b['fp16_kv_per_memory']:,.0f} | "
                f"{1 / b['vs_fp16_kv']:.0f} | {1 / b['without_text_vs_fp16_kv']:.0f} |"
            )
    if ppl:
        print("\nPerplexity without memory (first 128 tokens of each text), base weights against the adapter:\n")
        print("| text | texts | tokens | base | + adapter | change |\n|---|---|---|---|---|---|")
        for name, p in ppl.items():
            print(
                f"| {name} | {p['texts']} | {p['tokens']} | {p['base']:.3f} | {p['adapter']:.3f} | "
                f"{100 * (p['adapter'] / p['base'] - 1):+.1f}% |"
            )
    if args.plot:
        plot(results, args.plot)
        say(f"wrote {args.plot}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="smoke test: 4 questions per task, 16 distractors, short throughput"
    )
    ap.add_argument("--per-task", type=int, default=30, help="questions per task")
    ap.add_argument("--distractors", type=int, default=90, help="articles beside the questions' own")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--throughput-questions", type=int, default=2)
    ap.add_argument("--throughput-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--adapter",
        default=BUNDLED_FILE,
        help="reader adapter file for the '+ adapter' conditions (default: the bundled one); 'none' leaves them out",
    )
    ap.add_argument("--perplexity-texts", type=int, default=48, help="texts per domain for perplexity without memory")
    ap.add_argument("--all-layers", action="store_true", help="add every layer at 32, 64, 128 tokens/head + adapter")
    ap.add_argument("--only", default="", help="condition names to run, comma-separated (none, rag, the default kept)")
    ap.add_argument("--plot", help="the PNG to write (default: docs/quality.png; none with --quick)")
    ap.add_argument(
        "--json", help="raw results, every reply included (default: bench/out/quality.json; none with --quick)"
    )
    ap.add_argument("--from-json", help="print the tables and draw the plot from a run's raw results; run nothing")
    args = ap.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        report(
            saved["results"],
            saved.get("header", ""),
            args,
            lambda msg: print(msg, file=sys.stderr),
            saved.get("perplexity"),
        )
        return
    if args.quick:
        args.per_task, args.distractors, args.throughput_questions, args.throughput_tokens = 4, 16, 1, 16
        args.perplexity_texts = 4
    else:  # a smoke test does not overwrite the real figures
        args.plot = args.plot or os.path.join(ROOT, "docs", "quality.png")
        args.json = args.json or os.path.join(ROOT, "bench", "out", "quality.json")
    t_start = time.perf_counter()

    def say(msg):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", file=sys.stderr, flush=True)

    torch.manual_seed(args.seed)
    base = MemoryModel.load(adapter=None)  # the base weights: no reader adapter, even if one ships
    embedder = SharedEmbeddings(Embedder())
    n_layer = base.decoder.cfg.n_layer
    table_s = settings_table(n_layer)
    variants = {k: base.with_settings(s, adapter=None) for k, s in table_s.items()}
    adapter = None
    if args.adapter not in ("none", BUNDLED_FILE) and not os.path.exists(args.adapter):
        raise SystemExit(f"--adapter {args.adapter}: no such file (m3db train writes RUN_DIR/adapter.safetensors)")
    if args.adapter != "none" and os.path.exists(args.adapter):
        adapter = ReaderAdapter.load(args.adapter, base.decoder.cfg, base_fingerprint=base.fingerprint)
        read = {k: base.with_settings(s, adapter=adapter) for k, s in table_s.items()}
        say(f"reader adapter {adapter.fingerprint[:19]}... ({args.adapter}), trained for {adapter.settings}")
    conditions = CONDITIONS + (ALL_LAYERS if args.all_layers else [])
    if args.only:
        keep = set(args.only.split(",")) | {"none", "rag", DEFAULT}  # the baselines every table uses
        unknown = keep - {c.name for c in conditions}
        if unknown:
            raise SystemExit(f"--only: no condition named {sorted(unknown)}; known: {[c.name for c in conditions]}")
        conditions = [c for c in conditions if c.name in keep]
    conditions = [c for c in conditions if adapter is not None or not c.adapter]
    if adapter is None:
        say(f"no reader adapter at {args.adapter}: the '+ adapter' conditions are left out")
    questions, docs, skipped = build_questions(args.per_task, args.distractors, base.count_tokens, args.seed)
    say(
        f"{len(questions)} questions ({', '.join(f'{t} {sum(q.task == t for q in questions)}' for t in TASKS)}; "
        f"{skipped} blank questions not asked: their source reference would leak), "
        f"{len(docs)} articles in the knowledge base"
    )

    tmp = tempfile.TemporaryDirectory(prefix="m3db-quality-")
    dbs, stores = {}, {}  # dbs: (settings key, codec) -> database; stores: settings key -> {reference text: arrays}
    for cond in conditions:
        if cond.mode != "memory" or (cond.settings, cond.codec) in dbs:
            continue
        src = SOURCE[cond.settings] or cond.settings
        layers = None if SOURCE[cond.settings] is None else variants[cond.settings].settings.memory_layers
        wrapper = SharedEncoding(variants[cond.settings], variants[src], stores.setdefault(src, {}), layers)
        if layers is not None:
            verify_subset(wrapper, [docs[0]["text"][:400], docs[1]["text"][:400]])
        t = time.perf_counter()
        # a 1-byte RAM cache holds no memory: every read decodes its record from the segment
        db = m3db.connect(
            os.path.join(tmp.name, f"{cond.settings}-{cond.codec}.m3db"),
            model=wrapper,
            embedder=embedder,
            codec=cond.codec,
            config={"cache_bytes": 1},
        )
        ingest = db.add_documents(docs, progress=False)
        dbs[cond.settings, cond.codec] = db
        say(
            f"built {cond.settings} {cond.codec}: {ingest.memories_added} memories "
            f"from {ingest.documents_added} articles "
            f"in {time.perf_counter() - t:.0f} s"
        )
    stores.clear()  # the databases hold the memories now
    default = next(c for c in conditions if c.name == DEFAULT)
    text_db = dbs[default.settings, default.codec]  # none and rag read the same references' text from it

    results, retrievers, models = {}, {}, {}
    cfg = base.decoder.cfg
    for cond in conditions:
        model = (read if cond.adapter else variants)[cond.settings if cond.mode == "memory" else "all32"]
        db = dbs[cond.settings, cond.codec] if cond.mode == "memory" else text_db
        retriever = None
        if cond.mode != "none":
            retriever = FilteredRetriever(db, model, decode=cond.mode == "memory")
        rows = evaluate(cond, model, retriever, questions, args.batch_size, say)
        res = {"summary": summarize(rows), "rows": rows}
        if retriever is not None:
            res["recalls"], res["dropped"] = retriever.recalls, retriever.dropped
        if cond.mode == "memory":
            ((count, stored, tokens, text),) = db.sql(
                "SELECT count(*), sum(length), sum(token_count), sum(octet_length(encode(text))) FROM memories"
            )
            full_fp16 = n_layer * 2 * cfg.n_kv_head * cfg.head_dim * 2 * int(tokens)  # every layer, K and V, 2 bytes
            # without the reference's own text (a record keeps it for RAG, display and re-encoding)
            res["bytes"] = {
                "per_memory": stored / count,
                "vs_fp16_kv": stored / full_fp16,
                "memories": count,
                "text_per_memory": text / count,
                "fp16_kv_per_memory": full_fp16 / count,
                "without_text_vs_fp16_kv": (stored - text) / full_fp16,
            }
        elif cond.mode == "rag":
            ((text_bytes,),) = text_db.sql("SELECT avg(strlen(text)) FROM memories")
            res["bytes_note"] = f"{text_bytes:,.0f} (text)"
        results[cond.name] = res
        retrievers[cond.name], models[cond.name] = retriever, model
        s = res["summary"]
        say(
            f"{cond.name}: logprob {s['logprob']:.3f}, EM {s['em']:.3f}"
            + (f", leakage filter dropped {res['dropped']} references in {res['recalls']} recalls" if retriever else "")
        )

    tq = questions[:: max(1, len(questions) // args.throughput_questions)][: args.throughput_questions]
    tps = throughput([c for c in conditions if c.throughput], models, retrievers, tq, args.throughput_tokens, say)
    for name, v in tps.items():
        results[name]["tok_s"] = v
    ppl = None
    if adapter is not None:
        ppl = perplexities(base, adapter, args.perplexity_texts)
        say(f"perplexity without memory, base -> adapter: {ppl}")

    header = (
        f"\n{'reader adapter ' + adapter.fingerprint[:19] + '...; ' if adapter else ''}{len(questions)} questions "
        f"({', '.join(f'{t} {sum(q.task == t for q in questions)}' for t in TASKS)}), "
        f"{len(docs)} articles, {results[DEFAULT]['bytes']['memories']} memories; "
        f"leakage filter: {sum(r.get('dropped', 0) for r in results.values())} references dropped in "
        f"{sum(r.get('recalls', 0) for r in results.values())} recalls; torch threads {torch.get_num_threads()}; "
        f"throughput: batch 1, {len(tq)} question(s) x {args.throughput_tokens} new tokens, lockstep\n"
    )
    for db in dbs.values():
        db.close()
    tmp.cleanup()
    if args.json:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "header": header, "results": results, "perplexity": ppl}, f, indent=1)
    report(results, header, args, say, ppl)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
