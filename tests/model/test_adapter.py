"""The reader adapter: it changes reading only, never the memories written; its files are
checked; training is deterministic and resumes exactly (tiny random model, real code paths)."""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
from m3db.model import train as train_mod  # noqa: E402
from m3db.model.adapter import AdapterError, ReaderAdapter  # noqa: E402
from m3db.model.memory_model import MemoryModel, trained_for  # noqa: E402
from m3db.model.settings import MemorySettings  # noqa: E402
from m3db.model.train_data import TrainingData, eval_facts, held_out, overlap_ratio  # noqa: E402


def chunk(text):
    return [text]  # the tiny summaries are one reference each


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETTINGS = MemorySettings(memory_layers=(0, 1), tokens_per_head=8, reference_length=256)
WIKI = {
    f"Article {i}": {
        "title": f"Article {i}",
        "text": f"Article {i} is a small town in the north. It has {i} bridges and a market. "
        f"The town of Article {i} was founded by traders.",
        "metadata": {"description": "small town in the north"},
    }
    for i in range(40)
}


@pytest.fixture(scope="module")
def tiny():
    return MemoryModel.tiny(settings=SETTINGS, std=0.1)


def perturbed(model, seed=1):
    a = ReaderAdapter(
        model.decoder.cfg, base_fingerprint=model.fingerprint, rank=4, settings=trained_for(model.settings)
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return a


def test_an_untrained_adapter_changes_nothing(tiny):
    a = ReaderAdapter(tiny.decoder.cfg, base_fingerprint=tiny.fingerprint)
    ids = torch.tensor([tiny.tokenizer.encode("Where was Ada born?")])
    assert torch.equal(tiny.decoder(ids), tiny.decoder(ids, adapter=a))


def test_the_adapter_changes_reading_but_never_the_memories_written(tiny):
    with_adapter = MemoryModel(
        tiny.decoder, tiny.tokenizer, fingerprint=tiny.fingerprint, settings=SETTINGS, adapter=perturbed(tiny)
    )
    ids = torch.tensor([tiny.tokenizer.encode("Where was Ada born?")])
    assert not torch.allclose(tiny.decoder(ids), tiny.decoder(ids, adapter=with_adapter.adapter))
    a, b = tiny.encode(["Ada was born in Tarsk."])[0], with_adapter.encode(["Ada was born in Tarsk."])[0]
    assert all((a[k] == b[k]).all() for k in ("positions", "keys", "values"))
    assert with_adapter.memory_spec_fields() == tiny.memory_spec_fields()  # stored memories stay valid
    plain = tiny.generate("Hello", mode="none", max_tokens=6, stop_tokens=())
    adapted = with_adapter.generate("Hello", mode="none", max_tokens=6, stop_tokens=())
    assert plain.tokens != adapted.tokens


def test_adapter_files_round_trip_and_bad_ones_are_refused(tiny, tmp_path):
    a = perturbed(tiny)
    path = tmp_path / "a.safetensors"
    a.save(path, extra={"steps": 3})
    b = ReaderAdapter.load(path, tiny.decoder.cfg, base_fingerprint=tiny.fingerprint)
    assert b.fingerprint == a.fingerprint and b.training_info == {"steps": 3} and b.settings == a.settings
    ids = torch.tensor([tiny.tokenizer.encode("text")])
    assert torch.equal(tiny.decoder(ids, adapter=a), tiny.decoder(ids, adapter=b))
    with pytest.raises(AdapterError, match="trained on the model"):
        ReaderAdapter.load(path, tiny.decoder.cfg, base_fingerprint="sha256:" + "0" * 64)
    with pytest.raises(AdapterError, match="another model"):
        MemoryModel(tiny.decoder, tiny.tokenizer, fingerprint="other", adapter=b)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="cannot read"):
        ReaderAdapter.load(tmp_path / "cut.safetensors", tiny.decoder.cfg, base_fingerprint=tiny.fingerprint)
    from safetensors.torch import save_file

    bad = {k: v.clone() for k, v in a.state_dict().items()}
    next(iter(bad.values()))[0, 0] = float("nan")
    save_file(bad, tmp_path / "nan.safetensors", metadata={"m3db_adapter": json.dumps(a.header())})
    with pytest.raises(AdapterError, match="NaN"):
        ReaderAdapter.load(tmp_path / "nan.safetensors", tiny.decoder.cfg, base_fingerprint=tiny.fingerprint)
    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors", metadata={"m3db_adapter": json.dumps(a.header())})
    with pytest.raises(AdapterError, match="do not fit"):
        ReaderAdapter.load(tmp_path / "other.safetensors", tiny.decoder.cfg, base_fingerprint=tiny.fingerprint)
    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(AdapterError, match="header"):
        ReaderAdapter.load(tmp_path / "plain.safetensors", tiny.decoder.cfg, base_fingerprint=tiny.fingerprint)


