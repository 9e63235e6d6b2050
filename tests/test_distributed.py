"""DFlash over a sharded target (dflash_mlx/distributed.py): 2 and 3 local processes on
MLX's ring backend over loopback (the CPU), tiny targets sharded both ways (tensor and
pipeline parallel). Every rank must emit exactly mlx_lm's own unsharded greedy tokens.

Each launch runs several jobs in the same processes (tests/distributed_worker.py), so the
seconds of starting MLX are paid once per launch. Every launch has a deadline, and its
processes are killed (their process group) whatever happens. The serve tests start
`dflash-mlx serve` as 2 ranks and talk HTTP to rank 0.
"""

import errno
import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import ROOT, write_random_draft
from mlx_lm import generate as mlx_lm_generate
from mlx_lm import load as mlx_lm_load
from mlx_lm.generate import generate_step
from tiny_models import QWEN3_8, load_config, make_target

from dflash_mlx import load_draft, session, stream_generate
from dflash_mlx.convert import convert

PROMPT = [5, 17, 42, 7, 99, 3, 61, 28, 11]
N_TOKENS = 40
B = 8
DEADLINE = 150  # seconds for one launch (it takes 5-25 on 2 cores)
WORKER = ROOT / "tests" / "distributed_worker.py"
ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",  # 2-3 processes on 2 cores
}
ENV.pop("MLX_RANK", None)
UNSHARDABLE = (
    "gemma3_text: mlx_lm cannot shard this family for tensor parallelism (its model has "
    "no shard()); use --pipeline (pipeline parallelism works for every family)"
)
ENV.pop("MLX_HOSTFILE", None)

# name: (family, config overrides, tapped layers). The taps are chosen so that some are
# on each rank of the split (rank 0 runs the last layers).
TARGETS = {
    "qwen3": ("qwen3", {}, [1, 2]),
    "qwen3_8": ("qwen3_5", QWEN3_8, [0, 2]),  # untied head: mlx_lm shards it (tensor)
    "gemma3": ("gemma3_text", {}, [1, 4]),  # sliding windows wrap: rotating caches
    "gemma4": ("gemma4_text", {}, [1, 4]),  # KV-shared layers keep their source's rank
    # 6 heads, 3 KV heads, MLP 192: tensor parallel over 3.
    "qwen3_x3": (
        "qwen3",
        {
            "num_attention_heads": 6,
            "num_key_value_heads": 3,
            "intermediate_size": 192,
            "num_hidden_layers": 6,
        },
        [0, 2, 5],
    ),
}


