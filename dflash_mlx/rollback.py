"""Return every target cache to the state right after the last accepted token.

Verify runs the whole block through the target; afterwards each cache holds the block's
rejected tail too. Per cache kind:
- KVCache (and the quantized one): trim the tail.
- RotatingKVCache (sliding-window layers): once it wraps it cannot be trimmed, so keep
  its state from before verify and append just the accepted keys/values again.
- ArraysCache (GatedDeltaNet / SSM layers): a recurrent state cannot be trimmed, so keep
  its state from before verify and run the layer's mixer again on the accepted inputs
  only. Only the state is evaluated, so lazy evaluation skips the mixer's output path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx_lm.models.cache import ArraysCache, RotatingKVCache

from .tap import target_layers

# Where each family keeps the module that owns a layer's ArraysCache.
RECURRENT_MIXERS = ("linear_attn", "mamba", "mixer")

_RECORDING_CLASSES: dict[type, type] = {}


def _recording_class(cls: type) -> type:
    """A subclass whose call remembers its arguments while its rollback is recording."""
    if cls not in _RECORDING_CLASSES:

        def __call__(self, *args, **kwargs):
            if self._dflash_rollback.recording:
                object.__setattr__(self, "_dflash_last_call", (args, kwargs))
            return cls.__call__(self, *args, **kwargs)

        _RECORDING_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
    return _RECORDING_CLASSES[cls]


def _prefix(x: Any, n: int, length: int) -> Any:
    """The first n positions of a [B, L, ...] array; other arguments as they are."""
    if isinstance(x, mx.array) and x.ndim >= 2 and x.shape[1] == length:
        return x[:, :n]
    return x


class Rollback:
    def __init__(self, model: nn.Module, cache: list[Any]):
        self.cache = cache
        self.recording = False
        self.trimmed, self.rotating, self.recurrent = [], [], []
        for i, (layer, c) in enumerate(zip(target_layers(model), cache)):
            if isinstance(c, ArraysCache):
                mixer = next(
                    (getattr(layer, a) for a in RECURRENT_MIXERS if hasattr(layer, a)), None
                )
                if mixer is None:
                    raise ValueError(
                        f"cannot roll back layer {i} of {type(model).__name__}: its "
                        f"recurrent cache belongs to no known mixer {RECURRENT_MIXERS}"
                    )
                self.recurrent.append((mixer, c))
            elif isinstance(c, RotatingKVCache):
                self.rotating.append(c)
            elif hasattr(c, "trim") and c.is_trimmable():
                self.trimmed.append(c)
            else:
                raise ValueError(
                    f"cannot roll back layer {i} of {type(model).__name__}: "
                    f"{type(c).__name__} is neither trimmable nor restorable"
                )
        self._saved: list[Any] = []

    @contextmanager
    def verifying(self) -> Iterator[None]:
        """Around the verify forward: remember what a rollback needs."""
        self._saved = [c.state for c in self.rotating] + [list(c.cache) for _, c in self.recurrent]
        self.recording = True
        try:
            yield
        finally:
            self.recording = False

    def __call__(self, n_keep: int, n_block: int) -> None:
        """Keep the first n_keep of the n_block positions the last verify appended."""
        n_drop = n_block - n_keep
        if n_drop == 0:
            return
        for c in self.trimmed:
            c.trim(n_drop)
        saved = iter(self._saved)
        for c in self.rotating:
            # A multi-token update leaves the cache in temporal order, block last.
            keys = c.keys[..., -n_block:, :][..., :n_keep, :]
            values = c.values[..., -n_block:, :][..., :n_keep, :]
            c.state = next(saved)
            if n_keep:
                c.update_and_fetch(keys, values)
        for mixer, c in self.recurrent:
            c.cache = next(saved)
            if n_keep:
                args, kwargs = mixer._dflash_last_call
                args = [_prefix(a, n_keep, n_block) for a in args]
                kwargs = {k: _prefix(v, n_keep, n_block) for k, v in kwargs.items()}
                mixer(*args, **kwargs)
            object.__setattr__(mixer, "_dflash_last_call", None)


@contextmanager
def rollback_for(model: nn.Module, cache: list[Any]) -> Iterator[Rollback]:
    """A Rollback for `model` with `cache`; its hooks are removed on exit."""
    rollback = Rollback(model, cache)
    hooked = []
    try:
        for mixer, _ in rollback.recurrent:
            object.__setattr__(mixer, "_dflash_rollback", rollback)
            object.__setattr__(mixer, "_dflash_last_call", None)
            hooked.append((mixer, type(mixer)))
            mixer.__class__ = _recording_class(type(mixer))
        yield rollback
    finally:
        for mixer, original in hooked:
            mixer.__class__ = original
            object.__delattr__(mixer, "_dflash_rollback")
            object.__delattr__(mixer, "_dflash_last_call")
