"""`dflash-mlx benchmark`: DFlash side by side with mlx_lm on the same prompts.

Three ways to decode each prompt, greedy:
  target    mlx_lm.stream_generate(model)                       autoregressive
  baseline  mlx_lm.stream_generate(model, draft_model=...)      mlx_lm's speculative decoding
  dflash    dflash_mlx.generate.stream_generate(model, draft)

Each is warmed up, repeated, and reported as the median over repeats (then over the
prompts of a suite). Optionally the prompts are padded to fixed context lengths, and
one DFlash cycle is broken down into its phases (`cycle_breakdown`): the real loop run
with a barrier after each phase through its `on_phase` hook, which costs nothing when unused.

Efficiency = measured speedup / (tau * AR step time / model-math cycle time): the share
of the speedup that the cycle's model math allows which the real loop delivers. The
model-math cycle time is the instrumented cycle minus the host's graph-building time;
what is missing from efficiency is host overhead (Python, graph building, syncs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx_lm import stream_generate as mlx_lm_stream_generate
from mlx_lm.generate import generate_step
from mlx_lm.tokenizer_utils import TokenizerWrapper

from . import demo
from .convert import check_writable
from .drafter import DraftModel
from .generate import dflash_cycles
from .generate import stream_generate as dflash_stream_generate
from .progress import Progress

PROMPTS: dict[str, list[str]] = {
    "math": [
        (
            "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
            "clips in May. How many clips did Natalia sell altogether in April and May? "
            "Reason step by step."
        ),
        (
            "A train travels 120 km in 1.5 hours and then 80 km in 1 hour. What is its average "
            "speed for the whole trip? Show your work."
        ),
        "Solve for x: 3x + 7 = 2x - 5. Explain each step.",
        "What is the sum of the first 50 positive even integers? Explain how you get it.",
        (
            "A rectangle has a perimeter of 36 cm and its length is twice its width. Find its "
            "area, step by step."
        ),
    ],
    "code": [
        (
            "Write a Python function `is_palindrome(s: str) -> bool` that ignores case and "
            "non-alphanumeric characters, with a docstring and two examples."
        ),
        "Implement binary search over a sorted list in Python and explain its complexity.",
        "Write a Python class `LRUCache` with `get` and `put` methods running in O(1).",
        'def fibonacci(n):\n    """Return the n-th Fibonacci number iteratively."""\n',
        "Write a function that merges two sorted lists into one sorted list, then test it.",
    ],
    "chat": [
        "What are three tips for staying focused while working from home?",
        "Explain to a ten-year-old why the sky is blue.",
        "Write a short, friendly email inviting a colleague to a team lunch on Friday.",
        "Compare cats and dogs as pets in a few sentences.",
        "Summarise the plot of a heist movie you would like to see, in one paragraph.",
    ],
}

# Padding for the context sweep: neutral prose, repeated as needed, put before the prompt.
FILLER = (
    "The archive holds letters, maps and ledgers collected over two centuries. Each box "
    "is labelled with the year it arrived and the family that donated it. Researchers "
    "read in the quiet room on the second floor, where the windows face the river and "
    "the light stays even through the afternoon. Nothing leaves the building; copies are "
    "made on request and posted within a week. "
)

METHODS = ("target", "baseline", "dflash")


@dataclass
class Run:
    """One decode of one prompt."""

    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB
    tau: float  # tokens per target forward (1 for the target alone)
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted per cycle


def acceptance_by_position(accepted: list[int], block: int) -> list[float]:
    """Share of cycles whose draft token at block position i (1…block-1) was accepted."""
    n = len(accepted) or 1
    return [sum(a >= i for a in accepted) / n for i in range(1, block)]


def _runs_from_flags(flags: list[bool]) -> list[int]:
    """mlx_lm speculative output -> accepted draft tokens per target forward."""
    accepted, run = [], 0
    for from_draft in flags:
        if from_draft:
            run += 1
        else:
            accepted.append(run)
            run = 0
    return accepted


def _finish(last: Any, accepted: list[int]) -> Run:
    cycles = len(accepted)
    return Run(
        prompt_tokens=last.prompt_tokens,
        prompt_tps=last.prompt_tps,
        generation_tokens=last.generation_tokens,
        generation_tps=last.generation_tps,
        peak_memory=last.peak_memory,
        tau=(sum(accepted) + cycles) / cycles if cycles else 1.0,
        accepted=accepted,
    )


def run_target(model: nn.Module, tokenizer: Any, prompt: list[int], max_tokens: int) -> Run:
    mx.reset_peak_memory()
    last = None
    for last in mlx_lm_stream_generate(model, tokenizer, mx.array(prompt), max_tokens):
        pass
    return _finish(last, [])


def run_baseline(
    model: nn.Module,
    draft_model: nn.Module,
    tokenizer: Any,
    prompt: list[int],
    max_tokens: int,
    num_draft_tokens: int,
) -> Run:
    mx.reset_peak_memory()
    flags, last = [], None
    for last in mlx_lm_stream_generate(
        model,
        tokenizer,
        mx.array(prompt),
        max_tokens,
        draft_model=draft_model,
        num_draft_tokens=num_draft_tokens,
    ):
        flags.append(last.from_draft)
    # The first token comes from the prefill, not from a verify forward.
    return _finish(last, _runs_from_flags(flags[1:]))


def run_dflash(
    model: nn.Module,
    draft: DraftModel,
    tokenizer: Any,
    prompt: list[int],
    max_tokens: int,
    block_size: int | None,
) -> Run:
    mx.reset_peak_memory()
    per_cycle: dict[int, int] = {}
    last = None
    for last in dflash_stream_generate(
        model, draft, tokenizer, mx.array(prompt), max_tokens, block_size=block_size
    ):
        if last.cycles:
            per_cycle[last.cycles] = last.accepted
    return _finish(last, [per_cycle[c] for c in sorted(per_cycle)])


# ---------------------------------------------------------------------------- timing


def decode_step_time(
    model: nn.Module, prompt: list[int] | mx.array, steps: int = 32, warmup: int = 4
) -> float:
    """Seconds per mlx_lm decode step (generate_step, greedy) after a prefill of `prompt`."""
    prompt = mx.array(prompt)
    stamps = []
    for n, _ in enumerate(generate_step(prompt, model, max_tokens=warmup + steps + 1)):
        stamps.append(time.perf_counter())
    stamps = stamps[warmup:]
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def production_cycle_time(
    model: nn.Module,
    draft: DraftModel,
    prompt: list[int] | mx.array,
    cycles: int = 32,
    warmup: int = 4,
    block_size: int | None = None,
) -> tuple[float, float]:
    """(seconds per cycle, tau) of the real decode loop (`dflash_cycles`), no extra syncs.

    With a draft that rejects everything each cycle still drafts and verifies a full
    block, which is what the cycle time is meant to measure.
    """
    B = block_size or draft.block_size
    stamps, emitted, waits = [], [], []
    loop = sys.modules[dflash_cycles.__module__]  # (the package's `generate` is a function)
    read = loop._read

    def timed_read(cycle):  # the host's one wait per cycle, timed apart
        tic = time.perf_counter()
        mx.eval(cycle.nxt, *([] if isinstance(cycle.n_acc, int) else [cycle.n_acc, cycle.block]))
        waits.append(time.perf_counter() - tic)
        return read(cycle)

    gen = dflash_cycles(
        model, draft, mx.array(prompt), max_tokens=(cycles + warmup + 2) * B, block_size=B
    )
    loop._read = timed_read
    try:
        for i, cycle in enumerate(gen):
            stamps.append(time.perf_counter())
            if i > warmup:
                emitted.append(len(cycle.tokens))
            if i == cycles + warmup:
                break
    finally:
        loop._read = read
        gen.close()
    stamps = stamps[warmup:]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    production_cycle_time.last_gaps = gaps  # per-cycle times, for diagnosis
    # The gap to cycle i's yield: the host launched the next cycle, then waited for this
    # one; without the wait it is the host's own time per cycle (all of it, Python too).
    production_cycle_time.last_host = [g - w for g, w in zip(gaps, waits[-len(gaps) :])]
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1), statistics.fmean(emitted)


PHASES = ("draft", "verify", "accept_rollback")


def instrumented_cycles(
    model: nn.Module,
    draft: DraftModel,
    prompt: list[int] | mx.array,
    block_size: int | None = None,
    prefill_step_size: int = 2048,
) -> Iterator[dict[str, float]]:
    """The real decode loop (`dflash_cycles`) with a barrier after each phase.

    Yields per cycle the wall time of each phase (graph building + evaluation) in
    seconds, `host` (the graph-building and bookkeeping part of them) and `accepted`.
    """
    clock = time.perf_counter
    row: dict[str, float] = {"host": 0.0}
    last = clock()

    def on_phase(name: str, arrays: list[mx.array]) -> None:
        nonlocal last
        built = clock()
        mx.eval(arrays)
        done = clock()
        row[name] = done - last
        row["host"] += built - last
        last = clock()

    B = block_size or draft.block_size
    cycles = dflash_cycles(
        model,
        draft,
        mx.array(prompt),
        max_tokens=1 << 30,
        block_size=B,
        prefill_step_size=prefill_step_size,
        on_phase=on_phase,
    )
    try:
        next(cycles)  # the prefill
        for cycle in cycles:
            yield {**row, "accepted": cycle.accepted}
            row = {"host": 0.0}
            last = clock()
    finally:
        cycles.close()


def cycle_breakdown(
    model: nn.Module,
    draft: DraftModel,
    prompt: list[int] | mx.array,
    cycles: int = 16,
    warmup: int = 4,
    block_size: int | None = None,
) -> dict[str, float]:
    """Median phase times (ms) of an instrumented cycle; `model_ms` = cycle - host."""
    rows = []
    gen = instrumented_cycles(model, draft, prompt, block_size=block_size)
    try:
        for i, row in enumerate(gen):
            if i >= warmup:
                rows.append(row)
            if len(rows) == cycles:
                break
    finally:
        gen.close()
    out = {f"{k}_ms": 1e3 * statistics.median(r[k] for r in rows) for k in PHASES + ("host",)}
    totals = [sum(r[k] for k in PHASES) for r in rows]
    models = [sum(r[k] for k in PHASES) - r["host"] for r in rows]
    out["cycle_ms"] = 1e3 * statistics.median(totals)
    out["model_ms"] = 1e3 * statistics.median(models)
    out["block_size"] = block_size or draft.block_size
    return out


# ---------------------------------------------------------------------------- prompts


def load_prompts(suites: list[str], path: str | None = None) -> list[tuple[str, Any]]:
    """[(suite, prompt)]: a prompt is a string or a list of chat messages.

    A jsonl file has one object per line: {"prompt": str} or {"messages": [...]}, with
    an optional "suite" (default "custom").
    """
    if path is not None:
        out = []
        for i, line in enumerate(Path(path).read_text().splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i + 1}: not valid JSON: {e}") from e
            prompt = row.get("messages") or row.get("prompt") or row.get("text")
            if not prompt:
                raise ValueError(f"{path}:{i + 1}: needs 'prompt' or 'messages'")
            out.append((str(row.get("suite", "custom")), prompt))
        if not out:
            raise ValueError(f"{path} holds no prompts")
        return out
    unknown = set(suites) - set(PROMPTS)
    if unknown:
        raise ValueError(f"unknown suite(s) {sorted(unknown)}; choose from {sorted(PROMPTS)}")
    return [(s, p) for s in suites for p in PROMPTS[s]]


def encode(tokenizer: TokenizerWrapper, prompt: Any, chat_template: bool = True) -> list[int]:
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    if chat_template and tokenizer.has_chat_template:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))
    text = "\n".join(m["content"] for m in messages)
    return list(tokenizer.encode(text))


def pad_to_context(tokenizer: TokenizerWrapper, ids: list[int], n: int) -> list[int]:
    """`ids` with filler tokens put in front (after a BOS) so that it is n tokens long."""
    need = n - len(ids)
    if need <= 0:
        return ids
    unit = list(tokenizer.encode(FILLER, add_special_tokens=False)) or [0]
    filler = (unit * (need // len(unit) + 1))[:need]
    bos = tokenizer.bos_token_id
    if bos is not None and ids and ids[0] == bos:
        return [bos] + filler + ids[1:]
    return filler + ids


def parse_contexts(text: str | None) -> list[int | None]:
    """'1k,4096,16k' -> [1024, 4096, 16384]; None -> [None] (prompts as they are)."""
    if not text:
        return [None]
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        try:
            out.append(int(float(part[:-1]) * 1024) if part.endswith("k") else int(part))
        except ValueError:
            raise ValueError(f"--context: '{part}' is not a token count") from None
    if any(n < 1 for n in out):
        raise ValueError("--context values must be positive")
    return out


# ---------------------------------------------------------------------------- harness


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def benchmark(
    model: nn.Module,
    tokenizer: Any,
    draft: DraftModel,
    prompts: list[tuple[str, Any]],
    *,
    baseline_draft: nn.Module | None = None,
    num_draft_tokens: int = 3,
    max_tokens: int = 128,
    repeats: int = 3,
    warmup: int = 1,
    contexts: list[int | None] = (None,),
    block_size: int | None = None,
    breakdown: bool = True,
    breakdown_cycles: int = 16,
    chat_template: bool = True,
    log: Callable[[str], None] = lambda s: None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run every method on every prompt at every context; return the JSON-able result.

    On Ctrl-C the result holds every prompt finished so far, with "interrupted": True.
    """
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    B = block_size or draft.block_size
    encoded = [(suite, encode(tokenizer, p, chat_template)) for suite, p in prompts]
    methods = ["target"] + (["baseline"] if baseline_draft is not None else []) + ["dflash"]
    runners = {
        "target": lambda ids: run_target(model, tokenizer, ids, max_tokens),
        "baseline": lambda ids: run_baseline(
            model, baseline_draft, tokenizer, ids, max_tokens, num_draft_tokens
        ),
        "dflash": lambda ids: run_dflash(model, draft, tokenizer, ids, max_tokens, B),
    }
    result: dict[str, Any] = {
        "settings": {
            "max_tokens": max_tokens,
            "repeats": repeats,
            "warmup": warmup,
            "block_size": B,
            "num_draft_tokens": num_draft_tokens if baseline_draft is not None else None,
            "methods": methods,
            "contexts": list(contexts),
            "device": str(mx.default_device()),
            "device_name": mx.device_info().get("device_name", ""),
            "mlx": mx.__version__,
        },
        "contexts": [],
        "interrupted": False,
    }
    if progress is not None:
        per_context = len(methods) * (warmup + len(encoded) * repeats) + breakdown
        progress.total = per_context * len(contexts)

    def step(details: str) -> None:
        if progress is not None:
            progress.update(0, details)

    def done() -> None:
        if progress is not None:
            progress.update(1)

    for ctx in contexts:
        items = [(s, pad_to_context(tokenizer, ids, ctx) if ctx else ids) for s, ids in encoded]
        where = f"context {ctx}: " if ctx else ""
        entry: dict[str, Any] = {"context": ctx, "suites": {}, "prompts": []}
        try:
            for method in methods:  # warm-up: compile kernels, size buffers
                for _ in range(warmup):
                    step(f"{where}warm-up, {method}")
                    runners[method](items[0][1])
                    done()
            for i, (suite, ids) in enumerate(items):
                row: dict[str, Any] = {"suite": suite, "prompt_tokens": len(ids)}
                for method in methods:
                    runs = []
                    for r in range(repeats):
                        step(
                            f"{where}prompt {i + 1}/{len(items)} ({suite}, {len(ids)} tokens), "
                            f"{method}, repeat {r + 1}/{repeats}"
                        )
                        runs.append(runners[method](ids))
                        done()
                    row[method] = {
                        "prompt_tps": _median([r.prompt_tps for r in runs]),
                        "generation_tps": _median([r.generation_tps for r in runs]),
                        "generation_tokens": runs[-1].generation_tokens,
                        "peak_memory_gb": max(r.peak_memory for r in runs),
                        "tau": runs[-1].tau,
                        "accepted": runs[-1].accepted,
                    }
                    if method != "target":
                        base = row["target"]["generation_tps"]
                        row[method]["speedup"] = row[method]["generation_tps"] / base if base else 0
                entry["prompts"].append(row)
                log(
                    f"ctx={ctx or len(ids)} {suite} #{i}: "
                    + "  ".join(f"{m} {row[m]['generation_tps']:.1f} tok/s" for m in methods)
                    + f"  tau {row['dflash']['tau']:.2f}"
                )
            if breakdown:
                step(f"{where}cycle breakdown ({breakdown_cycles} cycles)")
                probe = items[0][1]
                bd = cycle_breakdown(model, draft, probe, cycles=breakdown_cycles, block_size=B)
                bd["ar_step_ms"] = 1e3 * decode_step_time(model, probe)
                bd["cycle_over_ar"] = bd["cycle_ms"] / bd["ar_step_ms"]
                entry["breakdown"] = bd
                done()
        except KeyboardInterrupt:
            result["interrupted"] = True
        if entry["prompts"]:
            summarize(entry, methods, B, num_draft_tokens)
            result["contexts"].append(entry)
        if result["interrupted"]:
            break
    return result


