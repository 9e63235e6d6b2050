"""The MLX draft against the independent PyTorch reference (tests/reference).

Same checkpoint, same context features and block embeddings, same random LM head:
fp32 logits agree to 1e-4; bf16 and 4-bit are held to bounds set by their own rounding
(see tests/README.md). The reference runs on CUDA when torch sees one; MLX on its
default device. `pytest -s` prints every measurement; DFLASH_PARITY_LOG=path appends
one line per case.
"""

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch
from conftest import ROOT
from reference.checkpoints import write_checkpoint
from reference.model import (
    ReferenceDraft,
    default_device,
    load_reference,
    read_config,
    target_layer_ids,
)

from dflash_mlx import load_draft
from dflash_mlx.config import build_target_layer_ids
from dflash_mlx.convert import main as convert_main

DEVICE = default_device()
STYLES = ["qwen3_b16", "qwen35", "llama31"]
# Each style also exercises one weight layout of the published checkpoints.
LAYOUTS = {"qwen3_b16": {}, "qwen35": {"shards": 2}, "llama31": {"fmt": "bin"}}
# Converted through the real CLI (a subprocess, from the repo root); the others call the
# same entry point in-process: each new process pays ~4 s importing mlx_lm on 2 cores.
CLI_CONVERSION = ("qwen35", "bf16")
VARIANTS = {
    "fp32": ["--dtype", "float32"],
    "bf16": ["--dtype", "bfloat16"],
    "q4": ["-q", "--q-bits", "4"],  # keeps the checkpoint's bf16 for scales and norms
    "q4-fp32": ["-q", "--q-bits", "4", "--dtype", "float32"],
}
CONTEXT = 40  # longer than the qwen35 sliding window (12)
VOCAB = 256  # rows of the random LM head the hidden states are read through
FP32_TOL = 1e-4


def record(style: str, case: str, **metrics) -> None:
    line = f"{style:10s} {case:18s} torch={DEVICE.type} mlx={mx.default_device()} " + " ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )
    print(line)
    if path := os.environ.get("DFLASH_PARITY_LOG"):
        with open(path, "a") as f:
            f.write(line + "\n")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These tensors are tiny: on a busy CPU, torch's thread pool costs 10-50x."""
    threads = torch.get_num_threads()
    if DEVICE.type == "cpu":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def drafts(tmp_path_factory):
    """{style: {"hf": dir, variant: converted dir}}, converted once for the module."""
    root = tmp_path_factory.mktemp("parity")
    out = {}
    for i, style in enumerate(STYLES):
        hf = write_checkpoint(root / f"{style}-hf", style, seed=i, **LAYOUTS[style])
        out[style] = {"hf": hf, **{v: root / f"{style}-{v}" for v in VARIANTS}}

    def argv(style, variant):
        return ["--hf-path", str(out[style]["hf"]), "--mlx-path", str(out[style][variant])]

    style, variant = CLI_CONVERSION
    cli = subprocess.Popen(
        [sys.executable, "convert.py", *argv(style, variant), *VARIANTS[variant]],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        for style in STYLES:
            for variant, flags in VARIANTS.items():
                if (style, variant) != CLI_CONVERSION:
                    assert convert_main([*argv(style, variant), *flags]) == 0
        stdout, stderr = cli.communicate(timeout=300)
    finally:
        if cli.poll() is None:
            cli.kill()
    assert cli.returncode == 0, stderr.decode()
    assert b"[INFO] wrote" in stdout
    return out


def lm_head(hidden: int) -> np.ndarray:
    return np.random.default_rng(1234).standard_normal((VOCAB, hidden)) / hidden**0.5


def make_inputs(ref: ReferenceDraft, seed: int, batch: int = 2, context: int = CONTEXT):
    """Context features [B, S, n_taps*H] and block embeddings [B, L, H], unit scale."""
    spec = ref.spec
    rng = np.random.default_rng(seed)
    H, taps = spec.hidden_size, len(spec.target_layer_ids)
    ctx = rng.standard_normal((batch, context, taps * H), dtype=np.float32)
    block = rng.standard_normal((batch, spec.block_size, H), dtype=np.float32)
    return ctx, block


def ref_hidden(ref, block, ctx, cache=None, context_window=None, dtype=torch.float32):
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE, dtype)
    with torch.no_grad():
        h = ref(t(block), t(ctx), cache, context_window=context_window)
    return h.float().cpu().numpy()


