"""Load targets (through mlx_lm) and drafts (converted, unconverted, or from the Hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx import nn

from .checkpoint import DTYPES, build, read
from .drafter import DraftModel


def load(path_or_hf_repo: str, **kwargs: Any) -> tuple[nn.Module, Any]:
    """Load a target exactly as `mlx_lm.load` does (same arguments)."""
    from mlx_lm import load as mlx_lm_load

    return mlx_lm_load(path_or_hf_repo, **kwargs)


def load_draft(path_or_hf_repo: str | Path, dtype: str | mx.Dtype | None = None) -> DraftModel:
    """A DFlash draft from a `convert.py` output, an unconverted HF checkpoint, or a Hub id.

    Unconverted checkpoints are validated and converted in memory. Bind it to its target
    with `draft.bind(model)` (generation does this for you).
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype '{dtype}' (choose from {sorted(DTYPES)})")
        dtype = DTYPES[dtype]
    config, weights = read(path_or_hf_repo)
    return build(config, weights, dtype=dtype)