def summarize(entry: dict[str, Any], methods: list[str], B: int, num_draft_tokens: int) -> None:
    """Per-suite medians of the prompts in `entry` (and efficiency, given a breakdown)."""
    per_prompt = entry["prompts"]
    for suite in dict.fromkeys(r["suite"] for r in per_prompt):
        rows = [r for r in per_prompt if r["suite"] == suite]
        summary: dict[str, Any] = {}
        for method in methods:
            accepted = [a for r in rows for a in r[method]["accepted"]]
            m = {
                "prompt_tps": _median([r[method]["prompt_tps"] for r in rows]),
                "generation_tps": _median([r[method]["generation_tps"] for r in rows]),
                "peak_memory_gb": max(r[method]["peak_memory_gb"] for r in rows),
                "prompt_tokens": _median([r["prompt_tokens"] for r in rows]),
            }
            if method != "target":
                m["speedup"] = _median([r[method]["speedup"] for r in rows])
                m["tau"] = (sum(accepted) + len(accepted)) / len(accepted) if accepted else 1
                width = B if method == "dflash" else num_draft_tokens + 1
                m["acceptance_by_position"] = acceptance_by_position(accepted, width)
            summary[method] = m
        if "breakdown" in entry:
            d = summary["dflash"]
            bd = entry["breakdown"]
            ideal = d["tau"] * bd["ar_step_ms"] / bd["model_ms"]
            d["ideal_speedup"] = ideal
            d["efficiency"] = d["speedup"] / ideal if ideal else 0.0
        entry["suites"][suite] = summary


