"""The tokenizer side of a transformers model, in the shape the generation loop reads.

Owns `HFTokenizer`: a Hugging Face tokenizer (any `PreTrainedTokenizerBase`) seen through the
verbs of `m3db.model.tokenizer.Tokenizer` (encode, encode_batch, decode, find, pad_id, the chat
template), so `m3db.model.generate` and `m3db.model.encoder` run unchanged over it. Must not
import the engine (`m3db`) or torch.
"""

from __future__ import annotations

from collections.abc import Sequence

# SmolLM2 and Qwen separate documents with this token; the bundled decoder's reference prefix
# starts with it, so a model that has it writes the same memories as the bundled one.
DOCUMENT_SEPARATOR = "<|endoftext|>"


class HFTokenizer:
    """Text to ids and back, and chat formatting, for one transformers tokenizer.

    Text is encoded with add_special_tokens=False everywhere: a reference is tokenized apart
    from its prefix (so positions inside it are clean) and a chat prompt's template writes its
    own BOS; control tokens written in the text stay whole.
    """

    def __init__(self, tokenizer):
        self.hf = tokenizer
        self.vocab_size = len(tokenizer)
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        # padding is masked out everywhere; it only needs to be a real id to embed
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def find(self, token: str) -> int | None:
        """The id of one whole token, or None if the vocabulary lacks it."""
        i = self.hf.convert_tokens_to_ids(token)
        unk = self.hf.unk_token_id
        if i is None or (unk is not None and i == unk and token != self.hf.unk_token):
            return None
        return int(i)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.hf(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
        """Render `[{"role": ..., "content": ...}]` with the tokenizer's own chat template."""
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; pass plain text to generate() (raw=True)")
        return self.hf.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)

    def reference_prefix(self) -> str:
        """The text put before every reference (the paper's `<s>Reference:`): the document
        separator where the vocabulary has one (SmolLM2, Qwen: the bundled decoder's prefix),
        else the BOS token (Llama 3, Mistral), then "Reference:"."""
        if self.find(DOCUMENT_SEPARATOR) is not None:
            return DOCUMENT_SEPARATOR + "Reference:"
        bos = self.hf.bos_token
        return (bos or "") + "Reference:"

    def stop_ids(self, extra: Sequence[int] = ()) -> tuple[int, ...]:
        """End-of-turn and end-of-text ids: the tokenizer's EOS, the model's generation EOS ids
        (`extra`), and the document separator where the vocabulary has one."""
        ids = {int(i) for i in extra if i is not None}
        for i in (self.eos_id, self.find(DOCUMENT_SEPARATOR)):
            if i is not None:
                ids.add(int(i))
        return tuple(sorted(ids))

    def fingerprint_bytes(self) -> bytes:
        """What identifies the tokenizer for the model fingerprint: its whole serialized form
        (vocabulary, merges, normalizer, pre-tokenizer, added tokens) when it is a fast one,
        else its vocabulary."""
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is not None:
            return backend.to_str().encode()
        return repr(sorted(self.hf.get_vocab().items())).encode()
