"""One sequence's caches (target and draft), and the only code that changes them.

A `VerifySession` owns the target's cache list and the draft's context cache, as one
flat list (`make_prompt_cache`), so a prompt cache carries both across calls and
mlx_lm's prompt-cache helpers (save / load / trim) work on it unchanged. It

- hooks the target once, on entry, through `patch.Patches` (tapped layers, the
  recurrent mixers' recorders, verify attention routing) and undoes it all on exit;
- checks on the first forward which cache each layer really uses (`tap.bind_caches`);
- `prefill`s a prompt as mlx_lm does (same chunks, KV quantization at the same steps);
- `propose`s a block with the draft, after adding the committed context to the
  draft's cache;
- `verify`s a block with one target forward (split once where mlx_lm's KV
  quantization starts inside the block) and keeps a checkpoint;
- `commit`s n tokens: every cache back to the last accepted position (rollback.py),
  the accepted positions' tapped features queued for the draft's context;
- with static caches (`go_static`: dense targets, lengths on the device) runs a whole
  cycle as one compiled graph (`compile_static`), queued before the host reads the last.

Invariant between calls: the target caches hold the tokens fed so far and the draft
caches the tapped context of exactly those positions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.models import cache as mlx_lm_cache
from mlx_lm.models.cache import KVCache, RotatingKVCache

from . import fuse, fused_layers
from .drafter import DraftModel
from .kernels import routing
from .patch import Patches
from .rollback import Rollback
from .sampling import SamplingParams
from .static_cache import Length, StaticKVCache
from .tap import CALLED, Tap, bind_caches, embedding_and_head, target_layers

_META_PREFIX = "dflash_"


def _target_cache(model: nn.Module, max_kv_size: int | None = None) -> list[Any]:
    return mlx_lm_cache.make_prompt_cache(model, max_kv_size=max_kv_size)


def make_prompt_cache(
    model: nn.Module, draft: DraftModel, max_kv_size: int | None = None
) -> list[Any]:
    """mlx_lm's prompt cache for the target, followed by the draft's context caches."""
    return _target_cache(model, max_kv_size) + draft.make_cache()


def n_target_caches(model: nn.Module, draft: DraftModel, cache: list[Any]) -> int:
    """Where the target's part of a flat DFlash prompt cache ends (checked)."""
    n = len(_target_cache(model))
    if len(cache) != n + len(draft.layers):
        raise ValueError(
            f"prompt cache has {len(cache)} entries; this target and draft need "
            f"{n} + {len(draft.layers)} (make it with dflash_mlx.make_prompt_cache(model, draft))"
        )
    return n


def pair_fingerprint(model: nn.Module, draft: DraftModel) -> dict[str, str]:
    """What identifies a target/draft pair in a saved prompt cache: shapes and a few
    weights of both, so another model of the same architecture is refused too."""
    embed, _ = embedding_and_head(model)
    probe = embed(mx.array([0, 1])).astype(mx.float32)
    draft_w = draft.fc.weight
    draft_probe = (draft_w if draft_w.dtype != mx.uint32 else draft.fc.scales).astype(mx.float32)
    layers = target_layers(model)
    return {
        "target": f"{type(model).__module__}:{len(layers)}:{probe.shape[-1]}:"
        f"{embed.weight.shape[0]}:{mx.sum(probe).item():.6e}",
        "draft": f"{len(draft.layers)}:{draft.block_size}:{draft.config.target_layer_ids}:"
        f"{mx.sum(draft_probe[:4]).item():.6e}",
    }


def save_prompt_cache(
    file: str,
    cache: list[Any],
    model: nn.Module,
    draft: DraftModel,
    metadata: dict[str, str] | None = None,
) -> None:
    """mlx_lm's prompt-cache file, with the target/draft pair recorded in its metadata."""
    n_target_caches(model, draft, cache)
    meta = dict(metadata or {})
    meta.update({_META_PREFIX + k: v for k, v in pair_fingerprint(model, draft).items()})
    mlx_lm_cache.save_prompt_cache(file, cache, meta)


