"""Training DFlash 2 drafts (`dflash-mlx train --arch dflash2`), on tiny models.

The expectations are independent of the training code: the inference model
(dflash_mlx/dflash2.py, checked against the PyTorch reference in test_dflash2.py), the
DFlash draft a fresh DFlash 2 draft must equal, the reference's strict loader, and
mlx_lm's own greedy decoding.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten
from test_train import N_TAPS, VOCAB, H, train_steps
from test_train import tiny_config as shared_tiny_config

from dflash_mlx import load_draft
from dflash_mlx.config import DraftConfig
from dflash_mlx.dflash2 import DFlash2DraftModel
from dflash_mlx.drafter import DraftModel
from dflash_mlx.train import (
    block_loss,
    init_dflash2,
    main,
    packed_forward,
    position_weights,
    selector_scores,
)


def tiny_config(block_size=4, layer_types=None, window=None, dflash2=True) -> DraftConfig:
    return shared_tiny_config(block_size, layer_types, window, dflash2)


def bound(draft, seed=5):
    mx.random.seed(seed)
    embed = nn.Embedding(VOCAB, H)
    draft.bind_head(embed, embed.as_linear)
    mx.eval(draft.parameters(), embed.parameters())
    return draft


def random_dflash2(seed=0, **kw) -> DFlash2DraftModel:
    """Every DFlash 2 part away from its initial value, so each one is exercised."""
    mx.random.seed(seed)
    draft = DFlash2DraftModel(tiny_config(**kw))
    for layer in draft.layers:
        for conv in (layer.attention_conv, layer.mlp_conv):
            conv.base_kernel = 0.5 * mx.random.normal(conv.base_kernel.shape)
            w = conv.kernel_projection.weight
            conv.kernel_projection.weight = 0.3 * mx.random.normal(w.shape)
    sel = draft.candidate_selector
    sel.predecessor_codebook = mx.random.normal(sel.predecessor_codebook.shape)
    sel.successor_codebook = mx.random.normal(sel.successor_codebook.shape)
    return bound(draft)


@pytest.mark.parametrize("sliding", [False, True])
def test_packed_forward_equals_the_inference_forward(sliding):
    """Many blocks packed in one row: each equals the DFlash 2 draft run on that block
    alone (convolutions stay inside their block)."""
    B, S = 4, 14
    kw = {"layer_types": ["sliding_attention", "full_attention"], "window": 5} if sliding else {}
    draft = random_dflash2(**kw)
    mx.random.seed(1)
    context = mx.random.normal((1, S, N_TAPS * H))
    tokens = mx.random.randint(0, VOCAB - 1, (1, S + B))
    anchor_list = [0, 9, 3, 13]
    ids = [[int(tokens[0, a])] + [draft.mask_token_id] * (B - 1) for a in anchor_list]
    embeds = draft.embed(mx.array([[t for block in ids for t in block]]))
    packed = packed_forward(draft, embeds, context, mx.array([anchor_list]))
    for j, a in enumerate(anchor_list):
        ref = draft(mx.array([ids[j]]), context[:, :a])
        got = packed[:, j * B : (j + 1) * B]
        assert mx.allclose(got, ref, atol=1e-5, rtol=1e-4).item(), (j, a)


def test_teacher_forced_scores_pick_the_inference_walk():
    """With the walk's own tokens as predecessors, the selector scores of every position
    at once pick exactly the tokens CandidateSelector's greedy walk drafted."""
    B, S = 8, 10
    draft = random_dflash2(block_size=B)
    mx.random.seed(2)
    context = mx.random.normal((3, S, N_TAPS * H))
    anchor = mx.array([5, 17, 40])
    block = mx.concatenate([anchor[:, None], mx.full((3, B - 1), draft.mask_token_id)], axis=1)
    hidden = draft(block, context)[:, 1:]
    walk, _, _ = draft.select(hidden, anchor)
    previous = mx.concatenate([anchor[:, None], walk[:, :-1]], axis=1)
    candidates, scores = selector_scores(
        draft.candidate_selector, hidden, draft.logits(hidden).astype(mx.float32), previous
    )
    picked = mx.take_along_axis(candidates, mx.argmax(scores, axis=-1)[..., None], -1)[..., 0]
    assert picked.tolist() == walk.tolist()


