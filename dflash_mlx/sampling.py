"""Acceptance: greedy prefix matching, and speculative rejection sampling.

Both run on the device and hand back small arrays, so a cycle needs one host sync.

`SamplingParams.log_distribution` gives, as a float32 log-distribution, exactly what
`mlx_lm.sample_utils.make_sampler` samples from: the same filters, in the same order
(top-p, min-p, XTC, top-k), applied to the same log-probabilities in the model's
dtype, and the temperature applied in that dtype too, as mlx_lm's
`categorical_sampling` does; only then float32, so the acceptance maths (exp, p/q,
max(p - q, 0)) adds no rounding of its own. XTC, which mlx_lm applies with
probability `xtc_probability`, is the exact mixture of its two outcomes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import astuple, dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p


@dataclass
class SamplingParams:
    temp: float = 0.0
    top_p: float = 0.0
    min_p: float = 0.0
    min_tokens_to_keep: int = 1
    top_k: int = 0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    xtc_special_tokens: list[int] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    def key(self) -> tuple:
        """The settings as a hashable value (what a compiled cycle samples with)."""
        return tuple(tuple(v) if isinstance(v, list) else v for v in astuple(self))

    def check(self, name: Callable[[str], str] = str) -> None:
        """The argument errors mlx_lm's sampler would raise, before any work; `name`
        spells a field in the message (the CLI: its flag)."""
        for field_ in ("temp", "top_p", "min_p", "xtc_probability", "xtc_threshold"):
            value = getattr(self, field_)
            if not math.isfinite(value):
                raise ValueError(f"{name(field_)} must be a finite number, got {value}")
        bounds = {
            "temp": (0, math.inf),
            "top_p": (0, 1),
            "min_p": (0, 1),
            "top_k": (0, math.inf),
            "min_tokens_to_keep": (1, math.inf),
            "xtc_probability": (0, 1),
            "xtc_threshold": (0, 0.5),
        }
        for field_, (lo, hi) in bounds.items():
            value = getattr(self, field_)
            if not lo <= value <= hi:
                where = f">= {lo}" if hi == math.inf else f"in [{lo}, {hi}]"
                raise ValueError(f"{name(field_)} must be {where}, got {value}")

    def log_distribution(self, logits: mx.array) -> mx.array:
        """float32 log-probabilities [..., V] of what make_sampler samples from `logits`."""
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if 0 < self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.min_p != 0.0:
            logprobs = apply_min_p(logprobs, self.min_p, self.min_tokens_to_keep)
        if self.xtc_probability <= 0:
            return self._finish(logprobs)
        kept = self._finish(logprobs)
        cut = self._finish(self._xtc_cut(logprobs))
        if self.xtc_probability >= 1:
            return cut
        return mx.logaddexp(
            kept + math.log1p(-self.xtc_probability), cut + math.log(self.xtc_probability)
        )

    def _xtc_cut(self, logprobs: mx.array) -> mx.array:
        """apply_xtc's outcome when it fires: drop every token above the threshold but the
        least likely of them (special tokens are never dropped)."""
        probs = mx.softmax(logprobs, -1)
        least = mx.where(probs > self.xtc_threshold, probs, mx.inf).min(axis=-1, keepdims=True)
        drop = probs > least
        if self.xtc_special_tokens:
            keep = mx.zeros(drop.shape[-1], dtype=mx.bool_)
            keep[mx.array(self.xtc_special_tokens)] = True
            drop = drop & ~keep
        return mx.where(drop, -mx.inf, logprobs)

    def _finish(self, logprobs: mx.array) -> mx.array:
        if self.top_k > 0:
            logprobs = apply_top_k(logprobs, self.top_k)
        scaled = (logprobs * (1.0 / self.temp)).astype(mx.float32)
        return scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)


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
    Computed in float32 whatever the inputs' dtype. Returns (number accepted, next token).
    """
    draft_logq = draft_logq.astype(mx.float32)
    target_logp = target_logp.astype(mx.float32)
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