def load_prompt_cache(
    file: str, model: nn.Module, draft: DraftModel
) -> tuple[list[Any], dict[str, str]]:
    """A prompt cache saved by `save_prompt_cache`; refuses one made for another pair."""
    cache, meta = mlx_lm_cache.load_prompt_cache(file, return_metadata=True)
    saved = {k[len(_META_PREFIX) :]: v for k, v in meta.items() if k.startswith(_META_PREFIX)}
    if not saved:
        raise ValueError(f"{file}: not a DFlash prompt cache (no target/draft pair recorded)")
    for side, value in pair_fingerprint(model, draft).items():
        if saved.get(side) != value:
            raise ValueError(f"{file}: prompt cache was made for another {side} model")
    n_target_caches(model, draft, cache)
    return cache, {k: v for k, v in meta.items() if not k.startswith(_META_PREFIX)}


@dataclass
class KVQuantization:
    """mlx_lm's `kv_bits` / `kv_group_size` / `quantized_kv_start`."""

    bits: int | None = None
    group_size: int = 64
    start: int = 5000

    def apply(self, cache: list[Any]) -> None:
        """mlx_lm's maybe_quantize_kv_cache, on the target's caches only."""
        if self.bits is None:
            return
        for i, c in enumerate(cache):
            if isinstance(c, KVCache) and c.offset >= self.start:
                cache[i] = c.to_quantized(group_size=self.group_size, bits=self.bits)


