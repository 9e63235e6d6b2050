"""The verify session: exact output with processors, KV quantization and prompt caches,
against mlx_lm's own generation; checked cache binding; exact rollback and draft context."""

from __future__ import annotations

import json
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from conftest import write_random_draft
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_lm_load
from mlx_lm import stream_generate as mlx_lm_stream_generate
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache as mlx_lm_make_prompt_cache
from mlx_lm.sample_utils import apply_min_p, apply_top_k, make_logits_processors, make_sampler
from test_generate import OracleDraft, chi2_critical
from tiny_models import FAMILIES, make_target

from dflash_mlx import load_draft, make_prompt_cache, stream_generate
from dflash_mlx.convert import convert
from dflash_mlx.generate import dflash_cycles
from dflash_mlx.sampling import SamplingParams
from dflash_mlx.session import VerifySession, load_prompt_cache, save_prompt_cache

PROMPT = [5, 17, 42, 7, 99, 3, 61, 28, 11]


@pytest.fixture(scope="module")
def pair(session_dir):
    built = {}

    def get(family, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key not in built:
            name = "-".join([f"s-{family}"] + [f"{k}{v}" for k, v in sorted(overrides.items())])
            target = make_target(session_dir / name, family, **overrides)
            config = json.loads((target / "config.json").read_text())
            config = config.get("text_config", config)
            hf = write_random_draft(session_dir / f"{name}-draft-hf", config)
            convert(str(hf), str(session_dir / f"{name}-draft"), dtype="float32")
            built[key] = (target, session_dir / f"{name}-draft")
        model, tokenizer = mlx_lm_load(str(built[key][0]))
        return model, tokenizer, load_draft(built[key][1])

    return get


def mlx_lm_tokens(model, prompt, n, **kw):
    gen = generate_step(mx.array(prompt), model, max_tokens=n, **kw)
    return [int(t) for t, _ in zip((t for t, _ in gen), range(n))]


def dflash_tokens(model, draft, prompt, n, **kw):
    out = []
    for cycle in dflash_cycles(model, draft, mx.array(prompt), max_tokens=n, **kw):
        out += cycle.tokens
    return out[:n]


@pytest.mark.parametrize("family", FAMILIES)
def test_repetition_penalty_equals_mlx_lm_every_family(pair, family):
    """Processors see every prompt token, then each emitted token; a one-token prompt too."""
    model, _, draft = pair(family)
    for prompt in (PROMPT, [PROMPT[0]]):
        processors = make_logits_processors(repetition_penalty=3.0, repetition_context_size=20)
        expected = mlx_lm_tokens(model, prompt, 40, logits_processors=processors)
        processors = make_logits_processors(repetition_penalty=3.0, repetition_context_size=20)
        got = dflash_tokens(model, draft, prompt, 40, logits_processors=processors, block_size=6)
        assert got == expected, (family, len(prompt))


def _exact_distribution(model, prompt, prefix, temp, top_k, min_p, processors):
    """float64 probabilities of mlx_lm's sampler after prompt + prefix (processors as
    sequential decoding applies them), from a plain forward of the whole sequence."""
    ids = mx.array([prompt + prefix])
    logits = model(ids)[:, -1]
    for p in processors:
        logits = p(mx.array(prompt + prefix), logits)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    logprobs = apply_min_p(logprobs, min_p)
    logprobs = apply_top_k(logprobs, top_k)
    scaled = np.array((logprobs * (1.0 / temp)).astype(mx.float32), dtype=np.float64)[0]
    e = np.exp(scaled - scaled[np.isfinite(scaled)].max())
    return e / e.sum()


def test_sampled_joint_of_three_tokens_is_exact_bf16_filters_processors(session_dir):
    """Chi-square of tokens 1-3 (filters + repetition penalty, bf16 target and draft)
    against the exact distribution of mlx_lm's sequential sampler."""
    from mlx_lm.models import qwen3

    from dflash_mlx.config import DraftConfig
    from dflash_mlx.drafter import DraftModel

    V, temp, top_k, min_p = 16, 0.8, 4, 0.05
    mx.random.seed(5)
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
    model.lm_head.weight = model.lm_head.weight * 3  # peaked enough that top-k/min-p bite
    model.set_dtype(mx.bfloat16)
    draft = DraftModel(
        DraftConfig.from_dict(
            {
                "block_size": 3,
                "dflash_config": {"mask_token_id": V - 1, "target_layer_ids": [1, 2]},
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
        )
    )
    draft.set_dtype(mx.bfloat16)
    mx.eval(model.parameters(), draft.parameters())
    prompt = [3, 9, 3]

    def processors():
        return make_logits_processors(repetition_penalty=1.8, repetition_context_size=20)

    exact = {}
    p1 = _exact_distribution(model, prompt, [], temp, top_k, min_p, processors())
    for a in np.flatnonzero(p1):
        p2 = _exact_distribution(model, prompt, [int(a)], temp, top_k, min_p, processors())
        for b in np.flatnonzero(p2):
            p3 = _exact_distribution(
                model, prompt, [int(a), int(b)], temp, top_k, min_p, processors()
            )
            for c in np.flatnonzero(p3):
                exact[(int(a), int(b), int(c))] = p1[a] * p2[b] * p3[c]

    n = 1500
    mx.random.seed(11)
    sampling = SamplingParams(temp=temp, top_k=top_k, min_p=min_p)
    counts = Counter()
    for _ in range(n):
        toks = dflash_tokens(
            model, draft, prompt, 3, sampling=sampling, logits_processors=processors()
        )
        counts[tuple(toks)] += 1
    impossible = sum(v for k, v in counts.items() if k not in exact)
    assert impossible == 0, f"{impossible} samples where the exact distribution has none"
    cells = sorted(exact)
    expected = [exact[k] * n for k in cells]
    big = [i for i, e in enumerate(expected) if e >= 5]
    obs = [counts[cells[i]] for i in big] + [n - sum(counts[cells[i]] for i in big)]
    exp = [expected[i] for i in big] + [n - sum(expected[i] for i in big)]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
    assert chi2 < chi2_critical(len(obs) - 1), (chi2, len(obs) - 1)


def _turns(gen, model, tokenizer, cache, draft=None, n1=13, n2=20):
    """Two chat turns on one prompt cache; the second turn's tokens."""
    first = tokenizer.encode("Hello, world! What is")
    second = tokenizer.encode(" the answer? 42.")
    args = (model, draft, tokenizer) if draft is not None else (model, tokenizer)
    list(gen(*args, first, max_tokens=n1, prompt_cache=cache))
    return [r.token for r in gen(*args, second, max_tokens=n2, prompt_cache=cache)]


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text", "qwen3_5"])
def test_prompt_cache_second_turn_equals_mlx_lm(pair, family, tmp_path):
    """Dense, rotating (gemma3's sliding layers wrap at 32) and hybrid targets; the
    cache also survives a save / load between the turns."""
    model, tokenizer, draft = pair(family)
    expected = _turns(mlx_lm_stream_generate, model, tokenizer, mlx_lm_make_prompt_cache(model))
    got = _turns(stream_generate, model, tokenizer, make_prompt_cache(model, draft), draft)
    assert got == expected

    # Turn 1, save, load, turn 2: same as keeping the cache in memory.
    cache = make_prompt_cache(model, draft)
    first = tokenizer.encode("Hello, world! What is")
    list(stream_generate(model, draft, tokenizer, first, max_tokens=13, prompt_cache=cache))
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache, model, draft, {"turn": "1"})
    loaded, meta = load_prompt_cache(str(tmp_path / "c.safetensors"), model, draft)
    assert meta == {"turn": "1"}
    second = tokenizer.encode(" the answer? 42.")
    got = [
        r.token
        for r in stream_generate(
            model, draft, tokenizer, second, max_tokens=20, prompt_cache=loaded
        )
    ]
    assert got == expected


def test_prompt_cache_file_refuses_another_pair(pair, tmp_path):
    model, _, draft = pair("qwen3")
    other, _, _ = pair("qwen3", seed=1)
    cache = make_prompt_cache(model, draft)
    list(stream_generate(model, draft, pair("qwen3")[1], PROMPT, max_tokens=3, prompt_cache=cache))
    path = str(tmp_path / "c.safetensors")
    save_prompt_cache(path, cache, model, draft)
    with pytest.raises(ValueError, match="another target"):
        load_prompt_cache(path, other, draft)
    with pytest.raises(ValueError, match="entries"):
        stream_generate_list = list(
            stream_generate(model, draft, pair("qwen3")[1], PROMPT, prompt_cache=cache[:-1])
        )
        del stream_generate_list


@pytest.mark.parametrize("bits", [4, 8])
def test_kv_bits_equal_mlx_lm(pair, bits):
    """mlx_lm starts quantizing at quantized_kv_start; a block straddling it is split."""
    model, tokenizer, draft = pair("qwen3", head_dim=32)
    kw = {"kv_bits": bits, "kv_group_size": 32, "quantized_kv_start": 14}
    expected = [
        r.token for r in mlx_lm_stream_generate(model, tokenizer, PROMPT, max_tokens=40, **kw)
    ]
    got = [
        r.token
        for r in stream_generate(model, draft, tokenizer, PROMPT, max_tokens=40, block_size=6, **kw)
    ]
    assert got == expected
    # And a second turn on a prompt cache that is quantized by now.
    cache_a, cache_b = mlx_lm_make_prompt_cache(model), make_prompt_cache(model, draft)
    expected = _turns(
        lambda *a, **k: mlx_lm_stream_generate(*a, **k, **kw), model, tokenizer, cache_a
    )
    got = _turns(lambda *a, **k: stream_generate(*a, **k, **kw), model, tokenizer, cache_b, draft)
    assert got == expected


def test_cache_list_that_does_not_match_the_layers_is_a_clear_error(pair):
    model, _, draft = pair("qwen3")
    layers = len(model.layers)
    for n in (layers - 1, layers + 1):
        model.make_cache = lambda n=n: [
            mlx_lm_make_prompt_cache.__globals__["KVCache"]() for _ in range(n)
        ]
        with pytest.raises(ValueError, match="does not match"):
            dflash_tokens(model, draft, PROMPT, 5)
        del model.make_cache
    assert "_dflash_hook" not in model.layers[0].__dict__  # hooks undone after the error


def test_gated_delta_rollback_is_the_verify_state_at_the_accepted_position(pair):
    """After commit(n), every recurrent state equals the state mlx_lm's own layer
    reaches on the prompt followed by those n tokens as one chunk."""
    model, _, draft = pair("qwen3_5")
    block = mx.array([4, 8, 15, 16, 23, 42], dtype=mx.int32)
    for n_keep in (1, 3, 6):
        with VerifySession(model, draft) as session:
            session.prefill(mx.array(PROMPT))
            session.verify(block)
            session.commit(n_keep)
            got = [c.state for c in session.target_cache]
        reference = mlx_lm_make_prompt_cache(model)
        model(mx.array([PROMPT[:-1]]), cache=reference)
        model(mx.array([PROMPT[-1:]]), cache=reference)
        model(block[None, :n_keep], cache=reference)
        for g, r in zip(got, reference):
            if isinstance(g, list):  # ArraysCache: conv state, recurrent state
                assert all(mx.array_equal(a, b).item() for a, b in zip(g, r.state))


def test_draft_context_in_the_cache_buffer_is_bit_identical_to_concatenation(pair):
    """The block's keys/values written after the context and trimmed give exactly what
    concatenating them to the context gave."""
    from dflash_mlx.kernels import block_attention

    _, _, draft = pair("qwen3")
    H = draft.config.hidden_size
    n_taps = len(draft.config.target_layer_ids)
    mx.random.seed(2)
    ctx = mx.random.normal((1, 40, n_taps * H))
    x = mx.random.normal((1, 8, H))
    cache = draft.make_cache()
    for start in (0, 17, 29):  # context arrives in pieces, blocks run in between
        draft.add_context(ctx[:, start : {0: 17, 17: 29, 29: 40}[start]], cache)
        layer = draft.layers[0]
        got = layer.self_attn(layer.input_layernorm(x), draft.rope, cache[0], None)
        # The concatenating formulation, from the layer's own projections.
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        o = cache[0].offset
        q = attn.q_proj(h).reshape(1, 8, attn.n_heads, -1)
        q = draft.rope(attn.q_norm(q).transpose(0, 2, 1, 3), offset=o)
        k, v = attn._kv(h)
        k = mx.concatenate([cache[0].keys[..., :o, :], draft.rope(k, offset=o)], axis=2)
        v = mx.concatenate([cache[0].values[..., :o, :], v], axis=2)
        out = block_attention(q, k, v, scale=attn.scale, causal=attn.causal, window=attn.window)
        want = attn.o_proj(out.transpose(0, 2, 1, 3).reshape(1, 8, -1))
        assert mx.array_equal(got, want).item()
        assert cache[0].offset == o  # the block did not stay


def test_api_errors_are_clear(pair):
    model, tokenizer, draft = pair("qwen3")
    with pytest.raises(ValueError, match="temp="):
        list(stream_generate(model, draft, tokenizer, PROMPT, sampler=make_sampler(temp=0.5)))
    with pytest.raises(ValueError, match="one prompt at a time"):
        list(stream_generate(model, draft, tokenizer, mx.array([PROMPT, PROMPT])))
    with pytest.raises(ValueError, match="finite"):
        list(stream_generate(model, draft, tokenizer, PROMPT, temp=float("nan")))
    with pytest.raises(ValueError, match="token ids"):
        list(stream_generate(model, draft, tokenizer, PROMPT, input_embeddings=mx.zeros((9, 64))))
    with pytest.raises(ValueError, match="block_size"):
        list(stream_generate(model, draft, tokenizer, PROMPT, num_draft_tokens=3))
    # mlx_lm's greedy sampler is what temp=0 means: accepted.
    from mlx_lm.sample_utils import greedy_sampler

    got = [
        r.token
        for r in stream_generate(
            model, draft, tokenizer, PROMPT, max_tokens=5, sampler=greedy_sampler
        )
    ]
    assert got == mlx_lm_tokens(model, PROMPT, 5)


@pytest.mark.parametrize("max_kv_size", [64, 16])
def test_max_kv_size_equals_mlx_lm(pair, max_kv_size):
    """mlx_lm's rotating cache keeps 4 sink tokens when decoding past the window; the
    verify sees exactly that (16: the 49 positions wrap three times). The oracle draft
    gets whole blocks accepted, so every block position is emitted."""
    model, tokenizer, draft = pair("qwen3")
    kw = {"max_tokens": 40, "max_kv_size": max_kv_size}
    expected = list(mlx_lm_stream_generate(model, tokenizer, PROMPT, **kw))
    tokens = [r.token for r in expected]
    oracle = OracleDraft(draft.config, PROMPT + tokens + [0] * 8, [None, 4, 1])
    got = list(stream_generate(model, oracle, tokenizer, PROMPT, block_size=6, **kw))
    assert [r.token for r in got] == tokens
    assert max(r.accepted for r in got) == 5
    # Same logits up to the order of summation over the rotated keys (a dropped sink
    # would move them by whole units).
    err = max(mx.abs(a.logprobs - b.logprobs).max().item() for a, b in zip(got, expected))
    assert err < 1e-4


class DeviceOracleDraft(OracleDraft):
    """OracleDraft with everything on the device, so the compiled cycle can run it: the
    target's own future tokens, the first error at block position errors[p % len] for
    an anchor at position p (None: none). Counts its Python forwards."""

    traceable = True

    def __init__(self, config, reference, errors):
        super().__init__(config, reference + [0] * 64, errors)
        self.table = mx.array(reference + [0] * 64, dtype=mx.int32)
        self.errs = mx.array([-1 if e is None else e for e in errors], dtype=mx.int32)
        self.forwards = 0

    def __call__(self, block, context=None, cache=None, context_window=None):
        self.forwards += 1
        if context is not None:
            self.add_context(context, cache)
        start = cache[0].offset
        at = mx.arange(block.shape[1] - 1)
        proposal = mx.take(self.table, start + 1 + at)
        err = mx.take(self.errs, mx.remainder(start, self.errs.size))
        wrong = mx.remainder(proposal + 1, self.config.vocab_size)
        proposal = mx.where(at == err, wrong, proposal)
        return mx.concatenate([mx.zeros((1,), mx.int32), proposal])[None]


def test_compiled_static_cycle_equals_mlx_lm(pair):
    """Static caches run the whole cycle as one compiled graph: the draft's Python forward
    runs only for the first (eager) call and the trace, yet every accept length occurs
    and the tokens are mlx_lm's. The next generation replays that trace (no Python
    forward at all) and gets them again; a seeded sampled run repeats exactly."""
    model, _, draft = pair("qwen3")
    expected = mlx_lm_tokens(model, PROMPT, 200)
    # errors keyed by position (17 of them): this pattern meets every accept length.
    errors = [0, 1, 4, 4, 0, 5, 3, 5, 1, 3, 3, None, 3, 1, 6, 2, 5]
    oracle = DeviceOracleDraft(draft.config, PROMPT + expected, errors)
    with VerifySession(model, draft) as probe:
        assert probe.can_go_static(len(PROMPT) + 200)
    accepted = []
    for cycle in dflash_cycles(model, oracle, mx.array(PROMPT), max_tokens=200, block_size=8):
        accepted.append(cycle.accepted)
    got = dflash_tokens(model, oracle, PROMPT, 200, block_size=8)
    assert got == expected
    assert len(accepted) > 30 and oracle.forwards == 2  # one eager call, one trace
    assert set(accepted[1:]) == set(range(8))
    sampled = []
    for _ in range(2):
        mx.random.seed(3)
        sampled.append(
            dflash_tokens(model, draft, PROMPT, 40, block_size=4, sampling=SamplingParams(0.8))
        )
    assert sampled[0] == sampled[1]


def test_compiled_cycle_is_traced_again_for_new_weights(pair):
    """The compiled cycle kept on the target serves its next generations only while
    the weights are the ones it captured: after the target loads others, the tokens
    are mlx_lm's for those (a stale graph would give the old model's)."""
    model, _, draft = pair("qwen3")
    before = mlx_lm_tokens(model, PROMPT, 40)
    assert dflash_tokens(model, draft, PROMPT, 40, block_size=8) == before
    saved = tree_flatten(model.parameters())
    try:
        mlp = model.model.layers[0].mlp
        mlp.down_proj.weight = mlp.down_proj.weight * 3.0
        after = mlx_lm_tokens(model, PROMPT, 40)
        assert after != before
        assert dflash_tokens(model, draft, PROMPT, 40, block_size=8) == after
    finally:
        model.load_weights(saved)


def test_compiled_cycles_kept_are_bounded(pair, monkeypatch):
    """At most MAX_COMPILED_CYCLES compiled cycles stay on a target (a server sees many
    sampling settings); one dropped is traced again when needed, losslessly."""
    from dflash_mlx import session as session_module

    model, _, draft = pair("qwen3")
    monkeypatch.setattr(session_module, "MAX_COMPILED_CYCLES", 1)
    expected = mlx_lm_tokens(model, PROMPT, 30)
    for block_size in (8, 4, 8):
        assert dflash_tokens(model, draft, PROMPT, 30, block_size=block_size) == expected
        assert len(model.__dict__["_dflash_compiled_cycles"]) == 1


def test_static_buffers_grow_losslessly(pair, monkeypatch):
    """Static caches grow (and the compiled cycle is traced again) when queued cycles
    would pass their capacity: buffers started at 256 rows grow to 384 within 330
    tokens of mostly accepted blocks."""
    model, _, draft = pair("qwen3")
    expected = mlx_lm_tokens(model, PROMPT, 330)
    oracle = DeviceOracleDraft(draft.config, PROMPT + expected, [None, 6, None, 2])
    go_static = VerifySession.go_static
    capacities, lengths = [], []

    def small(self, positions):
        go_static(self, self.offset + 16)
        capacities.append(self.length.capacity)
        lengths.append(self.length)

    monkeypatch.setattr(VerifySession, "go_static", small)
    got = dflash_tokens(model, oracle, PROMPT, 330, block_size=8)
    assert got == expected
    assert capacities == [256] and lengths[0].capacity == 384 and oracle.forwards == 4


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe"])
def test_general_loop_on_dense_targets_equals_mlx_lm(pair, family, monkeypatch):
    """With static caches off (Metal, the CPU, long contexts on CUDA), dense targets run
    the general loop: greedy and a prompt-cache second turn equal mlx_lm's."""
    from dflash_mlx import session

    monkeypatch.setitem(session.STATIC_MAX_POSITIONS, "cpu", 0)
    model, tokenizer, draft = pair(family)
    with VerifySession(model, draft) as probe:
        assert not probe.can_go_static(64)
    expected = mlx_lm_tokens(model, PROMPT, 64)
    oracle = OracleDraft(draft.config, PROMPT + expected + [0] * 8, [None, 3, 0, 6])
    assert dflash_tokens(model, oracle, PROMPT, 64, block_size=8) == expected
    expected = _turns(mlx_lm_stream_generate, model, tokenizer, mlx_lm_make_prompt_cache(model))
    got = _turns(stream_generate, model, tokenizer, make_prompt_cache(model, draft), draft)
    assert got == expected


def test_static_loop_is_only_chosen_where_measured(pair, monkeypatch):
    """Static caches only on backends (and lengths) where they measured no slower."""
    from dflash_mlx import session

    model, _, draft = pair("qwen3")
    monkeypatch.setitem(session.STATIC_MAX_POSITIONS, "cpu", 100)
    with VerifySession(model, draft) as s:
        assert s.can_go_static(100) and not s.can_go_static(101) and not s.can_go_static(None)
    with VerifySession(model, draft, kv_bits=8) as s:
        assert not s.can_go_static(10)
    monkeypatch.delitem(session.STATIC_MAX_POSITIONS, "cpu")
    with VerifySession(model, draft) as s:
        assert not s.can_go_static(10)


@pytest.mark.parametrize("style", ["dflash", "dflash2"])
def test_drafts_propose_the_same_from_static_buffers(style):
    """The draft's block attention over a static buffer (capacity past the context,
    stale rows where rejected drafts were) proposes what it proposes from a plain cache:
    a wrong mask would only cost acceptance, which no output check would notice."""
    from dflash_mlx.config import DraftConfig
    from dflash_mlx.dflash2 import DFlash2DraftModel
    from dflash_mlx.drafter import DraftModel
    from dflash_mlx.static_cache import Length, StaticKVCache

    raw = {
        "block_size": 8,
        "dflash_config": {"mask_token_id": 63, "target_layer_ids": [0, 1]},
        "num_target_layers": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "vocab_size": 64,
        "rope_theta": 10000.0,
        "layer_types": ["sliding_attention", "full_attention"],
        "sliding_window": 6,
    }
    if style == "dflash2":
        raw["architectures"] = ["DFlash2DraftModel"]
        raw["dflash_config"].update(
            conv_kernel_size=3, conv_group_size=8, selector_rank=4, selector_top_k=5
        )
    config = DraftConfig.from_dict(raw)
    mx.random.seed(3)
    draft = (DFlash2DraftModel if style == "dflash2" else DraftModel)(config)
    embed = mx.random.normal((64, 32))
    draft.bind_head(lambda ids: embed[ids], lambda h: h @ embed.T)
    features = mx.random.normal((1, 37, 64))
    plain = draft.make_cache()
    draft.add_context(features, plain)
    length = Length(37, 256)
    static = [StaticKVCache.from_kv_cache(c, length) for c in plain]
    for c in static:
        h = c.kv.shape[1] // 2  # keys' heads, then values'
        c.kv[:, :h, 37:, :] = 5.0  # stale rows past the length
        c.kv[:, h:, 37:, :] = -5.0
    anchor = mx.array([11], dtype=mx.int32)
    for window in (None, 10):
        want, _ = draft.propose(anchor, plain, 7, SamplingParams(), window)
        got, _ = draft.propose(anchor, static, 7, SamplingParams(), window)
        assert got.tolist() == want.tolist()
        h_plain = draft(mx.array([[11] + [63] * 7]), None, plain, window)
        h_static = draft(mx.array([[11] + [63] * 7]), None, static, window)
        assert mx.allclose(h_plain, h_static, atol=1e-5).item()
    assert length.offset.item() == 37 and plain[0].offset == 37
