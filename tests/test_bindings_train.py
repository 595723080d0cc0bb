"""The sparse mode for a transformers model: a reader adapter trained for it by the bundled
training loop (`m3db.model.train.train`, one loop, two backends), bound to its fingerprint, and
read through forward hooks that exist only during m3db's own calls. Tiny random-initialized
models (tests/hf_tiny.py), nothing downloaded, CPU."""

import json
import math
import random

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_tiny import tiny_model, tiny_tokenizer  # noqa: E402

import m3db  # noqa: E402
from m3db.bindings.transformers import AdapterError, AdapterRequired, HFMemoryModel  # noqa: E402
from m3db.model import train as train_mod  # noqa: E402
from m3db.model.adapter import ReaderAdapter  # noqa: E402
from m3db.model.memory import EncodedMemory  # noqa: E402
from m3db.model.memory_model import MemoryModel, trained_for  # noqa: E402
from m3db.model.settings import MemorySettings  # noqa: E402
from m3db.testing import HashEmbedder  # noqa: E402

WIKI = {
    f"Article {i}": {
        "title": f"Article {i}",
        "text": f"Article {i} is a small town in the north. It has {i} bridges and a market. "
        f"The town of Article {i} was founded by traders.",
        "metadata": {"description": "small town in the north"},
    }
    for i in range(40)
}
REFS = [
    "The Zorblax festival is held every March in the town of Quimby.",
    "Quimby lies on the river Flent, two days north of the sea.",
    "The Flent freezes in winter; skaters race on it for a silver cup.",
]
CFG = dict(batch_size=2, text_batch=1, warmup=1, rank=4, distractors=1, eval_questions=2, eval_texts=1)


def chunk(text):
    return [text]  # the tiny summaries are one reference each


def sparse_for_training(family, seed=0):
    """A 4-layer tiny model in its sparse settings (memory layers 2 and 3, 8 tokens per head);
    references up to 256 tokens: the byte-level tokenizer spends a token per character."""
    m = HFMemoryModel(tiny_model(family, seed=seed, layers=4), tiny_tokenizer())
    return m.for_training(reference_length=256)


def perturbed(m, scale=0.3, seed=1):
    """A non-zero adapter for m's settings (an untrained one is exactly the base model)."""
    a = ReaderAdapter(m.decoder.cfg, base_fingerprint=m.fingerprint, rank=4, settings=trained_for(m.settings))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return a


def hooks_left(hf):
    return sum(len(mod._forward_hooks) for mod in hf.modules())


class Picker:
    def __init__(self, memories):
        self.memories = memories

    def __call__(self, query, k):
        return self.memories[:k]


def memories_of(m):
    return [EncodedMemory.from_encoded(100 + i, t, e) for i, (t, e) in enumerate(zip(REFS, m.encode(REFS)))]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_the_bundled_loop_trains_an_adapter_for_a_transformers_model(family, tmp_path):
    m = sparse_for_training(family)
    assert m.settings.memory_layers == (2, 3) and m.settings.tokens_per_head == 8 and m.adapter is None
    weights = {k: v.clone() for k, v in m.hf_model.state_dict().items()}
    cfg = train_mod.TrainConfig(steps=6, lr=1e-2, eval_every=3, **CFG)
    adapter = train_mod.train(m, tmp_path, cfg, progress=False, wiki=WIKI, chunk=chunk, say=lambda s: None)
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["step"] for r in log] == list(range(7)) and "eval" in log[0] and "eval" in log[-1]
    # the memory loss falls: on fixed batches, the trained adapter against an untrained one
    data = train_mod.TrainingData(m.tokenizer, wiki=WIKI, chunk=chunk, distractors=1)
    zero = ReaderAdapter(m.decoder.cfg, base_fingerprint=m.fingerprint, rank=4)
    encoder = train_mod.MemoryEncoder(m)
    with torch.no_grad():
        for step in (100, 101, 102):
            batch = train_mod.make_batch(m, data.batch(step, 2, cfg.mix), encoder, random.Random(step))
            assert float(train_mod.batch_loss(m, adapter, batch)) < 0.9 * float(train_mod.batch_loss(m, zero, batch))
    # no HF weight moved or got a gradient, and no hook outlived a call
    assert all(torch.equal(v, m.hf_model.state_dict()[k]) for k, v in weights.items())
    assert all(p.grad is None and not p.requires_grad for p in m.hf_model.parameters())
    assert hooks_left(m.hf_model) == 0
    # the file is bound to this model and these settings
    loaded = ReaderAdapter.load(tmp_path / "adapter.safetensors", m.decoder.cfg, base_fingerprint=m.fingerprint)
    assert loaded.fingerprint == adapter.fingerprint and loaded.base_fingerprint == m.fingerprint
    assert loaded.settings == trained_for(m.settings)


