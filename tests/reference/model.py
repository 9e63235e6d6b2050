"""A plain-PyTorch DFlash draft model that reads the published HF checkpoints.

Written from the paper and its transformers backend, not from dflash_mlx, so the MLX
model can be checked against it. RoPE inverse frequencies come from transformers'
own rope functions (what the published PyTorch runtimes compute).

Forward, for context features of S positions after `past` cached ones and a block of L:
    ctx = hidden_norm(fc(features))                         positions [past, past+S)
    per layer: q from the block (q_proj, q_norm, RoPE at [past+S, past+S+L));
               k/v from [ctx, block] (k_proj/v_proj, k_norm, RoPE at [past, past+S+L)),
               appended to the cache, attended together with the cached ones;
    full layers see every key; sliding layers see key k from query p iff p-W < k <= p;
    the cache is then cropped back to past+S (context only), as the paper's loop does.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F


def target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The paper's default taps: spread evenly over target layers 1 … N-3."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    first, last = 1, num_target_layers - 3
    step = (last - first) / (num_draft_layers - 1)
    return [round(first + i * step) for i in range(num_draft_layers)]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rope_inv_freq(raw: dict) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, cos/sin scale) exactly as transformers computes them."""
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    keys = (
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "num_hidden_layers",
        "max_position_embeddings",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
    )
    # Qwen3Config folds flat rope_theta + rope_scaling into rope_parameters (transformers 5).
    # (a deep copy: transformers fills defaults into rope dicts in place)
    config = Qwen3Config(**copy.deepcopy({k: raw[k] for k in keys if raw.get(k) is not None}))
    kind = config.rope_parameters.get("rope_type", "default")
    if kind not in ("default", "linear", "yarn", "llama3"):
        # dynamic / longrope change with the sequence length: not in any published draft.
        raise NotImplementedError(f"rope_type '{kind}' is not modelled by the reference")
    if kind == "default":
        inv_freq, scale = Qwen3RotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inv_freq, scale = ROPE_INIT_FUNCTIONS[kind](config, torch.device("cpu"))
    return inv_freq.float(), float(scale)