def format_table(result: dict[str, Any]) -> str:
    lines = []
    methods = result["settings"]["methods"]
    head = f"{'context':>8} {'suite':<8} {'method':<9} {'prompt t/s':>10} {'gen t/s':>9} "
    head += f"{'speedup':>8} {'tau':>6} {'peak GB':>8} {'eff':>5}"
    lines.append(head)
    has_eff = False
    for entry in result["contexts"]:
        for suite, summary in entry["suites"].items():
            for method in methods:
                m = summary[method]
                has_eff |= "efficiency" in m
                ctx = entry["context"] or int(m["prompt_tokens"])
                lines.append(
                    f"{ctx:>8} {suite:<8} {method:<9} {m['prompt_tps']:>10.1f} "
                    f"{m['generation_tps']:>9.1f} {m.get('speedup', 1.0):>8.2f} "
                    f"{m.get('tau', 1.0):>6.2f} {m['peak_memory_gb']:>8.2f} "
                    + (f"{m['efficiency']:>5.2f}" if "efficiency" in m else f"{'':>5}")
                )
        if "breakdown" in entry:
            b = entry["breakdown"]
            lines.append(
                f"  cycle (block {b['block_size']}): draft {b['draft_ms']:.2f} ms, verify "
                f"{b['verify_ms']:.2f} ms, accept+rollback {b['accept_rollback_ms']:.2f} ms, of "
                f"which host {b['host_ms']:.2f} ms; cycle {b['cycle_ms']:.2f} ms = "
                f"{b['cycle_over_ar']:.2f} x AR step {b['ar_step_ms']:.2f} ms"
            )
        for suite, summary in entry["suites"].items():
            acc = " ".join(f"{a:.2f}" for a in summary["dflash"]["acceptance_by_position"])
            lines.append(f"  dflash acceptance by block position, {suite}: {acc}")
    if has_eff:
        lines.append(
            "  eff = speedup / (tau x AR step / cycle model time): the share of the speedup "
            "the cycle's model math allows that the real loop delivers. The cycle is timed "
            "with a barrier after each phase, which the real loop does not have, so eff can "
            "exceed 1."
        )
    if result.get("interrupted"):
        n = sum(len(e["prompts"]) for e in result["contexts"])
        lines.append(f"  interrupted: partial results ({n} prompt(s) finished)")
    return "\n".join(lines)


