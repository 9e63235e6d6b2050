"""Acceptance: greedy prefix matching, and speculative rejection sampling.

Both run on the device and hand back small arrays, so a cycle needs one host sync.
Sampling distributions are mlx_lm's: its top-p / min-p / top-k filters on the
log-probabilities, then a temperature, in the order `mlx_lm.sample_utils.make_sampler`
applies them; so the emitted tokens follow exactly the target's sampling distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p


@dataclass
class SamplingParams:
    temp: float = 0.0
    top_p: float = 0.0
    min_p: float = 0.0
    min_tokens_to_keep: int = 1
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def log_distribution(self, logprobs: mx.array) -> mx.array:
        """Normalised log-probabilities [..., V] of what make_sampler would sample."""
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p, self.min_tokens_to_keep)
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        logits = logprobs * (1.0 / self.temp)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def greedy_accept(drafted: mx.array, target: mx.array) -> tuple[mx.array, mx.array]:
    """drafted [n], target argmaxes [n+1] -> (number accepted, the target's next token)."""
    n_accepted = mx.cumprod(drafted == target[:-1]).sum()
    return n_accepted, target[n_accepted]


def speculative_accept(
    drafted: mx.array,
    draft_logq: mx.array,
    target_logp: mx.array,
    key: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Speculative rejection sampling (Leviathan et al. 2023; Chen et al. 2023).

    drafted [n] were sampled from q = exp(draft_logq) [n, V]; p = exp(target_logp)
    [n+1, V] is the target's distribution at each block position. Accept d_i with
    probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw from
    normalise(max(0, p_i - q_i)); if all are accepted draw a bonus token from p_n.
    Returns (number accepted, the next token).
    """
    n = drafted.shape[0]
    k_accept, k_resample = mx.random.split(key) if key is not None else (None, None)
    idx = mx.arange(n)
    p_d = mx.exp(target_logp[idx, drafted])
    q_d = mx.exp(draft_logq[idx, drafted])
    u = mx.random.uniform(shape=(n,), key=k_accept)
    n_accepted = mx.cumprod(u * q_d < p_d).sum()

    p, q = mx.exp(target_logp[:n]), mx.exp(draft_logq)
    residual = mx.maximum(p - q, 0.0)
    # p == q leaves no residual mass; then any rejection had probability 0, keep p.
    residual = mx.where(residual.sum(axis=-1, keepdims=True) > 0, residual, p)
    candidates = mx.concatenate([mx.log(residual), target_logp[n:]], axis=0)
    resampled = mx.random.categorical(candidates, key=k_resample)
    return n_accepted, resampled[n_accepted]
