"""Parse the `config.json` of published DFlash draft checkpoints into one dataclass."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A draft config.json is missing a field or contradicts itself."""


def build_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The paper's default: draft layers tap target layers spread evenly over 1 … N-3."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    span = end - start
    return [round(start + i * span / (num_draft_layers - 1)) for i in range(num_draft_layers)]


@dataclass
class DraftConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    block_size: int
    mask_token_id: int
    target_layer_ids: list[int]
    num_target_layers: int
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    max_position_embeddings: int = 40960
    rope_theta: float = 1000000.0
    rope_scaling: dict | None = None
    layer_types: list[str] = field(default_factory=list)
    sliding_window: int | None = None
    quantization: dict | None = None

    @property
    def num_taps(self) -> int:
        return len(self.target_layer_ids)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DraftConfig:
        def need(key: str, where: dict = raw, name: str | None = None):
            if key not in where or where[key] is None:
                raise ConfigError(f"draft config is missing '{name or key}'")
            return where[key]

        archs = raw.get("architectures")
        if archs is not None and not any("DFlash" in a for a in archs):
            raise ConfigError(f"draft config 'architectures' is {archs}: not a DFlash draft model")
        dflash = raw.get("dflash_config") or {}
        if not isinstance(dflash, dict):
            raise ConfigError("draft config 'dflash_config' must be an object")

        # block_size sits at the top level in older drafts, in dflash_config in newer ones.
        top, nested = raw.get("block_size"), dflash.get("block_size")
        if top is not None and nested is not None and int(top) != int(nested):
            raise ConfigError(
                f"draft config 'block_size' ({top}) contradicts "
                f"'dflash_config.block_size' ({nested})"
            )
        block_size = top if top is not None else nested
        if block_size is None:
            raise ConfigError(
                "draft config is missing 'block_size' (top level or in dflash_config)"
            )
        mask_token_id = need("mask_token_id", dflash, "dflash_config.mask_token_id")

        hidden_size = int(need("hidden_size"))
        num_heads = int(need("num_attention_heads"))
        num_layers = int(need("num_hidden_layers"))
        num_target_layers = int(need("num_target_layers"))
        layer_ids = dflash.get("target_layer_ids")
        if layer_ids is None:
            layer_ids = build_target_layer_ids(num_target_layers, num_layers)
        layer_ids = [int(i) for i in layer_ids]
        bad = [i for i in layer_ids if not 0 <= i < num_target_layers]
        if bad:
            raise ConfigError(
                f"draft config 'dflash_config.target_layer_ids' {bad} out of range "
                f"for num_target_layers={num_target_layers}"
            )

        # Rope: flat rope_theta + rope_scaling, or transformers>=5 nested rope_parameters.
        rope_params = raw.get("rope_parameters")
        rope_scaling = raw.get("rope_scaling")
        rope_theta = raw.get("rope_theta")
        if rope_params:
            rope_params = dict(rope_params)
            nested_theta = rope_params.pop("rope_theta", None)
            if (
                rope_theta is not None
                and nested_theta is not None
                and float(rope_theta) != float(nested_theta)
            ):
                raise ConfigError(
                    f"draft config 'rope_theta' ({rope_theta}) contradicts "
                    f"'rope_parameters.rope_theta' ({nested_theta})"
                )
            rope_theta = rope_theta if rope_theta is not None else nested_theta
            if rope_scaling is None:
                rope_scaling = rope_params
        if rope_theta is None:
            raise ConfigError(
                "draft config is missing 'rope_theta' (top level or in rope_parameters)"
            )
        rope_scaling = _normalise_rope_scaling(rope_scaling)

        layer_types = raw.get("layer_types") or ["full_attention"] * num_layers
        if len(layer_types) != num_layers:
            raise ConfigError(
                f"draft config 'layer_types' has {len(layer_types)} entries "
                f"for num_hidden_layers={num_layers}"
            )
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ConfigError(f"draft config 'layer_types' has unknown kinds {unknown}")
        sliding_window = raw.get("sliding_window")
        if "sliding_attention" in layer_types:
            if not sliding_window or int(sliding_window) <= 0:
                raise ConfigError(
                    "draft config has 'sliding_attention' layers but no positive 'sliding_window'"
                )
            sliding_window = int(sliding_window)
        else:
            sliding_window = None

        head_dim = raw.get("head_dim") or hidden_size // num_heads
        return cls(
            hidden_size=hidden_size,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            vocab_size=int(need("vocab_size")),
            block_size=int(block_size),
            mask_token_id=int(mask_token_id),
            target_layer_ids=layer_ids,
            num_target_layers=num_target_layers,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            attention_bias=bool(raw.get("attention_bias", False)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 40960)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            layer_types=list(layer_types),
            sliding_window=sliding_window,
            quantization=raw.get("quantization"),
        )

    def to_dict(self) -> dict[str, Any]:
        """The HF layout published drafts use (so the PyTorch side reads it too)."""
        d = asdict(self)
        d["architectures"] = ["DFlashDraftModel"]
        d["model_type"] = "qwen3"
        d["dflash_config"] = {
            "mask_token_id": d.pop("mask_token_id"),
            "target_layer_ids": d.pop("target_layer_ids"),
            "block_size": d["block_size"],
        }
        if d["quantization"] is None:
            d.pop("quantization")
        return d


def _normalise_rope_scaling(scaling: dict | None) -> dict | None:
    if not scaling:
        return None
    scaling = dict(scaling)
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    scaling.pop("rope_type", None)
    scaling["type"] = kind
    if scaling.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("draft config: partial rotary embeddings are not supported")
    if kind == "default" and set(scaling) == {"type"}:
        return None
    if kind not in ("default", "linear", "llama3", "yarn", "dynamic"):
        raise ConfigError(f"draft config 'rope_scaling' type '{kind}' is not supported")
    if kind in ("linear", "llama3", "yarn", "dynamic") and "factor" not in scaling:
        raise ConfigError(f"draft config 'rope_scaling' ({kind}) is missing 'factor'")
    return scaling


def load_config(path: str | Path) -> DraftConfig:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise ConfigError(f"no config.json in {path}")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from e
    return DraftConfig.from_dict(raw)
