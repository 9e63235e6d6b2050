"""`dflash-mlx serve`: an OpenAI-compatible HTTP server, mlx_lm's with DFlash generation.

Built on `mlx_lm.server`: its HTTP handler (request parsing and validation, chat
templates, tool-call parsing, reasoning / stop-word text handling, logprobs, SSE
streaming), its request queue and generation thread, and its `LRUPromptCache`. What
changes is the generation: `_serve_single` runs `dflash_mlx.stream_generate` with a
DFlash prompt cache (the target's caches, then the draft's context caches, one flat
list, so mlx_lm's trie / trim / byte accounting apply unchanged). A request whose
prompt extends a cached one prefills only the rest; for targets whose caches cannot
be trimmed back (recurrent layers) a copy one position short of each prompt is kept,
which the next turn extends. Added around it: checks that answer a bad request with a
4xx in OpenAI's error shape before it queues, a bounded queue (503 when full),
dropping requests whose client hung up, and tau in the usage.

Under `mlx.launch` (several processes) the target is sharded as mlx_lm.server shards
it: tensor parallel, or pipeline parallel with `--pipeline` (`distributed.load`).
Rank 0 alone serves HTTP; every rank runs the generation thread, and rank 0 shares
each request with the others (`broadcast`), then a stop flag at the end of every
cycle, so all of them run the same generation and stop at the same token.

    dflash-mlx serve                      # the demo pair on 127.0.0.1:8080
    dflash-mlx serve --model Qwen/Qwen3-8B --draft-model z-lab/Qwen3-8B-DFlash-b16
    mlx.launch --hostfile hosts.json -- dflash-mlx serve --model M --draft-model D [--pipeline]
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import os
import pickle
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from pathlib import Path
from queue import Empty as QueueEmpty
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.generate import DEFAULT_QUANTIZED_KV_START, generation_stream
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.server import (
    APIHandler,
    CompletionRequest,
    GenerationContext,
    ModelProvider,
    Response,
    ResponseGenerator,
    _format_top_logprobs,
    _image_parts,
    _make_logits_processors,
    get_system_fingerprint,
)
from mlx_lm.utils import _parse_size

from . import demo, distributed
from .generate import block_size_argument, check_pair, stream_generate
from .loading import load_draft
from .session import make_prompt_cache

DEMO_MODEL_ID = "dflash-mlx-demo"
MAX_BODY_BYTES = 64 * 2**20

_current = threading.local()  # the handler a request thread is serving
logger = logging.getLogger(__name__)


class ServeError(ValueError):
    """A request the server refuses: HTTP status, OpenAI error code, one clear line."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class ClientGone(ConnectionError):
    pass


def error_body(status: int, message: str, code: str | None = None) -> dict:
    """OpenAI's error shape."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


@dataclass
class DFlashStats:
    """What a request's usage reports beyond mlx_lm's (filled in by the generation thread)."""

    acceptance_length: float = 0.0
    cycles: int = 0


@dataclass
class DFlashRequest(CompletionRequest):
    """mlx_lm's request plus what the handler worked out before queueing it."""

    tokens: list[int] = field(default_factory=list)
    initial_state: str = "normal"
    stats: DFlashStats = field(default_factory=DFlashStats)
    cancelled: threading.Event = field(default_factory=threading.Event)

    # Pickled to share it with the other processes of a sharded target: the hang-up
    # event belongs to rank 0's handler (the others learn of it through the stop flag).
    def __getstate__(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "cancelled"}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self.cancelled = threading.Event()


def _cache_length(cache: list[Any]) -> int | None:
    """Tokens held by a DFlash prompt cache, or None when its parts disagree (then it
    is not reusable). Recurrent caches carry no length; the attention caches, the
    draft's included, must all hold the same number of positions."""
    lengths = {c.offset for c in cache if hasattr(c, "offset")}
    return lengths.pop() if len(lengths) == 1 else None


def _lookback(args: Any) -> int:
    """How many trailing tokens a request's logits processors read (mlx_lm's penalties
    read the last context_size, 0 meaning all; logit_bias none)."""
    lp = args.logits
    sizes = [
        size
        for penalty, size in (
            (lp.repetition_penalty, lp.repetition_context_size),
            (lp.presence_penalty, lp.presence_context_size),
            (lp.frequency_penalty, lp.frequency_context_size),
        )
        if penalty
    ]
    return sys.maxsize if 0 in sizes else max(sizes, default=0)


