"""KV caches whose length lives on the device, so a cycle can be queued before the host
knows how many tokens the previous one accepted.

`StaticKVCache` holds keys/values preallocated to a capacity and writes a forward's
keys/values at the sequence's `Length.offset` (an int32 device scalar) without moving
it, as a scatter along the positions (`mx.put_along_axis`, work the size of the block):
MLX 0.32.4's CUDA `slice_update` at a device offset launches its copy over the whole
buffer, 30 us per write at 3k positions and 156 us at 24k, 14.6 of a cycle's 26.3 device
ms at 16k context (H200, `benchmarks/profile_kernels.py`). mlx_lm's attention code then
reads the whole buffer, and `make_mask` hides what lies past each query's position
(stale rows of rejected drafts included). One `Length` is shared by every target and draft cache of a sequence; the
verify session advances it by the accepted count, on the device. A `StaticKVCache` is
interchangeable with mlx_lm's `KVCache` for the models whose attention only reads
`cache.offset` as a RoPE offset (llama, mistral, qwen2, qwen3, qwen3_moe).
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import KVCache


class Length:
    """The number of committed positions of one sequence, on the device."""

    def __init__(self, offset: int | mx.array, capacity: int):
        self.offset = mx.array(offset, dtype=mx.int32).reshape(())
        self.capacity = capacity
        self._masks: dict = {}

    def set(self, offset: mx.array) -> None:
        self.offset = offset.astype(mx.int32).reshape(())
        self._masks = {}

    def causal_mask(self, n: int) -> mx.array:
        """[n, capacity]: query i (at offset + i) sees keys 0 … offset + i. One per
        forward, shared by all layers."""
        if n not in self._masks:
            query = self.offset + mx.arange(n, dtype=mx.int32)[:, None]
            self._masks[n] = mx.arange(self.capacity, dtype=mx.int32)[None] <= query
        return self._masks[n]

    def write_index(self, n: int) -> mx.array:
        """[1, 1, n, 1]: the positions a forward of n tokens writes (one per forward)."""
        if ("write", n) not in self._masks:
            rows = self.offset + mx.arange(n, dtype=mx.int32)
            self._masks[("write", n)] = rows.reshape(1, 1, n, 1)
        return self._masks[("write", n)]

    def valid(self, n: int) -> mx.array:
        """offset + n: the keys a forward of n queries at the offset may see."""
        if ("valid", n) not in self._masks:
            self._masks[("valid", n)] = self.offset + n
        return self._masks[("valid", n)]

    def block_mask(
        self, n: int, causal: bool, window: int | None, context_window: int | None
    ) -> mx.array:
        """[n, capacity] for a draft block at offset … offset + n - 1: bidirectional over
        the block (or causal within `window`), the context limited to `context_window`."""
        key = (n, causal, window, context_window)
        if key not in self._masks:
            keys = mx.arange(self.capacity, dtype=mx.int32)[None]
            query = self.offset + mx.arange(n, dtype=mx.int32)[:, None]
            visible = keys <= query if causal else keys < self.offset + n
            if window is not None:
                visible = visible & (keys > query - window)
            if context_window is not None:
                visible = visible & (keys >= self.offset - context_window)
            self._masks[key] = visible
        return self._masks[key]


class StaticKVCache:
    """A layer's keys and values as ONE buffer `kv` [1, 2H, capacity, D] (the keys' H
    heads, then the values'), written at the shared Length's offset. One buffer: a
    forward's write is one scatter, not two (each scatter is a kernel the host encodes
    and the device runs, ~4 us at 16 rows on the H200); `keys` / `values` are views."""

    def __init__(self, kv: mx.array, length: Length):
        self.kv, self.length = kv, length

    @classmethod
    def from_kv_cache(cls, c: KVCache, length: Length, like: mx.array | None = None):
        """Copy a KVCache's first length.offset positions into a buffer of capacity rows
        (`like`: a [1, H, *, D] array giving the shape when the cache is empty)."""
        n = int(length.offset.item())
        keys, values = (c.keys, c.values) if c.keys is not None else (like, like)
        if keys.shape[1:2] + keys.shape[3:] != values.shape[1:2] + values.shape[3:]:
            raise ValueError("StaticKVCache needs keys and values of one shape")
        B, H, _, D = keys.shape
        kv = mx.zeros((B, 2 * H, length.capacity, D), dtype=keys.dtype)
        if n:
            kv[:, :H, :n, :] = c.keys[..., :n, :]
            kv[:, H:, :n, :] = c.values[..., :n, :]
        return cls(kv, length)

    def to_kv_cache(self, n: int) -> KVCache:
        c = KVCache()
        c.keys, c.values, c.offset = self.keys, self.values, n
        return c

    def grow(self, capacity: int) -> None:
        """Reallocate to `capacity` rows (the Length's capacity is set by the caller)."""
        B, H2, rows, D = self.kv.shape
        if capacity > rows:
            pad = mx.zeros((B, H2, capacity - rows, D), dtype=self.kv.dtype)
            self.kv = mx.concatenate([self.kv, pad], axis=2)

    @property
    def keys(self) -> mx.array:
        return self.kv[:, : self.kv.shape[1] // 2]

    @property
    def values(self) -> mx.array:
        return self.kv[:, self.kv.shape[1] // 2 :]

    @property
    def offset(self) -> mx.array:
        return self.length.offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return self.write(mx.concatenate([keys, values], axis=1))

    def write(self, kv: mx.array) -> tuple[mx.array, mx.array]:
        """Write a forward's keys and values stacked as one [1, 2H, L, D] array; returns
        the (keys, values) views of the whole buffer."""
        rows = self.length.write_index(kv.shape[2])
        self.kv = mx.put_along_axis(self.kv, rows, kv, axis=2)
        return self.keys, self.values

    def make_mask(self, N: int, return_array: bool = False, window_size: int | None = None):
        if window_size is not None:
            raise ValueError("StaticKVCache serves full-attention layers only")
        return self.length.causal_mask(N)

    def trim(self, n: int) -> int:
        return 0  # the length moves only when the session commits

    @property
    def state(self):
        return self.keys, self.values


def write_stacked(cache: object, kv: mx.array) -> tuple[mx.array, mx.array]:
    """Give `cache` a forward's keys and values stacked as [B, 2H, L, D] (the q/k/v
    kernel's output): one scatter into a StaticKVCache, else the cache's own update."""
    if isinstance(cache, StaticKVCache):
        return cache.write(kv)
    h = kv.shape[1] // 2
    return cache.update_and_fetch(kv[:, :h], kv[:, h:])

    def is_trimmable(self) -> bool:
        return False
