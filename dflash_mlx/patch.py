"""The one way dflash_mlx hooks into an mlx-lm target, and its undo.

Two kinds of hook, both installed through a `Patches` object and undone by its
`restore()` (the verify session calls it on exit, also after an exception):

- `hook_call(instance, hook)`: this module *instance* (not its class, not other
  instances) runs `hook(call, instance, *args, **kwargs)` instead of its `__call__`,
  where `call` is the class's original (unbound) `__call__`. Done by swapping the instance's class for a
  subclass, so nothing global changes.
- `route(py_module, name, router)`: the function `name` that mlx-lm model code calls
  from its own module namespace (`scaled_dot_product_attention`,
  `gated_delta_update`) is replaced by `router(original, *args, **kwargs)`. Module
  globals are shared by every model of that family in the process, so routes are
  reference-counted per (module, name), and a router must pass calls that are not
  its session's straight to `original` (routers check a context variable).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

from mlx import nn

Hook = Callable[..., Any]

_HOOKED_CLASSES: dict[type, type] = {}
_lock = threading.RLock()
_routes: dict[tuple[str, str], list] = {}  # (module, name) -> [module, original, router, count]


def _hooked_class(cls: type) -> type:
    if cls not in _HOOKED_CLASSES:
        call = cls.__call__

        def __call__(self, *args, **kwargs):
            return self._dflash_hook(call, self, *args, **kwargs)

        _HOOKED_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": __call__})
    return _HOOKED_CLASSES[cls]


def unhooked_type(instance: Any) -> type:
    """The class of `instance` before any `hook_call` (hooking swaps in a subclass)."""
    cls = type(instance)
    return cls.__bases__[0] if _HOOKED_CLASSES.get(cls.__bases__[0]) is cls else cls


def original_function(fn: Callable) -> Callable:
    """The function a route replaced (or `fn` itself)."""
    return getattr(fn, "__dflash_original__", fn)


class Patches:
    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def hook_call(self, instance: nn.Module, hook: Hook) -> Callable[[], None]:
        """Hook `instance`; returns a function that undoes just this hook early. A hook on
        an instance hooked already wraps the earlier hook (undo them in reverse order)."""
        earlier = instance.__dict__.get("_dflash_hook")
        original = type(instance)
        if earlier is None:
            object.__setattr__(instance, "_dflash_hook", hook)
            instance.__class__ = _hooked_class(original)
        else:

            def outer(call, inst, *args, **kwargs):
                return hook(lambda i, *a, **k: earlier(call, i, *a, **k), inst, *args, **kwargs)

            object.__setattr__(instance, "_dflash_hook", outer)

        def undo() -> None:
            if earlier is None:
                instance.__class__ = original
                object.__delattr__(instance, "_dflash_hook")
            else:
                object.__setattr__(instance, "_dflash_hook", earlier)

        self._undo.append(undo)
        return lambda: self._undo.remove(undo) or undo()

    def route(self, module: ModuleType, name: str, make_router: Callable[[Callable], Callable]):
        """Route `module.name` through `make_router(original)` (one router per module/name:
        the first session's router serves every later one too, so routers must be
        stateless apart from context variables)."""
        key = (module.__name__, name)
        with _lock:
            entry = _routes.get(key)
            if entry is None:
                original = getattr(module, name)
                router = make_router(original)
                router.__dflash_original__ = original
                setattr(module, name, router)
                entry = _routes[key] = [module, original, router, 0]
            entry[3] += 1

        def undo() -> None:
            with _lock:
                entry[3] -= 1
                if entry[3] == 0:
                    setattr(entry[0], name, entry[1])
                    del _routes[key]

        self._undo.append(undo)

    def defer(self, undo: Callable[[], None]) -> None:
        """Run `undo` at restore (state that lives as long as the hooks)."""
        self._undo.append(undo)

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()
