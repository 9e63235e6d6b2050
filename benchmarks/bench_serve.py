"""`dflash-mlx serve` under load: turn-2 time to first token with and without prompt
reuse, and throughput with 1 and 8 concurrent clients.

Run from the repository root (the GPU machine for the recorded numbers):

    python benchmarks/bench_serve.py --model Qwen/Qwen3-8B --draft-model z-lab/Qwen3-8B-DFlash-b16 \
        --json benchmarks/results/serve_h200.json

With no --model / --draft-model it serves the demo pair. The server runs in this
process on an ephemeral loopback port; clients speak plain HTTP (http.client).

TTFT: a chat whose history is --history-tokens long (filled with Python standard
library source, which any tokenizer handles). Turn 1 sends the history plus a
question; turn 2 appends turn 1's answer and a second question and streams, timing
the first content chunk. "reuse": turn 1 ran just before on the same server (the
prompt cache holds it); "no reuse": the prompt cache is emptied before turn 2. Each
sample starts from an empty prompt cache; medians over --repeats.

Throughput: C clients at once, each sending --requests distinct short prompts one
after another (max --max-tokens each, greedy); completion tokens over wall time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_lm.server import CompletionRequest

from dflash_mlx import serve

QUESTIONS = [
    "Explain what the code above does.",
    "Now list the functions it defines.",
    "Which of them could raise an exception?",
]
PROMPTS = [
    "def fibonacci(n):",
    "class LinkedList:",
    "import json\n\ndef load(path):",
    "def quicksort(items):",
    "class Timer:\n    def __enter__(self):",
    "def parse_args(argv):",
    "async def fetch(url):",
    "def merge(a, b):",
]


def post(url: str, body: dict, timeout: float) -> tuple[dict, float | None]:
    """POST a JSON body; returns (final JSON or usage chunk, seconds to first content)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    tic = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body).encode())
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
        if not body.get("stream"):
            return json.loads(response.read()), None
        first, usage = None, {}
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if first is None and chunk.get("choices"):
                first = time.perf_counter() - tic
            usage = chunk.get("usage") or usage
        return {"usage": usage}, first
    finally:
        conn.close()


def history(srv: serve.Server, n_tokens: int) -> list[dict]:
    """User / assistant turns of standard-library source until about n_tokens."""
    text = "".join(
        Path(m.__file__).read_text() for m in (os, json, argparse, threading, statistics)
    )
    lines = text.splitlines(keepends=True)
    messages, i = [], 0
    while True:
        chunk = "".join(lines[i : i + 20])
        i += 20
        role = "user" if len(messages) % 2 == 0 else "assistant"
        candidate = [*messages, {"role": role, "content": chunk}]
        if count(srv, [*candidate, {"role": "user", "content": QUESTIONS[0]}]) > n_tokens:
            break
        messages = candidate
    if messages and messages[-1]["role"] == "user":
        messages.append({"role": "assistant", "content": "Noted."})
    return messages


def count(srv: serve.Server, messages: list[dict]) -> int:
    request = CompletionRequest("chat", "", [dict(m) for m in messages], None, None)
    return len(srv.generator.tokenize(request, None)[0])


def ttft(srv: serve.Server, args: argparse.Namespace) -> dict:
    limit = srv.generator.model_provider.context_limit or 1 << 30
    n_history = min(args.history_tokens, limit - 2 * args.max_tokens - 256)
    messages = history(srv, n_history)
    turn1 = [*messages, {"role": "user", "content": QUESTIONS[0]}]
    body = {"model": "default_model", "max_tokens": args.max_tokens, "temperature": 0.0}
    results = {"reuse": [], "no_reuse": []}
    usage2 = {}
    for _ in range(args.repeats):
        for mode, samples in results.items():
            srv.generator.prompt_cache.trim_to(n_sequences=0)  # the server is idle here
            r1, _ = post(srv.url, {**body, "messages": turn1}, args.timeout)
            answer = r1["choices"][0]["message"]["content"] or ""
            turn2 = [
                *turn1,
                {"role": "assistant", "content": answer},
                {"role": "user", "content": QUESTIONS[1]},
            ]
            if mode == "no_reuse":
                srv.generator.prompt_cache.trim_to(n_sequences=0)
            streamed = {**body, "messages": turn2, "stream": True}
            streamed["stream_options"] = {"include_usage": True}
            out, first = post(srv.url, streamed, args.timeout)
            samples.append(first)
            usage2[mode] = out["usage"]
    return {
        "history_tokens": count(srv, turn1),
        "turn2_prompt_tokens": usage2["reuse"].get("prompt_tokens"),
        "turn2_cached_tokens": {
            m: u.get("prompt_tokens_details", {}).get("cached_tokens") for m, u in usage2.items()
        },
        "ttft_s": {m: statistics.median(v) for m, v in results.items()},
        "samples_s": results,
    }


