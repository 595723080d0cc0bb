"""Train a reader adapter and log its held-out reading curve (a GPU run, or a short CPU one).

`m3db train` with two additions for measuring: the log's evaluations also score
bench/heldout.py's questions (template families the training data never uses), teacher-forced,
from the relevant entry alone (`heldout1`) and among 4 entries of its family (`heldout5`), with
and without memory (so `heldout*_gain` is the memory's own gain, same adapter); and several
configurations can run side by side on one GPU (one process each).

    python bench/train_reader.py runs/sparse --device cuda --minutes 6 --steps 1500 --batch-size 32
    python bench/train_reader.py runs/dense --mode dense --device cuda --minutes 6
    python bench/train_reader.py runs/cpu --steps 20 --batch-size 4 --eval-every 10   # CPU smoke

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

import torch

from m3db.knowledge import sources
from m3db.knowledge.chunk import chunk_text
from m3db.model.memory_model import MemoryModel
from m3db.model.settings import MemorySettings
from m3db.model.train import TrainConfig, train
from m3db.model.train_data import Example

HERE = os.path.dirname(os.path.abspath(__file__))


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
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # the frozen base in TF32: the adapter trains in fp32
        torch.backends.cudnn.allow_tf32 = True
    base = MemoryModel.load(adapter=None)
    n = base.decoder.cfg.n_layer
    settings = MemorySettings.sparse(n) if args.mode == "sparse" else MemorySettings().resolve(n)
    model = MemoryModel(base.decoder.to(args.device), base.tokenizer, fingerprint=base.fingerprint, settings=settings)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        text_batch=args.text_batch if args.text_batch is not None else max(1, args.batch_size // 4),
        lr=args.lr,
        rank=args.rank,
        seed=args.seed,
        eval_every=args.eval_every,
        checkpoint_every=50,
    )
    if args.mix:
        cfg.mix = {k: float(v) for k, v in (part.split("=") for part in args.mix.split(","))}
    wiki = {d["title"]: d for d in sources.wikipedia()}

    def chunk(text):
        return [c.text for c in chunk_text(text, model.count_tokens, settings.reference_length)]

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
        say=lambda m: print(m, flush=True),
    )
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump({"args": vars(args), "seconds": round(time.time() - t, 1), "device": str(model.decoder.device)}, f)


if __name__ == "__main__":
    main()
