"""Return every target cache to the state right after the last accepted token.

A verify runs the whole block through the target; afterwards each cache holds the
block's rejected tail too. `Rollback.checkpoint()` runs before a verify and
`Rollback.commit(n_keep, n_block)` after it keeps the first n_keep block positions.
`commit` always starts from the checkpoint, so it may be called again with a
smaller n_keep until the next checkpoint. Per cache kind:

- KVCache, QuantizedKVCache: trim the tail.
- RotatingKVCache (sliding-window layers): once it wraps it cannot be trimmed, so
  restore its pre-verify state and append just the accepted keys/values again.
- ArraysCache of a GatedDeltaNet mixer (qwen3_5, qwen3_next): a recurrent state
  cannot be trimmed. The verify records the mixer's conv input and the arguments of
  its `gated_delta_update` call; commit slices the conv state out of the recorded
  conv input and replays only the recurrence over the accepted positions from the
  pre-verify state. The recurrence is sequential, so the replayed state is the one
  the verify itself reached at that position, bit for bit.
- ArraysCache of another recurrent mixer (mamba-like): restore the pre-verify state
  and run the mixer again on the accepted inputs (lazily: only the state is used).
"""

from __future__ import annotations

import contextvars
import inspect
import sys
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx_lm.models import gated_delta as _gated_delta
from mlx_lm.models.cache import ArraysCache, RotatingKVCache

from .patch import Patches, original_function

# Where each family keeps the module that owns a layer's ArraysCache.
RECURRENT_MIXERS = ("linear_attn", "mamba", "mixer")
_GDN = "gated_delta_update"

_recording: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar(
    "dflash_recurrent_recording", default=None
)


@dataclass
class _Recorder:
    """What one recurrent mixer's call during a verify left behind."""

    active: bool = False
    conv_input: mx.array | None = None
    gdn_call: inspect.BoundArguments | None = None
    mixer_call: tuple | None = None
    saved: list = field(default_factory=list)


def _gdn_router(original):
    signature = inspect.signature(original)

    def gated_delta_update(*args, **kwargs):
        rec = _recording.get()
        if rec is not None and rec.active:
            rec.gdn_call = signature.bind(*args, **kwargs)
        return original(*args, **kwargs)

    return gated_delta_update


def _prefix(x: Any, n: int, length: int) -> Any:
    """The first n positions of a [B, L, ...] array; other arguments as they are."""
    if isinstance(x, mx.array) and x.ndim >= 2 and x.shape[1] == length:
        return x[:, :n]
    return x


def _gdn_module(mixer: nn.Module):
    """The mixer's module namespace if its recurrence is mlx-lm's gated_delta_update."""
    module = sys.modules.get(type(mixer).__module__)
    fn = getattr(module, _GDN, None)
    is_gdn = fn is not None and original_function(fn) is _gated_delta.gated_delta_update
    return module if is_gdn and isinstance(getattr(mixer, "conv1d", None), nn.Conv1d) else None