def mlx_hidden(draft, block, ctx, cache=None, context_window=None, dtype=mx.float32):
    h = draft(mx.array(block).astype(dtype), mx.array(ctx).astype(dtype), cache, context_window)
    return np.array(h.astype(mx.float32))


def to_bf16(a: np.ndarray) -> np.ndarray:
    """Round to bf16 (so both sides read identical inputs), back in fp32."""
    return torch.from_numpy(a).to(torch.bfloat16).float().numpy()


def max_logit_error(W, a, b) -> float:
    """inf when either side is not finite (a NaN would vanish in Python's max())."""
    diff = np.abs(a @ W.T - b @ W.T)
    return float(diff.max()) if np.isfinite(diff).all() else float("inf")


def top1(W, h) -> np.ndarray:
    return (h @ W.T).argmax(-1).ravel()


def margins(W, h) -> np.ndarray:
    s = np.sort(h @ W.T, axis=-1)
    return (s[..., -1] - s[..., -2]).ravel()


@pytest.mark.parametrize("style", STYLES)
def test_fp32_parity(drafts, style):
    ref = load_reference(drafts[style]["hf"])
    W = lm_head(ref.spec.hidden_size)
    for source in ("fp32", "hf"):  # converted, and the unconverted checkpoint read directly
        draft = load_draft(drafts[style][source], dtype="float32" if source == "hf" else None)
        assert draft.fc.weight.dtype == mx.float32
        err = 0.0
        for seed in range(3):
            ctx, block = make_inputs(ref, seed)
            err = max(
                err, max_logit_error(W, ref_hidden(ref, block, ctx), mlx_hidden(draft, block, ctx))
            )
        record(style, f"fp32-{source}", max_abs_logit_err=err)
        assert err <= FP32_TOL

    # The converted config.json still reads the same for a PyTorch runtime.
    converted = ReferenceDraft(read_config(drafts[style]["fp32"]))
    assert torch.equal(converted.inv_freq, ref.inv_freq)
    assert converted.rope_scale == ref.rope_scale
    for field in ("block_size", "mask_token_id", "target_layer_ids", "layer_types"):
        assert getattr(converted.spec, field) == getattr(ref.spec, field), field


@pytest.mark.parametrize("style", STYLES)
def test_draft_cache(drafts, style):
    """Context fed in chunks through the cache equals all at once, on both sides;
    the cache keeps the context only (the block's keys are dropped)."""
    ref = load_reference(drafts[style]["hf"])
    draft = load_draft(drafts[style]["fp32"])
    W = lm_head(ref.spec.hidden_size)
    ctx, block1 = make_inputs(ref, seed=10)
    _, block2 = make_inputs(ref, seed=11)
    split = 33

    cache, ref_cache = draft.make_cache(), ref.make_cache()
    m1 = mlx_hidden(draft, block1, ctx[:, :split], cache)
    r1 = ref_hidden(ref, block1, ctx[:, :split], ref_cache)
    assert all(c.offset == split for c in cache) and ref_cache.length == split
    m2 = mlx_hidden(draft, block2, ctx[:, split:], cache)
    r2 = ref_hidden(ref, block2, ctx[:, split:], ref_cache)
    assert all(c.offset == CONTEXT for c in cache) and ref_cache.length == CONTEXT
    m_once = mlx_hidden(draft, block2, ctx)
    r_once = ref_hidden(ref, block2, ctx)

    errors = {
        "chunk1": max_logit_error(W, m1, r1),
        "chunk2": max_logit_error(W, m2, r2),
        "mlx_chunked_vs_once": max_logit_error(W, m2, m_once),
        "ref_chunked_vs_once": max_logit_error(W, r2, r_once),
    }
    # Only the newest 16 context positions, through the cache (draft_window in generate).
    cache, ref_cache = draft.make_cache(), ref.make_cache()
    draft.add_context(mx.array(ctx[:, :split]), cache)
    ref_hidden(ref, block1, ctx[:, :split], ref_cache)
    m_win = mlx_hidden(draft, block2, ctx[:, split:], cache, context_window=16)
    r_win = ref_hidden(ref, block2, ctx[:, split:], ref_cache, context_window=16)
    errors["context_window"] = max_logit_error(W, m_win, r_win)
    record(style, "cache", **errors)
    assert max(errors.values()) <= FP32_TOL