def _hung_up(sock: socket.socket) -> bool:
    """Whether the client closed its end: readable, with nothing to read. (poll, not
    select: select fails on descriptors past 1024.)"""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        if not poller.poll(0):
            return False
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def broadcast(obj: Any, group: mx.distributed.Group) -> Any:
    """Rank 0's `obj` (picklable, or None) on every process of `group`: its size, then
    its bytes, each an all_sum to which the other processes add zeros. Every process
    calls it at the same point; on generation_stream, so that it queues behind any
    collective a generation left there (one stream: one order on every process)."""
    if group.size() == 1:
        return obj
    first = group.rank() == 0
    data = pickle.dumps(obj) if first and obj is not None else b""
    with mx.stream(generation_stream):
        size = mx.distributed.all_sum(mx.array(len(data)), group=group).item()
        if size == 0:
            return None
        mine = mx.array(data) if first else mx.zeros((size,), mx.uint8)
        shared = mx.distributed.all_sum(mine, group=group)
        mx.eval(shared)
    return obj if first else pickle.loads(np.array(shared).tobytes())


def any_rank(flag: bool, group: mx.distributed.Group) -> bool:
    """Whether `flag` holds on any process (every process calls it at the same point)."""
    if group.size() == 1:
        return flag
    with mx.stream(generation_stream):
        return mx.distributed.all_sum(mx.array(int(flag)), group=group).item() > 0


class SharedPromptCache(LRUPromptCache):
    """The prompt cache of one process of a sharded target. Every process keeps its own
    (its shard of each cache) and makes the same inserts and fetches in the same order,
    so the caches stay alike as long as evictions do too: by count they do; the byte
    limit is per process (each holds a different share), so an entry is evicted on every
    process while any one is over it."""

    def __init__(self, max_size: int, max_bytes: int, group: mx.distributed.Group):
        super().__init__(max_size=max_size)
        self.byte_limit, self.group = max_bytes, group

    def insert_cache(self, *args: Any, **kwargs: Any) -> None:
        super().insert_cache(*args, **kwargs)
        while len(self) and any_rank(self.nbytes > self.byte_limit, self.group):
            self.trim_to(n_sequences=len(self) - 1)  # the least recently used, everywhere


class _Discard:
    """The response queue of a request on a process other than rank 0: nobody reads it."""

    def put(self, item: Any) -> None:
        pass


class DFlashModelProvider(ModelProvider):
    """Loads the target as mlx_lm's server does (adapters, chat template, tokenizer
    config) and the DFlash draft with `load_draft`. One pair is served: every request
    gets it (the handler has already refused other model names). With several
    processes, this one's shard of the target (`distributed.load`)."""

    def __init__(self, cli_args: argparse.Namespace):
        super().__init__(cli_args)
        self.ready = threading.Event()
        self.context_limit: int | None = None
        self.load_error: Exception | None = None
        self.group = mx.distributed.init()
        self.reuse_prompt_cache = True

    def _load(self, model_path, adapter_path=None, draft_model_path=None):
        try:
            self._load_pair(model_path, adapter_path, draft_model_path)
        except Exception as e:
            self.load_error = e
            raise

    def _load_pair(self, model_path, adapter_path, draft_model_path):
        if self.is_distributed:
            self._load_shard(model_path)
        else:
            super()._load(model_path, adapter_path, None)  # mlx_lm's draft: autoregressive
        draft = load_draft(draft_model_path)
        check_pair(self.model, draft)  # a mismatched pair fails at startup, not per request
        draft.bind(self.model)
        if self.is_distributed:
            self._check_prompt_cache(draft)
            if self.cli_args.block_size == "auto":
                logger.info(
                    f"block size {draft.block_size} (the draft's): the auto policy times "
                    "each process's cycles, so the processes would choose different widths"
                )
        self.draft_model = draft
        self.model_key = (model_path, adapter_path, draft_model_path)
        self.is_batchable = False  # one DFlash sequence at a time
        args = getattr(self.model, "args", None)
        limit = self.cli_args.max_context or getattr(args, "max_position_embeddings", None)
        self.context_limit = int(limit) if limit else None
        self.ready.set()

    def _load_shard(self, model_path: str) -> None:
        """This process's shard of the target; every process loads at the same time
        (the generation threads start together), and an error is the same on each."""
        model, tokenizer = distributed.load(
            model_path,
            pipeline=self.cli_args.pipeline,
            tokenizer_config=self._tokenizer_config,
            trust_remote_code=self.cli_args.trust_remote_code,
        )
        if self.cli_args.use_default_chat_template and tokenizer.chat_template is None:
            tokenizer.chat_template = tokenizer.default_chat_template
        self.model, self.tokenizer, self.processor = model, tokenizer, None

    def _check_prompt_cache(self, draft: Any) -> None:
        """Reuse prompt caches only where every process decides alike. Whether a cache
        trims decides what is fetched and kept; a process of a pipelined hybrid target
        that runs none of its recurrent layers holds trimmable stand-ins for all of
        them (distributed.Positions), so it would decide otherwise than the others."""
        trimmable = can_trim_prompt_cache(make_prompt_cache(self.model, draft))
        some, others = any_rank(trimmable, self.group), any_rank(not trimmable, self.group)
        if not (some and others):
            return
        self.reuse_prompt_cache = False
        logger.info(
            "prompt caches off: the processes' caches of this split differ in whether "
            "they can be trimmed, so they would not reuse the same ones"
        )

    def load(self, model_path, adapter_path=None, draft_model_path=None):
        return super().load("default_model", None, "default_model")


