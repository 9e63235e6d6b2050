"""How many tokens each cycle verifies: fixed, or chosen per cycle from measured costs.

A cycle of width w costs C(w) seconds (w = 1: one plain target step; w >= 2: a draft
forward plus a verify of w tokens) and emits E(w) = 1 + sum_{k<w} prod_{i<=k} a_i
tokens on average, where a_i is the chance that draft position i is accepted given that
the ones before it were. `AutoPolicy` picks the width with the most tokens per second,
E(w) / C(w), each cycle (drafting must beat plain steps by GAIN to start):

- C comes from a measurement of this machine and pair, made once (`measure_costs`,
  seconds, cached under the user's cache directory beside the kernel calibration) at
  512 and 4096 cached positions, linear in the context between and beyond them, and
  corrected on the fly by the cycles' own wall times: per kind (plain step,
  drafting cycle) a running mean of the first readings then a decayed one, which
  replaces the file's level (context grows, machines vary), and per drafting width a
  decayed correction against its kind's. A plain step is the yardstick: where drafting
  pays less than STEP_MARGIN times a plain step's tokens per second, two are run now
  and then to time one at this context (a drafting run would otherwise never correct
  it); plain steps count as runs (their mean: read one behind, a queued step's time may
  hold the next one's work). Once the generation has drafted, a width wider than any
  timed counts UNTRIED of its cost, so one nearly best is tried once (wide cycles may
  cost far less here than where they were measured);
- E(w) is pulled toward the tokens this generation's cycles of width w really emitted
  (decayed; the model weighs as REALIZED_WEIGHT cycles): acceptance comes in stretches,
  which rates multiplied along the block underrate at widths drafted only now and then;
  and it never falls with the width (a wider cycle drafts the same tokens first);
- a_i are running rates of this generation (decayed counts), starting from a prior:
  the draft's own training result (`train_result.json`'s per-position acceptance, at
  the held-out length nearest this sequence's) when it has one. Positions not drafted
  yet take at least the rate of the furthest one that was, and every 4 drafting cycles
  below the block size one cycle tries about twice the best width, so a text more
  predictable than the prior (or a verify cheaper than measured) is found.

Width 1 still feeds the draft's context, so after a run of plain steps a probe cycle
drafts again (at the width the prior would pick): after 4 plain steps where the prior
says drafting pays, else once the plain steps have earned a credit (2 % of their time)
that covers the probe's expected loss, its real loss then taken off (a CPU). The
spacing doubles while probes keep failing (a probe that only breaks even fails: it must
beat plain steps by GAIN), so a pair that does not pay costs little more than plain
decoding.

The width never changes a result: greedy output is the target's own at every width and
sampling stays exact, since the choice depends only on cycles already finished.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
from mlx import nn

FORMAT = 2  # 1 had no long context: such files are measured again
CANDIDATES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)
CONTEXT = 512  # positions in the caches while costs are measured
LONG_CONTEXT = 4096  # ... and once more (a prompt cache of repeated keys: no prefill)
WARMUP, TIMED = 3, 5  # cycles per width: discarded (first use compiles), then timed
GENERIC_PRIOR = 0.8  # a_i for a draft without a training result
PRIOR_STRENGTH = 8.0  # how many cycles' worth of evidence the prior weighs
DECAY = 0.95  # per drafting cycle: older ones count less (acceptance moves with the text)
REALIZED_WEIGHT = 2.0  # the model's E(w) counts as this many cycles against realized ones
PROBE_AFTER = 4  # plain steps before the first probe, at least
PROBE_BUDGET = 0.02  # a probe's expected loss, as a fraction of the plain steps before it
GAIN = 1.1  # drafting (a probe too) must beat plain steps by this: at break-even, noise
# and the model's errors decide, and plain steps are what the user gets without DFlash
WIDER_EVERY = 4  # drafting cycles below the block size between tries of a wider width
STEP_MARGIN = 2.0  # drafting paying less than this many plain steps' rate: time a step
STEP_EVERY = 16  # drafting cycles between those timings (the first after WIDER_EVERY)
STEP_RUN = 8  # plain steps folded into the costs together (their mean)
EMA = 0.2  # weight of a new wall time (in a kind's level: after its first 1 / EMA)
UNTRIED = 0.8  # an untimed width's cost counts this much: tried once if nearly best
HICCUP = 1.15  # a reading moves a width's correction as if at most this much dearer
# (H200, demo pair: width-16 cycles read 2.86-3.25 ms p10-p90, single ones up to 2x)


class BlockPolicy(Protocol):
    max_width: int

    def choose(self) -> int:
        """Width of the next cycle (1 … max_width)."""

    def observe(self, width: int, accepted: int, seconds: float | None) -> None:
        """A finished cycle: its width, accepted drafts and wall time (read to read;
        None when the time includes a compile)."""


@dataclass
class FixedPolicy:
    """Every cycle `max_width` tokens (today's --block-size N)."""

    max_width: int

    def choose(self) -> int:
        return self.max_width

    def observe(self, width: int, accepted: int, seconds: float | None) -> None:
        pass


def widths_up_to(block_size: int) -> list[int]:
    return sorted({w for w in CANDIDATES if w <= block_size} | {block_size})


def expected_tokens(rates: list[float], width: int) -> float:
    """E(w): the anchor's token plus each draft position reached and accepted."""
    total, reach = 1.0, 1.0
    for a in rates[: width - 1]:
        reach *= a
        total += reach
    return total


@dataclass
class Acceptance:
    """Per-position acceptance rates a_1 … a_{B-1}: decayed counts of accepted and
    rejected drafts, starting from the prior as `strength` cycles' worth of counts
    (which decay like the others, so the rates end up the text's own)."""

    prior: list[float]
    strength: float = PRIOR_STRENGTH
    decay: float = DECAY
    accepted: list[float] = field(default_factory=list)
    rejected: list[float] = field(default_factory=list)
    tried: int = 0  # positions drafted at least once

    def __post_init__(self) -> None:
        self.accepted = self.accepted or [self.strength * p for p in self.prior]
        self.rejected = self.rejected or [self.strength * (1 - p) for p in self.prior]

    def observe(self, width: int, accepted: int) -> None:
        """Positions 1 … accepted were accepted, position accepted + 1 (if drafted) not;
        positions after it were not tried."""
        for i in range(len(self.prior)):
            self.accepted[i] *= self.decay
            self.rejected[i] *= self.decay
        for i in range(min(accepted, len(self.prior))):
            self.accepted[i] += 1
        if accepted < min(width - 1, len(self.prior)):
            self.rejected[accepted] += 1
        self.tried = max(self.tried, min(width - 1, len(self.prior)))

    def rates(self) -> list[float]:
        """Positions never drafted take at least the rate of the furthest one drafted:
        a draft's acceptance given the positions before it rarely falls along the block,
        and without that, a text far more predictable than the prior would never be
        drafted wider than the widths tried first."""
        tiny = 1e-12  # counts decayed to nothing: the prior again
        rates = [
            (s + tiny * p) / (s + f + tiny)
            for s, f, p in zip(self.accepted, self.rejected, self.prior, strict=True)
        ]
        if self.tried:
            furthest = rates[self.tried - 1]
            rates[self.tried :] = [max(r, furthest) for r in rates[self.tried :]]
        return rates


def prior_rates(draft: Any, block_size: int, context: int | None = None) -> list[float]:
    """a_1 … a_{B-1} from the draft's training result, else a generic prior.

    `draft.acceptance_prior`: cumulative per-position acceptance as `dflash-mlx train`
    measures it, one list, or {context length: list} for held-out texts at several
    lengths (acceptance moves with the context); the length nearest to `context` (in
    ratio) is used, the shortest one when it is not known."""
    cumulative = getattr(draft, "acceptance_prior", None) or []
    if isinstance(cumulative, dict):
        near = lambda n: abs(math.log(n / context)) if context else n
        cumulative = cumulative[min(cumulative, key=near)] if cumulative else []
    rates, before = [], 1.0
    for k in range(block_size - 1):
        if k < len(cumulative) and before > 0:
            rate = cumulative[k] / before
            before = cumulative[k]
        else:
            rate = rates[-1] if rates else GENERIC_PRIOR
        rates.append(min(max(rate, 0.01), 0.99))
    return rates


@dataclass
class Costs:
    """Seconds per cycle of each measured width (1: a plain target step) at `context`
    positions in the caches and, when measured there too, at `long_context`: between
    and beyond the two, a width's cost is linear in the context (attention reads every
    cached position: on a CPU a verify's attention at 4k keys costs many plain steps)."""

    seconds: dict[int, float]
    context: int = CONTEXT
    long: dict[int, float] = field(default_factory=dict)
    long_context: int = LONG_CONTEXT

    def at(self, width: int, context: int | None = None) -> float:
        short = self.seconds[width]
        if context is None or width not in self.long:
            return short
        long = self.long[width]
        if long <= short:  # never cheaper with more context: noise, which only adds time
            return long
        slope = (long - short) / (self.long_context - self.context)
        return max(short + slope * (context - self.context), 0.5 * short)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "context": self.context,
            "seconds": self.seconds,
            "long_context": self.long_context,
            "long": self.long,
        }

    @classmethod
    def from_json(cls, data: dict) -> Costs:
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        seconds = {int(w): float(s) for w, s in data["seconds"].items()}
        long = {int(w): float(s) for w, s in data["long"].items()}
        times = [*seconds.values(), *long.values()]
        if 1 not in seconds or any(not (s > 0 and math.isfinite(s)) for s in times):
            raise ValueError("needs a positive time for width 1 and every other width")
        context, long_context = int(data["context"]), int(data["long_context"])
        if not 0 < context < long_context:
            raise ValueError(f"contexts {context} and {long_context}: need 0 < short < long")
        return cls(seconds, context, long, long_context)


