"""Lossless on issue 14's targets: Gemma 4 (sliding + full layers, KV shared between
layers, K = V, MoE), Muse Glimmer (gated attention, NoPE full layers, softcapped
logits) and Qwen3.8 (model_type qwen3_5: GatedDeltaNet + full attention, untied head).

Every test compares with mlx_lm's own greedy decoding of the same target."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
from conftest import write_random_draft
from mlx_lm import load as mlx_lm_load
from mlx_lm import stream_generate as mlx_lm_stream_generate
from mlx_lm.models.cache import make_prompt_cache as mlx_lm_make_prompt_cache
from test_generate import OracleDraft, mlx_lm_greedy, run_dflash
from test_session import _turns
from tiny_models import QWEN3_8, make_target

from dflash_mlx import load_draft, make_prompt_cache, stream_generate
from dflash_mlx.convert import convert
from dflash_mlx.generate import dflash_cycles
from dflash_mlx.session import VerifySession
from dflash_mlx.tap import CALLED, bind_caches, tap_hidden_states

N_TOKENS = 64
PROMPT = [5, 17, 42, 7, 99, 3, 61, 28, 11]

# name -> (family, overrides). gemma4_text's windows are 8 and gemma4's 16, so 64
# tokens wrap their rotating caches several times (muse_glimmer's: 12).
TARGETS = {
    "gemma4_text": ("gemma4_text", {}),
    "gemma4": ("gemma4", {}),
    "muse_glimmer": ("muse_glimmer", {}),
    "qwen3_8": ("qwen3_5", QWEN3_8),
}


@pytest.fixture(scope="module")
def pair(session_dir):
    built = {}

    def get(name):
        if name not in built:
            family, overrides = TARGETS[name]
            target = make_target(session_dir / f"nf-{name}", family, **overrides)
            config = json.loads((target / "config.json").read_text())
            hf = write_random_draft(
                session_dir / f"nf-{name}-draft-hf", config.get("text_config", config)
            )
            convert(str(hf), str(session_dir / f"nf-{name}-draft"), dtype="float32")
            built[name] = (target, session_dir / f"nf-{name}-draft")
        target, draft = built[name]
        model, tokenizer = mlx_lm_load(str(target))
        return model, tokenizer, load_draft(draft)

    return get


@pytest.mark.parametrize("name", TARGETS)
def test_greedy_equals_mlx_lm_with_random_draft(pair, name):
    model, _, draft = pair(name)
    expected = mlx_lm_greedy(model, PROMPT, N_TOKENS)
    assert len(set(expected)) >= 16, expected  # varied enough to mean something
    assert run_dflash(model, draft, PROMPT, N_TOKENS) == expected


# gemma4_text with blocks of 12: a block longer than its sliding window (8).
@pytest.mark.parametrize("name, block", [(n, 8) for n in TARGETS] + [("gemma4_text", 12)])
def test_greedy_equals_mlx_lm_with_oracle_draft(pair, name, block):
    """Every accept length 0…block-1: every rollback, rotating caches wrapped."""
    model, _, draft = pair(name)
    n = max(N_TOKENS, (block + 1) * (block + 2) // 2)  # room for one cycle of each length
    expected = mlx_lm_greedy(model, PROMPT, n + block)
    oracle = OracleDraft(draft.config, PROMPT + expected, [None, *range(block - 1)])
    accepted, out = [], []
    for cycle in dflash_cycles(model, oracle, mx.array(PROMPT), max_tokens=n, block_size=block):
        out += cycle.tokens
        accepted.append(cycle.accepted)
    assert out == expected[:n]
    assert set(accepted[1:]) == set(range(block))


@pytest.mark.parametrize("name", TARGETS)
def test_prompt_cache_second_turn_equals_mlx_lm(pair, name):
    model, tokenizer, draft = pair(name)
    expected = _turns(mlx_lm_stream_generate, model, tokenizer, mlx_lm_make_prompt_cache(model))
    got = _turns(stream_generate, model, tokenizer, make_prompt_cache(model, draft), draft)
    assert got == expected


def test_gemma4_shared_kv_layers_have_no_cache_and_are_tapped(pair):
    """The last num_kv_shared_layers layers get no cache (mlx_lm pads the list with
    None) and return (hidden, shared K/V, offset): the session binds the others one to
    one, and the tap of the last (shared) layer, final-normed, is the hidden state the
    model's own logits come from."""
    model, _, draft = pair("gemma4_text")
    n_layers, n_shared = len(model.layers), model.args.num_kv_shared_layers
    ids = mx.array([PROMPT])
    cache = mlx_lm_make_prompt_cache(model)
    assert len(cache) == n_layers - n_shared
    with bind_caches(model.layers, cache) as bound:
        model(ids, cache=cache)
    seen = [[c for c in calls if c is not CALLED] for calls in bound]
    assert seen == [[c] for c in cache] + [[]] * n_shared
    with VerifySession(model, draft) as session:  # the session accepts that binding
        session.prefill(ids[0])
        assert session.offset == len(PROMPT)

    with tap_hidden_states(model, [n_layers - 2, n_layers - 1]) as tap:
        logits = model(ids)
    hidden = tap.features()[..., model.args.hidden_size :]
    softcap = model.args.final_logit_softcapping
    want = mx.tanh(model.model.embed_tokens.as_linear(hidden) / softcap) * softcap
    assert mx.allclose(logits, want, atol=1e-5).item()


# The drafts published for these families, in z-lab's format (written by the PyTorch
# reference): Qwen3.8-27B-DFlash2 and Muse-Glimmer-30B-DFlash2 are DFlash 2 drafts,
# gemma-4-31B-it-DFlash a DFlash draft with the Gemma-4 fields.
@pytest.mark.parametrize(
    "name, style", [("qwen3_8", "dflash2"), ("muse_glimmer", "dflash2"), ("gemma4", "gemma4")]
)
def test_published_draft_styles_are_lossless(pair, session_dir, name, style):
    from reference.checkpoints import write_checkpoint

    model, _, _ = pair(name)
    config = json.loads((session_dir / f"nf-{name}" / "config.json").read_text())
    config = config.get("text_config", config)
    n, V = config["num_hidden_layers"], config["vocab_size"]
    hf = write_checkpoint(
        session_dir / f"nf-{name}-{style}-hf",
        style,
        hidden_size=config["hidden_size"],
        vocab_size=V,
        num_target_layers=n,
        dflash_config={"mask_token_id": V - 1, "target_layer_ids": [1, n - 2], "block_size": 8},
    )
    convert(str(hf), str(session_dir / f"nf-{name}-{style}"), dtype="float32")
    draft = load_draft(session_dir / f"nf-{name}-{style}")
    expected = mlx_lm_greedy(model, PROMPT, N_TOKENS)
    assert run_dflash(model, draft, PROMPT, N_TOKENS) == expected