# At thousands of positions fp32 itself rounds the rotation angle (position x ulp ~ 2e-4
# rad at 4000): PyTorch fp32 differs from fp64 angles by ~8e-5 in these logits, MLX by
# the same. A wrong llama3/yarn scaling costs 1e-2 or more, so the bound here is 1e-3.
LONG_TOL = 1e-3


def long_position_error(ref, draft, positions=4000, seed=20) -> float:
    W = lm_head(ref.spec.hidden_size)
    prefix, _ = make_inputs(ref, seed=seed, batch=1, context=positions)
    ctx, block = make_inputs(ref, seed=seed + 1, batch=1, context=8)
    cache, ref_cache = draft.make_cache(), ref.make_cache()
    draft.add_context(mx.array(prefix), cache)
    ref_hidden(ref, block, prefix, ref_cache)
    return max_logit_error(
        W, mlx_hidden(draft, block, ctx, cache), ref_hidden(ref, block, ctx, ref_cache)
    )


@pytest.mark.parametrize("style", STYLES)
def test_long_positions(drafts, style):
    """Thousands of cached positions: where llama3 / yarn scaling changes the rotation."""
    ref = load_reference(drafts[style]["hf"])
    err = long_position_error(ref, load_draft(drafts[style]["fp32"]))
    record(style, "fp32-pos4000", max_abs_logit_err=err)
    assert err <= LONG_TOL


# Rope spellings of config.json, read as transformers reads them.
ROPE_VARIANTS = [
    pytest.param(
        "qwen35",
        {
            "rope_parameters": None,
            "rope_theta": 1e6,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32768,
            },
        },
        id="yarn-flat-rope_scaling",
    ),
    pytest.param(
        "qwen35",
        {
            "rope_parameters": None,
            "rope_theta": 1e6,
            "rope_scaling": {
                "type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 32768,
            },
        },
        id="yarn-legacy-type-key",
    ),
    pytest.param(
        "qwen3_b16", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, id="linear"
    ),
    pytest.param(
        "qwen35",
        # gpt-oss's rope values (its config writes truncate: false)
        {
            "rope_parameters": {
                "truncate": False,
                "rope_theta": 150000,
                "factor": 32.0,
                "original_max_position_embeddings": 4096,
            }
        },
        id="yarn-truncate-false",
    ),
    pytest.param(
        "qwen35",
        {"rope_parameters": {"attention_factor": 1.0}},
        id="yarn-attention_factor",
    ),
    pytest.param(
        "qwen35",
        {
            "max_position_embeddings": 32768,
            "rope_parameters": {"original_max_position_embeddings": None},
        },
        id="yarn-no-original_max",
    ),
    pytest.param(
        "llama31",
        {"rope_scaling": {"original_max_position_embeddings": None}},
        id="llama3-no-original_max",
    ),
]


