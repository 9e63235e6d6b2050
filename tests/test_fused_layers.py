"""The q/k/v kernel (kernels/qkv.py) and the verify's attention layer built on it
(fused_layers.py): against MLX's own rms_norm / rope, mlx-lm's attention code, and
mlx_lm's greedy output. The kernel runs on the CPU emulator, as Metal and as CUDA (PTX
emulated); the CUDA variant itself runs on the GPU machine."""

import json
import math
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import ROOT, write_random_draft
from mlx import nn
from mlx_lm import load as mlx_lm_load
from test_generate import OracleDraft, mlx_lm_greedy
from tiny_models import make_target

from dflash_mlx import fuse, fused_layers, load_draft
from dflash_mlx.convert import convert
from dflash_mlx.generate import dflash_cycles
from dflash_mlx.kernels import add_norm, qkv, routing
from dflash_mlx.patch import Patches

sys.path.insert(0, str(ROOT / "tests" / "emulation"))
import emulator

BACKENDS = ["metal", "ptx-emulated"]


@pytest.fixture(scope="module")
def emu_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qkv_emulator")


def factory(backend: str, build_dir: Path, launches: list | None = None):
    """(backend name, kernel factory) of the emulator; `launches` collects (kernel name,
    rows of its first input, whether it writes q) of every launch."""
    make = emulator.factory(build_dir) if backend == "metal" else emulator.cuda_factory(build_dir)

    def counting(*a):
        kernel = make(*a)

        def launch(**kw):
            writes_q = kw["output_shapes"][0] != (1,)
            launches.append((a[0], kw["inputs"][0].shape[1], writes_q))
            return kernel(**kw)

        return kernel if launches is None else launch

    return ("metal" if backend == "metal" else "cuda"), counting


@contextmanager
def emulated(backend: str, build_dir: Path, launches: list | None = None):
    """The q/k/v and add + norm kernels on the emulator."""
    site = factory(backend, build_dir, launches)
    with qkv.use_backend(*site), add_norm.use_backend(*site):
        yield


def _layout(
    D: int, norm: bool, dtype, *, skip_q: bool = False, scale: float = 1.0, base: bool = False
):
    """4 query heads, 2 KV heads; RoPE frequencies given (or from base 1e6)."""
    keys = mx.random.split(mx.random.key(D + norm), 2)
    half = D // 2
    freqs = 1e6 ** (mx.arange(half, dtype=mx.float32) / half)
    rot = qkv.Rotary(math.log2(1e6), None, scale) if base else qkv.Rotary(0.0, freqs, scale)
    weight = lambda k: mx.random.uniform(0.5, 1.5, (D,), key=k).astype(dtype) if norm else None
    return qkv.Layout(4, 2, D, rot, weight(keys[0]), weight(keys[1]), 1e-6, skip_q=skip_q)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("D, norm", [(64, True), (128, False), (128, True), (256, True)])
def test_kernel_matches_mlx_rms_norm_and_rope(backend, dtype, D, norm, emu_dir):
    layout = _layout(D, norm, dtype, scale=0.5)
    y = mx.random.normal((1, 5, 8 * D), key=mx.random.key(3)).astype(dtype)
    offset = mx.array(1000, dtype=mx.int32)  # a device-side position, as static caches give
    with qkv.use_backend(*factory(backend, emu_dir)):
        got = qkv.split_heads(y, layout, offset)
    assert got is not None
    want = qkv.reference(y, layout, offset)  # MLX's GPU rms_norm and rope, as fp32 ops
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        diff = mx.abs(g.astype(mx.float32) - w.astype(mx.float32))
        if dtype == mx.float32:
            assert (diff.max() / mx.abs(w).max()).item() < 1e-5
        else:  # the same roundings: at most one bf16 step apart, and rarely
            assert (diff <= mx.abs(w.astype(mx.float32)) * 2.0**-7).all().item()
            assert (diff > 0).mean().item() < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_computes_frequencies_from_a_base(backend, emu_dir):
    layout = _layout(128, True, mx.float32, base=True)
    y = mx.random.normal((1, 4, 8 * 128), key=mx.random.key(8))
    with qkv.use_backend(*factory(backend, emu_dir)):
        got = qkv.split_heads(y, layout, 1000)
    # The CPU's reference derives the frequencies as exp(-i log(base) / half), the GPU
    # as exp2: a last-bit difference, times angles up to 1000 radians.
    for g, w in zip(got, qkv.reference(y, layout, 1000), strict=True):
        assert (mx.abs(g - w).max() / mx.abs(w).max()).item() < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernel_takes_an_int_offset_and_can_leave_q_out(backend, emu_dir):
    layout = _layout(64, True, mx.float32, skip_q=True)
    y = mx.random.normal((1, 3, 8 * 64), key=mx.random.key(4))
    with qkv.use_backend(*factory(backend, emu_dir)):
        q, kv = qkv.split_heads(y, layout, 17)
    _, kv_ref = qkv.reference(y, layout, 17)
    assert q is None and kv.shape == kv_ref.shape
    (k, v), (k_ref, v_ref) = mx.split(kv, 2, axis=1), mx.split(kv_ref, 2, axis=1)
    assert mx.allclose(k, k_ref, atol=1e-5).item() and mx.array_equal(v, v_ref).item()


