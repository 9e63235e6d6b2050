"""DFlash speculative generation: `stream_generate`, `generate` and the mlx_lm-style CLI.

One cycle, as in the paper: the draft proposes a block in one forward, the target
verifies it in one forward, the longest acceptable prefix is accepted (plus one target
token), and the caches are committed to the last accepted token. A `VerifySession`
(session.py) owns the caches; the loop below only reads like the paper.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
from mlx import nn
from mlx_lm.generate import generation_stream, wired_limit
from mlx_lm.sample_utils import greedy_sampler
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .block_policy import BlockPolicy, make_policy
from .drafter import DraftModel
from .sampling import SamplingParams, greedy_accept, speculative_accept
from .session import VerifySession
from .tap import embedding_and_head, target_layers

LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


@dataclass
class GenerationResponse:
    """What mlx_lm's GenerationResponse carries, plus the acceptance of the cycle."""

    text: str
    token: int
    logprobs: mx.array
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: str | None = None
    accepted: int = 0  # draft tokens accepted in the cycle that produced this token
    acceptance_length: float = 0.0  # running mean tokens per cycle (tau)
    cycles: int = 0
    block_size: int = 1  # tokens the cycle verified (1: a plain step of the target)


@dataclass
class Cycle:
    tokens: list[int]  # accepted draft tokens, then one target token
    logprobs: mx.array  # [len(tokens), V] target log-probabilities at those positions
    accepted: int
    width: int = 1  # tokens the target verified in this cycle (1: a plain step)
    # Set by a consumer that stops inside this cycle: how many of `tokens` it emitted.
    # With a caller's prompt cache, the cache then holds exactly the emitted tokens.
    used: int | None = None


class Unread(NamedTuple):
    """A cycle built on the device whose outcome the host has not read yet."""

    block: mx.array  # anchor + drafts
    n_acc: mx.array | int  # accepted drafts (0, a host int, for a plain step)
    nxt: mx.array  # the target's token after them
    logprobs: mx.array
    width: int


def check_pair(model: nn.Module, draft: DraftModel) -> None:
    """A clear error before generation when the draft was not made for this target."""
    cfg = draft.config
    n_layers = len(target_layers(model))
    embed, _ = embedding_and_head(model)
    vocab = embed.weight.shape[0]
    hidden = embed(mx.array([0])).shape[-1]
    problems = []
    if cfg.num_target_layers != n_layers and not cfg.num_target_layers_inferred:
        problems.append(
            f"draft expects {cfg.num_target_layers} target layers, target has {n_layers}"
        )
    if cfg.hidden_size != hidden:
        problems.append(f"draft hidden size {cfg.hidden_size} != target hidden size {hidden}")
    if bad := [i for i in cfg.target_layer_ids if not 0 <= i < n_layers]:
        problems.append(f"draft target_layer_ids {bad} out of range for {n_layers} layers")
    if not 0 <= cfg.mask_token_id < vocab:
        problems.append(f"draft mask_token_id {cfg.mask_token_id} outside target vocab {vocab}")
    if cfg.vocab_size != vocab:
        problems.append(f"draft vocab_size {cfg.vocab_size} != target vocab {vocab}")
    if problems:
        raise ValueError("draft does not match target: " + "; ".join(problems))


def _process(
    processors: list[LogitsProcessor], history: list[int], block: mx.array, logits: mx.array
) -> mx.array:
    """Apply mlx_lm logits processors position by position, as sequential decoding would:
    position i has seen `history` (this call's prompt and every emitted token before
    the block) and block[: i + 1]."""
    seen = mx.concatenate([mx.array(history, dtype=mx.int32), block.astype(mx.int32)])
    rows = []
    for i in range(logits.shape[0]):
        row = logits[i : i + 1]
        for processor in processors:
            row = processor(seen[: len(history) + i + 1], row)
        rows.append(row)
    return mx.concatenate(rows, axis=0)


