"""The DFlash greedy decode loop over a `transformers` causal-LM target (PyTorch).

What the paper's transformers backend runs: prefill the target (keeping hidden states),
take its first token, then cycle: draft a block [last token, MASK × (B-1)] in one draft
forward → verify the block with ONE target forward → accept the longest prefix the target
agrees with, plus the target's own next token → crop the target cache to the accepted
length → feed the accepted positions' tapped hidden states to the draft next cycle.
Greedy output is exactly the target's own greedy output.
"""

from __future__ import annotations

import torch

from .model import ReferenceDraft


def _taps(hidden_states: tuple[torch.Tensor, ...], layer_ids: list[int]) -> torch.Tensor:
    # hidden_states[0] is the embedding output, so layer i's output is hidden_states[i + 1].
    return torch.cat([hidden_states[i + 1] for i in layer_ids], dim=-1)


def _crop(cache, length: int) -> None:
    # crop(-n) removes n tokens in every transformers version (crop(positive) is gone in 5.x).
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@torch.inference_mode()
def dflash_generate(
    draft: ReferenceDraft,
    target: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    block_size: int | None = None,
    stop_token_ids: list[int] | None = None,
) -> tuple[list[int], list[int]]:
    """Greedy DFlash decoding. input_ids [1, n]. Returns (new token ids, acceptance
    length per cycle: accepted drafts + 1). Every cycle uses the full block, as the
    paper's loop does; the output is cut to max_new_tokens."""
    from transformers import DynamicCache

    B = block_size or draft.block_size
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    dtype = next(draft.parameters()).dtype
    cache, draft_cache = DynamicCache(), draft.make_cache()
    out = target(input_ids, past_key_values=cache, use_cache=True, output_hidden_states=True)
    tokens = [int(out.logits[0, -1].argmax())]
    context = _taps(out.hidden_states, draft.spec.target_layer_ids)
    length = input_ids.shape[1]  # tokens in the target cache
    acceptance = []
    stops = set(stop_token_ids or [])
    while len(tokens) < max_new_tokens and not stops.intersection(tokens):
        block = torch.full((1, B), draft.mask_token_id, device=input_ids.device)
        block[0, 0] = tokens[-1]
        hidden = draft(embed(block).to(dtype), context.to(dtype), draft_cache)
        drafted = head(hidden[:, 1:].to(head.weight.dtype)).argmax(-1)
        block[0, 1:] = drafted[0]

        out = target(block, past_key_values=cache, use_cache=True, output_hidden_states=True)
        posterior = out.logits[0].argmax(-1)
        matches = (block[0, 1:] == posterior[:-1]).int()
        accepted = int(matches.cumprod(0).sum())
        tokens += block[0, 1 : accepted + 1].tolist() + [int(posterior[accepted])]
        length += accepted + 1
        _crop(cache, length)
        context = _taps(out.hidden_states, draft.spec.target_layer_ids)[:, : accepted + 1]
        acceptance.append(accepted + 1)

    tokens = tokens[:max_new_tokens]
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[: i + 1], acceptance
    return tokens, acceptance
