"""StridedStepper.run_step on the tiny Llama: LoRA and full fine-tuning, empty batches."""

from __future__ import annotations

import math
import warnings

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
    phases: list[str] = []
    stepper.on_phase = phases.append  # what train.py turns into `phase` log records
    result = stepper.run_step(rows, step=1)
    assert phases[:3] == ["generating", "scoring", "training"] and len(phases) % 3 == 0  # per micro-batch

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
    folded = layout.fold(2)
    tokens = gt_tokens.repeat(1, 2, 1)  # both samples of every block are the ground truth
    seq = torch.cat([input_ids, gen_region(tokens, folded)], dim=1)
    gen_f, gt_f = stepper._features(seq, stepper._mask(folded), layout, folded)
    assert gen_f.shape[:2] == (4, layout.NB)  # [B·n, NB, D']
    valid = layout.valid
    torch.testing.assert_close(gen_f[::2][valid], gt_f[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gen_f[1::2][valid], gt_f[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fold", [True, False])
def test_folded_step_equals_the_n_copies_reference(monkeypatch, fold):
    """The stepper lays n samples out as n·NB blocks of one row; with the same sampled tokens its
    loss and gradients equal the straightforward layout of n copies of each document."""
    from ebft_engine.advantages import compute_advantages
    from ebft_engine.features import frozen_feature_model, pool_blocks, token_features
    from ebft_engine.rewards import compute_rewards
    from ebft_engine.strided import step as step_mod
    from ebft_engine.strided.layout import block_view, gen_region, unfold_samples
    from ebft_engine.strided.loss import ce_loss, ce_positions, gather_logprobs, rl_loss
    from ebft_engine.strided.mask import attention_for, dense_block_mask, forward_with_mask, lm_head

    n = 3
    cfg = strided_cfg(n_samples_per_prompt=n)
    model = lora_model()
    with torch.no_grad():  # LoRA B != 0 so the policy differs from the frozen feature model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    stepper = StridedStepper(cfg, model, None, "cpu", torch.float32, fold_samples=fold)
    rows = rows_of([(40, None), (31, 7)], seed=4)
    input_ids, labels, lengths, prompts = stepper.collate(rows)
    layout = stepper.make_layout(lengths, prompts, input_ids.shape[1])
    B, NB, G = layout.B, layout.NB, layout.G
    tokens_f = torch.randint(0, V, (B, n * NB, G), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(step_mod, "generate_blocks", lambda *a, **k: unfold_samples(tokens_f, n))
    metrics, _, _ = stepper._micro_step(rows, 1, torch.Generator())
    got_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    # reference: n copies of each document, row r·n + j = sample j
    e = cfg.ebft
    tokens = unfold_samples(tokens_f, n)
    rep = layout.repeat(n)
    seq = torch.cat([input_ids.repeat_interleave(n, dim=0), gen_region(tokens, layout)], dim=1)
    mask = dense_block_mask(layout, repeat=n)
    with frozen_feature_model(model) as frozen, attention_for(frozen, mask):
        feats = token_features(frozen, seq, attention_mask=mask, position_ids=rep.position_ids,
                               layer_indices=stepper.layer_indices)
    gen = pool_blocks(block_view(feats, layout), e.embed_method)
    doc = feats[::n, : layout.S]
    idx = layout.gt_positions.reshape(B, -1)
    gt = pool_blocks(doc.gather(1, idx.unsqueeze(-1).expand(B, idx.shape[1], doc.shape[-1]))
                     .view(B, NB, G, -1), e.embed_method)
    out = compute_rewards(to_groups(gen, n), gt.reshape(B * NB, -1), alignment_coef=e.alignment_coef,
                          diversity_coef=e.diversity_coef, use_whitening=e.use_whitening,
                          valid=layout.valid.reshape(-1))
    adv = from_groups(compute_advantages(out, estimator=e.advantage_estimator, alignment_coef=e.alignment_coef,
                                         diversity_coef=e.diversity_coef), B).float()
    hidden = forward_with_mask(model, seq, rep.position_ids, mask)
    logp, _ = gather_logprobs(hidden, lm_head(model), rep.pred_index, tokens, temperature=e.temperature)
    rows_ce, tgt_ce, m_ce = ce_positions(labels, lengths)
    logp_ce, _ = gather_logprobs(hidden[::n, : layout.S], lm_head(model), rows_ce, tgt_ce, temperature=1.0)
    loss = e.rl_coef * rl_loss(logp, adv, rep.valid) + e.ce_coef * ce_loss(logp_ce, m_ce)
    loss.backward()

    assert metrics["loss"] == pytest.approx(float(loss.detach()), abs=1e-5)
    assert got_grads and set(got_grads) == {k for k, p in model.named_parameters() if p.grad is not None}
    for k, g in got_grads.items():
        torch.testing.assert_close(g, model.get_parameter(k).grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 3])
def test_folded_and_copies_steps_train_alike_from_the_same_seed(n):
    """Sampling does not depend on the layout the forwards use: the same seed gives the same
    samples, metrics and gradients either way."""
    grads, metrics = [], []
    for fold in (True, False):
        model = lora_model()
        stepper = StridedStepper(strided_cfg(n_samples_per_prompt=n), model, None, "cpu", torch.float32,
                                 fold_samples=fold)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # n = 1 switches to reinforce with a warning
            result = stepper.run_step(rows_of([(40, None), (30, 10), (25, 0), (12, 3)]), step=3)
        metrics.append(result.metrics)
        grads.append({k: p.grad for k, p in model.named_parameters() if p.grad is not None})
    for key in SPEC_METRICS:
        assert metrics[0][key] == pytest.approx(metrics[1][key], abs=1e-5), key
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attn", ["flex_attention", "sdpa"])
def test_bf16_step_on_cuda_is_finite(attn):
    """The GPU path of a strided step: bf16 weights with LoRA, the flex BlockMask (or dense SDPA)
    for the feature and training forwards; every metric and every LoRA gradient finite."""
    from peft import LoraConfig, get_peft_model

    base = make_tiny_llama(attn=attn).to("cuda", torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model.train()
    stepper = StridedStepper(strided_cfg(), model, None, "cuda", torch.bfloat16)
    assert stepper.use_flex == (attn == "flex_attention")
    result = stepper.run_step(rows_of([(40, None), (30, 10), (25, 0), (12, 3)]), step=1)
    assert not result.skipped and result.n_tokens > 0
    for key in SPEC_METRICS:
        assert key in result.metrics and math.isfinite(result.metrics[key]), key
    grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in k for k in grads)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())
