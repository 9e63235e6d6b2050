"""DFlash generation is lossless: token for token what mlx_lm generates, for every family."""

import json
import subprocess
import sys
from collections import Counter

import mlx.core as mx
import pytest
from conftest import ROOT, write_random_draft
from mlx import nn
from mlx_lm import load as mlx_lm_load
from mlx_lm import stream_generate as mlx_lm_stream_generate
from mlx_lm.generate import generate_step
from tiny_models import FAMILIES, make_target

from dflash_mlx import fuse, load_draft
from dflash_mlx.convert import convert
from dflash_mlx.drafter import DraftModel
from dflash_mlx.generate import dflash_cycles, stream_generate

N_TOKENS = 128
PROMPT = [5, 17, 42, 7, 99, 3, 61, 28, 11]


@pytest.fixture(scope="module")
def pairs(session_dir):
    """Per family: (target dir, converted random draft dir), built once."""
    built = {}

    def get(family, quantize_bits=None):
        key = (family, quantize_bits)
        if key not in built:
            name = f"{family}-q{quantize_bits}" if quantize_bits else family
            target = make_target(session_dir / name, family, quantize_bits=quantize_bits)
            config = json.loads((target / "config.json").read_text())
            config = config.get("text_config", config)
            hf = write_random_draft(session_dir / f"{name}-draft-hf", config)
            convert(str(hf), str(session_dir / f"{name}-draft"), dtype="float32")
            built[key] = (target, session_dir / f"{name}-draft")
        return built[key]

    return get


def mlx_lm_greedy(model, prompt, n):
    return [
        int(t) for t, _ in zip((t for t, _ in generate_step(mx.array(prompt), model)), range(n))
    ]


class OracleDraft(DraftModel):
    """Proposes the target's own future tokens, wrong at chosen block positions.

    Cycle c makes its first error at block position `errors[c % len(errors)]` (None: no
    error), so every accept length 0…B-1 and full acceptance occur.
    """

    traceable = False  # scripted on the host: the loop runs it eagerly

    def __init__(self, config, reference, errors):
        super().__init__(config)
        self.reference, self.errors, self.cycle = reference, errors, 0

    def __call__(self, block, context=None, cache=None, context_window=None):
        if context is not None:
            self.add_context(context, cache)
        start = cache[0].offset  # absolute position of the anchor
        L = block.shape[1]
        proposal = list(self.reference[start + 1 : start + L])
        proposal += [0] * (L - 1 - len(proposal))
        err = self.errors[self.cycle % len(self.errors)]
        self.cycle += 1
        if err is not None and err < len(proposal):
            proposal[err] = (proposal[err] + 1) % self.config.vocab_size
        return mx.array([[0] + proposal])

    def logits(self, proposal):
        return mx.eye(self.config.vocab_size)[proposal] * 30.0


def run_dflash(model, draft, prompt, n, **kw):
    out = []
    for cycle in dflash_cycles(model, draft, mx.array(prompt), max_tokens=n, **kw):
        out += cycle.tokens
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_mlx_lm_with_random_draft(pairs, family):
    target_dir, draft_dir = pairs(family)
    model, _ = mlx_lm_load(str(target_dir))
    draft = load_draft(draft_dir)
    expected = mlx_lm_greedy(model, PROMPT, N_TOKENS)
    assert run_dflash(model, draft, PROMPT, N_TOKENS) == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_mlx_lm_with_oracle_draft(pairs, family):
    target_dir, draft_dir = pairs(family)
    model, _ = mlx_lm_load(str(target_dir))
    B = 8
    expected = mlx_lm_greedy(model, PROMPT, N_TOKENS + B)
    draft = OracleDraft(load_draft(draft_dir).config, PROMPT + expected, [None, *range(B - 1)])
    accepted = []
    out = []
    for cycle in dflash_cycles(model, draft, mx.array(PROMPT), max_tokens=N_TOKENS, block_size=B):
        out += cycle.tokens
        accepted.append(cycle.accepted)
    assert out == expected[:N_TOKENS]
    # Every accept length 0…B-2 and full acceptance (B-1) happened: all rollbacks ran.
    assert set(accepted[1:]) == set(range(B))


def oracle_run(pairs, family, bits, B=8):
    """(model, draft dir, mlx_lm's tokens, DFlash's with an oracle draft of errors at
    positions 2, 0, 5 and none)."""
    target_dir, draft_dir = pairs(family, quantize_bits=bits)
    model, _ = mlx_lm_load(str(target_dir))
    expected = mlx_lm_greedy(model, PROMPT, N_TOKENS + B)
    draft = OracleDraft(load_draft(draft_dir).config, PROMPT + expected, [None, 2, 0, 5])
    return model, draft_dir, expected, run_dflash(model, draft, PROMPT, N_TOKENS, block_size=B)


@pytest.mark.parametrize("family, bits", [("qwen3", 4), ("qwen3_next", 8), ("gpt_oss", 4)])
def test_quantized_target(pairs, family, bits):
    _, _, expected, out = oracle_run(pairs, family, bits)
    assert out == expected[:N_TOKENS]


