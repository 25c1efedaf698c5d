"""The block-parallel attention mask, dense (SDPA) and as a flex_attention BlockMask.

Reference: `shared/notes/engine-math.md` §5 (Mask) and §7. Query slot q may attend key slot k iff

1. both are document slots, k ≤ q (and k is a real token);
2. q = (s, b) is generated, k is a real document token with k < a_b
   (and k ≥ a_b − W with the opt-in sliding window W);
3. k = q (keeps every row, pads included, non-empty);
4. q = (s, b) and k = (s′, b) are generated tokens of the same block with s′ < s.

Documents never see generated tokens; blocks never see each other; pad keys are never attended
except by themselves. Both forms are built from the same per-slot vectors (is_doc, step, block,
anchor) so they cannot drift apart; the dense one by broadcasting, with no Python loop over
positions.

Running a Hugging Face model with these masks (transformers 5.x, checked on 5.24): a 4D
`attention_mask` (a [B, 1, Tq, Tk] tensor, or a flex BlockMask) is passed through to the attention
function untouched (`masking_utils._preprocess_mask_arguments` returns early for 4D masks).
With `sdpa`/`eager` a boolean mask means True = may attend. With `flex_attention` only a BlockMask
is right: a dense tensor would be *added* to the scores. `forward_with_mask` switches the
implementation to match the mask where that is safe (no autograd) and refuses where it is not.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ebft_engine.features import _cache_kwarg, _decoder, _unwrap_peft

from .layout import StridedLayout

# the decoder body (no lm_head; LoRA layers stay active) and the transformers model inside a peft
# wrapper: the feature pass's helpers, shared so both passes find the same modules
decoder_body = _decoder
_hf_model = _unwrap_peft

try:  # torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask
except ImportError:  # pragma: no cover - old torch
    BlockMask = None  # type: ignore[assignment]
    create_block_mask = None  # type: ignore[assignment]


# --------------------------------------------------------------------------------------------
# Dense


def _window(layout: StridedLayout, sliding_window: int | None) -> int | None:
    return layout.window if sliding_window is None else int(sliding_window)


def dense_block_mask(
    layout: StridedLayout,
    *,
    sliding_window: int | None = None,
    repeat: int = 1,
    length: int | None = None,
) -> Tensor:
    """The §5 mask as a boolean [B·repeat, 1, T, T] tensor (True = may attend).

    Args:
        layout: the micro-batch layout.
        sliding_window: overrides `layout.window` (None keeps it).
        repeat: rows are repeated this many times (row r·repeat + j), for the n samples per document.
        length: build only the first `length` slots (a prefix of the step-major layout is itself
            a valid layout: the naive generator's growing sequence).
    """
    T = layout.T if length is None else int(length)
    dev = layout.device
    is_doc, step, block = (v[:T] for v in layout.slot_vectors())
    anchor = layout.slot_anchor()[:, :T]  # [B, T]
    doc_real = torch.zeros(layout.B, T, dtype=torch.bool, device=dev)
    doc_real[:, : min(T, layout.S)] = layout.doc_real()[:, :T]

    q = torch.arange(T, device=dev).view(T, 1)
    k = torch.arange(T, device=dev).view(1, T)
    dq, dk = is_doc.view(T, 1), is_doc.view(1, T)
    # row-independent rules: 1 (without the pad check), 3, 4
    static_doc = dq & dk & (k <= q)
    static = (k == q) | (~dq & ~dk & (block.view(T, 1) == block.view(1, T))
                         & (step.view(1, T) < step.view(T, 1)))
    # rule 2 depends on the row's anchors; rules 1-2 need a real document key
    anc_q = anchor.view(-1, 1, T, 1)
    key_ok = doc_real.view(-1, 1, 1, T)
    gen_sees_doc = ~dq & dk & (k < anc_q)  # [B, 1, T, T]
    W = _window(layout, sliding_window)
    if W is not None:
        gen_sees_doc = gen_sees_doc & (k >= anc_q - W)
    mask = ((static_doc | gen_sees_doc) & key_ok) | static
    if repeat > 1:
        mask = mask.repeat_interleave(repeat, dim=0)
    return mask


def decode_step_mask(layout: StridedLayout, *, sliding_window: int | None = None,
                     repeat: int = 1) -> Tensor:
    """The generator's masks for every decode step at once: [B·repeat, 1, NB, S + (G−1)·NB].

    The queries are the NB tokens fed at one step (one per block); the keys are the document and
    the generated tokens fed so far, step-major. Decode step s (feeding tokens of step s − 1) uses
    the first S + s·NB key columns: document keys k < a_b (rule 2), and block b's own earlier
    tokens plus itself (rules 3-4: an identity per fed step).
    """
    S, NB, G = layout.S, layout.NB, layout.G
    dev = layout.device
    k = torch.arange(S, device=dev).view(1, 1, S)
    anc = layout.anchors.unsqueeze(-1)  # [B, NB, 1]
    doc = (k < anc) & layout.doc_real().unsqueeze(1)
    W = _window(layout, sliding_window)
    if W is not None:
        doc = doc & (k >= anc - W)
    own = torch.eye(NB, dtype=torch.bool, device=dev).repeat(1, max(G - 1, 0))
    mask = torch.cat([doc, own.unsqueeze(0).expand(layout.B, NB, own.shape[1])], dim=-1)
    mask = mask.unsqueeze(1)
    if repeat > 1:
        mask = mask.repeat_interleave(repeat, dim=0)
    return mask


# --------------------------------------------------------------------------------------------
# flex_attention


def block_mask_mod(layout: StridedLayout, *, sliding_window: int | None = None, repeat: int = 1):
    """The §5 predicate as a flex `mask_mod(b, h, q_idx, kv_idx)`.

    Per-row anchors are looked up from a [B·repeat, T] tensor; S and NB are captured as 0-d
    tensors so a new batch with other sizes does not force a recompile. Written with tensor ops
    only, so it also evaluates on broadcast index grids (the tests materialise it that way).
    """
    dev = layout.device
    anchor = layout.slot_anchor()
    real = layout.real_lengths
    if repeat > 1:
        anchor = anchor.repeat_interleave(repeat, dim=0)
        real = real.repeat_interleave(repeat, dim=0)
    S = torch.tensor(layout.S, device=dev)
    NB = torch.tensor(max(layout.NB, 1), device=dev)
    W = _window(layout, sliding_window)
    W_t = torch.tensor(W if W is not None else 0, device=dev)
    use_window = W is not None

    def mask_mod(b, h, q_idx, kv_idx):
        dq = q_idx < S
        dk = kv_idx < S
        jq = (q_idx - S).clamp(min=0)
        jk = (kv_idx - S).clamp(min=0)
        anc = anchor[b, q_idx]
        key_real = kv_idx < real[b]
        rule1 = dq & dk & (kv_idx <= q_idx)
        rule2 = ~dq & dk & (kv_idx < anc)
        if use_window:
            rule2 = rule2 & (kv_idx >= anc - W_t)
        rule4 = ~dq & ~dk & (jq % NB == jk % NB) & (jk // NB < jq // NB)
        return ((rule1 | rule2) & key_real) | (q_idx == kv_idx) | rule4

    return mask_mod


def flex_block_mask(
    layout: StridedLayout,
    *,
    sliding_window: int | None = None,
    repeat: int = 1,
    block_size: int = 128,
    compile_mask: bool | None = None,
):
    """The same mask as a flex_attention BlockMask for a batch of B·repeat rows (built for the
    batch size actually passed, not broadcast from 1).

    `compile_mask` (default: on CUDA) builds it chunk-wise under torch.compile instead of
    materialising the B×T×T grid.
    """
    if create_block_mask is None:  # pragma: no cover
        raise RuntimeError("this torch has no flex_attention (needs torch >= 2.5); set flex_attention: false")
    mask_mod = block_mask_mod(layout, sliding_window=sliding_window, repeat=repeat)
    dev = layout.device
    if compile_mask is None:
        compile_mask = torch.device(dev).type == "cuda"
    return create_block_mask(mask_mod, B=layout.B * repeat, H=None, Q_LEN=layout.T, KV_LEN=layout.T,
                             device=dev, BLOCK_SIZE=block_size, _compile=compile_mask)


def materialize_mask_mod(mask_mod, B: int, T: int, device=None) -> Tensor:
    """Evaluate a mask_mod on the full [B, 1, T, T] grid (for tests and debugging)."""
    b = torch.arange(B, device=device).view(B, 1, 1)
    q = torch.arange(T, device=device).view(1, T, 1)
    k = torch.arange(T, device=device).view(1, 1, T)
    h = torch.zeros((), dtype=torch.long, device=device)
    return mask_mod(b, h, q, k).view(B, 1, T, T)


def supports_flex(device: torch.device | str, requires_grad: bool) -> bool:
    """Whether flex_attention can run here: CUDA with or without grad; CPU forward only
    (torch's CPU flex has no backward and raises once inputs require grad)."""
    if create_block_mask is None:
        return False
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "cpu":
        return not requires_grad
    return False


# --------------------------------------------------------------------------------------------
# Running a model with a custom mask


def attn_implementation(model: nn.Module) -> str:
    return str(getattr(_hf_model(model).config, "_attn_implementation", "eager"))


@contextlib.contextmanager
def use_attn_implementation(model: nn.Module, name: str) -> Iterator[None]:
    """Temporarily switch the attention implementation (transformers reads it at call time).

    Only safe without autograd: a gradient-checkpointed layer recomputes its forward during
    backward, after this context has restored the old implementation.
    """
    hf = _hf_model(model)
    old = attn_implementation(model)
    if old == name:
        yield
        return
    if torch.is_grad_enabled() and any(p.requires_grad for p in hf.parameters()):
        raise RuntimeError(
            f"the model runs attention with {old!r} but this mask needs {name!r}; switching "
            "inside a forward with autograd breaks checkpoint recompute. Load the model with "
            f"attn_implementation={name!r} for training."
        )
    hf.set_attn_implementation(name)
    try:
        yield
    finally:
        hf.set_attn_implementation(old)


def mask_implementation(mask: Any) -> str | None:
    """The attention implementation a mask needs: flex for a BlockMask, None (sdpa or eager) for
    a dense tensor."""
    if BlockMask is not None and isinstance(mask, BlockMask):
        return "flex_attention"
    return None


@contextlib.contextmanager
def attention_for(model: nn.Module, mask: Any) -> Iterator[None]:
    """Make the model's attention implementation match `mask` for the duration."""
    need = mask_implementation(mask)
    current = attn_implementation(model)
    if need is None and current not in ("sdpa", "eager"):
        need = "sdpa"
    if need is None:
        yield
    else:
        with use_attn_implementation(model, need):
            yield


def lm_head(model: nn.Module) -> nn.Module:
    head = _hf_model(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(_hf_model(model)).__name__} has no output embeddings (lm_head)")
    return head


def forward_with_mask(
    model: nn.Module,
    input_ids: Tensor,
    position_ids: Tensor,
    mask: Any,
    *,
    body_only: bool = True,
    cache=None,
    **kw,
):
    """Run `model` on `input_ids` with explicit position ids and a prepared 4D mask.

    `mask` is a dense boolean [B, 1, Tq, Tk] tensor (True = may attend; run with sdpa/eager) or a
    flex BlockMask (run with flex_attention). With `body_only` (default) the decoder body runs and
    its last hidden state [B, T, H] is returned (no lm_head: callers gather the rows they need);
    otherwise the full model's output (with `.logits`). `cache` is a transformers Cache to read
    from and append to.
    """
    target = decoder_body(model) if body_only else model
    kwargs = dict(kw)
    if cache is not None:
        kwargs[_cache_kwarg(decoder_body(model))] = cache
        kwargs.setdefault("use_cache", True)
    else:
        kwargs.setdefault("use_cache", False)
    with attention_for(model, mask):
        out = target(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **kwargs)
    if body_only:
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return out
