"""`dflash-mlx serve` through the official openai client, against the demo pair.

The server runs in this process on an ephemeral loopback port (one subprocess test
checks `python -m dflash_mlx.serve`). Expected outputs come from mlx_lm's own greedy
decoding of the same target on the same prompt tokens; the prompts are written out
here as the server's chat formatting (mlx_lm's, the demo tokenizer has no chat
template) should produce them, and the usage's prompt_tokens checks that it did.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
import subprocess
import sys
import threading
import time

import mlx_lm
import pytest
from mlx_lm.sample_utils import make_logits_processors

openai = pytest.importorskip("openai")

from dflash_mlx import demo, generate, load, load_draft, make_prompt_cache, serve

TIMEOUT = 30  # seconds, for every client call
MODEL = serve.DEMO_MODEL_ID


@pytest.fixture(scope="module")
def server():
    args = serve.parse_args(["--port", "0", "--max-tokens", "6", "--queue-size", "16"])
    srv = serve.make_server(args, load_timeout=120).start()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0
    )


@pytest.fixture(scope="module")
def pair():
    model, tokenizer = load(str(demo.TARGET))
    return model, tokenizer, load_draft(demo.DRAFT)


def chat_prompt(messages: list[dict]) -> str:
    """What a chat becomes without a chat template (mlx_lm's default role mapping)."""
    prefix = {"system": "ASSISTANT's RULE: ", "user": "USER: ", "assistant": "ASSISTANT: "}
    return "".join(f"{prefix[m['role']]}{m['content']}\n" for m in messages) + "ASSISTANT:"


def greedy(pair, prompt: str, max_tokens: int) -> tuple[str, int]:
    """mlx_lm's greedy output for a prompt, and the prompt's length in tokens."""
    model, tokenizer, _ = pair
    tokens = tokenizer.encode(prompt)
    return mlx_lm.generate(model, tokenizer, tokens, max_tokens=max_tokens), len(tokens)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def post(server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    host, port = server.httpd.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_chat_equals_greedy(client, pair):
    messages = user("def add(a, b):")
    expected, n_prompt = greedy(pair, chat_prompt(messages), 6)
    model, tokenizer, draft = pair
    prompt = tokenizer.encode(chat_prompt(messages))
    assert generate(model, draft, tokenizer, prompt, max_tokens=6) == expected

    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == 6
    assert r.usage.model_extra["acceptance_length"] >= 1.0

    # The target's log-probabilities of the emitted tokens, as mlx_lm reports them.
    reference = [
        (g.token, g.logprobs[g.token].item())
        for g in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=6)
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=6, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for (token, logprob), entry in zip(reference, content, strict=True):
        top = entry.top_logprobs[0]
        assert top.model_extra["id"] == token  # greedy: the emitted token is the top one
        assert top.logprob == pytest.approx(logprob, abs=0.05)  # bf16, other shapes

    chunks = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text == expected
    assert usage.completion_tokens == 6
    assert usage.model_extra["acceptance_length"] >= 1.0


def test_text_completion_and_models(client, pair):
    expected, n_prompt = greedy(pair, "import os\n", 5)
    r = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=5)
    assert r.choices[0].text == expected
    assert r.usage.prompt_tokens == n_prompt
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL, prompt="import os\n", max_tokens=5, stream=True
        )
    )
    assert text == expected
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.fixture(scope="module")
def mlx_lm_server():
    """mlx_lm's own server on the demo target (no draft): the reference for text handling."""
    from http.server import ThreadingHTTPServer

    from mlx_lm import server as reference

    args = serve.parse_args([])
    args.draft_model, args.decode_concurrency, args.prompt_concurrency = None, 1, 1
    generator = reference.ResponseGenerator(
        reference.ModelProvider(args), reference.LRUPromptCache(args.prompt_cache_size)
    )
    httpd = ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **k: reference.APIHandler(generator, *a, **k)
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield openai.OpenAI(
            base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1",
            api_key="unused",
            timeout=TIMEOUT,
            max_retries=0,
        )
    finally:
        httpd.shutdown()
        httpd.server_close()
        generator.stop_and_join()


