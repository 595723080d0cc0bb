"""A fast screen of compressed memory configurations on bench/heldout.py's questions.

Teacher-forced only (no generation, no database): each of the 84 held-out questions reads its
relevant entry alone (`heldout1`) and, with --k5, among 4 entries of its family (`heldout5`,
bench/train_reader.py's sets), through a reader adapter; per configuration (memory layers,
tokens per head, codec) it prints the share of questions whose every answer token is the
argmax ("acc", what EM tracks) and the mean answer log-prob, with the bytes a stored record
would hold. Memories are encoded once per tokens-per-head budget on every layer and sliced to
each layer set (token choice is per layer and head, so a slice equals encoding that set);
codecs are applied as a round trip (encode, decode), pq with codebooks trained on
bench/codec_sample.py's texts (never the bench's entries) or, with `own`, on the bench's 42
entries themselves (what `m3db recompress` does to a knowledge base of those 42).

    python bench/screen_compressed.py "15-29:32:none" "15-29:32:pq8/8" "21-29:32:pq16/16"

A configuration is LAYERS:TOKENS:CODEC[:own]; LAYERS a range or a comma list ("15-29",
"15,17,19"), CODEC none | int4 | pqK/V. The bench (bench/heldout.py --memory) measures the
chosen ones by generation through databases.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from codec_sample import codec_sample  # noqa: E402
from train_reader import heldout_sets  # noqa: E402

from m3db.model.adapter import BUNDLED_FILE, ReaderAdapter  # noqa: E402
from m3db.model.memory_model import MemoryModel  # noqa: E402
from m3db.model.settings import MemorySettings  # noqa: E402
from m3db.model.train import _answer_scores  # noqa: E402
from m3db.storage.codec import Int4Codec  # noqa: E402
from m3db.storage.pq import PQCodec, train_pq  # noqa: E402

# a stored record beside its codes: positions (1 byte per kept token and head) are counted
# per configuration; this is the rest (text ~300, retrieval embedding 1,536, msgpack, frame),
# from the sparse int4 record (31,078 bytes) less its codes and positions
RECORD_REST = 1_918


def parse_layers(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return sorted(set(out))


def codec_bytes_per_vector(codec: str) -> tuple[int, int]:
    """(key bytes, value bytes) per 64-dim head vector, blob headers left out."""
    if codec == "none":
        return 128, 128  # fp16, for reference
    if codec == "int4":
        return 40, 40  # 32 bytes of nibbles + 2 float32 scales
    k, v = codec[2:].split("/")
    return int(k), int(v)


class PQBank:
    """pq codebooks per (tokens, m), trained once on every screened layer and sliced."""

    def __init__(self, layers):
        self.layers, self.books = layers, {}

    def get(self, key, train_keys, train_values, m) -> PQCodec:
        if key not in self.books:
            t = time.perf_counter()
            self.books[key] = train_pq(train_keys, train_values, m=m, seed=0)
            print(f"  trained pq {key} in {time.perf_counter() - t:.0f} s, error {self.books[key].error}", flush=True)
        return self.books[key]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--adapter", default=BUNDLED_FILE)
    ap.add_argument("--sample", type=int, default=300, help="texts the pq codebooks train on")
    ap.add_argument("--k5", action="store_true", help="also score among 4 entries of the family")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base = MemoryModel.load(adapter=None)
    adapter = (
        ReaderAdapter.load(args.adapter, base.decoder.cfg, base_fingerprint=base.fingerprint) if args.adapter else None
    )
    sets = heldout_sets(base.tokenizer, k_values=(1, 5) if args.k5 else (1,))
    entries = sorted({r for qs in sets.values() for ex in qs for r in ex.references})
    configs = [c.split(":") for c in args.configs]
    all_layers = sorted({la for c in configs for la in parse_layers(c[0])})
    sample = codec_sample(args.sample, base.count_tokens) if any(c[2].startswith("pq") for c in configs) else []
    encoded = {}  # tokens -> {text: dict of arrays on every layer}
    bank = PQBank(all_layers)
    for layers_text, tokens, codec, *flags in configs:
        tokens, layers = int(tokens), parse_layers(layers_text)
        own = "own" in flags
        if tokens not in encoded:
            t = time.perf_counter()
            enc = base.with_settings(MemorySettings(tokens_per_head=tokens), adapter=None)
            texts = entries + [s for s in sample if s not in entries]
            encoded[tokens] = dict(zip(texts, enc.encode(texts)))
            print(f"encoded {len(texts)} texts at {tokens}/head in {time.perf_counter() - t:.0f} s", flush=True)
        mems = encoded[tokens]
        idx = [all_layers.index(la) for la in layers]
        codec_fn = None
        if codec == "int4":
            c4 = Int4Codec()

            def codec_fn(x, part, c4=c4):
                return c4.decode(c4.encode(x), x.shape)

        elif codec.startswith("pq"):
            mk, mv = codec_bytes_per_vector(codec)
            src = entries if own else sample
            tk = np.concatenate([mems[s]["keys"][all_layers] for s in src], axis=2)
            tv = np.concatenate([mems[s]["values"][all_layers] for s in src], axis=2)
            book = bank.get((tokens, mk, mv, own), tk, tv, {"keys": mk, "values": mv})
            sub = PQCodec({p: book.centroids[p][idx] for p in ("keys", "values")})

            def codec_fn(x, part, sub=sub):
                return sub.decode(sub.encode(x, part=part), x.shape, part=part)

        cache = {}

        def encoder(texts, layers=layers, codec_fn=codec_fn, cache=cache, mems=mems):
            out = []
            for t in texts:
                if t not in cache:
                    m = mems[t]
                    k, v = m["keys"][layers], m["values"][layers]
                    if codec_fn is not None:
                        k, v = codec_fn(np.ascontiguousarray(k), "keys"), codec_fn(np.ascontiguousarray(v), "values")
                    cache[t] = {
                        "keys": k,
                        "values": v,
                        "positions": m["positions"][layers],
                        "token_count": m["token_count"],
                    }
                out.append(cache[t])
            return out

        model = base.with_settings(MemorySettings(memory_layers=tuple(layers), tokens_per_head=tokens), adapter=None)
        n_vec = np.mean(
            [mems[e]["keys"][layers].shape[0] * mems[e]["keys"].shape[1] * mems[e]["keys"].shape[2] for e in entries]
        )
        kb, vb = codec_bytes_per_vector(codec)
        size = n_vec * (kb + vb + 1) + RECORD_REST
        cells = []
        t = time.perf_counter()
        with torch.no_grad():
            for name, qs in sets.items():
                c, lp = _answer_scores(model, adapter, qs, encoder)
                cells.append(f"{name} acc {100 * c / len(qs):5.1f}% logprob {lp / len(qs):7.2f}")
        print(
            f"{':'.join([layers_text, str(tokens), codec, *flags]):24s} ~{size:8,.0f} B  "
            + "  ".join(cells)
            + f"  ({time.perf_counter() - t:.0f} s)",
            flush=True,
        )
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