class AutoPolicy:
    """The width with the most expected tokens per second, cycle by cycle."""

    def __init__(
        self,
        costs: Costs,
        rates: list[float],
        block_size: int,
        timed: bool = True,
        context: int | None = None,
    ):
        # timed: correct the costs by the cycles' wall times. Off when sampling: the
        # widths decide how the random draws are used, so widths that followed the clock
        # would make a seeded run unrepeatable (greedy output is the same at any width).
        self.timed = timed
        # Positions in the caches (grows with every emitted token); None: the costs at
        # the context they were measured at.
        self.context = context
        self.widths = [w for w in widths_up_to(block_size) if w in costs.seconds] or [1]
        self.max_width = max(self.widths)
        self.costs = costs
        self.prior = list(rates[: self.max_width - 1])
        self.acceptance = Acceptance(list(self.prior))
        self.prior_E = {w: expected_tokens(self.prior, w) for w in self.widths}  # for probes
        # per drafting width: decayed (tokens emitted, cycles) of the cycles run at it
        self.realized: dict[int, list[float]] = {}
        # measured / file, per kind (step, cycle): this machine at this context now
        self.scale: dict[str, float] = {"step": 1.0, "cycle": 1.0}
        self.timings: dict[str, int] = {}  # wall times folded into each kind's scale
        # per drafting width once it has run: its own measured / file, against its kind's
        self.relative: dict[int, float] = {}
        self._seen: set[int] = set()
        self._steps = [0.0, 0]  # this run of plain steps' wall time and count
        self.since_step = STEP_EVERY - WIDER_EVERY  # drafting cycles since a timed step
        self.step_timing = 0  # plain steps still to run to time one
        self.plain = 0  # plain steps since the last drafting cycle
        self.failed_probes = 0
        self.credit = 0.0  # plain steps' worth of time probes may still lose (probe_due)
        self._probe: int | None = None  # width of the probe in flight
        self.next_probe: int | None = None  # wider, after a probe whose drafts all passed
        self.since_wider = 0  # drafting cycles since a wider width than the best was tried
        self._E: dict[int, float] = {}  # E(w) as the latest choice weighed them

    def seconds(self, width: int) -> float:
        kind = "step" if width == 1 else "cycle"
        measured = self.costs.at(width, self.context)
        return measured * self.scale[kind] * self.relative.get(width, 1.0)

    def estimate(self, width: int) -> float:
        """seconds(width) as the choice weighs it: once this generation has drafted, a
        width wider than any it has timed counts UNTRIED of it (its cost was measured at
        another context), so one within that of the best is tried once and then known.
        Upwards only: with static caches each new width compiles a cycle, and narrower
        widths than a timed one are priced by its measured scale."""
        widest = max(self.relative, default=1)
        untried = self.timed and self.acceptance.tried and width > widest
        return self.seconds(width) * (UNTRIED if untried else 1.0)

    def expected(self, rates: list[float]) -> dict[int, float]:
        """E(w) of every width: the rates' model, pulled toward the tokens cycles of that
        width really emitted. Acceptance comes in stretches (a text is predictable for a
        while, then not), which per-position rates multiplied along the block underrate at
        widths drafted seldom (tried every WIDER_EVERY cycles). A wider cycle emits at
        least what a narrower one would at the same point (it drafts the same tokens
        first), so E(w) is at least every narrower width's: otherwise a width run in a
        predictable stretch looks better than the wider ones run at other times. More
        exactly, at least a narrower width's E plus what the rates expect of the positions
        in between (on a tie the wider would be left to the costs' noise)."""
        out, before, model_before = {}, 0.0, 0.0
        model, reach, done = 1.0, 1.0, 0  # expected_tokens(rates, w), one pass for all w
        for w in self.widths:
            for a in rates[done : w - 1]:
                reach *= a
                model += reach
            done = max(done, w - 1)
            tokens, cycles = self.realized.get(w, (0.0, 0.0))
            blend = (tokens + REALIZED_WEIGHT * model) / (cycles + REALIZED_WEIGHT)
            before = out[w] = max(blend, before + model - model_before)
            model_before = model
        return out

    def best(self, widths: list[int], E: dict[int, float] | None = None, gain: float = 1.0) -> int:
        """The width with the most expected tokens per second, drafting's divided by
        `gain`, at expected tokens E: this text's (blended with its cycles so far) by
        default, or the prior's (`prior_E`, for probes)."""
        if E is None:
            E = self._E = self.expected(self.acceptance.rates())
        return max(widths, key=lambda w: E[w] / self.estimate(w) / (gain if w > 1 else 1.0))

    def probe_width(self) -> int:
        """Where to try drafting again: the best drafting width at the prior's rates, or
        a wider one after a probe that did not pay though all its drafts passed."""
        return self.next_probe or self.best(self.widths[1:], self.prior_E)

    def probe_due(self) -> bool:
        """Whether the plain steps since the last probe have earned the next one: at
        least PROBE_AFTER, doubling with every probe that did not pay for itself. Where
        even the prior's rates say drafting does not pay (a CPU), probes also spend a
        credit: each plain step adds PROBE_BUDGET of a step's time (halved with every
        failed probe), a probe runs once the credit covers its expected loss (its time
        less the plain steps' for the prior's expected tokens) and its real loss is taken
        off, so probing costs about PROBE_BUDGET of the time however the probes turn out.
        A prior that nearly pays makes probing nearly free, so it comes soon."""
        if self.plain < PROBE_AFTER << min(self.failed_probes, 6):
            return False
        # At the prior's rates and the costs as timed (no UNTRIED discount: that is for
        # choosing among drafting widths, not for whether to draft).
        rate = max(self.prior_E[w] / self.seconds(w) for w in self.widths[1:])
        if rate > GAIN / self.seconds(1):
            return True
        w = self.probe_width()
        return self.credit >= self.seconds(w) / self.seconds(1) - self.prior_E[w]

    def wider(self, width: int) -> int:
        """The candidate nearest twice `width` (at most the block): where to look next
        for a width that pays more than the best one so far."""
        return min(self.widths, key=lambda w: (abs(w - 2 * width), -w))

    def time_step(self, width: int) -> bool:
        """Whether to run plain steps now to time one: the choice of `width` over a plain
        step hangs on the step's cost (drafting pays under STEP_MARGIN times its rate),
        which a run of drafting cycles never measures."""
        if not self.timed or self.since_step < STEP_EVERY:
            return False
        margin = self._E[width] / self.seconds(width) * self.seconds(1)  # best() set it
        if margin >= STEP_MARGIN:
            return False
        self.since_step = 0
        self.step_timing = 2  # timed as a run (observe)
        return True

    def choose(self) -> int:
        if self.step_timing:
            self.step_timing -= 1
            return 1
        if self.plain == 0:
            # Drafting starts only where it beats plain steps by GAIN (a generation's
            # first cycle here, later a probe that paid so), and goes on while it pays.
            width = self.best(self.widths, gain=1.0 if self._seen else GAIN)
            if width > 1 and self.time_step(width):
                self.step_timing -= 1
                return 1
            if 1 < width < self.max_width:
                # Costs measured at another context and rates of untried positions are
                # guesses: now and then a wider cycle measures both.
                self.since_wider += 1
                if self.since_wider >= WIDER_EVERY:
                    self.since_wider = 0
                    return self.wider(width)
            if width > 1:
                return width
        # Drafting does not pay, or stopped paying: plain steps, now and then a probe
        # (the cheap lower bound first: a plain step should cost no more than mlx_lm's).
        elif self.max_width > 1 and self.probe_due():
            self.plain, self._probe = 0, self.probe_width()
            return self._probe
        self.plain += 1
        self.credit += PROBE_BUDGET / (1 << min(self.failed_probes, 6))
        return 1

    def _fold(self, width: int, seconds: float) -> None:
        """A wall time into the costs. A kind's level (machine, context) from its first
        readings on, replacing the file's; a width's cost against the others' decays
        slowly: the file measured them back to back, a reading here is one noisy cycle."""
        kind = "step" if width == 1 else "cycle"
        ratio = min(max(seconds / self.costs.at(width, self.context), 0.25), 4.0)
        n = self.timings.get(kind, 0)
        new = max(1 / (n + 1), EMA)
        level = math.exp((1 - new) * math.log(self.scale[kind]) + new * math.log(ratio))
        self.scale[kind], self.timings[kind] = level, n + 1
        if width > 1:
            # Dearer than its correction by at most HICCUP a reading: a single cycle
            # that read 2x (a hiccup) must not hand the choice to a narrower width.
            old = math.log(self.relative.get(width, 1.0))
            innovation = min(math.log(ratio / level) - old, math.log(HICCUP))
            self.relative[width] = math.exp(old + EMA * innovation)

    def _fold_steps(self) -> None:
        total, n = self._steps
        if n:
            self._fold(1, total / n)
            self._steps, self.since_step = [0.0, 0], 0

    def observe(self, width: int, accepted: int, seconds: float | None) -> None:
        if self.context is not None:
            self.context += 1 + accepted
        if width == 1:
            # Plain steps are read one behind (queued), so one's wall time may hold the
            # next one's work: a run's mean is theirs. (A compiling first call: None.)
            if self.timed and seconds is not None:
                self._steps[0] += seconds
                self._steps[1] += 1
                if self._steps[1] >= STEP_RUN:
                    self._fold_steps()
            return
        self._fold_steps()
        # A width's first cycle may compile it (the first use of a kernel, say).
        if self.timed and seconds is not None and width in self._seen:
            self._fold(width, seconds)
        self._seen.add(width)
        self.since_step += 1
        if self._probe == width:
            self._probe = None
            spent = seconds if self.timed and seconds is not None else self.seconds(width)
            self.credit -= spent / self.seconds(1) - (1 + accepted)  # its real loss
            if (1 + accepted) / self.seconds(width) > GAIN / self.seconds(1):
                # It paid for itself: the text changed; judge it afresh from the prior.
                self.failed_probes, self.next_probe = 0, None
                self.acceptance = Acceptance(list(self.prior))
                self.realized = {}
            elif accepted == width - 1 < self.max_width - 1:
                # Too narrow to pay, not a bad text: the next probe goes wider, as soon.
                self.next_probe, self.plain = self.wider(width), 1
            else:
                # Back to plain steps (drafting that did not pay is not resumed because
                # the prior's rates, still most of the estimate, say it nearly pays).
                self.failed_probes += 1
                self.next_probe, self.plain = None, 1
        self.acceptance.observe(width, accepted)
        for stats in self.realized.values():
            stats[0] *= self.acceptance.decay
            stats[1] *= self.acceptance.decay
        stats = self.realized.setdefault(width, [0.0, 0.0])
        stats[0] += 1 + accepted
        stats[1] += 1