class VerifySession:
    """One sequence: the target's caches and the draft's context, checkpointed per verify.

    Use as a context manager: entering hooks the target, leaving restores it.
    """

    def __init__(
        self,
        model: nn.Module,
        draft: DraftModel,
        cache: list[Any] | None = None,
        *,
        max_kv_size: int | None = None,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
        quantized_kv_start: int = 5000,
    ):
        self.model, self.draft = model, draft
        if cache is None:
            cache = make_prompt_cache(model, draft, max_kv_size)
        n = n_target_caches(model, draft, cache)
        self.cache = cache
        self.target_cache = cache[:n]  # entries replaced by quantization: written back
        self.draft_cache = cache[n:]
        self.kv = KVQuantization(kv_bits, kv_group_size, quantized_kv_start)
        if kv_bits is not None and any(isinstance(c, RotatingKVCache) for c in cache[:n]):
            raise ValueError("kv_bits does not work with rotating (windowed) KV caches")
        self.offset = self._check_offsets()
        self.layers = target_layers(model)
        self.tap = Tap(model, draft.config.target_layer_ids)
        self.rollback: Rollback | None = None
        self._patches = Patches()
        # Committed positions' features not in the draft cache yet: plain decode steps
        # leave theirs here until the next proposal needs them (one context update).
        self._pending: list[mx.array] = []
        self._verify: tuple[int, int] | None = None  # (offset before, block length)
        self._block_start = self.offset  # offset before the last verify or decode step
        self._unquantized: dict[int, Any] = {}
        self.length: Length | None = None  # set while the caches are static (go_static)
        self._inflight = 0  # static verifies whose accepted count the host has not read
        self._last_start = self.offset  # offset before the last committed cycle's block
        self._pair_arrays: list[mx.array] | None = None  # parameters, for compile_static

    def _check_offsets(self) -> int:
        target = {c.offset for c in self.target_cache if hasattr(c, "offset")}
        draft = {c.offset for c in self.draft_cache}
        if len(target) > 1:
            raise ValueError(f"prompt cache: target caches disagree on their length {target}")
        length = target.pop() if target else 0
        if draft != {length}:
            raise ValueError(
                f"prompt cache: draft context holds {sorted(draft)} positions, the target {length}"
            )
        return length

    # -- hooks ------------------------------------------------------------------------

    def __enter__(self) -> VerifySession:  # noqa: PYI034
        self.draft.bind(self.model)
        try:
            fused_layers.install_blocks(self.model, self._patches)  # before the tap: see there
            self.tap.install(self._patches)
            routing.install(self.model, self._patches)
            fuse.install(self.model, self._patches)
            fused_layers.install(self.model, self._patches)
            fuse.install(self.draft, self._patches, self.draft.layers, when=fuse.draft_rows)
        except BaseException:
            self._patches.restore()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._patches.restore()

    def _bind(self, bound: list[list[Any]]) -> None:
        """Check the layer/cache pairing seen on the first forward; set up rollback."""
        name = type(self.model).__name__
        for i, seen in enumerate(bound):
            if seen.count(CALLED) != 1:
                raise ValueError(
                    f"{name}: layer {i} ran {seen.count(CALLED)} times in one forward; "
                    f"its cache list ({len(self.target_cache)} caches for "
                    f"{len(self.layers)} layers) does not match its layers"
                )
        used = {id(c) for seen in bound for c in seen if c is not CALLED}
        unused = [i for i, c in enumerate(self.target_cache) if id(c) not in used]
        if unused:
            raise ValueError(
                f"{name}: caches {unused} of {len(self.target_cache)} are used by no layer; "
                f"its cache list does not match its {len(self.layers)} layers"
            )
        caches = [[c for c in seen if c is not CALLED] for seen in bound]
        self.rollback = Rollback(self.model, self.layers, self.target_cache, caches)
        self.rollback.install(self._patches)

    def _forward(self, tokens: mx.array) -> mx.array:
        """One target forward over tokens [L] on the target caches; logits [L, V]."""
        if self.rollback is None:
            with bind_caches(self.layers, self.target_cache) as bound:
                logits = self.model(tokens[None], cache=self.target_cache)
            self._bind(bound)
        else:
            logits = self.model(tokens[None], cache=self.target_cache)
        return logits[0]

    def _write_back(self) -> None:
        if self.length is None:  # static buffers never reach the caller's list
            self.cache[:] = self.target_cache + self.draft_cache

    # -- the cycle --------------------------------------------------------------------

    def prefill(
        self,
        prompt: mx.array,
        step: int = 2048,
        progress: Callable[[int, int], None] | None = None,
    ) -> mx.array:
        """Feed the prompt as mlx_lm's generate_step does (chunks, then the last token
        alone), caching its tapped features in the draft cache. Returns the last
        position's logits [1, V]."""
        progress = progress or (lambda *_: None)
        total = prompt.size
        progress(0, total)
        done = 0
        while total - done > 1:
            n = min(step, total - done - 1)
            self._feed(prompt[done : done + n])
            mx.eval([c.state for c in self.cache])
            done += n
            progress(done, total)
            mx.clear_cache()
        logits = self._feed(prompt[done:])
        return logits[-1:]

    def _feed(self, tokens: mx.array) -> mx.array:
        logits = self._forward(tokens)
        self.kv.apply(self.target_cache)
        self._write_back()
        self.draft.add_context(self.tap.features(), self.draft_cache)
        self.offset += tokens.size
        return logits

    def feed(self, tokens: mx.array) -> mx.array:
        """Commit tokens [L] as they are (no verify): target forward, draft context."""
        self._flush()
        return self._feed(tokens)

    def _flush(self) -> None:
        if self._pending:
            pending = self._pending
            features = pending[0] if len(pending) == 1 else mx.concatenate(pending, axis=1)
            self.draft.add_context(features, self.draft_cache)
            self._pending = []

    def decode(self, token: mx.array) -> mx.array:
        """A cycle of width 1: one plain target step on token [1], as mlx_lm decodes
        (nothing to verify, nothing to roll back). Its tapped features wait for the next
        proposal. Returns logits [1, V]."""
        if self.rollback is None:
            raise RuntimeError("decode before prefill")
        self._verify, self._block_start = None, self.offset
        logits = self._forward(token)
        self.kv.apply(self.target_cache)
        self._write_back()
        self._pending.append(self.tap.features())
        if len(self._pending) >= 64:  # a long run of plain steps: bound the list
            self._flush()
        self.offset += 1
        return logits

    def propose(
        self, anchor: mx.array, n: int, sampling: SamplingParams, window: int | None = None
    ) -> tuple[mx.array, mx.array | None]:
        """The draft's n tokens after `anchor` [1] (the last committed token)."""
        if n == 0:
            return mx.zeros((0,), dtype=mx.int32), None
        self._flush()
        return self.draft.propose(anchor, self.draft_cache, n, sampling, window)

    def verify(self, block: mx.array) -> mx.array:
        """One target forward over block [L] = anchor + drafts; logits [L, V] float/bf16.

        Where mlx_lm would start quantizing the KV cache inside the block, the block
        runs as two forwards split at that position, so every query sees the keys
        mlx_lm's sequential decoding would."""
        if self.rollback is None:
            raise RuntimeError("verify before prefill")
        L = block.size
        if self.length is not None:
            return self._verify_static(block)
        self._flush()  # (a proposal already did): a commit's features follow these
        self._verify = (self.offset, L)
        self._block_start = self.offset
        self.rollback.checkpoint()
        split = self.kv.start - self.offset if self.kv.bits is not None else 0
        with routing.verifying():
            if 0 < split < L and self._quantizable():
                first = self._forward(block[:split])
                features = self.tap.features()
                self._unquantized = dict(enumerate(self.target_cache))
                self.kv.apply(self.target_cache)
                logits = mx.concatenate([first, self._forward(block[split:])])
                self._features = mx.concatenate([features, self.tap.features()], axis=1)
            else:
                self._unquantized = {}
                sinks = self._sink_masks(L) if L > 1 else []
                for c in sinks:
                    c.make_mask = lambda N, c=c, **_: _decode_window_mask(c, N)
                try:
                    logits = self._forward(block)
                finally:
                    for c in sinks:
                        del c.make_mask
                self._features = self.tap.features()
        self._after_verify = list(self.target_cache)
        return logits

    def _sink_masks(self, L: int) -> list[RotatingKVCache]:
        """Rotating caches with sink tokens (mlx_lm's max_kv_size) whose window the
        block would pass: mlx_lm decodes those one token at a time, each query seeing
        the sinks and the last max_size - keep positions, but its multi-token mask is a
        plain window. The verify must see what decoding sees (`_decode_window_mask`)."""
        return [
            c
            for c in self.target_cache
            if isinstance(c, RotatingKVCache) and c.keep > 0 and c.offset + L > c.max_size
        ]

    def _quantizable(self) -> bool:
        return any(isinstance(c, KVCache) for c in self.target_cache)

    def decide(self, n_acc: mx.array, nxt: mx.array) -> tuple[mx.array, mx.array]:
        """The cycle's outcome (accepted drafts, next token) as every process must see
        it; one process here, so as computed (a sharded session broadcasts it)."""
        return n_acc, nxt

    def commit(self, n_keep: int | mx.array) -> None:
        """Keep the first n_keep block positions of the last verify (anchor included).
        May be called again with a smaller n_keep until the next verify. Static caches
        take n_keep as a device array: nothing waits for the host."""
        if self.length is not None:
            # The verify's features of the whole block go to the draft's context at the
            # current offset; only the first n_keep count once the length moves.
            self.draft.add_context(self._features, self.draft_cache)
            self.length.set(self.length.offset + n_keep)
            return
        start, L = self._verify
        self._last_start = start
        self.target_cache[:] = self._after_verify  # a second commit starts over
        if self._unquantized and start + n_keep < self.kv.start:
            # mlx_lm quantizes once its cache reaches kv.start: short of it, go on with
            # the unquantized caches (the quantized copies served the block's tail only).
            for i, c in self._unquantized.items():
                self.target_cache[i] = c
        self.rollback.commit(n_keep, L)
        self.kv.apply(self.target_cache)
        self._write_back()
        self.offset = start + n_keep
        self._pending = [self._features[:, :n_keep]] if n_keep else []

    def state_arrays(self) -> list[Any]:
        """What to evaluate to make the caches real (after a commit)."""
        length = [] if self.length is None else [self.length.offset]
        return [c.state for c in self.target_cache + self.draft_cache] + self._pending + length

    # -- static caches: lengths on the device, so cycles queue ahead of the host --------

    def can_go_static(self, positions: int | None = None) -> bool:
        """Every cache a plain KVCache, no KV quantization (static_cache.py), and the
        sequence (`positions`, if known) short enough for this backend to gain."""
        caches = self.target_cache + self.draft_cache
        if self.kv.bits is not None or not all(type(c) is KVCache for c in caches):
            return False
        limit = STATIC_MAX_POSITIONS.get(_backend(), 0)
        return positions is not None and positions <= limit

    def go_static(self, positions: int) -> None:
        """Move the caches into static buffers with room for `positions` in all (the
        generation's whole length: a compiled cycle is traced once per buffer shape)."""
        self.length = Length(self.offset, _capacity(positions))
        self.target_cache[:] = [
            StaticKVCache.from_kv_cache(c, self.length) for c in self.target_cache
        ]
        self.draft_cache[:] = [
            StaticKVCache.from_kv_cache(c, self.length) for c in self.draft_cache
        ]
        self._inflight = 0

    def reserve(self, L: int) -> None:
        """Before a static cycle of L positions (host bookkeeping, outside any compiled
        code): the device's offset may be up to L per unread cycle past the host's, and
        nothing may be written past the capacity, so grow the buffers if needed."""
        need = self.offset + L * (self._inflight + 1)
        self._inflight += 1
        if need > self.length.capacity:
            self.length.capacity = _capacity(need)
            self.length.set(self.length.offset)  # masks are per capacity
            for c in self.target_cache + self.draft_cache:
                c.grow(self.length.capacity)

    def _verify_static(self, block: mx.array) -> mx.array:
        with routing.verifying():
            logits = self._forward(block)
        self._features = self.tap.features()
        return logits

    def compile_static(self, cycle: Callable[[mx.array], Any], key: tuple) -> CompiledCycle:
        """`cycle(anchor)` (propose, verify, accept, commit on the static caches) as one
        mx.compile'd function, the caches' buffers and device length passed in and out
        as explicit state: after the first trace a call replays the recorded graph
        (no Python model code, elementwise chains fused). At each buffer size (growth)
        one call runs eagerly, then one traces. Host bookkeeping (`reserve`) stays
        outside. `key` names what the cycle computes besides the pair (width, sampling,
        draft window): the compiled function is kept on the target for later
        generations of the same pair, weights and kernel choices, so that a generation
        does not trace again what an earlier one traced (and the block policy does not
        take a trace's time for a width's cost: results/cycle_session8.md)."""
        store = self.model.__dict__.setdefault("_dflash_compiled_cycles", {})
        key = (key, id(self.draft), type(self), routing.choices(), fuse.enabled())
        if self._pair_arrays is None:  # once per session: the widths share it
            self._pair_arrays = _leaves(self.model) + _leaves(self.draft)
        weights = self._pair_arrays
        entry = store.pop(key, None)  # re-inserted last: the store is in order of use
        if entry is None or not entry.same_weights(weights):
            entry = CompiledCycle(weights)
            if len(store) >= MAX_COMPILED_CYCLES:  # a server's many sampling settings
                del store[next(iter(store))]
        store[key] = entry
        entry.bound[:] = [self, cycle]
        return entry

    def _static_state(self) -> list[mx.array]:
        caches = self.target_cache + self.draft_cache
        return [self.length.offset] + [c.kv for c in caches]

    def _set_static_state(self, arrays: list[mx.array]) -> None:
        self.length.set(arrays[0])  # also drops masks made from the previous offset
        for i, c in enumerate(self.target_cache + self.draft_cache):
            c.kv = arrays[1 + i]

    def committed(self, n_keep: int) -> None:
        """The host has read a static cycle's accepted count: n_keep positions."""
        self._last_start = self.offset
        self.offset += n_keep
        self._inflight -= 1

    def keep(self, n_keep: int) -> None:
        """Of the last cycle the host read, keep n_keep positions (anchor included); in
        static mode this also ends it, dropping any cycle queued after that one."""
        if self.length is not None:
            n = self._last_start + n_keep
            self.target_cache[:] = [c.to_kv_cache(n) for c in self.target_cache]
            self.draft_cache[:] = [c.to_kv_cache(n) for c in self.draft_cache]
            self.length, self.offset, self._inflight = None, n, 0
            self._write_back()
        elif self._verify is not None:
            self.commit(n_keep)

    def settle(self, n: int, valid: int, tail: list[int]) -> None:
        """End a generation with the caches holding exactly the sequence's first n
        positions: of the last block (the last read one, in static mode), `valid`
        positions (its anchor and the drafts that were emitted), then the emitted
        tokens after them, the end of `tail`, fed. The draft's context follows."""
        if self.length is not None:
            start = self._last_start
        elif self._verify is not None or self._block_start < self.offset:
            start = self._block_start
        else:  # nothing ran after the prefill
            start, valid = self.offset, 0
        keep = min(n - start, valid)
        if self.length is not None or self._verify is not None:
            self.keep(keep)
        if n - start > keep:
            self.feed(mx.array(tail[keep - (n - start) :], dtype=mx.int32))
        self.finish()

    def finish(self) -> None:
        """Leave the draft cache holding the context of every fed position."""
        self._flush()