def test_no_backend_no_kernel():
    layout = _layout(64, False, mx.float32)
    assert qkv.split_heads(mx.zeros((1, 2, 8 * 64)), layout, 0) is None  # CPU: stock path


def test_rotary_covers_what_the_kernel_computes():
    from mlx_lm.models.rope_utils import initialize_rope

    plain = qkv.rotary(nn.RoPE(64, base=5e5, scale=0.25), 64)
    assert plain is not None and plain.scale == 0.25
    llama3 = initialize_rope(
        64,
        5e5,
        False,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        131072,
    )
    assert qkv.rotary(llama3, 64) is not None
    assert qkv.rotary(nn.RoPE(64, traditional=True), 64) is None
    assert qkv.rotary(nn.RoPE(32), 64) is None  # partial rotary: the model's own code
    yarn = initialize_rope(
        64,
        1e4,
        False,
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
        16384,
    )
    assert qkv.rotary(yarn, 64) is None


# ------------------------------------------------------------------ the attention layer

# Heads of 64 (the kernel's smallest): the tiny families' 16 would leave it out.
WIDE_HEADS = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1}


@pytest.fixture(scope="module")
def wide_pairs(session_dir):
    built = {}

    def get(family, bits=None):
        if (family, bits) not in built:
            name = f"{family}-wide" + (f"-q{bits}" if bits else "")
            extra = {} if family == "qwen2" else {"head_dim": 64}
            target = make_target(
                session_dir / name, family, quantize_bits=bits, **WIDE_HEADS, **extra
            )
            config = json.loads((target / "config.json").read_text())
            hf = write_random_draft(session_dir / f"{name}-draft-hf", config, head_dim=64)
            convert(str(hf), str(session_dir / f"{name}-draft"), dtype="float32")
            built[family, bits] = (target, session_dir / f"{name}-draft")
        return built[family, bits]

    return get


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_layer_equals_mlx_lm_attention(wide_pairs, fused_on_cpu, family, backend, emu_dir):
    """One attention layer inside a verify, hooked, against its own class's code."""
    from mlx_lm.models.cache import KVCache

    model, _ = mlx_lm_load(str(wide_pairs(family)[0]))
    attn = model.layers[1].self_attn
    x = mx.random.normal((1, 6, 128), key=mx.random.key(5))
    context = mx.random.normal((1, 9, 128), key=mx.random.key(6))

    def run():
        cache = KVCache()
        attn(context, mask="causal", cache=cache)  # 9 positions already cached
        return attn(x, mask="causal", cache=cache), cache

    want, want_cache = run()
    calls: list = []
    patches = Patches()
    with emulated(backend, emu_dir, calls):
        try:
            routing.install(model, patches)
            fuse.install(model, patches)
            fused_layers.install(model, patches)
            with routing.verifying():
                got, got_cache = run()
        finally:
            patches.restore()
    # Both calls of the layer (9 context rows, then 6), one kernel each, after the
    # kernel's first-use self-check.
    assert [rows for name, rows, _ in calls if name == "dflash_qkv_heads"][-2:] == [9, 6]
    assert type(attn).__name__ == "Attention" and "_dflash_hook" not in attn.__dict__
    assert mx.allclose(got, want, atol=1e-5).item()
    assert got_cache.offset == want_cache.offset == 15
    for name in ("keys", "values"):
        a, b = getattr(got_cache, name)[..., :15, :], getattr(want_cache, name)[..., :15, :]
        assert mx.allclose(a, b, atol=1e-5).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family, bits", [("llama", None), ("qwen3", None), ("qwen3", 4)])