# -- measuring the costs, once per machine and pair ---------------------------------------


@dataclass
class ScriptPolicy:
    """Cycles of the given widths in order (then width 1), recording wall times."""

    script: list[int]
    max_width: int = 1
    times: dict[int, list[float]] = field(default_factory=dict)
    log: list[float] = field(default_factory=list)  # every cycle's time, in order

    def __post_init__(self) -> None:
        self.max_width = max(self.script)
        self._next = 0

    def choose(self) -> int:
        width = self.script[self._next] if self._next < len(self.script) else 1
        self._next += 1
        return width

    def observe(self, width: int, accepted: int, seconds: float | None) -> None:
        self.times.setdefault(width, []).append(math.inf if seconds is None else seconds)
        self.log.append(self.times[width][-1])


def measurement_script(widths: list[int]) -> tuple[list[int], list[int]]:
    """(widths of the cycles in order, indices of the timed ones): WARMUP cycles of each
    width (first uses compile), then TIMED rounds over all widths; in each, a width runs
    twice and its second cycle is timed (the first takes the change of width), plain
    steps three times and the middle one is timed (queued, a step's read-to-read time
    holds the next one's launch: the first of a run reads two steps, the last ~none).
    Rounds spread the machine's drift (a GPU's clocks ramp up, other load on a CPU) over
    every width."""
    script = [w for w in widths for _ in range(WARMUP)]
    timed = []
    for _ in range(TIMED):
        for w in widths:
            script += [w] * (3 if w == 1 else 2)
            timed.append(len(script) - 2 if w == 1 else len(script) - 1)
    return script, timed


