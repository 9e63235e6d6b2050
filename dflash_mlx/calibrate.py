"""Calibration: time the kernels against the stock ops on this machine, once.

    python -m dflash_mlx.calibrate [--model PATH_OR_HUB_ID] [--draft PATH] [--force]

For the shapes a model uses (block attention: its head dim and heads at query lengths
2…32 and a few key lengths; skinny matmuls: its linear layers at verify widths 2…32),
both paths are timed and the faster one recorded, per device name and MLX version, in
$XDG_CACHE_HOME/dflash_mlx/ (default ~/.cache/dflash_mlx/). Auto mode of both kernels
reads it, so the path taken on a user's GPU is the one measured there. Without a
calibration, auto keeps the measured defaults (attention.THRESHOLDS: CUDA only;
matmul.MEASURED) and the stock ops everywhere else.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx import nn

from . import fuse
from .kernels import attention, matmul
from .kernels import source as attention_source

FORMAT = 1
LQS = (2, 4, 8, 16, 32)  # verify widths timed for attention
KEY_LENGTHS = (1024, 4096, 16384)
ROWS = (2, 4, 8, 16, 32)  # verify widths timed for matmuls
MARGIN = 1.03  # the kernel must be this much faster: a tie keeps the stock op
CACHE_BYTES = 256 * 2**20  # weights / K-V rotated through per timing: more than L2 / SLC

# timer(case, path, fn) -> seconds per call of fn(i); path is "kernel" or "stock".
Timer = Callable[[dict, str, Callable[[int], mx.array]], float]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dflash_mlx"


def device_identity() -> tuple[str, str, str] | None:
    """(backend, device name, MLX version) of the GPU the kernels would run on, or None."""
    active = attention.active_backend()
    if active is None:
        return None
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    return active[0], str(info.get("device_name", "gpu")), mx.__version__


def calibration_path(identity: tuple[str, str, str]) -> Path:
    backend, device, version = identity
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", device).strip("-").lower() or "gpu"
    return cache_dir() / f"{backend}-{slug}-mlx{version}.json"


@dataclass
class Calibration:
    """Decisions for one device + MLX version, with the timings behind them."""

    backend: str
    device: str
    mlx: str
    # head_dim -> {measured Lq: fewest keys from which the kernel won (None: never)}
    attention: dict[int, dict[int, int | None]] = field(default_factory=dict)
    # "kind:NxK" -> {measured M: the kernel won}
    matmul: dict[str, dict[int, bool]] = field(default_factory=dict)
    timings: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "backend": self.backend,
            "device": self.device,
            "mlx": self.mlx,
            "attention": {
                str(d): {str(lq): s for lq, s in v.items()} for d, v in self.attention.items()
            },
            "matmul": {key: {str(m): w for m, w in v.items()} for key, v in self.matmul.items()},
            "timings": self.timings,
        }

    @classmethod
    def from_json(cls, data: dict) -> Calibration:
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        att = {
            int(d): {int(lq): (None if s is None else int(s)) for lq, s in v.items()}
            for d, v in data["attention"].items()
        }
        mm = {str(k): {int(m): bool(w) for m, w in v.items()} for k, v in data["matmul"].items()}
        return cls(
            backend=str(data["backend"]),
            device=str(data["device"]),
            mlx=str(data["mlx"]),
            attention=att,
            matmul=mm,
            timings=list(data.get("timings", [])),
        )


def load(path: Path) -> Calibration | None:
    """The calibration stored at path; None (with one clear note) if absent or unreadable."""
    if not path.exists():
        return None
    try:
        return Calibration.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        warnings.warn(
            f"dflash_mlx: calibration file {path} is unreadable ({type(e).__name__}: {e}); "
            "ignoring it: run `python -m dflash_mlx.calibrate --force` to measure again",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def save(cal: Calibration, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(cal.to_json(), indent=1))
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file


# The kernels' auto mode asks at every call: answer from memory after the first read.
_current: dict[str, tuple[tuple[str, str, str] | None, Calibration | None]] = {}


def forget() -> None:
    """Drop what was read (tests; after a new calibration is written), and the routing
    decisions the kernels made from it."""
    from .kernels import attention

    _current.clear()
    attention._routes.clear()


def current(backend: str) -> Calibration | None:
    """This machine's calibration for `backend`, read once per process."""
    hit = _current.get(backend)
    if hit is None:
        identity = device_identity()
        cal = None
        if identity is not None and identity[0] == backend:
            cal = load(calibration_path(identity))
        hit = _current[backend] = (identity, cal)
    return hit[1]