class DFlashResponseGenerator(ResponseGenerator):
    """mlx_lm's generation thread and queue, serving every request with DFlash.

    With several processes every one runs this thread; rank 0's queue feeds them all
    (`_next_request`), and only rank 0's responses go anywhere."""

    def __init__(
        self, model_provider: DFlashModelProvider, prompt_cache: LRUPromptCache, queue_size: int
    ):
        # Set before the base class starts the generation thread.
        self.slots = threading.BoundedSemaphore(queue_size)
        self.tokenizer_lock = threading.Lock()
        self.group = model_provider.group
        self.sharded = self.group.size() > 1
        self.serving = self.group.rank() == 0  # the process whose responses are sent
        self._stopping = False  # rank 0 of a sharded target: stop, once the others know
        super().__init__(model_provider, prompt_cache)

    def _run_generate(self):
        try:
            self._generate()
        except Exception as e:
            if e is not self.model_provider.load_error:  # make_server reports that one
                logger.exception("the generation thread died")
            self._generation_failed = True
        finally:
            # MLX wants a thread's streams destroyed by that thread before it ends;
            # otherwise the process aborts at exit now and then ("terminate called").
            mx.clear_streams()

    def stop_and_join(self) -> None:
        """Stop generating and wait for the thread. With several processes, rank 0
        stops them all; the others wait for that."""
        if not self.sharded:
            return super().stop_and_join()
        if self.serving:
            self._stopping = True  # _next_request tells the others, then stops
        self.join()

    def _next_request(self, timeout=None):
        if not self.sharded:
            return super()._next_request(timeout)
        request, message = None, None
        if self.serving:  # rank 0: what comes next, for every process
            if self._stopping:
                message = ("stop",)
            else:
                request = self._take(timeout)
                message = None if request is None else ("request", *request[1:])
        message = broadcast(message, self.group)
        if message is None:
            return None
        if message[0] == "stop":
            self._stop = True
            return None
        return request if self.serving else (_Discard(), *message[1:])

    def _take(self, timeout: float | None) -> tuple | None:
        """The next queued request whose client is still there (rank 0)."""
        try:
            request = self.requests.get(timeout=timeout) if timeout else self.requests.get_nowait()
        except QueueEmpty:
            return None
        # Dropped here, before the other processes hear of it: the decision is shared.
        return None if request[1].cancelled.is_set() else request

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the pair is loaded; ServeError(503) if loading failed or timed out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.model_provider.ready.wait(0.1):
            if not self.generation_available():
                raise ServeError(503, "the model failed to load; see the server log")
            if deadline is not None and time.monotonic() > deadline:
                raise ServeError(503, "the model is still loading; retry shortly")

    def tokenize(self, request: CompletionRequest, chat_template_kwargs: dict | None):
        """mlx_lm's tokenization (chat template, tools, role mapping), in the caller's
        thread so an over-long prompt is refused before it queues."""
        args = argparse.Namespace(chat_template_kwargs=chat_template_kwargs)
        with self.tokenizer_lock:
            prompt, _, _, initial_state, _ = self._tokenize(
                self.model_provider.tokenizer, request, args
            )
        return list(prompt), initial_state

    def generate(self, request, generation_args, progress_callback=None):
        try:
            return super().generate(request, generation_args, progress_callback)
        except ClientGone:
            raise
        except Exception as e:
            # mlx_lm answers 404 to whatever failed here; say what it was.
            handler = getattr(_current, "handler", None)
            if handler is not None and handler.error is None:
                if self.generation_available():
                    handler.error = ServeError(500, f"generation failed: {e}", "server_error")
                else:
                    handler.error = ServeError(503, f"generation is unavailable: {e}")
            raise

    def _await_response(self, response_queue):
        # As mlx_lm's, and also notices a client that hung up while its request waited
        # or generated (a non-streaming request writes nothing until the end).
        handler = getattr(_current, "handler", None)
        while True:
            if handler is not None and handler.client_gone():
                raise ClientGone("client disconnected")
            try:
                return response_queue.get(timeout=0.25)
            except QueueEmpty:
                if not self.generation_available():
                    raise RuntimeError("generation thread died") from None

    def _fetch_cache(self, prompt: list[int], keep: int) -> tuple[list[Any], list[int]]:
        """The nearest cached prefix, leaving at least `keep` prompt tokens to run."""
        provider = self.model_provider
        cache, rest = None, prompt
        if provider.reuse_prompt_cache:
            cache, rest = self.prompt_cache.fetch_nearest_cache(provider.model_key, prompt)
        keep = min(keep, len(prompt))
        if cache is not None and len(rest) < keep:
            if can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, keep - len(rest))
                rest = prompt[-keep:]
            else:
                cache, rest = None, prompt
        if cache is None:
            cache = make_prompt_cache(provider.model, provider.draft_model)
        return cache, rest

    def _store_cache(self, tokens: list[int], cache: list[Any], cache_type: str) -> None:
        if not self.model_provider.reuse_prompt_cache:
            return
        n = _cache_length(cache)
        if n is not None and n > len(tokens) and can_trim_prompt_cache(cache):
            # Stopped inside a cycle: drop the accepted tokens nobody saw.
            trim_prompt_cache(cache, n - len(tokens))
            n = len(tokens)
        if n is None or n == 0 or n > len(tokens):
            logger.debug("prompt cache not kept: it does not match the tokens")
            return
        self.prompt_cache.insert_cache(
            self.model_provider.model_key, tokens[:n], cache, cache_type=cache_type
        )

    def _serve_single(self, request, stream):
        rqueue, request, args = request
        if request.cancelled.is_set() and not self.sharded:  # sharded: see _take
            return  # its client hung up while it was queued
        try:
            self._serve_dflash(rqueue, request, args)
        except Exception as e:  # noqa: BLE001 (as mlx_lm: the handler re-raises it)
            rqueue.put(e)

    def _serve_dflash(self, rqueue, request, args) -> None:
        provider = self.model_provider
        model, tokenizer, draft = provider.model, provider.tokenizer, provider.draft_model
        cli = self.cli_args
        prompt, initial_state, stats = request.tokens, request.initial_state, request.stats
        stop_sequences, text_sm = self._make_state_machine(
            provider.model_key, tokenizer, args.stop_words
        )
        ctx = GenerationContext(
            has_tool_calling=tokenizer.has_tool_calling,
            has_thinking=tokenizer.has_thinking,
            tool_parser=tokenizer.tool_parser,
            text_sm=text_sm,
            initial_state=initial_state,
            prompt=prompt,
        )
        # The first token needs the last prompt position's logits, and a penalty
        # processor the tokens it looks back at: run at least those again.
        cache, rest = self._fetch_cache(prompt, max(1, _lookback(args)))
        ctx.prompt_cache_count = len(prompt) - len(rest)
        trimmable = can_trim_prompt_cache(cache)
        snapshot = []

        def progress(processed: int, total: int) -> None:
            rqueue.put((processed, total))
            # Hybrid targets cannot be trimmed back, so keep a copy of the cache one
            # position short of the prompt: the next turn (or the same prompt again)
            # extends it. The prefill runs the last position alone, right after this.
            if (
                not trimmable
                and 0 < processed == total - 1
                and _cache_length(cache) == ctx.prompt_cache_count + processed
            ):
                snapshot[:] = [copy.deepcopy(cache)]

        xtc_special = tokenizer.encode("\n") + list(tokenizer.eos_token_ids)
        kwargs = {
            "temp": args.sampling.temperature,
            "top_p": args.sampling.top_p,
            "min_p": args.sampling.min_p,
            "top_k": args.sampling.top_k,
            "xtc_probability": args.sampling.xtc_probability,
            "xtc_threshold": args.sampling.xtc_threshold,
            "xtc_special_tokens": xtc_special,
            "logits_processors": _make_logits_processors(args),
            "prompt_cache": cache,
            "prefill_step_size": cli.prefill_step_size,
            "prompt_progress_callback": progress,
            "kv_bits": cli.kv_bits,
            "kv_group_size": cli.kv_group_size,
            "quantized_kv_start": cli.quantized_kv_start,
            "block_size": cli.block_size,
            "draft_window": cli.draft_window,
        }

        rqueue.put(ctx)  # errors before this answer with a status, after it mid-response
        if args.seed is not None:
            mx.random.seed(args.seed)
        tic = time.perf_counter()
        tokens = list(prompt)
        n = 0
        stop_matcher = stop_sequences.matcher()
        generate = distributed.stream_generate if self.sharded else stream_generate
        responses = generate(model, draft, tokenizer, rest, args.max_tokens, **kwargs)
        failure = None  # an error making a response: it ends the generation as a stop does
        try:
            for gen in responses:
                n += 1
                finish_reason = gen.finish_reason
                if stop_matcher.advance(gen.token):
                    finish_reason = "stop"
                stats.acceptance_length = gen.acceptance_length
                stats.cycles = gen.cycles
                if self.serving and failure is None:  # only rank 0's responses go out
                    try:
                        logprobs = gen.logprobs
                        top = _format_top_logprobs(logprobs, args.top_logprobs, tokenizer)
                        logprob = logprobs[gen.token].item()
                        rqueue.put(Response(gen.text, gen.token, logprob, finish_reason, top))
                    except Exception as e:  # noqa: BLE001 (the handler raises it)
                        failure = e
                tokens.append(gen.token)
                if finish_reason is not None:  # the same token on every process
                    break
                stop = failure is not None or ctx._should_stop or self._stop
                stop = stop or request.cancelled.is_set()
                if self.sharded:
                    if gen.from_draft:
                        continue  # inside a cycle (computed already): decide at its end
                    # Rank 0's hang-up or shutdown, on every process after the same cycle.
                    stop = any_rank(self.serving and (stop or self._stopping), self.group)
                if stop:
                    break
        finally:
            responses.close()  # the cache is final once the generator has closed
        elapsed = time.perf_counter() - tic
        logger.info(  # before the response ends, so a client that got it can see it
            f"DFlash: prompt {len(prompt)} tokens ({ctx.prompt_cache_count} cached, "
            f"{len(rest)} prefilled), generated {n} tokens in {elapsed:.2f} s, "
            f"tau {stats.acceptance_length:.2f} over {stats.cycles} cycles"
        )
        rqueue.put(failure)  # None: the end of the response

        if snapshot:
            self._store_cache(prompt[:-1], snapshot[0], "user")
        self._store_cache(tokens, cache, "assistant")
        self._log_cache_stats()


