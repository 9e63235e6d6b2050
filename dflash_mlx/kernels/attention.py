"""Block attention: the custom kernel where it runs and pays off, else MLX's SDPA.

The switch: DFLASH_BLOCK_ATTENTION=auto (default) | kernel | sdpa, read at every call.
  auto    the kernel on a GPU backend, for the shapes where it measured faster (this
          machine's calibration, dflash_mlx.calibrate, else THRESHOLDS below)
  kernel  the kernel wherever it is supported (A/B runs)
  sdpa    always mx.fast.scaled_dot_product_attention
On the CPU, for unsupported shapes, and when a kernel fails to compile or to pass its
first-use self-check, the call falls back to SDPA with one warning per process.
"""

from __future__ import annotations

import math
import threading

import mlx.core as mx

from .backend import KernelFactory, KernelSite, constant, mlx_factory, read_switch
from .source import (
    MAX_QUERIES,
    PASS1_INPUTS,
    PASS1_OUTPUTS,
    PASS2_INPUTS,
    PASS2_OUTPUTS,
    SUPPORTED_HEAD_DIMS,
    Plan,
    kernel_source,
    make_plan,
)

SWITCH_ENV = "DFLASH_BLOCK_ATTENTION"
_MODES = ("auto", "kernel", "sdpa")
_LOG2E = 1.4426950408889634
_DTYPES = (mx.float16, mx.bfloat16, mx.float32)


def mode() -> str:
    return read_switch(SWITCH_ENV, _MODES)


def _mlx_factory(backend: str) -> KernelFactory:
    return mlx_factory(backend, False)


_site = KernelSite(row_contiguous=False)
use_backend = _site.use  # tests: the emulator as 'metal' or 'cuda'
active_backend = _site.active
_warn_once = _site.warn_once
_lock = threading.Lock()
_kernels: dict = {}
_checked: dict = {}


