"""Tiny random DFlash drafts written in the published HF format.

Config styles, as the published drafts write them:
- "qwen3_b16": Qwen3-8B-DFlash-b16 style: block_size at the top level, flat rope_theta,
  all full attention.
- "qwen35": Qwen3.5/3.6 style: block_size inside dflash_config, layer_types mixing
  sliding_attention and full_attention with a sliding_window shorter than the test
  context, yarn RoPE in nested rope_parameters (transformers 5 layout).
- "llama31": LLaMA-3.1-8B-Instruct style: rope_scaling llama3, rope_theta 500000.
And two newer ones:
- "dflash2": Qwen3.8-27B-DFlash2 style (architectures ["DFlash2DraftModel"]): every
  layer sliding, is_causal false, the DFlash 2 fields in dflash_config, the codebooks
  stored bare, as z-lab's DFlash2DraftModel checkpoints hold them (tiny vocab 512).
- "gemma4": gemma-4-31B-it-DFlash style DFlash draft: final_logit_softcapping 30, mixed
  sliding/full layers, plus input_embedding_scale and output_multiplier (tiny vocab).

Mask ids: by default each style keeps its real mask id and real vocab_size (151669 /
151936, 248070 / 248320, 128002 / 128256). The draft has no embedding or head, so the
vocabulary size costs nothing here; a test that pairs the draft with a tiny target
overrides vocab_size and mask_token_id (mask id < vocab, e.g. vocab-1).

Weights: Linear ~ N(0, 1/fan_in) (activations keep unit scale through the layers),
RMSNorm weights 1 + 0.1·N(0, 1), never zeros. Written bf16 by default, as published.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from .model import make_reference

_COMMON = {
    "architectures": ["DFlashDraftModel"],
    "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
    "model_type": "qwen3",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1",
    "use_cache": True,
}

STYLES: dict[str, dict] = {
    "qwen3_b16": {
        "block_size": 16,
        "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33]},
        "num_target_layers": 36,
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000,
        "rope_scaling": None,
        "sliding_window": None,
        "use_sliding_window": False,
        "max_window_layers": 2,
        "vocab_size": 151936,
    },
    "qwen35": {
        "dflash_config": {
            "block_size": 8,
            "mask_token_id": 248070,
            "target_layer_ids": [1, 10, 19, 28],
        },
        "num_target_layers": 32,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,  # heads * head_dim != hidden_size, as in Qwen3
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 131072,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "sliding_window": 12,
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 10000000,
            "factor": 4.0,
            "original_max_position_embeddings": 32768,
        },
        "vocab_size": 248320,
    },
    # Qwen3.8-27B-DFlash2 style (z-lab's DFlash 2): every layer sliding, is_causal false,
    # conv kernel 2 over groups of 16 channels, selector rank 256 / top-16 (tiny here).
    "dflash2": {
        "architectures": ["DFlash2DraftModel"],
        "auto_map": {"AutoModel": "dflash.DFlash2DraftModel"},
        "dflash_config": {
            "block_size": 8,
            "mask_token_id": 500,
            "target_layer_ids": [5, 19, 33, 47, 61],
            "conv_kernel_size": 2,
            "conv_group_size": 16,
            "selector_rank": 8,
            "selector_top_k": 6,
        },
        "is_causal": False,
        "num_target_layers": 64,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 262144,
        "layer_types": ["sliding_attention", "sliding_attention"],
        "sliding_window": 12,
        "rope_theta": 10000000,
        "vocab_size": 512,
    },
    # Gemma-4-31B-it-DFlash style: a DFlash draft with final_logit_softcapping 30,
    # sliding and full layers; plus an embedding scale and output multiplier.
    "gemma4": {
        "dflash_config": {
            "block_size": 16,
            "mask_token_id": 4,
            "target_layer_ids": [1, 12, 23, 35, 46, 57],
            "final_logit_softcapping": 30.0,
            "input_embedding_scale": 0.5,
            "output_multiplier": 1.5,
        },
        "num_target_layers": 60,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 262144,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "sliding_window": 12,
        "rope_theta": 1000000,
        "vocab_size": 512,
    },
    "llama31": {
        "block_size": 10,
        "dflash_config": {"mask_token_id": 128002, "target_layer_ids": [1, 8, 15, 22, 29]},
        "num_target_layers": 32,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "vocab_size": 128256,
    },
}


def _merge(base: dict, changes: dict) -> dict:
    """Nested update; a None value deletes the key."""
    out = copy.deepcopy(base)
    for k, v in changes.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def draft_config(style: str, **overrides) -> dict:
    """The config.json dict of a style; keyword overrides merge (None deletes)."""
    return _merge({**_COMMON, **STYLES[style]}, overrides)


def random_state_dict(
    config: dict, seed: int = 0, residual_scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """residual_scale multiplies o_proj and down_proj: how much each layer writes into
    the residual stream (small: the draft mostly echoes its input embeddings)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in make_reference(config).state_dict().items():
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * noise
        elif name.endswith("base_kernel"):  # tap 0 near identity, the others small
            state[name] = 0.3 * noise
            state[name][:, 0] += 1.0
        elif name.endswith("_codebook"):
            state[name] = noise
        elif name.endswith("kernel_projection.weight"):
            state[name] = 0.3 * noise / p.shape[1] ** 0.5
        elif p.ndim == 2:
            scale = residual_scale if name.endswith(("o_proj.weight", "down_proj.weight")) else 1
            state[name] = scale * noise / p.shape[1] ** 0.5
        else:  # biases
            state[name] = 0.02 * noise
    return state


def write_checkpoint(
    path: str | Path,
    style: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 1,
    fmt: str = "safetensors",
    residual_scale: float = 1.0,
    **overrides,
) -> Path:
    """Write config.json + weights: one model.safetensors, `shards` files with
    model.safetensors.index.json, or (fmt="bin") a torch pytorch_model.bin."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = draft_config(style, **overrides)
    state = {
        k: v.to(dtype).contiguous()
        for k, v in random_state_dict(config, seed, residual_scale).items()
    }
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if fmt == "bin":
        torch.save(state, path / "pytorch_model.bin")
    elif shards == 1:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = sorted(state)
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: state[k] for k in names[i::shards]}
            save_file(part, str(path / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path
