"""Shared fixtures: a tiny random Llama for math tests, the offline SmolLM2 folder for real-model tests."""

from __future__ import annotations

import os

import pytest

# Two cores on CI: keep torch from oversubscribing when several processes run.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


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


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def smollm2_dir():
    """Folder of the offline SmolLM2-135M-Instruct in fp32 (converted once from the GGUF)."""
    from ebft_engine.modeling import smollm2_folder

    return smollm2_folder(dtype="float32")