def _nearest(measured: dict, value: int):
    """The entry of the smallest measured key >= value (else the largest)."""
    keys = sorted(measured)
    return measured[next((k for k in keys if k >= value), keys[-1])]


def matmul_key(kind: str, n: int, k: int) -> str:
    return f"{kind}:{n}x{k}"


def matmul_decision(backend: str, kind: str, m: int, n: int, k: int) -> bool | None:
    """Calibrated choice for one matmul (True: kernel), or None where not measured."""
    cal = current(backend)
    if cal is None:
        return None
    entry = cal.matmul.get(matmul_key(kind, n, k))
    return None if not entry else _nearest(entry, m)


def attention_decision(backend: str, lq: int, s: int, head_dim: int) -> bool | None:
    """Calibrated choice for one block-attention call, or None where not measured."""
    cal = current(backend)
    if cal is None:
        return None
    entry = cal.attention.get(head_dim)
    if not entry or lq < min(entry):
        return None
    s_min = _nearest(entry, lq)
    return s_min is not None and s >= s_min


# ------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class Shapes:
    """What a model will run: attention (head_dim, heads, kv heads, dtype) and linear
    layers (kind, N, K, group size, dtype name)."""

    attention: tuple[tuple[int, int, int, str], ...] = ()
    linears: tuple[tuple[str, int, int, int, str], ...] = ()


def _linear_shape(module: nn.Module) -> tuple[str, int, int, int, str] | None:
    """(kind, N, K, group size, dtype name) of a linear layer the kernel can run."""
    spec = matmul.linear_spec(module)
    if spec is None:
        return None
    n, k, dt, bits, gs = spec
    if dt not in matmul._DTYPES or (
        bits and (bits not in matmul.BITS or gs not in matmul.GROUP_SIZES)
    ):
        return None
    return matmul.weight_kind(dt, bits), n, k, gs, str(dt).split(".")[-1]


def model_shapes(*models: nn.Module) -> Shapes:
    """Attention and linear shapes of the models, with the fused q/k/v and gate/up
    shapes a verify runs where fusion is on (fuse.py)."""
    att, lin = set(), set()
    for model in models:
        for _, module in model.named_modules():
            # only what the kernels can run: the rest always takes the stock op
            shape = _linear_shape(module)
            if shape is not None:
                lin.add(shape)
            heads = getattr(module, "n_heads", None)
            kv = getattr(module, "n_kv_heads", None)
            q_proj = getattr(module, "q_proj", None)
            if isinstance(heads, int) and isinstance(kv, int) and q_proj is not None:
                d = q_proj.weight.shape[0] // heads
                dt = getattr(q_proj, "scales", q_proj.weight).dtype
                if d in attention_source.SUPPORTED_HEAD_DIMS and dt in matmul._DTYPES:
                    att.add((d, heads, kv, str(dt).split(".")[-1]))
        layers = getattr(model, "layers", None)
        if fuse.enabled() and isinstance(layers, list):
            for _, parts in fuse.siblings(layers):
                shapes = [_linear_shape(p) for p in parts]
                if all(shapes):
                    kind, _, k, gs, dtype = shapes[0]
                    lin.add((kind, sum(s[1] for s in shapes), k, gs, dtype))
    return Shapes(tuple(sorted(att)), tuple(sorted(lin)))


# Without a model: Qwen3-8B's shapes, bf16 and 4-bit (group 64).
DEFAULT_SHAPES = Shapes(
    attention=((128, 32, 8, "bfloat16"),),
    linears=tuple(
        (kind, n, k, g, "bfloat16")
        for kind, g in (("bfloat16", 0), ("q4", 64))
        for n, k in ((4096, 4096), (1024, 4096), (12288, 4096), (4096, 12288))
    ),
)


def _missing(cal: Calibration | None, shapes: Shapes) -> Shapes:
    if cal is None:
        return shapes
    att = tuple(a for a in shapes.attention if a[0] not in cal.attention)
    lin = tuple(x for x in shapes.linears if matmul_key(x[0], x[1], x[2]) not in cal.matmul)
    return Shapes(att, lin)


