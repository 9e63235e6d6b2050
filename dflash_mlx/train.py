"""Train a DFlash draft for an mlx-lm target, following the paper's recipe.

Data: the target's own continuations of user prompts (generated once and cached), or
given texts. Each training sequence packs many blocks, one per random anchor position
in the response: block = [anchor token, MASK x (B-1)] at positions anchor … anchor+B-1.
A block attends bidirectionally to itself and to the target's tapped hidden states
strictly before its anchor, and to nothing else (not to other blocks, not to context at
or after its anchor). Loss: cross-entropy at block positions k = 1 … B-1 against the
tokens that follow the anchor, weighted by exp(-(k-1)/gamma). The target's embedding
and LM head are shared and frozen; only the draft's layers, fc and norms train.

    dflash-mlx train --model TARGET --data prompts.jsonl --out my-draft \\
        --eval-data heldout.jsonl

The output directory is a draft checkpoint in the published HF layout (config.json +
model.safetensors), readable by `dflash_mlx.load_draft`, `dflash-mlx convert` and the PyTorch
reference; it also holds `train_state/` (full-precision weights, optimizer state, step)
so an interrupted run resumes with `--resume`, and `train_result.json` (loss, timings,
tau on held-out prompts, also at long contexts with `--eval-long-data`).

`--arch dflash2` trains z-lab's DFlash 2 draft (`DFlash2DraftModel`) with the same data,
blocks and loss, plus the objective of its candidate selector. z-lab publishes the model
(inference) but no training code; the recipe here follows SGLang's SpecForge, which trains
DFlash 2 drafts (docs/concepts/DFlash2.md, specforge/modeling/draft/dflash2.py):

- initialisation: every grouped convolution starts as the identity (base kernel 1 at tap 0,
  0 elsewhere; dynamic kernel projection 0) and the selector's successor codebook at 0
  (predecessor codebook ~ N(0, 0.02)), so a fresh DFlash 2 draft is exactly a DFlash draft
  whose selector picks the argmax;
- selector loss: at every block position k >= 1 the selector scores the draft's top-k
  candidates after the true previous token (the anchor for k = 1); cross-entropy of that
  softmax over the k candidates against the true token, where the true token is among
  them (a miss is the backbone's error, not the selector's: no selector term). It is
  weighted like the block loss (exp(-(k-1)/gamma)) and added to it with
  `--selector-loss-weight` (1.0) over the block loss's own denominator; its gradient also
  reaches the draft's logits and hidden states.

Teacher forcing the predecessor is exact for what acceptance measures: a drafted token
counts only when every token before it in the block was accepted, i.e. when the selector's
own previous pick was the true token.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten, tree_unflatten

from .checkpoint import DTYPES
from .config import DFLASH, DFLASH2, DraftConfig, build_target_layer_ids
from .convert import check_writable
from .dflash2 import DFlash2DraftModel
from .drafter import DraftModel
from .progress import Progress
from .tap import embedding_and_head, tap_hidden_states, target_layers

# The paper's decay of the loss weight along the block, per block size.
GAMMA = {16: 7.0, 10: 5.0, 8: 4.0}
MASK_TOKEN_NAMES = ("<|mask|>", "<mask>", "[MASK]", "<|MASK|>")
ARCHS = {"dflash": DFLASH, "dflash2": DFLASH2}
# DFlash 2 defaults: z-lab's published drafts (Qwen3.8-27B-DFlash2, Muse-Glimmer-DFlash2).
DFLASH2_DEFAULTS = {
    "conv_kernel_size": 2,
    "conv_group_size": 16,
    "selector_rank": 256,
    "selector_top_k": 16,
}
# Training rows are padded to a multiple of this (not to --seq-len): batches hold
# sequences of similar length, so few distinct shapes are compiled and little is padding.
PAD_MULTIPLE = 512
# Length buckets: the epoch's order is cut into windows of this many batches, each sorted
# by sequence length before it is cut into batches.
BUCKET_BATCHES = 16


def default_gamma(block_size: int) -> float:
    return GAMMA.get(block_size, 7.0 * block_size / 16)


def position_weights(block_size: int, gamma: float) -> mx.array:
    """[B-1] loss weights for block positions k = 1 … B-1: exp(-(k-1)/gamma)."""
    return mx.exp(-mx.arange(block_size - 1, dtype=mx.float32) / gamma)


# ----------------------------------------------------------------------------------------
# The packed training forward


def block_mask(
    anchors: mx.array,
    block_size: int,
    context_len: int,
    causal: bool = False,
    window: int | None = None,
) -> mx.array:
    """Boolean [N, 1, m*B, S + m*B] visibility of [context ; all blocks] for every query.

    anchors: [N, m] anchor positions. Query i of block j (at position a_j + i) sees context
    position c iff c < a_j, and block keys of block j only (all of them, or with
    causal/window those at positions p' with p - window < p' <= p, as at inference).
    """
    N, m = anchors.shape
    L = m * block_size
    offs = mx.arange(block_size)
    q_pos = (anchors[:, :, None] + offs).reshape(N, L)  # [N, mB]
    q_anchor = mx.repeat(anchors, block_size, axis=1)  # [N, mB]
    c_pos = mx.arange(context_len)
    ctx = c_pos[None, None, :] < q_anchor[:, :, None]  # [N, mB, S]
    blk_id = mx.arange(L) // block_size
    blk = mx.broadcast_to((blk_id[:, None] == blk_id[None, :])[None], (N, L, L))
    if causal or window is not None:
        k_pos = q_pos[:, None, :]  # block keys sit at the block queries' positions
        qp = q_pos[:, :, None]
        if causal:
            blk = blk & (k_pos <= qp)
            ctx = ctx & (c_pos[None, None, :] <= qp)
        if window is not None:
            blk = blk & (k_pos > qp - window)
            ctx = ctx & (c_pos[None, None, :] > qp - window)
    return mx.concatenate([ctx, blk], axis=-1)[:, None]


def _rope_blocks(x: mx.array, rope: nn.Module, anchors: mx.array, block_size: int) -> mx.array:
    """RoPE for [N, H, m*B, D] block rows: block j's rows sit at positions a_j … a_j+B-1."""
    N, H, L, D = x.shape
    m = L // block_size
    x = x.reshape(N, H, m, block_size, D).transpose(0, 2, 1, 3, 4)
    x = rope(x.reshape(N * m, H, block_size, D), offset=anchors.reshape(-1))
    return x.reshape(N, m, H, block_size, D).transpose(0, 2, 1, 3, 4).reshape(N, H, L, D)


