"""The tokenizer: a `tokenizers.Tokenizer` built from GGUF metadata, plus the chat template.

Owns text <-> token ids and chat formatting. Byte-level BPE (GPT-2 alphabet) from the file's
vocabulary and merges; control tokens (`<|im_start|>`, ...) are added whole so they are never
cut into pieces. Must not import the engine (`m3db`) or torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .gguf_loader import TokenizerData

# The GGUF `tokenizer.ggml.pre` names whose split we reproduce. llama.cpp's "smollm" (like
# "starcoder") isolates every digit, then applies the GPT-2 split; the original SmolLM2
# tokenizer.json states the same (Digits(individual_digits) then ByteLevel).
_DIGIT_SPLIT_PRES = {"smollm", "starcoder", "refact", "codeshell"}
_PLAIN_GPT2_PRES = {"default", "gpt2", "gpt-2"}


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order (as byte-level BPE spells them)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_tokenizer_data() -> TokenizerData:
    """A 259-token byte-level vocabulary (3 control tokens + 256 bytes, no merges) with
    SmolLM2's special tokens and chat template: the tokenizer of the tiny test config."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    template = (
        "{% for message in messages %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    return TokenizerData(
        model="gpt2",
        pre="smollm",
        tokens=specials + byte_alphabet(),
        token_types=[3, 3, 3] + [1] * 256,
        merges=[],
        bos_id=1,
        eos_id=2,
        pad_id=2,
        chat_template=template,
    )


class Tokenizer:
    """Text to ids and back, and chat formatting, for one GGUF vocabulary."""

    def __init__(self, data: TokenizerData):
        if data.model != "gpt2":
            raise ValueError(f"tokenizer model {data.model!r} is not supported (only byte-level BPE 'gpt2')")
        vocab = {tok: i for i, tok in enumerate(data.tokens)}
        merges = [tuple(m.split(" ", 1)) for m in data.merges]
        bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False)
        tk = HFTokenizer(bpe)
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if data.pre in _DIGIT_SPLIT_PRES:
            tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif data.pre in _PLAIN_GPT2_PRES:
            tk.pre_tokenizer = byte_level
        else:
            raise ValueError(
                f"pre-tokenizer {data.pre!r} is not supported; known: {sorted(_DIGIT_SPLIT_PRES | _PLAIN_GPT2_PRES)}"
            )
        tk.decoder = decoders.ByteLevel()
        control = [
            AddedToken(t, special=True, normalized=False) for t, ty in zip(data.tokens, data.token_types) if ty == 3
        ]
        tk.add_special_tokens(control)
        self._tk = tk
        self._data = data
        self.vocab_size = len(data.tokens)
        self.bos_id = data.bos_id
        self.eos_id = data.eos_id
        self.pad_id = data.pad_id if data.pad_id is not None else data.eos_id
        self.chat_template = data.chat_template
        self.special_ids = {i for i, ty in enumerate(data.token_types) if ty == 3}

    def token_id(self, token: str) -> int:
        """The id of one whole token, e.g. `<|im_end|>`."""
        i = self._tk.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    def find(self, token: str) -> int | None:
        """The id of one whole token, or None if the vocabulary lacks it."""
        return self._tk.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; control tokens written in the text stay whole; no BOS added
        (SmolLM2's GGUF says add_bos_token = false)."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
        """Render `[{"role": ..., "content": ...}]` with the file's own Jinja chat template.

        The template is data from the model file, so it runs in Jinja's immutable sandbox
        (as transformers does): it can format strings but not reach Python objects.
        """
        if not self.chat_template:
            raise ValueError("this model file has no chat template; pass plain text to generate()")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        tmpl = env.from_string(self.chat_template)
        bos = self._data.tokens[self.bos_id] if self.bos_id is not None else ""
        eos = self._data.tokens[self.eos_id] if self.eos_id is not None else ""
        return tmpl.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos
        )
