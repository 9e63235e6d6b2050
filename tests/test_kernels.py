"""Block-attention kernel: emulated Metal vs SDPA, fallback, routing; CUDA on a GPU.

The Metal variant runs here through a CPU emulation of Metal's execution model
(tests/emulation): the kernel body and the Metal prelude compile unchanged with g++.
Every case is checked against mx.fast.scaled_dot_product_attention on fp32 copies of
the inputs, with the block's visibility mask. The same cases run through the CUDA prelude
with its PTX instructions emulated (tests/emulation/cuda_emu.h), and, marked `cuda`,
through mx.fast.cuda_kernel on a GPU (deselected by tests/conftest.py elsewhere).
"""

from __future__ import annotations

import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent / "emulation"))

import emulator
from mlx_lm.models import qwen3
from mlx_lm.models.cache import make_prompt_cache

from dflash_mlx.kernels import (
    attention,
    block_attention,
    block_mask,
    source,
    verify_attention,
)
from dflash_mlx.kernels.routing import attention_modules

TOL = {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}


@dataclass(frozen=True)
class Case:
    tiling: str  # which backend's tile plan: "metal" or "cuda"
    dtype: mx.Dtype
    B: int
    Hkv: int
    G: int  # query heads per KV head
    Lq: int
    S: int
    D: int
    causal: bool
    window: int | None = None
    split_len: int | None = None  # keys per split; None: the plan's own choice
    layout: str = "contiguous"  # contiguous | padded | misaligned | transposed

    @property
    def id(self) -> str:
        dt = str(self.dtype).split(".")[-1]
        mask = "causal" if self.causal else "bidir"
        w = f"-w{self.window}" if self.window else ""
        sp = f"-split{self.split_len}" if self.split_len else ""
        lay = "" if self.layout == "contiguous" else f"-{self.layout}"
        return (
            f"{self.tiling}-{dt}-B{self.B}-kv{self.Hkv}-g{self.G}-q{self.Lq}-s{self.S}"
            f"-d{self.D}-{mask}{w}{sp}{lay}"
        )

    def plan(self) -> source.Plan:
        plan = source.make_plan(
            self.tiling,
            self.dtype.size,
            self.B,
            self.Hkv,
            self.G,
            self.Lq,
            self.S,
            self.D,
            self.window,
            split_len=self.split_len,
        )
        assert plan is not None
        return plan


bf16, f16, f32 = mx.bfloat16, mx.float16, mx.float32
CASES = [
    # Metal's tiling (one K/V buffer, small tiles)
    Case("metal", bf16, 1, 1, 4, 16, 300, 128, True, split_len=128),  # S % tile != 0, split
    Case("metal", bf16, 1, 1, 4, 16, 20, 128, False),  # S smaller than one tile
    Case("metal", f16, 1, 2, 1, 1, 77, 64, True),  # one query, GQA 1
    Case("metal", f32, 1, 1, 8, 7, 150, 64, False, window=40, split_len=64),
    Case("metal", bf16, 1, 1, 4, 32, 90, 256, True, window=33),  # two row blocks
    Case("metal", f16, 1, 1, 8, 16, 300, 256, True, split_len=96),
    Case("metal", f32, 1, 1, 1, 32, 64, 128, True),  # S a multiple of the tile
    Case("metal", bf16, 2, 2, 4, 7, 45, 64, True, layout="padded"),
    Case("metal", f16, 1, 1, 4, 16, 70, 128, False, layout="transposed"),
    # CUDA's tiling (two K/V buffers filled by asynchronous copies, 32/64-key tiles)
    Case("cuda", bf16, 1, 1, 4, 16, 520, 128, True, split_len=256),
    Case("cuda", bf16, 1, 2, 4, 16, 27, 128, False),  # S smaller than one tile
    Case("cuda", f16, 1, 1, 8, 7, 61, 256, True),
    Case("cuda", f32, 1, 1, 1, 1, 1000, 64, False, split_len=192),
    Case("cuda", bf16, 1, 1, 4, 32, 200, 64, True, window=64),
    Case("cuda", f32, 1, 1, 4, 16, 100, 128, True, window=17, layout="misaligned"),
    Case("cuda", bf16, 2, 1, 8, 32, 150, 128, True, layout="padded"),  # 4 row blocks
]


