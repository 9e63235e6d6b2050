"""DFlash over a target sharded with mlx.distributed (several processes or Macs).

Start every process with `mlx.launch` (or MLX's ring / JACCL environment). The target
is sharded one of two ways, chosen as `mlx_lm.chat` and `mlx_lm.server` choose:

- tensor parallel (the default): mlx_lm's `sharded_load`, the family's own `shard()`;
  every process runs every layer on a slice of the heads, so every process sees every
  tapped hidden state;
- pipeline parallel (`load(..., pipeline=True)`, `--pipeline`): our own contiguous
  layer split (`pipeline`), for every family with a layer list, also those mlx_lm 0.32
  does not pipeline (qwen3, llama, gemma3, ...). As in mlx_lm's PipelineMixin, rank 0
  runs the last layers and rank size-1 the first ones; the hidden state goes down the
  ranks with send/recv. The draft's tapped layers ride along: what rank r sends is the
  hidden state followed by the outputs of the tapped layers it and the ranks before it
  ran, so rank 0 ends up with all of them (one message per hop, neighbours only).

The draft runs on rank 0 (`DRAFT_RANK`) only. `ShardedSession` (a `VerifySession`)
broadcasts what the other processes need from it: the drafted block after `propose`,
the cycle's outcome after the accept (`decide`), and, once per generation, the
prefill's logits and the random key. Every process then runs the same loop with the
same tokens: the same target forwards (in the same order, so the collectives match),
the same rollback of its own caches. The other ranks hold the draft's config only
(`RemoteDraft`): their draft caches count positions.

Every process calls the same API (`stream_generate` / `generate` here, or
`dflash_cycles(..., session_class=ShardedSession)`); rank 0's output is the result.
Greedy output equals the unsharded target's; a pipeline-parallel target computes
exactly what the unsharded one does, so with a shared seed sampling gives the same
tokens too (tensor parallel sums its slices in another order: equal up to rounding).
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_map
from mlx_lm.models.cache import ArraysCache, KVCache, _BaseCache

from .drafter import DraftModel, target_embed_scale
from .session import VerifySession
from .tap import embedding_and_head, target_layers

# The module, not the function the package exports under the same name.
_generate = importlib.import_module(".generate", __package__)

DRAFT_RANK = 0  # the process that runs the draft and decides acceptance

_PIPELINE = "_dflash_pipeline"  # attribute of a model split by `pipeline`
_DRAFT_HEAD = "_dflash_draft_head"  # a whole copy of a tensor-sharded LM head (rank 0)
_SHARDED_HEADS = ("AllToShardedLinear", "QuantizedAllToShardedLinear")
_CONFIG_FILES = [
    "*.json",
    "*.py",
    "tokenizer.model",
    "*.tiktoken",
    "tiktoken.model",
    "*.txt",
    "*.jsonl",
    "*.jinja",
]


def world() -> mx.distributed.Group:
    """The group of every process `mlx.launch` started (size 1 without it)."""
    return mx.distributed.init()


# -- pipeline parallel: our own layer split -----------------------------------------


class Positions(_BaseCache):
    """The cache of a recurrent layer another rank runs: only the number of positions.

    It stands where the layer's ArraysCache would, so the model's masks and the
    session's length checks and rollback read what they read for a real one."""

    def __init__(self):
        self.offset = 0

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def make_mask(self, N: int, **_: Any) -> None:
        return None  # what an ArraysCache without padding gives

    def empty(self) -> bool:
        return self.offset == 0

    @property
    def nbytes(self) -> int:
        return 0


def layer_split(
    n_layers: int,
    size: int,
    split: list[int] | None = None,
    together: list[tuple[int, int]] = (),
) -> list[int]:
    """Layers per rank, rank 0 first (it runs the last layers): mlx_lm's even split
    (the low ranks get the extra ones), with no rank boundary between two layers of a
    pair in `together` (a layer and the earlier one whose K/V it reuses)."""
    if split is None:
        if size > n_layers:
            raise ValueError(f"cannot split {n_layers} layers over {size} processes")
        base, extra = divmod(n_layers, size)
        split = [base + (1 if r < extra else 0) for r in range(size)]
        if together:
            split = _keep_together(split, n_layers, together)
    if len(split) != size or any(s <= 0 for s in split) or sum(split) != n_layers:
        raise ValueError(
            f"layer split {split} must give each of {size} processes at least one of "
            f"{n_layers} layers"
        )
    return split