class _ErrorBody:
    """Stands in for the handler's wfile after an error status: rewrites the one error
    body mlx_lm writes ({"error": "text"}, or plain text) into OpenAI's error shape."""

    def __init__(self, raw: io.BufferedIOBase, status: int, error: ServeError | None):
        self.raw, self.status, self.error, self.done = raw, status, error, False

    def write(self, data: bytes) -> int:
        if self.done:
            return self.raw.write(data)
        self.done = True
        if self.error is not None:
            message, code = str(self.error), self.error.code
        else:
            text = bytes(data).decode(errors="replace")
            try:
                message = json.loads(text)["error"]
            except (ValueError, KeyError, TypeError):
                message = text
            message, code = str(message), None
        return self.raw.write(json.dumps(error_body(self.status, message, code)).encode())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


class DFlashAPIHandler(APIHandler):
    """mlx_lm's handler with the checks a public endpoint needs before queueing."""

    timeout = 300  # seconds a client may stall a read or a write before it is dropped

    def setup(self):
        super().setup()
        self.error: ServeError | None = None
        self.status = 0
        self.headers_sent = False
        self.dflash_request: DFlashRequest | None = None
        self._last_check = 0.0

    @property
    def generator(self) -> DFlashResponseGenerator:
        return self.response_generator

    # Error plumbing: every error response leaves in OpenAI's shape, with our status.

    def send_response(self, code, message=None):
        if code >= 400 and self.error is not None:
            code = self.error.status
        self.status = code
        super().send_response(code, message)

    def end_headers(self):
        super().end_headers()
        self.headers_sent = True
        if self.status >= 400 and not isinstance(self.wfile, _ErrorBody):
            self.wfile = _ErrorBody(self.wfile, self.status, self.error)

    def send_error(self, code, message=None, explain=None):
        # http.server's own errors (a bad request line, an unsupported method), as JSON.
        self.error = ServeError(code, message or HTTPStatus(code).phrase)
        body = json.dumps(error_body(code, str(self.error))).encode()
        self.close_connection = True
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if getattr(self, "command", None) != "HEAD":
            getattr(self.wfile, "raw", self.wfile).write(body)

    def reject(self, status: int, message: str, code: str | None = None):
        self.error = ServeError(status, message, code)
        raise self.error

    def send_error_json(self, status: int, message: str, code: str | None = None) -> None:
        self.error = ServeError(status, message, code)
        self._set_completion_headers(status)
        self.end_headers()
        self.wfile.write(message.encode())
        self.wfile.flush()

    def client_gone(self) -> bool:
        now = time.monotonic()
        if now - self._last_check < 0.2:
            return False
        self._last_check = now
        return _hung_up(self.connection)

    # Requests.

    def do_POST(self):
        # Read the body before anything else: answering with unread bytes left in
        # the socket resets the connection, and the client sees no answer at all.
        length = self.headers.get("Content-Length")
        if length is not None and length.isdigit():
            if int(length) > MAX_BODY_BYTES:
                self.close_connection = True
                return self.send_error_json(413, f"request body over {MAX_BODY_BYTES} bytes")
            self.rfile = io.BytesIO(self.rfile.read(int(length)))
        if not self.generator.slots.acquire(blocking=False):
            return self.send_error_json(
                503, "the server is at its request limit (--queue-size); retry later", "busy"
            )
        _current.handler = self
        try:
            super().do_POST()
        except (ClientGone, BrokenPipeError, ConnectionResetError, TimeoutError) as e:
            logger.info(f"client {self.client_address[0]} went away ({e.__class__.__name__})")
        except Exception as e:
            logger.exception("request failed")
            self._fail_late(e)
        finally:
            if self.dflash_request is not None:
                self.dflash_request.cancelled.set()  # stops its generation if still running
            _current.handler = None
            self.generator.slots.release()

    def _fail_late(self, e: Exception) -> None:
        """An error after the response began: a 500 if no header left yet, else an
        error event on the stream (the openai client raises it)."""
        try:
            if not self.headers_sent:
                self._headers_buffer = []
                self.send_error_json(500, f"generation failed: {e}", "server_error")
            elif getattr(self, "stream", False):
                body = error_body(500, f"generation failed: {e}", "server_error")
                self.wfile.write(f"data: {json.dumps(body)}\n\n".encode())
                self.wfile.flush()
        except OSError:
            pass

    def handle_completion(self, request, stop_words):
        self.dflash_request = request
        super().handle_completion(request, stop_words)

    def handle_chat_completions(self) -> CompletionRequest:
        messages = self.body.get("messages")
        if not isinstance(messages, list) or not messages:
            self.reject(400, "'messages' must be a non-empty list of messages")
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                self.reject(400, "each message must be an object with a string 'role'")
            if not isinstance(m.get("content"), (str, list, type(None))):
                self.reject(400, "a message's 'content' must be a string or a list of parts")
        if any(_image_parts(messages)):
            self.reject(400, "images are not supported by the DFlash server")
        if not isinstance(self.body.get("tools"), (list, type(None))):
            self.reject(400, "'tools' must be a list")
        return self._prepare(super().handle_chat_completions())

    def handle_text_completions(self) -> CompletionRequest:
        if not isinstance(self.body.get("prompt"), str):
            self.reject(400, "'prompt' must be a string")
        return self._prepare(super().handle_text_completions())

    def _check_fields(self) -> None:
        body = self.body
        model = self.requested_model
        if model not in self.server.model_ids:
            self.reject(
                404,
                f"The model '{model}' does not exist; this server serves "
                f"'{self.server.model_ids[0]}' (see /v1/models)",
                "model_not_found",
            )
        cli = self.response_generator.cli_args
        if body.get("draft_model") not in (None, "default_model", cli.draft_model):
            self.reject(400, "'draft_model' cannot be chosen per request")
        if self.adapter not in (None, cli.adapter_path):
            self.reject(400, "'adapters' cannot be chosen per request")
        if body.get("n", 1) not in (1, None):
            self.reject(400, "only n=1 is supported")
        stop = body.get("stop")
        if not (
            stop is None
            or isinstance(stop, str)
            or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
        ):
            self.reject(400, "'stop' must be a string or a list of strings")
        options = self.stream_options
        if options is not None:
            if not isinstance(options, dict):
                self.reject(400, "'stream_options' must be an object")
            # mlx_lm reads the key unconditionally.
            self.stream_options = {"include_usage": bool(options.get("include_usage"))}
        if not isinstance(self.chat_template_kwargs, (dict, type(None))):
            self.reject(400, "'chat_template_kwargs' must be an object")

    def _prepare(self, request: CompletionRequest) -> DFlashRequest:
        self._check_fields()
        try:
            self.generator.wait_ready(timeout=600)
        except ServeError as e:
            self.error = e
            raise
        request = DFlashRequest(**vars(request))
        request.tokens, request.initial_state = self.generator.tokenize(
            request, self.chat_template_kwargs
        )
        n = len(request.tokens)
        if n == 0:
            self.reject(400, "the prompt is empty")
        limit = self.generator.model_provider.context_limit
        if limit is not None:
            if n >= limit:
                self.reject(
                    400,
                    f"This model's maximum context length is {limit} tokens; the prompt "
                    f"has {n} tokens.",
                    "context_length_exceeded",
                )
            # Generation stops at the context limit (finish_reason "length").
            self.max_tokens = min(self.max_tokens, limit - n)
        return request

    def _usage_extra(self, response: dict) -> dict:
        if "usage" in response and self.dflash_request is not None:
            stats = self.dflash_request.stats
            response["usage"]["acceptance_length"] = round(stats.acceptance_length, 4)
            response["usage"]["dflash_cycles"] = stats.cycles
        return response

    def generate_response(self, *args, **kwargs) -> dict:
        return self._usage_extra(super().generate_response(*args, **kwargs))

    def completion_usage_response(self, *args, **kwargs) -> dict:
        return self._usage_extra(super().completion_usage_response(*args, **kwargs))

    def handle_models_request(self):
        # mlx_lm lists every model in the Hub cache; this server serves one pair.
        ids = self.server.model_ids
        wanted = self.path[len("/v1/models") :].strip("/")
        if wanted and wanted not in ids:
            return self.send_error_json(
                404, f"The model '{wanted}' does not exist", "model_not_found"
            )
        args = self.response_generator.cli_args
        card = {
            "id": ids[0],
            "object": "model",
            "created": self.created,
            "owned_by": "dflash-mlx",
            "draft": args.draft_model,
        }
        body = card if wanted else {"object": "list", "data": [card]}
        self._set_completion_headers(200)
        self.end_headers()
        self.wfile.write(json.dumps(body).encode())
        self.wfile.flush()

    def log_message(self, format, *args):
        logger.debug(f"{self.address_string()} {format % args}")


class DFlashHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # clients connecting at once wait in the backlog, not in SYN retries
    model_ids: tuple[str, ...] = ()


@dataclass
class Server:
    """A running server: `url`, `close()`. `make_server` binds it, `start` serves.
    On a sharded target's other processes `httpd` is None: they follow rank 0."""

    httpd: DFlashHTTPServer | None
    generator: DFlashResponseGenerator
    thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    def start(self) -> Server:
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def close(self) -> None:
        """Stop serving and generating (elsewhere than rank 0: wait until rank 0 does)."""
        if self.thread is not None:
            self.httpd.shutdown()
            self.thread.join(timeout=10)
        if self.httpd is not None:
            self.httpd.server_close()
        self.generator.stop_and_join()

    def follow(self) -> int:
        """A process other than rank 0: generate for rank 0's requests until rank 0
        stops. A signal here (Ctrl-C reaches every local process) waits for that, as
        leaving would strand rank 0 in a collective; a second one exits at once."""
        signals = []

        def on_signal(signum, frame):
            if signals:
                os._exit(128 + signum)
            signals.append(signum)
            logger.info("stopping when rank 0 stops (signal again to exit now)")

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        while self.generator.generation_available():
            time.sleep(0.2)
        mx.clear_streams()
        if self.generator._generation_failed:
            print("error: generation failed on this process; see the log", file=sys.stderr)
            return 1
        return 0


