"""Shared fixtures: a tiny random Llama for math tests, the offline SmolLM2 folder for real-model tests."""

from __future__ import annotations

import os

import pytest

from tiny_models import make_tiny_llama  # noqa: F401  (re-exported for fixtures)

# Two cores on CI: keep torch from oversubscribing when several processes run.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture(scope="session")
def smollm2_dir():
    """Folder of the offline SmolLM2-135M-Instruct in fp32 (converted once from the GGUF)."""
    from ebft_engine.modeling import smollm2_folder

    return smollm2_folder(dtype="float32")
