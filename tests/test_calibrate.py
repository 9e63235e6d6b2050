"""Calibration: decisions stored per device + MLX version, read back by auto routing.

Runs on the CPU: a fake GPU backend (use_backend) and an injected timer stand in for the
device, so what is tested is the bookkeeping and the routing, not the timings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx import nn
from mlx_lm.models import qwen3

sys.path.insert(0, str(Path(__file__).parent / "emulation"))

import emulator

from dflash_mlx import calibrate
from dflash_mlx.kernels import attention, matmul

DEVICE = ("metal", "Apple M9 Max", "0.32.4")
SHAPES = calibrate.Shapes(
    attention=((64, 4, 2, "float32"),),
    linears=(("bfloat16", 40, 96, 0, "bfloat16"), ("q4", 24, 64, 32, "bfloat16")),
)
SMALL = {"lqs": (2, 16), "key_lengths": (64, 256), "rows": (2, 16)}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """A private cache directory, a fake Metal device, no kernels actually timed."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(calibrate, "device_identity", lambda: DEVICE)
    monkeypatch.setattr(calibrate, "_kernel_ok", lambda *a: True)
    monkeypatch.setattr(calibrate, "KEY_LENGTHS", SMALL["key_lengths"])
    calibrate.forget()
    with attention.use_backend("metal", _never), matmul.use_backend("metal", _never):
        yield
    calibrate.forget()


def _never(*a):
    raise AssertionError("no kernel should be built here")


def fake_timer(calls: list):
    """The kernel wins matmuls up to 8 rows and attention from 256 keys at Lq 2 only."""

    def timer(case, path, fn):
        calls.append((case["op"], path))
        if case["op"] == "matmul":
            fast = case["M"] <= 8
        else:
            fast = case["Lq"] == 2 and case["S"] >= 256
        return 1.0 if (path == "kernel") == fast else 2.0

    return timer


def _calibrate(calls: list, progress=None):
    return calibrate.ensure_calibrated(
        timer=fake_timer(calls), progress=progress or (lambda s: None)
    )


@pytest.fixture
def small_defaults(monkeypatch):
    monkeypatch.setattr(calibrate, "DEFAULT_SHAPES", SHAPES)
    monkeypatch.setattr(calibrate, "LQS", SMALL["lqs"])
    monkeypatch.setattr(calibrate, "ROWS", SMALL["rows"])
    run = calibrate.run
    monkeypatch.setattr(calibrate, "run", lambda shapes, **kw: run(shapes, **{**SMALL, **kw}))


def test_decisions_are_written_read_and_keyed_by_device_and_version(
    small_defaults, monkeypatch, tmp_path
):
    calls, lines = [], []
    cal = _calibrate(calls, progress=lines.append)
    path = calibrate.calibration_path(DEVICE)
    assert path.parent == tmp_path / "dflash_mlx" and path.exists()
    assert "apple-m9-max" in path.name and "0.32.4" in path.name
    n_cases = 2 * 2 + 2 * 2  # attention Lq x S, matmul shapes x rows
    assert len(calls) == 2 * n_cases and len(lines) == 1 + n_cases
    assert "calibrating" in lines[0] and "Apple M9 Max" in lines[0]
    assert lines[1].startswith("[1/8]") and "kernel" in lines[1] and "stock" in lines[1]
    stored = calibrate.load(path)
    assert stored.to_json() == cal.to_json()
    assert stored.matmul == {
        "bfloat16:40x96": {2: True, 16: False},
        "q4:24x64": {2: True, 16: False},
    }
    assert stored.attention == {64: {2: 256, 16: None}}
    # read back by the routing queries
    assert calibrate.matmul_decision("metal", "bfloat16", 2, 40, 96) is True
    assert calibrate.matmul_decision("metal", "bfloat16", 5, 40, 96) is False  # takes M=16's
    assert calibrate.matmul_decision("metal", "q4", 32, 24, 64) is False
    assert calibrate.matmul_decision("metal", "bfloat16", 2, 41, 96) is None  # not measured
    assert calibrate.attention_decision("metal", 2, 300, 64) is True
    assert calibrate.attention_decision("metal", 2, 64, 64) is False
    assert calibrate.attention_decision("metal", 8, 4096, 64) is False
    assert calibrate.attention_decision("metal", 1, 4096, 64) is None
    # a second call finds everything measured: no timing
    calls.clear()
    assert _calibrate(calls).to_json() == cal.to_json() and not calls
    # another device, or another MLX version: not this calibration
    for other in (("metal", "Apple M1", "0.32.4"), ("metal", "Apple M9 Max", "0.33.0")):
        monkeypatch.setattr(calibrate, "device_identity", lambda o=other: o)
        calibrate.forget()
        assert calibrate.calibration_path(other) != path
        assert calibrate.matmul_decision("metal", "bfloat16", 2, 40, 96) is None
        assert calibrate.attention_decision("metal", 2, 300, 64) is None