class Rollback:
    def __init__(self, model: nn.Module, layers: list[nn.Module], cache: list[Any], bound):
        """`bound[i]`: the caches layer i was seen using (tap.bind_caches)."""
        self.cache = cache
        self.recurrent: list[tuple[int, nn.Module, _Recorder, Any]] = []  # (index, mixer, rec, gdn)
        index = {id(c): i for i, c in enumerate(cache)}
        for i, (layer, caches) in enumerate(zip(layers, bound)):
            for c in caches:
                if not isinstance(c, ArraysCache):
                    continue
                mixer = next(
                    (getattr(layer, a) for a in RECURRENT_MIXERS if hasattr(layer, a)), None
                )
                if mixer is None:
                    raise ValueError(
                        f"cannot roll back layer {i} of {type(model).__name__}: its "
                        f"recurrent cache belongs to no known mixer {RECURRENT_MIXERS}"
                    )
                self.recurrent.append((index[id(c)], mixer, _Recorder(), _gdn_module(mixer)))
        recurrent = {j for j, *_ in self.recurrent}
        for j, c in enumerate(cache):
            if j in recurrent or isinstance(c, RotatingKVCache):
                continue
            if isinstance(c, ArraysCache) or not (hasattr(c, "trim") and c.is_trimmable()):
                raise ValueError(
                    f"cannot roll back cache {j} of {type(model).__name__}: "
                    f"{type(c).__name__} is neither trimmable nor restorable"
                )
        self._offsets: list[int] = []
        self._rotating: dict[int, tuple] = {}
        self._rotating_block: dict[int, tuple] = {}

    def install(self, patches: Patches) -> None:
        """Hooks that record what a commit replays (only while a verify runs)."""
        for _, mixer, rec, gdn in self.recurrent:

            def run(call, module, *args, _rec=rec, **kwargs):
                token = _recording.set(_rec)
                try:
                    if _rec.active:
                        _rec.mixer_call = (args, kwargs)
                    return call(module, *args, **kwargs)
                finally:
                    _recording.reset(token)

            patches.hook_call(mixer, run)
            if gdn is not None:

                def conv(call, module, x, *args, _rec=rec, **kwargs):
                    if _rec.active:
                        _rec.conv_input = x
                    return call(module, x, *args, **kwargs)

                patches.hook_call(mixer.conv1d, conv)
                patches.route(gdn, _GDN, _gdn_router)

    def checkpoint(self) -> None:
        """Before a verify: remember what a commit needs, and start recording."""
        self._offsets = [getattr(c, "offset", 0) for c in self.cache]
        self._rotating = {
            j: c.state for j, c in enumerate(self.cache) if isinstance(c, RotatingKVCache)
        }
        self._rotating_block = {}
        self._changed = False
        for j, _, rec, _ in self.recurrent:
            rec.saved = list(self.cache[j].cache)
            rec.active = True

    def stop_recording(self) -> None:
        for _, _, rec, _ in self.recurrent:
            rec.active = False

    def commit(self, n_keep: int, n_block: int) -> None:
        """Keep the first n_keep of the n_block positions the last verify appended."""
        self.stop_recording()
        if n_keep == n_block and not self._changed:
            return  # nothing to drop (and a one-token verify's update is not block-last)
        self._changed = True
        for j, c in enumerate(self.cache):
            if j in self._rotating:
                if j not in self._rotating_block:
                    # A multi-token update leaves the cache in temporal order, block last.
                    self._rotating_block[j] = (
                        c.keys[..., -n_block:, :],
                        c.values[..., -n_block:, :],
                    )
                keys, values = self._rotating_block[j]
                # New array objects: a one-token update writes into its array in place,
                # and a second commit must find the checkpoint untouched.
                saved_keys, saved_values, *rest = self._rotating[j]
                c.state = (mx.array(saved_keys), mx.array(saved_values), *rest)
                if n_keep:
                    c.update_and_fetch(keys[..., :n_keep, :], values[..., :n_keep, :])
            elif hasattr(c, "trim") and not isinstance(c, ArraysCache):
                c.trim(c.offset - (self._offsets[j] + n_keep))
        for j, mixer, rec, gdn in self.recurrent:
            c = self.cache[j]
            c.cache = list(rec.saved)
            if n_keep == 0:
                continue
            if gdn is not None:
                self._replay_gdn(c, rec, n_keep, n_block)
            else:
                args, kwargs = rec.mixer_call
                mixer(
                    *[_prefix(a, n_keep, n_block) for a in args],
                    **{k: _prefix(v, n_keep, n_block) for k, v in kwargs.items()},
                )

    @staticmethod
    def _replay_gdn(c: ArraysCache, rec: _Recorder, n_keep: int, n_block: int) -> None:
        width = rec.conv_input.shape[1] - n_block  # conv kernel size - 1
        c[0] = mx.contiguous(rec.conv_input[:, n_keep : n_keep + width, :])
        call = rec.gdn_call
        args = dict(call.arguments)
        for name in ("q", "k", "v", "a", "b", "mask"):
            args[name] = _prefix(args.get(name), n_keep, n_block)
        args["state"] = rec.saved[1]
        replay = inspect.BoundArguments(call.signature, args)
        _, c[1] = original_function(_gated_delta.gated_delta_update)(*replay.args, **replay.kwargs)