def _leaves(module: nn.Module) -> list[mx.array]:
    return [a for _, a in tree_flatten(module.parameters())]


@dataclass
class CompiledCycle:
    """A static cycle compiled once and called as `cycle(anchor)`, for the session and
    cycle function in `bound` (a later generation rebinds it: a re-trace at a new
    buffer size traces those). `cold`: the last call ran eagerly or traced, so its time
    is no cycle's cost."""

    weights: list[mx.array]  # the arrays the trace captured (held: ids stay unique)
    bound: list[Any] = field(default_factory=list)  # [session, cycle]
    warm: set[int] = field(default_factory=set)  # buffer sizes run eagerly once
    traced: set[int] = field(default_factory=set)  # ... and traced once
    cold: bool = False

    def __post_init__(self) -> None:
        def pure(arrays: list[mx.array], anchor: mx.array):
            session, cycle = self.bound
            session._set_static_state(arrays)
            out = cycle(anchor)
            return out, session._static_state()

        # The sampler's random key is implicit state too: seeded runs repeat.
        self._compiled = mx.compile(pure, inputs=mx.random.state, outputs=mx.random.state)

    def __call__(self, anchor: mx.array):
        session, cycle = self.bound
        capacity = session.length.capacity
        self.cold = capacity not in self.traced
        if capacity not in self.warm:
            # Eagerly first at each buffer size: kernel self-checks and the small
            # constant arrays they cache evaluate, which a trace may not.
            self.warm.add(capacity)
            return cycle(anchor)
        self.traced.add(capacity)
        out, arrays = self._compiled(session._static_state(), anchor)
        session._set_static_state(arrays)
        return out

    def same_weights(self, weights: list[mx.array]) -> bool:
        return len(weights) == len(self.weights) and all(
            a is b for a, b in zip(weights, self.weights, strict=True)
        )