# ------------------------------------------------------------------ timing


def measure(case: dict, path: str, fn: Callable[[int], mx.array], n_calls: int = 16) -> float:
    """Median seconds per call over 5 evaluations of n_calls calls (chained: see
    `_chained`), after a warm-up."""
    mx.eval([fn(i) for i in range(n_calls)])
    samples = []
    for _ in range(5):
        outs = [fn(i) for i in range(n_calls)]
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(outs)
        mx.synchronize()
        samples.append((time.perf_counter() - t0) / n_calls)
    return statistics.median(samples)


def _chained(call: Callable[[int, mx.array], mx.array], first: mx.array):
    """fn(i) = call(i, input), where from the second call of a batch on the input carries
    a zero-valued dependency on the last output: the calls run one after another, as in
    a forward. (Independent calls in one graph run concurrently on a GPU: their time is
    throughput, which misjudged MLX's 16-row 4-bit matmul as flat in M,
    benchmarks/results/cycle_session7.md.) The extra elementwise op is the same for
    both paths."""
    last: list[mx.array | None] = [None]

    def fn(i: int) -> mx.array:
        x = first
        if i > 0 and last[0] is not None:
            corner = last[0][tuple(slice(0, 1) for _ in range(last[0].ndim))]
            x = first + (corner * 0).astype(first.dtype)
        last[0] = call(i, x)
        return last[0]

    return fn


def _copies(nbytes: int) -> int:
    return max(2, min(32, math.ceil(CACHE_BYTES / max(nbytes, 1))))


def _attention_cases(shape, lqs, key_lengths):
    d, hq, hkv, dtype_name = shape
    dtype = getattr(mx, dtype_name)
    for lq in lqs:
        for s in key_lengths:
            yield {"op": "attention", "D": d, "Hq": hq, "Hkv": hkv, "Lq": lq, "S": s}, dtype


def _attention_fns(case: dict, dtype, backend, factory):
    d, hq, hkv, lq, s = case["D"], case["Hq"], case["Hkv"], case["Lq"], case["S"]
    # A new key length at every call, as in a decode loop: cuDNN-backed SDPA builds a
    # graph per length, which a repeated length would hide.
    span = s + 1024
    n = _copies(2 * hkv * span * d * dtype.size)
    kv = [
        (
            mx.random.normal((1, hkv, span, d)).astype(dtype),
            mx.random.normal((1, hkv, span, d)).astype(dtype),
        )
        for _ in range(n)
    ]
    q = mx.random.normal((1, hq, lq, d)).astype(dtype)
    mx.eval(kv, q)
    scale = d**-0.5
    plans = {}
    calls = [0]

    def views(i):
        k, v = kv[i % n]
        calls[0] += 1
        length = s + calls[0] % 1024
        return k[:, :, :length], v[:, :, :length], length

    def kernel(i, q):
        k, v, length = views(i)
        plan = plans.get(length)
        if plan is None:
            plan = plans[length] = attention_source.make_plan(
                backend, dtype.size, 1, hkv, hq // hkv, lq, length, d, None
            )
        return attention.launch(
            q, k, v, plan, scale=scale, causal=True, window=None, backend=backend, factory=factory
        )

    def stock(i, q):
        k, v, _ = views(i)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")

    return _chained(kernel, q), _chained(stock, q)


def _matmul_fns(case: dict, backend, factory):
    kind, n, k, gs, m = case["kind"], case["N"], case["K"], case["group"], case["M"]
    dtype = getattr(mx, case["dtype"])
    bits = int(kind[1:]) if kind.startswith("q") else 0
    nbytes = n * k * (bits / 8 if bits else dtype.size)
    sets = []
    for _ in range(_copies(int(nbytes))):
        w = mx.random.normal((n, k), dtype=dtype)
        sets.append(mx.quantize(w, group_size=gs, bits=bits) if bits else (w,))
        mx.eval(sets[-1])
    x = mx.random.normal((m, k)).astype(dtype)
    mx.eval(x)
    plan = matmul.make_plan(backend, n, k, bits, dtype.size, m=m)

    def kernel(i, x):
        w = sets[i % len(sets)]
        if bits:
            return matmul.launch(
                x,
                w[0],
                plan,
                scales=w[1],
                biases=w[2],
                group_size=gs,
                bits=bits,
                backend=backend,
                factory=factory,
            )
        return matmul.launch(x, w[0], plan, backend=backend, factory=factory)

    def stock(i, x):
        w = sets[i % len(sets)]
        if bits:
            return mx.quantized_matmul(x, *w, transpose=True, group_size=gs, bits=bits)
        return x @ w[0].T

    return _chained(kernel, x), _chained(stock, x), (dtype, bits, gs, plan)


