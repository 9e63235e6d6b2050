"""A stand-in for mx.fast.metal_kernel that runs the kernel on the CPU.

`EmulatedMetalKernel(name, input_names, output_names, source, header)` returns a
callable with the call signature of mx.fast.metal_kernel's kernels. Each call
generates the C++ that MLX would hand the Metal compiler (the header, then a kernel
whose signature lists the inputs, their strides / shapes where the source names
them, the outputs and the Metal attributes the source names, then the source),
compiles it with g++ against metal_emu.h (Metal's builtins emulated), and runs it in
a subprocess. Every build is cached by its source in one directory per session.

Fidelity checks on top of Metal's semantics: inputs and outputs and each
threadgroup's memory end at a guard page (an overrun kills the run), outputs and
threadgroup memory start filled with NaN, and with `async_hooks=True` asynchronous
copies (df_copy16_async) land only at the matching wait.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).parent


class _Spec:
    def __init__(self, dtype, ndim):
        self.dtype, self.ndim = dtype, ndim


# Metal attributes MLX adds to a kernel's signature when its source names them.
_ATTRIBUTES = {
    "simdgroup_index_in_threadgroup": "uint",
    "simdgroups_per_threadgroup": "uint",
    "thread_execution_width": "uint",
    "thread_index_in_simdgroup": "uint",
    "thread_index_in_threadgroup": "uint",
    "thread_position_in_grid": "uint3",
    "thread_position_in_threadgroup": "uint3",
    "threadgroup_position_in_grid": "uint3",
    "threadgroups_per_grid": "uint3",
    "threads_per_grid": "uint3",
    "threads_per_simdgroup": "uint",
    "threads_per_threadgroup": "uint3",
}

_TYPE = {
    mx.float32: ("float", np.float32),
    mx.float16: ("float16_t", np.float16),
    mx.bfloat16: ("bfloat16_t", np.uint16),
    mx.int32: ("int32_t", np.int32),
    mx.uint32: ("uint32_t", np.uint32),
}

_ASYNC_HOOKS = """\
#define DF_ASYNC_HOOKS
template <typename T>
inline void df_copy16_async(T* dst, const T* src) { df_emu::async_copy(dst, src, 16); }
inline void df_async_commit() { df_emu::async_commit(); }
inline void df_async_wait1() { df_emu::async_wait(1); }
inline void df_async_wait0() { df_emu::async_wait(0); }
"""

# A `threadgroup T name[N];` declaration in the kernel source: memory one threadgroup
# shares. Here it becomes a pointer into that threadgroup's guarded buffer.
_TG_DECL = re.compile(r"threadgroup\s+(\w+)\s+(\w+)\s*\[([^\]]+)\]\s*;")

_MAIN = r"""
namespace df_emu_host {

struct Buffer {
  unsigned char* data = nullptr;  // ends at a guard page
  size_t bytes = 0;
};

inline Buffer alloc_guarded(size_t bytes, unsigned char fill) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t span = ((bytes + page - 1) / page + 1) * page;
  void* m = mmap(nullptr, span + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) df_emu::fail("mmap failed");
  unsigned char* base = static_cast<unsigned char*>(m);
  if (mprotect(base + span, page, PROT_NONE) != 0) df_emu::fail("mprotect failed");
  std::memset(base, fill, span);
  Buffer b;
  b.data = base + span - bytes;
  b.bytes = bytes;
  return b;
}

inline void read_file(const char* path, void* dst, size_t bytes) {
  FILE* f = std::fopen(path, "rb");
  if (!f || std::fread(dst, 1, bytes, f) != bytes) df_emu::fail("cannot read an input file");
  std::fclose(f);
}

inline void write_file(const char* path, const void* src, size_t bytes) {
  FILE* f = std::fopen(path, "wb");
  if (!f || std::fwrite(src, 1, bytes, f) != bytes) df_emu::fail("cannot write an output file");
  std::fclose(f);
}

unsigned g_grid[3], g_tg[3], g_group[3], g_n_in_group;
Buffer g_smem;
size_t g_smem_bytes = 0;
bool g_smem_given = false;

}  // namespace df_emu_host