def supports(q: mx.array, k: mx.array, v: mx.array, window: int | None) -> bool:
    """Shapes and dtypes the kernel handles."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        return False
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        return False
    B, Hq, Lq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D or D not in SUPPORTED_HEAD_DIMS:
        return False
    Hkv, S = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv or not (1 <= Lq <= MAX_QUERIES) or S < Lq:
        return False
    if window is not None and window < 1:
        return False
    return B * Hkv <= 65535


# Where the kernel measured faster than mx.fast.scaled_dot_product_attention, per backend:
# {(head_dim, lq_min, lq_max): fewest keys}. A backend or shape not listed has no
# measurement, so auto mode keeps SDPA there; DFLASH_BLOCK_ATTENTION=kernel forces the
# kernel for A/B runs.
# - cuda (H200, benchmarks/results/attention_cuda_nvidia_h200.json and gpu_h200.md):
#   D=256: the kernel is 1.25-2.8x faster from 1024 keys at every Lq (SDPA has no cuDNN
#   path above D=128). D<=128 with Lq>1: SDPA runs cuDNN, which builds a new graph for
#   every new key length; a decode loop grows the keys every cycle, so the stock 8B
#   cycle took 139 ms against 13 ms through the kernel, although at a fixed length the
#   kernel is only 0.7-1.7x cuDNN's speed. Lq=1 stays with SDPA (0.9-1.1x: no gain).
# - metal: never measured (no Apple GPU available to this project): a calibration of the
#   user's machine (python -m dflash_mlx.calibrate) decides there.
THRESHOLDS: dict[str, dict[tuple[int, int, int], int]] = {
    "cuda": {(64, 2, 32): 0, (128, 2, 32): 0, (256, 1, 32): 1024},
    "metal": {},
}


def prefers_kernel(backend: str, lq: int, s: int, D: int, group: int) -> bool:
    """Auto mode: the kernel only where it measured faster than SDPA: on this machine
    (dflash_mlx.calibrate) if it was calibrated for this head dim, else THRESHOLDS."""
    from .. import calibrate  # late: calibrate imports this module

    decision = calibrate.attention_decision(backend, lq, s, D)
    if decision is not None:
        return decision
    for (d, lq_min, lq_max), s_min in THRESHOLDS.get(backend, {}).items():
        if d == D and lq_min <= lq <= lq_max and s >= s_min:
            return True
    return False


def _kernel(backend: str, factory: KernelFactory, pass_: int, smem: int):
    key = (backend, factory, pass_, smem)
    with _lock:
        kern = _kernels.get(key)
        if kern is None:
            header, source = kernel_source(backend, pass_)
            names = (PASS1_INPUTS, PASS1_OUTPUTS) if pass_ == 1 else (PASS2_INPUTS, PASS2_OUTPUTS)
            name = "dflash_block_attention" if pass_ == 1 else "dflash_block_attention_combine"
            kern = factory(name, names[0], names[1], source, header, smem)
            _kernels[key] = kern
    return kern


def launch(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    plan: Plan,
    *,
    scale: float,
    causal: bool,
    window: int | None,
    backend: str,
    factory: KernelFactory,
    init_value: float | None = None,
    valid_length: mx.array | None = None,
    split_on_device: bool | None = None,
) -> mx.array:
    """Run the kernel (both passes when the plan splits the keys).

    init_value fills the outputs first (tests poison them with NaN). valid_length (an
    int32 device scalar): only the first valid_length keys count, the queries being the
    last Lq of them (static caches: the plan covers the buffer, the kernel stops there).
    split_on_device (default: with valid_length): the plan's splits share the valid keys
    evenly instead of each taking plan.split_len of the buffer's."""
    B, Hq, Lq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    split = plan.nsplit > 1
    rows = B * Hq * Lq
    if split_on_device is None:
        split_on_device = valid_length is not None
    split_len = 0 if split_on_device else plan.split_len
    fields = (Lq, G, S, Hkv, plan.kv_lo, split_len, plan.nsplit, int(causal), window or 0, 0)
    params = constant(fields) if valid_length is None else _device_params(fields, valid_length)
    fparams = constant((scale * _LOG2E,), mx.float32)
    kern = _kernel(backend, factory, 1, plan.smem_bytes)
    outs = kern(
        inputs=[q, k, v, params, fparams],
        template=[
            ("T", q.dtype),
            ("D", D),
            ("BN", plan.BN),
            ("WM", plan.WM),
            ("NBUF", plan.NBUF),
            ("SPLIT", split),
            ("SMEM_WORDS", plan.smem_words),
        ],
        grid=(plan.threads * plan.n_rb, plan.nsplit, B * Hkv),
        threadgroup=(plan.threads, 1, 1),
        output_shapes=[
            (1,) if split else (B, Lq, Hq, D),
            (rows, plan.nsplit, D) if split else (1,),
            (rows, plan.nsplit) if split else (1,),
        ],
        output_dtypes=[q.dtype, mx.float32, mx.float32],
        init_value=init_value,
    )
    # The kernels write heads last ([B, Lq, Hq, D]); the result is its [B, Hq, Lq, D]
    # view, which the model's transpose(0, 2, 1, 3).reshape(B, Lq, -1) before o_proj
    # turns back into the buffer itself, without the copy it costs otherwise.
    if not split:
        return outs[0].transpose(0, 2, 1, 3)
    combine = _kernel(backend, factory, 2, 0)
    return combine(
        inputs=[outs[1], outs[2], constant((rows, plan.nsplit, D, Lq, Hq))],
        template=[("T", q.dtype)],
        grid=(rows * D, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(B, Lq, Hq, D)],
        output_dtypes=[q.dtype],
        init_value=init_value,
    )[0].transpose(0, 2, 1, 3)


_device_param_cache: dict = {}


def _device_params(fields: tuple, valid_length: mx.array) -> mx.array:
    """`fields` with the key count (params[2]) taken from the device; built once per
    forward (all layers share their length array), not once per layer."""
    key = (fields[:2] + fields[3:], id(valid_length))
    hit = _device_param_cache.get(key)
    if hit is None or hit[0] is not valid_length:
        if len(_device_param_cache) > 64:
            _device_param_cache.clear()
        base = constant(fields[:2] + (0,) + fields[3:])
        unit = constant(tuple(int(i == 2) for i in range(len(fields))))
        hit = _device_param_cache[key] = (valid_length, base + valid_length * unit)
    return hit[1]


_TOLERANCE = {mx.float32: 1e-4, mx.float16: 5e-3, mx.bfloat16: 3e-2}