def test_gradients_reach_the_adapter_only():
    m = sparse_for_training("qwen2")
    data = train_mod.TrainingData(m.tokenizer, wiki=WIKI, chunk=chunk, distractors=1)
    batch = train_mod.make_batch(m, data.batch(0, 2, {"fact": 1}), train_mod.MemoryEncoder(m), random.Random(0))
    a = ReaderAdapter(m.decoder.cfg, base_fingerprint=m.fingerprint, rank=4).train().requires_grad_(True)
    train_mod.batch_loss(m, a, batch).backward()
    assert all(p.grad is not None for p in a.parameters())  # every layer's q, k, v, o learns
    assert all(p.grad is None for p in m.hf_model.parameters())
    with torch.no_grad():  # reading (no grad mode, or a frozen adapter) builds no graph
        assert not train_mod.batch_loss(m, a, batch).requires_grad
    assert not train_mod.batch_loss(m, a.requires_grad_(False), batch).requires_grad


def test_the_adapter_reads_as_in_the_bundled_decoder():
    """The same weights in the bundled decoder and in a transformers Llama: the same logits with
    the same adapter and the same memories (cacheless training path): the hooks add exactly the
    bundled decoder's low-rank updates."""
    settings = MemorySettings(memory_layers=(1, 3), tokens_per_head=8)
    ours = MemoryModel.tiny(settings=settings, std=0.1)
    c = ours.decoder.cfg
    hf = tiny_model(
        "llama",
        layers=c.n_layer,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_base},
        vocab_size=c.vocab_size,
    )
    names = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn": "self_attn"}
    state = {"model.embed_tokens.weight": ours.decoder.tok_emb.weight, "model.norm.weight": ours.decoder.norm.weight}
    for name, t in ours.decoder.blocks.state_dict().items():
        i, part, rest = name.split(".", 2)
        state[f"model.layers.{i}.{names.get(part, part)}.{rest}"] = t
    state["lm_head.weight"] = ours.decoder.tok_emb.weight
    hf.load_state_dict(state)
    theirs = HFMemoryModel(hf, tiny_tokenizer(), settings=settings)
    a = perturbed(ours)
    B, T, M = 2, 12, 5
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(3, c.vocab_size, (B, T), generator=g)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, 9:] = False
    shape = (B, c.n_kv_head, M, c.head_dim)  # rotated memory keys and values
    memory = {i: (torch.randn(shape, generator=g), torch.randn(shape, generator=g)) for i in (1, 3)}
    memory["valid"] = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    positions = (20 + torch.arange(T)).expand(B, T)
    for adapter in (None, a):
        want = ours.decoder(idx, positions=positions, valid=valid, memory=memory, adapter=adapter)
        got = theirs.decoder(idx, positions=positions, valid=valid, memory=memory, adapter=adapter)
        torch.testing.assert_close(got[valid], want[valid], atol=1e-4, rtol=1e-4)
    assert hooks_left(hf) == 0


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_an_untrained_adapter_leaves_the_logits_unchanged(family):
    m = sparse_for_training(family)
    zero = ReaderAdapter(m.decoder.cfg, base_fingerprint=m.fingerprint)
    ids = torch.tensor([m.tokenizer.encode("Where was Ada born?")])
    assert torch.equal(m.decoder(ids, adapter=zero), m.decoder(ids))
    assert not torch.equal(m.decoder(ids, adapter=perturbed(m)), m.decoder(ids))
    with torch.no_grad():
        own = m.hf_model(ids).logits
    torch.testing.assert_close(own, m.decoder(ids), atol=1e-5, rtol=1e-5)  # the hooks are gone again
    sparse = HFMemoryModel(m.hf_model, tiny_tokenizer(), settings=m.settings, adapter=zero)
    mems = memories_of(sparse)
    plain = HFMemoryModel(m.hf_model, tiny_tokenizer(), settings=m.settings)
    a = sparse.generate("hello", retriever=Picker(mems), max_tokens=12, stop_tokens=())
    b = plain.generate("hello", retriever=Picker(mems), max_tokens=12, stop_tokens=())
    assert a.tokens == b.tokens


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama saved as a folder, and a non-zero adapter file for its sparse mode."""
    where = tmp_path_factory.mktemp("sparse")
    hf, tok = tiny_model("llama", seed=3, layers=4), tiny_tokenizer()
    hf.save_pretrained(where / "llama")
    tok.save_pretrained(where / "llama")
    m = HFMemoryModel(hf, tok).for_training()
    perturbed(m).save(where / "adapter.safetensors", extra={"steps": 0})
    ReaderAdapter(m.decoder.cfg, base_fingerprint=m.fingerprint, settings=trained_for(m.settings)).save(
        where / "zero.safetensors"
    )
    return where


def test_a_sparse_model_reads_through_its_adapter(saved, tmp_path):
    sparse = HFMemoryModel.from_pretrained(saved / "llama", memory_mode="sparse", adapter=saved / "adapter.safetensors")
    assert sparse.settings.memory_layers == (2, 3) and sparse.settings.tokens_per_head == 8
    assert sparse.adapter.base_fingerprint == sparse.fingerprint and "adapter=True" in repr(sparse)
    zero = HFMemoryModel.from_pretrained(saved / "llama", memory_mode="sparse", adapter=saved / "zero.safetensors")
    mems = memories_of(sparse)
    a = sparse.generate("When is the festival?", retriever=Picker(mems), max_tokens=12, stop_tokens=())
    b = zero.generate("When is the festival?", retriever=Picker(mems), max_tokens=12, stop_tokens=())
    assert len(a.tokens) == 12 and a.tokens != b.tokens  # a non-zero adapter changes what is read
    batched = sparse.generate_many(
        ["When is the festival?", "hi"], retriever=Picker(mems), max_tokens=12, stop_tokens=()
    )
    assert batched[0].tokens == a.tokens
    assert hooks_left(sparse.hf_model) == 0
    # through the database: a sparse knowledge base, reopened with the same model and adapter
    with m3db.connect(tmp_path / "kb", model=sparse, embedder=HashEmbedder()) as db:
        db.add(" ".join(REFS), source="quimby.txt")
        assert tuple(db.spec.memory_layers) == (2, 3) and db.spec.tokens_per_head == 8
        answer = db.generate("When is the Zorblax festival?", max_tokens=6)
        assert answer.sources and answer.mode == "memory"
    dense = HFMemoryModel.from_pretrained(saved / "llama")
    with pytest.raises(m3db.SpecMismatchError, match="memory_layers"):
        m3db.connect(tmp_path / "kb", model=dense, embedder=HashEmbedder())


def test_an_adapter_is_bound_to_its_model_and_settings(saved):
    path = saved / "adapter.safetensors"
    other = tiny_model("llama", seed=4, layers=4)  # same shapes, other weights
    with pytest.raises(AdapterError, match="trained on the model"):
        HFMemoryModel(other, tiny_tokenizer(), memory_mode="sparse", adapter=path)
    mine = HFMemoryModel.from_pretrained(saved / "llama")
    with pytest.raises(AdapterError, match="trained on the model"):
        HFMemoryModel(other, tiny_tokenizer(), memory_mode="sparse", adapter=perturbed(mine.for_training()))
    # trained for other settings: refused by the sparse mode, read with those settings given
    layers_1 = mine.for_training(memory_layers=(1,))
    narrow = perturbed(layers_1)
    with pytest.raises(AdapterError, match="not for this model's sparse mode"):
        HFMemoryModel(mine.hf_model, tiny_tokenizer(), memory_mode="sparse", adapter=narrow)
    m = HFMemoryModel(mine.hf_model, tiny_tokenizer(), settings=layers_1.settings, adapter=narrow)
    assert m.settings.memory_layers == (1,) and m.adapter is narrow


def test_sparse_without_an_adapter_says_how_to_train_one(saved, tmp_path):
    hf, tok = tiny_model("qwen3", layers=4), tiny_tokenizer()
    with pytest.raises(AdapterRequired, match=r"train one with `m3db train OUT --model PATH`.*adapter="):
        HFMemoryModel(hf, tok, memory_mode="sparse")
    with pytest.raises(AdapterRequired, match="m3db train OUT --model PATH"):
        HFMemoryModel.from_pretrained(tmp_path / "not-loaded-first", memory_mode="sparse")
    with pytest.raises(ValueError, match="reads the sparse mode: pass memory_mode='sparse'"):
        HFMemoryModel(hf, tok, adapter=saved / "adapter.safetensors")
    with pytest.raises(FileNotFoundError, match="no reader adapter at"):
        HFMemoryModel.from_pretrained(saved / "llama", memory_mode="sparse", adapter=tmp_path / "missing.safetensors")
    assert issubclass(AdapterRequired, ValueError)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_trains_and_reads_an_adapter(tmp_path):
    hf = tiny_model("qwen2", layers=4).to("cuda", torch.bfloat16)
    m = HFMemoryModel(hf, tiny_tokenizer()).for_training(reference_length=256)
    cfg = train_mod.TrainConfig(steps=2, lr=1e-2, eval_every=2, **CFG)
    adapter = train_mod.train(m, tmp_path, cfg, progress=False, wiki=WIKI, chunk=chunk, say=lambda s: None)
    assert next(adapter.parameters()).device.type == "cpu"  # saved and returned from the CPU
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert all(math.isfinite(r["loss_memory"]) for r in rows[1:])
    sparse = HFMemoryModel(hf, tiny_tokenizer(), settings=m.settings, adapter=tmp_path / "adapter.safetensors")
    assert next(sparse.adapter.parameters()).device.type == "cuda"
    g = sparse.generate("hello", retriever=Picker(memories_of(sparse)), max_tokens=8, stop_tokens=())
    assert len(g.tokens) == 8


# -- the command line: m3db train OUT --model PATH, then build / ask --model PATH --adapter FILE ------


def bpe_tokenizer():
    """A byte-level BPE tokenizer trained here on invented-person sentences (1,024 tokens):
    the training data's references fit the sparse mode's 128 tokens, as with a real tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from m3db.model.tokenizer import tiny_tokenizer_data
    from m3db.model.train_data import invented_person, person_reference

    data = tiny_tokenizer_data()
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    corpus = (
        [person_reference(invented_person(rng)) for _ in range(300)] + REFS + list(w["text"] for w in WIKI.values())
    )
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=data.tokens[:3],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        chat_template=data.chat_template,
    )