def _keep_together(split: list[int], n_layers: int, together: list[tuple[int, int]]) -> list[int]:
    """Move each boundary of `split` to the nearest position that separates no pair."""
    # A boundary at b: layers < b on one rank, >= b on the next (layer order).
    allowed = [b for b in range(1, n_layers) if not any(min(p) < b <= max(p) for p in together)]
    ideal = [sum(split[::-1][: k + 1]) for k in range(len(split) - 1)]
    chosen: list[int] = []
    for k, b in enumerate(ideal):
        left = len(ideal) - k - 1  # boundaries still to place after this one
        options = [a for a in allowed if a > (chosen[-1] if chosen else 0)]
        options = options[: len(options) - left] if left else options
        if not options:
            raise ValueError(
                f"no split of {n_layers} layers over {len(split)} processes keeps each "
                "layer on the process of the layer whose K/V it reuses"
            )
        chosen.append(min(options, key=lambda a: abs(a - b)))
    edges = [0, *chosen, n_layers]
    return [edges[i + 1] - edges[i] for i in range(len(split))][::-1]


def _cache_argument(args: tuple, kwargs: dict) -> Any:
    for a in (*args, *kwargs.values()):
        if isinstance(a, _BaseCache):
            return a
    return None


def _advance(cache: Any, batch: int, length: int) -> None:
    """Move a stand-in cache on by `length` positions, storing nothing: zero-width keys
    and values (a real cache of the layer's own kind, so masks come out the same)."""
    if isinstance(cache, Positions):
        cache.offset += length
    else:
        empty = mx.zeros((batch, 1, length, 0))
        cache.update_and_fetch(empty, empty)


def _tie(cache: Any, dependency: list[mx.array] | mx.array) -> bool:
    """Make the cache's arrays depend on `dependency`, so evaluating the cache (as
    prefill does between chunks) also runs it (a send). False if nothing to tie to."""
    if isinstance(cache, ArraysCache):
        for i, a in enumerate(cache.cache):
            if a is not None:
                cache[i] = mx.depends(a, dependency)
                return True
        return False
    keys = getattr(cache, "keys", None)
    if isinstance(keys, mx.array):
        cache.keys = mx.depends(keys, dependency)
        return True
    if isinstance(keys, tuple) and keys:  # QuantizedKVCache: (packed, scales, biases)
        cache.keys = (mx.depends(keys[0], dependency), *keys[1:])
        return True
    return False


def _find(model: nn.Module, name: str) -> Any:
    """An attribute of the module that holds the layers (model.model, language_model...)."""
    for path in ("model", "language_model.model", "language_model", ""):
        m = model
        for part in filter(None, path.split(".")):
            m = getattr(m, part, None)
        if m is not None and name in getattr(m, "__dict__", {}) | dict(m):
            return getattr(m, name)
    return None


def _kv_pairs(model: nn.Module) -> list[tuple[int, int]]:
    """(j, i): layer i reuses the K/V layer j computed (Gemma 4's shared-KV layers)."""
    sources = _find(model, "previous_kvs") or []
    return [(j, i) for i, j in enumerate(sources) if i != j]


