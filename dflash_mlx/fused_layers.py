"""The target's attention layers in a verify, from the fused q/k/v product in one kernel.

With q/k/v fused (fuse.py), mlx-lm's attention code still slices the product and runs
a copy, an RMS norm and a rope for q and for k (Qwen3; a rope each for Llama / Qwen2)
before the cache write: six kernels a layer, and the host spends ~8 us encoding each
(results/cycle_session9.md: the cycle is host-bound). Inside `routing.verifying()`, the
attention layers of the classes in `FAMILIES` run those steps as one kernel
(kernels/qkv.py); the cache write, the module's (routed) attention function and o_proj
stay the model's own.

`FAMILIES` lists the attention classes whose code this reproduces, read from mlx-lm's
sources (norms or not); a layer of any other class, with a RoPE the kernel does not
compute (`qkv.rotary`), or unfused, keeps its own code, as does every call outside a
verify and every call where the kernel does not run (the CPU). The draft's attention
takes the same kernel through `draft_heads` while a session has its projections fused.

The MLP needs nothing of the kind: MLX's compiled swiglu reads the fused gate/up
product's two slices in place (a kernel replacing it measured no kernel fewer and more
device time, results/cycle_session10.md).

Between sublayers, `install_blocks` runs each residual add and the RMS norm after it as
one kernel (kernels/add_norm.py) in the decoder layers of the classes in `BLOCKS`: the
add after attention with post_attention_layernorm, and the add after the MLP with the
NEXT layer's input_layernorm (or the final norm), whose result waits for that norm's
call (served only for that very array). Two kernels a layer instead of four.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import replace
from types import ModuleType
from typing import Any

import mlx.core as mx
from mlx import nn

from . import fuse
from .fuse import FusedGroup
from .kernels import add_norm, matmul, qkv
from .kernels.routing import is_verifying
from .patch import Patches, unhooked_type
from .static_cache import write_stacked
from .tap import _text_model, target_layers

# (module, class) -> whether it RMS-normalises q and k per head (q_norm / k_norm).
FAMILIES = {
    ("mlx_lm.models.llama", "Attention"): False,
    ("mlx_lm.models.qwen2", "Attention"): False,
    ("mlx_lm.models.qwen3", "Attention"): True,
    ("mlx_lm.models.qwen3_moe", "Attention"): True,
}
_SDPA = "scaled_dot_product_attention"
# Decoder layers whose __call__ is, read from mlx-lm's sources:
#   h = x + self_attn(input_layernorm(x), mask, cache); out = h + mlp(post_attention_layernorm(h))
BLOCKS = (
    ("mlx_lm.models.llama", "TransformerBlock"),
    ("mlx_lm.models.qwen2", "TransformerBlock"),
    ("mlx_lm.models.qwen3", "TransformerBlock"),
    ("mlx_lm.models.qwen3_moe", "Qwen3MoeDecoderLayer"),
)


def _classes(names: dict[tuple[str, str], bool]) -> dict[type, bool]:
    out = {}
    for (module, name), value in names.items():
        try:
            out[getattr(importlib.import_module(module), name)] = value
        except (ImportError, AttributeError):  # an mlx-lm without that family
            continue
    return out


def _group(module: nn.Module | None) -> FusedGroup | None:
    group = module.__dict__.get("_dflash_fused") if module is not None else None
    return group if isinstance(group, FusedGroup) and group.current() else None


def layout(attn: nn.Module, norms: bool, group: FusedGroup, rope: nn.Module) -> qkv.Layout | None:
    """The kernel's description of `attn` (q/k/v fused as `group`), or None where it
    does not apply."""
    start, end = group.columns[0]  # q's columns of the product
    head_dim = (end - start) // attn.n_heads
    rotary = qkv.rotary(rope, head_dim)
    if rotary is None:
        return None
    if not norms:
        return qkv.Layout(attn.n_heads, attn.n_kv_heads, head_dim, rotary)
    q_norm, k_norm = attn.q_norm, attn.k_norm
    if q_norm.eps != k_norm.eps:
        return None
    return qkv.Layout(
        attn.n_heads, attn.n_kv_heads, head_dim, rotary, q_norm.weight, k_norm.weight, q_norm.eps
    )


def install(model: nn.Module, patches: Patches) -> None:
    """Hook the target's attention layers that qualify (after fuse.install)."""
    if qkv.active_backend() is None:
        return
    classes = _classes(FAMILIES)
    for layer in target_layers(model):
        attn = getattr(layer, "self_attn", None)
        norms = classes.get(unhooked_type(attn))
        group = _group(attn)
        spec = (
            layout(attn, norms, group, attn.rope)
            if norms is not None and group is not None
            else None
        )
        if spec is None:
            continue
        module = sys.modules[unhooked_type(attn).__module__]

        def hook(call, inst, x, mask=None, cache=None, group=group, spec=spec, module=module):
            out = None
            if is_verifying() and cache is not None and x.shape[1] <= matmul.MAX_ROWS:
                out = _attention(inst, x, mask, cache, group, spec, module)
            return call(inst, x, mask, cache) if out is None else out

        patches.hook_call(attn, hook)


