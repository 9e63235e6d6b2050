"""The benchmark harness: runs on tiny models, reports every field, and its cycle
breakdown attributes time to the phase that spends it."""

import json
import time

import mlx.core as mx
import pytest
from mlx_lm.models import qwen3
from mlx_lm.tokenizer_utils import TokenizerWrapper

from dflash_mlx import benchmark as bm
from dflash_mlx.config import DraftConfig
from dflash_mlx.drafter import DraftModel


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: 256 byte tokens + <eos> + <mask>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"], vocab["<mask>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    return TokenizerWrapper(fast)


@pytest.fixture(scope="module")
def pair():
    mx.random.seed(0)
    args = qwen3.ModelArgs(
        model_type="qwen3",
        hidden_size=64,
        num_hidden_layers=4,
        intermediate_size=128,
        num_attention_heads=4,
        rms_norm_eps=1e-6,
        vocab_size=258,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        head_dim=16,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    model = qwen3.Model(args)
    config = DraftConfig.from_dict(
        {
            "architectures": ["DFlashDraftModel"],
            "block_size": 4,
            "dflash_config": {"mask_token_id": 257, "target_layer_ids": [1, 2]},
            "num_target_layers": 4,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "vocab_size": 258,
            "rope_theta": 10000.0,
        }
    )
    draft = DraftModel(config)
    mx.eval(model.parameters(), draft.parameters())
    return model, draft, byte_tokenizer()


def test_harness_reports_every_field(pair):
    model, draft, tokenizer = pair
    prompts = [("math", "1 + 1 ="), ("code", "def f(x):")]
    result = bm.benchmark(
        model,
        tokenizer,
        draft,
        prompts,
        baseline_draft=model,  # mlx_lm speculative decoding with the target as its draft
        num_draft_tokens=2,
        max_tokens=8,
        repeats=2,
        contexts=[None, 48],
        breakdown_cycles=3,
    )
    json.dumps(result)  # serialisable
    assert result["settings"]["methods"] == ["target", "baseline", "dflash"]
    assert [e["context"] for e in result["contexts"]] == [None, 48]
    for entry in result["contexts"]:
        if entry["context"]:
            assert all(r["prompt_tokens"] == 48 for r in entry["prompts"])
        b = entry["breakdown"]
        for key in bm.PHASES + ("host", "cycle", "model", "ar_step"):
            assert b[f"{key}_ms"] > 0, key
        assert b["cycle_ms"] == pytest.approx(
            b["draft_ms"] + b["verify_ms"] + b["accept_rollback_ms"], rel=0.5
        )
        assert b["cycle_over_ar"] > 0
        assert set(entry["suites"]) == {"math", "code"}
        for summary in entry["suites"].values():
            for method in ("target", "baseline", "dflash"):
                m = summary[method]
                assert m["prompt_tps"] > 0 and m["generation_tps"] > 0
                assert m["peak_memory_gb"] > 0
            # A draft identical to the target accepts everything it proposes.
            assert summary["baseline"]["tau"] > 1.5
            # (the last round may be shortened by max_tokens)
            assert summary["baseline"]["acceptance_by_position"][0] == 1.0
            d = summary["dflash"]
            assert len(d["acceptance_by_position"]) == 3
            assert 1 <= d["tau"] <= 4
            assert d["speedup"] > 0 and d["ideal_speedup"] > 0 and d["efficiency"] > 0
    assert "acceptance by position" in bm.format_table(result)


def test_acceptance_bookkeeping():
    assert bm.acceptance_by_position([0, 3, 1, 3], 4) == [0.75, 0.5, 0.5]
    # mlx_lm flags after the first token: 2 drafted + 1 target, then 0 + 1, then 1 + 1
    assert bm._runs_from_flags([True, True, False, False, True, False]) == [2, 0, 1]
    assert bm.parse_contexts("1k,4096") == [1024, 4096]
    assert bm.parse_contexts(None) == [None]
    tokenizer = byte_tokenizer()
    assert len(bm.pad_to_context(tokenizer, [1, 2, 3], 40)) == 40
    assert bm.pad_to_context(tokenizer, [1, 2, 3], 40)[-3:] == [1, 2, 3]


def test_slow_draft_shows_in_breakdown(pair, monkeypatch):
    model, draft, _ = pair
    prompt = list(range(20))
    fast = bm.cycle_breakdown(model, draft, prompt, cycles=3, warmup=1)
    forward = DraftModel.__call__

    def slow(self, *args, **kwargs):
        time.sleep(0.05)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(DraftModel, "__call__", slow)
    slowed = bm.cycle_breakdown(model, draft, prompt, cycles=3, warmup=1)
    assert slowed["draft_ms"] - fast["draft_ms"] >= 45
    assert slowed["host_ms"] - fast["host_ms"] >= 45  # the sleep is host time, not model math
    assert abs(slowed["verify_ms"] - fast["verify_ms"]) < 20
    assert abs(slowed["model_ms"] - fast["model_ms"]) < 20


def test_cli_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert bm.main(["--plot", "out.png", "--model", "x", "--draft-model", "y"]) == 1
    assert "matplotlib" in capsys.readouterr().err


def test_cli_rejects_bad_arguments(capsys):
    assert bm.main(["--repeats", "0", "--model", "x", "--draft-model", "y"]) == 1
    assert bm.main(["--suite", "poetry", "--model", "x", "--draft-model", "y"]) == 1
    assert "poetry" in capsys.readouterr().err
