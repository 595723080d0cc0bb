"""A newcomer bringing their own model to the command line: every ordinary mistake ends with
`error: ...` naming the fix, a training directory is bound to the model and settings it was
started for, and an adapter trained for other settings reads with them. Tiny models
(tests/hf_tiny.py), nothing downloaded, CPU."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hf_tiny import tiny_model, tiny_tokenizer  # noqa: E402

import m3db  # noqa: E402
from m3db.bindings.transformers import HFMemoryModel  # noqa: E402
from m3db.cli.main import main, own_model  # noqa: E402
from m3db.errors import InvalidInputError, SpecMismatchError  # noqa: E402
from m3db.model import train as train_mod  # noqa: E402
from m3db.model.adapter import ReaderAdapter  # noqa: E402
from m3db.model.memory_model import trained_for  # noqa: E402

WIKI = {
    f"Article {i}": {
        "title": f"Article {i}",
        "text": f"Article {i} is a small town with {i} bridges.",
        "metadata": {"description": "small town"},
    }
    for i in range(20)
}
CFG = dict(steps=2, batch_size=1, text_batch=0, warmup=1, rank=2, distractors=1, eval_questions=1, eval_texts=1)
REFS = "The Zorblax festival is held every March in the town of Quimby. Quimby lies on the river Flent."


def saved_model(folder, seed=1, family="llama", tok=None):
    tok = tok or tiny_tokenizer()
    tiny_model(family, seed=seed, layers=4, vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def quiet(text):
    return None


def for_training(seed=1, **changes):
    return HFMemoryModel(tiny_model("llama", seed=seed, layers=4), tiny_tokenizer()).for_training(
        reference_length=256, **changes
    )


def run(model, out):
    cfg = train_mod.TrainConfig(**CFG)
    return train_mod.train(model, out, cfg, progress=False, wiki=WIKI, chunk=lambda t: [t], say=quiet)


# 1. a training directory holds one model's run, in one set of memory settings


@pytest.mark.parametrize(
    "other",
    [dict(seed=2), dict(seed=1, tokens_per_head=4)],
    ids=["another-model", "other-settings"],
)
def test_a_run_is_not_resumed_for_another_model_or_settings(tmp_path, other):
    run(for_training(seed=1), tmp_path)
    state = json.loads((tmp_path / "checkpoint.json").read_text())
    assert state["model"].startswith("sha256:") and state["settings"]["tokens_per_head"] == 8
    with pytest.raises(ValueError, match="holds a run for model .* use a new directory"):
        run(for_training(**other), tmp_path)
    run(for_training(seed=1), tmp_path)  # the same model and settings resume


# 2. a damaged file, another model's tokenizer, a failing factory: `error: ...`, no traceback


def test_a_damaged_model_file_is_an_error_not_a_traceback(tmp_path, capsys):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x01" * 9)
    folder = tmp_path / "cut"
    saved_model(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    capsys.readouterr()
    for path in (junk, folder):
        assert main(["train", str(tmp_path / "run"), "--model", str(path), "--steps", "1"]) == 1
        err = capsys.readouterr().err
        assert err.count("--model") == 1 and "is the file complete?" in err and "Traceback" not in err, err


def test_a_tokenizer_from_another_model_is_refused_up_front():
    tok = tiny_tokenizer()
    tok.add_tokens([f"<extra{i}>" for i in range(9)])  # 268 tokens for a model embedding 259
    with pytest.raises(ValueError, match="268 tokens but the model embeds only 259"):
        HFMemoryModel(tiny_model("llama", layers=4), tok)


def test_a_failing_model_factory_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "my_factory.py").write_text("def load():\n    raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from m3db.cli.serve import load_model

    with pytest.raises(InvalidInputError, match=r"my_factory.load\(\) raised RuntimeError: no GPU here"):
        load_model("my_factory:load")


# 3, 4. an adapter trained for other settings reads with them; a sparse knowledge base asks for it


def test_an_adapter_reads_with_the_settings_it_was_trained_for_and_is_asked_for(tmp_path, capsys):
    from m3db.knowledge.bundled import bundled_embedder

    try:
        bundled_embedder()
    except m3db.DependencyError:  # only missing weights skip; any other failure is a failure
        pytest.skip("the bundled embedder's weights are not installed")
    folder = saved_model(tmp_path / "llama")
    m = HFMemoryModel.from_pretrained(folder).for_training(tokens_per_head=4)
    adapter = ReaderAdapter(m.decoder.cfg, base_fingerprint=m.fingerprint, rank=2, settings=trained_for(m.settings))
    path = str(tmp_path / "adapter.safetensors")
    adapter.save(path)
    assert own_model(folder, adapter=path).settings.tokens_per_head == 4
    (tmp_path / "quimby.txt").write_text(REFS)
    kb = str(tmp_path / "kb.m3db")
    assert main(["build", kb, "--from", str(tmp_path / "quimby.txt"), "--model", folder, "--adapter", path]) == 0
    ask = ["ask", kb, "When is the festival?", "--model", folder, "--max-tokens", "2"]
    assert main([*ask, "--adapter", path]) == 0
    capsys.readouterr()
    assert main(ask) == 1
    err = capsys.readouterr().err
    assert "sparse memory mode" in err and "--adapter" in err
    # m3db serve opens it the same way: with --adapter, and without it the same advice
    from m3db.cli.models import explain_mismatch
    from m3db.cli.serve import load_model, open_kb

    model, embedder = load_model(folder, path)
    with open_kb([kb], write=False, model=model, embedder=embedder) as served:
        assert served.spec.tokens_per_head == 4
    model, embedder = load_model(folder)
    with pytest.raises(SpecMismatchError) as raised:
        open_kb([kb], write=False, model=model, embedder=embedder)
    assert "sparse memory mode" in str(explain_mismatch(raised.value, kb, model, None))


# 5. nonsense training arguments are refused before anything loads


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--steps", "0"], "--steps 0"),
        (["--steps", "-3"], "--steps -3"),
        (["--eval-every", "0"], "--eval-every 0"),
        (["--batch-size", "0"], "--batch-size 0"),
        (["--layers", "3-1"], "range 3-1 is empty"),
        (["--tokens-per-head", "100000"], "--tokens-per-head 100000"),
    ],
)
def test_nonsense_training_arguments_are_refused_before_loading(tmp_path, capsys, flags, named):
    # the model path does not exist: the mistake must be named before any loading is tried
    assert main(["train", str(tmp_path / "run"), "--model", str(tmp_path / "nowhere"), *flags]) == 1
    err = capsys.readouterr().err
    assert named in err and "no model at" not in err


def test_train_config_refuses_nonsense():
    for bad in (dict(steps=0), dict(eval_every=0), dict(batch_size=0), dict(lr=0.0)):
        with pytest.raises(ValueError):
            train_mod.TrainConfig(**bad)


# 6. a base model without a chat template can be asked


def test_ask_with_a_model_without_a_chat_template(tmp_path, capsys):
    from m3db.knowledge.bundled import bundled_embedder

    try:
        bundled_embedder()
    except m3db.DependencyError:  # only missing weights skip; any other failure is a failure
        pytest.skip("the bundled embedder's weights are not installed")
    tok = tiny_tokenizer()
    tok.chat_template = None
    folder = saved_model(tmp_path / "base", tok=tok)
    (tmp_path / "quimby.txt").write_text(REFS)
    kb = str(tmp_path / "kb.m3db")
    assert main(["build", kb, "--from", str(tmp_path / "quimby.txt"), "--model", folder]) == 0
    capsys.readouterr()
    ask = ["ask", kb, "The Zorblax festival is held in", "--model", folder, "--max-tokens", "2", "--json"]
    assert main(ask) == 0
    assert "no chat template" in capsys.readouterr().err
    assert main([*ask, "--raw"]) == 0
