"""Skinny verify matmuls: emulated Metal and CUDA vs mx.matmul / mx.quantized_matmul.

Both variants of the kernel (dflash_mlx/kernels/matmul_body.h with the Metal prelude,
and with the CUDA prelude whose PTX instructions are emulated) run on the CPU emulator
(tests/emulation): outputs start as NaN, inputs end at guard pages, CUDA's grid is
rounded up to whole blocks. Every case is checked against the same product computed by
MLX on the CPU in fp32 from the same (dequantized) weights. Tests marked `cuda` run the
real kernel through mx.fast.cuda_kernel on the GPU machine.
"""

from __future__ import annotations

import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import pytest
from mlx import nn

sys.path.insert(0, str(Path(__file__).parent / "emulation"))

import emulator

from dflash_mlx.kernels import matmul

# Relative (Frobenius) error bounds. The kernel accumulates in fp32 and rounds the
# output to T once (bf16: 2^-9 relative, ~1.5e-3 rms); dequantized weights are rounded
# to T too, as MLX's own quantized kernels do.
TOL = {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}

bf16, f16, f32 = mx.bfloat16, mx.float16, mx.float32


@dataclass(frozen=True)
class Case:
    dtype: mx.Dtype
    M: int
    N: int
    K: int
    bits: int = 0
    group: int = 0
    bias: bool = False
    nsplit: int | None = None  # None: the plan's choice
    rt: int | None = None  # 16-row tiles per simdgroup; None: the plan's choice
    wk: int = 1  # simdgroups along K (summed in threadgroup memory)

    @property
    def id(self) -> str:
        dt = str(self.dtype).split(".")[-1]
        q = f"-q{self.bits}g{self.group}" if self.bits else ""
        b = "-bias" if self.bias else ""
        s = f"-split{self.nsplit}" if self.nsplit else ""
        r = f"-rt{self.rt}" if self.rt else ""
        w = f"-wk{self.wk}" if self.wk > 1 else ""
        return f"{dt}{q}-m{self.M}-n{self.N}-k{self.K}{b}{s}{r}{w}"


CASES = [
    # dense: N tails (not a multiple of 16), K tails (element-wise loads), splits
    Case(bf16, 7, 40, 96, wk=4),  # 3 chunks over 4 simdgroups along K: one idle
    Case(f16, 16, 37, 100, bias=True, nsplit=2),  # K % 8 != 0: element-wise path
    Case(f32, 32, 21, 37, bias=True, wk=2),  # odd K; 2 simdgroups along K
    Case(bf16, 1, 24, 64),
    Case(bf16, 2, 70, 200, bias=True, nsplit=3, rt=2),  # partial last split, 2 row tiles
    # quantized: every bits x group size
    Case(bf16, 2, 20, 64, 4, 32),
    Case(f16, 16, 33, 256, 4, 64, bias=True, nsplit=2),
    Case(bf16, 32, 17, 256, 4, 128, wk=4),  # 2 row tiles (the plan's choice), 4 along K
    Case(f32, 7, 24, 96, 8, 32),
    Case(bf16, 1, 40, 128, 8, 64, nsplit=2),
    Case(f16, 16, 18, 384, 8, 128, bias=True, rt=1),
]


def _inputs(case: Case, seed: int):
    keys = mx.random.split(mx.random.key(seed), 3)
    x = mx.random.normal((case.M, case.K), key=keys[0]).astype(case.dtype)
    w = mx.random.normal((case.N, case.K), key=keys[1]).astype(case.dtype)
    b = mx.random.normal((case.N,), key=keys[2]).astype(case.dtype) if case.bias else None
    if case.bits:
        wq, s, bq = mx.quantize(w, group_size=case.group, bits=case.bits)
        mx.eval(wq, s, bq)
        return x, (wq, s, bq), b
    return x, (w,), b


def _reference(case: Case, x, w, b) -> mx.array:
    """The same product by MLX on the CPU in fp32."""
    with mx.stream(mx.cpu):
        xf = x.astype(mx.float32)
        if case.bits:
            wq, s, bq = w
            ref = mx.quantized_matmul(
                xf,
                wq,
                s.astype(mx.float32),
                bq.astype(mx.float32),
                transpose=True,
                group_size=case.group,
                bits=case.bits,
            )
        else:
            ref = mx.matmul(xf, w[0].astype(mx.float32).T)
        if b is not None:
            ref = ref + b.astype(mx.float32)
        mx.eval(ref)
    return ref