// Threadgroup memory of the running threadgroup: one buffer for all of its threads.
inline unsigned char* df_emu_tg_memory(size_t bytes) {
  using namespace df_emu_host;
  if (!g_smem_given) {
    if (g_smem.bytes != bytes) {
      g_smem = alloc_guarded(bytes, 0xff);
    }
    std::memset(g_smem.data, 0xff, bytes);  // NaN in every float type
    g_smem_bytes = bytes;
    g_smem_given = true;
  } else if (bytes != g_smem_bytes) {
    df_emu::fail("threads of one threadgroup declared different threadgroup memory");
  }
  return g_smem.data;
}
"""


def _render_template_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return _TYPE[value][0]


def _template_kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    return "typename"


class EmulatedMetalKernel:
    """mx.fast.metal_kernel's interface, run by the CPU emulator.

    layout(name, array) -> (buffer, offset, strides) may place an input inside a larger
    buffer with other strides (all in elements), to exercise strided inputs.
    """

    def __init__(
        self,
        name: str,
        input_names: list[str],
        output_names: list[str],
        source: str,
        header: str = "",
        *,
        build_dir: Path,
        async_hooks: bool = True,
        layout: Callable | None = None,
        compiler: str = "g++",
    ):
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.build_dir = Path(build_dir)
        self.async_hooks = async_hooks
        self.layout = layout
        self.compiler = compiler

    # -- code generation (mirrors mlx/backend/common/metal_kernel.cpp) --
    def generate(self, inputs, template, output_dtypes) -> str:
        """C++ for one launch; `inputs` are arrays or (dtype, ndim) pairs."""
        inputs = [_Spec(*x) if isinstance(x, tuple) else x for x in inputs]
        source = self.source
        tg_decls = _TG_DECL.findall(source)
        source = _TG_DECL.sub(
            lambda m: f"{m[1]}* {m[2]} = ({m[1]}*)df_emu_tg_memory(sizeof({m[1]}) * ({m[3]}));",
            source,
        )
        attrs = [a for a in _ATTRIBUTES if a in self.source]
        params = []
        for name, arr in zip(self.input_names, inputs):
            ctype = _TYPE[arr.dtype][0]
            params.append(f"const {ctype}{'*' if arr.ndim else '&'} {name}")
            if arr.ndim > 0:
                if f"{name}_shape" in self.source:
                    params.append(f"const int* {name}_shape")
                if f"{name}_strides" in self.source:
                    params.append(f"const int64_t* {name}_strides")
                if f"{name}_ndim" in self.source:
                    params.append(f"const int& {name}_ndim")
        for name, dtype in zip(self.output_names, output_dtypes):
            params.append(f"{_TYPE[dtype][0]}* {name}")
        params += [f"{_ATTRIBUTES[a]} {a}" for a in attrs]
        tparams = ", ".join(f"{_template_kind(v)} {n}" for n, v in template)
        targs = ", ".join(_render_template_value(v) for _, v in template)

        lines = ["#include <cstdint>", "#include <cstdio>", "#include <cstring>"]
        lines += ["#include <cmath>", "#include <vector>", "#include <sys/mman.h>"]
        lines += ["#include <unistd.h>"]
        lines.append('#include "metal_emu.h"')
        lines.append(
            "using namespace metal;  // as MLX's Metal utilities, prepended to every kernel"
        )
        lines.append(_MAIN)
        if self.async_hooks:
            lines.append(_ASYNC_HOOKS)
        lines.append(self.header)
        if template:
            lines.append(f"template <{tparams}>")
        lines.append(f"void kernel_{self.name}(\n    " + ",\n    ".join(params) + ") {")
        lines.append(source)
        lines.append("}")

        # The launcher: arguments arrive through globals filled by main().
        args, globals_ = [], []
        for i, (name, arr) in enumerate(zip(self.input_names, inputs)):
            ctype = _TYPE[arr.dtype][0]
            globals_.append(f"const {ctype}* g_in{i};")
            args.append(f"g_in{i}" if arr.ndim else f"*g_in{i}")
            if arr.ndim > 0:
                globals_.append(
                    f"int g_in{i}_shape[8]; int64_t g_in{i}_strides[8]; int g_in{i}_ndim;"
                )
                if f"{name}_shape" in self.source:
                    args.append(f"g_in{i}_shape")
                if f"{name}_strides" in self.source:
                    args.append(f"g_in{i}_strides")
                if f"{name}_ndim" in self.source:
                    args.append(f"g_in{i}_ndim")
        for i, dtype in enumerate(output_dtypes):
            globals_.append(f"{_TYPE[dtype][0]}* g_out{i};")
            args.append(f"g_out{i}")
        for a in attrs:
            args.append(f"attr_{a}(tid)")
        lines += globals_
        lines.append(_ATTR_FUNCS)
        lines.append("static void df_emu_body(unsigned tid) {")
        call = f"kernel_{self.name}<{targs}>" if template else f"kernel_{self.name}"
        lines.append(f"  {call}({', '.join(args)});")
        lines.append("}")
        lines.append(self._main(inputs, output_dtypes, bool(tg_decls)))
        return "\n".join(lines)

    def _main(self, inputs, output_dtypes, has_tg_memory) -> str:
        body = [
            "int main(int argc, char** argv) {",
            "  using namespace df_emu_host;",
            '  if (argc != 2) df_emu::fail("usage: prog request");',
            '  FILE* rq = std::fopen(argv[1], "r");',
            '  if (!rq) df_emu::fail("cannot open the request");',
            "  char path[4096];",
            (
                '  if (std::fscanf(rq, "%u %u %u %u %u %u", &g_grid[0], &g_grid[1], &g_grid[2],'
                ' &g_tg[0], &g_tg[1], &g_tg[2]) != 6) df_emu::fail("bad request");'
            ),
        ]
        for i, arr in enumerate(inputs):
            body += [
                "  {",
                "    size_t elems, offset; int ndim;",
                (
                    '    if (std::fscanf(rq, "%zu %zu %d", &elems, &offset, &ndim) != 3)'
                    ' df_emu::fail("bad input");'
                ),
                "    for (int d = 0; d < ndim; ++d) {",
                "      long long sh, st;",
                '      if (std::fscanf(rq, "%lld %lld", &sh, &st) != 2) df_emu::fail("bad dims");',
            ]
            if arr.ndim > 0:
                body += [
                    f"      g_in{i}_shape[d] = int(sh); g_in{i}_strides[d] = int64_t(st);",
                ]
            body += [
                "    }",
            ]
            if arr.ndim > 0:
                body.append(f"    g_in{i}_ndim = ndim;")
            body += [
                '    if (std::fscanf(rq, "%4095s", path) != 1) df_emu::fail("bad path");',
                f"    const size_t isz = sizeof(*g_in{i});",
                "    Buffer b = alloc_guarded(elems * isz, 0xff);",
                "    read_file(path, b.data, elems * isz);",
                f"    g_in{i} = reinterpret_cast<decltype(g_in{i})>(b.data) + offset;",
                "  }",
            ]
        for i in range(len(output_dtypes)):
            body += [
                "  {",
                "    size_t elems;",
                '    if (std::fscanf(rq, "%zu", &elems) != 1) df_emu::fail("bad output");',
                f"    Buffer b = alloc_guarded(elems * sizeof(*g_out{i}), 0xff);",
                f"    g_out{i} = reinterpret_cast<decltype(g_out{i})>(b.data);",
                "  }",
            ]
        body += self._group_loop()
        for i in range(len(output_dtypes)):
            body += [
                "  {",
                "    size_t elems;",
                (
                    '    if (std::fscanf(rq, "%zu %4095s", &elems, path) != 2)'
                    ' df_emu::fail("bad output path");'
                ),
                f"    write_file(path, g_out{i}, elems * sizeof(*g_out{i}));",
                "  }",
            ]
        body += ["  return 0;", "}"]
        return "\n".join(body)

    def _group_loop(self) -> list[str]:
        """Metal's dispatch_threads: the last threadgroup along x may be partial."""
        return [
            (
                "  const unsigned ng[3] = {(g_grid[0] + g_tg[0] - 1) / g_tg[0],"
                " (g_grid[1] + g_tg[1] - 1) / g_tg[1], (g_grid[2] + g_tg[2] - 1) / g_tg[2]};"
            ),
            "  for (unsigned z = 0; z < ng[2]; ++z)",
            "    for (unsigned y = 0; y < ng[1]; ++y)",
            "      for (unsigned x = 0; x < ng[0]; ++x) {",
            "        g_group[0] = x; g_group[1] = y; g_group[2] = z;",
            "        // Metal's non-uniform threadgroups: the last one in a dimension is partial.",
            "        unsigned n[3];",
            "        for (int d = 0; d < 3; ++d) {",
            "          const unsigned start = g_group[d] * g_tg[d];",
            "          n[d] = g_grid[d] - start < g_tg[d] ? g_grid[d] - start : g_tg[d];",
            "        }",
            "        if (n[1] != g_tg[1] || n[2] != g_tg[2] || (g_tg[1] * g_tg[2] != 1 && n[0] != g_tg[0]))",
            '          df_emu::fail("partial threadgroups are emulated along x only");',
            "        g_n_in_group = n[0] * n[1] * n[2];",
            "        g_smem_given = false;",
            "        df_emu::run_group(g_n_in_group, df_emu_body);",
            "      }",
        ]

    # -- build and run --
    def build(self, inputs, template, output_dtypes) -> Path:
        """Compile (or find) the program for these input kinds and template values."""
        return self._build(self.generate(inputs, list(template), output_dtypes))

    def _build(self, code: str) -> Path:
        emu = b"".join(p.read_bytes() for p in sorted(HERE.glob("*.h")))
        digest = hashlib.sha1(code.encode() + emu).hexdigest()[:20]
        exe = self.build_dir / f"{self.name}_{digest}"
        if exe.exists():
            return exe
        self.build_dir.mkdir(parents=True, exist_ok=True)
        src = self.build_dir / f"{self.name}_{digest}.cpp"
        src.write_text(code)
        tmp = exe.with_suffix(f".tmp{os.getpid()}")
        cmd = [
            self.compiler,
            "-std=c++17",
            "-O1",
            "-w",
            "-I",
            str(HERE / "include"),
            "-I",
            str(HERE),
        ]
        cmd += [str(src), "-o", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"emulator build failed:\n{proc.stderr[-6000:]}")
        os.replace(tmp, exe)
        return exe

    def __call__(
        self,
        *,
        inputs,
        template=(),
        grid,
        threadgroup,
        output_shapes,
        output_dtypes,
        init_value=None,
        verbose=False,
        stream=None,
    ):
        if init_value is not None and not np.isnan(init_value):
            raise NotImplementedError(
                "outputs always start as NaN here; other fills are not emulated"
            )
        template = list(template)
        code = self.generate(inputs, template, output_dtypes)
        exe = self._build(code)
        work = Path(tempfile.mkdtemp(dir=self.build_dir))
        try:
            lines = [" ".join(map(str, (*grid, *threadgroup)))]
            for name, arr in zip(self.input_names, inputs):
                host = np.array(arr.view(mx.uint16) if arr.dtype == mx.bfloat16 else arr)
                if self.layout is not None and host.ndim > 0:
                    buf, offset, strides = self.layout(name, host)
                else:
                    buf, offset, strides = np.ascontiguousarray(host).ravel(), 0, None
                    strides = [int(s // host.itemsize) for s in np.ascontiguousarray(host).strides]
                path = work / f"in_{name}"
                np.ascontiguousarray(buf).tofile(path)
                dims = " ".join(f"{d} {s}" for d, s in zip(host.shape, strides))
                lines.append(f"{buf.size} {offset} {host.ndim} {dims} {path}")
            sizes = [int(np.prod(s)) for s in output_shapes]
            for n in sizes:
                lines.append(str(n))
            for i, n in enumerate(sizes):
                lines.append(f"{n} {work / f'out_{i}'}")
            request = work / "request"
            request.write_text("\n".join(lines) + "\n")
            proc = subprocess.run(
                [str(exe), str(request)], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                raise RuntimeError(
                    f"emulated kernel {self.name} failed (exit {proc.returncode}): {proc.stderr}"
                )
            outs = []
            for i, (shape, dtype) in enumerate(zip(output_shapes, output_dtypes)):
                data = np.fromfile(work / f"out_{i}", dtype=_TYPE[dtype][1]).reshape(shape)
                arr = mx.array(data)
                outs.append(arr.view(mx.bfloat16) if dtype == mx.bfloat16 else arr)
            return outs
        finally:
            shutil.rmtree(work, ignore_errors=True)


_ATTR_FUNCS = r"""
static inline uint3 df_u3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }
static inline uint3 df_local(unsigned tid) {
  using namespace df_emu_host;
  return df_u3(tid % g_tg[0], (tid / g_tg[0]) % g_tg[1], tid / (g_tg[0] * g_tg[1]));
}
static inline uint attr_thread_index_in_threadgroup(unsigned tid) { return tid; }
static inline uint attr_thread_index_in_simdgroup(unsigned tid) { return tid % 32; }
static inline uint attr_simdgroup_index_in_threadgroup(unsigned tid) { return tid / 32; }
static inline uint attr_threads_per_simdgroup(unsigned) { return 32; }
static inline uint attr_thread_execution_width(unsigned) { return 32; }
static inline uint attr_simdgroups_per_threadgroup(unsigned) {
  return (df_emu_host::g_n_in_group + 31) / 32;
}
static inline uint3 attr_thread_position_in_threadgroup(unsigned tid) { return df_local(tid); }
static inline uint3 attr_threadgroup_position_in_grid(unsigned) {
  using namespace df_emu_host;
  return df_u3(g_group[0], g_group[1], g_group[2]);
}
static inline uint3 attr_thread_position_in_grid(unsigned tid) {
  using namespace df_emu_host;
  uint3 l = df_local(tid);
  return df_u3(g_group[0] * g_tg[0] + l.x, g_group[1] * g_tg[1] + l.y, g_group[2] * g_tg[2] + l.z);
}
static inline uint3 attr_threads_per_threadgroup(unsigned) {
  using namespace df_emu_host;
  return df_u3(g_tg[0], g_tg[1], g_tg[2]);
}
static inline uint3 attr_threadgroups_per_grid(unsigned) {
  using namespace df_emu_host;
  return df_u3((g_grid[0] + g_tg[0] - 1) / g_tg[0], (g_grid[1] + g_tg[1] - 1) / g_tg[1],
               (g_grid[2] + g_tg[2] - 1) / g_tg[2]);
}
static inline uint3 attr_threads_per_grid(unsigned) {
  using namespace df_emu_host;
  return df_u3(g_grid[0], g_grid[1], g_grid[2]);
}
"""


def factory(build_dir: Path, **options) -> Callable:
    """A kernel factory for dflash_mlx.kernels.attention.use_backend('metal', ...)."""

    def make(name, input_names, output_names, source, header, shared_memory):
        return EmulatedMetalKernel(
            name, input_names, output_names, source, header, build_dir=build_dir, **options
        )

    return make


# ---------------------------------------------------------------------------- CUDA

_CUDA_TYPE = {
    mx.float32: "float",
    mx.float16: "__half",
    mx.bfloat16: "__nv_bfloat16",
    mx.int32: "int32_t",
    mx.uint32: "uint32_t",
}

# `extern __shared__ [__align__(n)] T name[];`: the block's dynamic shared memory.
_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w ]+?)\s+(\w+)\s*\[\s*\]\s*;"
)