def test_greedy_equals_mlx_lm_through_the_kernel(
    wide_pairs, fused_on_cpu, family, bits, backend, emu_dir
):
    target_dir, draft_dir = wide_pairs(family, bits)
    model, _ = mlx_lm_load(str(target_dir))
    prompt, n, B = [5, 17, 42, 7, 99, 3, 61, 28, 11], 40, 8
    expected = mlx_lm_greedy(model, prompt, n + B)
    # Host-scripted drafts wrong at positions 2, 0, 5 and nowhere: every accept length.
    draft = OracleDraft(load_draft(draft_dir).config, prompt + expected, [None, 2, 0, 5])
    calls: list = []
    out = []
    with emulated(backend, emu_dir, calls):
        for cycle in dflash_cycles(model, draft, mx.array(prompt), max_tokens=n, block_size=B):
            out += cycle.tokens
    assert out == expected[:n]
    # Every verify's attention layers ran the kernel (one product per layer per verify)
    # on its block; the self-checks run 3 rows, the scripted draft's context rows no q.
    attn_groups = {id(layer.self_attn.__dict__["_dflash_fused"]) for layer in model.layers}
    products = sum(1 for g, _ in fused_on_cpu if id(g) in attn_groups)
    blocks = Counter(name for name, rows, q in calls if q and rows == B)
    assert blocks["dflash_qkv_heads"] == products > 0
    assert "_dflash_hook" not in model.layers[0].self_attn.__dict__


@pytest.mark.parametrize("backend", BACKENDS)
def test_draft_through_the_kernel_drafts_the_same(wide_pairs, fused_on_cpu, backend, emu_dir):
    """A real (random) draft: its blocks and context rows go through the kernel, its
    proposals are the ones its own code makes (the same accepted counts), and the output
    is mlx_lm's."""
    target_dir, draft_dir = wide_pairs("qwen3")
    model, _ = mlx_lm_load(str(target_dir))
    prompt, n = [5, 17, 42, 7, 99, 3, 61, 28, 11], 24
    expected = mlx_lm_greedy(model, prompt, n)
    eager = lambda name, arrays: None  # phases timed: eager cycles, which the emulator runs

    def run():
        out, accepted = [], []
        draft = load_draft(draft_dir)
        for c in dflash_cycles(
            model, draft, mx.array(prompt), max_tokens=n, block_size=8, on_phase=eager
        ):
            out += c.tokens
            accepted.append(c.accepted)
        return out, accepted

    own = run()
    calls: list = []
    with emulated(backend, emu_dir, calls):
        through = run()
    assert own[0] == through[0] == expected
    assert through[1] == own[1]
    heads = Counter((rows, q) for name, rows, q in calls if name == "dflash_qkv_heads")
    cycles = len(own[1]) - 1  # after the prefill's token
    # Every cycle: the target's layers and the draft's 2 on a block of 8 (with q), and
    # the draft's 2 on the accepted rows of the cycle before (keys and values only).
    assert heads[8, True] >= cycles * (len(model.layers) + 2)
    assert sum(n for (rows, q), n in heads.items() if not q) >= 2 * (cycles - 1)