def _kernel_ok(case: dict, backend: str, factory, extra) -> bool:
    """The kernel passes its self-check for this configuration (else: stock)."""
    if case["op"] == "matmul":
        dtype, bits, gs, plan = extra
        mf = math.ceil(case["M"] / 8)
        return matmul._self_check(backend, factory, dtype, bits, gs, mf, plan, False)
    dtype = extra
    plan = attention_source.make_plan(
        backend,
        dtype.size,
        1,
        case["Hkv"],
        case["Hq"] // case["Hkv"],
        case["Lq"],
        case["S"],
        case["D"],
        None,
    )
    return plan is not None and attention._self_check(backend, factory, dtype, plan)


def run(
    shapes: Shapes,
    *,
    timer: Timer = measure,
    progress: Callable[[str], None] | None = None,
    lqs: Iterable[int] = LQS,
    key_lengths: Iterable[int] = KEY_LENGTHS,
    rows: Iterable[int] = ROWS,
) -> Calibration:
    """Time kernel vs stock for every shape; the decisions (not yet stored)."""
    identity = device_identity()
    if identity is None:
        raise RuntimeError("no GPU backend (Metal or CUDA) is active: nothing to calibrate")
    backend, device, version = identity
    factory = attention.active_backend()[1]
    mm_factory = matmul.active_backend()[1]
    cal = Calibration(backend=backend, device=device, mlx=version)
    cases = []
    for shape in shapes.attention:
        cases += [(c, dt) for c, dt in _attention_cases(shape, tuple(lqs), tuple(key_lengths))]
    for kind, n, k, gs, dtype in shapes.linears:
        for m in rows:
            c = {"op": "matmul", "kind": kind, "N": n, "K": k, "group": gs, "dtype": dtype, "M": m}
            cases.append((c, None))
    say = progress or (lambda s: None)
    for i, (case, dtype) in enumerate(cases, 1):
        label = " ".join(f"{k}={v}" for k, v in case.items() if k != "op")
        try:
            if case["op"] == "attention":
                kernel, stock = _attention_fns(case, dtype, backend, factory)
                extra = dtype
            else:
                kernel, stock, extra = _matmul_fns(case, backend, mm_factory)
            fac = mm_factory if case["op"] == "matmul" else factory
            ok = _kernel_ok(case, backend, fac, extra)
            t_stock = timer(case, "stock", stock)
            t_kernel = timer(case, "kernel", kernel) if ok else math.inf
        except Exception as e:  # noqa: BLE001 - one failing point: stock there, go on
            say(f"[{i}/{len(cases)}] {case['op']} {label}: failed ({type(e).__name__}: {e})")
            ok, t_kernel, t_stock = False, math.inf, math.inf
        wins = ok and t_kernel * MARGIN < t_stock
        stock_s = t_stock if math.isfinite(t_stock) else None
        cal.timings.append({**case, "kernel_s": t_kernel if ok else None, "stock_s": stock_s})
        say(
            f"[{i}/{len(cases)}] {case['op']} {label}: kernel "
            f"{t_kernel * 1e6:.1f} us, stock {t_stock * 1e6:.1f} us -> "
            f"{'kernel' if wins else 'stock'}"
        )
        if case["op"] == "matmul":
            key = matmul_key(case["kind"], case["N"], case["K"])
            cal.matmul.setdefault(key, {})[case["M"]] = wins
    _derive_attention(cal)
    return cal


def _derive_attention(cal: Calibration) -> None:
    """Per (D, Lq): the fewest measured keys from which the kernel won at every larger S."""
    rows = [t for t in cal.timings if t["op"] == "attention"]
    for d in sorted({t["D"] for t in rows}):
        entry = {}
        for lq in sorted({t["Lq"] for t in rows if t["D"] == d}):
            pts = sorted(
                (t["S"], t["kernel_s"] is not None and t["kernel_s"] * MARGIN < (t["stock_s"] or 0))
                for t in rows
                if t["D"] == d and t["Lq"] == lq
            )
            entry[lq] = next((s for s, _ in pts if all(w for s2, w in pts if s2 >= s)), None)
            if entry[lq] == pts[0][0]:
                entry[lq] = 0  # won from the shortest measured length: every length
        cal.attention[d] = entry