# Where static caches measured no slower than the general path (positions = prompt +
# max_tokens), per backend. H200, MLX 0.32.4 CUDA, Qwen3-8B shape, bf16, one process
# alternating the loops (benchmarks/ab_cycle.py; results/cycle_session7.md): at 16k
# context (24,576-row buffers) the compiled static cycle took 15.5 / 17.4 ms against the
# general path's 24.6 / 17.4 ms in two rounds, once the cache writes became scatters
# (static_cache.py; before, 24-25.5 vs 15.4-19.7 ms). Longer: not measured, so not used.
# Metal and the CPU: not measured, so not used.
STATIC_MAX_POSITIONS: dict[str, int] = {"cuda": 24576}
MAX_COMPILED_CYCLES = 32  # kept per target, least recently used dropped first


def _backend() -> str:
    if mx.default_device() != mx.gpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda" if mx.cuda.is_available() else "cpu"


def _capacity(n: int) -> int:
    """Static buffer rows for n positions: 256, 384, 512, 768, 1024, 1536, ... (powers of
    two and 1.5 times them): masked attention reads the whole buffer, so at most a third
    is slack, and a compiled cycle retraces only O(log n) times as sequences grow."""
    top = max(256, 1 << (n - 1).bit_length())
    return top * 3 // 4 if top >= 512 and top * 3 // 4 >= n else top


