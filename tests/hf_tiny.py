"""Tiny random-initialized transformers models of each supported family, and a byte-level
tokenizer for them: built in code, nothing downloaded (tests of m3db.bindings.transformers)."""

import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as RawTokenizer
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from m3db.model.tokenizer import tiny_tokenizer_data

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """259 tokens: SmolLM2's three control tokens, then the 256 bytes; SmolLM2's chat template."""
    data = tiny_tokenizer_data()
    vocab = {t: i for i, t in enumerate(data.tokens)}
    tk = RawTokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in data.tokens[:3]])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        chat_template=data.chat_template,
    )


def tiny_model(family: str, *, seed: int = 0, layers: int = 3, std: float = 0.15, **overrides):
    """hidden 64, `layers` layers, 4 query heads sharing 2 KV heads of 16, random weights
    (std 0.15: peaky enough attention that a memory visibly changes the logits), fp32."""
    config_cls, model_cls = FAMILIES[family]
    fields = dict(
        vocab_size=259,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=family in ("llama", "qwen3"),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    if family == "qwen3":
        fields["head_dim"] = 16
    if family == "qwen2":
        fields["attention_bias"] = True  # Qwen2's q/k/v carry biases
    fields.update(overrides)
    config = config_cls(**fields)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model
