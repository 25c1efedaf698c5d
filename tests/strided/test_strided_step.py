"""StridedStepper.run_step on the tiny Llama: LoRA and full fine-tuning, empty batches."""

from __future__ import annotations

import math

import pytest
import torch

from tiny_models import make_tiny_llama
from ebft_engine.config import load_config
from ebft_engine.strided.step import StridedStepper, from_groups, to_groups

V = 97
SPEC_METRICS = ("ebft/alignment", "ebft/diversity", "ebft/cfm_loss", "ebft/reward", "entropy", "loss",
                "rl_loss", "ce_loss", "n_invalid_blocks")


def strided_cfg(**ebft):
    base = {"mode": "strided", "stride": 4, "context_length": 6, "generate_max_len": 4,
            "n_samples_per_prompt": 3, "ce_coef": 0.1, "use_whitening": True, "temperature": 0.8}
    base.update(ebft)
    return load_config({
        "base_model": "builtin:smollm2-135m-instruct", "rl": "ebft", "ebft": base,
        "datasets": [{"path": "builtin:humaneval", "type": "ebft_pretrain.transform"}],
        "micro_batch_size": 2, "gradient_accumulation_steps": 2, "sequence_len": 64,
    })


def rows_of(lengths_prompts, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for ell, p in lengths_prompts:
        ids = torch.randint(1, V, (ell,), generator=g).tolist()
        row = {"input_ids": ids}
        if p is not None:  # prompt/completion row: labels -100 on the prompt
            row["prompt_length"] = p
            row["labels"] = [-100] * p + ids[p:]
        rows.append(row)
    return rows


def lora_model():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.train()
    return model


def test_groups_reshape_roundtrip():
    B, n, NB = 2, 3, 4
    x = torch.arange(B * n * NB).view(B * n, NB)  # value = row·NB + block
    g = to_groups(x, n)
    assert g.shape == (B * NB, n)
    for r in range(B):
        for b in range(NB):
            assert g[r * NB + b].tolist() == [(r * n + j) * NB + b for j in range(n)]
    assert torch.equal(from_groups(g, B), x)


def test_run_step_with_lora():
    model = lora_model()
    stepper = StridedStepper(strided_cfg(), model, None, "cpu", torch.float32)
    assert stepper.rows_per_step == 4
    assert stepper.feature_model is None  # LoRA: the same model with adapters off
    rows = rows_of([(40, None), (30, 10), (25, 0), (12, 3)])
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    result = stepper.run_step(rows, step=1)

    assert not result.skipped and result.n_tokens > 0
    for key in SPEC_METRICS:
        assert key in result.metrics and math.isfinite(result.metrics[key]), key
    assert -1.0 <= result.metrics["ebft/alignment"] <= 1.0
    assert result.metrics["n_blocks"] > 0
    assert model.training  # sampling ran in eval mode and restored train mode
    with_grad = {k for k, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in k for k in with_grad)
    assert all(torch.isfinite(model.get_parameter(k).grad).all() for k in with_grad)
    assert any(model.get_parameter(k).grad.abs().sum() > 0 for k in with_grad)
    # run_step never updates weights
    assert all(torch.equal(before[k], v) for k, v in model.named_parameters())


def test_run_step_full_finetune_uses_frozen_copy():
    model = make_tiny_llama()
    model.train()
    stepper = StridedStepper(strided_cfg(use_whitening=False, ce_coef=0.0, n_samples_per_prompt=2), model,
                             None, "cpu", torch.float32)
    assert stepper.feature_model is not None and stepper.feature_model is not model
    assert not any(p.requires_grad for p in stepper.feature_model.parameters())
    result = stepper.run_step(rows_of([(33, None), (29, None), (40, None), (20, None)], seed=1), step=2)
    assert math.isfinite(result.metrics["loss"])
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in stepper.feature_model.parameters())


def test_all_blocks_invalid_gives_zero_loss():
    model = lora_model()
    stepper = StridedStepper(strided_cfg(), model, None, "cpu", torch.float32)
    # A = C = 6, G = 4: rows need 10 real tokens for one block
    rows = rows_of([(9, None), (5, None), (7, 2), (3, None)])
    with pytest.warns(RuntimeWarning, match="no room for a block"):
        result = stepper.run_step(rows, step=1)
    assert result.skipped
    assert result.metrics["loss"] == 0.0 and result.metrics["n_empty_micro_batches"] == 2.0
    assert result.metrics["n_blocks"] == 0.0
    assert all(p.grad is None for p in model.parameters())


def test_one_empty_micro_batch_is_skipped_not_fatal():
    model = lora_model()
    stepper = StridedStepper(strided_cfg(), model, None, "cpu", torch.float32)
    rows = rows_of([(9, None), (5, None), (30, None), (22, None)])
    with pytest.warns(RuntimeWarning, match="no room for a block"):
        result = stepper.run_step(rows, step=1)
    assert not result.skipped and math.isfinite(result.metrics["loss"])
    assert result.metrics["n_empty_micro_batches"] == 1.0


@pytest.mark.parametrize("method", ["last_token", "mean_pooling", "concat"])
def test_generated_ground_truth_has_the_ground_truth_features(method):
    """If a block's sample is the ground truth itself, its features are exactly the GT's: the
    feature pass places both at the same positions with the same context."""
    from ebft_engine.strided.layout import gen_region

    model = lora_model()
    stepper = StridedStepper(strided_cfg(embed_method=method, n_samples_per_prompt=2), model, None, "cpu",
                             torch.float32)
    input_ids, labels, lengths, prompts = stepper.collate(rows_of([(40, None), (31, 7)], seed=3))
    layout = stepper.make_layout(lengths, prompts, input_ids.shape[1])
    gt_tokens = input_ids.gather(1, layout.gt_positions.view(2, -1)).view(2, layout.NB, layout.G)
    tokens = gt_tokens.repeat_interleave(2, dim=0)
    seq = torch.cat([input_ids.repeat_interleave(2, dim=0), gen_region(tokens, layout)], dim=1)
    rep = layout.repeat(2)
    gen_f, gt_f = stepper._features(seq, rep.position_ids, stepper._mask(layout), layout)
    valid = layout.valid
    torch.testing.assert_close(gen_f[::2][valid], gt_f[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gen_f[1::2][valid], gt_f[valid], atol=1e-5, rtol=1e-5)
