"""Shared fixtures: a tiny random Llama for math tests, the offline SmolLM2 folder for real-model tests."""

from __future__ import annotations

import os

import pytest

from tiny_models import make_tiny_llama  # noqa: F401  (re-exported for fixtures)

# One torch thread per process (the tests' own and the servers and trainers they start): on a
# 2-core machine shared with other processes, OpenMP threads spin at barriers and a step can take
# twice the CPU time with two threads as with one (measured: `ebft eval` on a tiny model at load
# average 10, 12.5 s of CPU with 2 threads, 5.4 s with 1). Set it yourself to use more.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_smollm2_dir(tmp_path_factory):
    """A tiny random Llama (4 layers, 64 wide) with SmolLM2's tokenizer and chat template, saved
    as a local model folder: the real presets and commands run on it where the model's weights are
    not what a test is about, in well under a second a step."""
    from ebft_engine.modeling import BUILTIN_SMOLLM2, load_tokenizer

    tokenizer = load_tokenizer(BUILTIN_SMOLLM2, dtype="float32")
    folder = tmp_path_factory.mktemp("tiny-smollm2-tokenizer")
    make_tiny_llama(seed=0, vocab_size=len(tokenizer), layers=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_dir():
    """Folder of the offline SmolLM2-135M-Instruct in fp32 (converted once from the GGUF)."""
    from ebft_engine.modeling import smollm2_folder

    return smollm2_folder(dtype="float32")
