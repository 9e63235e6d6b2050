"""DFlash 2 and Gemma-4-style drafts against the independent PyTorch reference.

Checkpoints are written by the reference in z-lab's format (config.json +
model.safetensors, bf16, codebooks stored bare), converted with convert.py's entry
point, and loaded with load_draft. Checked: fp32 logits within 1e-4 of the reference;
bf16 and 4/8-bit within the bounds tests/test_parity.py sets for DFlash; the
selector's greedy path equals the reference's; its sampled q equals the reference's q
along the same path; the tokens `propose` draws follow the q it returns (chi-square).
"""

import inspect

import mlx.core as mx
import numpy as np
import pytest
import torch
from reference.checkpoints import write_checkpoint
from reference.model import load_reference, make_reference, read_config

from dflash_mlx import load_draft
from dflash_mlx.convert import main as convert_main
from dflash_mlx.dflash2 import DFlash2DraftModel
from dflash_mlx.drafter import finish_logits
from dflash_mlx.sampling import SamplingParams

# dflash2 as published (Qwen3.8 style); dflash2-gemma adds the Gemma-4 fields
# (softcapping, output multiplier, embedding scale) and z-lab's default causality.
GEMMA_FIELDS = {
    "dflash_config": {
        "final_logit_softcapping": 30.0,
        "input_embedding_scale": 0.5,
        "output_multiplier": 1.5,
    },
    "is_causal": None,
}
CASES = {
    "dflash2": ("dflash2", {}),
    "dflash2-gemma": ("dflash2", GEMMA_FIELDS),
    "dflash2-k3": ("dflash2", {"dflash_config": {"conv_kernel_size": 3}, "is_causal": True}),
    "gemma4": ("gemma4", {}),
}
VARIANTS = {
    "fp32": ["--dtype", "float32"],
    "bf16": ["--dtype", "bfloat16"],
    "q4": ["-q", "--q-bits", "4", "--q-group-size", "32"],
    "q8": ["-q", "--q-bits", "8", "--q-group-size", "32"],
}
CONVERTED = {
    "dflash2": VARIANTS,
    "dflash2-gemma": ["fp32"],
    "dflash2-k3": ["fp32"],
    "gemma4": ["fp32"],
}
CONTEXT = 40  # longer than the sliding window (12)
TARGET_EMBED_SCALE = 2.0  # the target's own embedding scale (sqrt(H) for Gemma 4)
FP32_TOL = 1e-4
TEMP = 0.8


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def drafts(tmp_path_factory):
    root = tmp_path_factory.mktemp("dflash2")
    out = {}
    for i, (case, (style, changes)) in enumerate(CASES.items()):
        hf = write_checkpoint(root / f"{case}-hf", style, seed=10 + i, **changes)
        out[case] = {"hf": hf}
        for variant in CONVERTED[case]:
            out[case][variant] = root / f"{case}-{variant}"
            argv = ["--hf-path", str(hf), "--mlx-path", str(out[case][variant])]
            assert convert_main([*argv, *VARIANTS[variant]]) == 0
    return out


def head(spec, seed=1234):
    """A random embedding table E [V, H] and LM head W [V, H] (unit-scale logits)."""
    rng = np.random.default_rng(seed)
    V, H = spec.vocab_size, spec.hidden_size
    E = rng.standard_normal((V, H), dtype=np.float32)
    W = (rng.standard_normal((V, H)) / H**0.5).astype(np.float32)
    return E, W


def bind(draft, E, W, dtype=mx.float32):
    """Bind a random table/head, with the target embedding scale where the model takes
    it (DFlash 2 always; DFlash 1 once drafter.py has the Gemma-4 lines)."""
    Em, Wm = mx.array(E).astype(dtype), mx.array(W).astype(dtype)
    if "embed_scale" in inspect.signature(draft.bind_head).parameters:
        return draft.bind_head(lambda ids: Em[ids], lambda h: h @ Wm.T, TARGET_EMBED_SCALE)
    return draft.bind_head(lambda ids: Em[ids], lambda h: h @ Wm.T)


def inputs(spec, seed, batch=2, context=CONTEXT):
    rng = np.random.default_rng(seed)
    H, taps = spec.hidden_size, len(spec.target_layer_ids)
    ctx = rng.standard_normal((batch, context, taps * H), dtype=np.float32)
    block = rng.standard_normal((batch, spec.block_size, H), dtype=np.float32)
    return ctx, block