def test_a_corrupt_file_gives_a_note_and_recalibration(small_defaults):
    path = calibrate.calibration_path(DEVICE)
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1, "backend": "metal", "attention": ')
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert calibrate.matmul_decision("metal", "bfloat16", 5, 40, 96) is None
    calls = []
    with pytest.warns(RuntimeWarning, match="unreadable"):
        _calibrate(calls)
    assert calls
    assert calibrate.load(path).matmul["bfloat16:40x96"] == {2: True, 16: False}
    path.write_text(json.dumps({"format": 99}))
    with pytest.warns(RuntimeWarning, match="unreadable"):
        assert calibrate.load(path) is None


def test_only_missing_shapes_are_measured(small_defaults, monkeypatch):
    _calibrate([])
    more = calibrate.Shapes(
        attention=SHAPES.attention, linears=SHAPES.linears + (("q8", 16, 128, 64, "bfloat16"),)
    )
    monkeypatch.setattr(calibrate, "DEFAULT_SHAPES", more)
    calls = []
    cal = _calibrate(calls)
    assert {op for op, _ in calls} == {"matmul"} and len(calls) == 2 * 2
    assert set(cal.matmul) == {"bfloat16:40x96", "q4:24x64", "q8:16x128"}


def _store(attention_entry=None, matmul_entry=None):
    cal = calibrate.Calibration(*DEVICE, attention=attention_entry or {}, matmul=matmul_entry or {})
    calibrate.save(cal, calibrate.calibration_path(DEVICE))
    calibrate.forget()


def test_attention_auto_routing_follows_the_stored_decision(monkeypatch):
    assert not attention.prefers_kernel("metal", 16, 8192, 128, 4)  # uncalibrated Metal: SDPA
    _store({128: {2: 1024, 16: None}, 64: {2: None, 4: 0}})
    assert attention.prefers_kernel("metal", 2, 1024, 128, 4)
    assert not attention.prefers_kernel("metal", 2, 1000, 128, 4)
    assert not attention.prefers_kernel("metal", 16, 32768, 128, 4)  # measured slower
    assert not attention.prefers_kernel("metal", 1, 32768, 128, 4)  # Lq 1: not calibrated
    assert attention.prefers_kernel("metal", 3, 10, 64, 4)  # Lq 3 takes Lq 4's decision
    assert not attention.prefers_kernel("metal", 2, 10, 64, 4)
    assert not attention.prefers_kernel("metal", 16, 8192, 256, 4)  # D 256: not calibrated
    # CUDA without a calibration of its own keeps the measured thresholds
    assert attention.prefers_kernel("cuda", 16, 100, 128, 4)
    assert not attention.prefers_kernel("cuda", 1, 100, 128, 4)


def test_matmul_auto_routing_follows_the_stored_decision(monkeypatch, tmp_path):
    monkeypatch.setenv(matmul.SWITCH_ENV, "auto")
    monkeypatch.setattr(matmul, "_checked", {})
    calls: list = []

    def counting(*a):
        calls.append(a[0])
        return emulator.factory(tmp_path / "emu")(*a)

    x = mx.random.normal((7, 96), key=mx.random.key(1)).astype(mx.bfloat16)
    w = mx.random.normal((40, 96), key=mx.random.key(2)).astype(mx.bfloat16)
    with matmul.use_backend("metal", counting):
        assert matmul.skinny_matmul(x, w).shape == (7, 40) and not calls  # uncalibrated
        _store(matmul_entry={"bfloat16:40x96": {8: False, 16: True}})
        assert matmul.kernel_matmul(x, w) is None and not calls
        _store(matmul_entry={"bfloat16:40x96": {8: True, 16: False}})
        out = matmul.kernel_matmul(x, w)
    assert out is not None and "dflash_skinny_mm" in calls
    with mx.stream(mx.cpu):
        ref = x.astype(mx.float32) @ w.astype(mx.float32).T
        err = (mx.linalg.norm(out.astype(mx.float32) - ref) / mx.linalg.norm(ref)).item()
    assert err < 1e-2