def plot_panels(result: dict[str, Any]) -> dict[str, Any]:
    """What the plot shows: a title naming the run, and the panels worth drawing.

    "acceptance": {suite: rates by block position} (first context); "speed": {method:
    [(context, tok/s)]}, only with two or more contexts (one point is no curve).
    """
    st = result["settings"]
    target, draft = (
        f"demo {Path(p).name}" if demo.is_demo(p) else Path(str(p)).name
        for p in (st.get("model"), st.get("draft_model"))
    )
    kind = st["device"].removeprefix("Device(").split(",")[0]  # "Device(gpu, 0)" -> "gpu"
    device = f"{kind} ({st['device_name']})" if st.get("device_name") else kind
    title = (
        f"{target} with DFlash draft {draft} ({st.get('dtype', '?')}), block "
        f"{st['block_size']}, {device}, {st['max_tokens']} new tokens"
    )
    panels: dict[str, Any] = {"title": title}
    if result["contexts"]:
        first = result["contexts"][0]["suites"]
        panels["acceptance"] = {s: m["dflash"]["acceptance_by_position"] for s, m in first.items()}
    if len(result["contexts"]) > 1:
        panels["speed"] = {
            method: [
                (
                    e["context"] or statistics.median(r["prompt_tokens"] for r in e["prompts"]),
                    statistics.median(r[method]["generation_tps"] for r in e["prompts"]),
                )
                for e in result["contexts"]
            ]
            for method in st["methods"]
        }
    return panels


