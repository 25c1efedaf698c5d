"""engine-math §10.2: KV-cached block-parallel sampling ≡ full recompute, same pre-drawn noise."""

from __future__ import annotations

import warnings

import pytest
import torch

from tiny_models import make_tiny_llama
from ebft_engine.strided.generate import generate_blocks, generate_blocks_naive, sample_from_logits
from ebft_engine.strided.layout import make_layout, unfold_samples

V = 97


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_llama(seed=1)
    g = torch.Generator().manual_seed(3)
    S = 36
    ids = torch.randint(0, V, (3, S), generator=g)
    layout = make_layout(torch.tensor([36, 29, 17]), torch.tensor([-1, 8, 2]), S, stride=3,
                         context_length=5, generate_max_len=6, min_completion_prefix=2)
    return model, ids, layout


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 1.0), (0.6, 1.0), (0.8, 0.7)])
def test_cached_equals_naive(setup, temperature, top_p):
    model, ids, layout = setup
    n = 3
    noise = torch.rand(ids.shape[0] * n, layout.G, layout.NB, generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # τ = 0 warns about argmax
        a, la = generate_blocks(model, ids, layout, n_samples=n, temperature=temperature, top_p=top_p,
                                noise=noise, return_logits=True)
        b, lb = generate_blocks_naive(model, ids, layout, n_samples=n, temperature=temperature,
                                      top_p=top_p, noise=noise, return_logits=True)
    assert a.shape == (ids.shape[0] * n, layout.NB, layout.G)
    assert torch.equal(a, b)
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=0)
    if temperature > 0:  # the n samples of a document differ
        assert not torch.equal(a[0], a[1])
    else:
        assert torch.equal(a[0], a[1])


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (0.8, 0.7)])
def test_folded_samples_generate_what_the_repeated_documents_do(setup, temperature, top_p):
    """n samples as n·NB blocks of one row (one cache, one prefill, as the stepper runs it) give
    the same tokens and logits as n copies of each document, with the same uniforms."""
    model, ids, layout = setup
    n, B, G, NB = 3, ids.shape[0], layout.G, layout.NB
    noise = torch.rand(B * n, G, NB, generator=torch.Generator().manual_seed(7))
    # folded block j·NB + b of row r is sample j (row r·n + j) of block b
    noise_folded = noise.view(B, n, G, NB).permute(0, 2, 1, 3).reshape(B, G, n * NB)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep, l_rep = generate_blocks(model, ids, layout, n_samples=n, temperature=temperature,
                                     top_p=top_p, noise=noise, return_logits=True)
        fold, l_fold = generate_blocks(model, ids, layout.fold(n), n_samples=1, temperature=temperature,
                                       top_p=top_p, noise=noise_folded, return_logits=True)
    assert fold.shape == (B, n * NB, G)
    assert torch.equal(unfold_samples(fold, n), rep)
    torch.testing.assert_close(unfold_samples(l_fold, n), l_rep, atol=1e-4, rtol=0)


def test_generator_draws_match_and_are_reproducible(setup):
    model, ids, layout = setup
    run = lambda fn: fn(model, ids, layout, n_samples=2, temperature=0.9,  # noqa: E731
                        generator=torch.Generator().manual_seed(11))
    a, b, c = run(generate_blocks), run(generate_blocks_naive), run(generate_blocks)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_generation_restores_train_mode_and_needs_no_grad(setup):
    model, ids, layout = setup
    model.train()
    try:
        out = generate_blocks(model, ids, layout, n_samples=1, temperature=1.0)
        assert model.training and not out.requires_grad
    finally:
        model.eval()


def test_temperature_zero_warns(setup):
    model, ids, layout = setup
    with pytest.warns(UserWarning, match="argmax"):
        generate_blocks(model, ids, layout, n_samples=1, temperature=0.0)


