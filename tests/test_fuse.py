"""Fused verify projections (fuse.py): each part's columns, re-fused after new weights.
Greedy output against mlx_lm's with fusion on: tests/test_generate.py."""

import mlx.core as mx
import pytest
from mlx import nn

from dflash_mlx import fuse
from dflash_mlx.kernels import routing
from dflash_mlx.patch import Patches


def _linear(n, k, seed, bias=False):
    layer = nn.Linear(k, n, bias=bias)
    mx.random.seed(seed)
    layer.update({"weight": mx.random.normal((n, k))})
    if bias:
        layer.update({"bias": mx.random.normal((n,))})
    return layer


class Block(nn.Module):
    def __init__(self, bias):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (
            _linear(n, 8, s, bias) for n, s in ((6, 0), (4, 1), (4, 2))
        )


class Layer(nn.Module):
    def __init__(self, bias=False):
        super().__init__()
        self.self_attn = Block(bias)


class Model(nn.Module):
    def __init__(self, bias=False):
        super().__init__()
        self.layers = [Layer(bias)]


@pytest.mark.parametrize("bias", [False, True])
def test_parts_take_their_columns_and_fall_back_on_other_inputs(fused_on_cpu, bias):
    model = Model(bias)
    attn = model.layers[0].self_attn
    x, other = mx.random.normal((1, 3, 8)), mx.random.normal((1, 3, 8))
    with mx.stream(mx.cpu):
        expected = [p(x) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]
        expected_other = attn.k_proj(other)
    patches = Patches()
    fuse.install(model, patches)
    try:
        with routing.verifying():
            got = [attn.q_proj(x), attn.k_proj(x), attn.v_proj(x), attn.k_proj(other)]
        assert len(fused_on_cpu) == 2  # x (q, then k and v from it), then `other`
        outside = attn.q_proj(x)  # not verifying: the part's own matmul
        assert len(fused_on_cpu) == 2
    finally:
        patches.restore()
    for a, b in zip(got[:3], expected, strict=True):
        assert mx.allclose(a, b, atol=1e-5).item()
    assert mx.allclose(got[3], expected_other, atol=1e-5).item()
    assert mx.allclose(outside, expected[0], atol=1e-5).item()
    assert type(attn.q_proj) is nn.Linear  # the hook is gone


def test_new_weights_are_fused_again(fused_on_cpu):
    model = Model()
    attn = model.layers[0].self_attn
    first = fuse.groups(model)[0]
    assert fuse.groups(model)[0] is first  # made once
    attn.k_proj.update({"weight": mx.zeros((4, 8))})  # e.g. load_weights
    again = fuse.groups(model)[0]
    assert again is not first and mx.array_equal(again.fused["weight"][6:10], mx.zeros((4, 8)))


def test_quantized_fused_product_takes_the_kernel_where_measured(
    fused_on_cpu, monkeypatch, tmp_path
):
    """4-bit q/k/v fused: the emulated CUDA kernel computes one fused product (MEASURED
    routes q4 verify widths to it), also where the kernel routing hooked the parts
    first, and each part gets what its own quantized matmul gives."""
    import sys
    from pathlib import Path

    from dflash_mlx.kernels import matmul

    sys.path.insert(0, str(Path(__file__).parent / "emulation"))
    import emulator

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no calibration file
    monkeypatch.setenv(matmul.SWITCH_ENV, "auto")
    monkeypatch.setattr(matmul, "_checked", {})
    model = Model()
    attn = model.layers[0].self_attn
    for name, n in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32)):
        dense = _linear(n, 64, n)
        dense.update({"weight": dense.weight.astype(mx.bfloat16)})
        setattr(attn, name, nn.QuantizedLinear.from_linear(dense, group_size=32, bits=4))
    parts = (attn.q_proj, attn.k_proj, attn.v_proj)
    x = mx.random.normal((1, 5, 64), key=mx.random.key(4)).astype(mx.bfloat16)
    with mx.stream(mx.cpu):  # fp32 products of the dequantized weights
        expected = [
            x.astype(mx.float32)
            @ mx.dequantize(p.weight, p.scales, p.biases, 32, 4).astype(mx.float32).T
            for p in parts
        ]
    calls = []

    def counting(*a):
        calls.append(a[0])
        return emulator.cuda_factory(tmp_path / "emu")(*a)

    patches = Patches()
    with matmul.use_backend("cuda", counting):
        assert ("q4", 2, 32) in matmul.MEASURED["cuda"]
        # As a session installs them: the routing hooks every q4 linear first (o_proj,
        # down_proj), fusion wraps the parts it hooked.
        routing.install(model, patches)
        assert type(attn.q_proj) is not nn.QuantizedLinear
        fuse.install(model, patches)
        try:
            with routing.verifying():
                got = [p(x) for p in parts]
                mx.eval(got)
        finally:
            patches.restore()
    assert "dflash_skinny_qmm" in calls and len(fused_on_cpu) == 1
    for a, b in zip(got, expected, strict=True):
        err = (mx.linalg.norm(a.astype(mx.float32) - b) / mx.linalg.norm(b)).item()
        assert err < 1e-2, f"relative error {err:.2e}"


def test_draft_fuses_its_block_and_cycle_context_but_not_a_prompt(fused_on_cpu):
    """The draft's fused q/k/v and gate/up give its unfused hidden states, for a block
    (embeddings given) after a prompt's context (unfused: 40 rows) and a cycle's (3)."""
    from dflash_mlx.config import DraftConfig
    from dflash_mlx.drafter import DraftModel

    config = DraftConfig.from_dict(
        {
            "architectures": ["DFlashDraftModel"],
            "block_size": 8,
            "dflash_config": {"mask_token_id": 63, "target_layer_ids": [0, 1]},
            "num_target_layers": 2,
            "hidden_size": 64,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": 64,
            "rope_theta": 10000.0,
        }
    )
    mx.random.seed(0)
    draft = DraftModel(config)
    mx.eval(draft.parameters())
    prompt, cycle = mx.random.normal((1, 40, 128)), mx.random.normal((1, 3, 128))
    block = mx.random.normal((1, 8, 64))

    def hidden():
        cache = draft.make_cache()
        draft.add_context(prompt, cache)
        return draft(block, cycle, cache)

    expected = hidden()
    patches = Patches()
    fuse.install(draft, patches, draft.layers, when=fuse.draft_rows)
    try:
        got = hidden()
    finally:
        patches.restore()
    rows = sorted({shape[-2] for _, shape in fused_on_cpu})
    assert rows == [3, 8]  # the cycle's context and the block; the prompt's 40 rows not
    assert mx.allclose(got, expected, atol=1e-5).item()
