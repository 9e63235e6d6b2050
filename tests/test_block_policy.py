"""--block-size auto: the expected-tokens model, the width it picks, probing, the cost
cache, and lossless output whatever the widths."""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step

from dflash_mlx import block_policy
from dflash_mlx.block_policy import AutoPolicy, Costs, FixedPolicy, expected_tokens, make_policy
from dflash_mlx.generate import dflash_cycles


def exact_expected_tokens(rates: list[float], width: int) -> float:
    """E[tokens per cycle] by enumerating every outcome of the w-1 drafts: the accepted
    prefix ends at the first rejection; the cycle emits it plus the target's token."""
    total = 0.0
    for outcome in itertools.product([True, False], repeat=width - 1):
        p, k = 1.0, None
        for i, accepted in enumerate(outcome):
            p *= rates[i] if accepted else 1 - rates[i]
        k = next((i for i, accepted in enumerate(outcome) if not accepted), width - 1)
        total += p * (k + 1)
    return total


@pytest.mark.parametrize("width", [1, 2, 3, 5, 8])
def test_expected_tokens_is_the_mean_over_all_outcomes(width):
    rates = [0.9, 0.7, 0.55, 0.8, 0.3, 0.6, 0.95]
    assert expected_tokens(rates, width) == pytest.approx(exact_expected_tokens(rates, width))


def best_by_hand(rates, seconds):
    return max(seconds, key=lambda w: exact_expected_tokens(rates, w) / seconds[w])


@pytest.mark.parametrize(
    "seconds",
    [
        {1: 1.0, 2: 1.1, 4: 1.2, 8: 1.5, 16: 2.5},  # GPU-like: verify width nearly free
        {1: 1.0, 2: 2.0, 4: 3.6, 8: 6.5, 16: 12.0},  # CPU-like: a verify costs per token
        {1: 1.0, 2: 1.3, 4: 1.6, 8: 2.1, 16: 3.0},
    ],
)
def test_auto_picks_the_width_with_most_tokens_per_second(seconds):
    rates = [0.9, 0.85, 0.8, 0.75, 0.7, 0.7, 0.6, 0.6, 0.5, 0.5, 0.5, 0.4, 0.4, 0.3, 0.3]
    policy = AutoPolicy(Costs(dict(seconds)), rates, 16)
    policy.acceptance.strength = 1e9  # the rates exactly (no observations yet anyway)
    assert policy.choose() == best_by_hand(rates, seconds)


def test_observed_acceptance_moves_the_rates():
    """Counts with a prior of strength m: a_i = (s_i + m p_i) / (s_i + f_i + m), all of
    them decayed by the same factor per cycle."""
    acc = block_policy.Acceptance([0.5, 0.5, 0.5], strength=2.0, decay=1.0)
    acc.observe(4, 1)  # position 1 accepted, 2 rejected, 3 not tried
    acc.observe(4, 3)  # all three accepted
    assert acc.rates() == pytest.approx([(2 + 1) / (2 + 2), (1 + 1) / (2 + 2), (1 + 1) / (1 + 2)])
    acc = block_policy.Acceptance([0.8], strength=4.0, decay=0.5)
    acc.observe(2, 0)  # counts halve: 1.6 accepted, 0.4 + 1 rejected
    assert acc.rates() == pytest.approx([1.6 / 3.0])