def _decode_window_mask(cache: RotatingKVCache, N: int) -> mx.array:
    """[N, S] mask over the keys a multi-token update of `cache` returns (taken before
    the update), giving query i what one-token decoding at its position would see:
    the `keep` sink positions and the last max_size - keep positions up to itself."""
    o, M, keep = cache.offset, cache.max_size, cache.keep
    old = min(o, M - 1)  # positions kept before the new ones, in temporal order
    j = mx.arange(old + N)
    if o >= M - 1:  # sinks, then the most recent old - keep positions, then the block
        pos = mx.where(j < keep, j, o - old + j)
    else:
        pos = j
    query = (o + mx.arange(N))[:, None]
    pos = pos[None]
    return (pos <= query) & ((pos < keep) | (pos > query - (M - keep)))


def prefill_prompt_cache(
    model: nn.Module,
    draft: DraftModel,
    prompt: mx.array | list[int],
    cache: list[Any],
    prefill_step_size: int = 2048,
    progress_callback: Callable[[int, int], None] | None = None,
    **kv: Any,
) -> None:
    """Feed a whole prompt into a DFlash prompt cache, as `mlx_lm.cache_prompt` does for
    mlx_lm's: afterwards the cache holds every prompt token (the target's caches and
    the draft's context), ready for `stream_generate(..., prompt_cache=cache)` with the
    next tokens. `kv` takes max_kv_size / kv_bits / kv_group_size / quantized_kv_start."""
    prompt = mx.array(prompt) if not isinstance(prompt, mx.array) else prompt
    if prompt.size == 0:
        raise ValueError("the prompt is empty")
    with VerifySession(model, draft, cache, **kv) as session:
        # prefill keeps the last token apart (mlx_lm computes its logits alone); here it
        # is just one more position to cache.
        session.prefill(prompt, prefill_step_size, progress_callback)
        mx.eval(session.state_arrays())