def test_training_data_holds_out_articles_and_people(tiny):
    data = TrainingData(tiny.tokenizer, wiki=WIKI, chunk=chunk, distractors=2)
    trained = {q[2] for q in data.wiki_questions}
    assert trained and all(not held_out(t) for t in WIKI if f"What is {t}?" in trained)
    assert any(held_out(t) for t in WIKI)  # the split leaves some out of 40
    batch = data.batch(3, 6, {"fact": 1, "wiki": 1, "blank": 1})
    assert batch == data.batch(3, 6, {"fact": 1, "wiki": 1, "blank": 1})  # a step's batch is fixed
    for ex in batch:
        assert len(ex.references) == 3 and ex.answer in ex.target
        if ex.kind == "fact":
            assert ex.answer in ex.references[0]
    train_names = {ex.references[0].split(" was ")[0] for s in range(20) for ex in data.batch(s, 4, {"fact": 1})}
    eval_names = {ex.references[0].split(" was ")[0] for ex in eval_facts(tiny.tokenizer, 30)}
    assert not train_names & eval_names
    assert overlap_ratio("a b c d", "a x c d") == 0.75 and overlap_ratio("", "") == 0.0


def test_gradients_reach_the_adapter_only_and_lower_the_loss(tiny):
    import random

    data = TrainingData(tiny.tokenizer, wiki=WIKI, chunk=chunk, distractors=1)
    batch = train_mod.make_batch(tiny, data.batch(0, 2, {"fact": 1}), train_mod.MemoryEncoder(tiny), random.Random(0))
    a = ReaderAdapter(tiny.decoder.cfg, base_fingerprint=tiny.fingerprint, rank=4).train().requires_grad_(True)
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    first = float(train_mod.batch_loss(tiny, a, batch).detach())
    for _ in range(8):
        opt.zero_grad()
        train_mod.batch_loss(tiny, a, batch).backward()
        assert all(p.grad is None for p in tiny.decoder.parameters())
        opt.step()
    assert float(train_mod.batch_loss(tiny, a, batch).detach()) < 0.9 * first


def test_training_is_deterministic_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    cfg = train_mod.TrainConfig(
        steps=4,
        batch_size=2,
        text_batch=1,
        lr=5e-3,
        warmup=1,
        rank=4,
        distractors=1,
        eval_every=2,
        eval_questions=2,
        eval_texts=1,
        checkpoint_every=2,
    )
    whole = train_mod.train(tiny, tmp_path / "whole", cfg, progress=False, wiki=WIKI, chunk=chunk, say=lambda m: None)
    log = [json.loads(line) for line in open(tmp_path / "whole" / "log.jsonl")]
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4] and "eval" in log[0] and "eval" in log[-1]
    assert tiny.adapter is None and all(p.requires_grad is False for p in tiny.decoder.parameters())

    calls = {"n": 0}
    real = train_mod.batch_loss

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 5:  # step 3's memory batch (each step: a memory and a text batch)
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train_mod, "batch_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(tiny, tmp_path / "resumed", cfg, progress=False, wiki=WIKI, chunk=chunk, say=lambda m: None)
    monkeypatch.setattr(train_mod, "batch_loss", real)
    resumed = train_mod.train(
        tiny, tmp_path / "resumed", cfg, progress=False, wiki=WIKI, chunk=chunk, say=lambda m: None
    )
    assert resumed.fingerprint == whole.fingerprint
    assert open(tmp_path / "resumed" / "log.jsonl").read().count('"step": 3') == 1
    loaded = ReaderAdapter.load(
        tmp_path / "resumed" / "adapter.safetensors", tiny.decoder.cfg, base_fingerprint=tiny.fingerprint
    )
    assert loaded.fingerprint == whole.fingerprint and loaded.settings == trained_for(tiny.settings)
    with pytest.raises(ValueError, match="another configuration"):
        train_mod.train(
            tiny, tmp_path / "resumed", train_mod.TrainConfig(steps=5), progress=False, wiki=WIKI, chunk=chunk
        )
    plot = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "plot_training.py"), str(tmp_path / "whole")],
        capture_output=True,
        text=True,
    )
    assert plot.returncode == 0 and os.path.getsize(tmp_path / "whole" / "curve.png") > 1000, plot.stderr


def test_reading_practice_asks_what_only_its_entry_holds(tiny):
    data = TrainingData(tiny.tokenizer, wiki=WIKI, chunk=chunk, distractors=4)
    data.countries = [
        ("Peru", "Lima"),
        ("Chad", "N'Djamena"),
        ("Laos", "Vientiane"),
        ("Fiji", "Suva"),
        ("Oman", "Muscat"),
    ]
    counts = set()
    for step in range(30):
        for ex in data.batch(step, 4, {"read": 1, "counter": 1}):
            assert ex.kind in ("read", "counter") and ex.target.endswith(f" {ex.answer}.")
            assert ex.answer in ex.references[0]
            assert not any(ex.answer in other for other in ex.references[1:])  # distractors never answer
            if ex.kind == "counter":  # the invented capital, never the real one
                assert ex.answer not in ("Lima", "N'Djamena", "Vientiane", "Suva", "Muscat")
            counts.add(len(ex.references))
    assert counts == {1, 2, 3, 4, 5}  # 0 to 4 distractors, as inference reads 1 to 5 memories