def dflash_cycles(
    model: nn.Module,
    draft: DraftModel,
    prompt: mx.array,
    *,
    max_tokens: int = 256,
    sampling: SamplingParams | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    block_size: int | str | None = None,
    draft_window: int | None = None,
    prefill_step_size: int = 2048,
    prompt_cache: list[Any] | None = None,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 5000,
    prompt_progress_callback: Callable[[int, int], None] | None = None,
    on_phase: Callable[[str, list[mx.array]], None] | None = None,
    policy: BlockPolicy | None = None,
    session_class: type[VerifySession] = VerifySession,
) -> Iterator[Cycle]:
    """Yield one Cycle per target forward; the first is the prefill's token.

    `block_size`: tokens per cycle (anchor + drafts), or None / "auto": chosen per cycle
    from this machine's measured costs and the running acceptance (block_policy.py);
    `policy` overrides both. With `prompt_cache` (from `make_prompt_cache(model, draft)`),
    generation continues from it and leaves it holding the prompt and every emitted
    token, as mlx_lm does. on_phase(name, arrays), if given, is called at the end of each
    phase of a drafting cycle ("draft", "verify", "accept_rollback") with the arrays that
    phase produced, so a benchmark can evaluate and time them; the default adds no sync.
    `session_class` makes the session (a subclass for a sharded target, distributed.py).
    """
    sampling = sampling or SamplingParams()
    check_pair(model, draft)
    processors = logits_processors or []
    history = prompt.tolist() if processors else []  # what sequential decoding has seen
    session = session_class(
        model,
        draft,
        prompt_cache,
        max_kv_size=max_kv_size,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
    )
    context = session.offset + prompt.size  # the prior's acceptance is for this length
    policy = policy or make_policy(model, draft, block_size, sampling.greedy, context)

    def pick(logits: mx.array, block: mx.array) -> tuple[mx.array, mx.array]:
        """(log-probabilities as mlx_lm reports them, what to sample or argmax from)."""
        if processors:
            logits = _process(processors, history, block, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return logprobs, logprobs if sampling.greedy else sampling.log_distribution(logits)

    def sample(dist: mx.array) -> mx.array:
        return mx.argmax(dist, axis=-1) if sampling.greedy else mx.random.categorical(dist)

    def drafting_cycle(anchor: mx.array, bs: int, compiled: bool = False):
        """Propose bs - 1 drafts after the anchor, verify the block in one target forward,
        accept on the device. Returns (block, accepted count, next token, logprobs)."""
        drafted, draft_logq = session.propose(anchor, bs - 1, sampling, draft_window)
        block = mx.concatenate([anchor, drafted])
        if not compiled:
            mx.async_eval(block)  # the device drafts while the host builds verify
        if on_phase:  # benchmarks only: no work on the hot path otherwise
            on_phase("draft", [block])

        logprobs, dist = pick(session.verify(block), block)
        if on_phase:
            on_phase("verify", [dist, session._features])

        # Decided once for every process (a sharded session broadcasts it).
        if bs == 1:
            n_acc, nxt = mx.array(0), sample(dist[0])
        elif sampling.greedy:
            n_acc, nxt = greedy_accept(drafted, mx.argmax(dist, axis=-1))
        else:
            n_acc, nxt = speculative_accept(drafted, draft_logq, dist)
        n_acc, nxt = session.decide(n_acc, nxt)
        return block, n_acc, nxt, logprobs

    def static_cycle(anchor: mx.array, bs: int, compiled: bool):
        """A cycle of bs tokens committed on the device (static caches: nothing waits);
        bs 1 is a plain step that writes its position into the draft's context."""
        block, n_acc, nxt, logprobs = drafting_cycle(anchor, bs, compiled)
        session.commit(n_acc + 1)
        return block, n_acc, nxt, logprobs

    def static_runner(bs: int) -> Callable[[mx.array], tuple]:
        """The static cycle of width bs as one compiled graph; a benchmark timing its
        phases (on_phase evaluates inside) or a host-scripted draft runs it eagerly."""
        if on_phase or not draft.traceable:
            return lambda anchor: static_cycle(anchor, bs, compiled=False)
        what = (bs, sampling.key(), draft_window)
        return session.compile_static(lambda a: static_cycle(a, bs, compiled=True), what)

    last: Cycle | None = None
    n_before = 0  # tokens emitted before `last`
    valid = 0  # positions of the newest block known to be emitted (anchor, drafts)
    with wired_limit(model, [generation_stream]), session, mx.stream(generation_stream):
        try:
            logits = session.prefill(prompt, prefill_step_size, prompt_progress_callback)
            base = session.offset  # the caches end with the prompt
            logprobs, dist = pick(logits, prompt[:0])
            token = sample(dist).item()
            last = Cycle([token], logprobs, 0)
            yield last
            n_emitted, n_cycles = 1, 0
            W = policy.max_width
            # Static caches (lengths on the device) let cycle t+1 be queued before the
            # host reads cycle t, and a cycle run as one compiled graph (one per width).
            static = not processors and W > 1
            static = static and session.can_go_static(session.offset + max_tokens + W)
            if static:
                session.go_static(session.offset + max_tokens + 4 * W)
                runners: dict[int, Callable[[mx.array], tuple]] = {}
            anchor = mx.array([token], dtype=mx.int32)
            # Cycles on the device the host has not read yet (at most one): every static
            # cycle, and plain steps (width 1: their commit needs no host value), unless
            # logits processors must see each token first.
            queue: list[Unread] = []
            tick = time.perf_counter()
            chosen = 0  # a width chosen but not launched yet

            while n_emitted < max_tokens:
                in_flight = 0 if static else len(queue)  # queued plain steps: 1 token each
                bs, chosen = chosen or policy.choose(), 0
                if not static:
                    bs = min(bs, max_tokens - n_emitted - in_flight)
                ready, cold = [], False
                if bs < 1:  # the queued steps end the generation
                    ready, queue = queue, []
                elif bs > 1 and not static and queue:
                    # A drafting cycle that syncs: read the queued step before launching it,
                    # so each cycle's wall time is its own (the policy weighs them).
                    chosen, ready, queue = bs, queue, []
                elif bs == 1 and not static:
                    # A plain step: the target alone, as mlx_lm decodes.
                    block = anchor
                    logprobs, dist = pick(session.decode(block), block)
                    n_acc, nxt = 0, session.decide(mx.array(0), sample(dist[0]))[1]
                    valid = 1
                elif static:  # propose, verify, accept, commit: all on the device
                    if bs not in runners:
                        runners[bs] = static_runner(bs)
                    session.reserve(bs)
                    block, n_acc, nxt, logprobs = runners[bs](anchor)
                    cold = getattr(runners[bs], "cold", False)
                    valid = 1
                else:
                    block, n_acc, nxt, logprobs = drafting_cycle(anchor, bs)
                    valid = 1

                if bs >= 1 and not chosen:
                    this = Unread(block, n_acc, nxt, logprobs, bs)
                    if static or (bs == 1 and not processors):
                        # Committed on the device; the host reads the cycle queued before.
                        anchor = nxt.reshape(1).astype(mx.int32)
                        mx.async_eval(nxt, block, *session.state_arrays())
                        queue.append(this)
                        ready, queue = queue[:-1], queue[-1:]
                    else:  # the commit needs the accepted count: read everything now
                        ready, queue = queue + [this], []

                for cycle in ready:
                    a, tokens = _read(cycle)  # the cycle's one host sync
                    newest = not queue and cycle is ready[-1]
                    if static:
                        session.committed(a + 1)
                    elif cycle.width > 1:  # a drafting cycle: commit what was accepted
                        session.commit(a + 1)
                    if not static and newest:  # nothing queued after it: it sets the anchor
                        anchor = mx.array(tokens[-1:], dtype=mx.int32)
                    if static or newest:
                        valid = a + 1
                    now = time.perf_counter()
                    # A gap that launched an eager or tracing call times no cycle.
                    policy.observe(cycle.width, a, None if cold else now - tick)
                    tick = now
                    if on_phase and cycle.width > 1:
                        on_phase("accept_rollback", session.state_arrays())
                    if processors:  # everything before the next anchor
                        history.extend([token] + tokens[:-1])
                    token = tokens[-1]
                    tokens = tokens[: max_tokens - n_emitted]
                    n_before = n_emitted
                    n_emitted += len(tokens)
                    n_cycles += 1
                    if n_cycles % 64 == 0:
                        mx.clear_cache()
                    last = Cycle(tokens, cycle.logprobs[: a + 1], a, cycle.width)
                    yield last
                    if n_emitted >= max_tokens:
                        break
        except GeneratorExit:  # the consumer stopped: settle, unless nothing ran yet
            if prompt_cache is not None and last is not None:
                _settle(session, base, n_before, valid, last)
            raise
        else:
            if prompt_cache is not None:
                _settle(session, base, n_before, valid, last)


def _read(cycle: Unread) -> tuple[int, list[int]]:
    """(accepted count, emitted tokens) of a queued cycle: the host waits for it here."""
    block, n_acc, nxt = cycle.block, cycle.n_acc, cycle.nxt
    if isinstance(n_acc, int):  # a plain step
        return 0, [nxt.item()]
    mx.eval(n_acc, nxt, block)  # one wait for all three; reading them after costs none
    a = n_acc.item()
    return a, block.tolist()[1 : a + 1] + [nxt.item()]


def _settle(session: VerifySession, base: int, n_before: int, valid: int, last: Cycle) -> None:
    """Leave the caller's prompt cache holding the prompt and every emitted token, as
    mlx_lm's does: base positions before the first token, then the emitted ones."""
    used = len(last.tokens) if last.used is None else last.used
    session.settle(base + n_before + used, valid, last.tokens[:used])
    mx.eval(session.state_arrays())


def _encode(tokenizer: TokenizerWrapper, prompt: str | mx.array | list[int]) -> mx.array:
    if isinstance(prompt, mx.array):
        return prompt
    if isinstance(prompt, str):
        add_special = tokenizer.bos_token is None or not prompt.startswith(tokenizer.bos_token)
        prompt = tokenizer.encode(prompt, add_special_tokens=add_special)
    return mx.array(prompt)


def _check_sampler(sampler: Any) -> None:
    if sampler is not None and sampler is not greedy_sampler:
        raise ValueError(
            "DFlash needs the sampling distribution, which a sampler function does not "
            "give: pass temp=, top_p=, min_p=, min_tokens_to_keep=, top_k=, "
            "xtc_probability=, xtc_threshold= instead of sampler="
        )


def stream_generate(
    model: nn.Module,
    draft: DraftModel,
    tokenizer: Any,
    prompt: str | mx.array | list[int],
    max_tokens: int = 256,
    *,
    sampler: Any = None,
    logits_processors: list[LogitsProcessor] | None = None,
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
    xtc_probability: float = 0.0,
    xtc_threshold: float = 0.1,
    xtc_special_tokens: list[int] | None = None,
    prompt_cache: list[Any] | None = None,
    max_kv_size: int | None = None,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 5000,
    prefill_step_size: int = 2048,
    prompt_progress_callback: Callable[[int, int], None] | None = None,
    block_size: int | None = None,
    draft_window: int | None = None,
    input_embeddings: mx.array | None = None,
    num_draft_tokens: int | None = None,
    session_class: type[VerifySession] = VerifySession,
) -> Generator[GenerationResponse, None, None]:
    """Like `mlx_lm.stream_generate`: one response per token, same text and stopping,
    the same keywords where they make sense with a DFlash draft.

    Greedy output equals the target's own greedy output; with temp > 0 tokens follow
    exactly the target's sampling distribution (speculative rejection sampling).
    `prompt_cache` comes from `dflash_mlx.make_prompt_cache(model, draft)` (or a file
    saved by `dflash_mlx.session.save_prompt_cache`) and is updated in place.
    """
    if max_tokens == 0:
        raise ValueError("max_tokens must be non-zero (use -1 for no limit)")
    if input_embeddings is not None:
        raise ValueError(
            "input_embeddings: the DFlash draft starts from token ids; pass the prompt"
        )
    if num_draft_tokens is not None:
        raise ValueError("num_draft_tokens is mlx_lm's; a DFlash block is block_size= tokens")
    _check_sampler(sampler)
    sampling = SamplingParams(
        temp,
        top_p,
        min_p,
        min_tokens_to_keep,
        top_k,
        xtc_probability,
        xtc_threshold,
        list(xtc_special_tokens or []),
    )
    sampling.check()
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    prompt = _encode(tokenizer, prompt)
    if prompt.ndim != 1:
        raise ValueError(f"one prompt at a time: got prompt of shape {prompt.shape}")
    if prompt.size == 0:
        raise ValueError("the prompt is empty")
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    limit = max_tokens if max_tokens > 0 else sys.maxsize

    cycles = dflash_cycles(
        model,
        draft,
        prompt,
        max_tokens=limit,
        sampling=sampling,
        logits_processors=logits_processors,
        block_size=block_size,
        draft_window=draft_window,
        prefill_step_size=prefill_step_size,
        prompt_cache=prompt_cache,
        max_kv_size=max_kv_size,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        quantized_kv_start=quantized_kv_start,
        prompt_progress_callback=prompt_progress_callback,
        session_class=session_class,
    )
    tic = time.perf_counter()
    n, n_cycles, emitted_in_cycles = 0, 0, 0
    prompt_tps = 0.0
    try:
        for cycle in cycles:
            if n == 0:
                prompt_tps = prompt.size / (time.perf_counter() - tic)
                tic = time.perf_counter()
            else:
                n_cycles += 1
                emitted_in_cycles += len(cycle.tokens)
            tau = emitted_in_cycles / n_cycles if n_cycles else 0.0
            for i, token in enumerate(cycle.tokens):
                n += 1
                stop = token in tokenizer.eos_token_ids
                if not stop:
                    detokenizer.add_token(token)
                last = stop or n == limit
                if last:
                    cycle.used = i + 1
                    detokenizer.finalize()
                yield GenerationResponse(
                    text=detokenizer.last_segment,
                    token=token,
                    logprobs=cycle.logprobs[i],
                    from_draft=i < cycle.accepted,
                    prompt_tokens=prompt.size,
                    prompt_tps=prompt_tps,
                    generation_tokens=n,
                    generation_tps=n / (time.perf_counter() - tic),
                    peak_memory=mx.get_peak_memory() / 1e9,
                    finish_reason=("stop" if stop else "length") if last else None,
                    accepted=cycle.accepted,
                    acceptance_length=tau,
                    cycles=n_cycles,
                    block_size=cycle.width,
                )
                if last:
                    return
    finally:
        cycles.close()  # settles a caller's prompt cache; leaves no hook on the target


def generate(
    model: nn.Module,
    draft: DraftModel,
    tokenizer: Any,
    prompt: str | mx.array | list[int],
    verbose: bool = False,
    **kwargs: Any,
) -> str:
    """Generate a complete response; with verbose, stream it and print statistics."""
    text = ""
    per_cycle = Counter()  # cycle -> tokens it emitted (accepted drafts + one)
    widths = Counter()  # cycle -> tokens it verified
    response = None
    for response in stream_generate(model, draft, tokenizer, prompt, **kwargs):
        if verbose:  # the banner only once generation really started (no banner on errors)
            print(
                ("=" * 10 + "\n" if response.generation_tokens == 1 else "") + response.text,
                end="",
                flush=True,
            )
        text += response.text
        if response.cycles:
            per_cycle[response.cycles] = response.accepted + 1
            widths[response.cycles] = response.block_size
    if verbose and response is not None:
        print("\n" + "=" * 10)
        if not text:
            print("No text generated for this prompt")
            return text
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
        print(
            f"Generation: {response.generation_tokens} tokens, "
            f"{response.generation_tps:.3f} tokens-per-sec"
        )
        print(f"Peak memory: {response.peak_memory:.3f} GB")
        if response.cycles == 0:
            print("Acceptance length (tau): n/a (no draft cycle ran)")
        else:
            print(f"Acceptance length (tau): {response.acceptance_length:.2f} tokens per cycle")
            print("Tokens per cycle: " + format_histogram(Counter(per_cycle.values())))
            print("Block sizes: " + format_histogram(Counter(widths.values())))
    return text


def format_histogram(counts: Counter) -> str:
    total = sum(counts.values()) or 1
    return "  ".join(f"{k}:{100 * v / total:.0f}%" for k, v in sorted(counts.items()))


# The CLI: `dflash-mlx generate`, option for option `mlx_lm generate` (same names, defaults,
# semantics and help) wherever the option makes sense with a DFlash draft.
DEFAULT_PROMPT = "    def __repr__(self):\\n"  # the demo target writes Python
DEFAULT_MAX_TOKENS = 100
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_MIN_P = 0.0
DEFAULT_TOP_K = 0
DEFAULT_XTC_PROBABILITY = 0.0
DEFAULT_XTC_THRESHOLD = 0.1
DEFAULT_MIN_TOKENS_TO_KEEP = 1
DEFAULT_QUANTIZED_KV_START = 5000
DEFAULT_PREFILL_STEP_SIZE = 2048


def block_size_argument(text: str) -> int | str:
    """--block-size: 'auto' or a whole number (checked against its range later)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not 'auto' or a number") from None


def str2bool(string: str) -> bool:
    """mlx_lm's reading of --verbose: anything but 'false' / 'f' (any case) is true."""
    return string.lower() not in ["false", "f"]


def add_kv_cache_arguments(parser: argparse.ArgumentParser) -> None:
    """mlx_lm's --kv-bits, --kv-group-size and --quantized-kv-start (generate and
    cache_prompt share them, as mlx_lm's two commands do)."""
    parser.add_argument(
        "--kv-bits",
        type=int,
        help="Number of bits for KV cache quantization. Defaults to no quantization.",
        default=None,
    )
    parser.add_argument(
        "--kv-group-size",
        type=int,
        help="Group size for KV cache quantization.",
        default=64,
    )
    parser.add_argument(
        "--quantized-kv-start",
        help="When --kv-bits is set, start quantizing the KV cache from this step onwards.",
        type=int,
        default=DEFAULT_QUANTIZED_KV_START,
    )


def check_kv_cache_arguments(args: argparse.Namespace) -> None:
    """The values of the KV flags (add_kv_cache_arguments, --max-kv-size) and of
    --prefill-step-size: one line naming the flag."""
    if args.kv_bits is not None and args.kv_bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"--kv-bits must be one of 2, 3, 4, 5, 6, 8, got {args.kv_bits}")
    if args.kv_group_size not in (32, 64, 128):
        raise ValueError(f"--kv-group-size must be 32, 64 or 128, got {args.kv_group_size}")
    if args.quantized_kv_start < 0:
        raise ValueError(f"--quantized-kv-start must be >= 0, got {args.quantized_kv_start}")
    if args.max_kv_size is not None and args.max_kv_size < 1:
        raise ValueError(f"--max-kv-size must be positive, got {args.max_kv_size}")
    if args.kv_bits is not None and args.max_kv_size is not None:
        raise ValueError("--kv-bits does not work with --max-kv-size (a rotating KV cache)")
    if args.prefill_step_size < 1:
        raise ValueError(f"--prefill-step-size must be positive, got {args.prefill_step_size}")


