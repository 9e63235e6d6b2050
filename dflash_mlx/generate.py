"""DFlash speculative generation: `stream_generate`, `generate` and the mlx_lm-style CLI.

One cycle, as in the paper: the draft proposes a block in one forward, the target
verifies it in one forward, the longest acceptable prefix is kept (plus one target
token), and the caches roll back to the last accepted token.
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
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx_lm.generate import generation_stream, wired_limit
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .drafter import DraftModel
from .kernels import verify_attention
from .rollback import rollback_for
from .sampling import SamplingParams, greedy_accept, speculative_accept
from .tap import Tap, embedding_and_head, tap_hidden_states, target_layers

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


@dataclass
class Cycle:
    tokens: list[int]  # accepted draft tokens, then one target token
    logprobs: mx.array  # [len(tokens), V] target log-probabilities at those positions
    accepted: int


def check_pair(model: nn.Module, draft: DraftModel) -> None:
    """A clear error before generation when the draft was not made for this target."""
    cfg = draft.config
    n_layers = len(target_layers(model))
    embed, _ = embedding_and_head(model)
    vocab = embed.weight.shape[0]
    hidden = embed(mx.array([0])).shape[-1]
    problems = []
    if cfg.num_target_layers != n_layers:
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
    position i has seen `history` and block[: i + 1]."""
    rows = []
    history = mx.array(history)
    for i in range(logits.shape[0]):
        row = logits[i : i + 1]
        seen = mx.concatenate([history, block[: i + 1]])
        for processor in processors:
            row = processor(seen, row)
        rows.append(row)
    return mx.concatenate(rows, axis=0)


def prefill(
    model: nn.Module,
    draft: DraftModel,
    tap: Tap,
    prompt: mx.array,
    cache: list[Any],
    draft_cache: list[Any],
    step: int,
) -> mx.array:
    """Run the prompt through the target in chunks, caching its tapped features in the
    draft cache. The last token goes alone, as in mlx_lm, so no chunk computes
    full-vocabulary logits. Returns the last position's logits [1, V]."""
    head = prompt[:-1]
    chunks = [head[i : i + step] for i in range(0, head.size, step)]
    for chunk in [*chunks, prompt[-1:]]:
        logits = model(chunk[None], cache=cache)
        draft.add_context(tap.features(), draft_cache)
        mx.eval([c.state for c in cache] + [c.state for c in draft_cache])
    return logits[0, -1:]