def model_ids(args: argparse.Namespace) -> list[str]:
    """Names a request may give for the served model; the first is the advertised one."""
    ids = [args.served_model_name or (args.model if args.model_given else DEMO_MODEL_ID)]
    ids += ["default_model", args.model]
    if Path(args.model).exists():
        ids.append(str(Path(args.model).resolve()))
    return list(dict.fromkeys(ids))


def _bind(args: argparse.Namespace) -> DFlashHTTPServer:
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET

    class Bound(DFlashHTTPServer):
        address_family = family

    try:  # the handler is set once the generator exists
        return Bound((args.host, args.port), DFlashAPIHandler)
    except OSError as e:
        raise ValueError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None


def make_server(args: argparse.Namespace, load_timeout: float | None = None) -> Server:
    """Bind (rank 0), then load the pair (in mlx_lm's generation thread, as its server
    does). Binding first fails fast; with several processes rank 0's result is shared
    before any process loads, so a taken port stops every one of them."""
    group = mx.distributed.init()
    httpd, error = None, None
    if group.rank() == 0:
        try:
            httpd = _bind(args)
        except ValueError as e:
            error = str(e)
    if group.size() > 1:
        error = broadcast(error, group)  # the only collective outside the generation thread
    if error is not None:
        raise ValueError(error)

    provider = DFlashModelProvider(args)
    if group.size() > 1 and args.prompt_cache_bytes is not None:
        lru = SharedPromptCache(args.prompt_cache_size, args.prompt_cache_bytes, group)
    else:
        max_bytes = args.prompt_cache_bytes if args.prompt_cache_bytes is not None else 1 << 63
        lru = LRUPromptCache(max_size=args.prompt_cache_size, max_bytes=max_bytes)
    generator = DFlashResponseGenerator(provider, lru, args.queue_size)
    try:
        generator.wait_ready(load_timeout)
    except ServeError:
        generator.stop_and_join()
        if httpd is not None:
            httpd.server_close()
        raise ValueError(
            f"could not load {args.model} with draft {args.draft_model}: {provider.load_error}"
        ) from None

    if httpd is not None:
        fingerprint = get_system_fingerprint()
        httpd.RequestHandlerClass = lambda *a, **k: DFlashAPIHandler(
            generator, *a, system_fingerprint=fingerprint, **k
        )
        httpd.model_ids = tuple(model_ids(args))
    return Server(httpd, generator)


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dflash-mlx serve",
        description="An OpenAI-compatible server (mlx_lm.server's API) generating with "
        "DFlash speculative decoding. With no --model/--draft-model it serves the demo pair.",
    )
    add = parser.add_argument
    add("--model", help="target: path or Hub id (default: the demo target)")
    add("--draft-model", help="DFlash draft: path or Hub id (default: the demo draft)")
    add("--adapter-path", help="optional LoRA adapter for the target")
    add("--served-model-name", help="model id to advertise (default: --model)")
    add("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    add("--port", type=int, default=8080, help="port (default: 8080; 0 picks a free one)")
    add("--allowed-origins", type=lambda x: x.split(","), default="*", help="CORS origins")
    add("--trust-remote-code", action="store_true", help="trust remote code for the tokenizer")
    add("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    add("--chat-template", default="", help="a chat template for the tokenizer")
    add("--use-default-chat-template", action="store_true")
    add("--chat-template-args", type=json.loads, default="{}", help="JSON of template kwargs")
    add("--temp", type=float, default=0.0, help="default temperature")
    add("--top-p", type=float, default=1.0, help="default nucleus top-p")
    add("--top-k", type=int, default=0, help="default top-k (0: off)")
    add("--min-p", type=float, default=0.0, help="default min-p (0: off)")
    add("--max-tokens", type=int, default=512, help="default maximum tokens per response")
    add("--prefill-step-size", type=int, default=2048)
    add("--prompt-cache-size", type=int, default=10, help="most prompt caches kept")
    add(
        "--prompt-cache-bytes",
        type=_parse_size,
        help="most bytes of prompt caches kept (on each process of a sharded target)",
    )
    add("--kv-bits", type=int, default=None, help="quantize the target KV cache to this many bits")
    add("--kv-group-size", type=int, default=64)
    add("--quantized-kv-start", type=int, default=DEFAULT_QUANTIZED_KV_START)
    add(
        "--block-size",
        type=block_size_argument,
        default="auto",
        help="tokens per DFlash cycle, or 'auto': chosen per cycle from measured costs",
    )
    add("--draft-window", type=int, default=None, help="draft attends to at most this context")
    add("--max-context", type=int, default=None, help="context limit (default: the target's)")
    add("--queue-size", type=int, default=64, help="requests accepted at once; more get 503")
    add(
        "--pipeline",
        action="store_true",
        help="under mlx.launch: split the target's layers over the processes (pipeline "
        "parallelism) instead of sharding every layer (tensor parallelism)",
    )
    # Read by mlx_lm's handler and model provider; fixed for DFlash.
    parser.set_defaults(num_draft_tokens=3, model_given=False)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    if (args.model is None) != (args.draft_model is None) and not (
        demo.is_demo(args.model) and demo.is_demo(args.draft_model)
    ):
        raise ValueError("give both --model and --draft-model (or neither, for the demo pair)")
    args.model_given = args.model is not None
    if args.model is None:
        if not demo.TARGET.exists():
            raise ValueError("give --model and --draft-model (the demo pair is not installed)")
        args.model, args.draft_model = str(demo.TARGET), str(demo.DRAFT)
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be positive, got {args.max_tokens}")
    if args.temp < 0:
        raise ValueError(f"--temp must be >= 0, got {args.temp}")
    if args.block_size != "auto" and not 1 <= args.block_size <= 64:
        raise ValueError(f"--block-size must be 'auto' or in 1…64, got {args.block_size}")
    if args.queue_size < 1:
        raise ValueError(f"--queue-size must be positive, got {args.queue_size}")
    if args.prompt_cache_size < 0:
        raise ValueError(f"--prompt-cache-size must be >= 0, got {args.prompt_cache_size}")
    if mx.distributed.init().size() > 1 and args.adapter_path is not None:
        raise ValueError("--adapter-path does not work with a sharded target")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = setup_arg_parser().parse_args(argv)
    _check_args(args)
    return args


def main(argv: list[str] | None = None) -> int:
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s - %(levelname)s - %(message)s",
    )
    try:
        _check_args(args)
        server = make_server(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    group = mx.distributed.init()
    if server.httpd is None:
        logger.info(f"process {group.rank()} of {group.size()}: generating for rank 0's server")
        return server.follow()
    logger.info(f"DFlash server for {args.model} + {args.draft_model} at {server.url}")
    # SIGTERM (service managers, `kill`) shuts down as Ctrl-C does: the generation
    # thread is stopped and joined rather than torn down under MLX.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if group.size() > 1:
        return _serve_sharded(server)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
        server.generator.stop_and_join()
        mx.clear_streams()
    return 0


def _serve_sharded(server: Server) -> int:
    """Rank 0 of a sharded target: serve until a signal, then stop every process. If
    this generation thread dies the others cannot go on without it: exit, non-zero."""
    server.start()
    failed = False
    try:
        # Not Thread.join: Python 3.11 takes a thread whose join a signal interrupted
        # for finished, and would exit under it.
        while server.generator.generation_available():
            time.sleep(0.2)
        failed = True
        print("error: generation failed; see the log", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        mx.clear_streams()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