def add_prefill_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prefill-step-size",
        type=int,
        default=DEFAULT_PREFILL_STEP_SIZE,
        help="Number of prompt tokens to process at a time. Smaller values "
        f"lower peak memory during prefill (default: {DEFAULT_PREFILL_STEP_SIZE})",
    )


def setup_arg_parser() -> argparse.ArgumentParser:
    """Set up and return the argument parser."""
    parser = argparse.ArgumentParser(
        prog="dflash-mlx generate",
        description="Generate text with DFlash speculative decoding (output equals the "
        "target's own for greedy decoding; same distribution when sampling).",
    )
    parser.add_argument(
        "--model",
        type=str,
        default=None,
        help="The path to the local model directory or Hugging Face repo. "
        "If no model is specified, then the demo target is used.",
    )
    parser.add_argument(
        "--draft-model",
        type=str,
        default=None,
        help="The DFlash draft for the model: a converted or published checkpoint "
        "directory, or Hugging Face repo (default: the demo draft, for the demo target).",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Enable trusting remote code for tokenizer",
    )
    parser.add_argument(
        "--adapter-path",
        type=str,
        help="Optional path for the trained adapter weights and config.",
    )
    parser.add_argument(
        "--extra-eos-token",
        type=str,
        default=(),
        nargs="+",
        help="Add tokens in the list of eos tokens that stop generation.",
    )
    parser.add_argument(
        "--system-prompt",
        default=None,
        help="System prompt to be used for the chat template",
    )
    parser.add_argument(
        "--prompt",
        "-p",
        default=DEFAULT_PROMPT,
        help="Message to be processed by the model ('-' reads from stdin)",
    )
    parser.add_argument(
        "--max-tokens",
        "-m",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help="Maximum number of tokens to generate",
    )
    parser.add_argument("--temp", type=float, default=DEFAULT_TEMP, help="Sampling temperature")
    parser.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="Sampling top-p")
    parser.add_argument("--min-p", type=float, default=DEFAULT_MIN_P, help="Sampling min-p")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="Sampling top-k")
    parser.add_argument(
        "--xtc-probability",
        type=float,
        default=DEFAULT_XTC_PROBABILITY,
        help="Probability of XTC sampling to happen each next token",
    )
    parser.add_argument(
        "--xtc-threshold",
        type=float,
        default=DEFAULT_XTC_THRESHOLD,
        help="Threshold the probs of each next token candidate to be sampled by XTC",
    )
    parser.add_argument(
        "--min-tokens-to-keep",
        type=int,
        default=DEFAULT_MIN_TOKENS_TO_KEEP,
        help="Minimum tokens to keep for min-p sampling.",
    )
    parser.add_argument("--seed", type=int, default=None, help="PRNG seed")
    parser.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="Use the raw prompt without the tokenizer's chat template.",
    )
    parser.add_argument(
        "--chat-template-config",
        help="Additional config for `apply_chat_template`. Should be a dictionary of"
        " string keys to values represented as a JSON decodable string.",
        default=None,
    )
    parser.add_argument(
        "--verbose",
        type=str2bool,
        default=True,
        help="Log verbose output when 'True' or 'T' or only print the response when 'False' or 'F'",
    )
    parser.add_argument(
        "--max-kv-size",
        type=int,
        help="Set the maximum key-value cache size",
        default=None,
    )
    add_prefill_argument(parser)
    parser.add_argument(
        "--prompt-cache-file",
        type=str,
        default=None,
        help="A file containing saved KV caches to avoid recomputing them "
        "(made by `dflash-mlx cache_prompt`)",
    )
    add_kv_cache_arguments(parser)
    parser.add_argument(
        "--block-size",
        type=block_size_argument,
        default="auto",
        help="Tokens per DFlash cycle (the anchor and the drafted tokens), or 'auto': "
        "chosen each cycle from this machine's measured costs and the acceptance so far "
        "(default: auto)",
    )
    parser.add_argument(
        "--draft-window",
        type=int,
        default=None,
        help="The draft attends to at most this many recent context positions "
        "(default: all of them)",
    )
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="Under mlx.launch: split the target's layers over the processes (pipeline "
        "parallelism) instead of sharding every layer (tensor parallelism)",
    )
    return parser


