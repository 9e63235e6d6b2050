"""Compile the CUDA variant here with nvcc, as mx.fast.cuda_kernel would assemble it.

A developer's check (no GPU needed): it catches compile errors before device time is
spent and prints ptxas's register / spill / shared-memory report per configuration.

    python tests/emulation/cuda_compile_check.py --mlx-include DIR [--keep DIR]

DIR holds MLX's mlx/backend/cuda/device/*.cuh (the headers MLX's JIT prepends);
without it a minimal stand-in with the CUDA headers they include is used.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from dflash_mlx.kernels.source import (
    PASS1_INPUTS,
    PASS1_OUTPUTS,
    PASS2_INPUTS,
    PASS2_OUTPUTS,
    kernel_source,
    make_plan,
)

_CUDA_TYPE = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}
_STANDIN = """\
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, 10>;
using Strides = cuda::std::array<int64_t, 10>;
}
"""


def assemble(
    pass_: int, dtype: str, template: list[tuple[str, object]], extra_header: str = ""
) -> str:
    """The source MLX's cuda_kernel builds (mlx/backend/cuda/custom_kernel.cpp)."""
    header, source = kernel_source("cuda", pass_)
    names = (PASS1_INPUTS, PASS1_OUTPUTS) if pass_ == 1 else (PASS2_INPUTS, PASS2_OUTPUTS)
    if pass_ == 1:
        in_types = [_CUDA_TYPE[dtype]] * 3 + ["int32_t", "float"]
        out_types = [_CUDA_TYPE[dtype], "float", "float"]
    else:
        in_types = ["float", "float", "int32_t"]
        out_types = [_CUDA_TYPE[dtype]]
    lines = [
        '#include "mlx/backend/cuda/device/utils.cuh"',
        "#include <cooperative_groups.h>",
        extra_header + header,
        "namespace mlx::core::cu {",
        "namespace cg = cooperative_groups;",
        "__global__ void dflash_kernel(",
    ]
    params = []
    for name, ctype in zip(names[0], in_types):
        params.append(f"    const {ctype}* {name}")
        if f"{name}_strides" in source:
            params.append(f"    const __grid_constant__ Strides {name}_strides")
        if f"{name}_shape" in source:
            params.append(f"    const __grid_constant__ Shape {name}_shape")
    for name, ctype in zip(names[1], out_types):
        params.append(f"    {ctype}* {name}")
    lines.append(",\n".join(params) + ") {")
    for name, value in template:
        if isinstance(value, bool):
            lines.append(f"  constexpr bool {name} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            lines.append(f"  constexpr int {name} = {value};")
        else:
            lines.append(f"  using {name} = {_CUDA_TYPE[value]};")
    lines.append(source)
    lines.append("}\n}  // namespace mlx::core::cu")
    return "\n".join(lines)


def assemble_matmul(pass_: int, dtype: str, quant: bool, template, extra_header: str = "") -> str:
    """The skinny matmul's source as mx.fast.cuda_kernel builds it (see assemble)."""
    from dflash_mlx.kernels import matmul

    header, source = matmul.kernel_source("cuda", pass_, quant)
    t = _CUDA_TYPE[dtype]
    if pass_ == 1:
        names = (matmul.PASS1_INPUTS, matmul.PASS1_OUTPUTS)
        in_types = [t, "uint32_t" if quant else t, t, t, t, "int32_t"]
        out_types = [t, "float"]
    else:
        names = (matmul.PASS2_INPUTS, matmul.PASS2_OUTPUTS)
        in_types, out_types = ["float", t, "int32_t"], [t]
    lines = [
        '#include "mlx/backend/cuda/device/utils.cuh"',
        "#include <cooperative_groups.h>",
        extra_header + header,
        "namespace mlx::core::cu {",
        "namespace cg = cooperative_groups;",
        "__global__ void dflash_kernel(",
    ]
    params = [f"    const {c}* {n}" for n, c in zip(names[0], in_types)]
    params += [f"    {c}* {n}" for n, c in zip(names[1], out_types)]
    lines.append(",\n".join(params) + ") {")
    for name, value in template:
        if isinstance(value, bool):
            lines.append(f"  constexpr bool {name} = {'true' if value else 'false'};")
        elif isinstance(value, int):
            lines.append(f"  constexpr int {name} = {value};")
        else:
            lines.append(f"  using {name} = {_CUDA_TYPE[value]};")
    lines.append(source)
    lines.append("}\n}  // namespace mlx::core::cu")
    return "\n".join(lines)


def matmul_configs():
    """Skinny-matmul configurations: every dtype, dense and 4/8-bit, 1..4 fragments, the
    plan's tiling and 4 simdgroups along K."""
    from dflash_mlx.kernels import matmul

    for dtype in ("bfloat16", "float16", "float32"):
        for bits in (0, 4, 8):
            if bits and dtype == "float32":
                continue
            for mf in (1, 2, 4):
                for wk in (1, 4):
                    plan = matmul.make_plan("cuda", 4096, 4096, bits, 2, m=8 * mf, wk=wk)
                    for split in (False, True):
                        template = matmul._template(dtype, bits, 64, mf, plan, split, not split)
                        name = f"mm_{dtype}_q{bits}_mf{mf}_wk{wk}_split{int(split)}"
                        yield name, dtype, bits, template


def configs():
    """The configurations the CUDA plan picks for the benchmark shapes, plus fp32/fp16."""
    seen = set()
    for dtype, itemsize in (("bfloat16", 2), ("float16", 2), ("float32", 4)):
        for D in (64, 128, 256):
            for lq, group in ((1, 4), (16, 4), (32, 8)):
                plan = make_plan("cuda", itemsize, 1, 8, group, lq, 16384, D, None)
                for split in (False, True):
                    key = (dtype, D, plan.BN, plan.WM, plan.NBUF, split)
                    if key in seen:
                        continue
                    seen.add(key)
                    yield (
                        dtype,
                        [
                            ("T", dtype),
                            ("D", D),
                            ("BN", plan.BN),
                            ("WM", plan.WM),
                            ("NBUF", plan.NBUF),
                            ("SPLIT", split),
                            ("SMEM_WORDS", plan.smem_words),
                        ],
                    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mlx-include", type=Path)
    ap.add_argument("--keep", type=Path)
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--no-ldmatrix", action="store_true")
    ap.add_argument("--only", default="", help="substring filter on the config name")
    ap.add_argument("--matmul", action="store_true", help="the skinny matmul instead")
    args = ap.parse_args()
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("nvcc not found")
        return 1
    work = Path(tempfile.mkdtemp()) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    inc = args.mlx_include
    if inc is None:
        inc = work / "standin"
        (inc / "mlx/backend/cuda/device").mkdir(parents=True, exist_ok=True)
        (inc / "mlx/backend/cuda/device/utils.cuh").write_text(_STANDIN)
    extra = "#define DF_NO_LDMATRIX\n" if args.no_ldmatrix else ""
    if args.matmul:
        jobs = [(n, 1, d, (b, t)) for n, d, b, t in matmul_configs()]
        jobs += [(f"mm_sum_{d}", 2, d, (0, [("T", d), ("HAS_BIAS", True)])) for d in _CUDA_TYPE]
    else:
        jobs = [(f"p1_{d}_" + "_".join(str(v) for _, v in t[1:]), 1, d, t) for d, t in configs()]
        jobs += [(f"p2_{d}", 2, d, [("T", d)]) for d in _CUDA_TYPE]
    failed = 0
    for name, pass_, dtype, template in jobs:
        if args.only not in name:
            continue
        src = work / f"{name}.cu"
        if args.matmul:
            bits, template = template
            src.write_text(assemble_matmul(pass_, dtype, bits != 0, template, extra))
        else:
            src.write_text(assemble(pass_, dtype, template, extra))
        cmd = [nvcc, f"-arch={args.arch}", "-std=c++17"]
        cmd += [
            "-cubin",
            "-Xptxas",
            "-v",
            "-I",
            str(inc),
            str(src),
            "-o",
            str(work / f"{name}.cubin"),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        report = [
            ln.strip() for ln in proc.stderr.splitlines() if "registers" in ln or "spill" in ln
        ]
        status = "ok" if proc.returncode == 0 else "FAILED"
        print(f"{status:6s} {name}: {' | '.join(report[-2:])}")
        if proc.returncode != 0:
            failed += 1
            print(proc.stderr[-4000:])
    print(f"sources in {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
