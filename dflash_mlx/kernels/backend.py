"""What the custom kernels run on, shared by block attention and the skinny matmul.

A factory builds one kernel: (name, input_names, output_names, source, header,
shared_memory_bytes) -> a callable with mx.fast.metal_kernel's call signature. On an
Apple GPU that is mx.fast.metal_kernel, on an NVIDIA GPU mx.fast.cuda_kernel, and in
the tests the CPU emulator (tests/emulation); on the CPU backend neither kernel runs.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache, lru_cache

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


# Kernel parameters repeat from call to call (one per cache length, shape, scale): each
# distinct one is made and evaluated once.
@lru_cache(maxsize=4096)
def constant(values: tuple, dtype: mx.Dtype = mx.int32) -> mx.array:
    """An evaluated small array of `values`."""
    a = mx.array(values, dtype=dtype)
    mx.eval(a)
    return a


@lru_cache(maxsize=8)
def placeholder(dtype: mx.Dtype) -> mx.array:
    """An evaluated 1-element array for a kernel input this call does not read."""
    a = mx.zeros((1,), dtype=dtype)
    mx.eval(a)
    return a


def gpu_backend(row_contiguous: bool = False) -> tuple[str, KernelFactory] | None:
    """('metal' | 'cuda', factory) for the default device, or None on the CPU."""
    if mx.default_device() != mx.gpu:
        return None
    if mx.metal.is_available():
        return "metal", mlx_factory("metal", row_contiguous)
    if mx.cuda.is_available():
        return "cuda", mlx_factory("cuda", row_contiguous)
    return None


class KernelSite:
    """One kernel family's choice of backend: the GPU's, or an override (the tests run
    the CPU emulator through it), and its one fallback warning per process."""

    def __init__(self, row_contiguous: bool):
        self.row_contiguous = row_contiguous
        self.override: tuple[str, KernelFactory] | None = None
        self.warned = False
        self._lock = threading.Lock()
        self._kernels: dict = {}
        self._checked: dict = {}

    def kernel(self, key: tuple, make: Callable[[], Callable]) -> Callable:
        """The kernel for `key` (backend, factory, ...), made by `make()` the first time."""
        with self._lock:
            kern = self._kernels.get(key)
            if kern is None:
                kern = self._kernels[key] = make()
        return kern

    def checked(self, key: tuple, error: Callable[[], float], tolerance: float, what: str) -> bool:
        """Whether the kernel passes its first-use self-check for `key`, run once: `error()`
        runs it on random data and returns its relative error against the stock maths (a
        kernel that does not compile raises there, at its first evaluation). A failure
        warns once, "dflash_mlx {what} ({reason})", and the caller takes the stock path."""
        with self._lock:
            known = self._checked.get(key)
        if known is not None:
            return known
        try:
            err = error()
            ok = math.isfinite(err) and err < tolerance
            reason = f"self-check error {err:.2e}"
        except Exception as e:  # noqa: BLE001 - a compile error surfaces at first evaluation
            ok, reason = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if not ok:
            self.warn_once(f"dflash_mlx {what} ({reason})")
        with self._lock:
            self._checked[key] = ok
        return ok

    @contextmanager
    def use(self, backend: str, factory: KernelFactory) -> Iterator[None]:
        """Run the kernel path through `factory` as if on `backend`."""
        previous, self.override = self.override, (backend, factory)
        try:
            yield
        finally:
            self.override = previous

    def active(self) -> tuple[str, KernelFactory] | None:
        """(backend, factory) the kernel would run on now, or None (CPU)."""
        return self.override if self.override is not None else gpu_backend(self.row_contiguous)

    def warn_once(self, message: str) -> None:
        if not self.warned:
            self.warned = True
            warnings.warn(message, RuntimeWarning, stacklevel=3)
