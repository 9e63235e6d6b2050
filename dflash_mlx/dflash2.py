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

`finish_logits` and `draft_embed_scale` are the Gemma-4 draft specifics (output
multiplier, final softcapping, embedding scale); the DFlash 1 model uses them too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx_lm.models.cache import KVCache

from .config import DraftConfig
from .kernels import block_attention
from .rope import make_rope


def finish_logits(logits: mx.array, config: DraftConfig) -> mx.array:
    """The draft's logits from the target head's output: z-lab multiplies by
    output_multiplier, then caps them softly (tanh) at final_logit_softcapping."""
    if config.output_multiplier != 1.0:
        logits = logits * config.output_multiplier
    cap = config.final_logit_softcapping
    if cap:
        logits = mx.tanh(logits / cap) * cap
    return logits


def target_embed_scale(target: nn.Module) -> float:
    """The factor the target multiplies its token embeddings by (sqrt(H) for Gemma 4,
    1 for most). The draft's block input is scaled the same way, as z-lab's MLX runtime
    (the one that runs Gemma 4 drafts) does."""
    for path in ("model", "language_model.model", "language_model", ""):
        m = target
        for name in filter(None, path.split(".")):
            m = getattr(m, name, None)
        if m is not None and hasattr(m, "embed_tokens"):
            scale = getattr(m.embed_tokens, "embed_scale", getattr(m, "embed_scale", 1.0))
            return float(scale)
    return 1.0


def draft_embed_scale(config: DraftConfig, target: nn.Module) -> float:
    """What the draft multiplies the target's raw token embeddings by."""
    return target_embed_scale(target) * config.input_embedding_scale


class Attention(nn.Module):
    def __init__(self, config: DraftConfig, layer_type: str):
        super().__init__()
        dim, d = config.hidden_size, config.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.scale = d**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * d, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * d, dim, bias=bias)
        self.q_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.k_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.causal = config.layer_causal(layer_type)
        sliding = layer_type == "sliding_attention"
        self.window = config.sliding_window if sliding else None

    def _kv(self, x: mx.array) -> tuple[mx.array, mx.array]:
        B, L, _ = x.shape
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        return self.k_norm(k).transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def add_context(self, context: mx.array, rope: nn.Module, cache: KVCache) -> None:
        k, v = self._kv(context)
        cache.update_and_fetch(rope(k, offset=cache.offset), v)

    def __call__(self, x, rope, cache: KVCache, context_window: int | None) -> mx.array:
        B, L, _ = x.shape
        start = cache.offset
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        q = rope(self.q_norm(q).transpose(0, 2, 1, 3), offset=start)
        k, v = self._kv(x)
        # The block's keys/values join the context in the cache buffer for this forward
        # only (trimmed right away): the cached context is never copied.
        k, v = cache.update_and_fetch(rope(k, offset=start), v)
        cache.trim(L)
        if context_window is not None and start > context_window:
            k = k[..., start - context_window :, :]
            v = v[..., start - context_window :, :]
        out = block_attention(q, k, v, scale=self.scale, causal=self.causal, window=self.window)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


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
        self.self_attn = Attention(config, layer_type)
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


class DFlash2DraftModel(nn.Module):
    def __init__(self, config: DraftConfig):
        super().__init__()
        if not config.is_dflash2:
            raise ValueError(f"{config.architecture} config given to DFlash2DraftModel")
        self.config = config
        H = config.hidden_size
        self.fc = nn.Linear(config.num_taps * H, H, bias=False)
        self.hidden_norm = nn.RMSNorm(H, eps=config.rms_norm_eps)
        self.layers = [DecoderLayer(config, kind) for kind in config.layer_types]
        self.norm = nn.RMSNorm(H, eps=config.rms_norm_eps)
        self.candidate_selector = CandidateSelector(config)
        self.rope = make_rope(config)
        # Bound from the target by `bind`; kept off the parameter tree.
        object.__setattr__(self, "_embed", None)
        object.__setattr__(self, "_lm_head", None)
        object.__setattr__(self, "_embed_scale", config.input_embedding_scale)

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    def bind_head(
        self,
        embed: Callable[[mx.array], mx.array],
        lm_head: Callable[[mx.array], mx.array],
        embed_scale: float = 1.0,
    ) -> DFlash2DraftModel:
        """Share the target's token embedding and LM head; `embed_scale` is the
        target's own embedding scale (the draft's input_embedding_scale comes on top)."""
        object.__setattr__(self, "_embed", embed)
        object.__setattr__(self, "_lm_head", lm_head)
        object.__setattr__(self, "_embed_scale", embed_scale * self.config.input_embedding_scale)
        return self

    def bind(self, target: nn.Module) -> DFlash2DraftModel:
        from .tap import embedding_and_head

        return self.bind_head(*embedding_and_head(target), target_embed_scale(target))

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def embed(self, ids: mx.array) -> mx.array:
        if self._embed is None:
            raise RuntimeError("draft is not bound to a target: call draft.bind(model)")
        h = self._embed(ids)
        return h * self._embed_scale if self._embed_scale != 1.0 else h

    def logits(self, hidden: mx.array) -> mx.array:
        if self._lm_head is None:
            raise RuntimeError("draft is not bound to a target: call draft.bind(model)")
        return finish_logits(self._lm_head(hidden), self.config)

    def add_context(self, context: mx.array, cache: list[KVCache]) -> None:
        """Append tapped target features [B, S, n_taps * H] to the context cache.

        Context keys/values come straight from hidden_norm(fc(features)): the
        convolutions act on the block only."""
        if context.shape[1] == 0:
            return
        ctx = self.hidden_norm(self.fc(context))
        for layer, c in zip(self.layers, cache):
            layer.self_attn.add_context(ctx, self.rope, c)

    def __call__(
        self,
        block: mx.array,
        context: mx.array | None = None,
        cache: list[KVCache] | None = None,
        context_window: int | None = None,
    ) -> mx.array:
        """Final-normed hidden states [B, L, H] of a block (ids [B, L] or embeddings
        [B, L, H]); as DraftModel.__call__."""
        cache = self.make_cache() if cache is None else cache
        if context is not None:
            self.add_context(context, cache)
        h = self.embed(block) if block.ndim == 2 else block
        for layer, c in zip(self.layers, cache):
            h = layer(h, self.rope, c, context_window)
        return self.norm(h)

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
