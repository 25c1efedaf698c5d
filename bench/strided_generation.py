"""Strided rollout generation: our KV-cached block-parallel sampler vs full recompute.

Both generators sample the same blocks from the same pre-drawn noise, so the tokens must be
identical; the table shows time and peak memory side by side, measured in one run (machines are
noisy: compare ratios, not absolute numbers across runs).

    python bench/strided_generation.py --quick          # 2-core CPU, under a minute
    python bench/strided_generation.py                  # 256..2048 tokens, G = 8
    python bench/strided_generation.py --device cuda --model-shape llama-1b --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import build_model, format_table, peak_rss_mb  # noqa: E402

from ebft_engine.strided.generate import generate_blocks, generate_blocks_naive  # noqa: E402
from ebft_engine.strided.layout import make_layout  # noqa: E402


class _RssPeak:
    """Samples this process's RSS in a thread: CPU peak memory of one call."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()

    def __enter__(self):
        self.base = peak_rss_mb(current=True)
        self.peak = self.base
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, peak_rss_mb(current=True))
            time.sleep(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def measure(fn, device: torch.device, repeats: int):
    """(best seconds, peak extra MB, result) over `repeats` runs after one warm-up."""
    fn()
    best = float("inf")
    peak = 0.0
    result = None
    for _ in range(repeats):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            result = fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
            peak = max(peak, (torch.cuda.max_memory_allocated() - base) / 2**20)
        else:
            with _RssPeak() as rss:
                t0 = time.perf_counter()
                result = fn()
                best = min(best, time.perf_counter() - t0)
            peak = max(peak, rss.peak - rss.base)
    return best, peak, result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model and lengths: a 2-core CPU in under a minute")
    ap.add_argument("--lengths", type=int, nargs="*", default=None)
    ap.add_argument("--generate-max-len", type=int, default=8)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--model-shape", default=None, help="tiny | smollm2-135m | llama-1b (random weights)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = args.model_shape or ("tiny" if args.quick else "smollm2-135m")
    lengths = args.lengths or ([128, 256, 512] if args.quick else [256, 512, 1024, 2048])
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = build_model(shape, device=device, dtype=dtype)
    vocab = model.config.vocab_size

    rows = []
    G, st = args.generate_max_len, args.stride
    for S in lengths:
        gen = torch.Generator().manual_seed(0)
        input_ids = torch.randint(0, vocab, (1, S), generator=gen).to(device)
        layout = make_layout(
            torch.tensor([S]), None, S, stride=st, context_length=st, generate_max_len=G, min_completion_prefix=0
        )
        noise = torch.rand((args.n_samples, G, layout.NB, vocab), generator=gen).to(device)

        def cached():
            return generate_blocks(model, input_ids, layout, n_samples=args.n_samples, temperature=0.6,
                                   top_p=1.0, generator=None, noise=noise)

        def naive():
            return generate_blocks_naive(model, input_ids, layout, n_samples=args.n_samples, temperature=0.6,
                                         top_p=1.0, generator=None, noise=noise)

        t_c, m_c, tok_c = measure(cached, device, repeats)
        t_n, m_n, tok_n = measure(naive, device, repeats)
        same = bool(torch.equal(tok_c.cpu(), tok_n.cpu()))
        rows.append([S, layout.NB, f"{t_c*1000:.0f}", f"{t_n*1000:.0f}", f"{t_n/t_c:.1f}x",
                     f"{m_c:.0f}", f"{m_n:.0f}", "yes" if same else "NO"])
        print(f"S={S} done", file=sys.stderr, flush=True)

    print(f"strided generation, model={shape}, device={device.type}, dtype={args.dtype}, "
          f"G={G}, stride={st}, n_samples={args.n_samples}, best of {repeats}")
    print(format_table(["seq_len", "blocks", "kv-cached ms", "recompute ms", "speed-up",
                        "kv-cached peak MB", "recompute peak MB", "same tokens"], rows))
    return 0 if all(r[-1] == "yes" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
