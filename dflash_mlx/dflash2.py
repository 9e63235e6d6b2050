"""The DFlash 2 draft model in MLX (z-lab's `DFlash2DraftModel`).

DFlash 2 keeps DFlash's layers (Qwen3-style, target features injected as extra keys and
values) and adds two things:

- Every layer wraps its attention and its MLP in a grouped dynamic causal convolution
  over the block: before the sublayer, x'[t] = sum_j (base0[j] + dyn0[t, j, g]) * x[t-j];
  after it, y'[t] = sum_j (base1[j] + dyn1[t, j, g]) * y[t-j], where base is a learned
  per-channel kernel, dyn a per-position, per-group kernel projected from the
  sublayer's (normed) input, g the channel's group and x[t-j] = 0 before the block.
- A candidate selector after the final norm: the draft keeps its top-k tokens per
  position and walks them left to right, scoring candidate c after predecessor p as
  logit(c) + <pred[p] * proj(h), succ[c]> with low-rank predecessor/successor codebooks.
  Greedy takes the best candidate; sampling draws from softmax(score / temperature), and
  that distribution (zero off the top-k) is the q rejection sampling must use.

Parameter names are the published checkpoints' own (the codebooks are stored as bare
tensors `candidate_selector.{predecessor,successor}_codebook`, not `.weight`), so weights
load without renaming. Like DFlash, the draft borrows the target's embedding and head.

The attention, MLP, binding to the target and the context cache are DFlash's own
(drafter.py), so every cache kind the decode loop uses (static caches included) works
the same for both.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx import nn
from mlx_lm.models.cache import KVCache

from .config import DraftConfig
from .drafter import MLP, Attention, DraftModel


def grouped_causal_conv(
    x: mx.array, dynamic: mx.array, base: mx.array, group_size: int
) -> mx.array:
    """y[t] = sum_j (base[j] + dynamic[t, j, g(c)]) * x[t - j], zero before the block.

    x [B, L, H]; dynamic [B, L, K, G] (per output position, tap and channel group);
    base [K, H] (per tap and channel).
    """
    B, L, H = x.shape
    taps = base.shape[0]
    y = None
    for j in range(taps):
        shifted = x if j == 0 else mx.concatenate([mx.zeros((B, j, H), x.dtype), x], 1)[:, :L]
        kernel = base[j].astype(x.dtype) + mx.repeat(dynamic[:, :, j], group_size, axis=-1)
        term = kernel * shifted
        y = term if y is None else y + term
    return y


class GroupedDynamicCausalConv(nn.Module):
    """The pair of convolutions around one sublayer (attention or MLP)."""

    def __init__(self, hidden_size: int, kernel_size: int, group_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.group_size = group_size
        self.groups = hidden_size // group_size
        # [before/after, tap, channel]
        self.base_kernel = mx.zeros((2, kernel_size, hidden_size))
        # Output laid out [before/after, tap, group], as the checkpoints store it.
        self.kernel_projection = nn.Linear(hidden_size, 2 * kernel_size * self.groups, bias=False)

    def prepare(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """The convolved sublayer input, and the dynamic kernel `finish` will apply."""
        B, L, _ = x.shape
        dynamic = self.kernel_projection(x).reshape(B, L, 2, self.kernel_size, self.groups)
        before = grouped_causal_conv(x, dynamic[:, :, 0], self.base_kernel[0], self.group_size)
        return before, dynamic[:, :, 1]

    def finish(self, y: mx.array, dynamic: mx.array) -> mx.array:
        return grouped_causal_conv(y, dynamic, self.base_kernel[1], self.group_size)


class DecoderLayer(nn.Module):
    def __init__(self, config: DraftConfig, layer_type: str):
        super().__init__()
        H = config.hidden_size
        self.self_attn = Attention(config, layer_type == "sliding_attention")
        self.mlp = MLP(H, config.intermediate_size)
        self.input_layernorm = nn.RMSNorm(H, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(H, eps=config.rms_norm_eps)
        K, G = config.conv_kernel_size, config.conv_group_size
        self.attention_conv = GroupedDynamicCausalConv(H, K, G)
        self.mlp_conv = GroupedDynamicCausalConv(H, K, G)

    def __call__(self, x, rope, cache, context_window):
        h, kernel = self.attention_conv.prepare(self.input_layernorm(x))
        h = self.self_attn(h, rope, cache, context_window)
        x = x + self.attention_conv.finish(h, kernel)
        h, kernel = self.mlp_conv.prepare(self.post_attention_layernorm(x))
        return x + self.mlp_conv.finish(self.mlp(h), kernel)


class CandidateSelector(nn.Module):
    def __init__(self, config: DraftConfig):
        super().__init__()
        V, r = config.vocab_size, config.selector_rank
        self.top_k = config.selector_top_k
        # Bare [V, rank] tensors, as stored (z-lab reads them into Embedding tables).
        self.predecessor_codebook = mx.zeros((V, r))
        self.successor_codebook = mx.zeros((V, r))
        self.hidden_projection = nn.Linear(config.hidden_size, r, bias=False)

    def __call__(
        self,
        hidden: mx.array,
        logits: mx.array,
        anchor: mx.array,
        temperature: float = 0.0,
    ) -> tuple[mx.array, mx.array, mx.array | None]:
        """Walk the top-k candidates of each position from the anchor.

        hidden [B, n, H] (final-normed), logits [B, n, V], anchor [B].
        Returns (tokens [B, n], candidates [B, n, k], log q over the candidates
        [B, n, k] float32, or None when greedy).
        """
        k = self.top_k
        candidates = mx.argpartition(-logits, k - 1, axis=-1)[..., :k].astype(mx.int32)
        unary = mx.take_along_axis(logits, candidates, axis=-1).astype(mx.float32)
        proj = self.hidden_projection(hidden).astype(mx.float32)
        # Gather the rows first: upcasting the whole [V, rank] tables would copy them.
        succ = self.successor_codebook[candidates].astype(mx.float32)  # [B, n, k, r]
        previous = anchor.astype(mx.int32)
        tokens, logq = [], []
        for i in range(hidden.shape[1]):
            context = self.predecessor_codebook[previous].astype(mx.float32) * proj[:, i]
            edges = (succ[:, i] @ context[:, :, None])[..., 0]  # [B, k]
            scores = unary[:, i] + edges
            if temperature > 0:
                row = scores / temperature
                row = row - mx.logsumexp(row, axis=-1, keepdims=True)
                choice = mx.random.categorical(row)
                logq.append(row)
            else:
                choice = mx.argmax(scores, axis=-1)
            previous = mx.take_along_axis(candidates[:, i], choice[:, None], axis=-1)[:, 0]
            tokens.append(previous)
        return (
            mx.stack(tokens, axis=1),
            candidates,
            mx.stack(logq, axis=1) if logq else None,
        )


class DFlash2DraftModel(DraftModel):
    """DraftModel's binding, context cache and forward, with DFlash 2's layers and the
    candidate selector proposing."""

    def __init__(self, config: DraftConfig):
        if not config.is_dflash2:
            raise ValueError(f"{config.architecture} config given to DFlash2DraftModel")
        super().__init__(config)
        self.layers = [DecoderLayer(config, kind) for kind in config.layer_types]
        self.candidate_selector = CandidateSelector(config)

    def select(
        self, hidden: mx.array, anchor: mx.array, temperature: float = 0.0
    ) -> tuple[mx.array, mx.array, mx.array | None]:
        """The selector over hidden [B, n, H] (block positions after the anchor)."""
        return self.candidate_selector(hidden, self.logits(hidden), anchor, temperature)

    def propose(
        self,
        anchor: mx.array,
        cache: list[KVCache],
        n: int,
        sampling: Any,
        context_window: int | None = None,
    ) -> tuple[mx.array, mx.array | None]:
        """Draft n tokens after `anchor` [1] from the cached context.

        Returns (drafted [n] int32, logq [n, V] float32 or None when greedy): logq is
        log softmax(score / temp) on the selector's candidates and -inf elsewhere,
        exactly what each drafted token was drawn from. The selector's own q uses the
        temperature only (as z-lab's); the target side applies top-p/top-k/min-p.
        """
        greedy = sampling is None or sampling.greedy
        if n == 0:  # nothing to draft (the block is the anchor alone)
            logq = None if greedy else mx.zeros((0, self.config.vocab_size), mx.float32)
            return mx.zeros((0,), mx.int32), logq
        mask = mx.full((n,), self.mask_token_id, dtype=mx.int32)
        block = mx.concatenate([anchor.reshape(1).astype(mx.int32), mask])[None]
        hidden = self(block, None, cache, context_window)[:, 1:]
        temperature = 0.0 if greedy else float(sampling.temp)
        logits = self.logits(hidden)
        tokens, candidates, logq = self.candidate_selector(
            hidden, logits, anchor.reshape(1), temperature
        )
        if logq is None:
            return tokens[0], None
        full = mx.full((n, logits.shape[-1]), -mx.inf, dtype=mx.float32)
        full = mx.put_along_axis(full, candidates[0], logq[0], axis=-1)
        return tokens[0], full