def test_block_loss_counts_the_selectors_drafts():
    """Labels = the inference walk of each block: block_loss sees every draft accepted
    (its accuracy and accepted length are those of the selector's picks)."""
    B, S = 6, 9
    T = S + B
    draft = random_dflash2(block_size=B)
    mx.random.seed(3)
    context = mx.random.normal((1, T, N_TAPS * H))
    tokens = mx.random.randint(0, VOCAB - 1, (T,)).tolist()
    rows, anchors = [], [2, 7]  # one block per row, so the blocks' labels do not overlap
    for a in anchors:
        block = mx.array([[tokens[a]] + [draft.mask_token_id] * (B - 1)])
        walk, _, _ = draft.select(draft(block, context[:, :a])[:, 1:], mx.array([tokens[a]]))
        rows.append(tokens[: a + 1] + walk[0].tolist() + [0] * (T - a - B))
    loss, acc, accepted = block_loss(
        draft, mx.array(rows), mx.array([a + B for a in anchors]),
        mx.concatenate([context, context]), mx.array([[a] for a in anchors]),
        mx.ones((2, 1)), position_weights(B, 4.0),
    )  # fmt: skip
    assert acc.tolist() == [1.0] * (B - 1)
    assert accepted.item() == B - 1
    assert np.isfinite(loss.item())


def test_fresh_dflash2_draft_is_the_dflash_draft():
    """After init_dflash2 the convolutions are identities and the selector picks the
    argmax: hidden states and drafts equal a DFlash draft with the same shared weights."""
    B, S = 5, 11
    dflash2 = DFlash2DraftModel(tiny_config(block_size=B))
    init_dflash2(dflash2)
    bound(dflash2)
    dflash = DraftModel(tiny_config(block_size=B, dflash2=False))
    shared = [(k, v) for k, v in tree_flatten(dflash2.parameters()) if "conv" not in k]
    dflash.load_weights([(k, v) for k, v in shared if not k.startswith("candidate_")])
    bound(dflash)
    mx.random.seed(4)
    context = mx.random.normal((2, S, N_TAPS * H))
    anchor = mx.array([3, 30])
    block = mx.concatenate([anchor[:, None], mx.full((2, B - 1), VOCAB - 1)], axis=1)
    h2, h1 = dflash2(block, context), dflash(block, context)
    assert mx.allclose(h2, h1, atol=1e-6).item()
    walk, _, _ = dflash2.select(h2[:, 1:], anchor)
    assert walk.tolist() == mx.argmax(dflash.logits(h1[:, 1:]), axis=-1).tolist()