def test_stop_words_as_mlx_lm_server(client, mlx_lm_server):
    # The greedy answer starts '\n   ', ' """', 'A', 'SS', 'ERT', 'ED': stop words that
    # match its tokens, ones that match only its text, one that never occurs.
    messages = user("def add(a, b):")
    for stop in [' """', "ASSERTED", ['"""', "SS"], "zzz"]:
        ours, theirs = (
            c.chat.completions.create(
                model="default_model", messages=messages, max_tokens=6, stop=stop
            )
            for c in (client, mlx_lm_server)
        )
        assert ours.choices[0].message.content == theirs.choices[0].message.content, stop
        assert ours.choices[0].finish_reason == theirs.choices[0].finish_reason, stop


def test_seeded_sampling_is_reproducible(client):
    def sample(seed):
        r = client.chat.completions.create(
            model=MODEL, messages=user("class Stack:"), max_tokens=6, temperature=1.0, seed=seed
        )
        return r.choices[0].message.content

    first = sample(3)
    assert sample(3) == first
    assert len({first, sample(4), sample(5)}) > 1  # temperature 1 does sample


def test_second_turn_reuses_the_cache(client, pair, caplog):
    turn1 = user("def parse(text):")
    r1 = client.chat.completions.create(model=MODEL, messages=turn1, max_tokens=6)
    reply = r1.choices[0].message.content
    turn2 = [*turn1, {"role": "assistant", "content": reply}, *user("def main():")]
    expected, n_prompt = greedy(pair, chat_prompt(turn2), 6)

    with caplog.at_level(logging.INFO, logger="dflash_mlx.serve"):
        r2 = client.chat.completions.create(model=MODEL, messages=turn2, max_tokens=6)
    assert r2.choices[0].message.content == expected  # the reused cache changes nothing
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert r2.usage.prompt_tokens == n_prompt
    assert cached >= r1.usage.prompt_tokens - 1  # at least turn 1's prompt was reused
    # A repetition penalty reads the last 20 tokens: they are run again, the output
    # is mlx_lm's with the same penalty on the whole prompt.
    model, tokenizer, _ = pair
    penalty = make_logits_processors(repetition_penalty=1.5, repetition_context_size=20)
    tokens = tokenizer.encode(chat_prompt(turn2))
    expected = mlx_lm.generate(model, tokenizer, tokens, max_tokens=6, logits_processors=penalty)
    r3 = client.chat.completions.create(
        model=MODEL, messages=turn2, max_tokens=6, extra_body={"repetition_penalty": 1.5}
    )
    assert r3.choices[0].message.content == expected
    assert 0 < r3.usage.prompt_tokens_details.cached_tokens <= n_prompt - 20

    lines = [r.getMessage() for r in caplog.records if "prefilled" in r.getMessage()]
    assert (
        f"prompt {n_prompt} tokens ({cached} cached, {n_prompt - cached} prefilled)" in (lines[-1])
    )


def test_concurrent_clients(client, pair):
    prompts = ["def f(x):", "class A:", "import sys", "for i in range(10):"]
    expected = {p: greedy(pair, chat_prompt(user(p)), 4)[0] for p in prompts}
    results, errors = {}, []

    def one(i):
        try:
            p = prompts[i % len(prompts)]
            r = client.chat.completions.create(model=MODEL, messages=user(p), max_tokens=4)
            results[i] = (p, r.choices[0].message.content)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=2 * TIMEOUT)
    assert not errors
    assert len(results) == 16
    assert all(text == expected[p] for p, text in results.values())


def test_bad_requests_get_4xx_and_the_server_goes_on(server, client, pair):
    url = "/v1/chat/completions"
    good = {"model": MODEL, "messages": user("x = 1"), "max_tokens": 2}
    for body, status in [
        (b"{not json", 400),
        (json.dumps([1, 2]).encode(), 400),
        (json.dumps({**good, "messages": "hello"}).encode(), 400),
        (json.dumps({**good, "temperature": "hot"}).encode(), 400),
        (json.dumps({**good, "max_tokens": "5"}).encode(), 400),
        (json.dumps({**good, "stop": 7}).encode(), 400),
        (json.dumps({**good, "model": "gpt-4"}).encode(), 404),
    ]:
        code, reply = post(server, url, body, {"Content-Type": "application/json"})
        assert code == status, (body, reply)
        assert set(reply["error"]) >= {"message", "type", "code"}
        assert reply["error"]["type"] == "invalid_request_error"

    cases = [
        ({"max_tokens": -1}, openai.BadRequestError),
        ({"temperature": -0.5}, openai.BadRequestError),
        ({"model": "no-such-model"}, openai.NotFoundError),
        ({"messages": user("x " * 5000)}, openai.BadRequestError),  # over the 4096 context
    ]
    for change, error in cases:
        with pytest.raises(error) as e:
            client.chat.completions.create(**{**good, **change})
        assert e.value.body["message"]
    assert e.value.body["code"] == "context_length_exceeded"

    held = 0  # a full queue: take every slot, as 16 waiting requests would
    while server.generator.slots.acquire(blocking=False):
        held += 1
    try:
        with pytest.raises(openai.APIStatusError) as e:
            client.chat.completions.create(**good)
        assert e.value.status_code == 503
        assert "retry" in e.value.body["message"]
    finally:
        for _ in range(held):
            server.generator.slots.release()

    expected, _ = greedy(pair, chat_prompt(good["messages"]), 2)
    r = client.chat.completions.create(**good)
    assert r.choices[0].message.content == expected


