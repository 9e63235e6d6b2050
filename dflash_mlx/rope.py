"""Rotary embeddings for the draft, computed as transformers computes them.

mlx_lm's `initialize_rope` covers default / linear / llama3 / dynamic. Its YaRN always
rounds the correction range and derives the attention factor itself, while published
configs (gpt-oss style) set `truncate: false` or an explicit `attention_factor`; so YaRN
is built here from the transformers formula.
"""

from __future__ import annotations

import math

import mlx.core as mx
from mlx import nn
from mlx_lm.models.rope_utils import initialize_rope

from .config import DraftConfig


class YarnRoPE(nn.Module):
    def __init__(self, dims: int, base: float, scaling: dict, max_position_embeddings: int):
        super().__init__()
        factor = scaling["factor"]
        original = scaling.get("original_max_position_embeddings") or max_position_embeddings
        beta_fast = scaling.get("beta_fast") or 32
        beta_slow = scaling.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return dims * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dims - 1)
        if low == high:
            high += 0.001  # as transformers: avoid a zero-width ramp

        inv_freq_extra = 1.0 / base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)
        inv_freq_inter = inv_freq_extra / factor
        ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
        inv_freq = inv_freq_inter * ramp + inv_freq_extra * (1 - ramp)
        self._freqs = 1.0 / inv_freq

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
            attention_factor = (
                mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
            )
        self.attention_factor = float(attention_factor)
        self.dims = dims

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        # transformers scales cos and sin by the attention factor: the same as scaling x.
        if self.attention_factor != 1.0:
            x = x * self.attention_factor
        return mx.fast.rope(
            x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs
        )


def make_rope(config: DraftConfig) -> nn.Module:
    scaling = config.rope_scaling
    if scaling is not None and scaling["type"] == "yarn":
        return YarnRoPE(config.head_dim, config.rope_theta, scaling, config.max_position_embeddings)
    if scaling is not None and scaling["type"] == "llama3":
        # transformers falls back to max_position_embeddings; mlx_lm to 8192.
        scaling = {"original_max_position_embeddings": config.max_position_embeddings, **scaling}
    return initialize_rope(
        config.head_dim,
        base=config.rope_theta,
        traditional=False,
        scaling_config=scaling,
        max_position_embeddings=config.max_position_embeddings,
    )