def test_a_time_budget_stops_at_a_checkpoint_and_logs_extra_sets(tiny, tmp_path):
    cfg = train_mod.TrainConfig(
        steps=3, batch_size=2, text_batch=1, warmup=1, rank=4, distractors=1, eval_questions=2, eval_texts=1
    )
    extra = {"other": eval_facts(tiny.tokenizer, 2, seed=7, distractors=1)}
    say = []
    part = train_mod.train(
        tiny, tmp_path, cfg, progress=False, wiki=WIKI, chunk=chunk, say=say.append, eval_sets=extra, seconds=0
    )
    assert any("time budget" in m and "step 1 of 3" in m for m in say)
    assert json.loads(open(tmp_path / "checkpoint.json").read())["step"] == 1
    first = json.loads(open(tmp_path / "log.jsonl").readline())["eval"]
    assert {"other_accuracy", "other_logprob", "other_gain"} <= set(first)
    assert (
        part.fingerprint
        == ReaderAdapter.load(
            tmp_path / "adapter.safetensors", tiny.decoder.cfg, base_fingerprint=tiny.fingerprint
        ).fingerprint
    )
    whole = train_mod.train(tiny, tmp_path, cfg, progress=False, wiki=WIKI, chunk=chunk, say=say.append)
    assert json.loads(open(tmp_path / "checkpoint.json").read())["step"] == 3
    assert whole.fingerprint != part.fingerprint


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_training_on_a_gpu_follows_the_cpu(tmp_path):
    """The same run on the GPU and on the CPU: the same losses (fp32, TF32 off) and memories."""
    import copy

    cfg = train_mod.TrainConfig(
        steps=2, batch_size=2, text_batch=1, warmup=1, rank=4, distractors=1, eval_questions=2, eval_texts=1
    )
    cpu = MemoryModel.tiny(settings=SETTINGS, std=0.1)
    gpu = MemoryModel(
        copy.deepcopy(cpu.decoder).to("cuda"), cpu.tokenizer, fingerprint=cpu.fingerprint, settings=SETTINGS
    )
    a = cpu.encode(["Article 3 is a small town in the north."])[0]
    b = gpu.encode(["Article 3 is a small town in the north."])[0]
    assert (a["positions"] == b["positions"]).all() and abs(a["keys"] - b["keys"]).max() < 1e-4
    logs = []
    for model, out in ((cpu, tmp_path / "cpu"), (gpu, tmp_path / "gpu")):
        adapter = train_mod.train(model, out, cfg, progress=False, wiki=WIKI, chunk=chunk, say=lambda m: None)
        assert next(adapter.parameters()).device.type == "cpu"  # saved and returned from the CPU
        logs.append([json.loads(line) for line in open(out / "log.jsonl")])
    for r, g in zip(*logs):
        if "loss_memory" in r:
            assert abs(r["loss_memory"] - g["loss_memory"]) < 1e-3, (r, g)


def test_the_reader_has_the_adapter_merged_where_that_is_exact_enough(tiny):
    """fp32 and int8 readers carry the adapter in their attention weights (the loop applies
    none on top); int4 keeps its weights on their grid and applies the adapter on top."""
    a = perturbed(tiny)
    model = MemoryModel(tiny.decoder, tiny.tokenizer, fingerprint=tiny.fingerprint, settings=SETTINGS, adapter=a)
    ids = torch.tensor([tiny.tokenizer.encode("Article 3 is a small town in the north.")])
    with torch.no_grad():
        want = model.decoder(ids, adapter=a)
        assert model.reader is not model.decoder and model.reader_adapter is None
        assert (model.reader(ids) - want).abs().max() < 1e-4
        assert (model.reader(ids) - model.decoder(ids)).abs().max() > 1e-2  # the adapter is in it
        int8 = model.at_precision("int8")
        assert int8.reader_adapter is None
        on_top = MemoryModel(tiny.decoder, tiny.tokenizer, fingerprint=tiny.fingerprint, settings=SETTINGS)
        plain8 = on_top.at_precision("int8").reader(ids, adapter=a)
        assert (int8.reader(ids) - plain8).abs().max() < 0.05 * want.abs().max()
        int4 = model.at_precision("int4")
        assert int4.reader_adapter is a
        got4 = int4.reader(ids, adapter=int4.reader_adapter)
        assert (got4 - on_top.at_precision("int4").reader(ids, adapter=a)).abs().max() < 1e-5  # the plain int4 reader
    assert model.at_precision("int8").reader is int8.reader  # made once per precision and adapter
    assert model.with_settings(SETTINGS, adapter=None).reader is tiny.decoder  # fp32, no adapter: the weights