class Pipeline:
    """One rank's part of a pipelined target: layers [start, end) run here.

    Every other layer keeps its module (attributes the model's code reads, such as
    `is_linear` or `use_sliding`) but no weights, and passes its input through; its
    cache is a stand-in that only counts positions. The first layer receives what the
    next rank sent; the last layer here sends on to the previous rank."""

    def __init__(self, model: nn.Module, group: mx.distributed.Group, split: list[int]):
        self.group, self.rank, self.size = group, group.rank(), group.size()
        self.split = split
        self.start, self.end = self.layers_of(self.rank)
        self.carry: tuple[int, ...] = ()  # tapped layers whose outputs travel to rank 0
        # Gemma 4's layers return (hidden, K/V, offset) and later layers reuse K/V.
        self.kv_sources: list[int] | None = _find(model, "previous_kvs")
        self._received: dict[int, mx.array] = {}
        self._hidden: mx.array | None = None
        self._taps: dict[int, mx.array] = {}
        self._cache: Any = None
        self.sent: list[mx.array] = []

    def layers_of(self, rank: int) -> tuple[int, int]:
        start = sum(self.split[rank + 1 :])
        return start, start + self.split[rank]

    def owns(self, i: int) -> bool:
        return self.start <= i < self.end

    def check(self) -> None:
        """What no split can run; checked for every rank's layers, so that every
        process raises the same error (one that went on would wait for the others)."""
        if self.kv_sources is None:
            return
        for rank in range(self.size):
            start, end = self.layers_of(rank)
            for i, j in enumerate(self.kv_sources):
                if start <= i < end and not start <= j < end:
                    raise ValueError(
                        f"layer {i} reuses the K/V of layer {j}, which another process "
                        "runs: this layer split cannot pipeline this model"
                    )

    def take_sent(self) -> list[mx.array]:
        sent, self.sent = self.sent, []
        return sent

    def _carried(self, below: int) -> list[int]:
        return [j for j in self.carry if j < below]

    def _begin(self, x: mx.array) -> None:
        """At the first layer of a forward: receive the hidden state (and the tapped
        outputs of the layers before ours) from the next rank."""
        self._taps, self._received, self._cache = {}, {}, None
        if self.rank == self.size - 1:
            return
        up = self._carried(self.start)
        B, L, H = x.shape
        message = mx.distributed.recv(
            (B, L, H * (1 + len(up))), x.dtype, self.rank + 1, group=self.group
        )
        self._hidden = message[..., :H]
        self._received = {j: message[..., H * (k + 1) : H * (k + 2)] for k, j in enumerate(up)}

    def _send(self, h: mx.array) -> None:
        parts = [h] + [
            self._received[j] if j < self.start else self._taps[j] for j in self._carried(self.end)
        ]
        message = mx.concatenate(parts, axis=-1) if len(parts) > 1 else h
        sent = mx.distributed.send(message, self.rank - 1, group=self.group)
        self.sent.append(sent)
        if self._cache is None or not _tie(self._cache, sent):
            raise RuntimeError(f"rank {self.rank}: no cache of its layers to tie the send to")

    def own_hook(self, i: int) -> Callable:
        def run(call, layer, x, *args, **kwargs):
            if i == 0:
                self._begin(x)
            if i == self.start and self.rank < self.size - 1:
                x = self._hidden
            out = call(layer, x, *args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
            if i in self.carry:
                self._taps[i] = h
            if (cache := _cache_argument(args, kwargs)) is not None:
                self._cache = cache
            if i == self.end - 1 and self.rank > 0:
                self._send(h)
            return out

        return run

    def skip_hook(self, i: int) -> Callable:
        def skip(call, layer, x, *args, **kwargs):
            if i == 0:
                self._begin(x)
            if (cache := _cache_argument(args, kwargs)) is not None:
                _advance(cache, x.shape[0], x.shape[1])
            # A tapped layer of an earlier rank "outputs" what that rank computed, so
            # the session's tap records it here as if the layer had run.
            out = self._received.get(i, x)
            return (out, None, None) if self.kv_sources is not None else out

        return skip


def pipeline(
    model: nn.Module, group: mx.distributed.Group | None = None, split: list[int] | None = None
) -> nn.Module:
    """Split `model`'s layers over the processes of `group` (in place; before its
    weights are evaluated, so a lazily loaded model reads only this rank's layers).
    `split`: layers per rank, rank 0 first (rank 0 runs the last layers)."""
    from .patch import Patches

    group = group or world()
    if getattr(model, _PIPELINE, None) is not None:
        raise ValueError("the model is pipelined already")
    _check_not_mlx_lm_pipelined(model)
    layers = target_layers(model)
    pipe = Pipeline(model, group, layer_split(len(layers), group.size(), split, _kv_pairs(model)))
    pipe.check()
    patches = Patches()  # never restored: the split is part of the model from now on
    for i, layer in enumerate(layers):
        if pipe.owns(i):
            patches.hook_call(layer, pipe.own_hook(i))
        else:
            layer.update(tree_map(lambda p: mx.zeros((0,), p.dtype), layer.parameters()))
            patches.hook_call(layer, pipe.skip_hook(i))
    make_cache = getattr(model, "make_cache", None)
    if make_cache is not None:

        def stand_in_caches():
            caches = make_cache()
            return [
                Positions() if isinstance(c, ArraysCache) and not pipe.owns(i) else c
                for i, c in enumerate(caches)
            ]

        object.__setattr__(model, "make_cache", stand_in_caches)
    object.__setattr__(model, _PIPELINE, pipe)
    return model


def _check_not_mlx_lm_pipelined(model: nn.Module) -> None:
    if (_find(model, "pipeline_size") or 1) > 1:
        raise ValueError(
            "the target was pipelined by mlx_lm (sharded_load with a pipeline group): its "
            "layers send only the hidden state, so the draft's tapped layers on other "
            "processes cannot reach it; load it with dflash_mlx.distributed.load(..., "
            "pipeline=True)"
        )


# -- loading ----------------------------------------------------------------------


def load(
    path_or_hf_repo: str,
    *,
    pipeline: bool = False,
    group: mx.distributed.Group | None = None,
    tokenizer_config: dict | None = None,
    trust_remote_code: bool = False,
    split: list[int] | None = None,
) -> tuple[nn.Module, Any]:
    """Load this process's shard of a target: tensor parallel through mlx_lm's
    `sharded_load` (the default, as mlx_lm.chat), or our pipeline split. Every process
    calls it; returns (model, tokenizer) as mlx_lm.load does."""
    from .loading import _check_target_dir, _is_local

    group = group or world()
    if _is_local(path_or_hf_repo):
        _check_target_dir(str(path_or_hf_repo))
        path_or_hf_repo = str(Path(path_or_hf_repo).expanduser())
    kw = {"tokenizer_config": tokenizer_config, "trust_remote_code": trust_remote_code}
    if pipeline:
        return _pipeline_load(path_or_hf_repo, group, split, **kw)
    if split is not None:
        raise ValueError("a layer split is for pipeline parallelism")
    return _tensor_load(path_or_hf_repo, group, **kw)


def _tensor_load(repo: str, group: mx.distributed.Group, **kw: Any) -> tuple[nn.Module, Any]:
    from mlx_lm.utils import _download, _get_classes, load_model, sharded_load

    path = _download(repo, allow_patterns=_CONFIG_FILES)
    top = json.loads((path / "config.json").read_text())
    config, family = top.get("text_config", top), top.get("model_type", "?")
    unshardable = ValueError(
        f"{family}: mlx_lm cannot shard this family for tensor parallelism (its model "
        "has no shard()); use --pipeline (pipeline parallelism works for every family)"
    )
    try:
        model_class = _get_classes(top)[0]
    except ValueError:  # an unknown model type: sharded_load says so
        model_class = None
    if model_class is not None and not hasattr(model_class, "shard"):
        raise unshardable
    N = group.size()
    heads = config.get("num_attention_heads")
    if isinstance(heads, int) and heads % N:
        raise ValueError(
            f"{family}: {heads} attention heads do not split over {N} processes for "
            "tensor parallelism; use another process count, or --pipeline"
        )
    try:
        model, tokenizer = sharded_load(repo, None, group, **kw)
    except ValueError as e:
        if "does not support" not in str(e):
            raise
        raise unshardable from None
    except (AssertionError, IndexError) as e:
        raise ValueError(f"{family}: cannot shard it over {N} processes: {e}") from None
    _, head = embedding_and_head(model)
    if type(head).__name__ in _SHARDED_HEADS:
        # mlx_lm shards this family's untied LM head over the vocabulary; the draft needs
        # all of it on its own rank, with no collective: read a whole copy (only it).
        full_head = None
        if group.rank() == DRAFT_RANK:
            full, _ = load_model(
                path, lazy=True, strict=False, trust_remote_code=kw["trust_remote_code"]
            )
            _, full_head = embedding_and_head(full)
            mx.eval(full_head.parameters())
        object.__setattr__(model, _DRAFT_HEAD, full_head)  # every rank: see ShardedSession
    return model, tokenizer


def _local_files(path: Path, pipe: Pipeline) -> list[str] | None:
    """The weight files this rank needs (sharded_load's rule), or None if unindexed."""
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return None
    files = set()
    for name, file in json.loads(index.read_text())["weight_map"].items():
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        if m is None or pipe.owns(int(m.group(1))):
            files.add(file)
    return sorted(files)


def _pipeline_load(
    repo: str,
    group: mx.distributed.Group,
    split: list[int] | None,
    *,
    tokenizer_config: dict | None,
    trust_remote_code: bool,
) -> tuple[nn.Module, Any]:
    from mlx_lm.utils import _download, load_model, load_tokenizer

    local = Path(repo).exists()
    path = _download(repo, allow_patterns=_CONFIG_FILES)
    model, config = load_model(path, lazy=True, strict=False, trust_remote_code=trust_remote_code)
    if not local:  # fetch only this rank's layers, then read them
        n = len(target_layers(model))
        pipe = Pipeline(model, group, layer_split(n, group.size(), split, _kv_pairs(model)))
        files = _local_files(path, pipe)
        _download(repo, allow_patterns=files)  # None: everything
        model, config = load_model(
            path, lazy=True, strict=False, trust_remote_code=trust_remote_code
        )
    pipeline(model, group, split)
    mx.eval(model.parameters())
    tokenizer = load_tokenizer(
        path,
        tokenizer_config or {"trust_remote_code": True},
        eos_token_ids=config.get("eos_token_id", None),
    )
    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=mx.cpu))
    return model, tokenizer


