"""Continual training with memory (Memory³'s second stage), of a reader adapter only.

Owns the training loop. The base weights and the memory encoder stay frozen; each step encodes
its examples' references into sparse memories with the same code path as ingest
(`MemoryModel.encode`, the model's memory settings), places them as generation does
(`model.memory.place`), and trains the `ReaderAdapter` on:
- memory examples (`model.train_data`): one chunk of at most 128 tokens reading its reference
  among distractors, loss on the answer;
- text examples: plain summary chunks with no memory, so ordinary language modelling stays.
Deterministic from the seed: step s always trains on the same batch, so a run resumed from a
checkpoint ends with the same adapter as an uninterrupted one. Checkpoints are safetensors
(adapter and optimizer state) plus JSON, never pickle. The log (`log.jsonl`) holds the losses
and, every `eval_every` steps, held-out accuracy and perplexity; `plot_log` draws it.

One loop, two backends: `model` is the bundled `MemoryModel` or a transformers model wrapped by
`m3db.bindings.transformers.HFMemoryModel` (its `for_training()`); the loop reads only what
both have (decoder with `memory=` and `adapter=`, its cfg and device, sink, settings,
tokenizer, fingerprint, encode, and `rotate_keys` where the model rotates with its own RoPE).

CLI: `m3db train OUT_DIR [--steps N] [--model PATH] ...` (m3db/cli hands in the Wikipedia
summaries and the ingest chunker); `bench/plot_training.py` draws the log. Must not import the
engine (`m3db`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

from .adapter import ReaderAdapter
from .memory import EncodedMemory, context_start, place
from .train_data import TrainingData, eval_facts, held_out, shuffled

CHECKPOINT = "checkpoint.safetensors"
STATE = "checkpoint.json"
LOG = "log.jsonl"
ADAPTER = "adapter.safetensors"


@dataclasses.dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 8  # memory examples per step
    text_batch: int = 2  # no-memory examples per step
    lr: float = 1e-3
    warmup: int = 20
    rank: int = 8
    alpha: float = 16.0
    seed: int = 0
    distractors: int = 4  # other references read with the answer's (5 memories, as at inference)
    # mostly reading practice in many forms (model.train_entries), some of the first adapter's
    # kinds (invented people, Wikipedia questions, blanks)
    mix: dict = dataclasses.field(
        default_factory=lambda: {"read": 0.5, "counter": 0.1, "fact": 0.1, "wiki": 0.2, "blank": 0.1}
    )
    eval_every: int = 25
    eval_questions: int = 32
    eval_texts: int = 16
    checkpoint_every: int = 10
    # an adapter file whose weights start the run ("" = a fresh adapter): e.g. a shipped one, to
    # teach it other memory settings or a codec's error without relearning reading from zero
    init: str = ""
    # the codec round trip every memory takes before it is read (a label, "" = none): the
    # transform itself is `train(memory_transform=...)`; recorded so a resume with another is refused
    memory_codec: str = ""

    def __post_init__(self):
        # refused here, before a model loads: 0 steps would write an untrained adapter, and a
        # zero interval or batch fails only after loading and a first evaluation
        for name in ("steps", "batch_size", "eval_every", "checkpoint_every", "rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} {value!r}: expected a positive whole number")
        for name in ("text_batch", "warmup", "distractors", "eval_questions", "eval_texts"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} {value!r}: expected a whole number >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr {self.lr!r}: expected a positive learning rate")


class MemoryEncoder:
    """References -> memories with the frozen encoder, remembering the first `keep` seen
    (references recur across steps: encoding one costs about as much as training on it).
    transform: encoded dict -> encoded dict, applied once to each fresh memory (a codec's round
    trip, so the reader trains on memories as they are stored)."""

    def __init__(self, model, keep=8_000, transform=None):
        self.model, self.keep, self.cache, self.transform = model, keep, {}, transform

    def __call__(self, texts):
        todo = sorted({t for t in texts if t not in self.cache})
        fresh = dict(zip(todo, self.model.encode(todo))) if todo else {}
        if self.transform is not None:
            fresh = {t: self.transform(e) for t, e in fresh.items()}
        out = [self.cache.get(t) or fresh[t] for t in texts]
        for t, e in fresh.items():
            if len(self.cache) < self.keep:
                self.cache[t] = e
        return out


def _pad(rows, pad_id):
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad_id, dtype=torch.long)
    valid = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        idx[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        valid[b, : len(r)] = True
    return idx, valid


def make_batch(model, examples, encoder, rng, *, with_memory=True):
    """Tensors for one forward: idx, valid, positions, labels (-100 off target), memory dict."""
    tok = model.tokenizer
    rows, labels = [], []
    for ex in examples:
        prompt = tok.encode(ex.prompt) if ex.prompt else []
        full = tok.encode(ex.prompt + ex.target)
        rows.append(full)
        labels.append([-100] * len(prompt) + full[len(prompt) :])
    idx, valid = _pad(rows, tok.pad_id)
    lab = torch.full(idx.shape, -100, dtype=torch.long)
    for b, row in enumerate(labels):
        lab[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    memory, start = None, 0
    if with_memory:
        refs = [shuffled(ex, rng) for ex in examples]
        encoded = encoder([t for r in refs for t in r])
        items, i = [], 0
        for r in refs:
            row = []
            for text in r:
                row.append(EncodedMemory.from_encoded(i, text, encoded[i]))
                i += 1
            items.append(row)
        s, cfg = model.settings, model.decoder.cfg
        # a model with its own rotary embedding (the transformers binding) rotates with it
        rotate = getattr(model, "rotate_keys", None)
        keys, values, mem_valid = place(
            items, model.sink_keys, model.sink_values, s, cfg.head_dim, cfg.rope_base, rotate=rotate
        )
        memory = {layer: (keys[j], values[j]) for j, layer in enumerate(s.memory_layers)}
        memory["valid"] = mem_valid
        start = context_start(s, model.sink_keys.shape[2])
    positions = (start + torch.arange(idx.shape[1])).expand(idx.shape)
    dev = model.decoder.device  # a GPU when training runs on one; placing stays on the CPU
    if memory is not None:
        memory = {k: v.to(dev) if k == "valid" else (v[0].to(dev), v[1].to(dev)) for k, v in memory.items()}
    return idx.to(dev), valid.to(dev), positions.to(dev), lab.to(dev), memory


def batch_loss(model, adapter, batch):
    idx, valid, positions, labels, memory = batch
    logits = model.decoder(idx, positions=positions, valid=valid, memory=memory, adapter=adapter)
    # next-token prediction: position t predicts token t+1
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def _answer_scores(model, adapter, questions, encoder, *, with_memory=True):
    """(questions whose every answer token is the argmax, teacher-forced; summed answer log-prob)."""
    tok = model.tokenizer
    correct, logprob = 0, 0.0
    rng = random.Random(0)
    for ex in questions:
        batch = make_batch(model, [ex], encoder, rng, with_memory=with_memory)
        idx, valid, positions, _, memory = batch
        logits = model.decoder(idx, positions=positions, valid=valid, memory=memory, adapter=adapter)[0]
        lead = len(tok.encode(ex.prompt + ex.target[: ex.target.rindex(ex.answer)].rstrip()))
        end = len(tok.encode(ex.prompt + ex.target[: ex.target.rindex(ex.answer) + len(ex.answer)]))
        targets = idx[0, lead:end]
        lp = torch.log_softmax(logits[lead - 1 : end - 1], dim=-1)
        logprob += float(lp.gather(1, targets[:, None]).sum())
        correct += bool((lp.argmax(-1) == targets).all())
    return correct, logprob


@torch.no_grad()
def evaluate(model, adapter, questions, texts, encoder, extra=None):
    """Held-out invented facts: accuracy (every answer token the argmax, teacher-forced) and
    mean answer log-prob; held-out text: perplexity without memory. extra: {name: [Example]},
    more question sets (another template family, say), each also scored without memory so
    that the memory's own gain shows (with minus without, same adapter)."""
    tok = model.tokenizer
    correct, logprob = _answer_scores(model, adapter, questions, encoder)
    out = {}
    for name, qs in (extra or {}).items():
        c, lp = _answer_scores(model, adapter, qs, encoder)
        _, lp0 = _answer_scores(model, adapter, qs, encoder, with_memory=False)
        n = max(1, len(qs))
        out[f"{name}_accuracy"] = c / n
        out[f"{name}_logprob"] = lp / n
        out[f"{name}_gain"] = (lp - lp0) / n
    nll, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tok.encode(text)[:128]], device=model.decoder.device)
        logits = model.decoder(ids, adapter=adapter)[0]
        nll += float(F.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return {
        "fact_accuracy": correct / max(1, len(questions)),
        "fact_logprob": logprob / max(1, len(questions)),
        "text_perplexity": math.exp(nll / max(1, count)),
        **out,
    }


def _lr(cfg, step):
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _run_identity(model) -> dict:
    """What a checkpoint was trained for: the base model and the memory settings. Resuming
    another model's run would write an adapter labelled for this model from another's steps."""
    from .memory_model import trained_for

    return {"model": model.fingerprint, "settings": trained_for(model.settings)}


def _save_checkpoint(out, adapter, opt, step, cfg, identity):
    from safetensors.torch import save_file

    tensors = {f"adapter.{k}": v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
    names = [n for n, _ in adapter.named_parameters()]
    for i, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            tensors[f"opt.{names[i]}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    save_file(tensors, os.path.join(out, CHECKPOINT + ".tmp"))
    os.replace(os.path.join(out, CHECKPOINT + ".tmp"), os.path.join(out, CHECKPOINT))
    with open(os.path.join(out, STATE + ".tmp"), "w") as f:
        json.dump({"step": step, "config": dataclasses.asdict(cfg), **identity}, f)
    os.replace(os.path.join(out, STATE + ".tmp"), os.path.join(out, STATE))


def _load_checkpoint(out, adapter, opt):
    from safetensors.torch import load_file

    with open(os.path.join(out, STATE)) as f:
        state = json.load(f)
    tensors = load_file(os.path.join(out, CHECKPOINT))
    adapter.load_state_dict({k[len("adapter.") :]: v for k, v in tensors.items() if k.startswith("adapter.")})
    names = [n for n, _ in adapter.named_parameters()]
    sd = opt.state_dict()
    sd["state"] = {}
    for i, name in enumerate(names):
        st = {
            key: tensors[f"opt.{name}.{key}"]
            for key in ("step", "exp_avg", "exp_avg_sq")
            if f"opt.{name}.{key}" in tensors
        }
        if st:
            sd["state"][i] = st
    opt.load_state_dict(sd)
    return state


def _cut_log(path, step):
    if os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(path + ".tmp", path)


def train(
    model,
    out,
    cfg: TrainConfig | None = None,
    *,
    wiki: dict,
    chunk,
    progress=True,
    say=print,
    eval_sets: dict | None = None,
    seconds: float | None = None,
    memory_transform=None,
):
    """Train (or resume training) a reader adapter for `model`'s memory settings in directory
    `out`; write `out/adapter.safetensors` and return it. wiki: {title: document} of the
    Wikipedia summaries; chunk: text -> [reference text] (ingest's chunker). Runs where the
    model's decoder is (`model.decoder.to("cuda")` first trains on a GPU). eval_sets: more
    held-out question sets for the log ({name: [Example]}, see `evaluate`). seconds: a time
    budget; when it runs out the run stops at a checkpoint and writes the adapter of the steps
    done (its metadata says how many), and running again resumes it."""
    from .memory_model import trained_for

    cfg = cfg or TrainConfig()
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    data = TrainingData(model.tokenizer, wiki=wiki, chunk=chunk, seed=cfg.seed, distractors=cfg.distractors)
    questions = eval_facts(model.tokenizer, cfg.eval_questions, seed=cfg.seed, distractors=cfg.distractors)
    texts = [wiki[t]["text"] for t in sorted(wiki) if held_out(t)][: cfg.eval_texts]
    adapter = ReaderAdapter(
        model.decoder.cfg,
        base_fingerprint=model.fingerprint,
        rank=cfg.rank,
        alpha=cfg.alpha,
        settings=trained_for(model.settings),
        seed=cfg.seed,
    ).to(model.decoder.device)
    if cfg.init:
        start_from = ReaderAdapter.load(cfg.init, model.decoder.cfg, base_fingerprint=model.fingerprint)
        if (start_from.rank, start_from.alpha, start_from.targets) != (adapter.rank, adapter.alpha, adapter.targets):
            raise ValueError(
                f"init adapter {cfg.init} has rank {start_from.rank}, alpha {start_from.alpha}, targets "
                f"{start_from.targets}; this run trains rank {adapter.rank}, alpha {adapter.alpha}, {adapter.targets}"
            )
        adapter.load_state_dict(start_from.state_dict())
    if bool(cfg.memory_codec) != (memory_transform is not None):
        raise ValueError("memory_codec names the transform given as memory_transform: give both or neither")
    adapter.train().requires_grad_(True)
    opt = torch.optim.AdamW(adapter.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    start = 0
    identity = json.loads(json.dumps(_run_identity(model)))  # as JSON reads it back (lists)
    if os.path.exists(os.path.join(out, STATE)):
        with open(os.path.join(out, STATE)) as f:
            state = json.load(f)
        # fields added since a checkpoint was written read as their defaults
        saved = {**json.loads(json.dumps(dataclasses.asdict(TrainConfig()))), **state["config"]}
        saved["mix"] = state["config"].get("mix", saved["mix"])
        if saved != json.loads(json.dumps(dataclasses.asdict(cfg))):
            raise ValueError(f"{out} holds a run with another configuration ({saved}); use a new directory")
        theirs = {k: state.get(k) for k in identity}
        if theirs["model"] is None:
            raise ValueError(f"{out} holds a run that does not record its model (an older m3db's); use a new directory")
        if theirs != identity:
            raise ValueError(
                f"{out} holds a run for model {str(theirs['model'])[:23]}... with settings {theirs['settings']}, "
                f"not for this model {identity['model'][:23]}... with settings {identity['settings']}; "
                "use a new directory"
            )
        start = _load_checkpoint(out, adapter, opt)["step"]
        say(f"resuming at step {start}")
        _cut_log(os.path.join(out, LOG), start)  # steps past the checkpoint are trained again
    encoder = MemoryEncoder(model, transform=memory_transform)
    log = open(os.path.join(out, LOG), "a")
    if start == 0:
        log.truncate(0)
        # step 0: the weights the run starts from (the base weights, or the init adapter)
        before = evaluate(model, adapter if cfg.init else None, questions, texts, encoder, eval_sets)
        log.write(json.dumps({"step": 0, "eval": before, "adapter": bool(cfg.init)}) + "\n")
        say(f"before training: {before}")
    from tqdm import tqdm

    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
        unit="step",
    )
    t0 = time.time()
    done = start
    for step in bar:
        rng = random.Random(cfg.seed * 104_729 + step)
        for group in opt.param_groups:
            group["lr"] = _lr(cfg, step)
        mem = make_batch(model, data.batch(step, cfg.batch_size, cfg.mix), encoder, rng)
        loss_m = batch_loss(model, adapter, mem)
        loss = loss_m
        loss_t = None
        if cfg.text_batch:
            plain = make_batch(model, data.batch(step, cfg.text_batch, {"text": 1.0}), encoder, rng, with_memory=False)
            loss_t = batch_loss(model, adapter, plain)
            loss = loss + loss_t * cfg.text_batch / cfg.batch_size
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        opt.step()
        loss_m, loss_t = loss_m.detach(), None if loss_t is None else loss_t.detach()
        row = {
            "step": step + 1,
            "loss_memory": float(loss_m),
            "loss_text": None if loss_t is None else float(loss_t),
            "lr": _lr(cfg, step),
            "seconds": round(time.time() - t0, 1),
        }
        bar.set_postfix(loss=f"{float(loss_m):.3f}", refresh=False)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            adapter.eval()
            row["eval"] = evaluate(model, adapter, questions, texts, encoder, eval_sets)
            adapter.train()
            say(f"step {step + 1}: {row['eval']}")
        log.write(json.dumps(row) + "\n")
        log.flush()
        out_of_time = seconds is not None and time.time() - t0 >= seconds
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or out_of_time:
            _save_checkpoint(out, adapter, opt, step + 1, cfg, identity)
        done = step + 1
        if out_of_time:
            say(f"time budget of {seconds:.0f} s spent at step {done} of {cfg.steps}; run again to resume")
            break
    log.close()
    adapter.cpu().eval().requires_grad_(False)
    adapter.save(os.path.join(out, ADAPTER), extra={"config": dataclasses.asdict(cfg), "steps": done})
    return adapter
