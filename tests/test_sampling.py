"""Speculative rejection sampling keeps the target's distribution; greedy accepts prefixes."""

from collections import Counter

import mlx.core as mx

from dflash_mlx.sampling import SamplingParams, greedy_accept, speculative_accept


def chi2(counts, probs, n):
    return sum((counts[i] - n * p) ** 2 / (n * p) for i, p in enumerate(probs) if p > 0)


def test_greedy_accept_takes_the_longest_matching_prefix():
    target = mx.array([4, 5, 6, 7])
    for drafted, n, nxt in [([4, 5, 6], 3, 7), ([4, 9, 6], 1, 5), ([1, 5, 6], 0, 4)]:
        a, t = greedy_accept(mx.array(drafted), target)
        assert (a.item(), t.item()) == (n, nxt)


def test_speculative_accept_emits_the_target_distribution():
    """First emitted token ~ p0; after accepting d1, the second ~ p1 (chi-square, 99.9%)."""
    V, n = 5, 8000
    mx.random.seed(0)
    logp, logq = mx.random.normal((3, V)) * 1.5, mx.random.normal((2, V)) * 1.5
    logp = logp - mx.logsumexp(logp, axis=-1, keepdims=True)
    logq = logq - mx.logsumexp(logq, axis=-1, keepdims=True)
    first, second = Counter(), Counter()
    for _ in range(n):
        drafted = mx.random.categorical(logq)
        a, nxt = speculative_accept(drafted, logq, logp)
        a, nxt, d = a.item(), nxt.item(), drafted.tolist()
        emitted = d[:a] + [nxt]
        first[emitted[0]] += 1
        if len(emitted) > 1:
            second[emitted[1]] += 1
    p = mx.exp(logp).tolist()
    # df = V-1 = 4: the 99.9% quantile is 18.47.
    assert chi2(first, p[0], n) < 18.47
    assert chi2(second, p[1], sum(second.values())) < 18.47


def test_filters_match_mlx_lm_sampler():
    """The distribution we accept against is the one mlx_lm's make_sampler samples from."""
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(1)
    logits = mx.random.normal((1, 12)) * 2
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    params = SamplingParams(temp=0.7, top_p=0.8, top_k=5)
    dist = mx.exp(params.log_distribution(logprobs))[0].tolist()
    sampler = make_sampler(temp=0.7, top_p=0.8, top_k=5)
    n = 4000
    counts = Counter(sampler(logprobs).item() for _ in range(n))
    assert all(counts[i] == 0 for i, p in enumerate(dist) if p == 0)
    support = sum(1 for p in dist if p > 0)
    assert support <= 5
    # df = support-1 <= 4: 99.9% quantile <= 18.47.
    assert chi2(counts, dist, n) < 18.47