@pytest.mark.parametrize("style,changes", ROPE_VARIANTS)
def test_rope_variants(tmp_path, style, changes):
    hf = write_checkpoint(tmp_path / "hf", style, **changes)
    err = long_position_error(load_reference(hf), load_draft(hf, dtype="float32"), 2000)
    record(style, "rope-variant", changes=json.dumps(changes).replace(" ", ""), err=err)
    assert err <= LONG_TOL


def bf16_inputs(ref, seeds):
    """(ctx, block) pairs rounded to bf16, so every side reads identical inputs."""
    return [tuple(map(to_bf16, make_inputs(ref, seed))) for seed in seeds]


def collect(fn, inputs) -> np.ndarray:
    return np.concatenate([fn(block, ctx) for ctx, block in inputs])


def compare(W, exact: np.ndarray, approx: np.ndarray) -> dict:
    """Top-1 agreement (all positions, and where the exact top-1 margin is at least
    CONFIDENT_MARGIN) and the RMS logit error of approx against exact."""
    same = top1(W, exact) == top1(W, approx)
    confident = margins(W, exact) >= CONFIDENT_MARGIN
    return {
        "agree": float(same.mean()),
        "agree_confident": float(same[confident].mean()),
        "confident": int(confident.sum()),
        "positions": int(same.size),
        "rms_err": float(np.sqrt(np.mean((exact @ W.T - approx @ W.T) ** 2))),
    }


# Top-1 of a random head is a coin flip where its two best logits are closer than the
# rounding noise; bf16 (8-bit mantissa) gives logit errors of ~0.01 RMS here, so the
# agreement bound is taken where the fp32 margin is at least 0.1 (~75% of positions).
CONFIDENT_MARGIN = 0.1


@pytest.mark.parametrize("style", STYLES)
def test_bf16_agreement(drafts, style):
    ref = load_reference(drafts[style]["hf"])
    ref_bf16 = load_reference(drafts[style]["hf"], dtype=torch.bfloat16)
    draft = load_draft(drafts[style]["bf16"])
    assert draft.fc.weight.dtype == mx.bfloat16
    W = lm_head(ref.spec.hidden_size)
    inputs = bf16_inputs(ref, range(12))
    exact = collect(lambda b, c: ref_hidden(ref, b, c), inputs)
    mlx = compare(
        W, exact, collect(lambda b, c: mlx_hidden(draft, b, c, dtype=mx.bfloat16), inputs)
    )
    pt = compare(
        W, exact, collect(lambda b, c: ref_hidden(ref_bf16, b, c, dtype=torch.bfloat16), inputs)
    )
    record(style, "bf16", **mlx, torch_bf16_agree=pt["agree"], torch_bf16_rms_err=pt["rms_err"])
    assert mlx["agree_confident"] >= 0.99
    assert mlx["agree"] >= 0.95
    # MLX in bf16 is as accurate as PyTorch in bf16 (same weights, same inputs).
    assert mlx["rms_err"] <= 1.25 * pt["rms_err"]


