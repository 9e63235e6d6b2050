"""Writing 16 rows into a KV buffer: at a host offset (mlx_lm's KVCache) vs a device offset
(static caches), per buffer size.

    python benchmarks/bench_slice_update.py
"""

import time

import mlx.core as mx


def timed(fn, reps=20):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * sorted(ts)[reps // 2]


def measure(rows: int) -> None:
    state = {"b": mx.zeros((1, 8, rows, 128), dtype=mx.bfloat16)}
    upd = mx.ones((1, 8, 16, 128), dtype=mx.bfloat16)
    off = mx.array([rows // 2])
    mx.eval(state["b"], upd, off)

    def host():
        state["b"][..., rows // 2 : rows // 2 + 16, :] = upd
        mx.eval(state["b"])

    def device():
        state["b"] = mx.slice_update(state["b"], upd, off, axes=(2,))
        mx.eval(state["b"])

    mb = state["b"].nbytes / 1e6
    print(
        f"{rows:6d} rows ({mb:5.1f} MB): host offset {timed(host):.3f} ms, "
        f"device offset {timed(device):.3f} ms"
    )


for n in (1280, 4352, 8448, 16640):
    measure(n)
