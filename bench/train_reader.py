"""Train a reader adapter and log its held-out reading curve (a GPU run, or a short CPU one).

`m3db train` with two additions for measuring: the log's evaluations also score
bench/heldout.py's questions (template families the training data never uses), teacher-forced,
from the relevant entry alone (`heldout1`) and among 4 entries of its family (`heldout5`), with
and without memory (so `heldout*_gain` is the memory's own gain, same adapter); and several
configurations can run side by side on one GPU (one process each).

    python bench/train_reader.py runs/sparse --device cuda --minutes 6 --steps 1500 --batch-size 32
    python bench/train_reader.py runs/dense --mode dense --device cuda --minutes 6
    python bench/train_reader.py runs/cpu --steps 20 --batch-size 4 --eval-every 10   # CPU smoke
    # a long CPU run (resumable: run the same command again) of the shipped sparse adapter on
    # 12 upper layers at 32 tokens per head, read as stored in pq (keys 8, values 16 bytes)
    python bench/train_reader.py RUN --layers 18-29 --tokens-per-head 32 --codec pq:8/16 \
        --init model/adapters/reader-smollm2-135m-sparse.safetensors --steps 3000 --batch-size 4 --threads 1

--codec trains the reader on memories as they are stored: every memory it reads (training and
the log's evaluations) is encoded and decoded by the codec first. pq's codebook is trained once
on bench/codec_sample.py's texts (none of the held-out bench's entries), encoded with the run's
settings, and kept in the run's directory (`codebook.msgpack`), so a resumed run reads through
the same one.

Then `python bench/heldout.py --adapter runs/sparse/adapter.safetensors` measures the adapter
by generation through databases, and `python bench/plot_training.py runs/sparse` draws its log.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import sys
import time

import msgpack
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from codec_sample import codec_sample  # noqa: E402

from m3db.knowledge import sources
from m3db.knowledge.chunk import chunk_text
from m3db.model.memory_model import MemoryModel
from m3db.model.settings import MemorySettings
from m3db.model.train import TrainConfig, train
from m3db.model.train_data import Example

HERE = os.path.dirname(os.path.abspath(__file__))
CODEBOOK = "codebook.msgpack"


def heldout_module():
    spec = importlib.util.spec_from_file_location("heldout_bench", os.path.join(HERE, "heldout.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


def heldout_sets(tokenizer, k_values=(1, 5), seed=14) -> dict[str, list[Example]]:
    """bench/heldout.py's questions as training-log examples: the entry alone, or with k-1
    other entries of its family (a fixed, seeded choice; recall picks mostly these)."""
    h = heldout_module()
    entries, questions = h.build(7, 2, seed)
    family_of = {q.entry: q.family for q in questions}  # every entry has its questions
    rng = random.Random(seed)
    out = {}
    for k in k_values:
        rows = []
        for q in questions:
            same = [e for e in entries if e != q.entry and family_of[e] == q.family]
            refs = (q.entry, *rng.sample(same, k - 1))
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": q.question}], add_generation_prompt=True
            )
            rows.append(Example(f"heldout-{q.family}", refs, prompt, f"{q.lead} {q.answer}.", q.answer))
        out[f"heldout{k}"] = rows
    return out


def parse_layers(text: str) -> tuple[int, ...]:
    """ "15-29" or "15,17,19-21" -> the layer numbers."""
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return tuple(sorted(set(out)))


def memory_codec(spec: str, model, out: str, sample: int, say=print):
    """The codec round trip `spec` names ("int4", or "pq:K/V": key and value bytes per head
    vector) as a transform of encoded memories. A pq codebook is trained on `sample` texts of
    bench/codec_sample.py encoded with `model`'s settings, or read back from `out`."""
    from m3db.storage.codec import Int4Codec, load_codec
    from m3db.storage.pq import train_pq

    if spec == "int4":
        codec = Int4Codec()
    elif spec.startswith("pq:"):
        mk, mv = (int(x) for x in spec[3:].split("/"))
        path = os.path.join(out, CODEBOOK)
        if os.path.exists(path):
            with open(path, "rb") as f:
                codec = load_codec("pq", f.read())
            say(f"codebook read from {path}: {codec!r}, error {codec.error}")
        else:
            t = time.time()
            texts = codec_sample(sample, model.count_tokens)
            enc = model.encode(texts)
            keys = np.concatenate([e["keys"] for e in enc], axis=2)
            values = np.concatenate([e["values"] for e in enc], axis=2)
            codec = train_pq(keys, values, m={"keys": mk, "values": mv}, seed=0)
            os.makedirs(out, exist_ok=True)
            with open(path + ".tmp", "wb") as f:
                f.write(msgpack.packb(codec.params(), use_bin_type=True))
            os.replace(path + ".tmp", path)
            say(f"codebook trained on {len(texts)} texts in {time.time() - t:.0f} s: {codec!r}, error {codec.error}")
    else:
        raise SystemExit(f"--codec {spec!r}: expected int4 or pq:K/V")

    def transform(e):
        k, v = (np.ascontiguousarray(e[p], dtype=np.float32) for p in ("keys", "values"))
        return {
            **e,
            "keys": codec.decode(codec.encode(k, part="keys"), k.shape, part="keys"),
            "values": codec.decode(codec.encode(v, part="values"), v.shape, part="values"),
        }

    return transform


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the run's directory (checkpoints, log.jsonl, adapter.safetensors)")
    ap.add_argument("--mode", choices=("sparse", "dense"), default="sparse")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--minutes", type=float, default=None, help="time budget (stops at a checkpoint)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--text-batch", type=int, default=None, help="no-memory examples per step (default batch/4)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--mix", default=None, help="kinds and weights, e.g. read=0.6,counter=0.1,fact=0.1,wiki=0.2")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", default=None, help="memory layers, e.g. 18-29 (default: the mode's)")
    ap.add_argument("--tokens-per-head", type=int, default=None, help="tokens per head (default: the mode's)")
    ap.add_argument("--codec", default="", help="train on memories as stored: int4 or pq:K/V (key, value bytes)")
    ap.add_argument("--codec-sample", type=int, default=300, help="texts a pq codebook is trained on")
    ap.add_argument("--init", default="", help="an adapter file whose weights start the run")
    ap.add_argument("--checkpoint-every", type=int, default=50)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # the frozen base in TF32: the adapter trains in fp32
        torch.backends.cudnn.allow_tf32 = True
    base = MemoryModel.load(adapter=None)
    n = base.decoder.cfg.n_layer
    settings = MemorySettings.sparse(n) if args.mode == "sparse" else MemorySettings().resolve(n)
    if args.layers:
        settings = settings.with_(memory_layers=parse_layers(args.layers))
    if args.tokens_per_head:
        settings = settings.with_(tokens_per_head=args.tokens_per_head)
    settings = settings.resolve(n)
    model = MemoryModel(base.decoder.to(args.device), base.tokenizer, fingerprint=base.fingerprint, settings=settings)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        text_batch=args.text_batch if args.text_batch is not None else max(1, args.batch_size // 4),
        lr=args.lr,
        rank=args.rank,
        seed=args.seed,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        init=args.init,
        memory_codec=args.codec,
    )
    if args.mix:
        cfg.mix = {k: float(v) for k, v in (part.split("=") for part in args.mix.split(","))}
    wiki = {d["title"]: d for d in sources.wikipedia()}

    def chunk(text):
        return [c.text for c in chunk_text(text, model.count_tokens, settings.reference_length)]

    say = lambda m: print(m, flush=True)  # noqa: E731
    transform = memory_codec(args.codec, model, args.out, args.codec_sample, say) if args.codec else None
    t = time.time()
    train(
        model,
        args.out,
        cfg,
        wiki=wiki,
        chunk=chunk,
        progress=sys.stderr.isatty(),
        eval_sets=heldout_sets(model.tokenizer),
        seconds=None if args.minutes is None else args.minutes * 60,
        say=say,
        memory_transform=transform,
    )
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump({"args": vars(args), "seconds": round(time.time() - t, 1), "device": str(model.decoder.device)}, f)


if __name__ == "__main__":
    main()