def _inputs(case: Case, seed: int) -> tuple[mx.array, mx.array, mx.array]:
    keys = mx.random.split(mx.random.key(seed), 3)
    q = mx.random.normal((case.B, case.Hkv * case.G, case.Lq, case.D), key=keys[0])
    k = mx.random.normal((case.B, case.Hkv, case.S, case.D), key=keys[1])
    v = mx.random.normal((case.B, case.Hkv, case.S, case.D), key=keys[2])
    return tuple(x.astype(case.dtype) for x in (q, k, v))


def _reference(q, k, v, causal, window) -> mx.array:
    with mx.stream(mx.cpu):
        f = [x.astype(mx.float32) for x in (q, k, v)]
        mask = block_mask(q.shape[2], k.shape[2], causal, window)
        out = mx.fast.scaled_dot_product_attention(*f, scale=q.shape[-1] ** -0.5, mask=mask)
        mx.eval(out)
    return out


def _rel_err(out: mx.array, ref: mx.array) -> float:
    with mx.stream(mx.cpu):
        out = out.astype(mx.float32)
        assert bool(mx.all(mx.isfinite(out)).item()), "non-finite or unwritten output"
        return (mx.linalg.norm(out - ref) / mx.linalg.norm(ref)).item()


# ------------------------------------------------------------------ emulated Metal


def _poison(shape, dtype) -> np.ndarray:
    """NaN in any float type (bf16 travels as uint16: all-ones is a NaN there too)."""
    if np.issubdtype(dtype, np.floating):
        return np.full(shape, np.nan, dtype=dtype)
    return np.full(shape, np.iinfo(dtype).max, dtype=dtype)


