"""Shared bench helpers: random-weight models of real shapes, side-by-side timing, memory probes,
tables and a one-line machine description.

Every bench measures its contenders *interleaved in one run* (A, B, A, B, ...) and keeps the best
time of each: on a shared machine the load changes from second to second, so only ratios measured
side by side mean anything.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

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

# bf16 dense peak of the GPUs we report MFU against (TFLOP/s, no sparsity; SXM parts).
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


def n_params(model: torch.nn.Module, *, non_embedding: bool = True) -> int:
    """Parameter count; without the input embedding table by default (a lookup, no FLOPs). A tied
    lm_head shares that table but does matmuls, so it is added back."""
    total = sum(p.numel() for p in model.parameters())
    if not non_embedding:
        return total
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.data_ptr()
    return total if tied else total - emb.numel()


# ------------------------------------------------------------------------------------------
# command line


def add_common_args(ap: argparse.ArgumentParser, *, default_shape: str = "smollm2-135m") -> None:
    ap.add_argument("--quick", action="store_true",
                    help="small model and sizes: a 2-core CPU in under a minute")
    ap.add_argument("--model-shape", default=None,
                    help=f"{' | '.join(SHAPES)} (random weights); default tiny with --quick, "
                         f"else {default_shape}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per contender (best is kept)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 with --quick, else all cores)")


def resolve_common(args: argparse.Namespace, *, default_shape: str = "smollm2-135m"):
    """(device, dtype, shape) from the common flags; sets the CPU thread count."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA device; use --device cpu")
    name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise SystemExit(f"unknown --dtype {name!r}; use float32 or bfloat16")
    # --quick runs beside other processes (tests, CI): one thread each, because OpenMP threads
    # of an oversubscribed CPU spin at barriers and the timing measures the scheduler instead
    torch.set_num_threads(args.threads or (1 if args.quick else max(1, os.cpu_count() or 1)))
    shape = args.model_shape or ("tiny" if args.quick else default_shape)
    return device, dtype, shape


# ------------------------------------------------------------------------------------------
# measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_peak_alloc_mb(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Peak of torch CPU tensor memory allocated during `fn()` above what was live before, in MB.

    Read from the profiler's allocation events (every alloc/free, in order), so it is exact and
    repeatable, unlike sampling RSS; it costs profiler overhead, so never time this run.
    """
    from torch.profiler import ProfilerActivity, profile

    with without_profiler_lines(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type().name == "CPU"]
    events.sort()
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak / 2**20, result


@contextlib.contextmanager
def without_profiler_lines(prefix: str = "USDT:") -> Iterator[None]:
    """Drop the `USDT: ... profiler_start/profiler_stop` lines torch's profiler (kineto) writes to
    file descriptor 2 from C++ on every start and stop; no setting silences them. Everything else
    written to stderr meanwhile is passed on when the block ends."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not line.startswith(prefix))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


def cuda_peak_alloc_mb(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Peak CUDA memory allocated during `fn()` above what was allocated before, in MB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20, result


@dataclass
class Measured:
    best_s: float = float("inf")
    peak_mb: float = 0.0
    result: Any = None
    error: str | None = None


def measure_side_by_side(
    fns: dict[str, Callable[[], Any]],
    device: torch.device,
    repeats: int,
    *,
    memory: bool = True,
    warmup: int = 0,
) -> dict[str, Measured]:
    """Run each contender `warmup` times plus once more untimed (the memory probe, which also
    warms up), then `repeats` timed rounds A, B, A, B ... keeping each one's best wall time. A
    contender that raises is reported with its error instead of stopping the others (e.g. out of
    memory). Use `warmup` when the first call compiles: the probe would profile the compiler."""
    out = {name: Measured() for name in fns}
    for name, fn in fns.items():
        try:
            for _ in range(warmup):
                fn()
            gc.collect()
            if device.type == "cuda":
                out[name].peak_mb, out[name].result = cuda_peak_alloc_mb(fn)
            elif memory:
                out[name].peak_mb, out[name].result = cpu_peak_alloc_mb(fn)
            else:
                out[name].result = fn()
        except Exception as exc:  # noqa: BLE001 - a bench reports it in the table
            out[name].error = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for _ in range(repeats):
        for name, fn in fns.items():
            if out[name].error:
                continue
            gc.collect()
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            out[name].result = fn()
            sync(device)
            out[name].best_s = min(out[name].best_s, time.perf_counter() - t0)
            if device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                out[name].peak_mb = max(out[name].peak_mb, peak)
    return out


# ------------------------------------------------------------------------------------------
# reporting


def add_json_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--json", type=Path, default=None, metavar="PATH",
                    help="also write the table and every figure as JSON (scripts/gpu-check.sh reads it)")


def write_json(path: Path | None, bench: str, text: str, results: Any) -> None:
    """The bench's printed table and its figures, with the command that made them."""
    if path is None:
        return
    def plain(x: Any) -> Any:  # inf / nan are not JSON: write null
        if isinstance(x, float) and not (x == x and abs(x) != float("inf")):
            return None
        if isinstance(x, dict):
            return {str(k): plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    record = {"bench": bench, "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "machine": machine(), "table": text, "results": plain(results)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def format_table(header: list[str], rows: list[list]) -> str:
    """A plain, aligned text table (pastes into markdown as a code block)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return "-" if seconds == float("inf") else f"{seconds * 1000:.0f}"


def ratio(a: float, b: float) -> str:
    """a / b as '3.2x' ('-' when either is missing)."""
    if not (0 < a < float("inf") and 0 < b < float("inf")):
        return "-"
    return f"{a / b:.1f}x"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(*, threads: bool = True) -> str:
    """One line for the table header: CPU, threads, GPU, torch and transformers versions."""
    import transformers

    parts = [f"{cpu_name()}, {os.cpu_count()} cores"
             + (f", torch threads {torch.get_num_threads()}" if threads else "")]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name()}")
    parts.append(f"torch {torch.__version__}, transformers {transformers.__version__}")
    try:
        parts.append(f"load avg {os.getloadavg()[0]:.1f}")
    except OSError:
        pass
    return "; ".join(parts)


def gpu_peak_tflops() -> float | None:
    """The bf16 peak of the current CUDA device, if we know it."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None