def test_few_steps_reduce_the_loss_and_train_the_selector():
    B, T, m = 4, 24, 4
    mx.random.seed(0)
    draft = DFlash2DraftModel(tiny_config(block_size=B))
    init_dflash2(draft)
    bound(draft)
    mx.random.seed(2)
    base = mx.random.randint(0, VOCAB - 1, (5,))  # a learnable pattern: period 5
    tokens = mx.tile(base, (2, T // 5 + 1))[:, :T]
    context = mx.random.normal((2, T, N_TAPS * H))
    anchors = mx.array([[2, 7, 11, 15], [4, 9, 13, 18]])
    lengths, valid, weights = mx.array([T, T]), mx.ones((2, m)), position_weights(B, 4.0)

    def loss_fn(model, selector_weight=1.0):
        return block_loss(model, tokens, lengths, context, anchors, valid, weights, selector_weight)

    # The selector's cross-entropy is part of the loss (positive: k > 1 candidates).
    assert loss_fn(draft)[0].item() > loss_fn(draft, 0.0)[0].item()
    losses = train_steps(draft, loss_fn, 15)
    assert losses[-1] < 0.7 * losses[0], losses
    sel = draft.candidate_selector
    assert mx.abs(sel.successor_codebook).max().item() > 0  # learned from zero
    conv = draft.layers[0].attention_conv
    assert mx.abs(conv.kernel_projection.weight).max().item() > 0


def published_names(n_layers: int) -> set[str]:
    """The tensor names of z-lab's DFlash2DraftModel checkpoints (their safetensors
    header, e.g. Qwen3.8-27B-DFlash2): no embedding or head, codebooks without .weight."""
    per_layer = [
        "attention_conv.base_kernel",
        "attention_conv.kernel_projection.weight",
        "mlp_conv.base_kernel",
        "mlp_conv.kernel_projection.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
        *(f"self_attn.{p}_proj.weight" for p in "qkvo"),
        "self_attn.q_norm.weight",
        "self_attn.k_norm.weight",
    ]
    names = {f"layers.{i}.{n}" for i in range(n_layers) for n in per_layer}
    return names | {
        "candidate_selector.hidden_projection.weight",
        "candidate_selector.predecessor_codebook",
        "candidate_selector.successor_codebook",
        "fc.weight",
        "hidden_norm.weight",
        "norm.weight",
    }


def test_train_cli_dflash2_checkpoint_loads_and_decodes_losslessly(tmp_path, capsys):
    from mlx_lm import load as mlx_lm_load
    from mlx_lm import stream_generate as mlx_lm_stream
    from reference.model import load_reference
    from test_train import _tiny_target

    from dflash_mlx.generate import stream_generate

    target = _tiny_target(tmp_path / "target")
    rng = np.random.default_rng(0)
    data = tmp_path / "data.jsonl"
    prompts = [" ".join(f"w{i}" for i in rng.integers(2, 60, 6)) for _ in range(12)]
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "draft"
    args = [
        "--model", str(target), "--data", str(data), "--out", str(out), "--arch", "dflash2",
        "--block-size", "4", "--num-layers", "1", "--target-layer-ids", "0,2",
        "--conv-kernel-size", "2", "--conv-group-size", "8", "--selector-rank", "8",
        "--selector-top-k", "8", "--gen-max-tokens", "24", "--seq-len", "40",
        "--batch-size", "4", "--blocks-per-seq", "6", "--steps", "40", "--lr", "3e-3",
        "--warmup", "0.1", "--no-progress",
        "--eval-long-data", str(data), "--eval-contexts", "3,6", "--eval-max-tokens", "8",
    ]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "DFlash 2: conv 2 taps / groups of 8, selector rank 8 top-8" in printed
    result = json.loads((out / "train_result.json").read_text())
    assert result["last_step_loss"] < 0.8 * result["first_step_loss"], result
    # tau at long contexts: each prompt cut to its last N tokens.
    assert set(result["eval_long"]) == {"3", "6"}
    assert result["eval_long"]["3"]["prompt_tokens"] == {"min": 3, "max": 3}
    assert all(ev["tau"] >= 1.0 for ev in result["eval_long"].values())

    # The published format: config and tensor names as z-lab's checkpoints hold them.
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DFlash2DraftModel"]
    assert {k: config["dflash_config"][k] for k in ("conv_kernel_size", "conv_group_size")} == {
        "conv_kernel_size": 2,
        "conv_group_size": 8,
    }
    assert config["dflash_config"]["selector_rank"] == 8
    assert config["dflash_config"]["selector_top_k"] == 8
    saved = mx.load(str(out / "model.safetensors"))
    assert set(saved) == published_names(1)
    assert saved["layers.0.attention_conv.base_kernel"].shape == (2, 2, H)
    assert saved["layers.0.mlp_conv.kernel_projection.weight"].shape == (2 * 2 * H // 8, H)
    assert saved["candidate_selector.successor_codebook"].shape == (VOCAB, 8)
    assert all(v.dtype == mx.bfloat16 for v in saved.values())
    load_reference(out)  # the PyTorch reference reads it (strict state dict)

    # Lossless: DFlash 2 greedy decoding is the target's own greedy output.
    model, tokenizer = mlx_lm_load(str(target))
    draft = load_draft(out)
    assert isinstance(draft, DFlash2DraftModel)
    drafted = 0
    for prompt in prompts[:3]:
        ids = tokenizer.encode(prompt)
        expected = [r.token for r in mlx_lm_stream(model, tokenizer, ids, max_tokens=40)]
        # The draft's whole block every cycle (a fixed width: no cost measurement).
        got = list(stream_generate(model, draft, tokenizer, ids, max_tokens=40, block_size=4))
        assert [r.token for r in got] == expected
        drafted += sum(r.from_draft for r in got)
    assert drafted > 0  # the selector's drafts were accepted, not only the target's tokens


def test_dflash2_flags_are_checked(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("mlx_lm.load", lambda *a, **k: pytest.fail("loaded the target"))
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "w1 w2"}\n')
    base = ["--model", "m", "--data", str(data), "--out", str(tmp_path / "out")]
    for args, message in (
        (["--selector-rank", "8"], "--selector-rank is a DFlash 2 option: add --arch dflash2"),
        (["--arch", "dflash2", "--selector-top-k", "0"], "--selector-top-k must be positive"),
        (["--arch", "dflash2", "--conv-kernel-size", "20"], "--conv-kernel-size 20 exceeds"),
        (["--arch", "dflash2", "--selector-loss-weight", "-1"], "--selector-loss-weight must"),
        (["--eval-contexts", "128,x"], "--eval-contexts takes positive token counts"),
        (["--eval-long-data", str(tmp_path / "none.jsonl")], "no such file"),
    ):
        assert main(base + args) == 1, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)


def test_group_size_must_divide_the_targets_width(tmp_path, capsys):
    from test_train import _tiny_target

    target = _tiny_target(tmp_path / "target")
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "w1 w2 w3"}\n')
    args = ["--model", str(target), "--data", str(data), "--out", str(tmp_path / "out")]
    assert main(args + ["--arch", "dflash2", "--conv-group-size", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --conv-group-size 5 does not divide the target's hidden size 32"]
