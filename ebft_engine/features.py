"""The frozen feature pass: which layers, how tokens are normalised, how a sequence is pooled.

Reference: `shared/notes/engine-math.md` §2. In one line: run the frozen decoder body (no lm_head),
concatenate the hidden states of K selected layers per token, L2-normalise each token's D = K·H
vector, then pool per sequence (or per strided block) from explicit masks, never from the padding
side. Everything here is plain torch; `rewards.py` turns pooled features into rewards.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EMBED_METHODS = ("last_token", "mean_pooling", "completion_mean", "concat")
"""Valid values of `ebft.embed_method`."""


# --------------------------------------------------------------------------------------------
# Layers and the frozen network


def feature_layer_indices(fractions: Sequence[float], num_layers: int) -> list[int]:
    """Indices into the `hidden_states` tuple for `ebft.feature_layers`.

    i = clamp(floor(f·L), 1, L): 0 would be the embeddings (not a feature layer), L is the output
    after the final norm. L = 32 with the default [0.25, 0.5, 0.75] gives [8, 16, 24].
    """
    if num_layers < 1:
        raise ValueError(f"the model has {num_layers} decoder layers; need at least 1")
    if len(fractions) == 0:
        raise ValueError("ebft.feature_layers is empty; give at least one fraction, e.g. [0.5]")
    out = []
    for f in fractions:
        if not math.isfinite(float(f)):
            raise ValueError(f"ebft.feature_layers: {f!r} is not a finite fraction in [0, 1]")
        out.append(min(max(math.floor(float(f) * num_layers), 1), num_layers))
    return out


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (LoRA layers stay injected), else `model`."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and is_peft_model(model):
        return get_base()
    return model


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder body of a causal LM (e.g. `LlamaModel` inside `LlamaForCausalLM`): no lm_head."""
    inner = _unwrap_peft(model)
    get_decoder = getattr(inner, "get_decoder", None)
    if callable(get_decoder):
        dec = get_decoder()
        if dec is not None:
            return dec
    dec = getattr(inner, "model", None)
    if isinstance(dec, nn.Module):
        return dec
    return inner