def t(a, dtype=torch.float32):
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def ref_logits(ref, block, ctx, W, dtype=torch.float32):
    with torch.no_grad():
        h = ref(t(block, dtype), t(ctx, dtype)).float()
        return ref.finish_logits(h @ t(W).T).numpy()


def mlx_logits(draft, block, ctx, dtype=mx.float32):
    h = draft(mx.array(block).astype(dtype), mx.array(ctx).astype(dtype))
    return np.array(draft.logits(h).astype(mx.float32))


def agreement(exact, approx, margin=0.1):
    s = np.sort(exact, axis=-1)
    confident = (s[..., -1] - s[..., -2] >= margin).ravel()
    same = (exact.argmax(-1) == approx.argmax(-1)).ravel()
    return float(same.mean()), float(same[confident].mean())


@pytest.mark.parametrize(
    "case",
    ["dflash2", "dflash2-gemma", "dflash2-k3", "gemma4"],
)
def test_fp32_parity(drafts, case):
    ref = load_reference(drafts[case]["hf"])
    E, W = head(ref.spec)
    for source in ("fp32", "hf"):
        draft = load_draft(drafts[case][source], dtype="float32" if source == "hf" else None)
        bind(draft, E, W)
        err = 0.0
        for seed in range(3):
            ctx, block = inputs(ref.spec, seed)
            err = max(
                err, np.abs(ref_logits(ref, block, ctx, W) - mlx_logits(draft, block, ctx)).max()
            )
        print(f"{case} fp32-{source} max_abs_logit_err={err:.3g}")
        assert err <= FP32_TOL
    # The converted checkpoint still reads the same for a PyTorch runtime.
    converted = make_reference(read_config(drafts[case]["fp32"]))
    for field in (
        "architecture",
        "block_size",
        "mask_token_id",
        "target_layer_ids",
        "is_causal",
        "final_logit_softcapping",
        "input_embedding_scale",
        "output_multiplier",
        "conv_kernel_size",
        "conv_group_size",
        "selector_rank",
        "selector_top_k",
    ):
        assert getattr(converted.spec, field) == getattr(ref.spec, field), field


def test_gemma4_hidden_parity(drafts):
    """The Gemma-4-style DFlash draft's layers (mixed sliding/full) match already."""
    ref = load_reference(drafts["gemma4"]["hf"])
    draft = load_draft(drafts["gemma4"]["fp32"])
    ctx, block = inputs(ref.spec, 5)
    with torch.no_grad():
        r = ref(t(block), t(ctx)).numpy()
    m = np.array(draft(mx.array(block), mx.array(ctx)))
    assert np.abs(r - m).max() * 8 <= FP32_TOL  # unit logits: |h| error x |W| row norm


def test_gemma4_propose_matches_reference(drafts):
    """DFlash 1 propose on a Gemma-4-style draft: block input scaled by the target's and
    the draft's embedding scales, logits softcapped after the output multiplier."""
    tokens, _, ref, hidden, W, _ = propose_both("gemma4", drafts, 0, 0.0)
    logits = ref.finish_logits(hidden @ t(W).T)[0]
    assert tokens.tolist() == logits.argmax(-1).tolist()
    _, logq, ref, hidden, W, _ = propose_both("gemma4", drafts, 1, TEMP)
    expected = torch.log_softmax(ref.finish_logits(hidden @ t(W).T)[0] / TEMP, -1)
    assert np.abs(np.exp(logq) - expected.exp().numpy()).max() <= 1e-5