# -- the session --------------------------------------------------------------------


class RemoteDraft:
    """The draft as the processes that do not run it see it: its config, and context
    caches that count positions (the session's length checks read them)."""

    def __init__(self, config: Any, n_layers: int):
        self.config = config
        self.layers = [None] * n_layers

    @classmethod
    def of(cls, draft: DraftModel) -> RemoteDraft:
        return cls(draft.config, len(draft.layers))

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    def bind(self, target: nn.Module) -> RemoteDraft:
        return self

    def make_cache(self) -> list[KVCache]:
        return [KVCache() for _ in self.layers]

    def add_context(self, features: mx.array, cache: list[KVCache]) -> None:
        if features.shape[1] == 0:
            return
        for c in cache:
            _advance(c, features.shape[0], features.shape[1])
        # The draft rank evaluates the features whenever it evaluates its draft cache;
        # with tensor parallelism they hold collectives (the tapped layers' all_sums),
        # which this process must then run too, in the same order.
        _tie(cache[0], features)

    def propose(self, anchor, cache, n, sampling, context_window=None):
        logq = None if sampling.greedy else mx.zeros((n, self.config.vocab_size), mx.float32)
        return mx.zeros((n,), mx.int32), logq


class ShardedSession(VerifySession):
    """A `VerifySession` for a target sharded over several processes (see the module
    docstring). Every process makes one and calls the same methods in the same order."""

    def __init__(self, model: nn.Module, draft: Any, cache: list[Any] | None = None, **kw: Any):
        _check_not_mlx_lm_pipelined(model)
        self.pipe: Pipeline | None = getattr(model, _PIPELINE, None)
        self.group = self.pipe.group if self.pipe is not None else world()
        self.drafting = self.group.rank() == DRAFT_RANK
        super().__init__(model, draft, cache, **kw)
        if not self.drafting:
            self.draft = RemoteDraft.of(draft)
        self._done: list[mx.array] = []

    def __enter__(self) -> ShardedSession:  # noqa: PYI034
        head = getattr(self.model, _DRAFT_HEAD, None)
        if not hasattr(self.model, _DRAFT_HEAD):  # checked the same way on every rank
            _, target_head = embedding_and_head(self.model)
            if type(target_head).__name__ in _SHARDED_HEADS:
                raise ValueError(
                    "the target's LM head is sharded over the processes (mlx_lm does that "
                    "for this family): the draft needs all of it on rank 0; load the "
                    "target with dflash_mlx.distributed.load"
                )
        super().__enter__()
        if self.drafting and head is not None:
            embed, _ = embedding_and_head(self.model)
            self.draft.bind_head(embed, head, target_embed_scale(self.model))
        if self.pipe is not None:
            self.pipe.carry = tuple(sorted(set(self.draft.config.target_layer_ids)))
        return self

    def __exit__(self, *exc) -> None:
        if self.pipe is not None:
            self.pipe.carry = ()
        super().__exit__(*exc)

    def can_go_static(self, positions: int | None = None) -> bool:
        return False  # the device-side lengths would need a broadcast per cycle too

    def _local_work(self, logits: mx.array) -> list[mx.array]:
        """What this process must have run before it joins a broadcast after a forward:
        its sends (pipeline), or the whole forward with its collectives (tensor)."""
        return self.pipe.take_sent() if self.pipe is not None else [logits]

    def _share(self, x: mx.array, after: list[mx.array]) -> mx.array:
        """Rank 0's x on every process (a sum with zeros from the others)."""
        if self.group.size() == 1:
            return x
        if not self.drafting:
            x = mx.zeros(x.shape, x.dtype)
            if after:
                x = mx.depends(x, after)
        return mx.distributed.all_sum(x, group=self.group)

    def prefill(
        self,
        prompt: mx.array,
        step: int = 2048,
        progress: Callable[[int, int], None] | None = None,
    ) -> mx.array:
        # The first token is sampled from these logits on every process: the same
        # logits and the same key everywhere. The key is rank 0's, unchanged, so rank
        # 0 draws what an unsharded run with the same seed draws; after that only rank
        # 0's draws count (the draft samples there alone), until the next prefill.
        self._share_key()
        logits = super().prefill(prompt, step, progress)
        return self._share(logits, self._local_work(logits))

    def _share_key(self) -> None:
        if self.group.size() > 1:
            hi, lo = self._share(mx.random.state[0], []).tolist()
            mx.random.seed((hi << 32) | lo)  # the key [hi, lo] itself

    def decode(self, token: mx.array) -> mx.array:
        logits = super().decode(token)
        self._done = self._local_work(logits)  # the loop's `decide` shares the token
        return logits

    def propose(self, anchor, n, sampling, window=None):
        drafted, logq = super().propose(anchor, n, sampling, window)
        if n == 0:
            return drafted, logq
        return self._share(drafted.astype(mx.int32), []), logq

    def verify(self, block: mx.array) -> mx.array:
        logits = super().verify(block)
        self._done = self._local_work(logits)
        return logits

    def decide(self, n_acc: mx.array, nxt: mx.array) -> tuple[mx.array, mx.array]:
        both = mx.stack([n_acc.astype(mx.int32), nxt.astype(mx.int32)])
        both = self._share(both, self._done + self._remote_context())
        self._done = []
        return both[0], both[1]

    def _remote_context(self) -> list[mx.array]:
        """On a rank without the draft: its draft cache, tied to the features it was
        given (RemoteDraft.add_context), evaluated with each cycle's outcome so that the
        tie does not hold every cycle's features until the end of the generation."""
        keys = None if self.drafting else self.draft_cache[0].keys
        return [] if keys is None else [keys]