def _rel_err(out: mx.array, ref: mx.array) -> float:
    with mx.stream(mx.cpu):
        out = out.astype(mx.float32)
        assert bool(mx.all(mx.isfinite(out)).item()), "non-finite or unwritten output"
        return (mx.linalg.norm(out - ref) / mx.linalg.norm(ref)).item()


def _plan(case: Case, backend: str) -> matmul.Plan:
    return matmul.make_plan(
        backend,
        case.N,
        case.K,
        case.bits,
        case.dtype.size,
        m=case.M,
        nsplit=case.nsplit,
        rt=case.rt,
        wk=case.wk,
    )


def _run(case: Case, backend: str, factory, init_value=None) -> tuple[float, matmul.Plan]:
    x, w, b = _inputs(case, seed=sum(map(ord, case.id)))
    plan = _plan(case, backend)
    if case.bits:
        wq, s, bq = w
        out = matmul.launch(
            x,
            wq,
            plan,
            scales=s,
            biases=bq,
            bias=b,
            group_size=case.group,
            bits=case.bits,
            backend=backend,
            factory=factory,
            init_value=init_value,
        )
    else:
        out = matmul.launch(
            x, w[0], plan, bias=b, backend=backend, factory=factory, init_value=init_value
        )
    assert out.shape == (case.M, case.N) and out.dtype == case.dtype
    return _rel_err(out, _reference(case, x, w, b)), plan


# ------------------------------------------------------------------ emulated


def _factory(backend: str, build_dir: Path):
    return emulator.factory(build_dir) if backend == "metal" else emulator.cuda_factory(build_dir)


def _programs(case: Case, backend: str, build_dir: Path):
    """(kernel, C++ source) of every program one case launches (for the pre-build)."""
    plan = _plan(case, backend)
    split = plan.nsplit > 1
    make = _factory(backend, build_dir)
    quant = case.bits != 0
    h1, s1 = matmul.kernel_source(backend, 1, quant)
    mf = -(-case.M // 8)
    smem = 4 * plan.smem_words(mf) if plan.wk > 1 else 0
    k1 = make(
        "dflash_skinny_qmm" if quant else "dflash_skinny_mm",
        matmul.PASS1_INPUTS,
        matmul.PASS1_OUTPUTS,
        s1,
        h1,
        smem,
    )
    t = case.dtype
    ins = [(t, 2), (mx.uint32 if quant else t, 2), (t, 2 if quant else 1), (t, 2 if quant else 1)]
    ins += [(t, 1), (mx.int32, 1)]
    template = matmul._template(t, case.bits, case.group, mf, plan, split, case.bias and not split)
    out = [(k1, k1.generate(ins, template, [t, mx.float32]))]
    if split:
        h2, s2 = matmul.kernel_source(backend, 2, False)
        k2 = make("dflash_skinny_mm_sum", matmul.PASS2_INPUTS, matmul.PASS2_OUTPUTS, s2, h2, 0)
        code = k2.generate(
            [(mx.float32, 3), (t, 1), (mx.int32, 1)], [("T", t), ("HAS_BIAS", case.bias)], [t]
        )
        out.append((k2, code))
    return out


@pytest.fixture(scope="module")
def emu_dir(tmp_path_factory) -> Path:
    """Build every program the cases need once, two compiles at a time."""
    build_dir = tmp_path_factory.mktemp("matmul_emulator")
    jobs = {}
    for case in CASES:
        for backend in ("metal", "cuda"):
            for kern, code in _programs(case, backend, build_dir):
                jobs.setdefault(code, kern)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda kv: kv[1]._build(kv[0]), jobs.items()))
    return build_dir


