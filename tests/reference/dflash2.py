"""A plain-PyTorch DFlash 2 draft (z-lab's `DFlash2DraftModel`), independent of dflash_mlx.

Written from z-lab's description and transformers backend (the `dflash` package on
PyPI, `dflash/model.py`), in this reference's own code. On top of the DFlash draft in
`model.py`:

- every layer wraps attention and MLP in a grouped dynamic causal convolution over the
  block. For a sublayer input u (after its RMSNorm), the projection
  `kernel_projection(u)` viewed [L, 2, K, G] gives per-position kernels for the two
  sides (before, after) of K taps over G channel groups, and `base_kernel` [2, K, H]
  a learned per-channel kernel: conv_s(z)[t, c] = sum_j (base[s, j, c] + dyn[t, s, j,
  g(c)]) * z[t - j, c] (zero before the block). Layer: x += conv_1(attn(conv_0(u)));
  then the same around the MLP.
- a candidate selector: top-k of the draft's logits per position; walking from the
  anchor, candidate c after predecessor p scores logit(c) + sum_r pred[p, r] *
  proj(h)[r] * succ[c, r]; greedy takes the argmax, sampling draws from
  softmax(score / temperature) (what rejection sampling uses as q).

Checkpoint names are z-lab's: `layers.N.{attention,mlp}_conv.{base_kernel,
kernel_projection.weight}`, `candidate_selector.{hidden_projection.weight,
predecessor_codebook, successor_codebook}` (the codebooks bare, as stored).
"""

from __future__ import annotations

import torch
from torch import nn

from .model import MLP, Attention, DraftSpec, ReferenceDraft, RMSNorm


def grouped_conv(z: torch.Tensor, dyn: torch.Tensor, base: torch.Tensor, group: int):
    """z [B, L, H], dyn [B, L, K, G], base [K, H] -> [B, L, H]."""
    B, L, H = z.shape
    out = torch.zeros_like(z)
    for j in range(base.shape[0]):
        past = torch.cat([z.new_zeros(B, j, H), z], dim=1)[:, :L]  # z[t - j]
        per_channel = dyn[:, :, j].repeat_interleave(group, dim=-1)
        out = out + (base[j].to(z.dtype) + per_channel) * past
    return out


class Conv(nn.Module):
    def __init__(self, hidden: int, taps: int, group: int):
        super().__init__()
        self.taps, self.group, self.groups = taps, group, hidden // group
        self.base_kernel = nn.Parameter(torch.zeros(2, taps, hidden))
        self.kernel_projection = nn.Linear(hidden, 2 * taps * self.groups, bias=False)

    def kernels(self, u: torch.Tensor) -> torch.Tensor:
        B, L, _ = u.shape
        return self.kernel_projection(u).view(B, L, 2, self.taps, self.groups)


class Layer2(nn.Module):
    def __init__(self, spec: DraftSpec, sliding: bool):
        super().__init__()
        H = spec.hidden_size
        self.self_attn = Attention(spec, sliding)
        self.mlp = MLP(H, spec.intermediate_size)
        self.input_layernorm = RMSNorm(H, spec.eps)
        self.post_attention_layernorm = RMSNorm(H, spec.eps)
        self.attention_conv = Conv(H, spec.conv_kernel_size, spec.conv_group_size)
        self.mlp_conv = Conv(H, spec.conv_kernel_size, spec.conv_group_size)

    def forward(self, x, ctx, cos, sin, cache, layer, visible):
        g = self.attention_conv.group
        u = self.input_layernorm(x)
        dyn = self.attention_conv.kernels(u)
        base = self.attention_conv.base_kernel
        a = self.self_attn(
            grouped_conv(u, dyn[:, :, 0], base[0], g), ctx, cos, sin, cache, layer, visible
        )
        x = x + grouped_conv(a, dyn[:, :, 1], base[1], g)
        u = self.post_attention_layernorm(x)
        dyn = self.mlp_conv.kernels(u)
        base = self.mlp_conv.base_kernel
        m = self.mlp(grouped_conv(u, dyn[:, :, 0], base[0], g))
        return x + grouped_conv(m, dyn[:, :, 1], base[1], g)


class Selector(nn.Module):
    def __init__(self, spec: DraftSpec):
        super().__init__()
        V, r = spec.vocab_size, spec.selector_rank
        self.top_k = spec.selector_top_k
        self.predecessor_codebook = nn.Parameter(torch.zeros(V, r))
        self.successor_codebook = nn.Parameter(torch.zeros(V, r))
        self.hidden_projection = nn.Linear(spec.hidden_size, r, bias=False)

    def scores(self, proj_i, candidates_i, unary_i, previous):
        """Scores [B, k] of position i's candidates after `previous` [B]."""
        pred = self.predecessor_codebook[previous].float()  # [B, r]
        succ = self.successor_codebook[candidates_i].float()  # [B, k, r]
        return unary_i.float() + torch.einsum("br,br,bkr->bk", pred, proj_i.float(), succ)

    @torch.no_grad()
    def walk(self, hidden, logits, anchor, temperature=0.0, path=None, generator=None):
        """(tokens [B, n], q [B, n, V] float32 or None).

        Greedy (temperature 0): the argmax path. Sampling: draws from softmax(score /
        temperature); `path` [B, n] instead forces the predecessors (to read the q an
        other implementation's draws were taken from). q is zero off the top-k.
        """
        unary, candidates = torch.topk(logits.float(), self.top_k, dim=-1)
        proj = self.hidden_projection(hidden)
        previous, tokens, qs = anchor, [], []
        for i in range(hidden.shape[1]):
            s = self.scores(proj[:, i], candidates[:, i], unary[:, i], previous)
            if temperature > 0:
                q = torch.softmax(s / temperature, dim=-1)
                full = torch.zeros(logits.shape[0], logits.shape[-1], dtype=torch.float32)
                qs.append(full.scatter(-1, candidates[:, i].cpu(), q.cpu()))
                if path is None:
                    pick = torch.multinomial(q, 1, generator=generator)[:, 0]
                    previous = candidates[:, i].gather(-1, pick[:, None])[:, 0]
                else:
                    previous = path[:, i]
            else:
                pick = s.argmax(-1)
                previous = candidates[:, i].gather(-1, pick[:, None])[:, 0]
            tokens.append(previous)
        return torch.stack(tokens, 1), (torch.stack(qs, 1) if qs else None)


class ReferenceDFlash2(ReferenceDraft):
    """Same forward signature as ReferenceDraft; adds the selector."""

    def __init__(self, raw: dict):
        super().__init__(raw)
        spec = self.spec
        self.layers = nn.ModuleList(
            Layer2(spec, kind == "sliding_attention") for kind in spec.layer_types
        )
        self.candidate_selector = Selector(spec)

    def propose(self, hidden, head, anchor, temperature=0.0, path=None, generator=None):
        """hidden [B, n, H] of the positions after the anchor; head [V, H]."""
        logits = self.finish_logits(hidden @ head.to(hidden.dtype).T)
        return self.candidate_selector.walk(hidden, logits, anchor, temperature, path, generator)
