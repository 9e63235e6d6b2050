"""ParoQuant targets: z-lab's INT4 checkpoints (learned pairwise rotations before each
quantized linear), loaded through paroquant's MLX loader (`pip install 'dflash-mlx[paro]'`)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx import nn


def is_paro(model_dir: Path) -> bool:
    """paroquant's converter writes quant_method "paroquant" into config.json."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    quant = config.get("quantization_config") or (config.get("text_config") or {}).get(
        "quantization_config"
    )
    return isinstance(quant, dict) and str(quant.get("quant_method")).lower() == "paroquant"


def load(
    path_or_hf_repo: str,
    lazy: bool = False,
    tokenizer_config: dict | None = None,
    return_config: bool = False,
    revision: str | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, Any] | tuple[nn.Module, Any, dict]:
    """A ParoQuant target as `mlx_lm.load` returns one (model, tokenizer[, config])."""
    from mlx_lm.utils import _download, load_config, load_tokenizer

    try:
        paro_load = importlib.import_module("paroquant.inference.backends.mlx.load")
        paro_layers = importlib.import_module("paroquant.inference.backends.mlx.modules")
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("paroquant"):
            raise
        raise ValueError(
            f"{path_or_hf_repo} is a ParoQuant checkpoint: pip install 'dflash-mlx[paro]'"
        ) from None
    unsupported = [k for k, v in kwargs.items() if v and k != "trust_remote_code"]
    if unsupported:
        raise ValueError(f"{path_or_hf_repo}: a ParoQuant target takes no {', '.join(unsupported)}")
    if not mx.metal.is_available():
        # paroquant's rotation is a Metal kernel, which MLX's CPU and CUDA backends cannot
        # run at all: its layers call the same rotation in plain mlx ops instead.
        if not hasattr(paro_layers, "_apply_rotation"):
            raise ValueError("this paroquant's MLX layers run only on Metal (Apple Silicon)")
        paro_layers._apply_rotation = _rotate
    model_dir = _download(path_or_hf_repo, revision=revision)
    model, _, _ = paro_load.load(str(model_dir), lazy=lazy, force_text=True)
    # The tokenizer as mlx_lm.load makes it: paroquant's ignores tokenizer_config and the
    # config's eos_token_id list.
    config = load_config(model_dir)
    tokenizer = load_tokenizer(
        model_dir, tokenizer_config, eos_token_ids=config.get("eos_token_id", None)
    )
    return (model, tokenizer, config) if return_config else (model, tokenizer)


def _rotate(
    x: mx.array,
    packed_pairs: mx.array,
    cos: mx.array,
    sin: mx.array,
    channel_scales: mx.array,
    dim: int,
    krot: int,
    group_size: int,
) -> mx.array:
    """What paroquant's kernel does to x (rows, dim): scale the channels, then for each
    of the krot rotations turn every channel pair (i, j) of every group by theta:
    (a, b) -> (a cos + b sin, b cos - a sin). packed_pairs holds i | j << 16, i and j
    counted within the group."""
    out = x.astype(mx.float32) * channel_scales.astype(mx.float32)
    offset = mx.repeat(mx.arange(0, dim, group_size), group_size // 2)
    for k in range(krot):
        i = (packed_pairs[k] & 0xFFFF) + offset
        j = (packed_pairs[k] >> 16) + offset
        a, b = out[:, i], out[:, j]
        c, s = cos[k].astype(mx.float32), sin[k].astype(mx.float32)
        turned = mx.concatenate([a * c + b * s, b * c - a * s], axis=-1)
        out = turned[:, mx.argsort(mx.concatenate([i, j]))]
    return out.astype(x.dtype)
