"""Feature pass: layer selection, per-token normalisation, pooling, frozen network (engine-math §2)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tiny_models import make_tiny_llama
from ebft_engine.features import (
    EMBED_METHODS,
    feature_layer_indices,
    frozen_feature_model,
    make_frozen_copy,
    num_decoder_layers,
    pool,
    pool_blocks,
    pool_with_stats,
    token_features,
)

# --------------------------------------------------------------------------------------------
# Layer indices


@pytest.mark.parametrize(
    "L, expected",
    [(16, [4, 8, 12]), (28, [7, 14, 21]), (32, [8, 16, 24])],
)
def test_default_layer_indices(L, expected):
    assert feature_layer_indices([0.25, 0.5, 0.75], L) == expected


@pytest.mark.parametrize("L", [1, 4, 16, 28, 32])
def test_layer_indices_clamped(L):
    assert feature_layer_indices([0.0], L) == [1]  # never the embeddings
    assert feature_layer_indices([1.0], L) == [L]
    assert feature_layer_indices([1.5, -0.2], L) == [L, 1]


def test_layer_indices_errors():
    with pytest.raises(ValueError, match="feature_layers"):
        feature_layer_indices([], 8)
    with pytest.raises(ValueError):
        feature_layer_indices([0.5], 0)


def test_num_decoder_layers_plain_decoder_and_peft():
    from peft import LoraConfig, get_peft_model

    model = make_tiny_llama(layers=3)
    assert num_decoder_layers(model) == 3
    assert num_decoder_layers(model.model) == 3
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert num_decoder_layers(peft_model) == 3


# --------------------------------------------------------------------------------------------
# Pooling on hand-built hidden states


def _hand_built(lengths, D=3, T=None):
    """Per-row real states h[r, i] = (r+1, i, i²) for i < ℓ_r, and the same with left padding."""
    T = T or max(lengths)
    rows = [torch.stack([torch.tensor([r + 1.0, i, i * i]) for i in range(l)]) for r, l in enumerate(lengths)]
    pad = torch.full((D,), 1e3)  # loud padding: any leak shows
    right = torch.stack([torch.cat([x, pad.expand(T - len(x), D)]) for x in rows])
    left = torch.stack([torch.cat([pad.expand(T - len(x), D), x]) for x in rows])
    m_right = torch.stack([torch.arange(T) < l for l in lengths])
    m_left = torch.stack([torch.arange(T) >= T - l for l in lengths])
    return rows, (right, m_right), (left, m_left)


@pytest.mark.parametrize("method", ["last_token", "mean_pooling", "concat"])
def test_pool_same_under_left_and_right_padding(method):
    rows, (fr, mr), (fl, ml) = _hand_built([5, 3, 8, 1])
    a = pool(fr, mr, method)
    b = pool(fl, ml, method)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a.abs() < 1e3).all()


def test_pool_values():
    rows, (fr, mr), _ = _hand_built([5, 3, 8, 1])
    last = pool(fr, mr, "last_token")
    mean = pool(fr, mr, "mean_pooling")
    for r, x in enumerate(rows):
        torch.testing.assert_close(last[r], x[-1])
        torch.testing.assert_close(mean[r], x.mean(0))


def test_concat_ranks():
    rows, (fr, mr), (fl, ml) = _hand_built([8, 5, 1, 4, 7])
    out = pool(fr, mr, "concat")
    assert out.shape == (5, 9)
    for r, x in enumerate(rows):
        l = len(x)
        expected = torch.cat([x[l // 4], x[l // 2], x[(3 * l) // 4]])
        torch.testing.assert_close(out[r], expected)
    # ranks of the real tokens, not positions: l = 8 -> 2, 4, 6; l = 5 -> 1, 2, 3; l = 1 -> 0, 0, 0
    assert out[0].view(3, 3)[:, 1].tolist() == [2.0, 4.0, 6.0]
    assert out[1].view(3, 3)[:, 1].tolist() == [1.0, 2.0, 3.0]
    assert out[2].view(3, 3)[:, 1].tolist() == [0.0, 0.0, 0.0]
    torch.testing.assert_close(out, pool(fl, ml, "concat"))


def test_concat_with_holes_in_the_mask():
    """Ranks count real tokens only, wherever they are (packed or oddly masked rows)."""
    feats = torch.arange(8.0).view(1, 8, 1)
    mask = torch.tensor([[False, True, True, False, True, True, False, True]])  # l = 5
    # real positions 1, 2, 4, 5, 7; ranks 1, 2, 3 -> positions 2, 4, 5
    assert pool(feats, mask, "concat").tolist() == [[2.0, 4.0, 5.0]]
    assert pool(feats, mask, "last_token").tolist() == [[7.0]]
    assert pool(feats, mask, "mean_pooling").item() == pytest.approx(19.0 / 5)


def test_completion_mean_and_fallback_count():
    _, (fr, mr), (fl, ml) = _hand_built([6, 4, 5])
    T = fr.shape[1]
    # completion = last 2 real tokens of row 0, none for row 1, last 3 for row 2
    comp_len = [2, 0, 3]
    lengths = [6, 4, 5]
    cr = torch.stack([(torch.arange(T) >= l - c) & (torch.arange(T) < l) for l, c in zip(lengths, comp_len)])
    cl = torch.stack([torch.arange(T) >= T - c for c in comp_len])
    out_r, n_r = pool_with_stats(fr, mr, "completion_mean", completion_mask=cr)
    out_l, n_l = pool_with_stats(fl, ml, "completion_mean", completion_mask=cl)
    assert n_r == n_l == 1
    torch.testing.assert_close(out_r, out_l)
    torch.testing.assert_close(out_r[0], fr[0, 4:6].mean(0))
    torch.testing.assert_close(out_r[1], fr[1, 3])  # fallback: last token
    torch.testing.assert_close(out_r[2], fr[2, 2:5].mean(0))
    # the completion mask is intersected with the real mask
    _, n = pool_with_stats(fr, mr, "completion_mean", completion_mask=~mr)
    assert n == 3
    with pytest.raises(ValueError, match="completion"):
        pool(fr, mr, "completion_mean")


def test_unknown_method_and_empty_rows():
    feats = torch.zeros(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError) as e:
        pool(feats, mask, "max_pooling")
    msg = str(e.value)
    assert "ebft.embed_method" in msg and all(m in msg for m in EMBED_METHODS)
    with pytest.raises(ValueError, match="ebft.embed_method"):
        pool_blocks(torch.zeros(2, 4, 3), "last")
    mask[1] = False
    with pytest.raises(ValueError, match="no real tokens"):
        pool(feats, mask, "last_token")


@pytest.mark.parametrize("G", [1, 2, 4, 7, 8])
def test_pool_blocks(G):
    x = torch.randn(2, 3, G, 5)  # [B, NB, G, D]
    torch.testing.assert_close(pool_blocks(x, "last_token"), x[..., G - 1, :])
    torch.testing.assert_close(pool_blocks(x, "mean_pooling"), x.mean(-2))
    torch.testing.assert_close(pool_blocks(x, "completion_mean"), x.mean(-2))
    c = pool_blocks(x, "concat")
    assert c.shape == (2, 3, 15)
    torch.testing.assert_close(c, torch.cat([x[..., G // 4, :], x[..., G // 2, :], x[..., 3 * G // 4, :]], -1))
    # a block is a fully real, fully completion sequence: same as pool() on it
    flat = x.reshape(-1, G, 5)
    ones = torch.ones(flat.shape[:2], dtype=torch.bool)
    for method in EMBED_METHODS:
        torch.testing.assert_close(
            pool_blocks(x, method).reshape(flat.shape[0], -1),
            pool(flat, ones, method, completion_mask=ones),
        )


# --------------------------------------------------------------------------------------------
# token_features on a tiny Llama


def _manual_features(model, ids, mask, idx):
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    return F.normalize(torch.cat([hs[i] for i in idx], -1).float(), dim=-1)


@pytest.mark.parametrize("idx", [[1, 2, 3], [2, 4], [4], [3, 1, 3]])
def test_token_features_match_hidden_states_without_lm_head(tiny_llama, idx):
    torch.manual_seed(1)
    ids = torch.randint(0, 97, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    expected = _manual_features(tiny_llama, ids, mask, idx)

    n_hooks = [len(m._forward_hooks) for m in tiny_llama.modules()]
    calls = {"lm_head": 0, "last_layer": 0}

    def counter(key):
        def hook(*_):
            calls[key] += 1
        return hook

    h1 = tiny_llama.lm_head.register_forward_hook(counter("lm_head"))
    h2 = tiny_llama.model.layers[-1].register_forward_hook(counter("last_layer"))
    try:
        with frozen_feature_model(tiny_llama) as fm:
            got = token_features(fm, ids, attention_mask=mask, layer_indices=idx)
    finally:
        h1.remove()
        h2.remove()
    assert calls["lm_head"] == 0
    if max(idx) < 4:
        assert calls["last_layer"] == 0  # stopped after the deepest selected layer
    assert got.dtype == torch.float32 and got.shape == (3, 9, 64 * len(idx))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(3, 9), rtol=1e-5, atol=1e-5)
    assert [len(m._forward_hooks) for m in tiny_llama.modules()] == n_hooks  # ours are removed


def test_token_features_4d_mask_and_position_ids(tiny_llama):
    """A 4D boolean mask (strided mode) and explicit position ids reach the decoder."""
    torch.manual_seed(2)
    B, T = 2, 7
    ids = torch.randint(0, 97, (B, T))
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    mask4 = causal.expand(B, 1, T, T).clone()
    pos = torch.arange(T).expand(B, T)
    with torch.no_grad():
        a = token_features(tiny_llama, ids, layer_indices=[2, 3])
        b = token_features(tiny_llama, ids, attention_mask=mask4, position_ids=pos, layer_indices=[2, 3])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # block-diagonal 4D mask: two independent 3- and 4-token sequences in one row, positions reset
        blk = torch.zeros(T, T, dtype=torch.bool)
        blk[:3, :3] = causal[:3, :3]
        blk[3:, 3:] = causal[:4, :4]
        pos2 = torch.tensor([0, 1, 2, 0, 1, 2, 3])
        c = token_features(tiny_llama, ids[:1], attention_mask=blk[None, None], position_ids=pos2[None],
                           layer_indices=[2, 3])
        first = token_features(tiny_llama, ids[:1, :3], layer_indices=[2, 3])
        second = token_features(tiny_llama, ids[:1, 3:], layer_indices=[2, 3])
        torch.testing.assert_close(c, torch.cat([first, second], 1), rtol=1e-5, atol=1e-5)


def test_token_features_with_cache_match_one_pass(tiny_llama):
    """Prefill then continue with the cache (the strided feature pass's reuse) == one full pass."""
    from transformers import DynamicCache

    torch.manual_seed(3)
    ids = torch.randint(0, 97, (2, 10))
    idx = [1, 3]
    with torch.no_grad():
        full = token_features(tiny_llama, ids, layer_indices=idx)
        cache = DynamicCache(config=tiny_llama.config)
        head = token_features(tiny_llama, ids[:, :6], layer_indices=idx, past_key_values=cache)
        tail = token_features(tiny_llama, ids[:, 6:], layer_indices=idx, past_key_values=cache,
                              position_ids=torch.arange(6, 10).expand(2, 4))
    torch.testing.assert_close(torch.cat([head, tail], 1), full, rtol=1e-5, atol=1e-5)


def test_token_features_rejects_bad_indices(tiny_llama):
    ids = torch.randint(0, 97, (1, 4))
    with pytest.raises(ValueError, match="outside"):
        token_features(tiny_llama, ids, layer_indices=[0, 2])
    with pytest.raises(ValueError, match="outside"):
        token_features(tiny_llama, ids, layer_indices=[5])


# --------------------------------------------------------------------------------------------
# The frozen network


def test_frozen_feature_model_peft_gives_base_features_and_restores_mode():
    from peft import LoraConfig, get_peft_model

    base = make_tiny_llama(seed=4)
    reference = copy.deepcopy(base)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"])
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: B != 0
    peft_model.train()
    torch.manual_seed(5)
    ids = torch.randint(0, 97, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :2] = 0
    idx = feature_layer_indices([0.25, 0.5, 0.75], num_decoder_layers(peft_model))
    with torch.no_grad():
        expected = token_features(reference, ids, attention_mask=mask, layer_indices=idx)

    with frozen_feature_model(peft_model) as fm:
        assert not torch.is_grad_enabled()
        assert not fm.training
        got = token_features(fm, ids, attention_mask=mask, layer_indices=idx)
        got_again = token_features(fm, ids, attention_mask=mask, layer_indices=idx)  # dropout off
    assert peft_model.training and torch.is_grad_enabled()
    assert not got.requires_grad
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, got_again, rtol=0, atol=0)

    # the adapter is back on afterwards: the trainable features differ from the base ones
    peft_model.eval()
    with torch.no_grad():
        adapted = token_features(peft_model, ids, attention_mask=mask, layer_indices=idx)
    assert (adapted - expected).abs().max() > 1e-3
    # and the base weights were never touched (no merge)
    for (n1, p1), (n2, p2) in zip(
        reference.named_parameters(),
        ((n, p) for n, p in peft_model.get_base_model().named_parameters() if "lora_" not in n),
    ):
        torch.testing.assert_close(p1, p2, rtol=0, atol=0, msg=f"{n1} vs {n2}")


def test_frozen_feature_model_restores_mode_on_error(tiny_llama):
    tiny_llama.train()
    with pytest.raises(RuntimeError, match="boom"):
        with frozen_feature_model(tiny_llama):
            assert not tiny_llama.training
            raise RuntimeError("boom")
    assert tiny_llama.training


def test_make_frozen_copy(tiny_llama):
    tiny_llama.train()
    frozen = make_frozen_copy(tiny_llama)
    assert not frozen.training
    assert all(not p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in tiny_llama.parameters())
    with torch.no_grad():
        next(tiny_llama.parameters()).add_(1.0)  # training the original does not move the copy
    assert not torch.equal(next(frozen.parameters()), next(tiny_llama.parameters()))
    ids = torch.randint(0, 97, (1, 5))
    with frozen_feature_model(frozen) as fm:
        f = token_features(fm, ids, layer_indices=[2])
    assert f.shape == (1, 5, 64)