def _self_check(backend: str, factory: KernelFactory, dtype: mx.Dtype, plan: Plan) -> bool:
    """Compile and run this plan's kernels once on random data against SDPA.

    Compilation happens when the kernel first runs, so this is where a kernel that
    does not compile (or computes garbage) is caught, once per configuration.
    """
    key = (backend, factory, dtype, plan.D, plan.BN, plan.WM, plan.NBUF, plan.nsplit > 1)
    with _lock:
        known = _checked.get(key)
    if known is not None:
        return known
    split = plan.nsplit > 1
    try:
        lq, group = 5, 2
        s = 2 * plan.BN + 7
        probe = make_plan(
            backend,
            dtype.size,
            1,
            1,
            group,
            lq,
            s,
            plan.D,
            None,
            wm=plan.WM,
            bn=plan.BN,
            nbuf=plan.NBUF,
            split_len=plan.BN if split else 4 * plan.BN,
        )
        if probe is None or (probe.nsplit > 1) != split or probe.BN != plan.BN:
            raise RuntimeError("probe plan does not match")
        keys = mx.random.split(mx.random.key(len(_checked) + 1), 3)
        q = mx.random.normal((1, group, lq, plan.D), key=keys[0]).astype(dtype)
        k = mx.random.normal((1, 1, s, plan.D), key=keys[1]).astype(dtype)
        v = mx.random.normal((1, 1, s, plan.D), key=keys[2]).astype(dtype)
        scale = plan.D**-0.5
        out = launch(
            q, k, v, probe, scale=scale, causal=True, window=None, backend=backend, factory=factory
        )
        # The reference runs on the CPU: MLX's CUDA matmuls round fp32 to TF32 by default
        # (MLX_ENABLE_TF32), which alone exceeds the fp32 tolerance.
        with mx.stream(mx.cpu):
            f32 = [x.astype(mx.float32) for x in (q, k, v)]
            ref = mx.fast.scaled_dot_product_attention(*f32, scale=scale, mask="causal")
            err = mx.linalg.norm(out.astype(mx.float32) - ref) / mx.linalg.norm(ref)
        err = err.item()
        ok = math.isfinite(err) and err < _TOLERANCE[dtype]
        reason = f"self-check error {err:.2e}"
    except Exception as e:  # noqa: BLE001 - a compile error surfaces here, at first evaluation
        ok, reason = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not ok:
        _warn_once(
            f"dflash_mlx block-attention kernel disabled on {backend} for {dtype}, D={plan.D} "
            f"({reason}); using mx.fast.scaled_dot_product_attention"
        )
    with _lock:
        _checked[key] = ok
    return ok


def _route(m: str, queries: mx.array, keys: mx.array, values: mx.array, window: int | None):
    """(backend, factory, plan) for this call shape, or None for SDPA."""
    if m == "sdpa":
        return None
    active = active_backend()
    if active is None:
        if m == "kernel":
            _warn_once(
                f"{SWITCH_ENV}=kernel but no GPU backend (Metal or CUDA) is active; "
                "using mx.fast.scaled_dot_product_attention"
            )
        return None
    backend, factory = active
    if not supports(queries, keys, values, window):
        return None
    B, Hq, Lq, D = queries.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    if m == "auto" and not prefers_kernel(backend, Lq, S, D, Hq // Hkv):
        return None
    plan = make_plan(backend, queries.dtype.size, B, Hkv, Hq // Hkv, Lq, S, D, window)
    if plan is None or not _self_check(backend, factory, queries.dtype, plan):
        return None
    return backend, factory, plan


_routes: dict = {}
_NOT_ROUTED = object()


def kernel_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    *,
    scale: float,
    causal: bool,
    window: int | None = None,
    valid_length: mx.array | None = None,
) -> mx.array | None:
    """The kernel's output, or None where the switch, backend, shape or measured
    thresholds say to use SDPA instead (valid_length: see `launch`).

    The decision and the plan are made once per call shape (a verify makes the same
    call in every layer): the hot path is one dictionary lookup."""
    key = (mode(), _site.override, mx.default_device(), queries.shape, keys.shape, queries.dtype)
    key += (keys.dtype, values.shape, values.dtype, window)
    route = _routes.get(key, _NOT_ROUTED)
    if route is _NOT_ROUTED:
        if len(_routes) > 4096:
            _routes.clear()
        route = _routes[key] = _route(key[0], queries, keys, values, window)
    if route is None:
        return None
    backend, factory, plan = route
    return launch(
        queries,
        keys,
        values,
        plan,
        scale=scale,
        causal=causal,
        window=window,
        backend=backend,
        factory=factory,
        valid_length=valid_length,
    )
