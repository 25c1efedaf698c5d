"""A whole strided training step: trained tokens/s, the generation share, and on CUDA the model
FLOPs utilisation (MFU) against the GPU's bf16 peak.

One step = `StridedStepper.run_step` (KV-cached rollouts, frozen feature pass, rewards, training
forward + backward with the block mask) + AdamW update, on random documents of S tokens, the config
of `presets/smollm2-135m-strided-cpu.yaml` (G = stride = C = 8, n = 4, LoRA r 8 on every linear;
`--adapter full` for full fine-tuning) with random-weight models of real shapes. Beside it, the
generator alone (`generate_blocks` on the same micro-batch) gives generation's share of the step.
On CUDA each shape is also run with the flex BlockMask and with the dense mask, side by side.
Each mask runs with the stepper's two sample layouts side by side: `folded` (the default: the n
samples of a document are n·NB blocks of one row, the document runs once) and `copies` (n copies of
each document, the same numbers: tests/strided/test_strided_step.py); `vs copies` is the speed-up.

What the FLOPs count (the usual 2·params per token per matmul pass, attention scores excluded, so
MFU is a slight under-estimate; gradient-checkpoint recompute excluded, as MFU conventions do):

- P_body: decoder-layer parameters (LoRA included), P_head: lm_head (vocab × hidden). The forwards
  run R rows of T slots: folded R = B, T = S + n·NB·G; copies R = B·n, T = S + NB·G. Either way
  N·NB·G sampled tokens (N = B·n) go through the lm_head.
- generation: 2·P_body·(B·S prefill + (G−1)·N·NB decode tokens) + 2·P_head·N·NB·G sampled rows
- feature pass: 2·P_body·(l/L)·R·T (the frozen body stops at its deepest feature layer l of L)
- training: (4·P_body + 2·P_body_trainable)·R·T + (4 + 2·[head trains])·P_head·N·NB·G
  (forward 2P, backward 2P for activations + 2P only for weights that train: 6·P·tokens for a
  full fine-tune, ≈4·P·tokens with LoRA) + the CE rows (B·S, forward only when ce_coef = 0).

`slots/step` is R·T (`StepResult.n_tokens`); `sampled tok/s` counts the N·NB·G rollout tokens
scored per second, the same work in both layouts.

The `train` rows (folded layout, each mask) time the training forward + backward alone: the same
`run_step`, with its rollouts and feature pass replayed from a recorded step (what remains is
the reward arithmetic, negligible, and the training forward + backward; no optimizer update).
Their FLOPs are the training line above, so their MFU is that of the training pass itself.

    python bench/strided_step.py --quick                   # tiny shape, S = 128, 256: CPU < 1 min
    python bench/strided_step.py                           # tiny and smollm2-135m shapes, S = 256
    python bench/strided_step.py --device cuda --model-shapes smollm2-135m llama-1b --lengths 1024 2048
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (SHAPES, add_common_args, add_json_arg, build_model, format_table,  # noqa: E402
                     gpu_peak_tflops, machine, measure_side_by_side, ms, resolve_common, write_json)

import ebft_engine.strided.step as step_module  # noqa: E402

from ebft_engine.config import load_config  # noqa: E402
from ebft_engine.features import num_decoder_layers  # noqa: E402
from ebft_engine.modeling import apply_lora  # noqa: E402
from ebft_engine.strided.generate import generate_blocks  # noqa: E402
from ebft_engine.strided.mask import decoder_body, lm_head  # noqa: E402
from ebft_engine.strided.step import StridedStepper  # noqa: E402

PRESET = Path(__file__).resolve().parent.parent / "presets" / "smollm2-135m-strided-cpu.yaml"


def step_flops(model, stepper: StridedStepper, layout, B: int, fold: bool = True) -> dict[str, float]:
    """Model FLOPs of one micro-batch's step, by part (see the module docstring)."""
    e, n = stepper.e, stepper.n
    body, head = decoder_body(model), lm_head(model)
    layers = body.layers
    p_body = sum(p.numel() for p in layers.parameters())
    p_body_train = sum(p.numel() for p in layers.parameters() if p.requires_grad)
    p_head = head.weight.numel()
    head_trains = head.weight.requires_grad
    S, NB, G = layout.S, layout.NB, layout.G
    N = B * n
    R, T = (B, layout.fold(n).T) if fold else (N, layout.T)  # rows and slots of the forwards
    L = num_decoder_layers(model)
    depth = (max(stepper.layer_indices) / L) if stepper.layer_indices else 1.0
    gen = 2 * p_body * (B * S + (G - 1) * N * NB) + 2 * p_head * N * NB * G
    feat = 2 * p_body * depth * R * T
    ce_factor = (4 + 2 * head_trains) if float(e.ce_coef) != 0.0 else 2
    train = ((4 * p_body + 2 * p_body_train) * R * T + (4 + 2 * head_trains) * p_head * N * NB * G
             + ce_factor * p_head * B * S)
    return dict(generation=gen, features=feat, training=train, total=gen + feat + train)


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _with_attn(model, attn: str, fn):
    """Run fn with the model's attention implementation set (outside autograd, so it is safe)."""
    def run():
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        hf.set_attn_implementation(attn)
        return fn()
    return run


