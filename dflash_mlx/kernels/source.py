"""Kernel sources for every backend, and the launch plan for one block-attention call.

One body per pass (block_attention_body.h, combine_body.h) is shared by all backends;
what differs is the prelude (prelude_metal.h / prelude_cuda.h: address spaces,
barriers, simd reductions, matrix fragments, copies) and a few entry lines that name
the thread / threadgroup indices and declare threadgroup memory.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

_DIR = Path(__file__).parent

PASS1_INPUTS = ["q", "k", "v", "params", "fparams"]
PASS1_OUTPUTS = ["out", "opart", "lse"]
PASS2_INPUTS = ["opart", "lse", "params"]
PASS2_OUTPUTS = ["out"]

SUPPORTED_HEAD_DIMS = (64, 128, 256)
MAX_QUERIES = 32

_METAL_ENTRY_PASS1 = """\
const uint df_tid = thread_index_in_threadgroup;
const uint df_lane = thread_index_in_simdgroup;
const uint df_warp = simdgroup_index_in_threadgroup;
const uint3 df_tg3 = threadgroup_position_in_grid;
const uint df_tgx = df_tg3.x;
const uint df_tgy = df_tg3.y;
const uint df_tgz = df_tg3.z;
threadgroup float df_smem_words[SMEM_WORDS];
threadgroup df_byte* df_smem = (threadgroup df_byte*)df_smem_words;
"""

_CUDA_ENTRY_PASS1 = """\
const unsigned df_tid = threadIdx.x;
const unsigned df_lane = threadIdx.x & 31u;
const unsigned df_warp = threadIdx.x >> 5;
const unsigned df_tgx = blockIdx.x;
const unsigned df_tgy = blockIdx.y;
const unsigned df_tgz = blockIdx.z;
extern __shared__ __align__(16) unsigned char df_smem_raw[];
df_byte* df_smem = df_smem_raw;
"""

_METAL_ENTRY_PASS2 = "const uint df_gid = thread_position_in_grid.x;\n"
_CUDA_ENTRY_PASS2 = "const unsigned df_gid = blockIdx.x * blockDim.x + threadIdx.x;\n"


@cache
def read_source(name: str) -> str:
    """A kernel source file as the kernels are built from it: `compact`."""
    return compact((_DIR / name).read_text())


def compact(text: str) -> str:
    """The source without comments, indentation or blank lines. MLX hashes a custom
    kernel's whole source on every launch to find its compiled module (and builds the
    source string on every eager call), so the host pays per byte, per launch
    (results/cycle_session11.md)."""
    lines = []
    for line in text.splitlines():
        quoted, cut = False, len(line)
        for i, ch in enumerate(line):
            if ch == '"':
                quoted = not quoted
            elif not quoted and line.startswith("//", i):
                cut = i
                break
        line = line[:cut].strip()
        if line:
            lines.append(line)
    return "\n".join(lines) + "\n"


SECTIONS = ("core", "tiles", "matmul")


def prelude(backend: str, last: str = "core") -> str:
    """The prelude for 'metal' or 'cuda' up to section `last` (SECTIONS, in order): a
    kernel carries only what it uses, since its launch costs the host per byte (compact).
    Sections start at lines `// @section NAME`; "core" is what comes before the first."""
    if backend not in ("metal", "cuda"):
        raise ValueError(f"unknown backend {backend!r}")
    text = (_DIR / f"prelude_{backend}.h").read_text()
    keep = SECTIONS[: SECTIONS.index(last) + 1]
    parts = re.split(r"^// @section (\w+).*$", text, flags=re.MULTILINE)
    out = [parts[0]] + [body for name, body in zip(parts[1::2], parts[2::2]) if name in keep]
    return compact("".join(out))


def kernel_source(backend: str, pass_: int) -> tuple[str, str]:
    """(header, body) of pass 1 or 2 for backend 'metal' or 'cuda'.

    The emulator compiles the Metal pair unchanged (tests/emulation).
    """
    if backend not in ("metal", "cuda"):
        raise ValueError(f"unknown backend {backend!r}")
    header = prelude(backend, "tiles" if pass_ == 1 else "core")
    if pass_ == 1:
        entry = _METAL_ENTRY_PASS1 if backend == "metal" else _CUDA_ENTRY_PASS1
        body = read_source("block_attention_body.h")
    else:
        entry = _METAL_ENTRY_PASS2 if backend == "metal" else _CUDA_ENTRY_PASS2
        body = read_source("combine_body.h")
    return header, entry + body


# Threadgroup memory a backend gives one threadgroup, in bytes.
SMEM_LIMIT = {"metal": 32 * 1024, "cuda": 227 * 1024}


@dataclass(frozen=True)
class Plan:
    """Launch parameters of one call (template constants first)."""

    D: int
    BN: int  # keys per tile
    WM: int  # simdgroups per threadgroup; each owns 16 query rows
    NBUF: int  # K/V tile buffers (2: the next tile's copy overlaps this tile's compute)
    n_rb: int  # row blocks of 16 * WM rows
    nsplit: int  # KV splits (threadgroups along the keys); > 1 adds the combine pass
    split_len: int  # keys per split (multiple of BN)
    kv_lo: int  # first key any query can see (sliding window)
    smem_bytes: int

    @property
    def threads(self) -> int:
        return 32 * self.WM

    @property
    def smem_words(self) -> int:
        return (self.smem_bytes + 3) // 4


def smem_bytes(itemsize: int, D: int, BN: int, WM: int, NBUF: int) -> int:
    """Threadgroup memory of pass 1 (mirrors SMEM_NEED in block_attention_body.h)."""
    vec = 16 // itemsize
    ldk, ldp = D + vec, BN + vec
    return itemsize * (16 * WM * ldk + 2 * NBUF * BN * ldk + WM * 16 * ldp)


# Tiling per backend. CUDA: two K/V buffers filled by cp.async; up to 4 simdgroups
# (64 query rows) per threadgroup; 32-key tiles at D=128 measured 64 vs 83 us (H100)
# and 80 vs 89 us (H200, benchmarks/results/attention_cuda_nvidia_h200.json "variants")
# against 64-key ones at Lq=16, S=16k. Metal: 32 KB of threadgroup memory and no
# asynchronous copy, so one buffer and smaller tiles.
_TILING = {
    "cuda": {"max_wm": 4, "bn": {64: 64, 128: 32, 256: 32}, "nbuf": 2, "target_groups": 264},
    "metal": {"max_wm": 4, "bn": {64: 32, 128: 32, 256: 16}, "nbuf": 1, "target_groups": 256},
}
# Fewest keys per split: below this the per-threadgroup query load and the combine
# pass cost more than the parallelism buys.
MIN_SPLIT_KEYS = 256


def make_plan(
    backend: str,
    itemsize: int,
    batch: int,
    n_kv_heads: int,
    group: int,
    lq: int,
    s: int,
    D: int,
    window: int | None,
    *,
    wm: int | None = None,
    bn: int | None = None,
    nbuf: int | None = None,
    split_len: int | None = None,
) -> Plan | None:
    """Tile and split one call; None when it does not fit the backend.

    Keyword arguments override the heuristics (tests and benchmarks use them).
    """
    tiling = _TILING[backend]
    m = lq * group
    if wm is None:
        wm = min(tiling["max_wm"], math.ceil(m / 16))
    if bn is None:
        bn = tiling["bn"][D]
    if nbuf is None:
        nbuf = tiling["nbuf"]
    limit = SMEM_LIMIT[backend]
    # Shrink to fit threadgroup memory: first the key tile, then the row block.
    while smem_bytes(itemsize, D, bn, wm, nbuf) > limit:
        if bn > 16:
            bn //= 2
        elif wm > 1:
            wm //= 2
        elif nbuf > 1:
            nbuf = 1
        else:
            return None
    n_rb = math.ceil(m / (16 * wm))
    kv_lo = max(0, s - lq - window + 1) if window else 0
    n_keys = s - kv_lo
    if split_len is None:
        base = batch * n_kv_heads * n_rb
        want = max(1, math.ceil(tiling["target_groups"] / base))
        split_len = max(MIN_SPLIT_KEYS, math.ceil(n_keys / want))
    split_len = max(bn, math.ceil(split_len / bn) * bn)
    nsplit = max(1, math.ceil(n_keys / split_len))
    return Plan(
        D=D,
        BN=bn,
        WM=wm,
        NBUF=nbuf,
        n_rb=n_rb,
        nsplit=nsplit,
        split_len=split_len,
        kv_lo=kv_lo,
        smem_bytes=smem_bytes(itemsize, D, bn, wm, nbuf),
    )