def _attention(
    attn: nn.Module,
    x: mx.array,
    mask: Any,
    cache: Any,
    group: FusedGroup,
    spec: qkv.Layout,
    module: ModuleType,
) -> mx.array | None:
    offset = cache.offset
    if not isinstance(offset, int) and offset.size != 1:
        return None  # one position per sequence of a batch: the model's own code
    heads = qkv.split_heads(group.product(x), spec, offset)
    if heads is None:
        return None
    q, kv = heads
    k, v = write_stacked(cache, kv)
    # The function by the module's own name: routed to block attention in a verify.
    out = getattr(module, _SDPA)(q, k, v, cache=cache, scale=attn.scale, mask=mask)
    B, L, _ = x.shape
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


def draft_heads(
    attn: nn.Module, x: mx.array, rope: nn.Module, offset: int | mx.array, skip_q: bool = False
) -> tuple[mx.array | None, mx.array] | None:
    """The draft's (q, kv) for x at positions offset…, from its fused q/k/v product in
    one kernel (kv: keys and values stacked, `static_cache.write_stacked`; q None with
    skip_q), or None for its own code: where no session has
    fused its projections for this input (fuse.draft_rows) or the kernel does not run."""
    if not serves_draft(attn, x):
        return None
    group = _group(attn)
    key = (id(rope), id(group), skip_q)
    spec = attn.__dict__.get("_dflash_qkv", {}).get(key, False)
    if spec is False:  # the draft's layers are Qwen3's: q and k normalised per head
        spec = layout(attn, True, group, rope)
        if spec is not None and skip_q:
            spec = replace(spec, skip_q=True)
        attn.__dict__.setdefault("_dflash_qkv", {})[key] = spec
    if spec is None:
        return None
    return qkv.split_heads(group.product(x), spec, offset)


def install_blocks(model: nn.Module, patches: Patches) -> None:
    """Hook the target's decoder layers of the classes in `BLOCKS`, and the norms that
    follow them, so that a verify runs each residual add with its norm as one kernel.
    Installed before the feature tap, whose hook then records these layers' outputs.
    Where the projections fuse (fuse.enabled(): measured on CUDA only), like the q/k/v
    kernel: a Mac keeps MLX's own ops until a calibration there says otherwise."""
    if add_norm.active_backend() is None or not fuse.enabled():
        return
    classes = _classes(dict.fromkeys(BLOCKS, True))
    layers = target_layers(model)
    final = getattr(_text_model(model), "norm", None)
    # The norm each layer's output goes into next: the following layer's input norm when
    # that layer is hooked too (it calls it on exactly this output), else the final norm.
    hooked = [unhooked_type(layer) in classes for layer in layers]
    waiting: dict[int, tuple[mx.array, mx.array]] = {}  # id(norm) -> (its input, output)
    for i, layer in enumerate(layers):
        if not hooked[i]:
            continue
        if i + 1 < len(layers):
            after = layers[i + 1].input_layernorm if hooked[i + 1] else None
        else:
            after = final
        patches.hook_call(layer, _block_hook(after, waiting))
        if after is not None:  # each layer's own: the next layer's, or the final norm
            patches.hook_call(after, _norm_hook(waiting))
    patches.defer(waiting.clear)


def _block_hook(after: nn.Module | None, waiting: dict):
    def hook(call, layer, x, mask=None, cache=None):
        if not (is_verifying() and x.ndim == 3 and x.shape[1] <= matmul.MAX_ROWS):
            return call(layer, x, mask, cache)
        r = layer.self_attn(layer.input_layernorm(x), mask, cache)
        h, normed = add_norm.add_then_norm(x, r, layer.post_attention_layernorm)
        r = layer.mlp(normed)
        if after is None:
            return h + r
        waiting[id(after)] = add_norm.add_then_norm(h, r, after)
        return waiting[id(after)][0]

    return hook


def _norm_hook(waiting: dict):
    def hook(call, norm, x):
        ready = waiting.get(id(norm))
        if ready is not None and ready[0] is x:
            del waiting[id(norm)]
            return ready[1]
        return call(norm, x)

    return hook


def serves_draft(attn: nn.Module, x: mx.array) -> bool:
    """Whether a session serves the draft layer whose attention is `attn` its fused
    projections for input x: where its q/k/v and add + norm kernels run."""
    group = _group(attn)
    return bool(group is not None and group.serving and fuse.draft_rows(x))