# ------------------------------------------------------------------ residual add + norm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
@pytest.mark.parametrize("H", [128, 300])
def test_add_norm_kernel_matches_mlx_add_and_rms_norm(backend, dtype, H, emu_dir):
    keys = mx.random.split(mx.random.key(H), 3)
    x = (4 * mx.random.normal((2, 5, H), key=keys[0])).astype(dtype)
    r = mx.random.normal((2, 5, H), key=keys[1]).astype(dtype)
    norm = nn.RMSNorm(H, eps=1e-5)
    norm.weight = mx.random.uniform(0.5, 1.5, (H,), key=keys[2]).astype(dtype)
    with emulated(backend, emu_dir):
        got = add_norm.add_rms_norm(x, r, norm)
    assert got is not None
    h, y = got
    assert h.dtype == y.dtype == dtype and h.shape == y.shape == x.shape
    assert mx.array_equal(h, x + r).item()  # MLX's own add, bit for bit
    want = add_norm.reference(x, r, norm.weight, 1e-5)[1]  # MLX's GPU rms_norm, as fp32 ops
    diff = mx.abs(y.astype(mx.float32) - want.astype(mx.float32))
    if dtype == mx.float32:
        assert (diff.max() / mx.abs(want).max()).item() < 1e-5
    else:  # the same roundings: where the sums' order tells, the normalised value is a
        # step apart, and so at most two after the weight's product
        step = 2.0**-10 if dtype == mx.float16 else 2.0**-7
        assert (diff <= mx.abs(want.astype(mx.float32)) * 2 * step).all().item()
        assert (diff > 0).mean().item() < 0.01
    stock = mx.fast.rms_norm(x + r, norm.weight, 1e-5)  # MLX's own norm, on the CPU
    tol = 1e-5 if dtype == mx.float32 else 2e-2
    assert mx.allclose(y.astype(mx.float32), stock.astype(mx.float32), atol=tol, rtol=tol).item()


