"""Block attention: Lq (1…32) queries of one block against S keys whose last Lq are the block's own.

Query i sits at absolute key position p_i = S - Lq + i.
- causal=True: query i sees keys at positions <= p_i (prefix + block keys up to itself).
- causal=False: query i sees every key (bidirectional within the block).
- window=W: additionally only keys at positions > p_i - W.
"""

from typing import Optional

import mlx.core as mx


def block_mask(lq: int, s: int, causal: bool, window: int | None) -> mx.array | None:
    """Boolean [Lq, S] visibility mask, or None when every key is visible."""
    if not causal and window is None:
        return None
    q_pos = mx.arange(s - lq, s)[:, None]
    k_pos = mx.arange(s)[None, :]
    visible = k_pos <= q_pos if causal else mx.ones((lq, s), dtype=mx.bool_)
    if window is not None:
        visible = visible & (k_pos > q_pos - window)
    return visible


def block_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    scale: float,
    causal: bool,
    window: int | None = None,
) -> mx.array:
    """queries [B, Hq, Lq, D], keys/values [B, Hkv, S, D] -> [B, Hq, Lq, D]."""
    lq, s = queries.shape[2], keys.shape[2]
    mask = block_mask(lq, s, causal, window)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


# Placeholder until the routing module lands: verify runs mlx-lm's own attention.
from contextlib import nullcontext as _nullcontext


def verify_attention(model):
    return _nullcontext()