def plot(result: dict[str, Any], path: str) -> None:
    """Acceptance by block position (per suite) and generation tok/s vs context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = plot_panels(result)
    shown = [k for k in ("acceptance", "speed") if k in panels]
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4.2), squeeze=False)
    for ax, kind in zip(axes[0], shown):
        if kind == "acceptance":
            for suite, acc in panels["acceptance"].items():
                ax.plot(range(1, len(acc) + 1), acc, marker="o", label=suite)
            ax.set(xlabel="block position", ylabel="acceptance rate", title="DFlash acceptance")
            ax.set_xlim(left=0)
            ax.set_ylim(0, 1.05)
        else:
            for method, points in panels["speed"].items():
                ax.plot(*zip(*points), marker="o", label=method)
            ax.set(xlabel="context (tokens)", ylabel="generation tok/s", title="Speed vs context")
            ax.set_xlim(left=0)
            ax.set_ylim(bottom=0)
        ax.legend()
    fig.suptitle(panels["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------- CLI


def setup_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dflash-mlx benchmark",
        description="Benchmark DFlash against the target alone and mlx_lm speculative decoding.",
    )
    p.add_argument("--model", help="target: path or Hub id (default: the demo target)")
    p.add_argument("--draft-model", help="DFlash draft: path or Hub id (default: demo draft)")
    p.add_argument("--baseline-draft-model", help="mlx_lm draft model for the baseline run")
    p.add_argument("--num-draft-tokens", type=int, default=3, help="baseline draft tokens")
    p.add_argument(
        "--suite",
        default=None,
        help="built-in prompt sets: math, code, chat (default: all three; with the demo "
        "pair, its held-out Python prompts instead)",
    )
    p.add_argument("--prompts", help="jsonl file of prompts (replaces --suite)")
    p.add_argument("--max-prompts", type=int, default=None, help="at most this many per suite")
    p.add_argument("--max-tokens", "-m", type=int, default=128, help="tokens per generation")
    p.add_argument("--repeats", type=int, default=3, help="runs per prompt (median kept)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per method first")
    p.add_argument("--block-size", type=int, default=None, help="default: the draft's")
    p.add_argument("--context", default=None, help="pad prompts to these lengths: 1024,4k,16k")
    p.add_argument("--no-breakdown", action="store_true", help="skip the cycle breakdown")
    p.add_argument("--breakdown-cycles", type=int, default=16, help="cycles timed in the breakdown")
    p.add_argument("--ignore-chat-template", action="store_true", help="use prompts as raw text")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed")
    p.add_argument(
        "--json", nargs="?", const="-", default=None, help="write JSON to a file ('-': stdout)"
    )
    p.add_argument("--plot", default=None, help="write a PNG (needs matplotlib: the plot extra)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be positive, got {args.repeats}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    if args.block_size is not None and not 1 <= args.block_size <= 64:
        raise ValueError(f"--block-size must be in 1…64, got {args.block_size}")
    if args.num_draft_tokens < 1:
        raise ValueError(f"--num-draft-tokens must be positive, got {args.num_draft_tokens}")
    if args.max_prompts is not None and args.max_prompts < 1:
        raise ValueError(f"--max-prompts must be positive, got {args.max_prompts}")
    if args.breakdown_cycles < 1:
        raise ValueError(f"--breakdown-cycles must be positive, got {args.breakdown_cycles}")
    if args.prompts is not None and not Path(args.prompts).is_file():
        raise ValueError(f"--prompts {args.prompts}: no such file")
    # Outputs are checked now, not after a run that may take an hour.
    for flag in ("json", "plot"):
        path = getattr(args, flag)
        if path is not None and path != "-":
            if Path(path).is_dir():
                raise ValueError(f"--{flag} {path} is a directory")
            check_writable(Path(path))


def _pair(args: argparse.Namespace) -> tuple[str, str]:
    if args.model is not None and args.draft_model is None and not demo.is_demo(args.model):
        raise ValueError("--model needs --draft-model: the demo draft fits the demo target only")
    if args.draft_model is not None and args.model is None and not demo.is_demo(args.draft_model):
        raise ValueError("--draft-model needs --model: the draft's target")
    return args.model or str(demo.TARGET), args.draft_model or str(demo.DRAFT)


def _write(path: str, text: str) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    result = None
    try:
        _check_args(args)
        if args.plot is not None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ValueError(
                    "--plot needs matplotlib: pip install 'dflash-mlx[plot]' (or matplotlib)"
                ) from None
        contexts = parse_contexts(args.context)
        model_path, draft_path = _pair(args)
        prompts_file = args.prompts
        if prompts_file is None and args.suite is None and demo.is_demo(model_path):
            prompts_file = str(demo.EVAL_PROMPTS)  # the demo target writes Python only
        suites = [s.strip() for s in (args.suite or "math,code,chat").split(",")]
        prompts = load_prompts(suites, prompts_file)
        if args.max_prompts:
            kept: dict[str, int] = {}
            prompts = [
                (s, p)
                for s, p in prompts
                if (kept.__setitem__(s, kept.get(s, 0) + 1) or kept[s]) <= args.max_prompts
            ]
        from .loading import load, load_draft

        progress = Progress(0, "benchmark", enabled=not args.no_progress)
        progress.update(0, f"loading {model_path}")
        mx.random.seed(args.seed)
        model, tokenizer = load(model_path)
        draft = load_draft(draft_path)
        baseline = None
        if args.baseline_draft_model:
            progress.update(0, f"loading {args.baseline_draft_model}")
            baseline, _ = load(args.baseline_draft_model)
        try:
            result = benchmark(
                model,
                tokenizer,
                draft,
                prompts,
                baseline_draft=baseline,
                num_draft_tokens=args.num_draft_tokens,
                max_tokens=args.max_tokens,
                repeats=args.repeats,
                warmup=args.warmup,
                contexts=contexts,
                block_size=args.block_size,
                breakdown=not args.no_breakdown,
                breakdown_cycles=args.breakdown_cycles,
                chat_template=not args.ignore_chat_template,
                log=lambda s: print(s, file=sys.stderr, flush=True),
                progress=progress,
            )
        finally:
            progress.close()
        result["settings"]["model"] = model_path
        result["settings"]["draft_model"] = draft_path
        result["settings"]["baseline_draft_model"] = args.baseline_draft_model
        result["settings"]["prompts"] = prompts_file or ",".join(suites)
        result["settings"]["dtype"] = str(_dtype(model)).removeprefix("mlx.core.")
        if not result["contexts"]:
            print("interrupted before the first prompt finished: no results", file=sys.stderr)
            return 130
        table = format_table(result)
        if args.json == "-":
            print(table, file=sys.stderr)
            print(json.dumps(result, indent=1))
        else:
            print(table)
            if args.json:
                _write(args.json, json.dumps(result, indent=1))
        if args.plot:
            plot(result, args.plot)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 130 if result["interrupted"] else 0


def _dtype(model: nn.Module) -> mx.Dtype:
    from mlx.utils import tree_flatten

    dtypes = [
        v.dtype for _, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)
    ]
    return max(set(dtypes), key=dtypes.count) if dtypes else mx.float32


if __name__ == "__main__":
    sys.exit(main())
