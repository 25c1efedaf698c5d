"""Block-parallel training forward: flex_attention (BlockMask) vs SDPA with a dense boolean mask.

One strided micro-batch runs through the model: by default as the stepper lays it out, the n
samples of each document as n·NB blocks of one row (B rows of T = S + n·NB·G slots, step-major;
`--layout copies`: B·n rows, each a copy of the document and its NB·G tokens) with the engine's block mask
(`ebft_engine.strided.mask`), once per mask form, interleaved in one run. Each timing includes
building the mask, as the training step does; the mask builds alone are timed beside them.

- CUDA: forward + backward (loss = mean square of the last hidden state), bf16 by default; the
  model's attention implementation is set to match each mask before its run.
- CPU: **forward only, no grad**: torch's CPU flex_attention has no backward (it raises once inputs
  require grad), which is why strided training on CPU uses the dense mask. The first flex call
  compiles (inductor, C++); that warm-up is not timed.

Memory is the peak tensor memory allocated during the call (weights excluded); the dense column
beside it is the size of the [rows, 1, T, T] boolean mask alone. `max |diff|` compares the two
outputs (forward hidden states).

    python bench/flex_vs_dense.py --quick           # tiny model, CPU forward only: < 1 min
    python bench/flex_vs_dense.py --device cuda --model-shape llama-1b     # fwd+bwd, bf16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (add_common_args, add_json_arg, build_model, format_table, machine,  # noqa: E402
                     measure_side_by_side, ms, ratio, resolve_common, write_json)

from ebft_engine.strided.layout import gen_region, make_layout  # noqa: E402
from ebft_engine.strided.mask import (dense_block_mask, flex_block_mask, forward_with_mask,  # noqa: E402
                                      supports_flex)

QUICK_LENGTHS = [128, 256, 512]
FULL_LENGTHS = [256, 512, 1024, 2048]


def _hf(model):
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def run(argv: list[str] | None = None) -> tuple[str, list[dict]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help=f"document lengths S (default {QUICK_LENGTHS} with --quick, else {FULL_LENGTHS})")
    ap.add_argument("--batch", type=int, default=1, help="documents per micro-batch")
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--generate-max-len", type=int, default=8)
    ap.add_argument("--stride", type=int, default=8)
    ap.add_argument("--context-length", type=int, default=8)
    ap.add_argument("--layout", choices=["folded", "copies"], default="folded",
                    help="samples as n·NB blocks of one row (what training runs) or n copies")
    ap.add_argument("--backward", choices=["auto", "on", "off"], default="auto",
                    help="time forward+backward (auto: on CUDA only; CPU flex cannot)")
    add_json_arg(ap)
    args = ap.parse_args(argv)

    device, dtype, shape = resolve_common(args)
    lengths = args.lengths or (QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    repeats = args.repeats or (1 if args.quick else 3)
    backward = device.type == "cuda" if args.backward == "auto" else args.backward == "on"
    if backward and not supports_flex(device, requires_grad=True):
        raise SystemExit(f"flex_attention has no backward on {device.type}; use --backward off")
    if not supports_flex(device, requires_grad=False):
        raise SystemExit("this torch has no flex_attention (needs torch >= 2.5)")
    # transformers compiles flex_attention with torch.compile defaults: the second sequence length
    # would recompile with dynamic shapes, and torch 2.13's CPU kernel for that fails ("index out
    # of bounds: 0 <= tmp34 < cur_qSplitSize"). Static recompiles per length (what a run padded to
    # one length sees) sidestep it and time the steady state on every device.
    torch._dynamo.config.automatic_dynamic_shapes = False
    model = build_model(shape, device=device, dtype=dtype)
    model.requires_grad_(backward)
    hf = _hf(model)
    vocab = model.config.vocab_size
    n, B = args.n_samples, args.batch

    def contender(make_mask, attn: str, layout, seq, pos):
        def fn():
            mask = make_mask()
            if not backward:
                with torch.no_grad():
                    return forward_with_mask(model, seq, pos, mask).float()
            hf.set_attn_implementation(attn)  # outside autograd: forward_with_mask then matches
            try:
                out = forward_with_mask(model, seq, pos, mask)
                out.float().square().mean().backward()
            finally:
                hf.set_attn_implementation("sdpa")
            model.zero_grad(set_to_none=True)
            return out.detach().float()
        return fn

    results, rows = [], []
    for S in lengths:
        gen = torch.Generator().manual_seed(S)
        layout = make_layout(torch.full((B,), S, device=device), None, S, stride=args.stride,
                             context_length=args.context_length, generate_max_len=args.generate_max_len)
        if args.layout == "folded":  # what StridedStepper trains on
            layout, copies = layout.fold(n), 1
        else:
            copies = n
        run_layout = layout.repeat(copies)
        docs = torch.randint(0, vocab, (B, S), generator=gen).repeat_interleave(copies, dim=0)
        sampled = torch.randint(0, vocab, (B * copies, layout.NB, layout.G), generator=gen)
        seq = torch.cat([docs, gen_region(sampled, layout)], dim=1).to(device)
        pos = run_layout.position_ids
        n_rows = B * copies
        mask_mb = n_rows * layout.T * layout.T / 2**20  # one byte per bool
        m = measure_side_by_side({
            "dense": contender(lambda: dense_block_mask(layout, repeat=copies), "sdpa", layout, seq, pos),
            "flex": contender(lambda: flex_block_mask(layout, repeat=copies), "flex_attention", layout, seq, pos),
            "dense mask": lambda: dense_block_mask(layout, repeat=copies),
            "flex mask": lambda: flex_block_mask(layout, repeat=copies),
        }, device, repeats, warmup=1)
        d, f = m["dense"], m["flex"]
        dm, fm = m["dense mask"].best_s, m["flex mask"].best_s
        diff = (d.result - f.result).abs().max().item() if not (d.error or f.error) else float("nan")
        results.append(dict(S=S, T=layout.T, rows=n_rows, dense_s=d.best_s, flex_s=f.best_s,
                            dense_mask_s=dm, flex_mask_s=fm,
                            dense_mb=d.peak_mb, flex_mb=f.peak_mb, dense_mask_mb=mask_mb, max_diff=diff,
                            errors=[x.error for x in (d, f) if x.error]))
        rows.append([S, layout.T, n_rows, ms(d.best_s), ms(f.best_s), ratio(d.best_s, f.best_s), ms(dm), ms(fm),
                     f"{d.peak_mb:.0f}", f"{mask_mb:.1f}", f"{f.peak_mb:.0f}", ratio(d.peak_mb, f.peak_mb),
                     f"{diff:.1e}"])
        for x in (d, f):
            if x.error:
                print(f"S={S}: {x.error}", file=sys.stderr)
        print(f"S={S} done", file=sys.stderr, flush=True)

    what = "forward+backward" if backward else "forward only (no grad)"
    text = "\n".join([
        f"block-parallel training {what}: model={shape} (random weights), device={device.type}, "
        f"dtype={str(dtype).removeprefix('torch.')}, documents={B}, n_samples={n} ({args.layout}), "
        f"G={args.generate_max_len}, stride={args.stride}, best of {repeats}",
        f"machine: {machine()}",
        format_table(["seq_len", "T", "rows", "dense ms", "flex ms", "flex speed-up", "(dense mask ms)",
                      "(flex mask ms)", "dense peak MB",
                      "(dense mask MB)", "flex peak MB", "mem ratio", "max |diff|"], rows),
    ])
    write_json(args.json, "flex_vs_dense", text, results)
    return text, results


def main(argv: list[str] | None = None) -> int:
    text, results = run(argv)
    print(text, flush=True)
    return 0 if not any(r["errors"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
