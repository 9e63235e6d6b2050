"""The draft training recipe: block mask, packed forward, loss, checkpoints (tiny models)."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten

from dflash_mlx import load_draft
from dflash_mlx.config import DraftConfig
from dflash_mlx.drafter import DraftModel
from dflash_mlx.train import block_loss, block_mask, main, packed_forward, position_weights

ROOT = Path(__file__).resolve().parent.parent
H, VOCAB, N_TAPS = 32, 64, 2


def tiny_config(block_size=4, layer_types=None, window=None, dflash2=False) -> DraftConfig:
    """A 2-layer draft of width H over a 3-layer target (DFlash, or DFlash 2)."""
    raw = {
        "architectures": ["DFlash2DraftModel" if dflash2 else "DFlashDraftModel"],
        "block_size": block_size,
        "dflash_config": {"mask_token_id": VOCAB - 1, "target_layer_ids": [0, 1]},
        "num_target_layers": 3,
        "hidden_size": H,
        "intermediate_size": 2 * H,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "vocab_size": VOCAB,
        "rope_theta": 10000.0,
    }
    if dflash2:
        raw["dflash_config"].update(
            conv_kernel_size=3, conv_group_size=8, selector_rank=8, selector_top_k=6
        )
    if layer_types:
        raw["layer_types"] = layer_types
        raw["sliding_window"] = window
    return DraftConfig.from_dict(raw)


def tiny_draft(block_size=4, layer_types=None, window=None, seed=0) -> DraftModel:
    mx.random.seed(seed)
    draft = DraftModel(tiny_config(block_size, layer_types, window))
    embed = nn.Embedding(VOCAB, H)
    draft.bind_head(embed, embed.as_linear)
    mx.eval(draft.parameters(), embed.parameters())
    return draft


def train_steps(draft, loss_fn, steps: int) -> list[float]:
    """AdamW (lr 3e-3) on loss_fn(draft)[0]; the loss of every step."""
    opt = optim.AdamW(3e-3)
    vg = nn.value_and_grad(draft, loss_fn)
    losses = []
    for _ in range(steps):
        (loss, _, _), grads = vg(draft)
        opt.update(draft, grads)
        mx.eval(draft.parameters(), opt.state)
        losses.append(loss.item())
    return losses


def test_block_mask_sees_only_own_block_and_earlier_context():
    B, S = 4, 12
    anchors = mx.array([[0, 5, 3], [11, 2, 7]])
    mask = np.array(block_mask(anchors, B, S))[:, 0]
    m = anchors.shape[1]
    for n in range(anchors.shape[0]):
        for j in range(m):
            a = int(anchors[n, j])
            for i in range(B):
                row = mask[n, j * B + i]
                # context: strictly before the anchor, nothing at or after it
                assert row[:S].tolist() == [c < a for c in range(S)]
                # blocks: all of its own (bidirectional), none of any other
                for j2 in range(m):
                    seen = row[S + j2 * B : S + (j2 + 1) * B]
                    assert seen.all() if j2 == j else not seen.any()


def test_sliding_block_mask_is_causal_within_window():
    B, S, W = 4, 10, 3
    anchors = mx.array([[6, 2]])
    mask = np.array(block_mask(anchors, B, S, causal=True, window=W))[0, 0]
    for j, a in enumerate([6, 2]):
        for i in range(B):
            p = a + i
            row = mask[j * B + i]
            assert row[:S].tolist() == [c < a and p - W < c for c in range(S)]
            own = row[S + j * B : S + (j + 1) * B]
            assert own.tolist() == [p - W < a + k <= p for k in range(B)]
            other = row[S + (1 - j) * B : S + (2 - j) * B]
            assert not other.any()


@pytest.mark.parametrize("sliding", [False, True])
def test_packed_forward_equals_inference_forward(sliding):
    B, S = 4, 14
    layer_types = ["sliding_attention", "full_attention"] if sliding else None
    draft = tiny_draft(B, layer_types, window=5 if sliding else None)
    mx.random.seed(1)
    context = mx.random.normal((1, S, N_TAPS * H))
    tokens = mx.random.randint(0, VOCAB - 1, (1, S + B))
    anchor_list = [0, 9, 3, 13]
    anchors = mx.array([anchor_list])
    ids = [[int(tokens[0, a])] + [draft.mask_token_id] * (B - 1) for a in anchor_list]
    embeds = draft.embed(mx.array([[t for block in ids for t in block]]))
    packed = packed_forward(draft, embeds, context, anchors)
    for j, a in enumerate(anchor_list):
        # Inference: a fresh cache holding the context before the anchor, then the block.
        ref = draft(mx.array([ids[j]]), context[:, :a])
        got = packed[:, j * B : (j + 1) * B]
        assert mx.allclose(got, ref, atol=1e-5, rtol=1e-4).item(), (j, a)


def test_position_weights_follow_paper():
    w = np.array(position_weights(16, 7.0))
    assert w.shape == (15,)
    assert np.allclose(w, np.exp(-np.arange(15) / 7.0))


def test_few_steps_reduce_loss():
    B, T, m = 4, 24, 4
    draft = tiny_draft(B)
    mx.random.seed(2)
    # A learnable pattern: the token sequence repeats with period 5.
    base = mx.random.randint(0, VOCAB - 1, (5,))
    tokens = mx.tile(base, (2, T // 5 + 1))[:, :T]
    context = mx.random.normal((2, T, N_TAPS * H))
    anchors = mx.array([[2, 7, 11, 15], [4, 9, 13, 18]])
    lengths = mx.array([T, T])
    valid = mx.ones((2, m))
    weights = position_weights(B, 4.0)

    def loss_fn(model):
        return block_loss(model, tokens, lengths, context, anchors, valid, weights)

    losses = train_steps(draft, loss_fn, 15)
    assert losses[-1] < 0.7 * losses[0], losses


def _tiny_target(path: Path) -> Path:
    """A random 3-layer Qwen3 target with a word-level tokenizer that has a mask token."""
    from mlx_lm.models import qwen3
    from mlx_lm.utils import save_config, save_model
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|endoftext|>", "<|mask|>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    config = {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "hidden_size": H,
        "num_hidden_layers": 3,
        "intermediate_size": 2 * H,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "rms_norm_eps": 1e-6,
        "vocab_size": VOCAB,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "eos_token_id": 0,
    }
    mx.random.seed(3)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model)
    save_config(config, path / "config.json")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"})
    )
    return path


def test_train_cli_checkpoint_resume_and_convert(tmp_path, capsys):
    target = _tiny_target(tmp_path / "target")
    rng = np.random.default_rng(0)
    data = tmp_path / "data.jsonl"
    with open(data, "w") as f:
        for _ in range(8):
            f.write(json.dumps({"prompt": " ".join(f"w{i}" for i in rng.integers(2, 60, 6))}))
            f.write("\n")
        f.write(json.dumps({"text": " ".join(f"w{i}" for i in range(2, 40))}) + "\n")
    out = tmp_path / "draft"
    common = [
        "--model", str(target), "--data", str(data), "--out", str(out),
        "--block-size", "4", "--num-layers", "1", "--target-layer-ids", "0,2",
        "--gen-max-tokens", "16", "--seq-len", "32", "--batch-size", "4",
        "--blocks-per-seq", "3", "--save-every", "4", "--no-progress",
    ]  # fmt: skip
    assert main(common + ["--steps", "4"]) == 0
    printed = capsys.readouterr().out
    assert "1 layer," in printed  # not "1 layers"
    assert "[data] dropped 1 of 9 records" not in printed  # every record has a response
    state = json.loads((out / "train_state" / "state.json").read_text())
    assert state["step"] == 4
    # --resume continues the saved draft: flags for another draft are refused.
    assert main(common + ["--steps", "6", "--resume", "--num-layers", "2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --resume:"), err
    assert "num_hidden_layers=1" in err[0] and "num_hidden_layers=2" in err[0]
    assert main(common + ["--steps", "6", "--resume", "--eval-data", str(data),
                          "--eval-max-tokens", "8", "--eval-limit", "2"]) == 0  # fmt: skip
    result = json.loads((out / "train_result.json").read_text())
    assert json.loads((out / "train_state" / "state.json").read_text())["step"] == 6
    assert result["eval"]["tau"] >= 1.0
    assert len(result["eval"]["per_position_acceptance"]) == 3

    # The checkpoint is in the published layout: load_draft reads it and convert.py too.
    saved = mx.load(str(out / "model.safetensors"))
    assert not any(k.startswith(("model.", "embed_tokens", "lm_head")) for k in saved)
    assert "fc.weight" in saved and "layers.0.self_attn.q_proj.weight" in saved
    draft = load_draft(out)
    assert draft.config.block_size == 4 and draft.config.target_layer_ids == [0, 2]
    conv = tmp_path / "converted"
    subprocess.run(
        [sys.executable, str(ROOT / "convert.py"), "--hf-path", str(out), "--mlx-path", str(conv)],
        check=True,
        cwd=ROOT,
    )
    round_trip = dict(tree_flatten(load_draft(conv).parameters()))
    for k, v in tree_flatten(draft.parameters()):
        assert mx.array_equal(round_trip[k], v).item(), k


def test_bad_flags_fail_before_loading_anything(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("mlx_lm.load", lambda *a, **k: pytest.fail("loaded the target"))
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "w1 w2"}\n')
    base = ["--model", "m", "--data", str(data), "--out", str(tmp_path / "out")]
    for args, message in (
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--steps", "0"], "--steps must be positive"),
        (["--block-size", "1"], "--block-size must be >= 2"),
        (["--lr", "nan"], "--lr must be a number >= 0"),
        (["--warmup", "1.5"], "--warmup is a fraction"),
        (["--out", "/proc/dflash-draft"], "cannot write /proc/dflash-draft/config.json"),
        (["--out", str(data)], "is a file, not a directory"),
        (["--data", str(tmp_path / "none.jsonl")], "no such file"),
        (["--eval-data", str(tmp_path / "none.jsonl")], "no such file"),
    ):
        assert main(base + args) == 1, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_moving_average_follows_the_recent_loss():
    from dflash_mlx.train import MovingAverage

    avg = MovingAverage(0.95)
    assert avg.update(8.0) == 8.0  # no pull towards zero at the start
    for _ in range(40):
        value = avg.update(3.6)
    assert abs(value - 3.6) < 0.05  # what the steps now show (no pull towards the first step)


def test_dropped_and_truncated_records_are_reported(capsys):
    from dflash_mlx import demo, load
    from dflash_mlx.train import build_sequences

    model, tokenizer = load(str(demo.TARGET))
    records = [{"text": "x"}, {"text": "def f(x):\n    return x\n" * 20}, {"text": "a = 1\n"}]
    seqs = build_sequences(
        model, tokenizer, records, max_new_tokens=4, temp=0.0, batch_size=2, seq_len=32,
        cache_file=None, seed=0,
    )  # fmt: skip
    assert len(seqs) == 2 and max(len(ids) for ids, _ in seqs) == 32
    out = capsys.readouterr().out
    assert "[data] dropped 1 of 3 records: fewer than 2 response tokens" in out
    assert "[data] 1 of 3 records cut to --seq-len 32 tokens" in out


def test_epoch_batches_bucket_by_length_and_cover_every_sequence_once():
    from dflash_mlx.train import BUCKET_BATCHES, epoch_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(100, 5000, 1000)
    batches = epoch_batches(lengths, 8, seed=3, epoch=1)
    assert len(batches) == 1000 // 8 and all(len(b) == 8 for b in batches)
    seen = np.concatenate(batches)
    assert len(set(seen.tolist())) == len(seen)  # each sequence at most once per epoch
    # A batch holds sequences of similar length: far less spread than random batches.
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    random_spread = np.mean(
        [np.ptp(lengths[rng.choice(1000, 8, replace=False)]) for _ in range(len(batches))]
    )
    assert spread < random_spread / 4, (spread, random_spread)
    # Deterministic in (seed, epoch), another order for another epoch.
    again = epoch_batches(lengths, 8, seed=3, epoch=1)
    assert all((a == b).all() for a, b in zip(batches, again))
    other = epoch_batches(lengths, 8, seed=3, epoch=2)
    assert any((a != b).any() for a, b in zip(batches, other))
    assert BUCKET_BATCHES > 1


def test_sample_batch_pads_to_the_batch_not_to_seq_len():
    from dflash_mlx.train import PAD_MULTIPLE, sample_batch

    seqs = [(list(range(2, 2 + n)), n - 40) for n in (300, 700, 650)]
    rng = np.random.default_rng(0)
    tokens, lengths, anchors, _ = sample_batch(seqs, np.array([1, 2]), rng, 2, 4608, 8, 1)
    assert tokens.shape == (2, 2 * PAD_MULTIPLE) and lengths.tolist() == [700, 650]
    assert (tokens[1, 650:] == 1).all()  # padding
    for row, (ids, start) in enumerate([seqs[1], seqs[2]]):  # anchors in the response
        assert (anchors[row] >= start).all() and (anchors[row] < len(ids) - 1).all()
    tokens, *_ = sample_batch(seqs, np.array([0, 0]), rng, 2, 4608, 8, 1)
    assert tokens.shape == (2, PAD_MULTIPLE)
    # Never wider than --seq-len (which no sequence exceeds).
    tokens, *_ = sample_batch([(list(range(590)), 500)], np.array([0]), rng, 1, 600, 8, 1)
    assert tokens.shape == (1, 600)


def test_long_prompts_lose_their_oldest_tokens_first(capsys):
    from dflash_mlx import demo, load
    from dflash_mlx.train import build_sequences

    model, tokenizer = load(str(demo.TARGET))
    long_prompt = "x = 1\n" * 200  # 600 tokens or so
    records = [{"prompt": long_prompt, "response": "y = 2\n" * 10}]
    (ids, start), = build_sequences(
        model, tokenizer, records, max_new_tokens=4, temp=0.0, batch_size=1, seq_len=128,
        cache_file=None, seed=0,
    )  # fmt: skip
    response = tokenizer.encode("y = 2\n" * 10, add_special_tokens=False)
    assert len(ids) == 128 and ids[start:] == response  # the response whole
    assert ids[:start] == tokenizer.encode(long_prompt)[-start:]  # the prompt's end
    assert "1 of 1 records cut to --seq-len 128 tokens" in capsys.readouterr().out


def test_demo_prompt_files_long_windows(tmp_path):
    """train_target.py's long prompts: whole lines, lengths in the range asked for in
    tokens; long eval texts at least the length asked for, and apart when they fit."""
    sys.path.insert(0, str(ROOT / "examples"))
    import random

    from train_target import EOS, LineStream, build_tokenizer, eval_long_prompts, long_prompts

    rng = random.Random(0)
    files = [
        "".join(f"def f{i}_{j}(x):\n    return x * {rng.randint(0, 999)}\n" for j in range(60))
        for i in range(12)
    ]
    tok = build_tokenizer(files, 300)
    stream = LineStream(files, tok)
    prompts = long_prompts(stream, 40, 50, 400, random.Random(1))
    for p in prompts:
        n = len(tok.encode(p).ids)
        assert 45 <= n <= 420, n  # within a line of the length drawn
        assert p.endswith("\n") and p in stream.text  # whole lines of the stream
        at = stream.text.index(p)
        assert at == 0 or stream.text[at - 1] == "\n" or stream.text[at - len(EOS) : at] == EOS
    # Files long enough: one text each, a file's first lines.
    size = min(len(tok.encode(f).ids) for f in files)
    windows = eval_long_prompts(files, 3, size - 20, tok)
    assert len(windows) == 3
    for w in windows:
        assert len(tok.encode(w).ids) >= size - 20 and EOS not in w
        assert any(f.startswith(w) for f in files)
    # Longer than any file: windows of the joined split, apart where it has room.
    windows = eval_long_prompts(files, 3, 2 * size, tok)
    assert all(len(tok.encode(w).ids) >= 2 * size for w in windows)
    starts = sorted(stream.text.index(w) for w in windows)
    assert all(b - a >= len(w) for a, b, w in zip(starts, starts[1:], windows))
