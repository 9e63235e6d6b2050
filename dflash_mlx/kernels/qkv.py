"""One kernel from a fused q/k/v product to attention's inputs (qkv_body.h).

After the fused q/k/v matmul (fuse.py), mlx-lm's attention code slices the product,
copies the slices to make them contiguous, RMS-normalises q and k (Qwen3), rotates
them (two ropes) and lays out v: six kernels a layer in a verify, each costing the host
more time to encode than the device to run (results/cycle_session9.md). This kernel
does all of it in one launch, rounding where MLX's rms_norm and rope round.

`split_heads(y, layout)` returns q [B, Hq, L, D] and kv [B, 2 Hkv, L, D] (keys' heads,
then values': what `static_cache.write_stacked` stores with one scatter), or None where
no GPU backend (or the emulator, in the tests) runs the kernel. `rotary(rope, head_dim)` says
whether a model's RoPE module is one the kernel computes (non-traditional, over the
whole head, angles position * scale / freq, the frequencies from a base or given): mlx's
`nn.RoPE` and mlx-lm's `Llama3RoPE`; anything else keeps the model's own code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx_lm.models.rope_utils import Llama3RoPE

from .backend import KernelFactory, KernelSite, constant, placeholder
from .source import prelude, read_source

INPUTS = ["y", "qw", "kw", "freqs", "pos", "params", "fparams"]
OUTPUTS = ["q", "kv"]
HEAD_DIMS = (64, 128, 256)
_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
THREADS = 128

_METAL_ENTRY = "const uint df_gid = thread_position_in_grid.x;\n"
_CUDA_ENTRY = "const unsigned df_gid = blockIdx.x * blockDim.x + threadIdx.x;\n"

_site = KernelSite(row_contiguous=True)
use_backend = _site.use  # tests: the emulator as 'metal' or 'cuda'
active_backend = _site.active


def kernel_source(backend: str) -> tuple[str, str]:
    """(header, body) for 'metal' or 'cuda'."""
    if backend not in ("metal", "cuda"):
        raise ValueError(f"unknown backend {backend!r}")
    entry = _METAL_ENTRY if backend == "metal" else _CUDA_ENTRY
    return prelude(backend), entry + read_source("qkv_body.h")


@dataclass(frozen=True)
class Rotary:
    """RoPE as mx.fast.rope computes it: pair i of a head at position p turns by
    (scale * p) * inv_freq_i, inv_freq_i = base ** -(i / half) (computed as exp2 of
    log2(base), as MLX does) or 1 / freqs[i]."""

    log2_base: float  # 0: use freqs
    freqs: mx.array | None  # [head_dim / 2] float32
    scale: float


def rotary(rope: nn.Module, head_dim: int) -> Rotary | None:
    """The kernel's form of `rope`, or None where it computes something else."""
    if getattr(rope, "traditional", True) or getattr(rope, "dims", None) != head_dim:
        return None
    if type(rope) is nn.RoPE:
        # MLX passes its kernels log2(base) in fp32.
        return Rotary(float(np.log2(np.float32(rope.base))), None, float(rope.scale))
    if type(rope) is Llama3RoPE:
        return Rotary(0.0, _evaluated(rope._freqs.astype(mx.float32)), 1.0)
    return None