def test_auto_falls_back_to_plain_steps_and_probes_back():
    """Drafts never accepted: plain steps, and probes whose extra time stays within a
    few percent; acceptance recovers: drafting again from the next probe on."""
    seconds = {1: 1.0, 2: 1.1, 4: 1.2, 8: 1.5, 16: 2.5}
    policy = AutoPolicy(Costs(seconds), [0.8] * 15, 16)
    widths = []
    for _ in range(5000):
        w = policy.choose()
        widths.append(w)
        policy.observe(w, 0, seconds[w])
    extra = sum(seconds[w] - 1 for w in widths[100:])
    assert widths[-1] == 1 and extra < 0.02 * len(widths[100:])
    probes = [i for i, w in enumerate(widths) if w > 1 and i > 100]
    assert all(b - a > 2 * block_policy.PROBE_AFTER for a, b in itertools.pairwise(probes))
    # The text turns predictable: every draft is accepted from now on. (Positions past
    # the widths tried keep the prior's rate, so the width settles at 8 here, not 16.)
    n = len(widths)
    for _ in range(20000):
        w = policy.choose()
        widths.append(w)
        policy.observe(w, w - 1, seconds[w])
        if min(widths[-20:]) > 1:
            break
    assert min(widths[-20:]) >= 8 and len(widths) - n < 30 * block_policy.PROBE_AFTER << 8


def test_auto_on_cpu_like_costs_decodes_plainly():
    """Where even the prior's acceptance does not pay for a draft (a CPU: a verify costs
    about a step per token), auto decodes plainly from the first cycle on, and its
    probes cost under 2 % of the time."""
    seconds = {1: 1.0, 2: 2.0, 3: 2.6, 4: 3.0, 8: 4.6, 16: 8.1}
    rates = [0.71, 0.8, 0.79, 0.76, 0.87, 0.86, 0.92, 0.89, 0.98, 0.98]
    policy = AutoPolicy(Costs(seconds), rates + [0.98] * 5, 16)
    widths = []
    for _ in range(1000):
        w = policy.choose()
        widths.append(w)
        policy.observe(w, 0, seconds[w])
    assert widths[0] == 1
    assert sum(seconds[w] - 1 for w in widths) < 0.02 * len(widths)


def test_probes_cost_their_budget_when_the_text_is_worse_than_the_prior():
    """A prior that nearly pays (width 4: 1.06x a plain step's rate, under GAIN) and a
    text whose drafts all fail, in 128-token generations: a probe's real loss (2 steps'
    time) is taken off its credit, so the probes cost ~1.6 % of the time (probing on the
    prior's expected loss alone, every 4, 8, 16, ... steps: 8 %)."""
    seconds = {1: 1.0, 2: 1.9, 3: 2.4, 4: 3.0}
    rates = [0.85] * 3
    assert expected_tokens(rates, 4) / seconds[4] < block_policy.GAIN
    lost = spent = 0.0
    for _ in range(20):
        policy = AutoPolicy(Costs(seconds), rates, 4)
        emitted = 0
        while emitted < 128:
            w = policy.choose()
            policy.observe(w, 0, seconds[w])
            emitted += 1
            lost, spent = lost + seconds[w] - 1, spent + seconds[w]
    assert lost / spent < 0.025


def test_costs_are_linear_in_the_context_between_and_beyond_the_two_measured():
    costs = Costs({1: 1.0, 4: 2.0}, 512, {1: 2.0, 4: 8.0}, 4096)
    assert costs.at(4) == 2.0  # no context: the short one's
    assert costs.at(4, 512) == pytest.approx(2.0)
    assert costs.at(4, 2304) == pytest.approx(5.0)  # halfway
    assert costs.at(4, 7680) == pytest.approx(14.0)  # beyond: the same slope
    assert costs.at(1, 0) == pytest.approx(1.0 - 512 / 3584)
    # Cheaper with more context: noise, which only adds time; the lower reading, flat.
    assert Costs({1: 1.0}, 512, {1: 0.9}, 4096).at(1, 128) == 0.9
    assert Costs({1: 1.0, 2: 1.5}, 512, {1: 2.0}, 4096).at(2, 4096) == 1.5  # not measured long
    assert Costs.from_json(costs.to_json()) == costs
    with pytest.raises(ValueError, match="format"):  # a file from before: measured again
        Costs.from_json({"format": 1, "context": 512, "seconds": {"1": 1.0}})