def test_add_norm_leaves_other_norms_and_the_cpu_alone():
    x = mx.ones((1, 2, 64))
    assert add_norm.add_rms_norm(x, x, nn.RMSNorm(64)) is None  # CPU: the stock ops
    assert not add_norm.supports(x, x, nn.LayerNorm(64))
    assert not add_norm.supports(x, x.astype(mx.float16), nn.RMSNorm(64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_layers_through_add_norm_equal_mlx_lm(wide_pairs, fused_on_cpu, family, backend, emu_dir):
    """A verify forward of the whole model with its decoder layers hooked: the logits of
    mlx-lm's own code, two add + norm kernels a layer, the final norm served by the last."""
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = mlx_lm_load(str(wide_pairs(family)[0]))
    context = mx.random.randint(0, 100, (1, 9), key=mx.random.key(6))
    block = mx.random.randint(0, 100, (1, 6), key=mx.random.key(5))

    def run():
        cache = make_prompt_cache(model)
        model(context, cache=cache)
        return model(block, cache=cache)

    want = run()
    calls: list = []
    patches = Patches()
    with emulated(backend, emu_dir, calls):
        try:
            fused_layers.install_blocks(model, patches)
            with routing.verifying():
                got = run()
            outside = run()  # not a verify: the layers' own code
        finally:
            patches.restore()
    assert mx.allclose(got, want, atol=1e-4).item()
    assert mx.array_equal(outside, want).item()
    launched = Counter(rows for name, rows, _ in calls if name == "dflash_add_rms_norm")
    # Both forwards ran in the verify: 9 rows, then 6.
    assert launched[9] == launched[6] == 2 * len(model.layers)
    assert all("_dflash_hook" not in layer.__dict__ for layer in model.layers)


def test_add_norm_stays_off_where_projections_do_not_fuse(wide_pairs, emu_dir):
    """Like the q/k/v kernel, only where fusion measured faster (fuse.BACKENDS: CUDA): a
    Metal device keeps MLX's own ops."""
    model, _ = mlx_lm_load(str(wide_pairs("qwen3")[0]))
    patches = Patches()
    with emulated("metal", emu_dir):
        try:
            fused_layers.install_blocks(model, patches)
            assert all("_dflash_hook" not in layer.__dict__ for layer in model.layers)
        finally:
            patches.restore()


# ------------------------------------------------------------------ CUDA (GPU machine)

# Deselected by tests/conftest.py where MLX's CUDA backend is unavailable.


@pytest.mark.cuda
@pytest.mark.parametrize("base", [True, False], ids=["base", "freqs"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
@pytest.mark.parametrize("D, norm", [(64, True), (128, False), (128, True), (256, True)])
def test_cuda_kernel_matches_mlx_rms_norm_and_rope(dtype, D, norm, base):
    """Against MLX's own CUDA rms_norm and rope: the same maths and roundings, but for
    the order of the norm's sum."""
    small = _layout(D, norm, dtype, scale=0.5, base=base)
    layout = qkv.Layout(16, 4, D, small.rotary, small.q_norm, small.k_norm, 1e-6)
    B, L = 1, 16
    y = mx.random.normal((B, L, (16 + 8) * D), key=mx.random.key(3)).astype(dtype)
    offset = mx.array(3000, dtype=mx.int32)
    got = qkv.split_heads(y, layout, offset)
    assert got is not None  # compiled and passed its self-check on this GPU
    got = (got[0], *mx.split(got[1], 2, axis=1))  # q; k and v, stacked by the kernel
    q, k, v = (x.reshape(B, L, -1, D) for x in mx.split(y, [16 * D, 20 * D], axis=-1))
    if norm:
        q = mx.fast.rms_norm(q, layout.q_norm, 1e-6)
        k = mx.fast.rms_norm(k, layout.k_norm, 1e-6)
    rot = layout.rotary
    rope = lambda x: mx.fast.rope(
        x.transpose(0, 2, 1, 3),
        D,
        traditional=False,
        base=2.0**rot.log2_base if base else None,
        scale=0.5,
        offset=offset,
        freqs=rot.freqs,
    )
    for g, w in zip(got, (rope(q), rope(k), v.transpose(0, 2, 1, 3)), strict=True):
        g, w = g.astype(mx.float32), w.astype(mx.float32)
        diff = mx.abs(g - w)
        step = 2.0**-23 if dtype == mx.float32 else 2.0**-10 if dtype == mx.float16 else 2.0**-7
        # In steps of the head's largest element (rope's differences can cancel).
        scale = mx.abs(w).max(axis=-1, keepdims=True) * step
        steps = (diff / scale).max().item()
        share = (diff > 0).mean().item()
        assert steps <= 4, f"{steps:.1f} steps apart"
        if dtype != mx.float32:  # a last-bit fp32 difference rarely changes a rounding
            assert share < 0.01, f"{share:.2%} of the elements differ"


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_cuda_greedy_equals_mlx_lm_through_the_kernel(wide_pairs, family):
    """The compiled static cycle on the GPU, target and draft through the kernel."""
    target_dir, draft_dir = wide_pairs(family)
    model, _ = mlx_lm_load(str(target_dir))
    prompt, n = [5, 17, 42, 7, 99, 3, 61, 28, 11], 40
    expected = mlx_lm_greedy(model, prompt, n)
    out = []
    for cycle in dflash_cycles(model, load_draft(draft_dir), mx.array(prompt), max_tokens=n):
        out += cycle.tokens
    assert out == expected


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
@pytest.mark.parametrize("H", [1024, 4096, 5120])
def test_cuda_add_norm_matches_mlx_add_and_rms_norm(dtype, H):
    """Against MLX's own CUDA add and rms_norm."""
    keys = mx.random.split(mx.random.key(H), 3)
    x = (4 * mx.random.normal((1, 16, H), key=keys[0])).astype(dtype)
    r = mx.random.normal((1, 16, H), key=keys[1]).astype(dtype)
    norm = nn.RMSNorm(H, eps=1e-6)
    norm.weight = mx.random.uniform(0.5, 1.5, (H,), key=keys[2]).astype(dtype)
    got = add_norm.add_rms_norm(x, r, norm)
    assert got is not None  # compiled and passed its self-check on this GPU
    h, y = got
    assert mx.array_equal(h, x + r).item()
    want = mx.fast.rms_norm(x + r, norm.weight, 1e-6)
    if dtype == mx.float32:
        # Sums of 5120 squares in two orders: compare both with the exact norm (float64):
        # each is a few steps of float32 from it (rsqrtf alone may be 2 off).
        h64, w64 = np.array(h, dtype=np.float64), np.array(norm.weight, dtype=np.float64)
        exact = w64 * h64 / np.sqrt(np.mean(h64 * h64, axis=-1, keepdims=True) + 1e-6)
        for got_y in (y, want):
            err = np.abs(np.array(got_y, dtype=np.float64) - exact)
            assert (err <= np.abs(exact) * 2.0**-23 * 8).all()
        return
    diff = mx.abs(y.astype(mx.float32) - want.astype(mx.float32))
    step = 2.0**-10 if dtype == mx.float16 else 2.0**-7
    assert (diff <= mx.abs(want.astype(mx.float32)) * step * 2).all().item()
    assert (diff > 0).mean().item() < 0.01
