"""Where an mlx-lm target keeps its layers, embedding and head; tapping hidden states.

`Tap` records the outputs of the tapped layers during every forward, through
`patch.Patches.hook_call` on those layer instances only, so another model in the
process (or another instance of the same class) is not affected. It also finds out,
on one forward, which cache object each layer is handed (`bind_caches`): mlx-lm
models pair layers with caches in their own way (`make_cache`, shared or skipped
caches), so the verify session checks the pairing instead of assuming `zip`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import mlx.core as mx
from mlx import nn

from .patch import Patches


def target_layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no layer list: not an mlx-lm model?")
    return list(layers)


def _text_model(model: nn.Module) -> nn.Module:
    """The module holding embed_tokens / norm (model.model, or language_model.model)."""
    for path in ("model", "language_model.model", "language_model"):
        m = model
        for name in path.split("."):
            m = getattr(m, name, None)
            if m is None:
                break
        if m is not None and hasattr(m, "embed_tokens"):
            return m
    raise ValueError(f"cannot find embed_tokens in {type(model).__name__}")


def embedding_and_head(
    model: nn.Module,
) -> tuple[Callable[[mx.array], mx.array], Callable[[mx.array], mx.array]]:
    """The target's token embedding and LM head (tied or not, quantized or not)."""
    embed = _text_model(model).embed_tokens
    for owner in (model, getattr(model, "language_model", None)):
        head = getattr(owner, "lm_head", None) if owner is not None else None
        if head is not None:
            return embed, head
    return embed, embed.as_linear


class Tap:
    """Holds the outputs of the tapped layers from the latest forward."""

    def __init__(self, model: nn.Module, layer_ids: list[int]):
        layers = target_layers(model)
        bad = [i for i in layer_ids if not 0 <= i < len(layers)]
        if bad:
            raise ValueError(f"target layer ids {bad} out of range for {len(layers)} layers")
        self.layers = layers
        self.layer_ids = list(layer_ids)
        self._outputs: list[mx.array | None] = [None] * len(layer_ids)
        # hidden_states[N] in transformers is the final-normed output of the last layer.
        last = len(layers) - 1
        self._normed_slot = self.layer_ids.index(last) if last in layer_ids else None
        self._final_norm = getattr(_text_model(model), "norm", None)

    def install(self, patches: Patches) -> None:
        for slot, i in enumerate(self.layer_ids):

            def record(call, layer, *args, _slot=slot, **kwargs):
                out = call(layer, *args, **kwargs)
                # Gemma 4's layers return (hidden, shared K/V, offset): the hidden first.
                self._outputs[_slot] = out[0] if isinstance(out, tuple) else out
                return out

            patches.hook_call(self.layers[i], record)

    def features(self) -> mx.array:
        """[B, L, n_taps * H]: the tapped layers' outputs, concatenated in layer_ids order."""
        if any(o is None for o in self._outputs):
            raise RuntimeError("no forward has run through the tapped model yet")
        outs = list(self._outputs)
        if self._normed_slot is not None:
            outs[self._normed_slot] = self._final_norm(outs[self._normed_slot])
        return mx.concatenate(outs, axis=-1)


@contextmanager
def bind_caches(layers: list[nn.Module], cache: list[Any]) -> Iterator[list[list[Any]]]:
    """Inside the block, record for each layer the caches from `cache` it is called with
    (by identity, positional or keyword); yields that list of lists."""
    ids = {id(c): c for c in cache}
    seen: list[list[Any]] = [[] for _ in layers]
    patches = Patches()

    def recorder(i: int):
        def record(call, layer, *args, **kwargs):
            seen[i].extend(ids[id(a)] for a in (*args, *kwargs.values()) if id(a) in ids)
            seen[i].append(CALLED)
            return call(layer, *args, **kwargs)

        return record

    try:
        for i, layer in enumerate(layers):
            patches.hook_call(layer, recorder(i))
        yield seen
    finally:
        patches.restore()


CALLED = object()  # marks one call of a layer in bind_caches' record


@contextmanager
def tap_hidden_states(model: nn.Module, layer_ids: list[int]) -> Iterator[Tap]:
    """Record the outputs of `layer_ids` during every forward inside the block."""
    tap = Tap(model, layer_ids)
    patches = Patches()
    try:
        tap.install(patches)
        yield tap
    finally:
        patches.restore()
