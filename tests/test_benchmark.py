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
    table = bm.format_table(result)
    for suite in ("math", "code"):  # every suite's acceptance, named
        assert f"acceptance by block position, {suite}:" in table
    assert "eff can exceed 1" in table


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


def test_cli_rejects_bad_arguments_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("dflash_mlx.loading.load", lambda *a, **k: pytest.fail("loaded"))
    for args, message in (
        (["--max-prompts", "-1"], "--max-prompts must be positive"),
        (["--breakdown-cycles", "0"], "--breakdown-cycles must be positive"),
        (["--json", "/proc/no/such/dir/out.json"], "cannot write"),
        (["--json", str(tmp_path)], "is a directory"),
        (["--prompts", str(tmp_path / "none.jsonl")], "no such file"),
        (["--model", "x"], "--model needs --draft-model"),
    ):
        assert bm.main(args) == 1, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)


def test_ctrl_c_keeps_the_finished_prompts(pair, monkeypatch):
    model, draft, tokenizer = pair
    real, calls = bm.run_dflash, []

    def interrupted_on_the_second_prompt(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # warm-up, first prompt, then Ctrl-C
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(bm, "run_dflash", interrupted_on_the_second_prompt)
    prompts = [("math", "1 + 1 ="), ("code", "def f(x):"), ("chat", "hi")]
    result = bm.benchmark(
        model, tokenizer, draft, prompts, max_tokens=6, repeats=1, breakdown=False
    )
    assert result["interrupted"] is True
    (entry,) = result["contexts"]
    assert [r["suite"] for r in entry["prompts"]] == ["math"]
    assert set(entry["suites"]) == {"math"}
    assert "interrupted: partial results (1 prompt(s) finished)" in bm.format_table(result)


def test_progress_names_every_phase(pair):
    import io

    from dflash_mlx.progress import Progress

    model, draft, tokenizer = pair
    out = io.StringIO()
    progress = Progress(0, "benchmark", file=out, interval=0.0)
    bm.benchmark(
        model,
        tokenizer,
        draft,
        [("math", "1 + 1 ="), ("code", "def f(x):")],
        max_tokens=4,
        repeats=2,
        breakdown_cycles=2,
        progress=progress,
    )
    progress.close()
    text = out.getvalue()
    total = 2 * (1 + 2 * 2) + 1  # methods x (warm-up + prompts x repeats) + breakdown
    for phase in (
        "warm-up, target",
        "warm-up, dflash",
        "prompt 1/2 (math",
        "prompt 2/2 (code",
        "dflash, repeat 2/2",
        "cycle breakdown",
        f"{total}/{total}",
        "ETA",
    ):
        assert phase in text, phase


def test_plot_panels_title_and_single_point():
    result = {
        "settings": {
            "model": "/m/Qwen3-8B",
            "draft_model": "/d/qwen3-8b-dflash",
            "dtype": "bfloat16",
            "block_size": 16,
            "device": "Device(gpu, 0)",
            "device_name": "NVIDIA H200",
            "max_tokens": 64,
            "methods": ["target", "dflash"],
        },
        "contexts": [
            {
                "context": None,
                "suites": {"math": {"dflash": {"acceptance_by_position": [0.9, 0.5]}}},
                "prompts": [
                    {"prompt_tokens": 30, "target": {"generation_tps": 10.0},
                     "dflash": {"generation_tps": 20.0}},
                ],
            }
        ],
    }  # fmt: skip
    panels = bm.plot_panels(result)
    for part in ("Qwen3-8B", "qwen3-8b-dflash", "bfloat16", "block 16", "gpu (NVIDIA H200)"):
        assert part in panels["title"], part
    assert panels["acceptance"] == {"math": [0.9, 0.5]}
    assert "speed" not in panels  # one context: no speed-vs-context curve
    result["contexts"].append({**result["contexts"][0], "context": 4096})
    assert panels_speed(bm.plot_panels(result)) == {"target": [30, 4096], "dflash": [30, 4096]}


def panels_speed(panels):
    return {m: [x for x, _ in points] for m, points in panels["speed"].items()}


def test_demo_pair_defaults_to_its_own_prompts(tmp_path, capsys):
    from dflash_mlx import demo

    out = tmp_path / "result.json"
    args = ["--max-prompts", "1", "-m", "4", "--repeats", "1", "--warmup", "0"]
    assert bm.main([*args, "--no-breakdown", "--no-progress", "--json", str(out)]) == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["prompts"] == str(demo.EVAL_PROMPTS)  # Python prompts for a Python model
    assert settings["dtype"] == "bfloat16"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_progress_line_eta_and_log_throttling():
    import io

    from dflash_mlx.progress import Progress, format_duration

    now = [0.0]
    out = io.StringIO()  # not a terminal: new lines, at most one per interval
    progress = Progress(10, "train", file=out, interval=5.0, clock=lambda: now[0])
    now[0] = 4.0
    progress.update(2, "loss 3.100")  # 2 s per step so far: 8 steps left, 16 s
    now[0] = 6.0
    progress.update(1)  # within the interval: not printed
    now[0] = 10.0
    progress.update(1)  # 2.5 s per step: 15 s left
    progress.close()  # the same line again is not repeated
    assert out.getvalue().splitlines() == [
        "train  2/10  4s elapsed  ETA 16s  loss 3.100",
        "train  4/10  10s elapsed  ETA 15s  loss 3.100",
    ]
    assert [format_duration(s) for s in (12.4, 95, 3725)] == ["12s", "1m35s", "1h02m"]
