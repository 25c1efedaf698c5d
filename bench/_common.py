"""Shared bench helpers: random-weight models of real shapes, tables, memory probes."""

from __future__ import annotations

import os

import torch

# Shapes of real architectures, random weights (no hub needed; speed does not depend on weights).
SHAPES: dict[str, dict] = {
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                     rope_theta=500000.0),
}

# bf16 dense peak of the GPUs we report MFU against (TFLOP/s, no sparsity).
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def build_model(shape: str, *, device: torch.device, dtype: torch.dtype, attn: str = "sdpa"):
    """A LlamaForCausalLM of a named shape with random weights, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise SystemExit(f"unknown --model-shape {shape!r}; choose one of {', '.join(SHAPES)}")
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=8192, attn_implementation=attn, **SHAPES[shape])
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    model.eval()
    return model


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain, aligned text table (pastes into markdown as a code block)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def peak_rss_mb(current: bool = False) -> float:
    """Resident memory of this process in MB (current, or the OS-reported peak)."""
    if current:
        with open(f"/proc/{os.getpid()}/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_peak_tflops() -> float | None:
    """The bf16 peak of the current CUDA device, if we know it."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None
