"""What the custom kernels run on, shared by block attention and the skinny matmul.

A factory builds one kernel: (name, input_names, output_names, source, header,
shared_memory_bytes) -> a callable with mx.fast.metal_kernel's call signature. On an
Apple GPU that is mx.fast.metal_kernel, on an NVIDIA GPU mx.fast.cuda_kernel, and in
the tests the CPU emulator (tests/emulation); on the CPU backend neither kernel runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import cache

import mlx.core as mx

KernelFactory = Callable[..., Callable]


def read_switch(name: str, modes: tuple[str, ...]) -> str:
    """The environment switch `name` (first mode, 'auto', by default), checked."""
    value = os.environ.get(name, modes[0]).strip().lower() or modes[0]
    if value not in modes:
        raise ValueError(f"{name}={value!r}: expected one of {', '.join(modes)}")
    return value


@cache
def mlx_factory(backend: str, row_contiguous: bool = False) -> KernelFactory:
    """MLX's own kernel builder for 'metal' or 'cuda'. row_contiguous: MLX copies
    strided inputs first (else the kernel gets their strides)."""

    def make(name, input_names, output_names, source, header, shared_memory):
        if backend == "metal":
            return mx.fast.metal_kernel(
                name=name,
                input_names=input_names,
                output_names=output_names,
                source=source,
                header=header,
                ensure_row_contiguous=row_contiguous,
            )
        return mx.fast.cuda_kernel(
            name=name,
            input_names=input_names,
            output_names=output_names,
            source=source,
            header=header,
            ensure_row_contiguous=row_contiguous,
            shared_memory=shared_memory,
        )

    return make


def gpu_backend(row_contiguous: bool = False) -> tuple[str, KernelFactory] | None:
    """('metal' | 'cuda', factory) for the default device, or None on the CPU."""
    if mx.default_device() != mx.gpu:
        return None
    if mx.metal.is_available():
        return "metal", mlx_factory("metal", row_contiguous)
    if mx.cuda.is_available():
        return "cuda", mlx_factory("cuda", row_contiguous)
    return None
