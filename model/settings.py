"""Memory settings: which layers read memory, how much of a reference is kept, where it sits.

Owns the knobs that the engine's memory spec records (all but the chunking ones, which only
steer generation). Must not import torch or the engine (`m3db`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

POSITION_POLICIES = ("parallel", "sequential")
MEMORY_MODES = ("dense", "sparse")
TOKEN_SELECTIONS = ("head", "layer", "layer-words", "memory-words")


@dataclass(frozen=True)
class MemorySettings:
    """How memories are written and read.

    memory_layers: decoder layers that read memory (None = every layer). The paper uses the
        first half; untrained SmolLM2 gains nothing from layers 0-14 alone (docs/decoder.md,
        design measurements), so the default is every layer ("dense", training-free).
    tokens_per_head: tokens kept per (memory layer, KV head); the paper keeps 8 of 128.
        Default 32: the design measurements (docs/decoder.md) found top-32 keeping as much of
        the gain as all tokens.
    reference_length: most tokens in one reference (paper: 128; positions are uint8).
    reference_prefix: text put before every reference when it is encoded, and read as a
        constant attention sink at every memory head (paper: `<s>Reference:`; SmolLM2's
        document separator is `<|endoftext|>`).
    position_policy: "parallel" (paper: every memory on the same span of positions right
        after the prefix; the context starts after that span) or "sequential" (memories laid
        end to end in retrieval order, ending where the context starts; used by the
        equivalence test, where one memory read this way equals prefilling its text).
    chunk_length: tokens per chunk of prompt or generation that shares one set of memories.
    memories_per_chunk: memories retrieved per chunk (paper: 5).
    token_selection: how the kept tokens are chosen, by attention received (the paper's w_j):
        "head" (the paper's, the default: each (layer, KV head) keeps its own top tokens);
        "layer" (one token set per layer, shared by its KV heads, ranked by the attention the
        layer's heads give together); "layer-words" (as "layer", but whole words are kept: a
        word ranks by its best token, and words are taken while they fit); "memory-words" (one
        set of whole words for every layer and head of the memory). Every variant keeps
        tokens_per_head tokens per head, so a memory costs the same bytes; it changes what
        is written, not how memories are read, and the memory spec does not record it
        (docs/quality.md measures the variants).
    """

    memory_layers: tuple[int, ...] | None = None
    tokens_per_head: int = 32
    reference_length: int = 128
    reference_prefix: str = "<|endoftext|>Reference:"
    position_policy: str = "parallel"
    chunk_length: int = 64
    memories_per_chunk: int = 5
    token_selection: str = "head"

    @classmethod
    def paper(cls, n_layer: int) -> "MemorySettings":
        """The paper's sparse settings: first half of the layers, 8 tokens per head."""
        return cls(memory_layers=tuple(range(n_layer // 2)), tokens_per_head=8)

    @classmethod
    def sparse(cls, n_layer: int) -> "MemorySettings":
        """m3db's sparse mode: the paper's budget (8 tokens per head, half the layers) placed on
        the upper half, where SmolLM2 reads memory (docs/decoder.md, design measurements;
        docs/adapter.md measured the first half training slower). Read through the bundled
        reader adapter."""
        return cls(memory_layers=tuple(range(n_layer - n_layer // 2, n_layer)), tokens_per_head=8)

    @classmethod
    def named(cls, mode: str, n_layer: int) -> "MemorySettings":
        """The settings of a memory mode: "dense" (every layer, 32 tokens per head, read by the
        base weights) or "sparse" (see `sparse`)."""
        if mode == "dense":
            return cls()
        if mode == "sparse":
            return cls.sparse(n_layer)
        raise ValueError(f"memory mode {mode!r} is not one of {MEMORY_MODES}")

    @classmethod
    def from_spec(cls, spec) -> "MemorySettings":
        """The settings a stored memory spec records: `spec` is any object with the spec's field
        names (the engine's MemorySpec; this module cannot import it). Chunking knobs keep their
        defaults: they steer generation, the spec does not record them."""
        return cls(
            memory_layers=tuple(spec.memory_layers),
            tokens_per_head=spec.tokens_per_head,
            reference_length=spec.reference_length,
            reference_prefix=spec.reference_prefix,
            position_policy=spec.position_policy,
        )

    def resolve(self, n_layer: int) -> "MemorySettings":
        """A copy with memory_layers made explicit and every value checked against the model."""
        layers = tuple(range(n_layer)) if self.memory_layers is None else tuple(sorted(set(self.memory_layers)))
        if not layers or layers[0] < 0 or layers[-1] >= n_layer:
            raise ValueError(f"memory_layers {self.memory_layers!r} must be non-empty and within 0..{n_layer - 1}")
        if not 1 <= self.reference_length <= 256:
            raise ValueError(f"reference_length {self.reference_length} must be 1..256 (positions are stored as uint8)")
        if not 1 <= self.tokens_per_head:
            raise ValueError(f"tokens_per_head {self.tokens_per_head} must be >= 1")
        if self.token_selection not in TOKEN_SELECTIONS:
            raise ValueError(f"token_selection {self.token_selection!r} is not one of {TOKEN_SELECTIONS}")
        if self.position_policy not in POSITION_POLICIES:
            raise ValueError(f"position_policy {self.position_policy!r} is not one of {POSITION_POLICIES}")
        if self.chunk_length < 1 or self.memories_per_chunk < 0:
            raise ValueError(
                f"chunk_length {self.chunk_length} must be >= 1 and memories_per_chunk {self.memories_per_chunk} >= 0"
            )
        return replace(self, memory_layers=layers)

    def with_(self, **changes) -> "MemorySettings":
        return replace(self, **changes)