def test_disconnecting_clients_do_not_break_the_next(server, client, pair, caplog):
    body = {"model": MODEL, "messages": user("def run(self):"), "max_tokens": 400}
    with caplog.at_level(logging.INFO, logger="dflash_mlx.serve"):
        # Mid-stream: read two chunks, hang up.
        stream = client.chat.completions.create(**body, stream=True)
        for i, _ in enumerate(stream):
            if i == 1:
                break
        stream.close()
        # Non-streaming: hang up while it is queued or generating.
        host, port = server.httpd.server_address[:2]
        with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
            payload = json.dumps(body).encode()
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload)
            )
            time.sleep(0.3)

        expected, _ = greedy(pair, chat_prompt(user("import re")), 4)
        tic = time.monotonic()
        r = client.chat.completions.create(model=MODEL, messages=user("import re"), max_tokens=4)
        assert r.choices[0].message.content == expected
        assert time.monotonic() - tic < 15  # the abandoned requests did not run to 400 tokens
    generated = [
        int(m.group(1))
        for r in caplog.records
        if (m := re.search(r"generated (\d+) tokens", r.getMessage()))
    ]
    assert generated and all(n < 400 for n in generated)


def test_python_m_serve_answers_then_exits():
    proc = subprocess.Popen(
        [sys.executable, "-m", "dflash_mlx.serve", "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url, deadline = None, time.monotonic() + 90
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            if m := re.search(r"at (http://127\.0\.0\.1:\d+)", line):
                url = m.group(1)
        assert url, "the server did not report its address"
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        conn.request("GET", "/health")
        assert json.loads(conn.getresponse().read()) == {"status": "ok"}
        conn.close()
    finally:
        proc.send_signal(2)  # SIGINT: what Ctrl-C sends
        try:
            assert proc.wait(timeout=TIMEOUT) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.stderr.close()


def test_hybrid_target_reuses_snapshots(tmp_path):
    """A recurrent (GatedDeltaNet) target cannot be trimmed back: the server reuses the
    copy it kept one position short of the prompt, and the output is unchanged."""
    from conftest import write_random_draft
    from mlx_lm.models.cache import can_trim_prompt_cache
    from tiny_models import load_config, make_target

    target = make_target(tmp_path / "target", "qwen3_5")
    draft_path = write_random_draft(tmp_path / "draft", load_config(target))
    model, tokenizer = load(str(target))
    assert not can_trim_prompt_cache(make_prompt_cache(model, load_draft(draft_path)))

    args = ["--model", str(target), "--draft-model", str(draft_path), "--port", "0"]
    srv = serve.make_server(serve.parse_args(args), load_timeout=120).start()
    try:
        client = openai.OpenAI(
            base_url=srv.url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0
        )

        def expected(messages):
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            return mlx_lm.generate(model, tokenizer, prompt, max_tokens=6), len(prompt)

        def chat(messages):
            r = client.chat.completions.create(model=str(target), messages=messages, max_tokens=6)
            return r.choices[0].message.content, r.usage

        turn1 = user("Hello, world!")
        text1, usage1 = chat(turn1)
        assert (text1, usage1.prompt_tokens) == expected(turn1)
        assert usage1.prompt_tokens_details.cached_tokens == 0

        again, usage = chat(turn1)  # the same prompt: the snapshot, one position short
        assert again == text1
        assert usage.prompt_tokens_details.cached_tokens == usage1.prompt_tokens - 1

        turn2 = [*turn1, {"role": "assistant", "content": text1}, *user("What is the answer?")]
        text2, usage2 = chat(turn2)
        assert (text2, usage2.prompt_tokens) == expected(turn2)
        assert usage2.prompt_tokens_details.cached_tokens >= usage1.prompt_tokens - 1
    finally:
        srv.close()
