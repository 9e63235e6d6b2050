"""A residual add and the RMS norm after it as one kernel (add_norm_body.h).

A transformer layer adds each sublayer's output to the residual stream and normalises
the sum for the next sublayer: two kernels per sublayer in MLX (rms_norm is its own
primitive, so mx.compile cannot fuse the add into it), 145 of a verify forward's ~580
for a 36-layer model, and the host pays ~2.5 us to encode each (results/
cycle_session11.md). This kernel writes both the sum and its norm.

`add_rms_norm(x, r, norm)` returns (x + r, norm(x + r)) for an `nn.RMSNorm`, or None
where no GPU backend (or the emulator, in the tests) runs it; `add_then_norm` falls back
to MLX's two ops.
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn

from ..patch import unhooked_type
from .backend import KernelFactory, KernelSite, constant
from .source import prelude, read_source

INPUTS = ["x", "r", "w", "params", "fparams"]
OUTPUTS = ["h", "y"]
MAX_THREADS = 1024
PER_THREAD = 4  # elements a thread holds, where the row allows (a 16-row verify runs 16
# threadgroups, so a row's latency is the kernel's: short per-thread chains pay)
MAX_HIDDEN = 64 * MAX_THREADS  # a row's elements live in registers, PER per thread
_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
_SMEM = 4 * MAX_THREADS // 32  # bytes: one partial sum per simdgroup


def threads(H: int) -> int:
    """Threads per row: PER_THREAD elements each, whole simdgroups, at most MAX_THREADS."""
    return min(MAX_THREADS, 32 * -(-H // (32 * PER_THREAD)))


_METAL_ENTRY = """\
const uint df_tid = thread_index_in_threadgroup;
const uint df_lane = thread_index_in_simdgroup;
const uint df_warp = simdgroup_index_in_threadgroup;
const uint df_row = threadgroup_position_in_grid.x;
threadgroup float df_red[THREADS / 32];
"""
_CUDA_ENTRY = """\
const unsigned df_tid = threadIdx.x;
const unsigned df_lane = threadIdx.x & 31u;
const unsigned df_warp = threadIdx.x >> 5;
const unsigned df_row = blockIdx.x;
extern __shared__ float df_red[];  // THREADS / 32 floats (_SMEM)
"""

_site = KernelSite(row_contiguous=True)
use_backend = _site.use  # tests: the emulator as 'metal' or 'cuda'
active_backend = _site.active


def kernel_source(backend: str) -> tuple[str, str]:
    """(header, body) for 'metal' or 'cuda'."""
    entry = _METAL_ENTRY if backend == "metal" else _CUDA_ENTRY
    return prelude(backend), entry + read_source("add_norm_body.h")


def supports(x: mx.array, r: mx.array, norm: nn.Module) -> bool:
    w = getattr(norm, "weight", None)
    return (
        unhooked_type(norm) is nn.RMSNorm  # its own maths (a hook serving it is ours)
        and x.shape == r.shape
        and x.dtype == r.dtype
        and x.dtype in _DTYPES
        and x.ndim >= 1
        and 0 < x.size
        and x.shape[-1] <= MAX_HIDDEN
        and w is not None
        and w.shape == x.shape[-1:]
        and w.dtype == x.dtype
    )


def add_rms_norm(x: mx.array, r: mx.array, norm: nn.Module) -> tuple[mx.array, mx.array] | None:
    """(x + r, norm(x + r)) in one kernel, or None where it does not run here."""
    active = active_backend()
    if active is None or not supports(x, r, norm):
        return None
    backend, factory = active
    if not _self_check(backend, factory, x.dtype):
        return None
    return _launch(x, r, norm.weight, norm.eps, backend, factory)


def add_then_norm(
    x: mx.array, r: mx.array, norm: nn.Module, fused: bool = True
) -> tuple[mx.array, mx.array]:
    """(x + r, norm(x + r)): one kernel where it runs (and `fused`), else MLX's two ops."""
    both = add_rms_norm(x, r, norm) if fused else None
    if both is not None:
        return both
    h = x + r
    return h, norm(h)


def _launch(x, r, w, eps, backend, factory):
    H = x.shape[-1]
    rows = x.size // H
    n = threads(H)
    h, y = _kernel(backend, factory)(
        inputs=[x, r, w, constant((rows, H)), constant((eps,), mx.float32)],
        template=[("T", x.dtype), ("THREADS", n), ("PER", -(-H // n))],
        grid=(rows * n, 1, 1),
        threadgroup=(n, 1, 1),
        output_shapes=[x.shape, x.shape],
        output_dtypes=[x.dtype, x.dtype],
    )
    return h, y


def reference(x: mx.array, r: mx.array, w: mx.array, eps: float) -> tuple[mx.array, mx.array]:
    """What MLX's GPU add and rms_norm compute, as fp32 ops (w * T(h * rsqrt(mean(h^2) +
    eps)), rounded where they round)."""
    t, f32 = x.dtype, mx.float32
    h = (x.astype(f32) + r.astype(f32)).astype(t)
    hf = h.astype(f32)
    normed = (hf * mx.rsqrt(mx.mean(hf * hf, axis=-1, keepdims=True) + eps)).astype(t)
    return h, (w.astype(f32) * normed.astype(f32)).astype(t)


def _kernel(backend: str, factory: KernelFactory):
    def make():
        header, source = kernel_source(backend)
        return factory("dflash_add_rms_norm", INPUTS, OUTPUTS, source, header, _SMEM)

    return _site.kernel((backend, factory), make)


def _self_check(backend: str, factory: KernelFactory, dtype) -> bool:
    """Run the kernel once on random data against the reference; one warning and the
    stock ops if it fails."""

    def error() -> float:
        keys = mx.random.split(mx.random.key(11), 3)
        x = mx.random.normal((3, 300), key=keys[0]).astype(dtype)
        r = mx.random.normal((3, 300), key=keys[1]).astype(dtype)
        w = mx.random.uniform(0.5, 1.5, (300,), key=keys[2]).astype(dtype)
        got = _launch(x, r, w, 1e-6, backend, factory)
        with mx.stream(mx.cpu):
            want = reference(x, r, w, 1e-6)
            return max(
                (mx.abs(g.astype(mx.float32) - v.astype(mx.float32)).max() / mx.abs(v).max()).item()
                for g, v in zip(got, want, strict=True)
            )

    return _site.checked(
        (backend, factory, dtype),
        error,
        1e-5 if dtype == mx.float32 else 2e-2,
        f"add + RMS norm kernel disabled on {backend} for {dtype}; using the model's own code",
    )