def mlx_lm_greedy(model, n):
    steps = (int(t) for t, _ in generate_step(mx.array(PROMPT), model))
    return [t for t, _ in zip(steps, range(n))]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (target dir, draft dir, mlx_lm's greedy tokens of the unsharded target)."""
    root = tmp_path_factory.mktemp("distributed")
    built = {}
    for name, (family, overrides, taps) in TARGETS.items():
        target = make_target(root / name, family, **overrides)
        hf = write_random_draft(root / f"{name}-hf", load_config(target), layer_ids=taps)
        convert(str(hf), str(root / f"{name}-draft"), dtype="float32")
        model, _ = mlx_lm_load(str(target))
        built[name] = (str(target), str(root / f"{name}-draft"), mlx_lm_greedy(model, N_TOKENS + B))
    return built


def _free_ports(n: int, consecutive: bool = False) -> list[int]:
    """n ports nothing listens on now (consecutive: mlx.launch numbers them itself)."""
    for _ in range(100):
        socks = []
        try:
            base = random.randrange(20000, 60000)
            for i in range(n):
                socks.append(socket.socket())
                socks[-1].bind(("127.0.0.1", base + i if consecutive else 0))
            return [sock.getsockname()[1] for sock in socks]
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no free ports")


def _kill(procs: list[subprocess.Popen]) -> None:
    """Kill the process group of each process still running."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _wait(procs: list[subprocess.Popen], deadline: float) -> None:
    """Wait for all, then kill the process group of any still running (finally)."""
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"distributed run passed its {DEADLINE} s deadline")
    finally:
        _kill(procs)


def _start(command: list[str], n: int, tmp_path: Path, procs: list, logs: list) -> None:
    """Start `command` as ranks 0..n-1 of a ring over loopback, each in its own process
    group, appending to procs and logs (the caller's, so its cleanup sees every one)."""
    hostfile = tmp_path / f"hosts{n}.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in _free_ports(n)]))
    for rank in range(n):
        out = open(tmp_path / f"out{rank}.txt", "w+")  # noqa: SIM115 (closed by _results)
        err = open(tmp_path / f"err{rank}.txt", "w+")  # noqa: SIM115
        logs.append((out, err))
        env = {**ENV, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}
        procs.append(
            subprocess.Popen(
                command, env=env, cwd=tmp_path, stdout=out, stderr=err, start_new_session=True
            )
        )


def _results(procs: list[subprocess.Popen], logs: list) -> list[tuple[int, str, str]]:
    results = []
    for p, (out, err) in zip(procs, logs):
        out.seek(0), err.seek(0)
        results.append((p.returncode, out.read(), err.read()))
        out.close(), err.close()
    return results


def launch(command: list[str], n: int, tmp_path: Path) -> list[tuple[int, str, str]]:
    """Run `command` as ranks 0..n-1 of a ring over loopback; (rc, stdout, stderr) each."""
    deadline = time.monotonic() + DEADLINE
    procs, logs = [], []
    try:
        _start(command, n, tmp_path, procs, logs)
    finally:
        _wait(procs, deadline)
    return _results(procs, logs)


def run_jobs(jobs: list[dict], n: int, tmp_path: Path) -> list[dict]:
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    ranks = launch([sys.executable, str(WORKER), str(spec), str(tmp_path)], n, tmp_path)
    for rank, (rc, _, err) in enumerate(ranks):
        assert rc == 0, f"rank {rank} failed:\n{err[-3000:]}"
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(n)]


def oracle_job(models, name: str, mode: str) -> dict:
    target, draft, expected = models[name]
    return {
        "name": f"{name}-{mode}",
        "target": target,
        "draft": draft,
        "mode": mode,
        "prompt": PROMPT,
        "max_tokens": N_TOKENS,
        "block_size": B,
        "oracle": expected,
    }


def check_greedy(results: list[dict], models, names: list[tuple[str, str]]) -> None:
    for rank, result in enumerate(results):
        for name, mode in names:
            got = result[f"{name}-{mode}"]
            assert "error" not in got, f"rank {rank} {name} {mode}: {got.get('error')}"
            assert got["tokens"] == models[name][2][:N_TOKENS], f"rank {rank} {name} {mode}"
            # The oracle draft errs at every block position in turn: every accept length
            # 0 … B-1 occurred, so every rank rolled back by every depth.
            assert set(got["accepted"]) == set(range(B)), f"rank {rank} {name} {mode}"


def test_two_processes_tensor_and_pipeline(models, tmp_path, monkeypatch):
    greedy = [
        ("qwen3", "tensor"),
        ("qwen3", "pipeline"),
        ("qwen3_8", "tensor"),
        ("qwen3_8", "pipeline"),
        ("gemma3", "pipeline"),
        ("gemma4", "pipeline"),
    ]
    jobs = [oracle_job(models, name, mode) for name, mode in greedy]
    jobs.append({**oracle_job(models, "gemma3", "tensor"), "oracle": None})
    # mlx_lm's own pipeline split sends the hidden state only: the taps cannot reach.
    jobs.append({**oracle_job(models, "qwen3_8", "mlx_lm-pipeline"), "oracle": None})
    # Sampling with a shared seed: the random draft's proposals are accepted or rejected
    # on rank 0, the draft samples there alone; every rank must still emit the same
    # tokens, those of the same generation unsharded (the general loop, as the
    # sharded session uses: no static caches).
    target, draft, _ = models["qwen3"]
    monkeypatch.setitem(session.STATIC_MAX_POSITIONS, "cpu", 0)
    model, tokenizer = mlx_lm_load(target)
    random_draft = load_draft(draft)
    sampled = {}
    for mode in ("tensor", "pipeline"):
        for width, n in ((B, 29), (1, 6)):  # width 1: plain target steps, no draft
            mx.random.seed(7)  # after loading: building a model draws random weights
            responses = stream_generate(
                model, random_draft, tokenizer, PROMPT, n, temp=1.0, block_size=width
            )
            name = f"sampled-{width}-{mode}"
            sampled[name] = [r.token for r in responses]
            jobs.append(
                {
                    "name": name,
                    "target": target,
                    "draft": draft,
                    "mode": mode,
                    "prompt": PROMPT,
                    "max_tokens": n,
                    "block_size": width,
                    "temp": 1.0,
                    "seed": 7,
                }
            )

    # serve's prompt caches: each rank holds its own share of every entry (here rank 0's
    # are the bigger ones), so with a byte limit only rank 0 is over it; both must
    # still evict the same entries, or their next prefills would differ.
    sizes = [[100, 100, 100], [10, 10, 10]]
    jobs.append({"name": "lru", "kind": "prompt_cache", "sizes": sizes, "max_bytes": 250})

    results = run_jobs(jobs, 2, tmp_path)

    check_greedy(results, models, greedy)
    assert [r["lru"]["kept"] for r in results] == [[False, True, True]] * 2
    for result in results:
        assert result["gemma3-tensor"] == {"error": UNSHARDABLE}
        error = result["qwen3_8-mlx_lm-pipeline"]["error"]
        assert error.startswith("the target was pipelined by mlx_lm"), error
        for name, tokens in sampled.items():
            assert result[name]["tokens"] == tokens, name


def test_three_processes_tensor_and_pipeline(models, tmp_path):
    greedy = [("qwen3_x3", "tensor"), ("qwen3_x3", "pipeline"), ("qwen3_8", "pipeline")]
    results = run_jobs([oracle_job(models, name, mode) for name, mode in greedy], 3, tmp_path)
    check_greedy(results, models, greedy)


def test_cli_under_mlx_launch(models, tmp_path):
    """`mlx.launch -n 2 dflash-mlx generate --pipeline`: rank 0 prints mlx_lm's text."""
    target, draft, _ = models["qwen3"]
    model, tokenizer = mlx_lm_load(target)
    prompt = "def generate(model, prompt"
    expected = mlx_lm_generate(model, tokenizer, prompt, max_tokens=24)
    port = _free_ports(2, consecutive=True)[0]
    command = [
        sys.executable,
        "-c",
        "from mlx._distributed_utils.launch import main; main()",
        *("--hosts", "127.0.0.1", "-n", "2", "--starting-port", str(port), "--"),
        *(sys.executable, "-m", "dflash_mlx", "generate", "--model", target),
        *("--draft-model", draft, "--pipeline", "-p", prompt, "-m", "24"),
        *("--ignore-chat-template", "--verbose", "False"),
    ]
    proc = subprocess.Popen(
        command,
        env=ENV,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        pytest.fail(f"mlx.launch passed its {DEADLINE} s deadline")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        else:  # the launcher is gone; anything it left in its group goes too
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert out.decode() == expected + "\n", err.decode()[-3000:]


def test_cli_error_is_one_line_on_every_rank(models, tmp_path):
    target, draft, _ = models["gemma3"]
    command = [sys.executable, "-m", "dflash_mlx", "generate", "--model", target]
    ranks = launch([*command, "--draft-model", draft, "-m", "4"], 2, tmp_path)
    for rc, out, err in ranks:
        assert (rc, out) == (1, "")
        assert err.splitlines() == [f"error: {UNSHARDABLE}"]


# -- dflash-mlx serve over a sharded target ---------------------------------------------

SERVE_PROMPT = "def generate(model, prompt"
REQUEST_TIMEOUT = 30  # seconds for one HTTP request


def _wait_for_port(log: Path, procs: list[subprocess.Popen], deadline: float) -> int:
    """The port rank 0 listens on (it picked a free one: --port 0), once it serves."""
    while not (
        m := re.search(r"DFlash server for .* at http://127\.0\.0\.1:(\d+)", log.read_text())
    ):
        if any(p.poll() is not None for p in procs):
            pytest.fail(f"a rank exited while starting:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"the server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return int(m.group(1))


def _completion(port: int, body: dict, *, hang_up: bool = False) -> dict | None:
    """POST /v1/completions to rank 0; hang_up: read two streamed chunks, then leave."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
    try:
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        try:
            if not hang_up:
                assert response.status == 200, response.read()
                return json.loads(response.read())
            chunks = 0
            while chunks < 2 and (line := response.fp.readline()):
                chunks += line.startswith(b"data:")
            assert chunks == 2, "the stream ended early"
            return None
        finally:
            response.close()  # the connection's socket stays open while this does not
    finally:
        conn.close()


@pytest.mark.parametrize("mode", ["tensor", "pipeline"])
def test_serve_under_two_processes(models, tmp_path, mode):
    """`dflash-mlx serve` with its target sharded over 2 processes: rank 0 answers with
    mlx_lm's unsharded greedy text; a client that hangs up mid-stream stops the
    generation on both ranks after the same token; the same request again reuses the
    prompt cache on both; both exit 0 on Ctrl-C (SIGINT to every process: tensor) or
    on SIGTERM to rank 0 alone (pipeline)."""
    target, draft, _ = models["qwen3"]
    model, tokenizer = mlx_lm_load(target)
    expected = mlx_lm_generate(model, tokenizer, SERVE_PROMPT, max_tokens=24)
    command = [sys.executable, "-m", "dflash_mlx", "serve", "--model", target]
    command += ["--draft-model", draft, "--port", "0"]
    command += ["--pipeline"] if mode == "pipeline" else []
    body = {"model": "default_model", "prompt": SERVE_PROMPT, "max_tokens": 24, "temperature": 0}
    deadline = time.monotonic() + DEADLINE
    procs, logs = [], []
    try:
        _start(command, 2, tmp_path, procs, logs)
        port = _wait_for_port(tmp_path / "err0.txt", procs, deadline)
        first = _completion(port, body)
        assert first["choices"][0]["text"] == expected
        _completion(port, {**body, "max_tokens": 2000, "stream": True}, hang_up=True)
        again = _completion(port, body)  # waits for the abandoned one: it must stop early
        assert again["choices"][0]["text"] == expected
        cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached == first["usage"]["prompt_tokens"] - 1
        for p in procs if mode == "tensor" else procs[:1]:
            p.send_signal(signal.SIGINT if mode == "tensor" else signal.SIGTERM)
        _wait(procs, time.monotonic() + REQUEST_TIMEOUT)
    finally:
        _kill(procs)  # whatever still runs after a failure above
    ranks = _results(procs, logs)
    for rank, (rc, _, err) in enumerate(ranks):
        assert rc == 0, f"rank {rank} exited {rc}:\n{err[-3000:]}"
    generated = [re.findall(r"\((\d+) cached.*generated (\d+) tokens", e) for _, _, e in ranks]
    assert generated[0] == generated[1]  # the same prompt caches and stops on both
    (c1, n1), (_, n2), (c3, n3) = generated[0]
    assert (c1, n1, n3, int(c3)) == ("0", "24", "24", cached)
    assert int(n2) < 2000
    if mode == "tensor":
        assert "stopping when rank 0 stops" in ranks[1][2]


def test_serve_errors_are_one_line_on_every_rank(models, tmp_path):
    """A port rank 0 cannot listen on, a family that cannot be sharded this way: one
    line, exit 1, on both ranks."""
    target, draft, _ = models["gemma3"]
    command = [sys.executable, "-m", "dflash_mlx", "serve", "--model", target]
    command += ["--draft-model", draft]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        ranks = launch([*command, "--port", str(port)], 2, tmp_path)
    for rc, out, err in ranks:
        assert (rc, out) == (1, "")
        in_use = os.strerror(errno.EADDRINUSE)
        assert err.splitlines() == [f"error: cannot listen on 127.0.0.1:{port}: {in_use}"]
    ranks = launch([*command, "--port", "0"], 2, tmp_path)
    for rc, out, err in ranks:
        assert (rc, out) == (1, "")
        assert err.splitlines() == [
            f"error: could not load {target} with draft {draft}: {UNSHARDABLE}"
        ]