class DraftSpec:
    """The fields of a draft config.json the forward needs, from any published variant."""

    def __init__(self, raw: dict):
        dflash = raw.get("dflash_config") or {}
        self.raw = raw
        self.hidden_size = raw["hidden_size"]
        self.intermediate_size = raw["intermediate_size"]
        self.num_layers = raw["num_hidden_layers"]
        self.num_heads = raw["num_attention_heads"]
        self.num_kv_heads = raw.get("num_key_value_heads") or self.num_heads
        self.head_dim = raw.get("head_dim") or self.hidden_size // self.num_heads
        self.eps = raw.get("rms_norm_eps", 1e-6)
        self.bias = raw.get("attention_bias", False)
        self.block_size = raw.get("block_size") or dflash.get("block_size")
        self.mask_token_id = dflash.get("mask_token_id")
        self.num_target_layers = raw["num_target_layers"]
        self.target_layer_ids = list(
            dflash.get("target_layer_ids")
            or target_layer_ids(self.num_target_layers, self.num_layers)
        )
        self.layer_types = raw.get("layer_types") or ["full_attention"] * self.num_layers
        self.sliding_window = raw.get("sliding_window")
        # Gemma-4 / DFlash 2 fields, where z-lab's loaders look for them: dflash_config
        # first, then the top level; is_causal at the top level.
        value = lambda k, d=None: dflash[k] if dflash.get(k) is not None else raw.get(k, d)
        self.architecture = (raw.get("architectures") or ["DFlashDraftModel"])[0]
        self.final_logit_softcapping = value("final_logit_softcapping")
        self.input_embedding_scale = float(value("input_embedding_scale", 1.0))
        self.output_multiplier = float(value("output_multiplier", 1.0))
        self.is_causal = raw.get("is_causal")
        self.conv_kernel_size = value("conv_kernel_size")
        self.conv_group_size = value("conv_group_size")
        self.selector_rank = value("selector_rank")
        self.selector_top_k = value("selector_top_k")
        self.vocab_size = raw.get("vocab_size")

    def causal(self, layer_type: str) -> bool:
        """z-lab: is_causal when set, else sliding layers causal and full ones not."""
        return layer_type == "sliding_attention" if self.is_causal is None else bool(self.is_causal)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the input dtype (as Qwen3RMSNorm does).
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved RoPE: the two halves of the head dim form the pairs."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class DraftCache:
    """Per-layer context keys/values (RoPE applied), positions 0 … length-1."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, i: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[i] is not None:
            k = torch.cat([self.keys[i], k], dim=2)
            v = torch.cat([self.values[i], v], dim=2)
        self.keys[i], self.values[i] = k, v
        return k, v

    def crop(self, length: int) -> None:
        for i in range(len(self.keys)):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i][:, :, :length]
                self.values[i] = self.values[i][:, :, :length]


class Attention(nn.Module):
    def __init__(self, spec: DraftSpec, sliding: bool):
        super().__init__()
        H, D = spec.hidden_size, spec.head_dim
        self.n_heads, self.n_kv, self.head_dim = spec.num_heads, spec.num_kv_heads, D
        self.q_proj = nn.Linear(H, self.n_heads * D, bias=spec.bias)
        self.k_proj = nn.Linear(H, self.n_kv * D, bias=spec.bias)
        self.v_proj = nn.Linear(H, self.n_kv * D, bias=spec.bias)
        self.o_proj = nn.Linear(self.n_heads * D, H, bias=spec.bias)
        self.q_norm = RMSNorm(D, spec.eps)
        self.k_norm = RMSNorm(D, spec.eps)
        self.window = spec.sliding_window if sliding else None

    def forward(self, x, ctx, cos, sin, cache, layer, visible):
        B, L, _ = x.shape
        D = self.head_dim
        q = self.q_norm(self.q_proj(x).view(B, L, self.n_heads, D)).transpose(1, 2)
        kv_in = torch.cat([ctx, x], dim=1)
        T = kv_in.shape[1]
        k = self.k_norm(self.k_proj(kv_in).view(B, T, self.n_kv, D)).transpose(1, 2)
        v = self.v_proj(kv_in).view(B, T, self.n_kv, D).transpose(1, 2)
        q = rotate(q, cos[-L:], sin[-L:])
        k = rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        groups = self.n_heads // self.n_kv
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * D**-0.5
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(B, L, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, spec: DraftSpec, sliding: bool):
        super().__init__()
        self.self_attn = Attention(spec, sliding)
        self.mlp = MLP(spec.hidden_size, spec.intermediate_size)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.eps)

    def forward(self, x, ctx, cos, sin, cache, layer, visible):
        h = x + self.self_attn(self.input_layernorm(x), ctx, cos, sin, cache, layer, visible)
        return h + self.mlp(self.post_attention_layernorm(h))


class ReferenceDraft(nn.Module):
    """Parameter names are the checkpoint's (no prefix), so `load_state_dict` is strict."""

    def __init__(self, raw: dict):
        super().__init__()
        self.spec = spec = DraftSpec(raw)
        H = spec.hidden_size
        self.fc = nn.Linear(len(spec.target_layer_ids) * H, H, bias=False)
        self.hidden_norm = RMSNorm(H, spec.eps)
        self.layers = nn.ModuleList(
            Layer(spec, kind == "sliding_attention") for kind in spec.layer_types
        )
        self.norm = RMSNorm(H, spec.eps)
        # Kept off the module's buffers so `.to(dtype)` never rounds them.
        self.inv_freq, self.rope_scale = rope_inv_freq(raw)
        if self.inv_freq.numel() * 2 != spec.head_dim:
            raise ValueError("partial rotary embeddings are not in any published draft")

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def mask_token_id(self) -> int:
        return self.spec.mask_token_id

    def make_cache(self) -> DraftCache:
        return DraftCache(len(self.layers))

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        angles = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        angles = torch.cat([angles, angles], dim=-1)
        cos = (angles.cos() * self.rope_scale).to(dtype)
        sin = (angles.sin() * self.rope_scale).to(dtype)
        return cos, sin

    def visibility(
        self,
        start: int,
        L: int,
        sliding: bool,
        context_window: int | None,
        causal: bool | None = None,
    ):
        """Boolean [L, start+L]: may the query at start+i read the key at position j?
        As z-lab's transformers mask: causal keeps k <= p; a window W keeps p - k < W
        (and k - p < W when not causal)."""
        dev = self.fc.weight.device
        causal = sliding if causal is None else causal
        p = torch.arange(start, start + L, device=dev)[:, None]
        k = torch.arange(start + L, device=dev)[None, :]
        visible = torch.ones(L, start + L, dtype=torch.bool, device=dev)
        if context_window is not None:  # only the newest context positions (block: always)
            visible &= k >= start - context_window
        if causal:
            visible &= k <= p
        if sliding:
            W = self.spec.sliding_window
            visible &= p - k < W
            if not causal:
                visible &= k - p < W
        return visible

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """z-lab's compute_logits after the head: output multiplier, then softcap."""
        logits = logits * self.spec.output_multiplier
        cap = self.spec.final_logit_softcapping
        if cap is not None and float(cap) > 0:
            logits = torch.tanh(logits / float(cap)) * float(cap)
        return logits

    def embed_block(
        self, embedding: torch.Tensor, ids: torch.Tensor, target_scale: float = 1.0
    ) -> torch.Tensor:
        """Block input: the target's embedding rows times the target's own embedding
        scale (sqrt(H) for Gemma 4) times the draft's input_embedding_scale."""
        return F.embedding(ids, embedding) * (target_scale * self.spec.input_embedding_scale)

    def forward(
        self,
        noise_embedding: torch.Tensor,
        target_hidden: torch.Tensor,
        cache: DraftCache | None = None,
        context_window: int | None = None,
    ) -> torch.Tensor:
        """noise_embedding [B, L, H] (embeddings of anchor + masks), target_hidden
        [B, S, n_taps*H] (features of the S positions after the cached ones).
        Returns final-normed hidden states [B, L, H]."""
        L = noise_embedding.shape[1]
        past = cache.length if cache is not None else 0
        if cache is None and context_window is not None:
            raise ValueError("context_window needs a cache")
        ctx = self.hidden_norm(self.fc(target_hidden))
        start = past + ctx.shape[1]
        dev = noise_embedding.device
        cos, sin = self.rope(torch.arange(past, start + L, device=dev), noise_embedding.dtype)
        h = noise_embedding
        for i, layer in enumerate(self.layers):
            sliding = layer.self_attn.window is not None
            kind = "sliding_attention" if sliding else "full_attention"
            visible = self.visibility(start, L, sliding, context_window, self.spec.causal(kind))
            if cache is None:  # keys cover only [past, start+L) = [0, start+L)
                visible = visible[:, past:]
            h = layer(h, ctx, cos, sin, cache, i, visible)
        if cache is not None:
            cache.crop(start)  # keep the context, drop the block (the paper's crop(start))
        return self.norm(h)


def read_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from model.safetensors, sharded safetensors (index), or a torch .bin."""
    from safetensors.torch import load_file

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for f in files:
            state.update(load_file(str(path / f)))
        return state
    files = sorted(path.glob("*.safetensors"))
    if files:
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    state = {}
    for f in sorted(path.glob("*.bin")):
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    if not state:
        raise FileNotFoundError(f"no weights in {path}")
    return state


def make_reference(raw: dict) -> ReferenceDraft:
    """ReferenceDraft, or ReferenceDFlash2 for architectures ["DFlash2DraftModel"]."""
    if "DFlash2DraftModel" in (raw.get("architectures") or []):
        from .dflash2 import ReferenceDFlash2

        return ReferenceDFlash2(raw)
    return ReferenceDraft(raw)


def load_reference(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> ReferenceDraft:
    model = make_reference(read_config(path))
    model.load_state_dict(read_state_dict(path), strict=True)
    return model.to(device=device or default_device(), dtype=dtype).eval()