def _decoder_layers(decoder: nn.Module) -> nn.ModuleList | None:
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def num_decoder_layers(model: nn.Module) -> int:
    """L, the number of decoder layers (plain HF causal LM, its decoder body, or a peft wrapper)."""
    layers = _decoder_layers(_decoder(model))
    if layers is not None:
        return len(layers)
    config = getattr(_unwrap_peft(model), "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n = getattr(config, "num_hidden_layers", None)
    if n is None:
        raise ValueError(f"cannot tell how many decoder layers {type(model).__name__} has")
    return int(n)


def make_frozen_copy(model: nn.Module) -> nn.Module:
    """A separate feature network for full fine-tuning: a deep copy, eval mode, no gradients.

    Costs one more copy of the weights; LoRA runs use `frozen_feature_model(peft_model)` instead.
    """
    frozen = copy.deepcopy(model)
    frozen.eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    return frozen


@contextlib.contextmanager
def frozen_feature_model(model: nn.Module) -> Iterator[nn.Module]:
    """Use `model` as the frozen feature network: eval mode, no grad, restored on exit.

    For a peft model the adapters are switched off with `disable_adapter()`, so the features come
    from the base weights; adapters are never merged into the base weights (a bf16 merge/unmerge
    can drift them). For a full fine-tune, pass the frozen copy from `make_frozen_copy` (or a
    separate frozen checkpoint), not the trainable model.
    """
    was_training = model.training
    peft = is_peft_model(model)
    adapter_off = model.disable_adapter() if peft else contextlib.nullcontext()
    try:
        model.eval()
        with adapter_off, torch.no_grad():
            yield model
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# Token features


class _StopForward(Exception):
    """Raised from a forward hook once the deepest selected layer has run."""


def _layer_output(out) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _cache_kwarg(decoder: nn.Module) -> str:
    """`cache` in newer transformers (past_key_values is deprecated there), else `past_key_values`."""
    try:
        params = inspect.signature(decoder.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def token_features(
    model: nn.Module,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    layer_indices: Sequence[int],
    past_key_values=None,
    **model_kwargs,
) -> Tensor:
    """Per-token features: the K selected hidden states concatenated, each token L2-normalised.

    Args:
        model: the feature network (call inside `frozen_feature_model`); a causal LM, its decoder
            body or a peft wrapper. Only the decoder body runs, never the lm_head, and it stops
            after the deepest selected layer when that is not the last one.
        input_ids: [B, T] token ids.
        attention_mask: [B, T] padding mask (1 = real), or a prepared 4D mask [B, 1, T, T_kv]
            (boolean, True = may attend; strided mode's block mask, with explicit position_ids).
        position_ids: [B, T] or None (then 0..T-1, offset by the cache length).
        layer_indices: indices into the `hidden_states` tuple (`feature_layer_indices`), 1..L.
        past_key_values: optional cache; with an early stop only the layers up to the deepest
            selected one are filled, so reuse it only for feature passes with the same layers.

    Returns:
        [B, T, K·H] float32; every token's vector has unit L2 norm (engine-math §2 DECISION).
    """
    decoder = _decoder(model)
    layers = _decoder_layers(decoder)
    idx = [int(i) for i in layer_indices]
    if not idx:
        raise ValueError("layer_indices is empty")
    kwargs = dict(model_kwargs)
    kwargs.setdefault("return_dict", True)
    if past_key_values is not None:
        kwargs[_cache_kwarg(decoder)] = past_key_values
        kwargs.setdefault("use_cache", True)
    else:
        kwargs.setdefault("use_cache", False)

    if layers is None:  # exotic decoder: fall back to output_hidden_states
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=True, **kwargs)
        states = [out.hidden_states[i] for i in idx]
    else:
        L = len(layers)
        bad = [i for i in idx if not 1 <= i <= L]
        if bad:
            raise ValueError(f"layer indices {bad} outside 1..{L} (see feature_layer_indices)")
        deepest = max(idx)
        captured: dict[int, Tensor] = {}
        hooks = []

        def make_hook(i: int):
            def hook(_module, _args, output):
                captured[i] = _layer_output(output)
                if i == deepest:
                    raise _StopForward
            return hook

        # hidden_states[i] for i < L is the output of layer i-1; hidden_states[L] is after the
        # final norm (the decoder's last_hidden_state).
        for i in sorted(set(j for j in idx if j < L)):
            hooks.append(layers[i - 1].register_forward_hook(make_hook(i)))
        try:
            out = decoder(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, **kwargs)
            captured[L] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        except _StopForward:
            pass
        finally:
            for h in hooks:
                h.remove()
        states = [captured[i] for i in idx]

    feats = torch.cat([s.float() for s in states], dim=-1)
    return F.normalize(feats, p=2.0, dim=-1, eps=1e-12)


# --------------------------------------------------------------------------------------------
# Pooling


def _check_method(method: str) -> None:
    if method not in EMBED_METHODS:
        raise ValueError(
            f"ebft.embed_method: unknown pooling method {method!r}; choose one of "
            + ", ".join(EMBED_METHODS)
        )


def _gather_tokens(features: Tensor, index: Tensor) -> Tensor:
    """features [B, T, D], index [B] -> [B, D]."""
    B, _, D = features.shape
    return features.gather(1, index.view(B, 1, 1).expand(B, 1, D)).squeeze(1)


def _last_index(mask: Tensor) -> Tensor:
    """[B, T] bool -> [B] index of the last True (0 for an all-False row)."""
    T = mask.shape[-1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask, pos, torch.zeros_like(pos)).amax(-1)


def _masked_mean(features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    m = mask.to(features.dtype).unsqueeze(-1)
    count = m.sum(1)
    return (features * m).sum(1) / count.clamp_min(1.0), count.squeeze(-1)


def pool_with_stats(
    features: Tensor,
    real_mask: Tensor,
    method: str,
    completion_mask: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Pool per-token features into one vector per sequence; also count fallbacks.

    Args:
        features: [B, T, D] per-token features (`token_features`).
        real_mask: [B, T] bool, True at real (non-pad) tokens. Any padding side or layout.
        method: `last_token` (state at the last real position), `mean_pooling` (mean over real
            tokens), `completion_mean` (mean over completion tokens; a row with none falls back to
            `last_token` and is counted), `concat` (states at real-token ranks ⌊ℓ/4⌋, ⌊ℓ/2⌋,
            ⌊3ℓ/4⌋ concatenated, ℓ = number of real tokens).
        completion_mask: [B, T] bool, True at completion tokens; needed by `completion_mean`
            (intersected with real_mask).

    Returns:
        (pooled [B, D], or [B, 3·D] for `concat`; number of rows that fell back to last_token).
    """
    _check_method(method)
    if features.dim() != 3 or real_mask.shape != features.shape[:2]:
        raise ValueError(f"features must be [B, T, D] and real_mask [B, T]; got "
                         f"{tuple(features.shape)} and {tuple(real_mask.shape)}")
    m = real_mask.bool()
    if not bool(m.any(-1).all()):
        raise ValueError("pool: a row has no real tokens (real_mask all False)")

    if method == "last_token":
        return _gather_tokens(features, _last_index(m)), 0
    if method == "mean_pooling":
        return _masked_mean(features, m)[0], 0
    if method == "completion_mean":
        if completion_mask is None:
            raise ValueError("ebft.embed_method completion_mean needs a completion mask "
                             "(prompt/completion rows)")
        c = completion_mask.bool() & m
        mean, count = _masked_mean(features, c)
        empty = count == 0
        last = _gather_tokens(features, _last_index(m))
        return torch.where(empty.unsqueeze(-1), last, mean), int(empty.sum())
    # concat: positions of the real tokens in order, then the ones at ranks l/4, l/2, 3l/4
    order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)  # real positions first
    length = m.sum(-1)
    ranks = torch.stack([length // 4, length // 2, (3 * length) // 4], dim=-1)  # [B, 3]
    positions = order.gather(1, ranks)
    return torch.cat([_gather_tokens(features, positions[:, k]) for k in range(3)], dim=-1), 0


def pool(
    features: Tensor,
    real_mask: Tensor,
    method: str,
    completion_mask: Tensor | None = None,
) -> Tensor:
    """`pool_with_stats` without the fallback count: [B, T, D] -> [B, D] (or [B, 3·D] for concat)."""
    return pool_with_stats(features, real_mask, method, completion_mask)[0]


def block_offsets(G: int, method: str) -> list[int] | None:
    """Steps of a G-token block that `pool_blocks` reads: None means all G (a mean).

    Ground-truth features of a strided block use the same offsets on a_b … a_b+G−1.
    """
    _check_method(method)
    if G < 1:
        raise ValueError(f"a block needs at least one step, got G = {G}")
    if method == "last_token":
        return [G - 1]
    if method == "concat":
        return [G // 4, G // 2, (3 * G) // 4]
    return None


def pool_blocks(block_feats: Tensor, method: str) -> Tensor:
    """Pool strided blocks: [..., G, D] -> [..., D] ([..., 3·D] for concat).

    `last_token` = step G−1; `mean_pooling` and `completion_mean` = mean of the G steps (every step
    of a block is completion); `concat` = steps ⌊G/4⌋, ⌊G/2⌋, ⌊3G/4⌋ concatenated.
    """
    offsets = block_offsets(block_feats.shape[-2], method)
    if offsets is None:
        return block_feats.mean(dim=-2)
    return torch.cat([block_feats[..., o, :] for o in offsets], dim=-1)