@pytest.mark.parametrize(
    "family, bits", [("llama", None), ("qwen2", None), ("qwen3", None), ("qwen3", 4)]
)
def test_greedy_equals_mlx_lm_with_fused_verify(pairs, fused_on_cpu, family, bits):
    B = 8
    # Host-scripted drafts with every accept length (eager cycles) ...
    model, draft_dir, expected, out = oracle_run(pairs, family, bits, B)
    assert out == expected[:N_TOKENS]
    # The target's fused products are verify-width; the draft's are its blocks and its
    # cycles' context rows (fuse.draft_rows), never the prompt's.
    target = {id(g) for g in fuse.groups(model)}
    owners = Counter(id(g) in target for g, _ in fused_on_cpu)
    assert owners[True] and owners[False]
    assert all(s[-2] == B for g, s in fused_on_cpu if id(g) in target)
    assert all(s[-2] <= B for g, s in fused_on_cpu if id(g) not in target)
    # ... and the compiled static cycle.
    fused_on_cpu.clear()
    assert run_dflash(model, load_draft(draft_dir), PROMPT, N_TOKENS) == expected[:N_TOKENS]
    assert fused_on_cpu  # traced once; the replays run the recorded graph
    # Outside a session the model decodes as before, on the fused arrays' views.
    assert mlx_lm_greedy(model, PROMPT, N_TOKENS + B) == expected
    assert type(model.layers[0].self_attn.q_proj) in (nn.Linear, nn.QuantizedLinear)


def mlx_lm_responses(model, tokenizer, prompt, **kw):
    return [
        (r.text, r.token, r.finish_reason)
        for r in mlx_lm_stream_generate(model, tokenizer, prompt, **kw)
    ]


def test_stopping_matches_mlx_lm(pairs):
    """EOS inside an accepted block and max_tokens mid-block stop exactly where mlx_lm does."""
    target_dir, draft_dir = pairs("qwen3")
    model, tokenizer = mlx_lm_load(str(target_dir))
    B = 8
    future = mlx_lm_greedy(model, PROMPT, 64)
    draft = OracleDraft(load_draft(draft_dir).config, PROMPT + future, [None])
    # max_tokens that is not a multiple of the block.
    for max_tokens in (1, 2, 13):
        got = [
            (r.text, r.token, r.finish_reason)
            for r in stream_generate(
                model, draft, tokenizer, PROMPT, max_tokens=max_tokens, block_size=B
            )
        ]
        assert got == mlx_lm_responses(model, tokenizer, PROMPT, max_tokens=max_tokens)
    # A token generated mid-block becomes an EOS: nothing after it is emitted.
    eos = future[11]
    tokenizer.add_eos_token(tokenizer.convert_ids_to_tokens(eos))
    first = future.index(eos)
    got = [
        (r.text, r.token, r.finish_reason)
        for r in stream_generate(model, draft, tokenizer, PROMPT, max_tokens=64, block_size=B)
    ]
    assert got == mlx_lm_responses(model, tokenizer, PROMPT, max_tokens=64)
    assert got[-1][1] == eos and got[-1][2] == "stop" and len(got) == first + 1


def test_sampling_seeded_runs_reproduce(pairs):
    target_dir, draft_dir = pairs("qwen3")
    model, tokenizer = mlx_lm_load(str(target_dir))
    draft = load_draft(draft_dir)

    def sample():
        mx.random.seed(7)
        return [
            r.token
            for r in stream_generate(
                model, draft, tokenizer, PROMPT, max_tokens=24, temp=0.8, top_p=0.9
            )
        ]

    assert sample() == sample()


def test_response_fields_and_acceptance(pairs):
    target_dir, draft_dir = pairs("llama")
    model, tokenizer = mlx_lm_load(str(target_dir))
    B = 8
    future = mlx_lm_greedy(model, PROMPT, 64)
    draft = OracleDraft(load_draft(draft_dir).config, PROMPT + future, [None])
    responses = list(stream_generate(model, draft, tokenizer, PROMPT, max_tokens=33, block_size=B))
    last = responses[-1]
    assert last.generation_tokens == 33 and last.finish_reason == "length"
    assert last.prompt_tokens == len(PROMPT) and last.peak_memory > 0
    # 1 prefill token, then full blocks of B tokens: tau == B.
    assert last.acceptance_length == pytest.approx(B)
    assert [r.from_draft for r in responses[1 : B + 1]] == [True] * (B - 1) + [False]
    assert responses[0].logprobs.shape == (model.args.vocab_size,)


def test_mismatched_pair_is_a_clear_error(pairs, tmp_path):
    target_dir, _ = pairs("qwen3")
    model, _ = mlx_lm_load(str(target_dir))
    config = json.loads((target_dir / "config.json").read_text())
    bad = dict(config, num_hidden_layers=config["num_hidden_layers"] + 2)
    draft = load_draft(write_random_draft(tmp_path / "bad", bad))
    with pytest.raises(ValueError, match="target layers"):
        run_dflash(model, draft, PROMPT, 4)