def dequantized_reference(hf_dir, mlx_dir) -> ReferenceDraft:
    """The reference with the 4-bit weights MLX wrote, unpacked here with numpy:
    affine per group, w = scale * q + bias, 32/bits values per uint32, low bits first."""
    q = read_config(mlx_dir)["quantization"]
    bits, group = q["bits"], q["group_size"]
    saved = mx.load(str(mlx_dir / "model.safetensors"))
    as_np = {
        k: np.array(v.astype(mx.float32) if v.dtype != mx.uint32 else v) for k, v in saved.items()
    }
    state = {}
    for name, value in as_np.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name.removesuffix(".weight")
        if f"{base}.scales" in as_np:
            words = value.astype(np.uint32)
            shifts = np.arange(32 // bits, dtype=np.uint32) * bits
            levels = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)
            levels = levels.reshape(words.shape[0], -1).astype(np.float32)
            scales = np.repeat(as_np[f"{base}.scales"], group, axis=-1)
            biases = np.repeat(as_np[f"{base}.biases"], group, axis=-1)
            value = levels * scales + biases
        state[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    ref = ReferenceDraft(read_config(hf_dir))
    ref.load_state_dict(state, strict=True)
    return ref.to(DEVICE).eval()


def test_mlx_cuda_quantized_matmul_64_inputs():
    """MLX 0.32.4 on CUDA: a 4-bit matmul whose layer has 64 inputs (one group per row)
    is wrong (fp32: off by ~100%; bf16: NaN), while 128+ inputs are right. The tiny
    qwen3_b16/llama31 drafts (hidden 64) have such layers; real drafts (hidden >= 2560)
    do not. Found by this suite on the H200; xfails on CUDA until MLX fixes it."""
    errors = {}
    for k in (64, 128):
        w = mx.random.normal((96, k), key=mx.random.key(k))
        wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
        x = mx.random.normal((2, 32, k), key=mx.random.key(k + 1))
        got = mx.quantized_matmul(x, wq, scales, biases, group_size=64, bits=4)
        with mx.stream(mx.cpu):
            ref = x @ mx.dequantize(wq, scales, biases, group_size=64, bits=4).T
            errors[k] = (mx.abs(got - ref).max() / mx.abs(ref).max()).item()
    assert errors[128] <= 1e-5
    if mx.cuda.is_available() and not errors[64] <= 1e-5:
        pytest.xfail(f"MLX CUDA 4-bit matmul with 64 inputs: relative error {errors[64]:.2g}")
    assert errors[64] <= 1e-5


# The MLX CUDA bug above, hit by the styles whose draft has 64-input layers.
_QMM_64_ON_CUDA = pytest.mark.xfail(
    mx.cuda.is_available(),
    reason="MLX CUDA 4-bit matmul is wrong for 64-input layers (test_mlx_cuda_quantized_matmul_64_inputs)",
    strict=True,
)


@pytest.mark.parametrize(
    "style",
    [pytest.param(s, marks=_QMM_64_ON_CUDA) if s != "qwen35" else s for s in STYLES],
)
def test_q4(drafts, style):
    ref = load_reference(drafts[style]["hf"])
    W = lm_head(ref.spec.hidden_size)

    # 1. Exactness of the quantized path: fp32 4-bit against the same dequantized weights.
    draft32 = load_draft(drafts[style]["q4-fp32"])
    deq32 = dequantized_reference(drafts[style]["hf"], drafts[style]["q4-fp32"])
    err = 0.0
    for seed in range(3):
        ctx, block = make_inputs(ref, seed)
        err = max(
            err, max_logit_error(W, ref_hidden(deq32, block, ctx), mlx_hidden(draft32, block, ctx))
        )

    # 2. Faithfulness of 4-bit (bf16 activations, as users run it) to the original model.
    draft = load_draft(drafts[style]["q4"])
    deq = dequantized_reference(drafts[style]["hf"], drafts[style]["q4"])
    inputs = bf16_inputs(ref, range(8))
    exact = collect(lambda b, c: ref_hidden(ref, b, c), inputs)
    dequant = collect(lambda b, c: ref_hidden(deq, b, c), inputs)
    q4 = collect(lambda b, c: mlx_hidden(draft, b, c, dtype=mx.bfloat16), inputs)
    vs_orig, vs_dequant = compare(W, exact, q4), compare(W, dequant, q4)
    rounding = compare(W, exact, dequant)  # what 4-bit rounding alone costs
    record(
        style,
        "q4",
        fp32_vs_dequant_max_err=err,
        top1_agree_vs_orig=vs_orig["agree"],
        dequant_ref_agree_vs_orig=rounding["agree"],
        top1_agree_vs_dequant=vs_dequant["agree"],
        top1_agree_vs_dequant_confident=vs_dequant["agree_confident"],
        positions=vs_orig["positions"],
    )
    assert err <= FP32_TOL
    # The 4-bit draft is as faithful as 4-bit rounding of these weights allows: it agrees
    # with the original about as often as the dequantized fp32 reference does (the gap is
    # bf16 noise), and that is ~70-85% on random tiny weights, where 4-bit noise (~10%
    # per weight, one 64-wide group per row) is of the size of the top-1 margins.
    assert vs_orig["agree"] >= 0.6
    assert abs(vs_orig["agree"] - rounding["agree"]) <= 0.05
    assert vs_dequant["agree_confident"] >= 0.99


def test_target_layer_ids(tmp_path):
    assert build_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    for n_target in range(4, 81):
        for n_draft in range(1, 9):
            assert build_target_layer_ids(n_target, n_draft) == target_layer_ids(n_target, n_draft)

    # A checkpoint without dflash_config.target_layer_ids taps the default layers.
    hf = write_checkpoint(tmp_path / "hf", "qwen3_b16", dflash_config={"target_layer_ids": None})
    ref = load_reference(hf)
    draft = load_draft(hf, dtype="float32")
    assert draft.config.target_layer_ids == ref.spec.target_layer_ids == [1, 33]
    ctx, block = make_inputs(ref, seed=0)
    W = lm_head(ref.spec.hidden_size)
    assert (
        max_logit_error(W, ref_hidden(ref, block, ctx), mlx_hidden(draft, block, ctx)) <= FP32_TOL
    )


def test_decode_loop(tmp_path):
    """The reference loop is lossless, and dflash_mlx decodes the same tokens with the
    same acceptance lengths. The target echoes its input (large embeddings, small
    layers) and the draft's mask id is the echoed token, so how many drafts are accepted
    hinges on the draft's own logits: acceptance varies from 1 to the full block."""
    from mlx_lm.utils import load_model
    from reference.decode import dflash_generate
    from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

    from dflash_mlx.generate import dflash_cycles

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    target = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        target.get_input_embeddings().weight.normal_(0.0, 1.0)
    target.save_pretrained(tmp_path / "target")
    target = target.to(DEVICE)
    hf = write_checkpoint(
        tmp_path / "draft",
        "qwen3_b16",
        residual_scale=1.3,
        block_size=8,
        vocab_size=VOCAB,
        num_target_layers=4,
        dflash_config={"mask_token_id": VOCAB - 1, "target_layer_ids": [0, 2]},
    )
    prompt = [5, 17, 42, 7, 99, 3, 61, 28, VOCAB - 1]
    n = 40

    with torch.inference_mode():  # the target's own greedy decoding
        ids, cache, greedy = torch.tensor([prompt], device=DEVICE), DynamicCache(), []
        while len(greedy) < n:
            logits = target(ids, past_key_values=cache, use_cache=True).logits
            greedy.append(int(logits[0, -1].argmax()))
            ids = torch.tensor([[greedy[-1]]], device=DEVICE)

    tokens, acceptance = dflash_generate(
        load_reference(hf), target, torch.tensor([prompt], device=DEVICE), n
    )
    model, _ = load_model(tmp_path / "target")
    cycles = list(
        dflash_cycles(
            model, load_draft(hf, dtype="float32"), mx.array(prompt), max_tokens=n, block_size=8
        )
    )
    mlx_tokens = [t for c in cycles for t in c.tokens]
    mlx_acceptance = [c.accepted + 1 for c in cycles[1:]]
    record("decode", "greedy", cycles=len(acceptance), acceptance=acceptance)
    assert tokens == greedy == mlx_tokens
    assert 1 in acceptance and 8 in acceptance  # the draft matters, both ways
    # dflash_mlx shrinks the last block to the tokens still wanted; the paper's loop
    # does not, so only the last cycle may differ.
    assert acceptance[:-1] == mlx_acceptance[:-1]