def test_auto_at_a_long_context_decodes_plainly_where_drafting_stops_paying(monkeypatch):
    """CPU-like growth with the context (a verify's attention reads every key once per
    query): at 512 positions width 8 pays, at 4k nothing does. Auto drafts from the first
    cycle at 512, decodes plainly from the first at 4k, and a generation that starts
    short stops drafting as its context passes where width 8 stops paying."""
    short = {1: 1.0, 2: 1.3, 4: 1.6, 8: 2.2, 16: 3.5}
    long = {1: 1.6, 2: 4.0, 4: 6.5, 8: 11.0, 16: 20.0}
    costs = Costs(short, 512, long, 4096)
    rates = [0.8] * 15
    assert AutoPolicy(costs, rates, 16, timed=False, context=512).choose() > 1
    assert AutoPolicy(costs, rates, 16, timed=False, context=4096).choose() == 1
    # E(w) at 0.8 and each width's linear cost: where the best drafting width's tokens
    # per second fall below a plain step's.
    at = lambda w, c: short[w] + (long[w] - short[w]) * (c - 512) / 3584
    crossing = next(
        c
        for c in range(512, 4096)
        if max(expected_tokens(rates, w) / at(w, c) for w in (2, 4, 8, 16)) < 1 / at(1, c)
    )
    policy = AutoPolicy(costs, rates, 16, timed=False, context=512)
    policy.acceptance = block_policy.Acceptance(rates, strength=1e9, decay=1.0)  # 0.8 stays,
    monkeypatch.setattr(block_policy, "REALIZED_WEIGHT", 1e9)  # and so does E(w)
    context, first_plain = 512, None
    while context < 4096 and first_plain is None:
        w = policy.choose()
        if w == 1 and policy.plain == 1 and first_plain is None and context > 512:
            first_plain = context
        accepted = round(expected_tokens(rates, w)) - 1
        policy.observe(w, accepted, None)
        context += 1 + accepted
    assert first_plain is not None and abs(first_plain - crossing) <= 16


def test_a_width_run_in_a_predictable_stretch_does_not_beat_the_block():
    """A wider cycle emits what a narrower one would at the same point and, if those
    drafts all pass, more: so a width whose cycles happened to run in predictable
    stretches (12: 10 tokens a cycle) is not expected to emit more than the block (16:
    8 a cycle, run elsewhere), whose E exceeds it by what the rates expect of positions
    12-15. The block is chosen though it costs 1 % more (a GPU: costs flat in width)."""
    rates = [0.9] * 15
    seconds = {1: 0.5, 8: 1.0, 12: 1.0, 16: 1.01}
    policy = AutoPolicy(Costs(seconds), rates, 16, timed=False)
    policy.realized = {12: [20.0, 2.0], 16: [16.0, 2.0]}
    E = policy.expected(policy.acceptance.rates())
    extra = expected_tokens(rates, 16) - expected_tokens(rates, 12)
    assert E[16] == pytest.approx(E[12] + extra) and E[12] >= E[8]
    assert policy.choose() == 16


def test_a_hiccup_does_not_hand_the_choice_to_a_narrower_width():
    """Costs flat in the width (a GPU) and every tenth cycle reading twice its cost (a
    hiccup: another process, a pause): the block stays the choice (without the bound on
    one reading, width 12 took over for stretches: 16 in 75-97 % of the cycles)."""
    import random

    seconds = {1: 0.5, 8: 1.0, 12: 1.0, 16: 1.0}
    share = []  # of width 16 in cycles 100-299, one text (seed) each
    for seed in range(8):
        policy = AutoPolicy(Costs(seconds), [0.8] * 15, 16)
        rnd = random.Random(seed)
        widths = []
        for i in range(300):
            w = policy.choose()
            accepted = next((k for k in range(w - 1) if rnd.random() > 0.8), w - 1)
            policy.observe(w, accepted, seconds[w] * (2.0 if i % 10 == 9 else 1.0))
            widths.append(w)
        share.append(widths[100:].count(16) / 200)
    assert sum(share) / len(share) >= 0.95 and min(share) >= 0.9