def train_alone(stepper: StridedStepper, docs: list[dict], optimizer) -> "callable":
    """`stepper.run_step` with its rollouts and frozen feature pass recorded on the first call and
    replayed after: the training forward + backward (and the reward arithmetic) alone."""
    recorded: dict = {}
    real_generate = step_module.generate_blocks
    real_features = stepper._features

    def generate(*args, **kwargs):
        if "tokens" not in recorded:
            recorded["tokens"] = real_generate(*args, **kwargs)
        return recorded["tokens"]

    def features(*args, **kwargs):
        if "features" not in recorded:
            recorded["features"] = real_features(*args, **kwargs)
        return recorded["features"]

    counter = [0]

    def step():
        counter[0] += 1
        step_module.generate_blocks, stepper._features = generate, features
        try:
            result = stepper.run_step(docs, counter[0])
        finally:
            step_module.generate_blocks = real_generate
            del stepper._features  # the class's method again
        optimizer.zero_grad(set_to_none=True)  # gradients made, no update: fwd + bwd alone
        return result
    return step


def run(argv: list[str] | None = None) -> tuple[str, list[dict]]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--model-shapes", nargs="+", default=None, choices=list(SHAPES),
                    help="default: tiny with --quick; tiny smollm2-135m on CPU; smollm2-135m llama-1b on CUDA")
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="document lengths S (default 128 256 with --quick, 256 on CPU, 1024 2048 on CUDA)")
    ap.add_argument("--micro-batch", type=int, default=1, help="documents per micro-batch (B)")
    ap.add_argument("--adapter", choices=["lora", "full"], default="lora")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--masks", nargs="+", choices=["dense", "flex"], default=None,
                    help="mask forms to run (default: dense on CPU, flex and dense on CUDA)")
    ap.add_argument("--layouts", nargs="+", choices=["folded", "copies"], default=["folded", "copies"],
                    help="sample layouts to run side by side (default both)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override on top of the preset, e.g. --set ebft.n_samples_per_prompt=8")
    ap.add_argument("--no-train-alone", dest="train_alone", action="store_false",
                    help="leave out the `train` rows (training forward + backward alone)")
    add_json_arg(ap)
    args = ap.parse_args(argv)

    device, dtype, _ = resolve_common(args)
    cuda = device.type == "cuda"
    shapes = args.model_shapes or (["tiny"] if args.quick or args.model_shape == "tiny" else
                                   [args.model_shape] if args.model_shape else
                                   (["smollm2-135m", "llama-1b"] if cuda else ["tiny", "smollm2-135m"]))
    lengths = args.lengths or ([128, 256] if args.quick else [1024, 2048] if cuda else [256])
    masks = args.masks or (["flex", "dense"] if cuda else ["dense"])
    if "flex" in masks and not cuda:
        raise SystemExit("--masks flex needs CUDA: flex_attention has no CPU backward")
    repeats = args.repeats or (1 if args.quick else 2)
    B = args.micro_batch
    peak = gpu_peak_tflops() if cuda else None
    if cuda and peak is None:
        print(f"note: no bf16 peak known for {torch.cuda.get_device_name()}; MFU left out "
              "(add it to bench/_common.py PEAK_BF16_TFLOPS)", file=sys.stderr)
    if "flex" in masks:  # see flex_vs_dense.py: static recompiles per length
        torch._dynamo.config.automatic_dynamic_shapes = False

    u = "TFLOP" if cuda else "GFLOP"
    header = ["model", "seq_len", "mask", "samples", "part", "T", "slots/step", "ms", "vs copies",
              "sampled tok/s", "gen ms (alone)", "gen share", f"{u}/step", f"{u}/s", "MFU"] + (
                  ["peak MB"] if cuda else [])
    results, rows = [], []
    for shape in shapes:
        for S in lengths:
            cfg = load_config(PRESET, [f"sequence_len={S}", f"micro_batch_size={B}",
                                       "gradient_accumulation_steps=1", *args.overrides])
            model = build_model(shape, device=device, dtype=dtype)
            if args.gradient_checkpointing:
                kw = {"use_reentrant": True}  # what the strided presets use (flex needs reentrant)
                if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
                    model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
                else:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
                if args.adapter == "lora":
                    model.enable_input_require_grads()
            if args.adapter == "lora":
                model = apply_lora(model, r=int(cfg.lora_r), alpha=int(cfg.lora_alpha),
                                   target_linear=bool(cfg.lora_target_linear))
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-6)
            vocab = model.config.vocab_size
            gen = torch.Generator().manual_seed(S)
            docs = [{"input_ids": torch.randint(0, vocab, (S,), generator=gen).tolist()} for _ in range(B)]

            steppers, fns = {}, {}
            contenders = [(form, kind) for form in masks for kind in args.layouts]
            for form, kind in contenders:
                attn = "flex_attention" if form == "flex" else "sdpa"
                hf = model.get_base_model() if hasattr(model, "get_base_model") else model
                hf.set_attn_implementation(attn)  # the stepper picks its mask from this
                st = StridedStepper(cfg, model, None, device, dtype, fold_samples=kind == "folded")
                steppers[form, kind] = st
                counter = [0]

                def step(st=st, counter=counter):
                    counter[0] += 1
                    res = st.run_step(docs, counter[0])
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    return res
                fns[form, kind] = _with_attn(model, attn, step)
                if args.train_alone and kind == "folded":
                    trainer = StridedStepper(cfg, model, None, device, dtype, fold_samples=True)
                    fns[form, "train"] = _with_attn(model, attn, train_alone(trainer, docs, optimizer))
            st0 = steppers[contenders[0]]
            input_ids, _, lengths_t, prompts = st0.collate(docs)
            layout = st0.make_layout(lengths_t, prompts, input_ids.shape[1])

            def generate_only():
                return generate_blocks(model, input_ids, layout, n_samples=st0.n,
                                       temperature=float(cfg.ebft.temperature), top_p=float(cfg.ebft.top_p),
                                       generator=torch.Generator(device=device).manual_seed(0))
            fns["generation"] = _with_attn(model, "sdpa", generate_only)
            m = measure_side_by_side(fns, device, repeats, memory=cuda, warmup=1 if "flex" in masks else 0)
            t_gen = m["generation"].best_s
            sampled = B * st0.n * layout.NB * layout.G
            measured = contenders + [(form, "train") for form in masks if (form, "train") in fns]
            for form, kind in measured:
                r = m[form, kind]
                part = "train" if kind == "train" else "step"
                fold = kind != "copies"
                layout_name = "folded" if fold else "copies"
                T = layout.fold(st0.n).T if fold else layout.T
                if r.error:
                    print(f"{shape} S={S} {form} {kind}: {r.error}", file=sys.stderr)
                    rows.append([shape, S, form, layout_name, part, T] + ["-"] * (len(header) - 6))
                    continue
                flops = step_flops(model, st0, layout, B, fold=fold)
                work = flops["training"] if part == "train" else flops["total"]
                n_tok = r.result.n_tokens
                tflops = work / r.best_s / 1e12
                mfu_value = 100 * tflops / peak if peak else None
                mfu = f"{mfu_value:.1f}%" if peak else "-"
                other = m.get((form, "copies"))
                vs = (f"{other.best_s / r.best_s:.2f}x" if kind == "folded" and other is not None
                      and not other.error else "-")
                results.append(dict(shape=shape, S=S, mask=form, layout=layout_name, part=part, T=T,
                                    tokens=n_tok, step_s=r.best_s, tokens_per_s=sampled / r.best_s,
                                    gen_s=t_gen, tflop=work / 1e12, tflops=tflops, mfu=mfu,
                                    mfu_percent=mfu_value, peak_mb=r.peak_mb if cuda else None,
                                    vs_copies=vs))
                unit = 1e12 if cuda else 1e9  # TFLOP on a GPU, GFLOP on a CPU
                gen_cols = ([ms(t_gen), f"{100 * t_gen / r.best_s:.0f}%"] if part == "step" else ["-", "-"])
                rows.append([shape, S, form, layout_name, part, T, n_tok, ms(r.best_s), vs,
                             f"{sampled / r.best_s:,.0f}", *gen_cols,
                             _num(work / unit), _num(work / r.best_s / unit), mfu]
                            + ([f"{r.peak_mb:,.0f}"] if cuda else []))
            print(f"{shape} S={S} done", file=sys.stderr, flush=True)
            del model, optimizer, steppers, fns
            if cuda:
                torch.cuda.empty_cache()

    n = load_config(PRESET, args.overrides).ebft.n_samples_per_prompt
    text = "\n".join([
        f"strided training step: device={device.type}, dtype={str(dtype).removeprefix('torch.')}, "
        f"adapter={args.adapter}, documents={B}, n_samples={n}, G=stride=C=8, "
        f"grad checkpointing={'on' if args.gradient_checkpointing else 'off'}, best of {repeats}"
        + (f", MFU vs {peak:g} TFLOP/s bf16 peak" if peak else ""),
        f"machine: {machine()}",
        format_table(header, rows),
    ])
    write_json(args.json, "strided_step", text, results)
    return text, results


def main(argv: list[str] | None = None) -> int:
    text, results = run(argv)
    print(text, flush=True)
    return 0 if results else 1


if __name__ == "__main__":
    raise SystemExit(main())