def throughput(srv: serve.Server, clients: int, args: argparse.Namespace) -> dict:
    srv.generator.prompt_cache.trim_to(n_sequences=0)
    tokens, latencies, errors = [], [], []
    lock = threading.Lock()

    def client(c: int) -> None:
        for k in range(args.requests):
            prompt = PROMPTS[(c * args.requests + k) % len(PROMPTS)] + f"  # {c}.{k}"
            body = {
                "model": "default_model",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": args.max_tokens,
                "temperature": 0.0,
            }
            tic = time.perf_counter()
            try:
                out, _ = post(srv.url, body, args.timeout)
            except Exception as e:  # noqa: BLE001 (counted and reported)
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                latencies.append(time.perf_counter() - tic)
                tokens.append(out["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(args.timeout * args.requests)
    wall = time.perf_counter() - tic
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "completion_tokens": sum(tokens),
        "wall_s": wall,
        "tokens_per_s": sum(tokens) / wall,
        "latency_mean_s": statistics.fmean(latencies) if latencies else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="target (default: the demo target)")
    parser.add_argument("--draft-model", help="DFlash draft (default: the demo draft)")
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--history-tokens", type=int, default=4096)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per request")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    argv = ["--port", "0", "--log-level", "WARNING", "--queue-size", "256"]
    argv += ["--prompt-cache-size", "64"]
    if args.model:
        argv += ["--model", args.model]
    if args.draft_model:
        argv += ["--draft-model", args.draft_model]
    if args.block_size:
        argv += ["--block-size", str(args.block_size)]
    server_args = serve.parse_args(argv)
    srv = serve.make_server(server_args).start()
    try:
        post(srv.url, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}, 600)
        first = ttft(srv, args)
        rates = [throughput(srv, c, args) for c in args.clients]
    finally:
        srv.close()

    print(f"target {server_args.model}\ndraft  {server_args.draft_model}")
    print(
        f"\nturn 2 of a {first['history_tokens']}-token chat "
        f"({first['turn2_prompt_tokens']} prompt tokens), median of {args.repeats}:"
    )
    print(f"| {'prompt reuse':<12} | {'cached tokens':>13} | {'TTFT (s)':>9} |")
    print(f"|{'-' * 14}|{'-' * 15}|{'-' * 11}|")
    for mode, label in (("no_reuse", "off"), ("reuse", "on")):
        cached = first["turn2_cached_tokens"][mode]
        print(f"| {label:<12} | {cached!s:>13} | {first['ttft_s'][mode]:>9.3f} |")
    print(f"\nthroughput ({args.requests} requests per client, max {args.max_tokens} tokens):")
    print(
        f"| {'clients':>7} | {'requests':>8} | {'tokens':>7} | {'tok/s':>8} | {'latency (s)':>11} |"
    )
    print(f"|{'-' * 9}|{'-' * 10}|{'-' * 9}|{'-' * 10}|{'-' * 13}|")
    for r in rates:
        latency = f"{r['latency_mean_s']:.3f}" if r["latency_mean_s"] is not None else "-"
        print(
            f"| {r['clients']:>7} | {r['requests']:>8} | {r['completion_tokens']:>7} | "
            f"{r['tokens_per_s']:>8.1f} | {latency:>11} |"
        )
        if r["errors"]:
            print(f"  {len(r['errors'])} errors, first: {r['errors'][0]}")
    if args.json:
        result = {
            "command": " ".join(sys.argv),
            "target": server_args.model,
            "draft": server_args.draft_model,
            "max_tokens": args.max_tokens,
            "ttft": first,
            "throughput": rates,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