def _keys_values(attn: nn.Module, x: mx.array) -> tuple[mx.array, mx.array]:
    """Keys (k_norm applied, before RoPE) and values [N, Hkv, n, D], as inference makes them."""
    N, n, _ = x.shape
    k = attn.k_norm(attn.k_proj(x).reshape(N, n, attn.n_kv_heads, -1))
    v = attn.v_proj(x).reshape(N, n, attn.n_kv_heads, -1)
    return k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _packed_attention(
    draft: DraftModel,
    attn: nn.Module,
    x: mx.array,
    ctx: mx.array,
    anchors: mx.array,
    mask: mx.array,
) -> mx.array:
    """One layer's attention (o_proj applied) for packed blocks x [N, m*B, H]."""
    B = draft.block_size
    N, L, _ = x.shape
    q = attn.q_norm(attn.q_proj(x).reshape(N, L, attn.n_heads, -1)).transpose(0, 2, 1, 3)
    q = _rope_blocks(q, draft.rope, anchors, B)
    kc, vc = _keys_values(attn, ctx)
    kb, vb = _keys_values(attn, x)
    k = mx.concatenate([draft.rope(kc), _rope_blocks(kb, draft.rope, anchors, B)], axis=2)
    v = mx.concatenate([vc, vb], axis=2)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=attn.scale, mask=mask)
    return attn.o_proj(out.transpose(0, 2, 1, 3).reshape(N, L, -1))


