"""Skinny verify matmuls: y = x @ w.T for 1…32 rows of x, each weight read once.

A verify forward multiplies a block of 2…32 tokens by every weight matrix of the
target. Stock matmuls are tuned for one row (GEMV) or for many (GEMM); at verify widths
they read the weights more than once or leave bandwidth unused. This kernel (one body,
matmul_body.h, for Metal and CUDA) streams each weight once, for dense bf16 / fp16 /
fp32 weights and for MLX's affine 4- and 8-bit quantized weights (mx.quantize layout).

The switch: DFLASH_MATMUL=auto (default) | kernel | stock, read at every call.
  auto    the kernel where it measured faster on this machine (dflash_mlx.calibrate)
          or in MEASURED below; otherwise stock
  kernel  the kernel wherever it is supported (A/B runs)
  stock   mx.matmul / mx.quantized_matmul
On the CPU, for unsupported shapes, and when a kernel fails to compile or to pass its
first-use self-check, the stock op runs (one warning per process for failures).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
from mlx import nn

from .backend import KernelFactory, KernelSite, constant, mlx_factory, placeholder, read_switch
from .source import prelude, read_source

SWITCH_ENV = "DFLASH_MATMUL"
MAX_ROWS = 32
_MODES = ("auto", "kernel", "stock")
_DTYPES = (mx.float16, mx.bfloat16, mx.float32)
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)

PASS1_INPUTS = ["x", "w", "scales", "biases", "bias", "params"]
PASS1_OUTPUTS = ["y", "part"]
PASS2_INPUTS = ["part", "bias", "params"]
PASS2_OUTPUTS = ["y"]


_METAL_ENTRY = """\
threadgroup float df_mm_red[SMEM_WORDS];
const uint df_lane = thread_index_in_simdgroup;
const uint df_warp = simdgroup_index_in_threadgroup;
const uint df_tgx = threadgroup_position_in_grid.x;
const uint df_tgy = threadgroup_position_in_grid.y;
"""
_CUDA_ENTRY = """\
extern __shared__ float df_mm_red[];
const unsigned df_lane = threadIdx.x & 31u;
const unsigned df_warp = threadIdx.x >> 5;
const unsigned df_tgx = blockIdx.x;
const unsigned df_tgy = blockIdx.y;
"""
_METAL_ENTRY2 = "const uint df_gid = thread_position_in_grid.x;\n"
_CUDA_ENTRY2 = "const unsigned df_gid = blockIdx.x * blockDim.x + threadIdx.x;\n"


def kernel_source(backend: str, pass_: int, quant: bool) -> tuple[str, str]:
    """(header, body) of pass 1 (products) or 2 (split-K sum) for 'metal' or 'cuda'."""
    if backend not in ("metal", "cuda"):
        raise ValueError(f"unknown backend {backend!r}")
    header = prelude(backend, "matmul")
    if pass_ == 1:
        entry = _METAL_ENTRY if backend == "metal" else _CUDA_ENTRY
        entry = f"#define DF_MM_PASS 1\n#define DF_MM_QUANT {int(quant)}\n" + entry
    else:
        entry = _METAL_ENTRY2 if backend == "metal" else _CUDA_ENTRY2
        entry = "#define DF_MM_PASS 2\n" + entry
    return header, entry + read_source("matmul_body.h")


# ------------------------------------------------------------------ plan


def piece(bits: int, itemsize: int) -> int:
    """k per lane and row of one chunk: 16 bytes of weights (PL in the body)."""
    return 128 // bits if bits else 16 // itemsize


@dataclass(frozen=True)
class Plan:
    """Launch parameters of one call."""

    nw: int  # simdgroups along N per threadgroup; each owns 16 * rt outputs
    rt: int  # 16-row tiles per simdgroup (they share each load of x)
    wk: int  # simdgroups along K per threadgroup (summed in threadgroup memory)
    unroll: int  # chunks of weights in flight per simdgroup
    n_blocks: int  # threadgroups along N
    nsplit: int  # threadgroups along K; > 1 adds the sum pass
    k_split: int  # k per split (a multiple of the chunk)

    @property
    def threads(self) -> int:
        return 32 * self.nw * self.wk

    def smem_words(self, mf: int) -> int:
        """fp32 words of threadgroup memory the WK > 1 sum needs (mirrors the body)."""
        return max(1, (self.wk - 1) * self.nw * self.rt * mf * 4 * 32)


# Per backend: simdgroups per threadgroup, chunks in flight, and how many threadgroups
# to aim for (split-K fills the GPU when N alone gives too few). H200: 132 SMs.
_TILING = {
    "cuda": {"nw": 4, "unroll": 4, "target_groups": 264},
    "metal": {"nw": 4, "unroll": 2, "target_groups": 64},
}
# Fewest chunks per split (dense, quantized): shorter splits add more partial sums than
# parallelism. A quantized chunk is 4-8x the k of a dense one (and its dequantization
# work), so fewer of them make a split.
MIN_SPLIT_CHUNKS = (8, 2)


@lru_cache(maxsize=4096)
def make_plan(
    backend: str,
    n: int,
    k: int,
    bits: int,
    itemsize: int,
    *,
    m: int = 16,
    nw: int | None = None,
    rt: int | None = None,
    wk: int = 1,
    unroll: int | None = None,
    nsplit: int | None = None,
) -> Plan:
    """Tile and split one call of m rows; keyword arguments override the heuristics."""
    tiling = _TILING[backend]
    nw = nw or tiling["nw"]
    # At most 8 simdgroups: a CUDA block has 64K registers (quantized tiles use up to
    # ~240 per thread), and Metal pipelines cap threads by register use too.
    wk = max(1, min(wk, 8))
    nw = max(1, min(nw, 8 // wk))
    if rt is None:
        # x bytes per weight byte: m * itemsize / (16 * weight bytes per element). Two
        # row tiles halve that where it would compete with the weights for L1 bandwidth.
        rt = 2 if bits and m > 8 else 1
    unroll = unroll or (tiling["unroll"] if rt == 1 else max(1, tiling["unroll"] // 2))
    kc = 4 * piece(bits, itemsize)
    chunks = math.ceil(k / kc)
    n_blocks = math.ceil(n / (16 * rt * nw))
    if nsplit is None:
        want = math.ceil(tiling["target_groups"] / (n_blocks * wk))
        nsplit = max(1, min(want, chunks // MIN_SPLIT_CHUNKS[bits != 0]))
    nsplit = max(1, min(nsplit, chunks))
    k_split = math.ceil(chunks / nsplit) * kc
    nsplit = math.ceil(k / k_split)
    return Plan(
        nw=nw, rt=rt, wk=wk, unroll=unroll, n_blocks=n_blocks, nsplit=nsplit, k_split=k_split
    )


# ------------------------------------------------------------------ backends


def mode() -> str:
    return read_switch(SWITCH_ENV, _MODES)


def _mlx_factory(backend: str) -> KernelFactory:
    return mlx_factory(backend, True)


_site = KernelSite(row_contiguous=True)
use_backend = _site.use  # tests: the emulator as 'metal' or 'cuda'
active_backend = _site.active
_warn_once = _site.warn_once
_lock = threading.Lock()
_kernels: dict = {}
_checked: dict = {}


def _kernel(backend: str, factory: KernelFactory, pass_: int, quant: bool, smem: int = 0):
    key = (backend, factory, pass_, quant, smem)
    with _lock:
        kern = _kernels.get(key)
        if kern is None:
            header, body = kernel_source(backend, pass_, quant)
            if pass_ == 1:
                name = "dflash_skinny_qmm" if quant else "dflash_skinny_mm"
                names = (PASS1_INPUTS, PASS1_OUTPUTS)
            else:
                name, names = "dflash_skinny_mm_sum", (PASS2_INPUTS, PASS2_OUTPUTS)
            kern = factory(name, names[0], names[1], body, header, smem)
            _kernels[key] = kern
    return kern


def launch(
    x: mx.array,
    w: mx.array,
    plan: Plan,
    *,
    scales: mx.array | None = None,
    biases: mx.array | None = None,
    bias: mx.array | None = None,
    group_size: int = 0,
    bits: int = 0,
    backend: str,
    factory: KernelFactory,
    init_value: float | None = None,
) -> mx.array:
    """y [..., N] = x [..., K] @ w.T (+ bias) for M = x.size / K rows; both passes when
    the plan splits K. x is read as row-major [M, K], so no reshape is needed.

    init_value fills the outputs first (tests poison them with NaN)."""
    K = x.shape[-1]
    M = x.size // K
    N = w.shape[0]
    out_shape = (*x.shape[:-1], N)
    split = plan.nsplit > 1
    dummy = placeholder(x.dtype)
    params = constant((M, N, K, plan.k_split, plan.nsplit))
    quant = bits != 0
    has_bias = bias is not None and not split
    mf = math.ceil(M / 8)
    smem = 4 * plan.smem_words(mf) if plan.wk > 1 else 0
    outs = _kernel(backend, factory, 1, quant, smem)(
        inputs=[
            x,
            w,
            scales if quant else dummy,
            biases if quant else dummy,
            bias if has_bias else dummy,
            params,
        ],
        template=_template(x.dtype, bits, group_size, mf, plan, split, has_bias),
        grid=(plan.n_blocks * plan.threads, plan.nsplit, 1),
        threadgroup=(plan.threads, 1, 1),
        output_shapes=[(1,) if split else out_shape, (plan.nsplit, M, N) if split else (1,)],
        output_dtypes=[x.dtype, mx.float32],
        init_value=init_value,
    )
    if not split:
        return outs[0]
    return _kernel(backend, factory, 2, False)(
        inputs=[outs[1], dummy if bias is None else bias, params],
        template=[("T", x.dtype), ("HAS_BIAS", bias is not None)],
        grid=(M * N, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[out_shape],
        output_dtypes=[x.dtype],
        init_value=init_value,
    )[0]


@lru_cache(maxsize=1024)
def _template(dtype, bits, group_size, mf, plan, split, has_bias) -> list:
    return [
        ("T", dtype),
        ("BITS", bits),
        ("GS", group_size or 32),
        ("MF", mf),
        ("NW", plan.nw),
        ("RT", plan.rt),
        ("WK", plan.wk),
        ("UNROLL", plan.unroll),
        ("SPLIT", split),
        ("HAS_BIAS", has_bias),
        ("SMEM_WORDS", plan.smem_words(mf)),
    ]


# ------------------------------------------------------------------ routing

# Where the kernel measured faster than the stock op without a calibration file, per
# backend: {(kind, m_min, m_max)} with kind a dtype name ("bfloat16") or "q4" / "q8"; a
# calibration of this machine (dflash_mlx.calibrate) takes precedence. CUDA q4: a
# 36-layer chain of Qwen3-8B-shaped fused verify matmuls on the H200, kernel vs
# mx.quantized_matmul (`benchmarks/bench_chain.py`, results/cycle_session8.md).
MEASURED: dict[str, set[tuple[str, int, int]]] = {"cuda": {("q4", 2, 32)}, "metal": set()}


def weight_kind(dtype: mx.Dtype, bits: int = 0) -> str:
    """The routing key of a weight: its dtype name, or q4 / q8 for quantized weights."""
    return f"q{bits}" if bits else str(dtype).split(".")[-1]


def prefers_kernel(backend: str, kind: str, m: int, n: int, k: int) -> bool:
    """Auto mode: the kernel only where it measured faster than the stock op."""
    from .. import calibrate  # late: calibrate imports this module

    decision = calibrate.matmul_decision(backend, kind, m, n, k)
    if decision is not None:
        return decision
    return any(kd == kind and lo <= m <= hi for kd, lo, hi in MEASURED.get(backend, ()))


def supports_weight(
    w: mx.array, k: int, dtype: mx.Dtype, bits: int = 0, group_size: int = 0
) -> bool:
    """Weights the kernel handles for inputs of K = k and this dtype."""
    if w.ndim != 2 or w.shape[0] == 0 or k == 0:
        return False
    if bits:
        if bits not in BITS or group_size not in GROUP_SIZES or w.dtype != mx.uint32:
            return False
        return k % group_size == 0 and w.shape[1] * 32 == k * bits
    return w.dtype == dtype and w.shape[1] == k


_TOLERANCE = {mx.float32: 1e-4, mx.float16: 5e-3, mx.bfloat16: 3e-2}


def _self_check(backend: str, factory: KernelFactory, dtype, bits, gs, mf, plan, bias) -> bool:
    """Compile and run one configuration on random data against the CPU, once."""
    split = plan.nsplit > 1
    key = (
        backend,
        factory,
        dtype,
        bits,
        gs,
        mf,
        plan.nw,
        plan.rt,
        plan.wk,
        plan.unroll,
        split,
        bias,
    )
    with _lock:
        known = _checked.get(key)
    if known is not None:
        return known
    try:
        m, n = 8 * mf - 1, 16 * plan.rt * plan.nw + 5
        k = 2 * plan.wk * max(4 * piece(bits, dtype.size), gs or 32)
        blocks = math.ceil(n / (16 * plan.rt * plan.nw))
        probe = Plan(
            plan.nw,
            plan.rt,
            plan.wk,
            plan.unroll,
            blocks,
            2 if split else 1,
            k // 2 if split else k,
        )
        keys = mx.random.split(mx.random.key(len(_checked) + 1), 3)
        x = mx.random.normal((m, k), key=keys[0]).astype(dtype)
        wf = mx.random.normal((n, k), key=keys[1]).astype(dtype)
        b = mx.random.normal((n,), key=keys[2]).astype(dtype) if bias else None
        if bits:
            wq, s, bq = mx.quantize(wf, group_size=gs, bits=bits)
            out = launch(
                x,
                wq,
                probe,
                scales=s,
                biases=bq,
                bias=b,
                group_size=gs,
                bits=bits,
                backend=backend,
                factory=factory,
            )
        else:
            out = launch(x, wf, probe, bias=b, backend=backend, factory=factory)
        with mx.stream(mx.cpu):
            xf = x.astype(mx.float32)
            if bits:
                ref = mx.quantized_matmul(
                    xf,
                    wq,
                    s.astype(mx.float32),
                    bq.astype(mx.float32),
                    group_size=gs,
                    bits=bits,
                )
            else:
                ref = xf @ wf.astype(mx.float32).T
            if b is not None:
                ref = ref + b.astype(mx.float32)
            err = (mx.linalg.norm(out.astype(mx.float32) - ref) / mx.linalg.norm(ref)).item()
        ok = math.isfinite(err) and err < _TOLERANCE[dtype]
        reason = f"self-check error {err:.2e}"
    except Exception as e:  # noqa: BLE001 - a compile error surfaces here, at first evaluation
        ok, reason = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not ok:
        what = f"{bits}-bit group {gs}" if bits else str(dtype)
        _warn_once(
            f"dflash_mlx skinny-matmul kernel disabled on {backend} for {what} ({reason}); "
            "using the stock matmul"
        )
    with _lock:
        _checked[key] = ok
    return ok


def kernel_matmul(
    x: mx.array,
    w: mx.array,
    *,
    scales: mx.array | None = None,
    biases: mx.array | None = None,
    bias: mx.array | None = None,
    group_size: int = 0,
    bits: int = 0,
    auto_rows: tuple[int, int] = (1, MAX_ROWS),
) -> mx.array | None:
    """The kernel's y = x @ w.T (+ bias) for x [..., K], or None where the switch,
    backend, shape or measurements say to use the stock op."""
    m_ode = mode()
    if m_ode == "stock":
        return None
    active = active_backend()
    if active is None:
        if m_ode == "kernel":
            _warn_once(
                f"{SWITCH_ENV}=kernel but no GPU backend (Metal or CUDA) is active; "
                "using the stock matmul"
            )
        return None
    backend, factory = active
    if x.ndim == 0 or w.ndim != 2 or x.dtype not in _DTYPES:
        return None
    K = x.shape[-1]
    M = x.size // K if K else 0
    N = w.shape[0]
    if not (max(1, auto_rows[0]) <= M <= min(MAX_ROWS, auto_rows[1])):
        return None
    if not supports_weight(w, K, x.dtype, bits, group_size):
        return None
    if bits and (scales is None or biases is None or scales.dtype != x.dtype):
        return None
    if bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype):
        return None
    if m_ode == "auto" and not prefers_kernel(backend, weight_kind(x.dtype, bits), M, N, K):
        return None
    plan = make_plan(backend, N, K, bits, x.dtype.size, m=M)
    if not _self_check(
        backend, factory, x.dtype, bits, group_size, math.ceil(M / 8), plan, bias is not None
    ):
        return None
    return launch(
        x,
        w,
        plan,
        scales=scales,
        biases=biases,
        bias=bias,
        group_size=group_size,
        bits=bits,
        backend=backend,
        factory=factory,
    )


def skinny_matmul(x: mx.array, w: mx.array) -> mx.array:
    """x [..., K] @ w.T for w [N, K]: the kernel where it applies, else mx.matmul."""
    out = kernel_matmul(x, w)
    return out if out is not None else x @ w.T


def skinny_quantized_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: mx.array,
    group_size: int = 64,
    bits: int = 4,
) -> mx.array:
    """mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size, bits)."""
    out = kernel_matmul(x, w, scales=scales, biases=biases, group_size=group_size, bits=bits)
    if out is not None:
        return out
    return mx.quantized_matmul(
        x, w, scales, biases, transpose=True, group_size=group_size, bits=bits
    )


def linear(module: nn.Module, x: mx.array, arrays: dict | None = None) -> mx.array | None:
    """module(x) through the kernel for nn.Linear / nn.QuantizedLinear (affine) with
    2…32 rows, or None: the caller then runs module(x) itself. `arrays` (weight, scales,
    biases, bias) stand in for the module's own: a fused group's (fuse.py)."""
    a = module if arrays is None else arrays
    bias = a.get("bias")
    if isinstance(module, nn.QuantizedLinear):
        if getattr(module, "mode", "affine") != "affine":
            return None
        return kernel_matmul(
            x,
            a["weight"],
            scales=a["scales"],
            biases=a["biases"],
            bias=bias,
            group_size=module.group_size,
            bits=module.bits,
            auto_rows=(2, MAX_ROWS),
        )
    if isinstance(module, nn.Linear):
        return kernel_matmul(x, a["weight"], bias=bias, auto_rows=(2, MAX_ROWS))
    return None


def linear_spec(module: nn.Module) -> tuple[int, int, mx.Dtype, int, int] | None:
    """(N, K, activation dtype, bits, group size) of an nn.Linear (bits 0) or affine
    nn.QuantizedLinear, else None."""
    if isinstance(module, nn.QuantizedLinear) and getattr(module, "mode", "affine") == "affine":
        n, kw = module["weight"].shape
        return n, kw * 32 // module.bits, module["scales"].dtype, module.bits, module.group_size
    if isinstance(module, nn.Linear):
        (n, k), dtype = module["weight"].shape, module["weight"].dtype
        return n, k, dtype, 0, 0
    return None


def prepare(model: nn.Module, rows: tuple[int, ...] = (2, 9, 17, 25)) -> int:
    """Run the first-use self-checks for every linear layer of `model` now.

    The self-check evaluates (a sync): do it before tracing a forward with mx.compile,
    where it could not run. `rows` picks the 8-row fragment counts (1..4) to check.
    Returns how many configurations passed.
    """
    active = active_backend()
    if active is None or mode() == "stock":
        return 0
    backend, factory = active
    passed = 0
    for _, module in model.named_modules():
        spec = linear_spec(module)
        if spec is None:
            continue
        n, k, dtype, bits, gs = spec
        if dtype not in _DTYPES or (bits and (bits not in BITS or gs not in GROUP_SIZES)):
            continue
        for m in rows:
            plan = make_plan(backend, n, k, bits, dtype.size, m=m)
            bias = "bias" in module
            passed += _self_check(backend, factory, dtype, bits, gs, math.ceil(m / 8), plan, bias)
    return passed
