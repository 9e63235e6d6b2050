"""Route an mlx-lm target's verify forward through the block-attention kernel.

mlx-lm model modules call `scaled_dot_product_attention` (imported from
mlx_lm.models.base) from their own module namespace. `verify_attention(model)`
replaces that name, in the modules the model's layers come from, by a router that
sends verify-shaped calls to the kernel:

  query length 2…32, a non-quantized cache, mask == "causal" (what mlx-lm passes for a
  plain KV cache; sliding-window and padded batches get array masks), no sinks,

and every other call to the original function, unchanged. The router acts only
inside the `with` block of the thread (context) that entered it, so a plain mlx_lm
call elsewhere (another thread, or after the block) computes exactly what it always
did. Patches are reference-counted per module, so nested or concurrent blocks over
two models that share a module are safe; the original is restored when the last one
exits, on an exception too.
"""

from __future__ import annotations

import contextvars
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

import mlx.core as mx
from mlx import nn
from mlx_lm.models import base as _mlx_lm_base

from .attention import kernel_attention
from .source import MAX_QUERIES

_NAME = "scaled_dot_product_attention"
_lock = threading.RLock()
_patches: dict[str, list] = {}  # module name -> [module, original, count]
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
        if _depth.get() > 0 and is_verify_call(queries, keys, cache, mask, sinks):
            out = kernel_attention(queries, keys, values, scale=scale, causal=True)
            if out is not None:
                return out
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    scaled_dot_product_attention.__dflash_original__ = original
    return scaled_dot_product_attention


_modules_by_type: dict[type, list[ModuleType]] = {}


def attention_modules(model: nn.Module) -> list[ModuleType]:
    """Modules, among those defining the model's layers, that call mlx-lm's SDPA by name.

    Found once per model class: walking every submodule is too slow for each verify.
    """
    if type(model) not in _modules_by_type:
        _modules_by_type[type(model)] = _find_attention_modules(model)
    return _modules_by_type[type(model)]


def _find_attention_modules(model: nn.Module) -> list[ModuleType]:
    names = {type(model).__module__} | {type(m).__module__ for m in model.modules()}
    found = []
    for name in sorted(names):
        module = sys.modules.get(name)
        fn = getattr(module, _NAME, None)
        if fn is None:
            continue
        original = getattr(fn, "__dflash_original__", fn)
        if original is _mlx_lm_base.scaled_dot_product_attention:
            found.append(module)
    return found


def _patch(module: ModuleType) -> None:
    entry = _patches.get(module.__name__)
    if entry is not None:
        entry[2] += 1
        return
    original = getattr(module, _NAME)
    setattr(module, _NAME, _make_router(original))
    _patches[module.__name__] = [module, original, 1]


def _unpatch(module: ModuleType) -> None:
    entry = _patches[module.__name__]
    entry[2] -= 1
    if entry[2] == 0:
        setattr(module, _NAME, entry[1])
        del _patches[module.__name__]


@contextmanager
def verify_attention(model: nn.Module) -> Iterator[None]:
    """Inside this block, the model's verify-shaped attention runs on the kernel."""
    modules = attention_modules(model)
    with _lock:
        for module in modules:
            _patch(module)
    token = _depth.set(_depth.get() + 1)
    try:
        yield
    finally:
        _depth.reset(token)
        with _lock:
            for module in modules:
                _unpatch(module)