def _conv_before(conv: nn.Module, x: mx.array, block_size: int) -> tuple[mx.array, mx.array]:
    """DFlash 2's convolution before a sublayer, block by block: packed rows [N, m*B, H]
    are [N*m] separate blocks, and the convolution never reaches into the previous one."""
    N, L, H = x.shape
    y, kernel = conv.prepare(x.reshape(N * (L // block_size), block_size, H))
    return y.reshape(N, L, H), kernel


def _conv_after(conv: nn.Module, y: mx.array, kernel: mx.array, block_size: int) -> mx.array:
    N, L, H = y.shape
    return conv.finish(y.reshape(-1, block_size, H), kernel).reshape(N, L, H)


def packed_forward(
    draft: DraftModel,
    block_embeds: mx.array,
    context: mx.array,
    anchors: mx.array,
    masks: dict[Any, mx.array] | None = None,
) -> mx.array:
    """The draft over many blocks at once; equals `draft(block, context[:a])` per block.

    block_embeds: [N, m*B, H] embeddings of [anchor, MASK…] for every block.
    context: [N, S, n_taps*H] tapped target features of positions 0 … S-1.
    anchors: [N, m] positions of the blocks' first tokens.
    Returns the final-normed hidden states [N, m*B, H]. DFlash 2 layers wrap attention
    and MLP in their grouped causal convolutions, within each block.
    """
    B = draft.block_size
    S = context.shape[1]
    ctx = draft.hidden_norm(draft.fc(context))
    masks = {} if masks is None else masks
    h = block_embeds
    for layer in draft.layers:
        attn = layer.self_attn
        key = (attn.causal, attn.window)
        if key not in masks:
            masks[key] = block_mask(anchors, B, S, attn.causal, attn.window)
        x = layer.input_layernorm(h)
        if hasattr(layer, "attention_conv"):  # DFlash 2
            x, kernel = _conv_before(layer.attention_conv, x, B)
            a = _packed_attention(draft, attn, x, ctx, anchors, masks[key])
            h = h + _conv_after(layer.attention_conv, a, kernel, B)
            x, kernel = _conv_before(layer.mlp_conv, layer.post_attention_layernorm(h), B)
            h = h + _conv_after(layer.mlp_conv, layer.mlp(x), kernel, B)
        else:
            h = h + _packed_attention(draft, attn, x, ctx, anchors, masks[key])
            h = h + layer.mlp(layer.post_attention_layernorm(h))
    return draft.norm(h)


def selector_scores(
    selector: nn.Module, hidden: mx.array, logits: mx.array, previous: mx.array
) -> tuple[mx.array, mx.array]:
    """DFlash 2's candidates and their scores at every position at once.

    hidden [..., H] (final-normed), logits [..., V], previous [...] (the token before each
    position). Returns (candidates [..., k], the draft's top-k tokens, and their scores
    [..., k] float32: logit + <predecessor[previous] * proj(hidden), successor[candidate]>),
    what CandidateSelector computes one position at a time while it walks a block.
    """
    k = selector.top_k
    candidates = mx.stop_gradient(mx.argpartition(-logits, k - 1, axis=-1)[..., :k])
    candidates = candidates.astype(mx.int32)
    unary = mx.take_along_axis(logits, candidates, axis=-1).astype(mx.float32)
    proj = selector.hidden_projection(hidden).astype(mx.float32)
    context = selector.predecessor_codebook[previous].astype(mx.float32) * proj  # [..., r]
    succ = selector.successor_codebook[candidates].astype(mx.float32)  # [..., k, r]
    return candidates, unary + (succ @ context[..., None])[..., 0]


def block_inputs(
    tokens: mx.array, anchors: mx.array, block_size: int, mask_token_id: int
) -> tuple[mx.array, mx.array]:
    """Block ids [N, m*B] ([anchor token, MASK…] per block) and labels [N, m, B-1]."""
    N, T = tokens.shape
    m = anchors.shape[1]
    first = mx.take_along_axis(tokens, anchors, axis=1)  # [N, m]
    ids = mx.concatenate(
        [first[:, :, None], mx.full((N, m, block_size - 1), mask_token_id, dtype=first.dtype)],
        axis=2,
    ).reshape(N, m * block_size)
    pos = mx.minimum(anchors[:, :, None] + mx.arange(1, block_size), T - 1)
    labels = mx.take_along_axis(tokens, pos.reshape(N, -1), axis=1).reshape(N, m, -1)
    return ids, labels


def block_loss(
    draft: DraftModel,
    tokens: mx.array,
    lengths: mx.array,
    context: mx.array,
    anchors: mx.array,
    block_valid: mx.array,
    weights: mx.array,
    selector_weight: float = 1.0,
) -> tuple[mx.array, mx.array, mx.array]:
    """Weighted cross-entropy of the packed blocks (+ DFlash 2's selector term).

    tokens [N, T], lengths [N] (valid tokens per row), context [N, T, F], anchors [N, m],
    block_valid [N, m] (0 for padding blocks), weights [B-1].
    Returns (loss, per-position accuracy [B-1], expected accepted drafts per block), the
    last two of the tokens greedy decoding would draft (the selector's picks for DFlash 2).
    """
    B = draft.block_size
    N, m = anchors.shape
    ids, labels = block_inputs(tokens, anchors, B, draft.mask_token_id)
    h = packed_forward(draft, draft.embed(ids).astype(mx.float32), context, anchors)
    hidden = h.reshape(N, m, B, -1)[:, :, 1:]
    logits = draft.logits(hidden).astype(mx.float32)
    in_seq = (anchors[:, :, None] + mx.arange(1, B)) < lengths[:, None, None]
    valid = (in_seq & (block_valid[:, :, None] > 0)).astype(mx.float32)  # [N, m, B-1]
    ce = nn.losses.cross_entropy(logits, labels, reduction="none")
    w = weights * valid
    numerator = (ce * w).sum()
    if isinstance(draft, DFlash2DraftModel):
        # The selector after the true previous token: the anchor, then the labels.
        previous = mx.concatenate([ids.reshape(N, m, B)[:, :, :1], labels[:, :, :-1]], axis=2)
        candidates, scores = selector_scores(draft.candidate_selector, hidden, logits, previous)
        hit = candidates == labels[..., None]
        covered = hit.any(axis=-1).astype(mx.float32)
        true_score = mx.where(hit, scores, 0.0).sum(axis=-1)
        selector_ce = mx.logsumexp(scores, axis=-1) - true_score
        numerator = numerator + selector_weight * (selector_ce * w * covered).sum()
        choice = mx.argmax(scores, axis=-1)[..., None]
        drafted = mx.take_along_axis(candidates, choice, axis=-1)[..., 0]
    else:
        drafted = mx.argmax(logits, axis=-1)
    loss = numerator / mx.maximum(w.sum(), 1.0)
    correct = (drafted == labels).astype(mx.float32) * valid
    acc = correct.sum(axis=(0, 1)) / mx.maximum(valid.sum(axis=(0, 1)), 1.0)
    # Greedy drafts accepted per block: the length of the all-correct prefix.
    run = mx.cumprod(correct, axis=-1).sum(axis=-1)
    full = (block_valid > 0).astype(mx.float32)
    accepted = (run * full).sum() / mx.maximum(full.sum(), 1.0)
    return loss, acc, accepted


def init_dflash2(draft: DFlash2DraftModel, std: float = 0.02) -> None:
    """Start a DFlash 2 draft as the DFlash draft it extends (SpecForge's initialisation):
    identity convolutions (base kernel 1 at tap 0, no dynamic kernel) and a selector whose
    transition score is 0 (successor codebook 0), so it first picks the argmax."""
    for layer in draft.layers:
        for conv in (layer.attention_conv, layer.mlp_conv):
            K = conv.base_kernel.shape[1]
            tap0 = (mx.arange(K) == 0).astype(mx.float32)[None, :, None]
            conv.base_kernel = mx.broadcast_to(tap0, conv.base_kernel.shape) + 0.0
            conv.kernel_projection.weight = mx.zeros_like(conv.kernel_projection.weight)
    selector = draft.candidate_selector
    selector.predecessor_codebook = std * mx.random.normal(selector.predecessor_codebook.shape)
    selector.successor_codebook = mx.zeros_like(selector.successor_codebook)


# ----------------------------------------------------------------------------------------
# Data: prompts -> the target's continuations (cached) -> token sequences


def read_records(path: str | Path) -> list[dict]:
    """jsonl lines: {"prompt"}, {"messages"}, {"text"}, or {"prompt", "response"}."""
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON: {e}") from e
            if isinstance(rec, str):
                rec = {"prompt": rec}
            if not any(k in rec for k in ("prompt", "messages", "text")):
                raise ValueError(f"{path}:{n}: needs 'prompt', 'messages' or 'text'")
            records.append(rec)
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def encode_prompt(tokenizer: Any, rec: dict) -> list[int]:
    """Token ids of a record's prompt: chat template for messages, plain text otherwise."""
    if "messages" in rec:
        messages = list(rec["messages"])
        if messages and messages[-1].get("role") == "assistant":
            messages = messages[:-1]  # the target writes the answer itself
        if getattr(tokenizer, "chat_template", None):
            return list(
                tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            )
        text = "\n".join(m["content"] for m in messages) + "\n"
        return tokenizer.encode(text)
    return tokenizer.encode(rec["prompt"])


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _target_fingerprint(model_path: str) -> list:
    path = Path(model_path)
    files = sorted(path.glob("*.safetensors")) + [path / "config.json"]
    return [model_path] + [
        (f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.exists()
    ]


def build_sequences(
    model: nn.Module,
    tokenizer: Any,
    records: list[dict],
    *,
    max_new_tokens: int,
    temp: float,
    batch_size: int,
    seq_len: int,
    cache_file: Path | None,
    seed: int,
) -> list[tuple[list[int], int]]:
    """(token ids, response start) per record; the target writes the missing responses.

    Generations are cached in `cache_file` (jsonl), so a rerun or a resumed run skips them.
    """
    import importlib

    from mlx_lm.sample_utils import make_sampler

    batch_generate = importlib.import_module("mlx_lm.generate").batch_generate

    prompts, responses = [], [None] * len(records)
    for i, rec in enumerate(records):
        if "text" in rec:
            prompts.append([])
            responses[i] = tokenizer.encode(rec["text"])
        else:
            prompts.append(encode_prompt(tokenizer, rec))
            if "response" in rec:
                responses[i] = tokenizer.encode(rec["response"], add_special_tokens=False)

    todo = [i for i, r in enumerate(responses) if r is None]
    if todo and cache_file is not None and cache_file.exists():
        cached = [json.loads(line) for line in cache_file.read_text().splitlines() if line]
        if len(cached) == len(todo):
            for i, r in zip(todo, cached):
                responses[i] = r
            print(f"[data] {len(todo)} generations read from {cache_file}", flush=True)
            todo = []
    if todo:
        mx.random.seed(seed)
        sampler = make_sampler(temp=temp)
        tic = time.perf_counter()
        n_tok = n_prompt = 0
        # Shortest prompts first: batch_generate pads each prefill batch to its longest
        # prompt and holds a decode batch's KV at its longest, so batches of similar
        # length waste neither time nor memory.
        by_length = sorted(todo, key=lambda i: len(prompts[i]))
        for s in range(0, len(by_length), batch_size):
            chunk = by_length[s : s + batch_size]
            out = batch_generate(
                model,
                tokenizer,
                [prompts[i] for i in chunk],
                max_tokens=max_new_tokens,
                return_token_ids=True,
                sampler=sampler,
                completion_batch_size=batch_size,
                prefill_batch_size=min(batch_size, 64),
            )
            for i, ids in zip(chunk, out.token_ids):
                responses[i] = list(ids)
                n_tok += len(ids)
                n_prompt += len(prompts[i])
            done = min(s + batch_size, len(todo))
            el = time.perf_counter() - tic
            print(
                f"[data] generated {done}/{len(todo)} responses ({n_prompt} prompt tokens, "
                f"up to {len(prompts[chunk[-1]])} each), {n_tok / el:.0f} tok/s, {el:.0f}s",
                flush=True,
            )
        if cache_file is not None:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(responses[i]) + "\n" for i in todo))
            tmp.rename(cache_file)

    seqs, dropped, truncated = [], 0, 0
    for p, r in zip(prompts, responses):
        # Too long: the prompt loses its oldest tokens first, down to half the window;
        # only then is the response cut.
        keep_prompt = min(len(p), max(seq_len - len(r), seq_len // 2))
        ids = (p[len(p) - keep_prompt :] + r)[:seq_len]
        start = keep_prompt if p else 1  # given texts: any position after the first
        if len(r) < 2 or len(ids) - start < 2:
            dropped += 1
            continue
        truncated += len(p) + len(r) > seq_len
        seqs.append((ids, start))
    if dropped:
        print(
            f"[data] dropped {dropped} of {len(records)} records: fewer than 2 response "
            "tokens to learn from",
            flush=True,
        )
    if truncated:
        print(
            f"[data] {truncated} of {len(records)} records cut to --seq-len {seq_len} tokens",
            flush=True,
        )
    return seqs


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The epoch's batches (indices into the sequences), a function of (seed, epoch).

    A seeded permutation is cut into windows of BUCKET_BATCHES batches; each window is
    sorted by sequence length and cut into batches, and the batches are shuffled: every
    batch holds sequences of similar length (little padding), in random order.
    """
    rng = np.random.default_rng([seed, epoch])
    n_batches = max(1, len(lengths) // batch_size)
    perm = rng.permutation(len(lengths))[: n_batches * batch_size]
    batches = []
    for s in range(0, len(perm), batch_size * BUCKET_BATCHES):
        window = perm[s : s + batch_size * BUCKET_BATCHES]
        window = window[np.argsort(lengths[window], kind="stable")]
        batches += [window[i : i + batch_size] for i in range(0, len(window), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def sample_batch(
    seqs: list[tuple[list[int], int]],
    order: np.ndarray,
    rng: np.random.Generator,
    batch_size: int,
    seq_len: int,
    blocks: int,
    pad_id: int,
) -> tuple[np.ndarray, ...]:
    """Padded tokens [N, T], lengths [N], anchors [N, m], block validity [N, m].

    T is the batch's longest sequence rounded up to PAD_MULTIPLE (at most seq_len).
    """
    longest = max(len(seqs[idx][0]) for idx in order)
    width = min(seq_len, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
    tokens = np.full((batch_size, width), pad_id, dtype=np.int32)
    lengths = np.zeros(batch_size, dtype=np.int32)
    anchors = np.zeros((batch_size, blocks), dtype=np.int32)
    valid = np.zeros((batch_size, blocks), dtype=np.float32)
    for row, idx in enumerate(order):
        ids, start = seqs[idx]
        tokens[row, : len(ids)] = ids
        lengths[row] = len(ids)
        candidates = np.arange(start, len(ids) - 1)  # an anchor needs >= 1 label after it
        k = min(blocks, candidates.size)
        anchors[row, :k] = rng.choice(candidates, size=k, replace=False)
        anchors[row, k:] = candidates[0]
        valid[row, :k] = 1.0
    return tokens, lengths, anchors, valid


# ----------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(draft: DraftModel, out: Path, dtype: mx.Dtype) -> None:
    """config.json + model.safetensors in the published layout (atomic replace)."""
    out.mkdir(parents=True, exist_ok=True)
    params = {k: v.astype(dtype) for k, v in tree_flatten(draft.parameters())}
    # Written beside, outside the checkpoint's glob, then renamed: never half-written.
    (out / "train_state").mkdir(exist_ok=True)
    tmp = out / "train_state" / "model.tmp.safetensors"
    mx.save_safetensors(str(tmp), params, metadata={"format": "pt"})
    tmp.rename(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(draft.config.to_dict(), indent=2) + "\n")


def save_state(draft: DraftModel, opt: optim.Optimizer, out: Path, info: dict) -> None:
    state = out / "train_state"
    state.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(
        str(state / "weights.tmp.safetensors"), dict(tree_flatten(draft.parameters()))
    )
    mx.save_safetensors(str(state / "optimizer.tmp.safetensors"), dict(tree_flatten(opt.state)))
    (state / "weights.tmp.safetensors").rename(state / "weights.safetensors")
    (state / "optimizer.tmp.safetensors").rename(state / "optimizer.safetensors")
    (state / "state.json").write_text(json.dumps(info, indent=2) + "\n")


def load_state(draft: DraftModel, opt: optim.Optimizer, out: Path) -> dict:
    state = out / "train_state"
    info = json.loads((state / "state.json").read_text())
    draft.load_weights(list(mx.load(str(state / "weights.safetensors")).items()))
    opt.state = tree_unflatten(list(mx.load(str(state / "optimizer.safetensors")).items()))
    return info


# ----------------------------------------------------------------------------------------
# Evaluation: tau with the real decode loop


def evaluate_tau(
    model: nn.Module,
    draft: DraftModel,
    tokenizer: Any,
    records: list[dict],
    max_tokens: int = 256,
    block_size: int | None = None,
    context: int | None = None,
) -> dict:
    """Greedy DFlash decoding of each prompt: mean acceptance length and its breakdown.

    tau = tokens emitted per verify cycle (accepted drafts + the target's token), averaged
    over all cycles after the prefill; per_position[k-1] = fraction of cycles whose first
    k drafts were all accepted. With `context`, each prompt is its last `context` tokens
    (long held-out texts give contexts of any length up to theirs).
    """
    from .generate import dflash_cycles

    B = block_size or draft.block_size
    accepted = Counter()
    emitted = cycles = 0
    prompt_tokens = []
    tic = time.perf_counter()
    for rec in records:
        ids = encode_prompt(tokenizer, rec)
        prompt = mx.array(ids[-context:] if context else ids)
        prompt_tokens.append(prompt.size)
        for i, cycle in enumerate(
            dflash_cycles(model, draft, prompt, max_tokens=max_tokens, block_size=B)
        ):
            if i == 0:
                continue
            cycles += 1
            emitted += len(cycle.tokens)
            accepted[cycle.accepted] += 1
    per_position = [
        sum(v for a, v in accepted.items() if a >= k) / max(cycles, 1) for k in range(1, B)
    ]
    return {
        "tau": emitted / max(cycles, 1),
        "per_position_acceptance": per_position,
        "accepted_histogram": {str(k): v for k, v in sorted(accepted.items())},
        "cycles": cycles,
        "tokens": emitted,
        "prompts": len(records),
        "prompt_tokens": {"min": min(prompt_tokens), "max": max(prompt_tokens)},
        "context": context,
        "max_tokens": max_tokens,
        "block_size": B,
        "seconds": time.perf_counter() - tic,
    }


# ----------------------------------------------------------------------------------------
# Main


def find_mask_token(tokenizer: Any, vocab_size: int) -> int:
    vocab = tokenizer.get_vocab()
    for name in MASK_TOKEN_NAMES:
        if name in vocab and vocab[name] < vocab_size:
            return vocab[name]
    raise ValueError(
        "the tokenizer has no mask token (tried "
        f"{', '.join(MASK_TOKEN_NAMES)}): give --mask-token-id (an unused token id)"
    )


def draft_config(model: nn.Module, tokenizer: Any, args: argparse.Namespace) -> DraftConfig:
    """A draft config matching the target: its width, vocab, heads, rope; our depth."""
    margs = getattr(model, "args", None)
    get = (lambda k, d=None: getattr(margs, k, d)) if margs is not None else (lambda k, d=None: d)
    embed, _ = embedding_and_head(model)
    vocab = embed.weight.shape[0]
    hidden = embed(mx.array([0])).shape[-1]
    n_target = len(target_layers(model))
    heads = args.num_heads or get("num_attention_heads") or max(1, hidden // 64)
    if args.target_layer_ids:
        layer_ids = [int(i) for i in args.target_layer_ids.split(",")]
    else:
        layer_ids = build_target_layer_ids(n_target, args.num_layers)
    mask_id = args.mask_token_id
    if mask_id is None:
        mask_id = find_mask_token(tokenizer, vocab)
    dflash_config: dict[str, Any] = {"mask_token_id": mask_id, "target_layer_ids": layer_ids}
    if args.arch == "dflash2":
        extra = dflash2_options(args)
        if hidden % extra["conv_group_size"]:
            raise ValueError(
                f"--conv-group-size {extra['conv_group_size']} does not divide the "
                f"target's hidden size {hidden}"
            )
        if extra["selector_top_k"] > vocab:
            raise ValueError(
                f"--selector-top-k {extra['selector_top_k']} exceeds the vocabulary ({vocab})"
            )
        dflash_config.update(extra)
    raw = {
        "architectures": [ARCHS[args.arch]],
        "hidden_size": hidden,
        "intermediate_size": args.intermediate_size or get("intermediate_size") or 3 * hidden,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": args.num_kv_heads or get("num_key_value_heads") or heads,
        "head_dim": args.head_dim or get("head_dim") or hidden // heads,
        "vocab_size": vocab,
        "block_size": args.block_size,
        "dflash_config": dflash_config,
        "num_target_layers": n_target,
        "rms_norm_eps": get("rms_norm_eps", 1e-6) or 1e-6,
        "max_position_embeddings": get("max_position_embeddings", 40960) or 40960,
        "rope_theta": get("rope_theta", 1000000.0) or 1000000.0,
        "rope_scaling": get("rope_scaling"),
    }
    return DraftConfig.from_dict(raw)


def dflash2_options(args: argparse.Namespace) -> dict[str, int]:
    """The DFlash 2 fields of the config: the flags given, z-lab's values otherwise."""
    return {
        k: getattr(args, k) if getattr(args, k) is not None else v
        for k, v in DFLASH2_DEFAULTS.items()
    }


def parse_contexts(text: str) -> list[int]:
    """'128,1024,4096' -> [128, 1024, 4096] (--eval-contexts); ValueError names the flag."""
    try:
        contexts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        contexts = []
    if not contexts or min(contexts) < 1:
        raise ValueError(
            f"--eval-contexts takes positive token counts like 128,1024,4096, got {text!r}"
        )
    return contexts


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dflash-mlx train",
        description="Train a DFlash draft for an mlx-lm target (the paper's recipe).",
    )
    p.add_argument("--model", required=True, help="target: path or Hub id (mlx-lm)")
    p.add_argument(
        "--data",
        required=True,
        help="jsonl: {'prompt'} | {'messages'} (target writes the response), "
        "{'prompt','response'} or {'text'} (used as given)",
    )
    p.add_argument("--out", required=True, help="draft checkpoint directory to write")
    p.add_argument("--eval-data", help="held-out prompts (jsonl) for tau at the end")
    p.add_argument("--eval-max-tokens", type=int, default=256)
    p.add_argument(
        "--eval-limit", type=int, default=None, help="use at most N eval prompts (each file)"
    )
    p.add_argument(
        "--eval-long-data",
        help="long held-out texts (jsonl, {'prompt'}): tau with each cut to its last N "
        "tokens, for every N of --eval-contexts",
    )
    p.add_argument(
        "--eval-contexts",
        default="128,1024,4096",
        help="context lengths (tokens) for --eval-long-data (default 128,1024,4096)",
    )
    g = p.add_argument_group("draft architecture (defaults follow the target)")
    g.add_argument(
        "--arch",
        default="dflash",
        choices=sorted(ARCHS),
        help="dflash: DFlashDraftModel; dflash2: DFlash2DraftModel (grouped dynamic "
        "convolutions and a candidate selector)",
    )
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--target-layer-ids", default=None, help="e.g. 1,3,5 (default: spread)")
    g.add_argument("--num-heads", type=int, default=None)
    g.add_argument("--num-kv-heads", type=int, default=None)
    g.add_argument("--head-dim", type=int, default=None)
    g.add_argument("--intermediate-size", type=int, default=None)
    g.add_argument(
        "--mask-token-id",
        type=int,
        default=None,
        help="default: the tokenizer's <|mask|> / <mask> / [MASK]",
    )
    g = p.add_argument_group("DFlash 2 (--arch dflash2; defaults: z-lab's published drafts)")
    g.add_argument("--conv-kernel-size", type=int, default=None, help="taps (default 2)")
    g.add_argument(
        "--conv-group-size", type=int, default=None, help="channels per dynamic kernel (16)"
    )
    g.add_argument("--selector-rank", type=int, default=None, help="codebook rank (256)")
    g.add_argument("--selector-top-k", type=int, default=None, help="candidates (16)")
    g.add_argument(
        "--selector-loss-weight",
        type=float,
        default=1.0,
        help="weight of the selector's cross-entropy against the block loss (1.0)",
    )
    g = p.add_argument_group("data")
    g.add_argument("--gen-max-tokens", type=int, default=256, help="response length")
    g.add_argument("--gen-temp", type=float, default=0.0, help="0: greedy responses")
    g.add_argument("--gen-batch-size", type=int, default=256)
    g.add_argument("--cache-dir", default=None, help="generation cache (default: OUT/cache)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per training sequence")
    g.add_argument(
        "--cache-features",
        action="store_true",
        help="compute the target's hidden states once and keep them in memory",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=2000)
    g.add_argument("--batch-size", type=int, default=32, help="sequences per step")
    g.add_argument("--blocks-per-seq", type=int, default=16, help="anchors per sequence")
    g.add_argument("--gamma", type=float, default=None, help="loss decay (default: by block)")
    g.add_argument("--lr", type=float, default=6e-4)
    g.add_argument("--warmup", type=float, default=0.04, help="warmup fraction of steps")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--save-every", type=int, default=500)
    g.add_argument("--resume", action="store_true", help="continue from OUT/train_state")
    g.add_argument(
        "--dtype", default="bfloat16", choices=sorted(DTYPES), help="dtype of the saved checkpoint"
    )
    g.add_argument("--no-progress", action="store_true", help="log lines instead of a bar")
    return p


class MovingAverage:
    """Exponential moving average with Adam's bias correction (no warm-up bias)."""

    def __init__(self, decay: float):
        self.decay, self.value, self.steps = decay, 0.0, 0

    def update(self, x: float) -> float:
        self.steps += 1
        self.value = self.decay * self.value + (1 - self.decay) * x
        return self.value / (1 - self.decay**self.steps)


def check_args(args: argparse.Namespace) -> None:
    """Every flag and path before the model loads or data is generated: one line each."""
    positive = ("steps", "batch_size", "blocks_per_seq", "num_layers", "gen_max_tokens")
    positive += ("gen_batch_size", "eval_max_tokens")
    for flag in positive:
        if getattr(args, flag) < 1:
            raise ValueError(
                f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}"
            )
    if args.block_size < 2:
        raise ValueError(f"--block-size must be >= 2, got {args.block_size}")
    if args.seq_len < 3:
        raise ValueError(f"--seq-len must be >= 3, got {args.seq_len}")
    if args.eval_limit is not None and args.eval_limit < 1:
        raise ValueError(f"--eval-limit must be positive, got {args.eval_limit}")
    if args.save_every < 0:
        raise ValueError(f"--save-every must be >= 0, got {args.save_every}")
    for flag in ("lr", "gen_temp", "weight_decay", "grad_clip", "warmup"):
        value = getattr(args, flag)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be a number >= 0, got {value}")
    if args.lr == 0:
        raise ValueError("--lr must be positive, got 0")
    if args.warmup >= 1:
        raise ValueError(f"--warmup is a fraction of the steps, in [0, 1), got {args.warmup}")
    if args.gamma is not None and not (math.isfinite(args.gamma) and args.gamma > 0):
        raise ValueError(f"--gamma must be positive, got {args.gamma}")
    w = args.selector_loss_weight
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"--selector-loss-weight must be a number >= 0, got {w}")
    for flag in DFLASH2_DEFAULTS:
        value = getattr(args, flag)
        name = f"--{flag.replace('_', '-')}"
        if value is not None and args.arch != "dflash2":
            raise ValueError(f"{name} is a DFlash 2 option: add --arch dflash2")
        if value is not None and value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if args.arch == "dflash2" and dflash2_options(args)["conv_kernel_size"] > args.block_size:
        raise ValueError(
            f"--conv-kernel-size {dflash2_options(args)['conv_kernel_size']} exceeds "
            f"--block-size {args.block_size}"
        )
    parse_contexts(args.eval_contexts)
    for flag in ("data", "eval_data", "eval_long_data"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"--{flag.replace('_', '-')} {path}: no such file")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    check_writable(out / "config.json")


def check_resume(saved: DraftConfig, wanted: DraftConfig, out: Path) -> None:
    """--resume continues the saved draft: flags asking for another one are an error."""
    a, b = saved.to_dict(), wanted.to_dict()
    differ = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if differ:
        was = ", ".join(f"{k}={a.get(k)}" for k in differ)
        now = ", ".join(f"{k}={b.get(k)}" for k in differ)
        raise ValueError(
            f"--resume: {out} holds a draft with {was}; the flags ask for {now} "
            "(pass the same flags, or start over without --resume)"
        )


def train(args: argparse.Namespace) -> dict:
    from mlx_lm import load

    t_start = time.perf_counter()
    out = Path(args.out)
    check_args(args)
    records = read_records(args.data)  # bad data or flags fail before anything slow
    eval_records = read_records(args.eval_data)[: args.eval_limit] if args.eval_data else []
    long_records = (
        read_records(args.eval_long_data)[: args.eval_limit] if args.eval_long_data else []
    )
    np.random.seed(args.seed)
    mx.random.seed(args.seed)
    model, tokenizer = load(args.model)
    model.eval()
    model.freeze()

    info: dict = {}
    config = draft_config(model, tokenizer, args)
    if args.resume and (out / "train_state" / "state.json").exists():
        info = json.loads((out / "train_state" / "state.json").read_text())
        saved = DraftConfig.from_dict(json.loads((out / "config.json").read_text()))
        check_resume(saved, config, out)
        config = saved
    mx.random.seed(args.seed)
    if config.is_dflash2:
        draft = DFlash2DraftModel(config)
        init_dflash2(draft)
    else:
        draft = DraftModel(config)
    draft.bind(model)
    mx.eval(draft.parameters())
    n_params = sum(v.size for _, v in tree_flatten(draft.parameters()))
    B = config.block_size
    gamma = args.gamma or default_gamma(B)
    n_layers = config.num_hidden_layers
    extra = ""
    if config.is_dflash2:
        extra = (
            f", DFlash 2: conv {config.conv_kernel_size} taps / groups of "
            f"{config.conv_group_size}, selector rank {config.selector_rank} "
            f"top-{config.selector_top_k} (loss weight {args.selector_loss_weight})"
        )
    print(
        f"[draft] {n_params / 1e6:.2f}M parameters, {n_layers} layer{'s' * (n_layers != 1)}, "
        f"block {B}, taps {config.target_layer_ids}, mask id {config.mask_token_id}, "
        f"gamma {gamma}{extra}",
        flush=True,
    )
    cache_dir = Path(args.cache_dir) if args.cache_dir else out / "cache"
    key = _digest(
        _target_fingerprint(args.model), records, args.gen_max_tokens, args.gen_temp, args.seed
    )
    t_data = time.perf_counter()
    seqs = build_sequences(
        model,
        tokenizer,
        records,
        max_new_tokens=args.gen_max_tokens,
        temp=args.gen_temp,
        batch_size=args.gen_batch_size,
        seq_len=args.seq_len,
        cache_file=cache_dir / f"generations-{key}.jsonl",
        seed=args.seed,
    )
    t_data = time.perf_counter() - t_data
    if not seqs:
        raise ValueError("no usable training sequences (responses too short?)")
    n_resp = sum(len(ids) - s for ids, s in seqs)
    sizes = sorted(len(ids) for ids, _ in seqs)
    print(
        f"[data] {len(seqs)} sequences, {n_resp} response tokens, {sizes[len(sizes) // 2]} "
        f"tokens each (median; longest {sizes[-1]}) ({t_data:.0f}s)",
        flush=True,
    )

    warm = max(1, int(args.warmup * args.steps))
    schedule = optim.join_schedules(
        [
            optim.linear_schedule(0.0, args.lr, warm),
            optim.cosine_decay(args.lr, max(1, args.steps - warm), args.lr * 0.05),
        ],
        [warm],
    )
    opt = optim.AdamW(schedule, betas=[0.9, 0.95], weight_decay=args.weight_decay)
    start_step = 0
    if info:
        opt.init(draft.trainable_parameters())
        load_state(draft, opt, out)
        start_step = info["step"]
        print(f"[resume] from step {start_step}", flush=True)

    weights = position_weights(B, gamma)
    layer_ids = config.target_layer_ids

    def loss_fn(draft, tokens, lengths, context, anchors, valid):
        return block_loss(
            draft, tokens, lengths, context, anchors, valid, weights, args.selector_loss_weight
        )

    value_and_grad = nn.value_and_grad(draft, loss_fn)
    state = [draft.state, opt.state]

    def step_fn(tokens, lengths, context, anchors, valid):
        (loss, acc, acc_len), grads = value_and_grad(
            draft, tokens, lengths, context, anchors, valid
        )
        if args.grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, args.grad_clip)
        opt.update(draft, grads)
        return loss, acc, acc_len

    step_fn = mx.compile(step_fn, inputs=state, outputs=state)

    feature_cache: dict[int, mx.array] = {}

    def features(tokens: mx.array, order: np.ndarray, lengths: np.ndarray) -> mx.array:
        T = tokens.shape[1]
        if args.cache_features and all(int(i) in feature_cache for i in order):
            # Kept at each sequence's own length (batches pad to their own width): padded
            # positions are never visible to a block (it sees context before its anchor).
            rows = [feature_cache[int(i)] for i in order]
            return mx.stack([mx.pad(r, [(0, T - r.shape[0]), (0, 0)]) for r in rows])
        with tap_hidden_states(model, layer_ids) as tap:
            model(tokens)
            feats = mx.stop_gradient(tap.features())
        if args.cache_features:
            for row, i in enumerate(order):
                feature_cache[int(i)] = feats[row, : int(lengths[row])]
        return feats

    n = len(seqs)
    bs = min(args.batch_size, n)
    seq_lengths = np.array([len(ids) for ids, _ in seqs])
    steps_per_epoch = max(1, n // bs)
    batches: dict[int, list[np.ndarray]] = {}
    pad_id = config.mask_token_id
    progress = Progress(args.steps, "train", initial=start_step, enabled=not args.no_progress)
    tic = time.perf_counter()
    seen = 0
    # Step losses are noisy: report an exponential moving average, bias-corrected so that
    # early values are not dragged towards the first steps' (or zero's) level.
    loss_avg, acc_avg = MovingAverage(0.95), MovingAverage(0.95)
    avg = avg_acc = lv = first_loss = math.nan
    log: list[dict] = info.get("log", [])
    for step in range(start_step, args.steps):
        # Order and anchors are a function of (seed, step): a resumed run continues the
        # very same sequence of batches.
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch not in batches:
            batches = {epoch: epoch_batches(seq_lengths, bs, args.seed, epoch)}
        order = batches[epoch][pos]
        rng = np.random.default_rng([args.seed, epoch, pos, 1])
        tokens, lengths, anchors, valid = sample_batch(
            seqs, order, rng, bs, args.seq_len, args.blocks_per_seq, pad_id
        )
        tokens = mx.array(tokens)
        context = features(tokens, order, lengths)
        loss, _, acc_len = step_fn(
            tokens, mx.array(lengths), context, mx.array(anchors), mx.array(valid)
        )
        mx.eval(state, loss, acc_len)
        seen += int(lengths.sum())
        lv, av = loss.item(), acc_len.item()
        if not math.isfinite(lv):
            raise RuntimeError(f"loss is {lv} at step {step + 1}")
        if step == start_step:
            first_loss = lv
        avg, avg_acc = loss_avg.update(lv), acc_avg.update(av)
        el = time.perf_counter() - tic
        tps = seen / el
        progress.update(1, f"loss {avg:.3f}  block-accepted {avg_acc:.2f}  {tps:.0f} tok/s")
        done = step + 1
        if done % 100 == 0 or done == args.steps:
            log.append(
                {
                    "step": done,
                    "loss": avg,
                    "block_accepted": avg_acc,
                    "lr": float(schedule(mx.array(done))),
                    "seconds": el,
                }
            )
            if args.no_progress:
                print(
                    f"[train] step {done}/{args.steps} loss {avg:.3f} "
                    f"block-accepted {avg_acc:.2f} {tps:.0f} tok/s {el:.0f}s",
                    flush=True,
                )
        if (args.save_every and done % args.save_every == 0) or done == args.steps:
            save_checkpoint(draft, out, DTYPES[args.dtype])
            save_state(
                draft, opt, out, {"step": done, "seed": args.seed, "log": log, "args": vars(args)}
            )
    progress.close()
    if start_step >= args.steps:
        save_checkpoint(draft, out, DTYPES[args.dtype])
    train_seconds = time.perf_counter() - tic
    print(
        f"[train] done: {args.steps - start_step} steps in {train_seconds:.0f}s, "
        f"loss {avg:.3f} (moving average; last step {lv:.3f})",
        flush=True,
    )

    result = {
        "draft_parameters": n_params,
        "sequences": len(seqs),
        "response_tokens": n_resp,
        "data_seconds": t_data,
        "train_seconds": train_seconds,
        "final_loss": avg,  # bias-corrected moving average over the last ~20 steps
        "first_step_loss": first_loss,  # of this run (after --resume: its first step)
        "last_step_loss": lv,
        "block_accepted_train": avg_acc,
        "log": log,
        "args": vars(args),
    }
    t_eval = time.perf_counter()
    if args.eval_data or long_records:
        from .loading import load_draft

        trained = load_draft(out)
    if args.eval_data:
        ev = evaluate_tau(model, trained, tokenizer, eval_records, args.eval_max_tokens, B)
        result["eval"] = ev
        pp = " ".join(f"{x:.2f}" for x in ev["per_position_acceptance"])
        print(
            f"[eval] tau {ev['tau']:.3f} over {ev['prompts']} held-out prompts "
            f"({ev['cycles']} cycles); acceptance by position: {pp}",
            flush=True,
        )
    if long_records:
        result["eval_long"] = {}
        for n_ctx in parse_contexts(args.eval_contexts):
            ev = evaluate_tau(
                model, trained, tokenizer, long_records, args.eval_max_tokens, B, context=n_ctx
            )
            result["eval_long"][str(n_ctx)] = ev
            short = ev["prompt_tokens"]["min"] < n_ctx
            print(
                f"[eval] context {n_ctx}: tau {ev['tau']:.3f} over {ev['prompts']} held-out "
                f"texts ({ev['cycles']} cycles, {ev['seconds']:.0f}s)"
                + (f"; shortest text only {ev['prompt_tokens']['min']} tokens" if short else ""),
                flush=True,
            )
    result["eval_seconds"] = time.perf_counter() - t_eval
    result["total_seconds"] = time.perf_counter() - t_start
    print(
        f"[time] data {t_data:.0f}s, train {train_seconds:.0f}s, "
        f"eval {result['eval_seconds']:.0f}s, total {result['total_seconds']:.0f}s",
        flush=True,
    )
    (out / "train_result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    try:
        train(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