def merge(old: Calibration | None, new: Calibration) -> Calibration:
    if old is None or (old.backend, old.device, old.mlx) != (new.backend, new.device, new.mlx):
        return new
    old.attention.update(new.attention)
    for key, v in new.matmul.items():
        old.matmul[key] = v
    old.timings += new.timings
    return old


def ensure_calibrated(
    *models: nn.Module,
    force: bool = False,
    timer: Timer = measure,
    progress: Callable[[str], None] | None = None,
) -> Calibration | None:
    """This machine's calibration covering the models' shapes, measuring what is missing
    (on first use), or None where no GPU backend is active."""
    identity = device_identity()
    if identity is None:
        return None
    path = calibration_path(identity)
    old = None if force else load(path)
    shapes = model_shapes(*models) if models else DEFAULT_SHAPES
    todo = _missing(old, shapes)
    if not todo.attention and not todo.linears:
        return old
    say = progress or (lambda s: print(s, file=sys.stderr, flush=True))
    say(f"dflash_mlx: calibrating kernels on {identity[1]} (MLX {identity[2]}), once; -> {path}")
    cal = merge(old, run(todo, timer=timer, progress=say))
    save(cal, path)
    forget()
    return cal


def _load_lazily(path_or_repo: str) -> nn.Module:
    from mlx_lm.utils import _download, load_model

    path = Path(path_or_repo)
    if not path.exists():
        path = _download(path_or_repo)
    try:
        model, _ = load_model(path, lazy=True)
    except Exception:  # noqa: BLE001 - not an mlx-lm target: try a DFlash draft
        from . import load_draft

        model = load_draft(str(path))
    return model


def _block_costs(model_path: str, draft_path: str, force: bool) -> None:
    """The pair's cycle cost per block size (what --block-size auto decides from)."""
    from . import block_policy, load, load_draft

    model, _ = load(model_path)
    draft = load_draft(draft_path)
    costs = block_policy.cached_costs(model, draft, draft.block_size, force=force)
    print(f"block-size costs: {block_policy.costs_path(model, draft)}")
    for context, seconds in ((costs.context, costs.seconds), (costs.long_context, costs.long)):
        if seconds:
            step = seconds[1]
            print(
                f"  ms per cycle (x a plain step) at {context} positions: "
                + ", ".join(f"{w}: {t * 1e3:.2f} ({t / step:.2f}x)" for w, t in seconds.items())
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dflash-mlx calibrate", description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="target (path or Hub id); default: Qwen3-8B's shapes")
    ap.add_argument(
        "--draft",
        help="draft (path or Hub id); with --model, also times the pair's cycles per block "
        "size (what --block-size auto reads)",
    )
    ap.add_argument("--force", action="store_true", help="measure again, ignoring the file")
    ap.add_argument("--show", action="store_true", help="print the stored decisions")
    args = ap.parse_args(argv)
    if args.model and args.draft and not args.show:
        _block_costs(args.model, args.draft, args.force)
    identity = device_identity()
    if identity is None:
        print(
            "dflash-mlx calibrate: MLX runs on the CPU here (no Metal or CUDA GPU): "
            "no kernels to calibrate; the stock ops are used."
        )
        return 0
    path = calibration_path(identity)
    if args.show:
        cal = load(path)
        print(json.dumps(cal.to_json() if cal else None, indent=1)[:20000])
        return 0
    models = [_load_lazily(p) for p in (args.model, args.draft) if p]
    cal = ensure_calibrated(*models, force=args.force, progress=print)
    n_k = sum(w for v in cal.matmul.values() for w in v.values())
    n_all = sum(len(v) for v in cal.matmul.values())
    print(f"calibration: {path}")
    print(f"  matmul: kernel at {n_k} of {n_all} (shape, rows) points")
    for d, entry in sorted(cal.attention.items()):
        print(f"  attention D={d}: fewest keys for the kernel per Lq {entry}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