@pytest.mark.parametrize("backend", ["metal", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_emulated_matches_cpu_fp32(case: Case, backend: str, emu_dir: Path):
    err, _ = _run(case, backend, _factory(backend, emu_dir))
    assert err < TOL[case.dtype], f"relative error {err:.2e}"


def test_cases_cover_the_issue():
    assert {c.M for c in CASES} >= {1, 2, 7, 16, 32}
    assert {c.dtype for c in CASES} == {bf16, f16, f32}
    assert {(c.bits, c.group) for c in CASES if c.bits} == {
        (b, g) for b in (4, 8) for g in (32, 64, 128)
    }
    assert any(c.N % 16 for c in CASES) and any(c.K % 8 for c in CASES if not c.bits)
    plans = [_plan(c, "cuda") for c in CASES]
    assert any(p.nsplit > 1 for p in plans) and any(p.nsplit == 1 for p in plans)
    assert any(c.bias and p.nsplit > 1 for c, p in zip(CASES, plans))
    assert any(c.bias and p.nsplit == 1 for c, p in zip(CASES, plans))
    assert {p.rt for p in plans} == {1, 2} and {p.wk for p in plans} == {1, 2, 4}


@pytest.mark.parametrize("backend", ["metal", "cuda"])
@pytest.mark.parametrize(
    "n, k, bits, itemsize",
    [
        (4096, 4096, 0, 2),
        (1024, 4096, 0, 2),
        (12288, 4096, 4, 2),
        (4096, 12288, 8, 2),
        (5, 37, 0, 4),
        (4096, 4096, 4, 2),
    ],
)
def test_plan_covers_k_exactly(backend, n, k, bits, itemsize):
    p = matmul.make_plan(backend, n, k, bits, itemsize)
    kc = 4 * matmul.piece(bits, itemsize)
    assert p.k_split % kc == 0
    assert (p.nsplit - 1) * p.k_split < k <= p.nsplit * p.k_split
    assert p.n_blocks * 16 * p.rt * p.nw >= n


# ------------------------------------------------------------------ routing and fallback


def _linear(kind: str, bias: bool, k: int = 64, n: int = 48) -> nn.Module:
    mx.random.seed(3)
    lin = nn.Linear(k, n, bias=bias)
    lin.set_dtype(mx.bfloat16)
    if kind == "dense":
        return lin
    q = nn.QuantizedLinear.from_linear(lin, group_size=32, bits=4)
    mx.eval(q.parameters())
    return q


def _module_reference(module: nn.Module, x: mx.array) -> mx.array:
    """The module's maths in fp32 on the CPU (not its own bf16 rounding)."""
    with mx.stream(mx.cpu):
        xf = x.astype(mx.float32)
        if isinstance(module, nn.QuantizedLinear):
            s, b = (module[k].astype(mx.float32) for k in ("scales", "biases"))
            ref = mx.quantized_matmul(
                xf, module.weight, s, b, group_size=module.group_size, bits=module.bits
            )
        else:
            ref = xf @ module.weight.astype(mx.float32).T
        ref = ref + module.bias.astype(mx.float32)
        mx.eval(ref)
    return ref


def test_cpu_falls_back_to_stock(monkeypatch):
    monkeypatch.setenv(matmul.SWITCH_ENV, "auto")
    x = mx.random.normal((16, 64)).astype(mx.bfloat16)
    w = mx.random.normal((48, 64)).astype(mx.bfloat16)
    assert mx.array_equal(matmul.skinny_matmul(x, w), x @ w.T).item()
    wq, s, b = mx.quantize(w, group_size=64, bits=4)
    ref = mx.quantized_matmul(x, wq, s, b, group_size=64, bits=4)
    assert mx.array_equal(matmul.skinny_quantized_matmul(x, wq, s, b, 64, 4), ref).item()
    for kind in ("dense", "quant"):
        assert matmul.linear(_linear(kind, True), x) is None


def test_switch_forcing_the_kernel_on_cpu_warns_once(monkeypatch):
    monkeypatch.setenv(matmul.SWITCH_ENV, "kernel")
    monkeypatch.setattr(matmul._site, "warned", False)
    x = mx.random.normal((4, 64))
    with pytest.warns(RuntimeWarning, match="no GPU backend"):
        assert matmul.linear(_linear("dense", False), x.astype(mx.bfloat16)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        matmul.linear(_linear("dense", False), x.astype(mx.bfloat16))


def test_switch_rejects_unknown_values(monkeypatch):
    monkeypatch.setenv(matmul.SWITCH_ENV, "fast")
    with pytest.raises(ValueError, match=matmul.SWITCH_ENV):
        matmul.mode()


@pytest.mark.parametrize("kind", ["dense", "quant"])
def test_linear_through_the_kernel_equals_the_module(kind, emu_dir, monkeypatch):
    monkeypatch.setenv(matmul.SWITCH_ENV, "kernel")
    monkeypatch.setattr(matmul, "_checked", {})
    calls: list = []

    def counting(*a):
        calls.append(a[0])
        return emulator.factory(emu_dir)(*a)

    module = _linear(kind, bias=True)
    x = mx.random.normal((1, 5, 64), key=mx.random.key(4)).astype(mx.bfloat16)
    with matmul.use_backend("metal", counting):
        out = matmul.linear(module, x)
        assert matmul.linear(module, x[:, :1]) is None  # one row: the module's own GEMV
        assert matmul.linear(nn.Embedding(10, 64), x) is None
    assert out is not None and out.shape == (1, 5, 48) and calls
    err = _rel_err(out, _module_reference(module, x))
    assert err < TOL[mx.bfloat16], f"relative error {err:.2e}"


def test_prepare_runs_the_self_checks_up_front(emu_dir, monkeypatch):
    # before mx.compile traces a forward: the self-check syncs, which tracing cannot
    monkeypatch.setenv(matmul.SWITCH_ENV, "kernel")
    monkeypatch.setattr(matmul, "_checked", {})
    model = nn.Sequential(_linear("dense", bias=True), nn.ReLU())
    with matmul.use_backend("metal", emulator.factory(emu_dir)):
        assert matmul.prepare(model, rows=(2,)) == 1
    assert list(matmul._checked.values()) == [True]
    assert matmul.prepare(model) == 0  # CPU: nothing to prepare


def test_linear_rejects_what_the_kernel_does_not_do(monkeypatch):
    monkeypatch.setenv(matmul.SWITCH_ENV, "kernel")
    calls: list = []
    with matmul.use_backend("metal", _broken_factory("compile", calls)):
        x = mx.zeros((4, 64), dtype=mx.bfloat16)
        assert matmul.linear(_linear("dense", False), mx.zeros((33, 64), mx.bfloat16)) is None
        assert matmul.linear(_linear("dense", False), x.astype(mx.int32)) is None
        mixed = _linear("dense", False)
        mixed.weight = mixed.weight.astype(mx.float32)  # x bf16, w fp32
        assert matmul.linear(mixed, x) is None
        q = nn.QuantizedLinear(64, 32, bias=False, group_size=32, bits=2)  # 2-bit
        assert matmul.linear(q, x.astype(mx.float32)) is None
        monkeypatch.setenv(matmul.SWITCH_ENV, "stock")
        assert matmul.linear(_linear("dense", False), x) is None
    assert not calls


def _broken_factory(kind: str, calls: list):
    def make(name, input_names, output_names, src, header, shared_memory):
        def kernel(**kw):
            calls.append(name)
            if kind == "compile":
                raise RuntimeError("[compile] error: expected ';' (simulated)")
            return [
                mx.full(s, 7.0, dtype=d) for s, d in zip(kw["output_shapes"], kw["output_dtypes"])
            ]

        return kernel

    return make


@pytest.mark.parametrize("kind", ["compile", "garbage"])
def test_failing_kernel_falls_back_with_one_warning(kind, monkeypatch):
    monkeypatch.setenv(matmul.SWITCH_ENV, "kernel")
    monkeypatch.setattr(matmul._site, "warned", False)
    monkeypatch.setattr(matmul, "_checked", {})
    calls: list = []
    x = mx.random.normal((8, 64)).astype(mx.bfloat16)
    w = mx.random.normal((48, 64)).astype(mx.bfloat16)
    with matmul.use_backend("cuda", _broken_factory(kind, calls)):
        with pytest.warns(RuntimeWarning, match="kernel disabled"):
            out = matmul.skinny_matmul(x, w)
        n = len(calls)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out2 = matmul.skinny_matmul(x, w)
    assert calls and len(calls) == n  # the disabled configuration is not tried again
    ref = x @ w.T
    assert mx.array_equal(out, ref).item() and mx.array_equal(out2, ref).item()


class _Layers(nn.Module):
    """A target with one layer of two linear layers (target_layers reads .layers)."""

    def __init__(self):
        super().__init__()
        self.layers = [nn.Sequential(_linear("dense", bias=True), _linear("quant", bias=True))]


def test_verify_linears_route_through_the_kernel(emu_dir, monkeypatch, tmp_path):
    from dflash_mlx.kernels import routing
    from dflash_mlx.patch import Patches

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no calibration file here
    monkeypatch.setattr(matmul, "_checked", {})
    model = _Layers()
    dense, quant = model.layers[0].layers
    x = mx.random.normal((1, 5, 64), key=mx.random.key(3)).astype(mx.bfloat16)
    calls: list = []

    def counting(*a):
        calls.append(a[0])
        return emulator.factory(emu_dir)(*a)

    with matmul.use_backend("metal", counting):
        monkeypatch.setenv(matmul.SWITCH_ENV, "auto")
        assert routing.kernel_linears(model) == []  # no decision prefers it: no hooks
        monkeypatch.setenv(matmul.SWITCH_ENV, "kernel")
        assert {id(m) for m in routing.kernel_linears(model)} == {id(dense), id(quant)}
        patches = Patches()
        routing.install(model, patches)
        try:
            outside = dense(x)  # not verifying: the module's own matmul
            assert not calls
            with routing.verifying():
                ys = [dense(x), quant(x)]
            assert {"dflash_skinny_mm", "dflash_skinny_qmm"} <= set(calls)
        finally:
            patches.restore()
    assert type(dense) is nn.Linear and type(quant) is nn.QuantizedLinear
    for module, y in zip((dense, quant), ys, strict=True):
        err = _rel_err(y, _module_reference(module, x))
        assert err < TOL[mx.bfloat16], f"relative error {err:.2e}"
    assert _rel_err(outside, _module_reference(dense, x)) < TOL[mx.bfloat16]


def test_auto_mode_uses_the_kernel_only_where_measured(emu_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(matmul.SWITCH_ENV, "auto")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no calibration file here
    from dflash_mlx import calibrate

    calibrate.forget()
    calls: list = []

    def counting(*a):
        calls.append(a[0])
        return emulator.factory(emu_dir)(*a)

    x = mx.random.normal((7, 96), key=mx.random.key(1)).astype(mx.bfloat16)
    w = mx.random.normal((40, 96), key=mx.random.key(2)).astype(mx.bfloat16)
    with matmul.use_backend("metal", counting):
        assert matmul.kernel_matmul(x, w) is None  # Metal, uncalibrated: stock
        monkeypatch.setitem(matmul.MEASURED, "metal", {("bfloat16", 8, 32)})
        assert matmul.kernel_matmul(x, w) is None
        monkeypatch.setitem(matmul.MEASURED, "metal", {("bfloat16", 2, 16)})
        out = matmul.kernel_matmul(x, w)
    assert out is not None and "dflash_skinny_mm" in calls
    with mx.stream(mx.cpu):
        ref = x.astype(mx.float32) @ w.astype(mx.float32).T
    assert _rel_err(out, ref) < TOL[mx.bfloat16]


# ------------------------------------------------------------------ CUDA (GPU machine)

# Deselected by tests/conftest.py where MLX's CUDA backend is unavailable.


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cuda_matches_cpu_fp32(case: Case):
    err, _ = _run(case, "cuda", matmul._mlx_factory("cuda"), init_value=float("nan"))
    assert err < TOL[case.dtype], f"relative error {err:.2e}"


BIG = [
    Case(bf16, 16, 4096, 4096),
    Case(bf16, 32, 1024, 4096),
    Case(f16, 1, 4096, 12288),
    Case(bf16, 16, 12288, 4096, 4, 64),
    Case(bf16, 8, 4096, 12288, 4, 64, bias=True),
    Case(f16, 32, 4096, 4096, 8, 32),
    Case(bf16, 4, 1024, 4096, 8, 128),
    Case(f32, 16, 1000, 2000, bias=True),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", BIG, ids=[c.id for c in BIG])
def test_cuda_model_shapes_match_cpu_fp32(case: Case):
    err, plan = _run(case, "cuda", matmul._mlx_factory("cuda"), init_value=float("nan"))
    assert err < TOL[case.dtype], f"relative error {err:.2e} ({plan})"


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["dense", "quant"])
def test_cuda_linear_dispatch(kind, monkeypatch):
    monkeypatch.setenv(matmul.SWITCH_ENV, "kernel")
    module = _linear(kind, bias=True, k=1024, n=512)
    x = mx.random.normal((1, 16, 1024)).astype(mx.bfloat16)
    out = matmul.linear(module, x)
    assert out is not None
    assert _rel_err(out, _module_reference(module, x)) < TOL[mx.bfloat16]