def test_no_blocks_gives_empty_tokens():
    model = make_tiny_llama()
    ids = torch.randint(0, V, (2, 6))
    layout = make_layout(torch.tensor([6, 4]), None, 6, stride=2, context_length=4, generate_max_len=4)
    assert generate_blocks(model, ids, layout, n_samples=2, temperature=1.0).shape == (4, 0, 4)


def test_sampler_top_p_keeps_top_token_and_follows_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    # top_p tiny: only the top token survives
    u = torch.rand(200, 1)
    toks = sample_from_logits(logits.expand(200, 4).unsqueeze(1), temperature=1.0, top_p=1e-3, uniform=u)
    assert (toks == 0).all()
    # inverse-CDF sampling matches the softmax with many uniforms
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(0))
    toks = sample_from_logits(logits.expand(100_000, 4), temperature=0.5, uniform=u)
    freq = torch.bincount(toks, minlength=4).float() / 100_000
    torch.testing.assert_close(freq, torch.softmax(logits[0] / 0.5, -1), atol=5e-3, rtol=0)
    # top_p = 0.8 on p = softmax(logits): the nucleus is the smallest prefix with mass >= 0.8
    p = torch.softmax(logits[0], -1)
    toks = sample_from_logits(logits.expand(100_000, 4), temperature=1.0, top_p=0.8, uniform=u)
    keep = (p.cumsum(0) - p) < 0.8
    assert set(toks.unique().tolist()) == set(torch.nonzero(keep).flatten().tolist())


def test_cached_equals_naive_with_sliding_window():
    model = make_tiny_llama(seed=2)
    ids = torch.randint(0, V, (2, 30), generator=torch.Generator().manual_seed(4))
    layout = make_layout(torch.tensor([30, 24]), None, 30, stride=2, context_length=4, generate_max_len=5,
                         sliding_window=4)
    noise = torch.rand(4, layout.G, layout.NB, generator=torch.Generator().manual_seed(6))
    a, la = generate_blocks(model, ids, layout, n_samples=2, temperature=1.0, noise=noise, return_logits=True)
    b, lb = generate_blocks_naive(model, ids, layout, n_samples=2, temperature=1.0, noise=noise,
                                  return_logits=True)
    assert torch.equal(a, b)
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=0)
    # the window changes what blocks see (anchors past the first have > 4 tokens of prefix)
    full = make_layout(torch.tensor([30, 24]), None, 30, stride=2, context_length=4, generate_max_len=5)
    _, lf = generate_blocks(model, ids, full, n_samples=2, temperature=1.0, noise=noise, return_logits=True)
    assert not torch.allclose(la[:, 1:, 1:], lf[:, 1:, 1:], atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (0.8, 0.7)])
def test_cached_equals_naive_on_cuda_in_float32(temperature, top_p):
    """The KV-cached generator and the full recompute draw the same tokens on CUDA too (fp32: a
    bf16 logit a hair off could flip a token on a CDF edge, see docs/benchmarks.md)."""
    model = make_tiny_llama(seed=1).to("cuda")
    g = torch.Generator().manual_seed(3)
    S, n = 36, 3
    ids = torch.randint(0, V, (3, S), generator=g).cuda()
    layout = make_layout(torch.tensor([36, 29, 17], device="cuda"), torch.tensor([-1, 8, 2], device="cuda"), S,
                         stride=3, context_length=5, generate_max_len=6, min_completion_prefix=2)
    noise = torch.rand(3 * n, layout.G, layout.NB, generator=torch.Generator().manual_seed(5)).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # τ = 0 warns about argmax
        a, la = generate_blocks(model, ids, layout, n_samples=n, temperature=temperature, top_p=top_p,
                                noise=noise, return_logits=True)
        b, lb = generate_blocks_naive(model, ids, layout, n_samples=n, temperature=temperature,
                                      top_p=top_p, noise=noise, return_logits=True)
    assert a.is_cuda and a.shape == (3 * n, layout.NB, layout.G)
    assert torch.equal(a, b)
    torch.testing.assert_close(la, lb, atol=1e-3, rtol=0)