def test_drafting_starts_only_where_it_clearly_pays_and_goes_on_while_it_pays():
    """At break-even (the model's drafting 1.05x a plain step's tokens per second) the
    first cycle is plain; after a probe that paid by GAIN, drafting at 1.05x goes on."""
    rates = [0.5] * 15
    e4 = expected_tokens(rates, 4)
    seconds = {1: 1.0, 4: e4 / 1.05}
    policy = AutoPolicy(Costs(seconds), rates, 4, timed=False)
    policy.acceptance = block_policy.Acceptance(rates, strength=1e9, decay=1.0)
    assert policy.choose() == 1
    while (w := policy.choose()) == 1:  # plain steps until the probe
        policy.observe(1, 0, None)
    policy.observe(w, 3, None)  # all its drafts passed: 4 tokens in 0.97 steps' time
    assert [policy.choose() for _ in range(5)] == [4] * 5


def test_cost_readings_in_rounds_keep_their_ratios_on_a_drifting_machine():
    """Costs read while the machine slows by half over the measurement (clocks, other
    load): every width's readings are spread over the whole run, so the medians keep
    the widths' true ratios (timed in blocks, the widest would read 1.4x dearer)."""
    widths = [1, 2, 4, 8, 16]
    true = {1: 1.0, 2: 2.0, 4: 2.2, 8: 2.6, 16: 3.0}
    script, timed = block_policy.measurement_script(widths)
    readings = {}
    for i in timed:
        readings.setdefault(script[i], []).append(true[script[i]] * (1 + 0.5 * i / len(script)))
    assert all(len(readings[w]) == block_policy.TIMED for w in widths)
    medians = {w: sorted(t)[len(t) // 2] for w, t in readings.items()}
    for w in widths:
        assert medians[w] / medians[1] == pytest.approx(true[w] / true[1], rel=0.1)


def test_a_prior_that_nearly_pays_probes_soon():
    """CPU-like costs (a verify of w tokens ~0.75 w steps) and a text whose drafts are
    all accepted: with the training result's acceptance at the sequence's length (1k:
    it nearly pays), auto probes after a few plain steps and drafts from then on; with
    the short-prompt acceptance (far from paying) its first probe waits for 30+ plain
    steps, so that the probe's expected loss stays under PROBE_BUDGET."""
    from types import SimpleNamespace

    seconds = {1: 1.0, 2: 2.4, 3: 3.4, 4: 3.6, 5: 4.4, 6: 5.5, 8: 5.5, 16: 11.9}
    at_1k = [0.91, 0.77, 0.69, 0.60, 0.55, 0.49, 0.46, 0.42, 0.39, 0.36, 0.35, 0.32, 0.3]
    short = [0.74, 0.58, 0.45, 0.36, 0.29, 0.25, 0.22, 0.20, 0.19, 0.18, 0.17, 0.17, 0.16]
    draft = SimpleNamespace(acceptance_prior={64: short, 1024: at_1k, 4096: at_1k})
    runs = {}
    for context in (100, 900):
        policy = AutoPolicy(Costs(seconds), block_policy.prior_rates(draft, 16, context), 16)
        runs[context] = []
        for _ in range(64):
            w = policy.choose()
            runs[context].append(w)
            policy.observe(w, w - 1, seconds[w])
    assert min(i for i, w in enumerate(runs[100]) if w > 1) >= 30
    first = min(i for i, w in enumerate(runs[900]) if w > 1)
    after = runs[900][first:]
    assert first <= block_policy.PROBE_AFTER and min(w for w in after if w > 1) >= 8
    # Drafting pays under STEP_MARGIN plain steps here: now and then a plain step is
    # timed, and no more.
    assert 0 < after.count(1) <= 2 * (1 + len(after) // block_policy.STEP_EVERY)


def test_untried_positions_and_wider_tries_find_a_predictable_text():
    """Costs measured where width 2 looked best (a cheap 2-row verify, wide verifies
    dear) but wide cycles really cost less here, and a text whose drafts are all
    accepted: positions past those drafted take the furthest drafted one's rate, and a
    wider try every WIDER_EVERY cycles measures the real cost, so auto ends up drafting
    the whole block."""
    measured = {1: 1.0, 2: 1.4, 3: 2.5, 4: 3.2, 8: 4.8, 16: 8.4}
    real = {1: 1.0, 2: 1.4, 3: 2.0, 4: 2.3, 8: 3.3, 16: 5.5}
    acc = block_policy.Acceptance([0.9, 0.5, 0.5, 0.5])
    acc.observe(2, 1)
    assert acc.tried == 1 and min(acc.rates()[1:]) == pytest.approx(acc.rates()[0])
    at_1k = [0.91, 0.84, 0.9, 0.87, 0.92, 0.89, 0.94, 0.9, 0.94, 0.92, 0.97, 0.99, 0.94, 0.97]
    policy = AutoPolicy(Costs(measured), [*at_1k, 0.97], 16)
    widths = []
    for _ in range(60):
        w = policy.choose()
        widths.append(w)
        policy.observe(w, w - 1, real[w])
    assert widths[0] == 2 and widths[-30:] == [16] * 30


def test_a_stale_step_cost_is_timed_again():
    """Costs measured where a plain step cost 1.6x what it costs now (another machine
    state, a shorter context), drafts accepted at 0.9 a position: by the file every
    drafting width beats a plain step, by the real costs none does (E(5) = 4.1 tokens for
    4.5 steps). A drafting run never times a plain step, so auto times one now and then
    and ends up decoding plainly: its time per token within 5 % of a plain step's."""
    import random

    measured = {1: 1.6, 2: 2.9, 3: 3.4, 4: 4.2, 5: 4.8}
    real = {1: 1.0, 2: 2.7, 3: 3.1, 4: 3.9, 5: 4.5}
    rates = [0.9] * 4
    assert all(expected_tokens(rates, w) / real[w] < 1 for w in real if w > 1)
    assert all(expected_tokens(rates, w) / measured[w] > 1 / 1.6 for w in real if w > 1)
    rnd = random.Random(0)
    policy = AutoPolicy(Costs(measured), rates, 5)
    time_spent = tokens = 0.0
    for i in range(400):
        w = policy.choose()
        accepted = next((k for k in range(w - 1) if rnd.random() > 0.9), w - 1)
        policy.observe(w, accepted, real[w])
        if i >= 100:
            time_spent, tokens = time_spent + real[w], tokens + 1 + accepted
    assert time_spent / tokens < 1.05


def test_wide_cycles_cheaper_than_measured_are_found_from_plain_steps():
    """A CPU at a shorter context than the costs were measured at: there a width-16
    cycle cost 13 steps, here 8, and a text whose drafts are accepted at 0.95 a position
    under a short-prompt prior. By the file no width pays (so auto falls back to plain
    steps); by the real costs the full block pays 1.4x a plain step and narrow ones barely
    at all. Untried widths counting UNTRIED of their cost, a probe's acceptance leads auto
    to try the block and keep it: its time per token within 10 % of fixed 16's."""
    import random

    measured = {1: 1.0, 2: 2.5, 3: 3.2, 4: 4.0, 8: 7.0, 16: 13.0}
    real = {1: 1.0, 2: 2.4, 3: 3.0, 4: 3.6, 8: 5.2, 16: 8.0}
    short = [0.74, 0.58, 0.45, 0.36, 0.29, 0.25, 0.22, 0.20, 0.19, 0.18, 0.17, 0.17, 0.16]
    prior = block_policy.prior_rates(SimpleNamespace(acceptance_prior=short), 16)
    assert all(expected_tokens([0.95] * 15, w) / measured[w] < 1 for w in measured if w > 1)
    rnd = random.Random(1)
    policy = AutoPolicy(Costs(measured), prior, 16)
    spent = tokens = 0.0
    for i in range(400):
        w = policy.choose()
        accepted = next((k for k in range(w - 1) if rnd.random() > 0.95), w - 1)
        policy.observe(w, accepted, real[w])
        if i >= 200:
            spent, tokens = spent + real[w], tokens + 1 + accepted
    fixed = real[16] / expected_tokens([0.95] * 15, 16)
    assert fixed < 1 / 1.3 and spent / tokens < 1.1 * fixed


def test_a_text_in_stretches_is_drafted_at_its_best_width():
    """A text whose drafts are all accepted or none (the first draft rejected in a
    quarter of the cycles), under a prior that is low past position 4: the true E(w) is
    1 + 0.75 (w - 1), so by hand the block size pays most; over 20 seeded runs the
    width auto settles on most often (last 20 of 60 cycles) is that one."""
    import random
    from collections import Counter

    seconds = {1: 1.0, 2: 1.5, 3: 1.9, 4: 2.2, 5: 2.5, 6: 2.9, 8: 3.6, 10: 4.3, 12: 5.0, 16: 6.5}
    by_hand = max(seconds, key=lambda w: (1 + 0.75 * (w - 1)) / seconds[w])
    late = Counter()
    for seed in range(20):
        rnd = random.Random(seed)
        policy = AutoPolicy(Costs(seconds), [0.9, 0.85, 0.8, 0.75] + [0.6] * 11, 16, timed=False)
        for i in range(60):
            w = policy.choose()
            policy.observe(w, 0 if rnd.random() < 0.25 else w - 1, seconds[w])
            late.update([w] if i >= 40 else [])
    assert by_hand == 16 and late.most_common(1)[0][0] == by_hand


def test_fixed_and_bad_block_sizes():
    assert isinstance(make_policy(None, None, 6), FixedPolicy)
    assert make_policy(None, None, 6).choose() == 6
    for bad in (0, -3, "big", 2.5, True):
        with pytest.raises(ValueError, match="block size"):
            make_policy(None, None, bad)


def test_prior_from_the_training_result():
    """train_result.json gives P(first k accepted); the prior is its conditional rates."""

    from types import SimpleNamespace

    draft = SimpleNamespace(acceptance_prior=[0.8, 0.4, 0.2])
    assert block_policy.prior_rates(draft, 6) == pytest.approx([0.8, 0.5, 0.5, 0.5, 0.5])
    assert block_policy.prior_rates(object(), 3) == [block_policy.GENERIC_PRIOR] * 2
    # Held-out texts at several lengths: the nearest one (by ratio) to the sequence's.
    draft = SimpleNamespace(acceptance_prior={60: [0.5], 1024: [0.8], 4096: [0.9]})
    rates = lambda context: block_policy.prior_rates(draft, 2, context)
    assert [rates(None), rates(200), rates(300), rates(3000), rates(10**5)] == [
        [0.5],
        [0.5],
        [0.8],
        [0.9],
        [0.9],
    ]


def test_load_draft_reads_the_training_result(tmp_path, tiny_pair):
    from dflash_mlx import load_draft

    _, _, draft_dir = tiny_pair
    copy = tmp_path / "draft"
    copy.mkdir()
    for f in draft_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert getattr(load_draft(copy), "acceptance_prior", None) is None
    result = {"eval": {"per_position_acceptance": [0.7, 0.5, 0.25]}}
    (copy / "train_result.json").write_text(json.dumps(result))
    assert load_draft(copy).acceptance_prior == {64: [0.7, 0.5, 0.25]}
    # As `dflash-mlx train` writes it: short prompts (their lengths), long texts per context.
    result = {
        "eval": {"per_position_acceptance": [0.7, 0.5], "prompt_tokens": {"min": 45, "max": 80}},
        "eval_long": {
            "1024": {"per_position_acceptance": [0.9, 0.8], "context": 1024},
            "4096": {"per_position_acceptance": [0.85, 0.7], "context": 4096},
        },
    }
    (copy / "train_result.json").write_text(json.dumps(result))
    assert load_draft(copy).acceptance_prior == {
        60: [0.7, 0.5],
        1024: [0.9, 0.8],
        4096: [0.85, 0.7],
    }


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    from conftest import write_random_draft
    from mlx_lm import load as mlx_lm_load
    from tiny_models import load_config, make_target

    from dflash_mlx import load_draft

    root = tmp_path_factory.mktemp("auto")
    target = make_target(root / "target", "qwen3")
    draft_dir = write_random_draft(root / "draft", load_config(target), block_size=8)
    model, _ = mlx_lm_load(str(target))
    return model, load_draft(draft_dir), draft_dir


def greedy_reference(model, prompt, n):
    steps = generate_step(mx.array(prompt), model, max_tokens=n)
    return [int(t) for t, _ in steps]


PROMPT = [5, 17, 42, 7, 99, 3, 12, 8]


def test_measured_costs_are_cached_and_auto_is_lossless(tmp_path, monkeypatch, tiny_pair):
    """On this machine's own measured costs (real timing, cached per pair under
    XDG_CACHE_HOME): output == mlx_lm greedy; the second run reads the file."""
    model, draft, _ = tiny_pair
    monkeypatch.undo()  # the real cached_costs, not the suite's GPU-like stand-in
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(block_policy, "_measured", {})
    expected = greedy_reference(model, PROMPT, 40)
    got = [
        t for c in dflash_cycles(model, draft, mx.array(PROMPT), max_tokens=40) for t in c.tokens
    ]
    assert got == expected
    files = list((tmp_path / "dflash_mlx").glob("costs-*.json"))
    assert len(files) == 1
    costs = Costs.from_json(json.loads(files[0].read_text()))
    assert set(costs.seconds) == set(block_policy.widths_up_to(draft.block_size))
    assert set(costs.long) == set(costs.seconds)  # also at the long context
    assert costs.long_context == block_policy.LONG_CONTEXT
    calls = []
    monkeypatch.setattr(block_policy, "_measured", {})
    monkeypatch.setattr(block_policy, "measure_costs", lambda *a, **k: calls.append(a))
    make_policy(model, draft, "auto")
    assert calls == []


def test_a_bad_cost_file_is_measured_again(tmp_path, monkeypatch, tiny_pair):
    model, draft, _ = tiny_pair
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(block_policy, "_measured", {})
    path = block_policy.costs_path(model, draft)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    policy = make_policy(model, draft, "auto")
    assert isinstance(policy, AutoPolicy)
    assert (
        Costs.from_json(json.loads(path.read_text())).seconds.keys() == policy.costs.seconds.keys()
    )


@pytest.mark.parametrize("draft_kind", ["oracle", "random"])
def test_auto_widths_vary_and_output_is_the_targets(tiny_pair, draft_kind):
    """GPU-like costs (the suite's stand-in): an oracle draft keeps full blocks, a random
    one falls back to plain steps and probes; either way output == mlx_lm greedy."""
    from test_generate import OracleDraft

    model, draft, _ = tiny_pair
    n = 120
    expected = greedy_reference(model, PROMPT, n + draft.block_size)
    if draft_kind == "oracle":
        draft = OracleDraft(draft.config, PROMPT + expected, [None])
    expected = expected[:n]
    widths = []

    class Recording(AutoPolicy):
        def observe(self, width, accepted, seconds):
            widths.append(width)
            super().observe(width, accepted, seconds)

    base = make_policy(model, draft, "auto")
    policy = Recording(base.costs, base.acceptance.prior, draft.block_size)
    cycles = dflash_cycles(model, draft, mx.array(PROMPT), max_tokens=n, policy=policy)
    got = [t for c in cycles for t in c.tokens]
    assert got == expected
    if draft_kind == "oracle":  # full blocks; plain steps only to time one now and then
        assert {w for w in widths[:-1] if w > 1} == {draft.block_size}
        assert widths.count(1) <= 2 * (1 + len(widths) // block_policy.STEP_EVERY)
    else:
        assert widths.count(1) > len(widths) / 2 and max(widths) > 1


def test_a_drafting_cycle_starts_after_the_queued_steps_are_read(tiny_pair, monkeypatch):
    """Without static caches (this CPU) a drafting cycle waits for its result: the plain
    steps queued before it are read (and timed) before it launches, so each cycle's wall
    time is its own: the policy weighs them against each other."""
    from dflash_mlx import session
    from dflash_mlx.block_policy import ScriptPolicy
    from dflash_mlx.session import VerifySession

    model, draft, _ = tiny_pair
    events = []

    class Recording(ScriptPolicy):
        def choose(self):
            events.append("choose")
            return super().choose()

        def observe(self, width, accepted, seconds):
            events.append("observe")
            super().observe(width, accepted, seconds)

    propose = VerifySession.propose

    def recorded(self, *args, **kwargs):
        events.append("propose")
        return propose(self, *args, **kwargs)

    monkeypatch.setattr(VerifySession, "propose", recorded)
    monkeypatch.setitem(session.STATIC_MAX_POSITIONS, "cpu", 0)  # the CPU's own path
    script = [1, 1, 1, 4, 1, 1, 4, 1, 1]
    cycles = dflash_cycles(model, draft, mx.array(PROMPT), max_tokens=40, policy=Recording(script))
    tokens = [t for c in cycles for t in c.tokens]
    assert tokens == greedy_reference(model, PROMPT, 40)
    launches = [i for i, e in enumerate(events) if e == "propose" and i > 0]
    assert len(launches) >= 2
    for i in launches:  # every cycle chosen before this one has been read
        assert events[:i].count("observe") == events[:i].count("choose") - 1


def test_the_long_context_cache_is_a_valid_prompt_cache(tiny_pair):
    """measure_costs' long context (a short prefill's keys repeated, no prefill of its
    length): decoding from it gives mlx_lm's greedy tokens from the same target cache."""
    from mlx_lm.models.cache import KVCache

    model, draft, _ = tiny_pair
    cache = block_policy.repeated_cache(model, draft, 300)
    n = len(cache) - len(draft.layers)
    assert {c.offset for c in cache} == {300}
    theirs = []
    for c in cache[:n]:
        keys, values, offset = c.state
        fresh = KVCache()
        fresh.state = (keys[..., :offset, :] * 1, values[..., :offset, :] * 1, offset)
        theirs.append(fresh)
    prompt = mx.array([7])
    expected = [int(t) for t, _ in generate_step(prompt, model, max_tokens=24, prompt_cache=theirs)]
    got = [
        t
        for c in dflash_cycles(model, draft, prompt, max_tokens=24, prompt_cache=cache)
        for t in c.tokens
    ]
    assert got == expected


def test_no_long_context_cache_for_windowed_layers(tmp_path):
    """A sliding-window target's caches do not grow with the context: its costs are
    measured at one context only (no fake cache of its rotating layers)."""
    from conftest import write_random_draft
    from mlx_lm import load as mlx_lm_load
    from tiny_models import load_config, make_target

    from dflash_mlx import load_draft

    target = make_target(tmp_path / "target", "gemma3_text")
    draft_dir = write_random_draft(tmp_path / "draft", load_config(target), block_size=4)
    model, _ = mlx_lm_load(str(target))
    assert block_policy.repeated_cache(model, load_draft(draft_dir), 300) is None