def _check_args(args: argparse.Namespace) -> None:
    """Every option's value, before anything is loaded: one line naming the flag."""
    if args.max_tokens == 0 or args.max_tokens < -1:
        raise ValueError(f"--max-tokens must be positive or -1 (no limit), got {args.max_tokens}")
    SamplingParams(
        args.temp,
        args.top_p,
        args.min_p,
        args.min_tokens_to_keep,
        args.top_k,
        args.xtc_probability,
        args.xtc_threshold,
    ).check(name=lambda field: "--" + field.replace("_", "-"))
    check_kv_cache_arguments(args)
    if args.block_size != "auto" and not 1 <= args.block_size <= 64:
        raise ValueError(f"--block-size must be 'auto' or in 1…64, got {args.block_size}")
    if args.draft_window is not None and args.draft_window < 1:
        raise ValueError(f"--draft-window must be positive, got {args.draft_window}")
    if args.prompt_cache_file is not None and not Path(args.prompt_cache_file).is_file():
        raise ValueError(f"--prompt-cache-file {args.prompt_cache_file}: no such file")


def _template_kwargs(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--chat-template-config is not valid JSON: {e}") from e
    if not isinstance(kwargs, dict):
        raise ValueError("--chat-template-config must be a JSON object")  # noqa: TRY004 (bad input)
    return kwargs


def _read_prompt(text: str) -> str:
    prompt = text.replace("\\n", "\n").replace("\\t", "\t")
    if prompt != "-":
        return prompt
    data = sys.stdin.buffer.read()
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        raise ValueError(
            f"the prompt on stdin is not UTF-8 text: byte {data[e.start]:#04x} at offset {e.start}"
        ) from None


def _cache_metadata(path: str) -> dict:
    """The user metadata of a prompt cache file (which model and draft made it)."""
    from mlx_lm.models.cache import load_prompt_cache as read_cache_file

    try:
        _, metadata = read_cache_file(path, return_metadata=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ValueError(f"--prompt-cache-file {path} is not a prompt cache file: {e}") from e
    return metadata


def _model_paths(args: argparse.Namespace, metadata: dict) -> tuple[str, str]:
    from . import demo

    model = args.model or metadata.get("model")
    draft = args.draft_model or metadata.get("draft_model")
    if model is not None and draft is None and not demo.is_demo(model):
        raise ValueError("--model needs --draft-model: the demo draft fits the demo target only")
    if draft is not None and model is None and not demo.is_demo(draft):
        raise ValueError("--draft-model needs --model: the draft's target")
    return model or str(demo.TARGET), draft or str(demo.DRAFT)


def run(args: argparse.Namespace) -> None:
    from mlx_lm.models.cache import QuantizedKVCache

    from .loading import load, load_draft

    _check_args(args)
    template_kwargs = _template_kwargs(args.chat_template_config)
    prompt = _read_prompt(args.prompt)  # before loading anything: bad input fails fast

    using_cache = args.prompt_cache_file is not None
    metadata = _cache_metadata(args.prompt_cache_file) if using_cache else {}
    tokenizer_config = json.loads(metadata.get("tokenizer_config", "{}"))
    tokenizer_config["trust_remote_code"] = args.trust_remote_code
    model_path, draft_path = _model_paths(args, metadata)
    if args.seed is not None:
        mx.random.seed(args.seed)

    group = mx.distributed.init()  # size > 1 under mlx.launch: a sharded target
    if group.size() > 1:
        from . import distributed

        if args.adapter_path is not None:
            raise ValueError("--adapter-path does not work with a sharded target")
        if using_cache:
            raise ValueError("--prompt-cache-file does not work with a sharded target")
        model, tokenizer = distributed.load(
            model_path,
            pipeline=args.pipeline,
            tokenizer_config=tokenizer_config,
            trust_remote_code=args.trust_remote_code,
        )
    else:
        model, tokenizer = load(
            model_path,
            adapter_path=args.adapter_path,
            tokenizer_config=tokenizer_config,
            trust_remote_code=args.trust_remote_code,
        )
    draft = load_draft(draft_path)
    check_pair(model, draft)
    prompt_cache = None
    if using_cache:
        from .session import load_prompt_cache

        prompt_cache, _ = load_prompt_cache(args.prompt_cache_file, model, draft)
        if isinstance(prompt_cache[0], QuantizedKVCache):
            if args.kv_bits is not None and args.kv_bits != prompt_cache[0].bits:
                raise ValueError(
                    "--kv-bits does not match the kv cache loaded from --prompt-cache-file."
                )
            if args.kv_group_size != prompt_cache[0].group_size:
                raise ValueError(
                    "--kv-group-size does not match the kv cache loaded from --prompt-cache-file."
                )
    for eos_token in args.extra_eos_token:
        tokenizer.add_eos_token(eos_token)

    use_chat_template = not args.ignore_chat_template and tokenizer.has_chat_template
    if use_chat_template:
        messages = (
            []
            if args.system_prompt is None
            else [{"role": "system", "content": args.system_prompt}]
        )
        messages.append({"role": "user", "content": prompt})
        prompt = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **template_kwargs
        )
        if using_cache:
            # As mlx_lm: the cache holds the start of the user's message (see cache_prompt),
            # so only what follows it in the templated text is new.
            messages[-1]["content"] = "<query>"
            test_prompt = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            prompt = prompt[test_prompt.index("<query>") :]
    prompt = tokenizer.encode(prompt, add_special_tokens=not use_chat_template)
    if not prompt:
        raise ValueError("the prompt is empty")

    first = group.rank() == 0  # with several processes, only rank 0 prints
    text = (distributed.generate if group.size() > 1 else generate)(
        model,
        draft,
        tokenizer,
        prompt,
        verbose=args.verbose and first,
        max_tokens=args.max_tokens,
        temp=args.temp,
        top_p=args.top_p,
        min_p=args.min_p,
        min_tokens_to_keep=args.min_tokens_to_keep,
        top_k=args.top_k,
        xtc_probability=args.xtc_probability,
        xtc_threshold=args.xtc_threshold,
        xtc_special_tokens=tokenizer.encode("\n") + list(tokenizer.eos_token_ids),
        prompt_cache=prompt_cache,
        max_kv_size=args.max_kv_size,
        kv_bits=args.kv_bits,
        kv_group_size=args.kv_group_size,
        quantized_kv_start=args.quantized_kv_start,
        prefill_step_size=args.prefill_step_size,
        block_size=args.block_size,
        draft_window=args.draft_window,
    )
    if not args.verbose and first:
        print(text)


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    try:
        run(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:  # ConfigError/CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
