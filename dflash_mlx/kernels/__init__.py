"""Block attention: Lq (1…32) queries of one block against S keys whose last Lq are the block's own.

Query i sits at absolute key position p_i = S - Lq + i.
- causal=True: query i sees keys at positions <= p_i (prefix + block keys up to itself).
- causal=False: query i sees every key (bidirectional within the block).
- window=W: additionally only keys at positions > p_i - W.

`block_attention` runs one kernel source (kernels/*.h) through mx.fast.metal_kernel on
Apple GPUs and mx.fast.cuda_kernel on NVIDIA GPUs, and mx.fast.scaled_dot_product_attention
elsewhere. The switch DFLASH_BLOCK_ATTENTION=auto|kernel|sdpa forces either path (see
attention.py). `verify_attention(model)` routes an mlx-lm target's verify forward
through the kernel (see routing.py).

`skinny_matmul`, `skinny_quantized_matmul` and `linear(module, x)` run verify-width
(1…32 rows) matmuls through one-pass kernels (matmul.py; switch DFLASH_MATMUL).
"""

import mlx.core as mx

from .attention import SWITCH_ENV, kernel_attention
from .matmul import linear, skinny_matmul, skinny_quantized_matmul
from .routing import verify_attention

__all__ = [
    "SWITCH_ENV",
    "block_attention",
    "block_mask",
    "linear",
    "skinny_matmul",
    "skinny_quantized_matmul",
    "verify_attention",
]


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
    out = kernel_attention(queries, keys, values, scale=scale, causal=causal, window=window)
    if out is not None:
        return out
    lq, s = queries.shape[2], keys.shape[2]
    if causal and window is None:
        # SDPA's "causal" aligns the queries to the last keys, as block attention does.
        mask = "causal"
    else:
        mask = block_mask(lq, s, causal, window)
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