@pytest.mark.model
def test_cli_trains_an_adapter_and_reads_with_it(tmp_path, capsys):
    from m3db.cli.main import main
    from m3db.knowledge import sources
    from m3db.knowledge.bundled import bundled_embedder

    try:
        bundled_embedder()  # build and ask embed with the bundled MiniLM
        next(iter(sources.wikipedia(limit=1)))  # training reads the bundled Wikipedia summaries
    except (m3db.DependencyError, StopIteration):
        pytest.skip("the bundled embedder or Wikipedia summaries are not installed")
    folder, run = tmp_path / "llama-tiny", tmp_path / "run"
    tok = bpe_tokenizer()
    tiny_model("llama", seed=6, layers=4, vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    args = ["train", str(run), "--model", str(folder), "--steps", "2", "--batch-size", "2", "--eval-every", "2"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steps"] == 2 and out["fingerprint"].startswith("sha256:")
    assert [json.loads(line)["step"] for line in open(run / "log.jsonl")] == [0, 1, 2]
    adapter = out["adapter"]
    mine = HFMemoryModel.from_pretrained(folder, memory_mode="sparse", adapter=adapter)
    assert mine.fingerprint == out["model_fingerprint"] and mine.adapter.fingerprint == out["fingerprint"]
    (tmp_path / "quimby.txt").write_text(" ".join(REFS))
    kb = str(tmp_path / "kb.m3db")
    build = ["build", kb, "--from", str(tmp_path / "quimby.txt"), "--model", str(folder)]
    assert main([*build, "--adapter", adapter, "--json"]) == 0
    assert '"memories_added": ' in capsys.readouterr().out
    ask = ["ask", kb, "When is the Zorblax festival?", "--model", str(folder), "--max-tokens", "4", "--json"]
    assert main([*ask, "--adapter", adapter]) == 0
    assert '"sources": [' in capsys.readouterr().out
    assert main(ask) == 1  # the dense mode of the same model does not read a sparse knowledge base
    assert "memory_layers" in capsys.readouterr().err
    # the clear refusals
    assert main(["build", str(tmp_path / "s.m3db"), "--from", str(tmp_path), "--model", str(folder), "--sparse"]) == 1
    assert "m3db train OUT --model PATH" in capsys.readouterr().err
    assert main(["ask", kb, "When?", "--adapter", adapter]) == 1
    assert "--adapter needs --model" in capsys.readouterr().err
    other = tmp_path / "other"
    tiny_model("llama", seed=7, layers=4, vocab_size=len(tok)).save_pretrained(other)
    tok.save_pretrained(other)
    assert main([*build[:-1], str(other), "--adapter", adapter]) == 1
    assert "trained on the model" in capsys.readouterr().err
