"""Route an mlx-lm target's verify forward through the block-attention kernel.

mlx-lm model modules call `scaled_dot_product_attention` (imported from
mlx_lm.models.base) from their own module namespace. `install(model, patches)`
routes that name, in the modules the model's layers come from (`patch.Patches.route`),
and the router sends verify-shaped calls made inside `verifying()` to the kernel:

  query length 2…32, a non-quantized cache, mask == "causal" (what mlx-lm passes for a
  plain KV cache; sliding-window and padded batches get array masks), no sinks,

and every other call to the original function, unchanged. `verifying()` is a context
variable, so a plain mlx_lm call elsewhere (another thread, or outside the block)
computes exactly what it always did. `verify_attention(model)` does both for one block.

The target layers' linear layers whose shapes the skinny-matmul kernel may serve
(`DFLASH_MATMUL=kernel`, or in auto mode where this machine's calibration or
`matmul.MEASURED` prefers it at some verify width) are hooked the same way: inside
`verifying()` they try `matmul.linear` (the kernel, or None for the stock op). Where no
decision prefers the kernel nothing is hooked, so the stock path pays no Python per call.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import mlx.core as mx
from mlx import nn
from mlx_lm.models import base as _mlx_lm_base

from ..patch import Patches, original_function
from ..static_cache import StaticKVCache
from ..tap import target_layers
from . import attention, matmul
from .attention import kernel_attention
from .source import MAX_QUERIES

_NAME = "scaled_dot_product_attention"
_depth = contextvars.ContextVar("dflash_verify_attention_depth", default=0)


def is_verify_call(queries: mx.array, keys: mx.array, cache, mask, sinks) -> bool:
    """A verify forward's attention call, as mlx-lm makes it for a plain KV cache."""
    if sinks is not None or cache is None or hasattr(cache, "bits"):
        return False
    if not (isinstance(mask, str) and mask == "causal"):
        return False
    if queries.ndim != 4 or keys.ndim != 4:
        return False
    lq = queries.shape[2]
    return 2 <= lq <= MAX_QUERIES and keys.shape[2] >= lq


def _make_router(original):
    def scaled_dot_product_attention(
        queries: mx.array,
        keys: mx.array,
        values: mx.array,
        cache,
        scale: float,
        mask: mx.array | None,
        sinks: mx.array | None = None,
    ) -> mx.array:
        if _depth.get() > 0:
            out = None
            if is_verify_call(queries, keys, cache, mask, sinks):
                out = kernel_attention(queries, keys, values, scale=scale, causal=True)
            elif isinstance(cache, StaticKVCache) and sinks is None:
                # Static buffers: the mask is the causal one up to the device-side
                # length, which the kernel reads instead of the buffer's size.
                out = kernel_attention(
                    queries,
                    keys,
                    values,
                    scale=scale,
                    causal=True,
                    valid_length=cache.length.valid(queries.shape[2]),
                )
            if out is not None:
                return out
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    return scaled_dot_product_attention


_modules_by_type: dict[type, list[ModuleType]] = {}


def attention_modules(model: nn.Module) -> list[ModuleType]:
    """Modules, among those defining the model's layers, that call mlx-lm's SDPA by name.

    Found once per model class: walking every submodule is too slow for each verify.
    """
    if type(model) not in _modules_by_type:
        names = {type(model).__module__} | {type(m).__module__ for m in model.modules()}
        _modules_by_type[type(model)] = [
            sys.modules[name]
            for name in sorted(names)
            if name in sys.modules
            and original_function(getattr(sys.modules[name], _NAME, None))
            is _mlx_lm_base.scaled_dot_product_attention
        ]
    return _modules_by_type[type(model)]


def is_verifying() -> bool:
    return _depth.get() > 0


def choices() -> tuple:
    """What the verify kernels would run on now (switches and backends): a graph traced
    under other choices goes on computing with those."""
    return (matmul.mode(), attention.mode(), matmul.active_backend(), attention.active_backend())


def kernel_linears(model: nn.Module) -> list[nn.Module]:
    """The target layers' linear layers the kernel may serve at some verify width."""
    mode = matmul.mode()
    active = matmul.active_backend()
    if mode == "stock" or active is None:
        return []
    # Decided once per weight shape: a model has a handful, and asking every layer's
    # linears at every width took 33 ms per generation (8B shape, bf16, H200).
    decided: dict[tuple, bool] = {}
    out = []
    for layer in target_layers(model):
        for _, module in layer.named_modules():
            spec = matmul.linear_spec(module)
            if spec is None:
                continue
            n, k, dtype, bits, _ = spec
            kind = matmul.weight_kind(dtype, bits)
            if (kind, n, k) not in decided:
                widths = range(2, matmul.MAX_ROWS + 1)
                decided[kind, n, k] = mode == "kernel" or any(
                    matmul.prefers_kernel(active[0], kind, m, n, k) for m in widths
                )
            if decided[kind, n, k]:
                out.append(module)
    return out


def _linear_hook(call, module: nn.Module, x: mx.array) -> mx.array:
    if is_verifying():
        out = matmul.linear(module, x)
        if out is not None:
            return out
    return call(module, x)


def install(model: nn.Module, patches: Patches) -> None:
    for module in attention_modules(model):
        patches.route(module, _NAME, _make_router)
    for module in kernel_linears(model):
        patches.hook_call(module, _linear_hook)


@contextmanager
def verifying() -> Iterator[None]:
    """Inside this block (this thread / context only), verify-shaped calls use the kernel."""
    token = _depth.set(_depth.get() + 1)
    try:
        yield
    finally:
        _depth.reset(token)


@contextmanager
def verify_attention(model: nn.Module) -> Iterator[None]:
    """Inside this block, the model's verify-shaped attention runs on the kernel."""
    patches = Patches()
    try:
        install(model, patches)
        with verifying():
            yield
    finally:
        patches.restore()