def test_cpu_backend_has_nothing_to_calibrate(monkeypatch, capsys):
    monkeypatch.setattr(calibrate, "device_identity", lambda: None)
    assert calibrate.main([]) == 0
    out = capsys.readouterr().out
    assert "no kernels to calibrate" in out and out.count("\n") == 1
    assert calibrate.ensure_calibrated() is None
    assert calibrate.current("metal") is None


def test_calibrate_times_the_pairs_block_sizes_on_any_backend(tmp_path, monkeypatch, capsys):
    """With --model and --draft, the cycle cost per block size (what --block-size auto
    reads) is measured and stored, on the CPU too; --force measures again."""
    from dflash_mlx import block_policy, demo

    monkeypatch.undo()  # the real measurement, not the suite's stand-in costs
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(calibrate, "device_identity", lambda: None)
    monkeypatch.setattr(block_policy, "_measured", {})
    monkeypatch.setattr(block_policy, "WARMUP", 1)
    monkeypatch.setattr(block_policy, "TIMED", 1)
    args = ["--model", str(demo.TARGET), "--draft", str(demo.DRAFT)]
    assert calibrate.main(args) == 0
    out = capsys.readouterr().out
    assert "block-size costs:" in out and "16:" in out
    (saved,) = (tmp_path / "dflash_mlx").glob("costs-*.json")
    first = saved.read_text()
    assert calibrate.main([*args, "--force"]) == 0
    assert saved.read_text() != first  # measured again


def test_model_shapes_find_linears_and_attention(monkeypatch):
    args = qwen3.ModelArgs(
        model_type="qwen3",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=96,
        num_attention_heads=4,
        rms_norm_eps=1e-6,
        vocab_size=50,
        num_key_value_heads=2,
        max_position_embeddings=128,
        head_dim=64,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    model = qwen3.Model(args)
    model.set_dtype(mx.bfloat16)
    shapes = calibrate.model_shapes(model)
    assert shapes.attention == ((64, 4, 2, "bfloat16"),)
    assert {(n, k) for _, n, k, _, _ in shapes.linears} == {
        (256, 64),  # q
        (128, 64),  # k, v
        (64, 256),  # o
        (96, 64),  # gate, up
        (64, 96),  # down
    }
    nn.quantize(model, group_size=32, bits=4)
    q = calibrate.model_shapes(model)
    assert {kind for kind, *_ in q.linears} == {"q4"}
    assert {(n, k, g) for _, n, k, g, _ in q.linears} == {
        (n, k, 32) for _, n, k, _, _ in shapes.linears
    }
    # Where verify fuses q/k/v and gate/up (fuse.py), their fused shapes are calibrated too.
    from dflash_mlx import fuse

    monkeypatch.setattr(fuse, "BACKENDS", {"cpu"})
    fused = {(n, k) for _, n, k, _, _ in calibrate.model_shapes(model).linears}
    assert fused - {(n, k) for _, n, k, _, _ in q.linears} == {(256 + 2 * 128, 64), (2 * 96, 64)}


def test_timed_calls_are_chained_yet_compute_the_same():
    """Calibration times calls one after another: from the second call of a batch on,
    the input carries a zero-valued dependency on the last output (as in a forward,
    where independent calls would run concurrently), and equals the input itself."""
    mx.random.seed(5)
    x = mx.random.normal((2, 3))
    calls = []

    def call(i, xi):
        calls.append(xi)
        return xi * 2

    fn = calibrate._chained(call, x)
    fn(0), fn(1)
    assert calls[0] is x and calls[1] is not x  # the second input depends on the first output
    assert mx.array_equal(calls[1], x).item()