def test_checkpoint_names_as_published(drafts):
    from safetensors import safe_open

    with safe_open(str(drafts["dflash2"]["hf"] / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "candidate_selector.predecessor_codebook" in names
    assert "layers.1.mlp_conv.base_kernel" in names
    assert "layers.0.attention_conv.kernel_projection.weight" in names
    assert not any(n.startswith(("embed_tokens", "lm_head")) for n in names)
    converted = mx.load(str(drafts["dflash2"]["fp32"] / "model.safetensors"))
    assert set(converted) == names  # the converter keeps the published names


def test_codebooks_saved_with_weight_suffix_load(tmp_path, drafts):
    """A transformers save of a freshly built DFlash2DraftModel names the codebooks
    `.weight` (Embedding); it loads to the same model."""
    from safetensors.torch import load_file, save_file

    src = drafts["dflash2"]["hf"]
    state = load_file(str(src / "model.safetensors"))
    for name in ("predecessor_codebook", "successor_codebook"):
        state[f"candidate_selector.{name}.weight"] = state.pop(f"candidate_selector.{name}")
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    save_file(state, str(tmp_path / "model.safetensors"))
    a, b = load_draft(src, dtype="float32"), load_draft(tmp_path, dtype="float32")
    assert mx.array_equal(
        a.candidate_selector.successor_codebook, b.candidate_selector.successor_codebook
    )


def test_draft_cache(drafts):
    """Context fed in chunks through the cache = all at once, on both sides; the cache
    keeps the context only; context_window limits what the block sees."""
    ref = load_reference(drafts["dflash2"]["hf"])
    draft = load_draft(drafts["dflash2"]["fp32"])
    ctx, block1 = inputs(ref.spec, 10)
    _, block2 = inputs(ref.spec, 11)
    cache, ref_cache = draft.make_cache(), ref.make_cache()
    with torch.no_grad():
        ref(t(block1), t(ctx[:, :30]), ref_cache)
        r = ref(t(block2), t(ctx[:, 30:]), ref_cache, context_window=16).numpy()
    draft(mx.array(block1), mx.array(ctx[:, :30]), cache)
    m = np.array(draft(mx.array(block2), mx.array(ctx[:, 30:]), cache, 16))
    assert all(c.offset == CONTEXT for c in cache) and ref_cache.length == CONTEXT
    assert np.abs(r - m).max() * 8 <= FP32_TOL


def test_bf16_agreement(drafts):
    ref = load_reference(drafts["dflash2"]["hf"])
    ref_bf16 = load_reference(drafts["dflash2"]["hf"], dtype=torch.bfloat16)
    draft = load_draft(drafts["dflash2"]["bf16"])
    assert draft.fc.weight.dtype == mx.bfloat16
    E, W = head(ref.spec)
    bind(draft, E, W)
    exact, got, pt = [], [], []
    for seed in range(6):
        ctx, block = (
            torch.from_numpy(a).bfloat16().float().numpy() for a in inputs(ref.spec, seed)
        )
        exact.append(ref_logits(ref, block, ctx, W))
        got.append(mlx_logits(draft, block, ctx, mx.bfloat16))
        pt.append(ref_logits(ref_bf16, block, ctx, W, torch.bfloat16))
    exact, got, pt = map(np.concatenate, (exact, got, pt))
    agree, confident = agreement(exact, got)
    rms, rms_pt = np.sqrt(np.mean((got - exact) ** 2)), np.sqrt(np.mean((pt - exact) ** 2))
    print(
        f"bf16 agree={agree:.3f} confident={confident:.3f} rms={rms:.3g} torch_bf16_rms={rms_pt:.3g}"
    )
    assert confident >= 0.99 and agree >= 0.95
    assert rms <= 1.25 * rms_pt


def dequantized_reference(hf_dir, mlx_dir):
    """The reference holding the quantized weights MLX wrote, unpacked with numpy
    (affine per group: w = scale * q + bias, 32/bits levels per uint32, low bits first)."""
    q = read_config(mlx_dir)["quantization"]
    bits, group = q["bits"], q["group_size"]
    saved = {
        k: np.array(v.astype(mx.float32) if v.dtype != mx.uint32 else v)
        for k, v in mx.load(str(mlx_dir / "model.safetensors")).items()
    }
    state = {}
    for name, value in saved.items():
        if name.endswith((".scales", ".biases")):
            continue
        base = name.removesuffix(".weight")
        if f"{base}.scales" in saved:
            shifts = np.arange(32 // bits, dtype=np.uint32) * bits
            levels = (value.astype(np.uint32)[..., None] >> shifts) & np.uint32((1 << bits) - 1)
            levels = levels.reshape(value.shape[0], -1).astype(np.float32)
            value = levels * np.repeat(saved[f"{base}.scales"], group, -1) + np.repeat(
                saved[f"{base}.biases"], group, -1
            )
        state[name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    ref = make_reference(read_config(hf_dir))
    ref.load_state_dict(state, strict=True)
    return ref.eval()


@pytest.mark.parametrize("variant, bound", [("q4", 0.6), ("q8", 0.95)])
def test_quantized(drafts, variant, bound):
    from mlx.nn import QuantizedLinear

    ref = load_reference(drafts["dflash2"]["hf"])
    deq = dequantized_reference(drafts["dflash2"]["hf"], drafts["dflash2"][variant])
    draft = load_draft(drafts["dflash2"][variant])
    assert isinstance(draft.layers[0].attention_conv.kernel_projection, QuantizedLinear)
    assert isinstance(draft.candidate_selector.hidden_projection, QuantizedLinear)
    E, W = head(ref.spec)
    bind(draft, E, W, mx.bfloat16)
    exact, approx, got = [], [], []
    for seed in range(4):
        ctx, block = (
            torch.from_numpy(a).bfloat16().float().numpy() for a in inputs(ref.spec, seed)
        )
        exact.append(ref_logits(ref, block, ctx, W))
        approx.append(ref_logits(deq, block, ctx, W))
        got.append(mlx_logits(draft, block, ctx, mx.bfloat16))
    exact, approx, got = map(np.concatenate, (exact, approx, got))
    vs_original, _ = agreement(exact, got)
    _, vs_dequantized = agreement(approx, got)
    print(
        f"{variant} top1_vs_original={vs_original:.3f} confident_vs_dequantized={vs_dequantized:.3f}"
    )
    assert vs_original >= bound
    assert vs_dequantized >= 0.99


def propose_both(case, drafts, seed, temperature, n=None):
    """Run propose on MLX and the reference draft from the same context and anchor.
    Returns (mlx tokens, mlx logq | None, reference model, reference hidden, W)."""
    ref = load_reference(drafts[case]["hf"])
    draft = load_draft(drafts[case]["fp32"])
    E, W = head(ref.spec)
    bind(draft, E, W)
    ctx, _ = inputs(ref.spec, seed, batch=1)
    n = n or ref.spec.block_size - 1
    anchor = int(np.random.default_rng(seed).integers(ref.spec.vocab_size))
    cache = draft.make_cache()
    draft.add_context(mx.array(ctx), cache)
    sampling = SamplingParams(temp=temperature)
    tokens, logq = draft.propose(mx.array([anchor], dtype=mx.int32), cache, n, sampling)
    assert all(c.offset == CONTEXT for c in cache)  # propose leaves the context as it was
    if isinstance(draft, DFlash2DraftModel):  # nothing to draft: empty, not an error
        empty, empty_logq = draft.propose(mx.array([anchor], dtype=mx.int32), cache, 0, sampling)
        assert empty.shape == (0,) and (empty_logq is None) == sampling.greedy
    ids = torch.tensor([[anchor] + [ref.spec.mask_token_id] * n])
    with torch.no_grad():
        hidden = ref(ref.embed_block(t(E), ids, TARGET_EMBED_SCALE), t(ctx))[:, 1:]
    return np.array(tokens), None if logq is None else np.array(logq), ref, hidden, W, anchor


@pytest.mark.parametrize("case", ["dflash2", "dflash2-gemma", "dflash2-k3"])
def test_greedy_path_matches_reference(drafts, case):
    for seed in range(4):
        tokens, logq, ref, hidden, W, anchor = propose_both(case, drafts, seed, 0.0)
        ref_tokens, _ = ref.propose(hidden, t(W), torch.tensor([anchor]))
        assert logq is None and tokens.dtype == np.int32
        assert tokens.tolist() == ref_tokens[0].tolist()
        # The selector matters: the path is not just each position's argmax.
        if seed == 0:
            plain = ref.finish_logits(hidden @ t(W).T).argmax(-1)[0]
            print(case, "selector path", tokens.tolist(), "argmax", plain.tolist())


@pytest.mark.parametrize("case", ["dflash2", "dflash2-gemma"])
def test_sampled_q_matches_reference(drafts, case):
    for seed in range(3):
        tokens, logq, ref, hidden, W, anchor = propose_both(case, drafts, seed, TEMP)
        n, V = logq.shape
        assert logq.dtype == np.float32 and V == ref.spec.vocab_size
        q = np.exp(logq)
        assert np.allclose(q.sum(-1), 1.0, atol=1e-5)
        assert ((q > 0).sum(-1) == ref.spec.selector_top_k).all()  # support: the top-k
        assert (q[np.arange(n), tokens] > 0).all()
        _, ref_q = ref.propose(
            hidden, t(W), torch.tensor([anchor]), TEMP, path=torch.from_numpy(tokens)[None].long()
        )
        err = np.abs(q - ref_q[0].numpy()).max()
        assert err <= 1e-5, err


# chi-square critical values at 99.9 % by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12}


def chi2(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic over the cells with probability > 0, cells expecting fewer
    than 5 draws merged into one; returns (statistic, degrees of freedom)."""
    n = counts.sum()
    keep = probs > 0
    counts, expected = counts[keep], probs[keep] * n
    small = expected < 5
    if small.any():
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    return float(((counts - expected) ** 2 / expected).sum()), len(counts) - 1


def test_propose_draws_follow_its_q(drafts):
    """The first drafted token over repeated proposes (same context) follows the q it
    returns; and, through the selector batched, the second token given the first."""
    draft = load_draft(drafts["dflash2"]["fp32"])
    spec = draft.config
    E, W = head(spec)
    bind(draft, E, W)
    ctx, _ = inputs(spec, 3, batch=1)
    cache = draft.make_cache()
    draft.add_context(mx.array(ctx), cache)
    mx.random.seed(7)
    sampling, anchor = SamplingParams(temp=1.5), mx.array([17], dtype=mx.int32)
    counts, q0 = np.zeros(spec.vocab_size), None
    for _ in range(300):
        tokens, logq = draft.propose(anchor, cache, 1, sampling)
        counts[tokens.item()] += 1
        row = np.exp(np.array(logq[0]))
        assert q0 is None or np.allclose(row, q0, atol=1e-6)  # q0 depends only on the anchor
        q0 = row
    stat, df = chi2(counts, q0)
    print(f"propose chi2={stat:.2f} df={df}")
    assert df >= 2 and stat < CHI2_999[df]

    # Many paths at once through the selector propose uses: the second token's
    # conditional distribution, given the most frequent first token.
    n_paths = 6000
    block = mx.concatenate([anchor, mx.full((2,), spec.mask_token_id, mx.int32)])[None]
    hidden = draft(block, None, cache)[:, 1:]
    hidden = mx.broadcast_to(hidden, (n_paths, *hidden.shape[1:]))
    logits = draft.logits(hidden)
    tokens, candidates, logq = draft.candidate_selector(
        hidden, logits, mx.broadcast_to(anchor, (n_paths,)), 1.5
    )
    tokens, candidates, q = np.array(tokens), np.array(candidates), np.exp(np.array(logq))
    first = np.bincount(tokens[:, 0], minlength=spec.vocab_size)
    q_first = np.zeros(spec.vocab_size)
    q_first[candidates[0, 0]] = q[0, 0]
    stat_first, df = chi2(first, q_first)
    assert stat_first < CHI2_999[df]
    mode = first.argmax()
    rows = np.flatnonzero(tokens[:, 0] == mode)
    second = np.bincount(tokens[rows, 1], minlength=spec.vocab_size)
    q_second = np.zeros(spec.vocab_size)
    q_second[candidates[rows[0], 1]] = q[rows[0], 1]
    assert np.allclose(q[rows, 1], q[rows[0], 1], atol=1e-6)  # same predecessor, same q
    stat, df = chi2(second, q_second)
    print(f"selector chi2 first={stat_first:.2f} second|first={stat:.2f} df={df}")
    assert stat < CHI2_999[df]


def test_finish_logits_softcap_and_multiplier():
    """finish_logits against its formula on fixed values (the DFlash 1 model uses it)."""
    from dflash_mlx.config import DraftConfig

    cfg = DraftConfig.from_dict(
        read_config_dict("gemma4", {"dflash_config": {"final_logit_softcapping": 2.0}})
    )
    x = np.array([-100.0, -1.0, 0.0, 0.5, 3.0], dtype=np.float32)
    expected = 2.0 * np.tanh(x * 1.5 / 2.0)
    assert np.allclose(np.array(finish_logits(mx.array(x), cfg)), expected, atol=1e-6)


def read_config_dict(style, changes):
    from reference.checkpoints import draft_config

    return draft_config(style, **changes)


# ---- decoding with the generation loop (draft.propose) ---------------------------


def run_dflash(model, draft, prompt, n, **kw):
    from dflash_mlx.generate import dflash_cycles

    out = []
    for cycle in dflash_cycles(model, draft, mx.array(prompt), max_tokens=n, **kw):
        out += cycle.tokens
    return out


def test_decodes_losslessly_greedy(tmp_path):
    """A converted DFlash 2 checkpoint decodes exactly mlx_lm's greedy output."""
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.generate import generate_step
    from tiny_models import load_config, make_target

    target = make_target(tmp_path / "target", "qwen3")
    cfg = load_config(target)
    n, V = cfg["num_hidden_layers"], cfg["vocab_size"]
    hf = write_checkpoint(
        tmp_path / "draft-hf",
        "dflash2",
        seed=7,
        hidden_size=cfg["hidden_size"],
        vocab_size=V,
        num_target_layers=n,
        dflash_config={"mask_token_id": V - 1, "target_layer_ids": [1, n - 2], "block_size": 6},
    )
    assert convert_main(["--hf-path", str(hf), "--mlx-path", str(tmp_path / "draft")]) == 0
    model, _ = mlx_lm_load(str(target))
    draft = load_draft(tmp_path / "draft")
    assert isinstance(draft, DFlash2DraftModel)
    prompt = [5, 17, 42, 7, 99, 3]
    expected = [
        int(t) for t, _ in zip((t for t, _ in generate_step(mx.array(prompt), model)), range(48))
    ]
    assert run_dflash(model, draft, prompt, 48) == expected


def test_speculative_sampling_with_selector_is_exact():
    """Chi-square: the first three tokens DFlash 2 samples (the selector's q in the
    rejection step) follow the target's exact joint distribution. top_k 2 of 4 tokens:
    q is zero off its candidates, so the residual step is exercised."""
    from collections import Counter

    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import qwen3

    from dflash_mlx.config import DraftConfig

    V, temp = 4, 1.0
    mx.random.seed(3)
    model = qwen3.Model(
        qwen3.ModelArgs(
            model_type="qwen3",
            hidden_size=32,
            num_hidden_layers=4,
            intermediate_size=64,
            num_attention_heads=4,
            rms_norm_eps=1e-6,
            vocab_size=V,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_theta=10000.0,
            head_dim=8,
            tie_word_embeddings=False,
        )
    )
    mx.eval(model.parameters())
    config = {
        "architectures": ["DFlash2DraftModel"],
        "dflash_config": {
            "block_size": 4,
            "mask_token_id": V - 1,
            "target_layer_ids": [1, 2],
            "conv_kernel_size": 2,
            "conv_group_size": 8,
            "selector_rank": 4,
            "selector_top_k": 2,
        },
        "num_target_layers": 4,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "vocab_size": V,
        "rope_theta": 10000.0,
    }
    draft = DFlash2DraftModel(DraftConfig.from_dict(config))
    params = tree_flatten(draft.parameters())
    draft.update(tree_unflatten([(k, 0.5 * mx.random.normal(v.shape)) for k, v in params]))
    mx.eval(draft.parameters())
    prompt = [1, 2, 3]

    def probs(seqs):
        return mx.softmax(model(mx.array(seqs))[:, -1] / temp, axis=-1)

    p1 = probs([prompt])[0]
    p2 = probs([[*prompt, a] for a in range(V)])
    p3 = probs([[*prompt, a, b] for a in range(V) for b in range(V)]).reshape(V, V, V)
    exact = np.array((p1[:, None, None] * p2[:, :, None] * p3).reshape(-1))

    runs = 400
    mx.random.seed(11)
    counts = Counter()
    for _ in range(runs):
        toks = run_dflash(model, draft, prompt, 3, sampling=SamplingParams(temp=temp))
        counts[toks[0] * V * V + toks[1] * V + toks[2]] += 1
    observed = np.array([counts[i] for i in range(V**3)], dtype=np.float64)
    stat, df = chi2(observed, exact)
    print(f"dflash2 sampling chi2={stat:.2f} df={df}")
    # Wilson-Hilferty 99.9 % quantile for the larger df here.
    assert stat < df * (1 - 2 / (9 * df) + 3.09 * (2 / (9 * df)) ** 0.5) ** 3


def test_target_embed_scale():
    """Gemma 4 targets scale their embeddings by sqrt(H) (the draft input follows);
    Qwen3 targets do not."""
    from mlx_lm.models import gemma4_text, qwen3

    from dflash_mlx.drafter import target_embed_scale

    gemma = gemma4_text.Model(
        gemma4_text.ModelArgs(
            model_type="gemma4_text",
            hidden_size=64,
            num_hidden_layers=2,
            intermediate_size=128,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            vocab_size=64,
            layer_types=["sliding_attention", "full_attention"],
            num_kv_shared_layers=0,
        )
    )
    assert target_embed_scale(gemma) == 8.0
    plain = qwen3.Model(
        qwen3.ModelArgs(
            model_type="qwen3",
            hidden_size=32,
            num_hidden_layers=1,
            intermediate_size=64,
            num_attention_heads=4,
            rms_norm_eps=1e-6,
            vocab_size=8,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rope_theta=10000.0,
            head_dim=8,
            tie_word_embeddings=True,
        )
    )
    assert target_embed_scale(plain) == 1.0