def _monotone(medians: dict[int, float]) -> dict[int, float]:
    """A narrower drafting cycle does no more work than a wider one: a dearer reading is
    noise, which only ever adds time (a first-use compile, another process)."""
    seconds, least = {}, math.inf
    for w in sorted(medians, reverse=True):
        least = medians[w] if w == 1 else min(least, medians[w])
        seconds[w] = least
    return dict(sorted(seconds.items()))


def _time_widths(
    model: nn.Module,
    draft: Any,
    widths: list[int],
    prompt: mx.array,
    cache: list[Any] | None,
    progress: Callable[[], None],
) -> dict[int, float]:
    """Median seconds per cycle of each width, decoding after `prompt` (on `cache`)."""
    from .generate import dflash_cycles  # the loop imports this module

    script, timed = measurement_script(widths)
    # One more cycle after the last timed one: with static caches the loop queues a
    # cycle before reading the one before it.
    policy = ScriptPolicy([*script, script[-1]])
    n = sum(script) + 2 * max(widths) + 2  # never clipped before the script ends
    cycles = dflash_cycles(model, draft, prompt, max_tokens=n, policy=policy, prompt_cache=cache)
    steps = len(script) // len(widths)
    for done, _ in enumerate(cycles):  # the first is the prompt's token
        if done and done % steps == 0:
            progress()
        if len(policy.log) > len(script):
            break
    cycles.close()
    readings: dict[int, list[float]] = {}
    for i in timed:
        readings.setdefault(script[i], []).append(policy.log[i])
    medians = {w: sorted(t)[len(t) // 2] for w, t in readings.items()}
    return _monotone(medians)


def repeated_cache(model: nn.Module, draft: Any, context: int) -> list[Any] | None:
    """A DFlash prompt cache holding `context` positions without computing them: a short
    prefill's keys and values repeated (a cycle's cost depends on the lengths, not on
    what the keys are). None unless every cache is a plain KVCache (a window or a
    recurrent state does not grow with the context)."""
    from mlx_lm.models.cache import KVCache

    from .session import make_prompt_cache, prefill_prompt_cache

    cache = make_prompt_cache(model, draft)
    if any(type(c) is not KVCache for c in cache):
        return None
    n = 64
    vocab = draft.config.vocab_size
    prompt = mx.random.randint(0, vocab, (n,), key=mx.random.key(2))
    prefill_prompt_cache(model, draft, prompt, cache)
    reps = -(-context // n)
    for c in cache:
        keys, values, _ = c.state
        tile = lambda x: mx.tile(x[..., :n, :], (1, 1, reps, 1))[..., :context, :]
        c.state = (tile(keys), tile(values), context)
    mx.eval([c.state[:2] for c in cache])
    return cache


def measure_costs(
    model: nn.Module,
    draft: Any,
    widths: list[int],
    context: int = CONTEXT,
    long_context: int = LONG_CONTEXT,
    progress: Callable[[int, int], None] | None = None,
) -> Costs:
    """Time real cycles of each width (the decode loop itself, on random tokens after a
    `context`-token prompt, then after `long_context` cached positions): the median of
    TIMED readings in rounds over the widths (measurement_script). The long context is
    left out where its cache cannot be made without a prefill (repeated_cache)."""
    vocab = draft.config.vocab_size
    long_cache = repeated_cache(model, draft, long_context - 1)
    done, total = 0, len(widths) * (2 if long_cache else 1)

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, total)

    prompt = mx.random.randint(0, vocab, (context,), key=mx.random.key(0))
    seconds = _time_widths(model, draft, widths, prompt, None, step)
    long = {}
    if long_cache is not None:
        last = mx.random.randint(0, vocab, (1,), key=mx.random.key(1))
        long = _time_widths(model, draft, widths, last, long_cache, step)
    return Costs(seconds, context, long, long_context)


def costs_path(model: nn.Module, draft: Any) -> Path:
    """One file per machine, MLX version and pair (shapes and weights fingerprinted)."""
    from .calibrate import cache_dir
    from .session import _backend, pair_fingerprint

    info = mx.device_info() if hasattr(mx, "device_info") and _backend() != "cpu" else {}
    device = str(info.get("device_name") or f"{platform.machine()}-{os.cpu_count()}cpu")
    key = json.dumps([_backend(), device, mx.__version__, pair_fingerprint(model, draft)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / f"costs-{_backend()}-{digest}.json"


_measured: dict[Path, Costs] = {}


def cached_costs(model: nn.Module, draft: Any, block_size: int, force: bool = False) -> Costs:
    """This machine's costs for the pair: from memory, from the cache file, or measured
    now (a few seconds, with a progress line) and saved; `force` measures again."""
    from .progress import Progress

    path = costs_path(model, draft)
    widths = widths_up_to(block_size)
    costs = None if force else _measured.get(path)
    if costs is None and path.exists() and not force:
        try:
            costs = Costs.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            costs = None  # unreadable: measure again, overwrite it
    if costs is None or any(w not in costs.seconds for w in widths):
        bar = Progress(
            2 * len(widths), "dflash_mlx: timing block sizes for --block-size auto (once)"
        )
        start = time.perf_counter()

        def progress(done: int, total: int) -> None:
            bar.total = total  # the long context is left out for some caches
            bar.update(1)

        measured = measure_costs(model, draft, widths, progress=progress)
        bar.close()
        old = costs or Costs({})
        costs = Costs(
            {**old.seconds, **measured.seconds},
            measured.context,
            {**old.long, **measured.long},
            measured.long_context,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(costs.to_json(), indent=1))
        os.replace(tmp, path)
        print(
            f"dflash_mlx: block-size costs measured in {time.perf_counter() - start:.1f} s, "
            f"saved to {path}",
            file=sys.stderr,
        )
    _measured[path] = costs
    return costs


def make_policy(
    model: nn.Module,
    draft: Any,
    block_size: int | str | None,
    timed: bool = True,
    context: int | None = None,
) -> BlockPolicy:
    """--block-size N: FixedPolicy(N); None or 'auto': AutoPolicy on this machine's costs
    (`timed`: corrected by the cycles' wall times, see AutoPolicy), its prior for a
    sequence of `context` positions."""
    if block_size is None or block_size == "auto":
        B = draft.block_size
        rates = prior_rates(draft, B, context)
        return AutoPolicy(cached_costs(model, draft, B), rates, B, timed, context)
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise ValueError(  # noqa: TRY004 (a bad value from the user: one line)
            f"block size must be a positive int or 'auto', got {block_size!r}"
        )
    if block_size < 1:
        raise ValueError(f"block size must be >= 1, got {block_size}")
    return FixedPolicy(block_size)