def dflash_cycles(
    model: nn.Module,
    draft: DraftModel,
    prompt: mx.array,
    *,
    max_tokens: int = 256,
    sampling: SamplingParams | None = None,
    logits_processors: list[LogitsProcessor] | None = None,
    block_size: int | None = None,
    draft_window: int | None = None,
    prefill_step_size: int = 2048,
    on_phase: Callable[[str, list[mx.array]], None] | None = None,
) -> Iterator[Cycle]:
    """Yield one Cycle per target forward; the first is the prefill's token.

    on_phase(name, arrays), if given, is called at the end of each phase of a cycle
    ("draft", "verify", "accept_rollback") with the arrays that phase produced, so a
    benchmark can evaluate and time them; the default adds no sync.
    """
    sampling = sampling or SamplingParams()
    check_pair(model, draft)
    draft.bind(model)
    B = block_size or draft.block_size
    if B < 1:
        raise ValueError(f"block size must be >= 1, got {B}")
    processors = logits_processors or []
    cache = make_prompt_cache(model)
    draft_cache = draft.make_cache()
    history = prompt[:-1].tolist() if processors else []  # tokens before the block

    def pick(logits: mx.array, block: mx.array) -> tuple[mx.array, mx.array]:
        if processors:
            logits = _process(processors, history, block, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return logprobs, logprobs if sampling.greedy else sampling.log_distribution(logprobs)

    with (
        wired_limit(model, [generation_stream]),
        tap_hidden_states(model, draft.config.target_layer_ids) as tap,
        rollback_for(model, cache) as rollback,
        mx.stream(generation_stream),
    ):
        logits = prefill(model, draft, tap, prompt, cache, draft_cache, prefill_step_size)
        logprobs, dist = pick(logits, prompt[-1:])
        first = mx.argmax(dist, axis=-1) if sampling.greedy else mx.random.categorical(dist)
        token = first.item()
        yield Cycle([token], logprobs, 0)
        n_emitted, n_cycles, context = 1, 0, None

        while n_emitted < max_tokens:
            bs = min(B, max_tokens - n_emitted)

            # Draft: one forward proposes bs-1 tokens after the anchor.
            if bs > 1:
                block = mx.array([[token] + [draft.mask_token_id] * (bs - 1)])
                hidden = draft(block, context, draft_cache, draft_window)
                draft_logits = draft.logits(hidden[0, 1:])
                if sampling.greedy:
                    drafted = mx.argmax(draft_logits, axis=-1)
                else:
                    draft_dist = sampling.log_distribution(
                        draft_logits - mx.logsumexp(draft_logits, axis=-1, keepdims=True)
                    )
                    drafted = mx.random.categorical(draft_dist)
                verify_in = mx.concatenate([mx.array([token]), drafted.astype(mx.int32)])
                mx.async_eval(verify_in)  # the device drafts while the host builds verify
            else:
                drafted = mx.array([], dtype=mx.int32)
                verify_in = mx.array([token])
            if on_phase:  # benchmarks only: no work on the hot path otherwise
                on_phase("draft", [verify_in])

            # Verify: one target forward over the whole block.
            with rollback.verifying(), verify_attention(model):
                logits = model(verify_in[None], cache=cache)
            features = tap.features()
            logprobs, dist = pick(logits[0], verify_in)
            if on_phase:
                on_phase("verify", [dist, features])

            # Accept: on device; then the cycle's one host sync.
            if bs == 1:
                n_acc = mx.array(0)
                nxt = mx.argmax(dist[0]) if sampling.greedy else mx.random.categorical(dist[0])
            elif sampling.greedy:
                n_acc, nxt = greedy_accept(drafted, mx.argmax(dist, axis=-1))
            else:
                n_acc, nxt = speculative_accept(drafted, draft_dist, dist)
            mx.eval(n_acc, nxt, drafted)
            a = n_acc.item()
            tokens = drafted.tolist()[:a] + [nxt.item()]

            # Roll back: caches keep the anchor and the accepted drafts.
            rollback(a + 1, bs)
            context = features[:, : a + 1]
            if on_phase:
                on_phase("accept_rollback", [context, *(c.state for c in cache)])
            if processors:
                history += [token] + tokens[:-1]
            token = tokens[-1]
            n_emitted += len(tokens)
            n_cycles += 1
            if n_cycles % 64 == 0:
                mx.clear_cache()
            yield Cycle(tokens, logprobs[: a + 1], a)


def _encode(tokenizer: TokenizerWrapper, prompt: str | mx.array | list[int]) -> mx.array:
    if isinstance(prompt, mx.array):
        return prompt
    if isinstance(prompt, str):
        add_special = tokenizer.bos_token is None or not prompt.startswith(tokenizer.bos_token)
        prompt = tokenizer.encode(prompt, add_special_tokens=add_special)
    return mx.array(prompt)


def stream_generate(
    model: nn.Module,
    draft: DraftModel,
    tokenizer: Any,
    prompt: str | mx.array | list[int],
    max_tokens: int = 256,
    *,
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
    logits_processors: list[LogitsProcessor] | None = None,
    block_size: int | None = None,
    draft_window: int | None = None,
    prefill_step_size: int = 2048,
) -> Generator[GenerationResponse, None, None]:
    """Like `mlx_lm.stream_generate`: one response per token, same text and stopping.

    Greedy output equals the target's own greedy output; with temp > 0 tokens follow
    exactly the target's sampling distribution (speculative rejection sampling).
    """
    if max_tokens == 0:
        raise ValueError("max_tokens must be non-zero (use -1 for no limit)")
    if temp < 0:
        raise ValueError(f"temp must be >= 0, got {temp}")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    prompt = _encode(tokenizer, prompt)
    if prompt.size == 0:
        raise ValueError("the prompt is empty")
    sampling = SamplingParams(temp, top_p, min_p, min_tokens_to_keep, top_k)
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
                )
                if last:
                    return
    finally:
        cycles.close()  # leaves no tap or hook on the target