def _numpy_layout(kind: str):
    """Place q/k/v inside a larger buffer (emulator inputs): (buffer, offset, strides)."""

    def layout(name, x):
        if name not in ("q", "k", "v") or x.ndim != 4 or kind == "contiguous":
            c = np.ascontiguousarray(x)
            return c.ravel(), 0, [s // c.itemsize for s in c.strides]
        B, H, S, D = x.shape
        if kind == "transposed":  # last-axis stride S: the kernel's general-stride path
            buf = np.ascontiguousarray(np.swapaxes(x, 2, 3))
            return buf.ravel(), 0, [H * D * S, D * S, 1, S]
        if kind == "padded":  # a view into a longer cache, as a KV cache slice is
            big = _poison((B + 1, H + 1, S + 5, D), x.dtype)
            big[1:, 1:, 3 : 3 + S] = x
            st = [s // big.itemsize for s in big.strides]
            return big.ravel(), st[0] + st[1] + 3 * st[2], st
        if kind == "misaligned":  # rows not 16-byte aligned
            big = _poison((B, H, S, D + 3), x.dtype)
            big[..., 1 : 1 + D] = x
            st = [s // big.itemsize for s in big.strides]
            return big.ravel(), 1, st
        raise ValueError(kind)

    return layout


def _emulated_factory(
    backend: str, build_dir: Path, layout: str = "contiguous", plain_loads: bool = False
):
    """mx.fast.metal_kernel / cuda_kernel stand-ins that run on the CPU emulator."""
    options = {"layout": _numpy_layout(layout)}
    if backend == "metal":
        return emulator.factory(build_dir, **options)
    base = emulator.cuda_factory(build_dir, **options)
    if not plain_loads:
        return base

    def make(name, input_names, output_names, src, header, shared_memory):
        return base(
            name, input_names, output_names, src, "#define DF_NO_LDMATRIX\n" + header, shared_memory
        )

    return make


def _programs(case: Case, backend: str, build_dir: Path, plain_loads: bool = False):
    """(kernel, C++ source) of every program one case launches."""
    plan = case.plan()
    split = plan.nsplit > 1
    make = _emulated_factory(backend, build_dir, plain_loads=plain_loads)
    h1, s1 = source.kernel_source(backend, 1)
    k1 = make(
        "dflash_block_attention", source.PASS1_INPUTS, source.PASS1_OUTPUTS, s1, h1, plan.smem_bytes
    )
    ins = [(case.dtype, 4)] * 3 + [(mx.int32, 1), (mx.float32, 1)]
    out = [
        (
            k1,
            k1.generate(
                ins, _template(case.dtype, plan, split), [case.dtype, mx.float32, mx.float32]
            ),
        )
    ]
    if split:
        h2, s2 = source.kernel_source(backend, 2)
        k2 = make(
            "dflash_block_attention_combine", source.PASS2_INPUTS, source.PASS2_OUTPUTS, s2, h2, 0
        )
        code = k2.generate(
            [(mx.float32, 3), (mx.float32, 2), (mx.int32, 1)], [("T", case.dtype)], [case.dtype]
        )
        out.append((k2, code))
    return out


# CUDA's fragment loads have two forms (ldmatrix, or plain 32-bit loads: DF_NO_LDMATRIX);
# the plain form runs on a few cases.
PLAIN_LOAD_CASES = [c for c in CASES if c.tiling == "cuda" and c.dtype != f32][:3]


@pytest.fixture(scope="session")
def emu_dir(tmp_path_factory) -> Path:
    """Build every program the cases need once per session, two compiles at a time."""
    build_dir = tmp_path_factory.mktemp("gpu_emulator")
    jobs = {}
    for case in CASES:
        for backend in ("metal", "cuda"):
            for kern, code in _programs(case, backend, build_dir):
                jobs.setdefault(code, kern)
    for case in PLAIN_LOAD_CASES:
        for kern, code in _programs(case, "cuda", build_dir, plain_loads=True):
            jobs.setdefault(code, kern)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda kv: kv[1]._build(kv[0]), jobs.items()))
    return build_dir


def _template(dtype, plan, split):
    return [
        ("T", dtype),
        ("D", plan.D),
        ("BN", plan.BN),
        ("WM", plan.WM),
        ("NBUF", plan.NBUF),
        ("SPLIT", split),
        ("SMEM_WORDS", plan.smem_words),
    ]


def _check_emulated(case: Case, backend: str, build_dir: Path, plain_loads: bool = False):
    q, k, v = _inputs(case, seed=hash(case.id) % 10_000)
    factory = _emulated_factory(backend, build_dir, case.layout, plain_loads)
    out = attention.launch(
        q,
        k,
        v,
        case.plan(),
        scale=case.D**-0.5,
        causal=case.causal,
        window=case.window,
        backend=backend,
        factory=factory,
    )
    assert out.shape == q.shape and out.dtype == case.dtype
    err = _rel_err(out, _reference(q, k, v, case.causal, case.window))
    assert err < TOL[case.dtype], f"relative error {err:.2e}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_emulated_metal_matches_sdpa(case: Case, emu_dir: Path):
    _check_emulated(case, "metal", emu_dir)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_emulated_cuda_matches_sdpa(case: Case, emu_dir: Path):
    # The CUDA prelude with each PTX instruction emulated from its documented layout.
    _check_emulated(case, "cuda", emu_dir)


@pytest.mark.parametrize("case", PLAIN_LOAD_CASES, ids=[c.id for c in PLAIN_LOAD_CASES])
def test_emulated_cuda_plain_loads_match_sdpa(case: Case, emu_dir: Path):
    _check_emulated(case, "cuda", emu_dir, plain_loads=True)


def test_cases_cover_the_issue():
    plans = [c.plan() for c in CASES]
    assert {c.Lq for c in CASES} >= {1, 7, 16, 32}
    assert {c.G for c in CASES} >= {1, 4, 8}
    assert {c.D for c in CASES} == {64, 128, 256}
    assert {c.dtype for c in CASES} == {bf16, f16, f32}
    assert {(c.causal, c.window is not None) for c in CASES} == {
        (True, False),
        (False, False),
        (True, True),
        (False, True),
    }
    assert any(c.S < p.BN for c, p in zip(CASES, plans))
    assert any(c.S % p.BN for c, p in zip(CASES, plans))
    assert any(p.nsplit > 1 for p in plans) and any(p.nsplit == 1 for p in plans)
    assert any(p.n_rb > 1 for p in plans) and {p.NBUF for p in plans} == {1, 2}
    assert {c.layout for c in CASES} == {"contiguous", "padded", "misaligned", "transposed"}


def test_plan_threadgroup_memory_matches_the_kernel():
    # source.smem_bytes mirrors SMEM_NEED in the body; the body static_asserts that the
    # memory it is given (SMEM_WORDS) is enough, so a mismatch fails to compile above.
    for c in CASES:
        p = c.plan()
        assert p.smem_bytes <= source.SMEM_LIMIT[c.tiling]
        vec = 16 // c.dtype.size
        need = c.dtype.size * (
            16 * p.WM * (p.D + vec) + 2 * p.NBUF * p.BN * (p.D + vec) + p.WM * 16 * (p.BN + vec)
        )
        assert p.smem_bytes == need


def test_metal_source_names_only_the_attributes_it_uses():
    # MLX adds a Metal attribute to the signature wherever its name occurs in the source.
    _, body = source.kernel_source("metal", 1)
    found = {a for a in emulator._ATTRIBUTES if a in body}
    assert found == {
        "thread_index_in_threadgroup",
        "thread_index_in_simdgroup",
        "simdgroup_index_in_threadgroup",
        "threadgroup_position_in_grid",
    }


def _tiny_kernel(build_dir, body: str, n_out: int = 32):
    kern = emulator.EmulatedMetalKernel("probe", ["x"], ["y"], body, "", build_dir=build_dir)
    x = mx.arange(n_out, dtype=mx.float32)
    return kern, x


def test_emulator_reports_divergent_barrier(emu_dir):
    body = """
    uint t = thread_index_in_threadgroup;
    if (t < 16) { threadgroup_barrier(mem_flags::mem_threadgroup); }
    y[t] = x[t];
    """
    kern, x = _tiny_kernel(emu_dir, body)
    with pytest.raises(RuntimeError, match="barrier|deadlock"):
        kern(
            inputs=[x],
            grid=(32, 1, 1),
            threadgroup=(32, 1, 1),
            output_shapes=[(32,)],
            output_dtypes=[mx.float32],
        )


def test_emulator_reports_out_of_bounds_read(emu_dir):
    # x (32 floats) ends at a guard page: x[32...] is in it.
    body = "uint t = thread_index_in_threadgroup; y[t] = x[t + 32];"
    kern, x = _tiny_kernel(emu_dir, body)
    with pytest.raises(RuntimeError, match="failed"):
        kern(
            inputs=[x],
            grid=(32, 1, 1),
            threadgroup=(32, 1, 1),
            output_shapes=[(32,)],
            output_dtypes=[mx.float32],
        )


def test_emulator_simd_shuffles_and_threadgroup_memory(emu_dir):
    body = """
    uint t = thread_index_in_threadgroup;
    threadgroup float buf[64];
    buf[t] = x[t];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float s = simd_sum(buf[63 - t]);
    y[t] = s + simd_shuffle_xor(x[t], ushort(5)) * 1000.0f;
    """
    kern, x = _tiny_kernel(emu_dir, body, 64)
    (y,) = kern(
        inputs=[x],
        grid=(64, 1, 1),
        threadgroup=(64, 1, 1),
        output_shapes=[(64,)],
        output_dtypes=[mx.float32],
    )
    xs = np.arange(64, dtype=np.float32)
    rev = xs[::-1]
    sums = np.array([rev[(t // 32) * 32 : (t // 32) * 32 + 32].sum() for t in range(64)])
    expect = sums + xs[np.arange(64) ^ 5] * 1000
    np.testing.assert_array_equal(np.array(y), expect)


def test_emulator_catches_a_missing_async_wait(emu_dir):
    # Copies land only at the wait: a read before it sees the NaN the memory starts with.
    body = """
    uint t = thread_index_in_threadgroup;
    threadgroup float buf[32];
    df_copy16_async(buf + 4 * (t % 8), x + 4 * (t % 8));
    df_async_commit();
    y[t] = buf[t];
    df_async_wait0();
    """
    header = source.read_source("prelude_metal.h")
    kern = emulator.EmulatedMetalKernel(
        "probe_async", ["x"], ["y"], body, header, build_dir=emu_dir
    )
    (y,) = kern(
        inputs=[mx.arange(32, dtype=mx.float32)],
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(32,)],
        output_dtypes=[mx.float32],
    )
    assert np.isnan(np.array(y)).any()


# ------------------------------------------------------------------ fallback and switch


def test_cpu_falls_back_to_sdpa(monkeypatch):
    monkeypatch.setenv(attention.SWITCH_ENV, "auto")
    keys = mx.random.split(mx.random.key(3), 3)
    q = mx.random.normal((1, 4, 16, 64), key=keys[0])
    k = mx.random.normal((1, 2, 50, 64), key=keys[1])
    v = mx.random.normal((1, 2, 50, 64), key=keys[2])
    for causal, window in ((True, None), (False, None), (True, 20), (False, 20)):
        out = block_attention(q, k, v, scale=0.125, causal=causal, window=window)
        mask = block_mask(16, 50, causal, window)
        ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask)
        assert mx.allclose(out, ref, atol=1e-5, rtol=1e-5).item()


def test_switch_forcing_the_kernel_on_cpu_warns_once(monkeypatch):
    monkeypatch.setenv(attention.SWITCH_ENV, "kernel")
    monkeypatch.setattr(attention._site, "warned", False)
    q = mx.random.normal((1, 2, 4, 64))
    k = mx.random.normal((1, 2, 30, 64))
    with pytest.warns(RuntimeWarning, match="no GPU backend"):
        out = block_attention(q, k, k, scale=0.125, causal=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        block_attention(q, k, k, scale=0.125, causal=True)
    ref = mx.fast.scaled_dot_product_attention(q, k, k, scale=0.125, mask="causal")
    assert mx.allclose(out, ref).item()


def test_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv(attention.SWITCH_ENV, "fast")
    with pytest.raises(ValueError, match=attention.SWITCH_ENV):
        attention.mode()


def _broken_factory(kind: str, calls: list):
    def make(name, input_names, output_names, src, header, shared_memory):
        def kernel(**kw):
            calls.append(name)
            if kind == "compile":
                raise RuntimeError("[compile] error: expected ';' (simulated)")
            shapes, dtypes = kw["output_shapes"], kw["output_dtypes"]
            return [mx.full(s, 7.0, dtype=d) for s, d in zip(shapes, dtypes)]

        return kernel

    return make


@pytest.mark.parametrize("kind", ["compile", "garbage"])
def test_failing_kernel_falls_back_with_one_warning(kind, monkeypatch):
    monkeypatch.setenv(attention.SWITCH_ENV, "kernel")
    monkeypatch.setattr(attention._site, "warned", False)
    monkeypatch.setattr(attention, "_checked", {})
    calls: list = []
    q = mx.random.normal((1, 4, 16, 128))
    k = mx.random.normal((1, 1, 80, 128))
    ref = mx.fast.scaled_dot_product_attention(q, k, k, scale=0.1, mask="causal")
    with attention.use_backend("metal", _broken_factory(kind, calls)):
        with pytest.warns(RuntimeWarning, match="kernel disabled"):
            out = block_attention(q, k, k, scale=0.1, causal=True)
        n = len(calls)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out2 = block_attention(q, k, k, scale=0.1, causal=True)
    assert calls and len(calls) == n  # the disabled kernel is not tried again
    assert mx.allclose(out, ref).item() and mx.allclose(out2, ref).item()


def test_auto_mode_uses_the_kernel_only_where_measured_faster(emu_dir, monkeypatch):
    monkeypatch.setenv(attention.SWITCH_ENV, "auto")
    calls: list = []

    def counting(*a):
        calls.append(a[0])
        return _emulated_factory("metal", emu_dir)(*a)

    q = mx.random.normal((1, 4, 16, 64), key=mx.random.key(1))
    k = mx.random.normal((1, 1, 40, 64), key=mx.random.key(2))
    with attention.use_backend("metal", counting):
        monkeypatch.setitem(attention.THRESHOLDS, "metal", {})
        assert attention.kernel_attention(q, k, k, scale=0.125, causal=True) is None
        monkeypatch.setitem(attention.THRESHOLDS, "metal", {(64, 2, 16): 41})
        assert attention.kernel_attention(q, k, k, scale=0.125, causal=True) is None
        monkeypatch.setitem(attention.THRESHOLDS, "metal", {(64, 2, 16): 40})
        out = attention.kernel_attention(q, k, k, scale=0.125, causal=True)
    assert out is not None and "dflash_block_attention" in calls
    ref = mx.fast.scaled_dot_product_attention(q, k, k, scale=0.125, mask="causal")
    assert mx.allclose(out, ref, atol=1e-4).item()


@pytest.mark.parametrize(
    "shape_q, shape_k, dtype, window",
    [
        ((1, 4, 16, 96), (1, 1, 40, 96), mx.float32, None),  # head_dim 96
        ((1, 4, 33, 64), (1, 1, 40, 64), mx.float32, None),  # 33 queries
        ((1, 4, 16, 64), (1, 3, 40, 64), mx.float32, None),  # 4 heads over 3 KV heads
        ((1, 4, 16, 64), (1, 1, 10, 64), mx.float32, None),  # fewer keys than queries
        ((1, 4, 16, 64), (1, 1, 40, 64), mx.float32, 0),  # empty window
        ((1, 4, 16, 64), (1, 1, 40, 64), mx.int32, None),
    ],
)
def test_unsupported_shapes_use_sdpa(shape_q, shape_k, dtype, window, monkeypatch):
    monkeypatch.setenv(attention.SWITCH_ENV, "kernel")
    calls: list = []
    q, k = mx.zeros(shape_q, dtype=dtype), mx.zeros(shape_k, dtype=dtype)
    with attention.use_backend("metal", _broken_factory("compile", calls)):
        assert attention.kernel_attention(q, k, k, scale=1.0, causal=True, window=window) is None
    assert not calls


# ------------------------------------------------------------------ routing


def _tiny_qwen3(head_dim: int = 64) -> qwen3.Model:
    args = qwen3.ModelArgs(
        model_type="qwen3",
        hidden_size=96,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        rms_norm_eps=1e-6,
        vocab_size=101,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        head_dim=head_dim,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    mx.random.seed(7)
    model = qwen3.Model(args)
    mx.eval(model.parameters())
    return model


def _prefill(model, n: int):
    cache = make_prompt_cache(model)
    ids = mx.random.randint(0, 101, (1, n), key=mx.random.key(11))
    mx.eval(model(ids, cache=cache))
    return cache


def test_routing_patches_only_inside_the_block_and_restores():
    model = _tiny_qwen3()
    (mod,) = attention_modules(model)
    assert mod is qwen3
    original = qwen3.scaled_dot_product_attention
    with verify_attention(model):
        assert qwen3.scaled_dot_product_attention is not original
        with verify_attention(_tiny_qwen3()):  # a second model sharing the module
            pass
        assert qwen3.scaled_dot_product_attention is not original
    assert qwen3.scaled_dot_product_attention is original
    with pytest.raises(KeyError), verify_attention(model):
        raise KeyError("boom")
    assert qwen3.scaled_dot_product_attention is original


def test_routing_is_independent_across_threads():
    model_a, model_b = _tiny_qwen3(), _tiny_qwen3()
    original = qwen3.scaled_dot_product_attention
    barrier = threading.Barrier(2)
    errors = []

    def run(model, hold):
        try:
            with verify_attention(model):
                barrier.wait()
                if hold:
                    barrier.wait()
            if not hold:
                barrier.wait()
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [
        threading.Thread(target=run, args=(m, h)) for m, h in ((model_a, True), (model_b, False))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert qwen3.scaled_dot_product_attention is original


def test_plain_mlx_lm_calls_stay_bit_identical(emu_dir, monkeypatch):
    monkeypatch.setenv(attention.SWITCH_ENV, "kernel")
    model = _tiny_qwen3()
    ids = mx.random.randint(0, 101, (1, 16), key=mx.random.key(5))

    def run(tokens, cache):
        out = model(tokens, cache=cache)
        mx.eval(out)
        return out

    plain = run(ids, None)  # no cache: not a verify call
    cache = _prefill(model, 30)
    step = run(ids[:, :1], cache)  # one-token decode
    verify = run(ids, cache)  # verify-shaped, outside the block
    for c in cache:
        c.trim(17)
    calls: list = []

    def counting(*a):
        calls.append(a[0])
        return emulator.factory(emu_dir)(*a)

    with attention.use_backend("metal", counting):
        with verify_attention(model):
            plain2 = run(ids, None)
            step2 = run(ids[:, :1], cache)
        assert not calls
        verify2 = run(ids, cache)  # after the block: mlx-lm's own path again
    assert not calls
    assert mx.array_equal(plain, plain2).item()
    assert mx.array_equal(step, step2).item()
    assert mx.array_equal(verify, verify2).item()


def test_verify_forward_under_routing_equals_stock(emu_dir, monkeypatch):
    monkeypatch.setenv(attention.SWITCH_ENV, "kernel")
    model = _tiny_qwen3()
    cache = _prefill(model, 45)
    block = mx.random.randint(0, 101, (1, 16), key=mx.random.key(9))
    stock = model(block, cache=cache)
    for c in cache:
        c.trim(16)
    calls: list = []

    def counting(*a):
        calls.append(a[0])
        return emulator.factory(emu_dir)(*a)

    with attention.use_backend("metal", counting), verify_attention(model):
        routed = model(block, cache=cache)
    assert "dflash_block_attention" in calls
    assert cache[0].offset == 45 + 16
    err = (mx.linalg.norm(routed - stock) / mx.linalg.norm(stock)).item()
    assert err < 1e-5


# ------------------------------------------------------------------ CUDA (GPU machine)

# Deselected by tests/conftest.py where MLX's CUDA backend is unavailable.


def _cuda_layout(x: mx.array, kind: str) -> mx.array:
    """The same data as a strided view, as MLX passes it to cuda_kernel."""
    if kind == "contiguous":
        return x
    B, H, S, D = x.shape
    if kind == "transposed":
        return mx.contiguous(x.swapaxes(2, 3)).swapaxes(2, 3)
    if kind == "padded":
        big = mx.full((B + 1, H + 1, S + 5, D), float("nan"), dtype=x.dtype)
        big[1:, 1:, 3 : 3 + S] = x
        return big[1:, 1:, 3 : 3 + S]
    if kind == "misaligned":
        big = mx.full((B, H, S, D + 3), float("nan"), dtype=x.dtype)
        big[..., 1 : 1 + D] = x
        return big[..., 1 : 1 + D]
    raise ValueError(kind)


@pytest.mark.cuda
@pytest.mark.parametrize("ldmatrix", [True, False], ids=["ldmatrix", "plain-loads"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cuda_matches_sdpa(case: Case, ldmatrix: bool):
    q, k, v = _inputs(case, seed=hash(case.id) % 10_000)
    ref = _reference(q, k, v, case.causal, case.window)
    q, k, v = (_cuda_layout(x, case.layout) for x in (q, k, v))
    out = attention.launch(
        q,
        k,
        v,
        case.plan(),
        scale=case.D**-0.5,
        causal=case.causal,
        window=case.window,
        backend="cuda",
        factory=_cuda_factory(ldmatrix),
        init_value=float("nan"),
    )
    err = _rel_err(out, ref)
    assert err < TOL[case.dtype], f"relative error {err:.2e}"


def _cuda_factory(ldmatrix: bool):
    base = attention._mlx_factory("cuda")
    if ldmatrix:
        return base

    def make(name, input_names, output_names, src, header, shared_memory):
        return base(
            name + "_plain",
            input_names,
            output_names,
            src,
            "#define DF_NO_LDMATRIX\n" + header,
            shared_memory,
        )

    return make


@pytest.mark.cuda
def test_cuda_block_attention_dispatch(monkeypatch):
    monkeypatch.setenv(attention.SWITCH_ENV, "kernel")
    case = Case("cuda", bf16, 1, 8, 4, 16, 3000, 128, True)
    q, k, v = _inputs(case, seed=1)
    out = block_attention(q, k, v, scale=case.D**-0.5, causal=True)
    assert _rel_err(out, _reference(q, k, v, True, None)) < TOL[bf16]


@pytest.mark.cuda
def test_cuda_verify_forward_under_routing(monkeypatch):
    monkeypatch.setenv(attention.SWITCH_ENV, "kernel")
    model = _tiny_qwen3()
    cache = _prefill(model, 300)
    block = mx.random.randint(0, 101, (1, 16), key=mx.random.key(9))
    stock = model(block, cache=cache)
    for c in cache:
        c.trim(16)
    with verify_attention(model):
        routed = model(block, cache=cache)
    err = (mx.linalg.norm(routed - stock) / mx.linalg.norm(stock)).item()
    assert err < 1e-4


def test_static_cache_verify_runs_the_kernel_up_to_the_device_length(emu_dir, monkeypatch):
    """Static buffers (length on the device, capacity larger, stale rows past it): the
    routed kernel reads the key count from the device and matches stock attention on a
    plain cache of exactly that length."""
    from dflash_mlx.static_cache import Length, StaticKVCache

    monkeypatch.setenv(attention.SWITCH_ENV, "kernel")
    model = _tiny_qwen3()
    block = mx.random.randint(0, 101, (1, 16), key=mx.random.key(9))
    plain = _prefill(model, 45)
    length = Length(45, 300)
    static = [StaticKVCache.from_kv_cache(c, length) for c in plain]
    for c in static:  # stale rows where rejected drafts were: must stay invisible
        h = c.kv.shape[1] // 2  # keys' heads, then values'
        c.kv[:, :h, 61:, :] = 7.0
        c.kv[:, h:, 61:, :] = -7.0
    stock = model(block, cache=plain)
    calls: list = []

    def counting(*a):
        calls.append(a[0])
        return emulator.factory(emu_dir)(*a)

    with attention.use_backend("metal", counting), verify_attention(model):
        routed = model(block, cache=static)
    assert "dflash_block_attention" in calls
    assert length.offset.item() == 45  # writing a block does not move the length
    err = (mx.linalg.norm(routed - stock) / mx.linalg.norm(stock)).item()
    assert err < 1e-5


@pytest.mark.parametrize("sliding, window", [(False, None), (True, 6)])
def test_draft_static_attention_runs_on_the_kernel(emu_dir, monkeypatch, sliding, window):
    """A draft layer over static buffers gives what SDPA with the block mask over the
    whole buffer gives, on the kernel with the valid length on the device: full
    attention, and a window whose first key moves with that length (24 context
    positions + 16 block queries, window 6: the first keys are out of it)."""
    from dflash_mlx.config import DraftConfig
    from dflash_mlx.drafter import Attention
    from dflash_mlx.rope import make_rope
    from dflash_mlx.static_cache import Length, StaticKVCache

    config = DraftConfig.from_dict(
        {
            "architectures": ["DFlashDraftModel"],
            "block_size": 16,
            "dflash_config": {"mask_token_id": 63, "target_layer_ids": [0]},
            "num_target_layers": 2,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 64,
            "vocab_size": 64,
            "rope_theta": 10000.0,
            "layer_types": ["sliding_attention" if sliding else "full_attention"],
            "sliding_window": window,
        }
    )
    mx.random.seed(0)
    attn = Attention(config, sliding)
    rope = make_rope(config)
    mx.eval(attn.parameters())
    context = mx.random.normal((1, 24, 128))
    block = mx.random.normal((1, 16, 128))

    def run():
        length = Length(0, 64)
        cache = StaticKVCache(mx.zeros((1, 2, 64, 64)), length)  # 1 key head, 1 value head
        attn.add_context(context, rope, cache)
        length.set(mx.array(24))
        return attn(block, rope, cache, None)

    calls: list = []

    def counting(*a):
        calls.append(a[0])
        return _emulated_factory("metal", emu_dir)(*a)

    monkeypatch.setenv(attention.SWITCH_ENV, "sdpa")
    expected = run()  # SDPA with the block mask
    monkeypatch.setenv(attention.SWITCH_ENV, "kernel")
    with attention.use_backend("metal", counting):
        out = run()
    assert "dflash_block_attention" in calls
    assert mx.allclose(out, expected, atol=1e-4).item()


@pytest.mark.parametrize("backend", ["metal", "cuda"], ids=["metal-emulated", "ptx-emulated"])
def test_splits_share_the_device_length(emu_dir, backend):
    """A static call's plan is made for the buffer (here 11 splits of 64 of its 700 rows);
    with the valid length on the device the splits share the valid keys, and the result
    is SDPA over exactly those keys (stale rows past them poisoned), also where most
    splits get no key and where the valid keys fill the buffer."""
    lq, group, cap = 5, 2, 700
    plan = source.make_plan(backend, 4, 1, 2, group, lq, cap, 64, None, split_len=64)
    assert plan.nsplit == 11
    keys = mx.random.split(mx.random.key(3), 3)
    q = mx.random.normal((1, 2 * group, lq, 64), key=keys[0])
    k = mx.random.normal((1, 2, cap, 64), key=keys[1])
    v = mx.random.normal((1, 2, cap, 64), key=keys[2])
    for n in (9, 150, cap):
        stale = mx.arange(cap)[None, None, :, None] >= n
        kp, vp = mx.where(stale, mx.nan, k), mx.where(stale, mx.nan, v)
        out = attention.launch(
            q,
            kp,
            vp,
            plan,
            scale=64**-0.5,
            causal=True,
            window=None,
            backend=backend,
            factory=_emulated_factory(backend, emu_dir),
            valid_length=mx.array(n, dtype=mx.int32),
        )
        ref = _reference(q, k[:, :, :n], v[:, :, :n], True, None)
        assert _rel_err(out, ref) < TOL[mx.float32], n


def test_kernel_sources_are_compacted_and_carry_only_their_prelude_sections():
    """MLX hashes a custom kernel's whole source at every launch (host cost per byte):
    comments and indentation go, strings stay, and each kernel takes the prelude
    sections it uses."""
    text = 'x = 1;  // a comment\n  // a line of comment\n\n  asm("a // b");\n#define A 1\n'
    assert source.compact(text) == 'x = 1;\nasm("a // b");\n#define A 1\n'
    for backend in ("metal", "cuda"):
        core, tiles, full = (source.prelude(backend, s) for s in source.SECTIONS)
        assert "df_lane_sum" in core and "df_frag_c" not in core and "df_mm_row" not in tiles
        assert full.startswith(tiles) and tiles.startswith(core) and "df_mm_row" in full
        assert "//" not in core
