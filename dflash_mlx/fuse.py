"""One matmul for q/k/v and one for gate/up in the target's verify forward (and the draft's).

A verify multiplies 2…32 rows by every weight of the target. At those widths the stock
matmul (cuBLAS, split-K) is far from reading the weights once; fewer, wider launches get
closer: on the H200 (MLX 0.32.4 CUDA, Qwen3-8B shape, `benchmarks/profile_kernels.py`)
the matmuls of a 1k-context cycle took 6.59 ms of device time fused against 8.33 ms
unfused, a decode step's 5.36 (results/cycle_session7.md).

`install(model, patches)` concatenates each layer's q/k/v (and gate/up) weights into one
array, once per model, and points the parts' own weights at row slices of it: the
values, modules and classes stay the same, so everything outside a verify (mlx_lm's
plain decode, saving) computes exactly what it did. Inside `routing.verifying()` the
parts are hooked (`patch.Patches.hook_call`): the first part called with an input
computes the fused product, the others take their columns of it (a part called with a
new input computes the product for that one).

The draft's own q/k/v and gate/up fuse the same way while a session holds it, for inputs
of at most 32 rows (its block; the accepted context rows of a cycle, but not a prompt's:
there the fused product would compute queries nobody reads).

Where it is on: backends where it measured faster (`BACKENDS`); the CPU tests force it.
Metal is not measured, so it stays off there until it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx import nn

from .kernels import matmul, routing
from .kernels.backend import gpu_backend
from .patch import Patches, unhooked_type
from .tap import target_layers

BACKENDS = {"cuda"}  # measured: benchmarks/results/cycle_session7.md
GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj")))
_ARRAYS = ("weight", "scales", "biases", "bias")


@dataclass
class FusedGroup:
    """Sibling projections of one input as one weight (rows of the parts, in order)."""

    parts: list[nn.Module]
    fused: dict[str, mx.array]  # weight (and scales, biases, bias) of all parts
    views: list[dict[str, mx.array]]  # what each part's own arrays were set to
    columns: list[tuple[int, int]]  # each part's output columns in the fused product
    serving: int = 0  # sessions that have the parts hooked now
    _last: tuple[Any, mx.array] | None = field(default=None, repr=False)
    _served: set[int] = field(default_factory=set, repr=False)

    def current(self) -> bool:
        """The parts still hold the views (nobody loaded other weights since)."""
        return all(
            all(p.get(k) is v for k, v in view.items())
            for p, view in zip(self.parts, self.views, strict=True)
        )

    def product(self, x: mx.array) -> mx.array:
        """x times the fused weight: the skinny kernel where routing measured it faster
        for this kind and width (4-bit on the H200, a 36-layer chain of the fused
        shapes: 1.3-2.3x MLX's quantized matmul at 2-32 rows, results/cycle_session8.md),
        else the stock op."""
        p, f = self.parts[0], self.fused
        y = matmul.linear(p, x, f)
        if y is not None:
            return y
        if isinstance(p, nn.QuantizedLinear):
            y = mx.quantized_matmul(
                x,
                f["weight"],
                scales=f["scales"],
                biases=f.get("biases"),
                transpose=True,
                group_size=p.group_size,
                bits=p.bits,
                mode=p.mode,
            )
            return y + f["bias"] if "bias" in f else y
        if "bias" in f:
            return mx.addmm(f["bias"], x, f["weight"].T)
        return x @ f["weight"].T

    def call(self, index: int, x: mx.array) -> mx.array:
        # One forward at a time per model (the server's one generation thread): the
        # memo is the last input's product.
        if self._last is None or self._last[0] is not x or index in self._served:
            self._last, self._served = (x, self.product(x)), set()
        self._served.add(index)
        y = self._last[1]
        if len(self._served) == len(self.parts):  # every sibling served: drop the input
            self._last = None
        a, b = self.columns[index]
        return y[..., a:b]


def _fusable(parts: list[Any]) -> bool:
    """Same layer kind, arrays, quantization, input width and dtype (a part hooked
    already, by the kernel routing, counts as its own class)."""
    kind = unhooked_type(parts[0])
    if kind not in (nn.Linear, nn.QuantizedLinear):
        return False
    if any(unhooked_type(p) is not kind for p in parts):
        return False
    spec = lambda p: (
        tuple(k for k in _ARRAYS if k in p),
        p["weight"].shape[1],
        p["weight"].dtype,
        (p.group_size, p.bits, p.mode) if kind is nn.QuantizedLinear else None,
    )
    return all(spec(p) == spec(parts[0]) for p in parts)


def _fuse(parts: list[nn.Module]) -> FusedGroup:
    keys = [k for k in _ARRAYS if k in parts[0]]
    fused = {k: mx.concatenate([p[k] for p in parts], axis=0) for k in keys}
    mx.eval(fused)  # one group at a time: the parts' old arrays are freed as we go
    views, columns, start = [], [], 0
    for p in parts:
        rows = p["weight"].shape[0]
        view = {k: fused[k][start : start + rows] for k in keys}
        for k, v in view.items():
            setattr(p, k, v)
        views.append(view)
        columns.append((start, start + rows))
        start += rows
    return FusedGroup(list(parts), fused, views, columns)


def enabled() -> bool:
    active = gpu_backend()
    return (active[0] if active else "cpu") in BACKENDS


def siblings(layers: list[nn.Module]) -> Iterator[tuple[nn.Module, list[nn.Module]]]:
    """(block, parts) of every fusable sibling group in `layers`."""
    for layer in layers:
        for block_name, names in GROUPS:
            block = getattr(layer, block_name, None)
            parts = [getattr(block, n, None) for n in names] if block is not None else []
            if parts and all(p is not None for p in parts) and _fusable(parts):
                yield block, parts


def groups(model: nn.Module, layers: list[nn.Module] | None = None) -> list[FusedGroup]:
    """The fused groups of `layers` (the target's by default), made on first use (and
    again after new weights)."""
    out = []
    for block, parts in siblings(target_layers(model) if layers is None else layers):
        group = block.__dict__.get("_dflash_fused")
        if group is None or not group.current():
            group = _fuse(parts)
            object.__setattr__(block, "_dflash_fused", group)
        out.append(group)
    return out


def install(
    model: nn.Module,
    patches: Patches,
    layers: list[nn.Module] | None = None,
    when: Callable[[mx.array], bool] = lambda x: routing.is_verifying(),
) -> None:
    """Where `when(x)` (the target: inside `routing.verifying()`), the sibling projections
    of `layers` (the target's by default) run fused; `draft_rows` is the draft's."""
    if not enabled():
        return
    for group in groups(model, layers):
        group.serving += 1
        patches.defer(lambda group=group: setattr(group, "serving", group.serving - 1))
        for i, part in enumerate(group.parts):

            def hook(call, inst, x, group=group, i=i):
                if when(x):
                    return group.call(i, x)
                return call(inst, x)

            patches.hook_call(part, hook)


def draft_rows(x: mx.array) -> bool:
    """A draft input to fuse: a block or a cycle's context rows, not a prompt's."""
    return x.size <= matmul.MAX_ROWS * x.shape[-1]
