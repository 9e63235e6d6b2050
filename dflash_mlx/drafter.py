"""The DFlash draft model in MLX: Qwen3-style layers with target-feature KV injection.

Parameter names match the published checkpoints exactly (no prefix), so weights load
without renaming. The draft has no embedding or LM head of its own: `bind` takes the
target's.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx import nn
from mlx_lm.models.cache import KVCache

from . import fused_layers
from .config import DraftConfig
from .kernels import block_attention
from .kernels.add_norm import add_then_norm
from .kernels.attention import kernel_attention
from .rope import make_rope
from .sampling import SamplingParams
from .static_cache import StaticKVCache, write_stacked


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


class Attention(nn.Module):
    def __init__(self, config: DraftConfig, sliding: bool):
        super().__init__()
        dim, d = config.hidden_size, config.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = d
        self.scale = d**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * d, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * d, dim, bias=bias)
        self.q_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        self.k_norm = nn.RMSNorm(d, eps=config.rms_norm_eps)
        # Published runtimes run sliding draft layers causally within their window;
        # full layers are bidirectional over the block.
        self.causal = config.layer_causal("sliding_attention" if sliding else "full_attention")
        self.window = config.sliding_window if sliding else None

    def _kv(self, x: mx.array) -> tuple[mx.array, mx.array]:
        B, L, _ = x.shape
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        return self.k_norm(k).transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def add_context(self, context: mx.array, rope: nn.Module, cache: KVCache) -> None:
        """Project context features to keys/values at their positions and cache them."""
        heads = fused_layers.draft_heads(self, context, rope, cache.offset, skip_q=True)
        if heads is not None:  # one kernel from the session's fused product
            write_stacked(cache, heads[1])
            return
        k, v = self._kv(context)
        cache.update_and_fetch(rope(k, offset=cache.offset), v)

    def __call__(
        self,
        x: mx.array,
        rope: nn.Module,
        cache: KVCache,
        context_window: int | None,
    ) -> mx.array:
        B, L, _ = x.shape
        start = cache.offset
        heads = fused_layers.draft_heads(self, x, rope, start)
        # The block's keys/values go into the cache buffer right after the context, are
        # attended to in place, and are dropped again (trim): the context is never copied.
        # The next add_context overwrites them with the committed positions.
        if heads is not None:  # one kernel from the session's fused product
            q, kv = heads
            k, v = write_stacked(cache, kv)
        else:
            q = self.q_proj(x).reshape(B, L, self.n_heads, -1)
            q = rope(self.q_norm(q).transpose(0, 2, 1, 3), offset=start)
            k, v = self._kv(x)
            k, v = cache.update_and_fetch(rope(k, offset=start), v)
        if isinstance(cache, StaticKVCache):  # length on the device: masked, not sliced
            # The kernel reads the valid length on the device, as the target's static
            # verify does; SDPA with the mask over the whole buffer cost 549 us a layer
            # at 16k context on the H200 (results/cycle_session7.md).
            out = None
            if context_window is None:
                valid = cache.length.valid(L)
                out = kernel_attention(
                    q,
                    k,
                    v,
                    scale=self.scale,
                    causal=self.causal,
                    window=self.window,
                    valid_length=valid,
                )
            if out is None:
                mask = cache.length.block_mask(L, self.causal, self.window, context_window)
                out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
            return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))
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


class DecoderLayer(nn.Module):
    def __init__(self, config: DraftConfig, sliding: bool):
        super().__init__()
        self.self_attn = Attention(config, sliding)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(self, x, rope, cache, context_window, normed=None, after=None):
        """x + attention + MLP. `normed`: input_layernorm(x) if already computed; with
        `after` (the norm the output goes into next) returns (output, after(output)):
        each residual add and its norm one kernel where a session serves them."""
        fused = fused_layers.serves_draft(self.self_attn, x)  # inside a session: one kernel
        normed = self.input_layernorm(x) if normed is None else normed
        r = self.self_attn(normed, rope, cache, context_window)
        h, normed = add_then_norm(x, r, self.post_attention_layernorm, fused)
        r = self.mlp(normed)
        return h + r if after is None else add_then_norm(h, r, after, fused)


class DraftModel(nn.Module):
    # Its forward is array ops only (no host reads), so a cycle through it can run under
    # mx.compile; a draft scripted on the host (a test oracle) says False.
    traceable = True

    def __init__(self, config: DraftConfig):
        super().__init__()
        self.config = config
        H = config.hidden_size
        self.fc = nn.Linear(config.num_taps * H, H, bias=False)
        self.hidden_norm = nn.RMSNorm(H, eps=config.rms_norm_eps)
        self.layers = [
            DecoderLayer(config, kind == "sliding_attention") for kind in config.layer_types
        ]
        self.norm = nn.RMSNorm(H, eps=config.rms_norm_eps)
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
    ) -> DraftModel:
        """Share the target's token embedding and LM head; `embed_scale` is the target's
        own embedding scale (the draft's input_embedding_scale comes on top)."""
        object.__setattr__(self, "_embed", embed)
        object.__setattr__(self, "_lm_head", lm_head)
        object.__setattr__(self, "_embed_scale", embed_scale * self.config.input_embedding_scale)
        return self

    def bind(self, target: nn.Module) -> DraftModel:
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
        """Append tapped target features [B, S, n_taps * H] to the draft's context cache.

        The context enters every layer's attention as keys/values projected straight
        from hidden_norm(fc(features)), so it needs no pass through the layers.
        """
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
        """Draft one block.

        block: token ids [B, L] (anchor then MASK ids) or their embeddings [B, L, H].
        context: tapped target features [B, S, n_taps * H] of the positions right before
            the block that are not in `cache` yet; they are added to it.
        context_window: attend to at most this many most recent context positions.
        Returns the final-normed hidden states [B, L, H]; `logits` maps them to vocab.
        """
        cache = self.make_cache() if cache is None else cache
        if context is not None:
            self.add_context(context, cache)
        h = self.embed(block) if block.ndim == 2 else block
        normed = None  # input_layernorm(h) of the next layer, where the one before gave it
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            if type(layer) is not DecoderLayer:  # DFlash 2's layers: their own code
                h, normed = layer(h, self.rope, c, context_window), None
                continue
            following = self.layers[i + 1] if i + 1 < len(self.layers) else None
            if following is None:
                after = self.norm
            else:
                after = following.input_layernorm if type(following) is DecoderLayer else None
            out = layer(h, self.rope, c, context_window, normed, after)
            h, normed = out if after is not None else (out, None)
        return normed if normed is not None else self.norm(h)

    def propose(
        self,
        anchor: mx.array,
        cache: list[KVCache],
        n: int,
        sampling: SamplingParams,
        context_window: int | None = None,
    ) -> tuple[mx.array, mx.array | None]:
        """Draft n tokens after `anchor` [1] in one forward.

        Returns the drafted ids [n] (int32) and, when sampling, the float32
        log-distribution [n, V] each was drawn from (None when greedy).
        """
        masks = mx.full((n,), self.mask_token_id, dtype=anchor.dtype)
        block = mx.concatenate([anchor, masks])[None]
        logits = self.logits(self(block, None, cache, context_window)[0, 1:])
        if sampling.greedy:
            return mx.argmax(logits, axis=-1).astype(mx.int32), None
        logq = sampling.log_distribution(logits)
        return mx.random.categorical(logq).astype(mx.int32), logq
