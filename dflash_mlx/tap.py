"""Tap hidden states of chosen layers of an mlx-lm target, and find its embedding and head.

The tap swaps the class of the chosen layer *instances* for a recording subclass, so
only this model is affected (another model in the process, or another instance of the
same class, is not), nothing global is patched, and leaving the `with` block restores
the original classes, also after an exception or KeyboardInterrupt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlx.core as mx
from mlx import nn

_RECORDING_CLASSES: dict[type, type] = {}


def _recording_class(cls: type) -> type:
    """A subclass of `cls` whose call also hands its output to the attached tap."""
    if cls not in _RECORDING_CLASSES:

        def __call__(self, *args, **kwargs):
            out = cls.__call__(self, *args, **kwargs)
            self._dflash_tap.record(self._dflash_tap_slot, out)
            return out

        _RECORDING_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
    return _RECORDING_CLASSES[cls]


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

    def __init__(self, layer_ids: list[int], num_layers: int, final_norm: nn.Module):
        self.layer_ids = list(layer_ids)
        self._outputs: list[mx.array | None] = [None] * len(layer_ids)
        # hidden_states[N] in transformers is the final-normed output of the last layer.
        self._normed_slot = (
            self.layer_ids.index(num_layers - 1) if num_layers - 1 in layer_ids else None
        )
        self._final_norm = final_norm

    def record(self, slot: int, out: mx.array) -> None:
        self._outputs[slot] = out

    def features(self) -> mx.array:
        """[B, L, n_taps * H]: the tapped layers' outputs, concatenated in layer_ids order."""
        if any(o is None for o in self._outputs):
            raise RuntimeError("no forward has run through the tapped model yet")
        outs = list(self._outputs)
        if self._normed_slot is not None:
            outs[self._normed_slot] = self._final_norm(outs[self._normed_slot])
        return mx.concatenate(outs, axis=-1)


@contextmanager
def tap_hidden_states(model: nn.Module, layer_ids: list[int]) -> Iterator[Tap]:
    """Record the outputs of `layer_ids` during every forward inside the block."""
    layers = target_layers(model)
    bad = [i for i in layer_ids if not 0 <= i < len(layers)]
    if bad:
        raise ValueError(f"target layer ids {bad} out of range for {len(layers)} layers")
    tap = Tap(layer_ids, len(layers), getattr(_text_model(model), "norm", None))
    swapped = []
    try:
        for slot, i in enumerate(layer_ids):
            layer = layers[i]
            if hasattr(layer, "_dflash_tap"):
                raise RuntimeError(f"target layer {i} is already tapped")
            object.__setattr__(layer, "_dflash_tap", tap)
            object.__setattr__(layer, "_dflash_tap_slot", slot)
            original = type(layer)
            swapped.append((layer, original))
            layer.__class__ = _recording_class(original)
        yield tap
    finally:
        for layer, original in swapped:
            layer.__class__ = original
            object.__delattr__(layer, "_dflash_tap")
            object.__delattr__(layer, "_dflash_tap_slot")