def generate(
    model: nn.Module,
    draft: DraftModel,
    tokenizer: Any,
    prompt: str | mx.array | list[int],
    verbose: bool = False,
    **kwargs: Any,
) -> str:
    """Generate a complete response; with verbose, stream it and print statistics."""
    if verbose:
        print("=" * 10)
    text = ""
    accepted = Counter()
    response = None
    for response in stream_generate(model, draft, tokenizer, prompt, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
        if response.cycles and response.accepted is not None:
            accepted[response.cycles] = response.accepted + 1
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
        print(f"Acceptance length (tau): {response.acceptance_length:.2f} tokens per cycle")
        print("Accepted per cycle: " + format_histogram(Counter(accepted.values())))
    return text


def format_histogram(counts: Counter) -> str:
    total = sum(counts.values()) or 1
    return "  ".join(f"{k}:{100 * v / total:.0f}%" for k, v in sorted(counts.items()))


DEMO_DIR = Path(__file__).resolve().parent.parent / "examples" / "demo"
DEFAULT_PROMPT = "    def __repr__(self):\\n"


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dflash-mlx generate",
        description="Generate text with DFlash speculative decoding (output equals the "
        "target's own for greedy decoding; same distribution when sampling).",
    )
    parser.add_argument("--model", help="target: path or Hub id (default: the demo target)")
    parser.add_argument("--draft-model", help="DFlash draft: path or Hub id (default: demo draft)")
    parser.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="prompt ('-' reads stdin)")
    parser.add_argument("--system-prompt", default=None, help="system prompt for the chat template")
    parser.add_argument("--max-tokens", "-m", type=int, default=256)
    parser.add_argument("--temp", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--ignore-chat-template", action="store_true")
    parser.add_argument("--chat-template-config", default=None, help="JSON of template kwargs")
    parser.add_argument("--extra-eos-token", type=str, nargs="+", default=())
    parser.add_argument("--prefill-step-size", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=None, help="default: the draft's")
    parser.add_argument(
        "--draft-window", type=int, default=None, help="draft attends to at most this much context"
    )
    parser.add_argument(
        "--verbose",
        type=lambda s: s.lower() in ("1", "true", "yes"),
        nargs="?",
        const=True,
        default=True,
        help="print statistics (default: true)",
    )
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if args.max_tokens == 0 or args.max_tokens < -1:
        raise ValueError(f"--max-tokens must be positive or -1, got {args.max_tokens}")
    if args.temp < 0:
        raise ValueError(f"--temp must be >= 0, got {args.temp}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 <= args.min_p <= 1:
        raise ValueError(f"--min-p must be in [0, 1], got {args.min_p}")
    if args.block_size is not None and not 1 <= args.block_size <= 64:
        raise ValueError(f"--block-size must be in 1…64, got {args.block_size}")
    if args.draft_window is not None and args.draft_window < 1:
        raise ValueError(f"--draft-window must be positive, got {args.draft_window}")
    if args.prefill_step_size < 1:
        raise ValueError(f"--prefill-step-size must be positive, got {args.prefill_step_size}")


def run(args: argparse.Namespace) -> None:
    from .loading import load, load_draft

    _check_args(args)
    template_kwargs = {}
    if args.chat_template_config is not None:
        try:
            template_kwargs = json.loads(args.chat_template_config)
        except json.JSONDecodeError as e:
            raise ValueError(f"--chat-template-config is not valid JSON: {e}") from e
    if (args.model is None or args.draft_model is None) and not (DEMO_DIR / "target").exists():
        raise ValueError("give --model and --draft-model (the demo pair is not installed)")
    model_path = args.model or str(DEMO_DIR / "target")
    draft_path = args.draft_model or str(DEMO_DIR / "draft")
    if args.seed is not None:
        mx.random.seed(args.seed)

    model, tokenizer = load(model_path)
    draft = load_draft(draft_path)
    for eos_token in args.extra_eos_token:
        tokenizer.add_eos_token(eos_token)

    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    prompt = sys.stdin.read() if prompt == "-" else prompt
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
    prompt = tokenizer.encode(prompt, add_special_tokens=not use_chat_template)

    text = generate(
        model,
        draft,
        tokenizer,
        prompt,
        verbose=args.verbose,
        max_tokens=args.max_tokens,
        temp=args.temp,
        top_p=args.top_p,
        min_p=args.min_p,
        top_k=args.top_k,
        block_size=args.block_size,
        draft_window=args.draft_window,
        prefill_step_size=args.prefill_step_size,
    )
    if not args.verbose:
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