_MAX_DYNAMIC_SMEM = 227 * 1024  # sm_90's opt-in limit per block


class EmulatedCudaKernel(EmulatedMetalKernel):
    """mx.fast.cuda_kernel's interface, run by the CPU emulator (cuda_emu.h).

    The program mirrors mlx/backend/cuda/custom_kernel.cpp's: the header, then in
    namespace mlx::core::cu a kernel taking the inputs (const T*), their shape /
    strides / ndim by value where the source names them, and the outputs; template
    arguments become `constexpr` constants and `using` aliases ahead of the source.
    The grid is rounded up to whole blocks of min(threadgroup, grid) threads, as MLX
    launches it.
    """

    def __init__(
        self,
        name,
        input_names,
        output_names,
        source,
        header="",
        *,
        shared_memory: int = 0,
        build_dir: Path,
        layout: Callable | None = None,
        compiler: str = "g++",
    ):
        super().__init__(
            name,
            input_names,
            output_names,
            source,
            header,
            build_dir=build_dir,
            async_hooks=False,
            layout=layout,
            compiler=compiler,
        )
        self.shared_memory = shared_memory

    def generate(self, inputs, template, output_dtypes) -> str:
        inputs = [_Spec(*x) if isinstance(x, tuple) else x for x in inputs]
        if self.shared_memory > _MAX_DYNAMIC_SMEM:
            raise ValueError(f"{self.shared_memory} bytes of dynamic shared memory")
        source = _EXTERN_SHARED.sub(
            lambda m: f"{m[1]}* {m[2]} = ({m[1]}*)df_emu_cuda::g_smem;", self.source
        )
        params, args, globals_ = [], [], []
        for i, (name, arr) in enumerate(zip(self.input_names, inputs)):
            ctype = _CUDA_TYPE[arr.dtype]
            params.append(f"const {ctype}* {name}")
            globals_.append(f"const {ctype}* g_in{i};")
            args.append(f"g_in{i}")
            globals_.append(f"int g_in{i}_shape[8]; int64_t g_in{i}_strides[8]; int g_in{i}_ndim;")
            if arr.ndim > 0:
                if f"{name}_shape" in self.source:
                    params.append(f"const Shape {name}_shape")
                    args.append(f"df_shape(g_in{i}_shape, g_in{i}_ndim)")
                if f"{name}_strides" in self.source:
                    params.append(f"const Strides {name}_strides")
                    args.append(f"df_strides(g_in{i}_strides, g_in{i}_ndim)")
                if f"{name}_ndim" in self.source:
                    params.append(f"const int {name}_ndim")
                    args.append(f"g_in{i}_ndim")
        for i, (name, dtype) in enumerate(zip(self.output_names, output_dtypes)):
            params.append(f"{_CUDA_TYPE[dtype]}* {name}")
            globals_.append(f"{_CUDA_TYPE[dtype]}* g_out{i};")
            args.append(f"g_out{i}")
        constants = []
        for n, v in template:
            if isinstance(v, bool):
                constants.append(f"  constexpr bool {n} = {'true' if v else 'false'};")
            elif isinstance(v, int):
                constants.append(f"  constexpr int {n} = {v};")
            else:
                constants.append(f"  using {n} = {_CUDA_TYPE[v]};")
        lines = ["#include <cstdint>", "#include <cstdio>", "#include <cstring>"]
        lines += ["#include <cmath>", "#include <vector>", "#include <sys/mman.h>"]
        lines += ["#include <unistd.h>", '#include "cuda_emu.h"', _MAIN, self.header]
        lines.append("namespace mlx::core::cu {")
        lines.append(f"void kernel_{self.name}(\n    " + ",\n    ".join(params) + ") {")
        lines += constants
        lines.append(source)
        lines.append("}\n}  // namespace mlx::core::cu")
        lines += globals_
        lines.append(
            "static mlx::core::cu::Shape df_shape(const int* s, int n) {\n"
            "  mlx::core::cu::Shape r{}; for (int i = 0; i < n; ++i) r.v[i] = s[i]; return r;\n}\n"
            "static mlx::core::cu::Strides df_strides(const int64_t* s, int n) {\n"
            "  mlx::core::cu::Strides r{}; for (int i = 0; i < n; ++i) r.v[i] = s[i]; return r;\n}"
        )
        lines.append(f"static const size_t df_dyn_smem = {int(self.shared_memory)};")
        lines.append("static void df_emu_body(unsigned tid) {")
        lines.append(f"  mlx::core::cu::kernel_{self.name}({', '.join(args)});")
        lines.append("}")
        lines.append(self._main(inputs, output_dtypes, False))
        return "\n".join(lines)

    def _group_loop(self) -> list[str]:
        return [
            "  unsigned bd[3], nb[3];",
            "  for (int d = 0; d < 3; ++d) {",
            "    bd[d] = g_tg[d] < g_grid[d] ? g_tg[d] : g_grid[d];",
            "    nb[d] = (g_grid[d] + g_tg[d] - 1) / g_tg[d];",
            "  }",
            '  if (bd[0] * bd[1] * bd[2] > 1024) df_emu::fail("more than 1024 threads per block");',
            "  df_emu_cuda::g_block_dim = df_dim3{bd[0], bd[1], bd[2]};",
            "  df_emu_cuda::g_grid_dim = df_dim3{nb[0], nb[1], nb[2]};",
            "  Buffer smem = alloc_guarded(df_dyn_smem ? df_dyn_smem : 16, 0xff);",
            "  for (unsigned z = 0; z < nb[2]; ++z)",
            "    for (unsigned y = 0; y < nb[1]; ++y)",
            "      for (unsigned x = 0; x < nb[0]; ++x) {",
            "        df_emu_cuda::g_block_idx = df_dim3{x, y, z};",
            "        std::memset(smem.data, 0xff, smem.bytes);  // NaN in every float type",
            "        df_emu_cuda::g_smem = smem.data;",
            "        df_emu_cuda::g_smem_bytes = df_dyn_smem;",
            "        df_emu::run_group(bd[0] * bd[1] * bd[2], df_emu_body);",
            "      }",
        ]


def cuda_factory(build_dir: Path, **options) -> Callable:
    """A kernel factory for use_backend('cuda', ...): mx.fast.cuda_kernel, emulated."""

    def make(name, input_names, output_names, source, header, shared_memory):
        return EmulatedCudaKernel(
            name,
            input_names,
            output_names,
            source,
            header,
            shared_memory=shared_memory,
            build_dir=build_dir,
            **options,
        )

    return make