def test_speculative_sampling_reproduces_target_distribution(session_dir):
    """Chi-square: tokens 1-3 from DFlash sampling vs the target's exact distribution."""
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
    draft = DraftModel(
        DraftConfig.from_dict(
            {
                "block_size": 4,
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
    mx.eval(draft.parameters())
    prompt = [1, 2, 3]

    # Exact joint of the first three tokens under the target alone.
    def probs(seqs):
        logits = model(mx.array(seqs))[:, -1]
        return mx.softmax(logits / temp, axis=-1)

    p1 = probs([prompt])[0]
    pairs12 = [[*prompt, a, b] for a in range(V) for b in range(V)]
    p2 = probs([[*prompt, a] for a in range(V)])  # [V, V]
    p3 = probs(pairs12).reshape(V, V, V)
    exact = (p1[:, None, None] * p2[:, :, None] * p3).reshape(-1)

    from dflash_mlx.sampling import SamplingParams

    n = 800
    mx.random.seed(11)
    counts = Counter()
    for _ in range(n):
        toks = run_dflash(model, draft, prompt, 3, sampling=SamplingParams(temp=temp))
        counts[toks[0] * V * V + toks[1] * V + toks[2]] += 1
    expected = [float(e) * n for e in exact.tolist()]
    # Pool cells expected < 5 into one bin.
    big = [i for i, e in enumerate(expected) if e >= 5]
    obs = [counts[i] for i in big] + [n - sum(counts[i] for i in big)]
    exp = [expected[i] for i in big] + [n - sum(expected[i] for i in big)]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(obs, exp) if e > 0)
    df = len(obs) - 1
    assert chi2 < chi2_critical(df), (chi2, df)


def chi2_critical(df, z=3.09):
    """Wilson-Hilferty approximation of the 99.9% quantile of chi-square(df)."""
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


def run_cli(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "dflash_mlx.generate", *args],
        capture_output=True,
        text=True,
        input=stdin,
        cwd=ROOT,
        timeout=300,
        check=False,
    )


def test_cli_end_to_end(pairs):
    target_dir, draft_dir = pairs("qwen3")
    result = run_cli(
        "--model",
        str(target_dir),
        "--draft-model",
        str(draft_dir),
        "-p",
        "hello world",
        "-m",
        "20",
        "--block-size",
        "4",
    )
    assert result.returncode == 0, result.stderr
    assert "Generation: 20 tokens" in result.stdout
    assert "Acceptance length (tau)" in result.stdout
    result = run_cli(
        "--model",
        str(target_dir),
        "--draft-model",
        str(draft_dir),
        "-p",
        "-",
        "-m",
        "5",
        "--ignore-chat-template",
        stdin="from stdin",
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temp", "-1"], "--temp"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--block-size", "0"], "--block-size"),
        (["--chat-template-config", "{oops"], "not valid JSON"),
        (["--draft-model", "/nonexistent/draft"], "no such directory"),
    ],
)
def test_cli_bad_arguments(pairs, capsys, args, message):
    from dflash_mlx.generate import main

    target_dir, draft_dir = pairs("qwen3")
    base = {"--model": str(target_dir), "--draft-model": str(draft_dir)}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    assert main([*[x for kv in base.items() for x in kv], "-p", "hi"]) == 1
    assert message in capsys.readouterr().err


def test_cli_bad_argument_exits_nonzero(pairs):
    target_dir, _ = pairs("qwen3")
    result = run_cli("--model", str(target_dir), "--draft-model", "/nonexistent", "-p", "hi")
    assert result.returncode == 1 and "no such directory" in result.stderr
    result = run_cli("--max-tokens", "lots")
    assert result.returncode == 2 and "invalid int value" in result.stderr


def test_logits_processors_match_mlx_lm(pairs):
    from mlx_lm.sample_utils import make_logits_processors

    target_dir, draft_dir = pairs("qwen3")
    model, _ = mlx_lm_load(str(target_dir))
    processors = make_logits_processors(repetition_penalty=1.5, repetition_context_size=8)
    gen = generate_step(mx.array(PROMPT), model, logits_processors=processors)
    expected = [int(t) for t, _ in zip((t for t, _ in gen), range(72))]
    B = 8
    draft = OracleDraft(load_draft(draft_dir).config, PROMPT + expected, [None, 3, 0, 6])
    got = run_dflash(model, draft, PROMPT, 64, block_size=B, logits_processors=processors)
    assert got == expected[:64]


def test_draft_window_keeps_output_lossless(pairs):
    """Bounding the draft's context changes only what it proposes, never the output."""
    target_dir, draft_dir = pairs("qwen3_5")
    model, _ = mlx_lm_load(str(target_dir))
    expected = mlx_lm_greedy(model, PROMPT, 48)
    draft = load_draft(draft_dir)
    assert run_dflash(model, draft, PROMPT, 48, draft_window=4) == expected