# -- generation ---------------------------------------------------------------------


def _prepare(model: nn.Module, draft: Any, kwargs: dict) -> None:
    """Checks before the loop's own (which would misread an mlx_lm pipeline split as a
    short model), and the draft's block size where 'auto' was asked for: the auto policy
    times cycles on each machine, so the processes would choose different widths (and
    then run different forwards). A fixed width is the same everywhere."""
    _check_not_mlx_lm_pipelined(model)
    if kwargs.get("block_size") in (None, "auto"):
        kwargs["block_size"] = draft.block_size


def stream_generate(
    model: nn.Module, draft: Any, tokenizer: Any, prompt: Any, max_tokens: int = 256, **kwargs: Any
) -> Generator[Any, None, None]:
    """`dflash_mlx.stream_generate` over a sharded target; every process calls it with
    the same arguments (and the same seed) and gets the same tokens."""
    _prepare(model, draft, kwargs)
    yield from _generate.stream_generate(
        model, draft, tokenizer, prompt, max_tokens, session_class=ShardedSession, **kwargs
    )


def generate(
    model: nn.Module, draft: Any, tokenizer: Any, prompt: Any, verbose: bool = False, **kwargs: Any
) -> str:
    """`dflash_mlx.generate` over a sharded target (print with verbose on rank 0 only)."""
    _prepare(model, draft, kwargs)
    kwargs["session_class"] = ShardedSession
    return _generate.generate(model, draft, tokenizer, prompt, verbose=verbose, **kwargs)