@dataclass(frozen=True)
class Layout:
    """Where a fused product's heads are and what happens to them."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    rotary: Rotary
    q_norm: mx.array | None = None  # [head_dim] weights (None: no q/k norm)
    k_norm: mx.array | None = None
    eps: float = 0.0
    skip_q: bool = False  # write k and v only (q comes back None)


def supports(y: mx.array, layout: Layout) -> bool:
    width = (layout.n_heads + 2 * layout.n_kv_heads) * layout.head_dim
    return (
        y.ndim == 3
        and y.shape[-1] == width
        and y.dtype in _DTYPES
        and layout.head_dim in HEAD_DIMS
        and (layout.rotary.freqs is None) == (layout.rotary.log2_base != 0.0)
        and (layout.rotary.freqs is None or layout.rotary.freqs.shape == (layout.head_dim // 2,))
        and (layout.q_norm is None) == (layout.k_norm is None)
        and all(w is None or w.dtype == y.dtype for w in (layout.q_norm, layout.k_norm))
    )


def split_heads(
    y: mx.array, layout: Layout, offset: int | mx.array
) -> tuple[mx.array | None, mx.array] | None:
    """(q, kv) from the fused product y [B, L, (Hq + 2 Hkv) * D] of rows at positions
    offset … offset + L - 1 (each sequence's; offset an int or an int32 device scalar),
    or None where the kernel does not run here."""
    active = active_backend()
    if active is None or not supports(y, layout):
        return None
    backend, factory = active
    if not _self_check(backend, factory, y.dtype, layout.head_dim, layout.q_norm is not None):
        return None
    return _launch(y, layout, offset, backend, factory)


def _launch(y, layout, offset, backend, factory, init_value=None):
    B, L, _ = y.shape
    Hq, Hkv, D = layout.n_heads, layout.n_kv_heads, layout.head_dim
    first = Hq if layout.skip_q else 0
    rows = B * L
    units = rows * (Hq + 2 * Hkv - first)
    norm = layout.q_norm is not None
    qw = layout.q_norm if norm else placeholder(y.dtype)  # unread without the norm
    kw = layout.k_norm if norm else placeholder(y.dtype)
    pos = constant((offset,)) if isinstance(offset, int) else offset.reshape(1)
    rot = layout.rotary
    freqs = placeholder(mx.float32) if rot.freqs is None else rot.freqs  # or unread
    kern = _kernel(backend, factory)
    grid = math.ceil(units * 32 / THREADS) * THREADS
    q, kv = kern(
        inputs=[
            y,
            qw,
            kw,
            freqs,
            pos,
            constant((rows, L, Hq, Hkv, first)),
            constant((layout.eps, rot.scale, rot.log2_base), mx.float32),
        ],
        template=[("T", y.dtype), ("D", D), ("NORM", int(norm))],
        grid=(grid, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(1,) if first else (B, Hq, L, D), (B, 2 * Hkv, L, D)],
        output_dtypes=[y.dtype] * 2,
        init_value=init_value,
    )
    return (None if first else q), kv


def reference(y: mx.array, layout: Layout, offset: int | mx.array):
    """What MLX's GPU kernels compute from the same product (rms_norm: w * T(x * rsqrt(
    mean(x^2) + eps)); rope: fp32 maths from T, rounded once), written as fp32 ops: the
    CPU backend's own rope rounds its sines and products to T. (Its frequencies from a
    base are exp(-i log(base) / half), which differs from the GPU's exp2 in the last bit.)"""
    B, L, _ = y.shape
    Hq, Hkv, D = layout.n_heads, layout.n_kv_heads, layout.head_dim
    t, f32 = y.dtype, mx.float32
    q, k, v = mx.split(y, [Hq * D, (Hq + Hkv) * D], axis=-1)
    heads = lambda x, n: x.reshape(B, L, n, D).transpose(0, 2, 1, 3)
    q, k, v = heads(q, Hq), heads(k, Hkv), heads(v, Hkv)

    def norm(x, w):
        x = x.astype(f32)
        n = (x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + layout.eps)).astype(t)
        return (w.astype(f32) * n.astype(f32)).astype(t)

    if layout.q_norm is not None:
        q, k = norm(q, layout.q_norm), norm(k, layout.k_norm)
    rot = layout.rotary
    rope = lambda x: mx.fast.rope(
        x.astype(f32),
        D,
        traditional=False,
        base=None if rot.freqs is not None else 2.0**rot.log2_base,
        scale=rot.scale,
        offset=offset,
        freqs=rot.freqs,
    ).astype(t)
    return rope(q), mx.concatenate([rope(k), v], axis=1)


def _kernel(backend: str, factory: KernelFactory):
    def make():
        header, source = kernel_source(backend)
        return factory("dflash_qkv_heads", INPUTS, OUTPUTS, source, header, 0)

    return _site.kernel((backend, factory), make)


def _self_check(backend: str, factory: KernelFactory, dtype, head_dim: int, norm: bool) -> bool:
    """Run the kernel once on random data against the stock ops; one warning and the
    stock path if it fails."""

    def error() -> float:
        keys = mx.random.split(mx.random.key(7), 4)
        layout = Layout(
            2,
            1,
            head_dim,
            Rotary(math.log2(1e4), None, 1.0),
            mx.random.uniform(0.5, 1.5, (head_dim,), key=keys[0]).astype(dtype) if norm else None,
            mx.random.uniform(0.5, 1.5, (head_dim,), key=keys[1]).astype(dtype) if norm else None,
            1e-6,
        )
        y = mx.random.normal((1, 3, 4 * head_dim), key=keys[2]).astype(dtype)
        got = _launch(y, layout, 37, backend, factory)
        with mx.stream(mx.cpu):
            want = reference(y, layout, 37)
            return max(
                (mx.abs(g.astype(mx.float32) - w).max() / mx.abs(w).max()).item()
                for g, w in zip(got, want, strict=True)
            )

    return _site.checked(
        (backend, factory, dtype, head_dim, norm),
        error,
        1e-5 if dtype == mx.float32 else 2e-2,
        f"q/k/v kernel disabled on {backend} for {dtype}, D={head_dim}; "
        "using the model's own attention code",
    )


def _evaluated(a: mx.array) -> mx.array:
    mx.eval(a)
    return a
