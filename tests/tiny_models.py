"""Tiny random models for brute-force math tests (importable as `from tiny_models import ...`:
`from conftest import` is ambiguous once sub-folders have their own conftest)."""

from __future__ import annotations


def make_tiny_llama(seed: int = 0, vocab_size: int = 97, layers: int = 4, attn: str = "sdpa"):
    """A random LlamaForCausalLM small enough for brute-force comparisons (fp32, eval mode)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attn_implementation=attn,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.eval()
    return model
