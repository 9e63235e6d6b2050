"""Parse the `config.json` of published DFlash draft checkpoints into one dataclass."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A draft config.json is missing a field or contradicts itself."""


# z-lab's two published draft architectures. DFlash 2 wraps every layer's attention and
# MLP in a grouped dynamic causal convolution and ends in a candidate selector.
DFLASH = "DFlashDraftModel"
DFLASH2 = "DFlash2DraftModel"
ARCHITECTURES = (DFLASH, DFLASH2)
_DFLASH2_FIELDS = ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")


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
    architecture: str = DFLASH
    # Gemma-4-style drafts: logits = softcap(lm_head(h) * output_multiplier); block input
    # = target embedding * the target's own embedding scale * input_embedding_scale.
    final_logit_softcapping: float | None = None
    input_embedding_scale: float = 1.0
    output_multiplier: float = 1.0
    # None: sliding layers causal, full layers bidirectional; True/False: every layer.
    is_causal: bool | None = None
    # DFlash 2 only.
    conv_kernel_size: int | None = None
    conv_group_size: int | None = None
    selector_rank: int | None = None
    selector_top_k: int | None = None
    # True when num_target_layers was not recorded (llama.cpp GGUF drafts) but guessed.
    num_target_layers_inferred: bool = False

    @property
    def num_taps(self) -> int:
        return len(self.target_layer_ids)

    @property
    def is_dflash2(self) -> bool:
        return self.architecture == DFLASH2

    def layer_causal(self, layer_type: str) -> bool:
        """Whether a layer of this kind masks the block causally (as z-lab's runtimes)."""
        if self.is_causal is not None:
            return self.is_causal
        return layer_type == "sliding_attention"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DraftConfig:
        def need(key: str, where: dict = raw, name: str | None = None):
            if key not in where or where[key] is None:
                raise ConfigError(f"draft config is missing '{name or key}'")
            return where[key]

        archs = raw.get("architectures")
        if archs is not None and not any("DFlash" in a for a in archs):
            raise ConfigError(f"draft config 'architectures' is {archs}: not a DFlash draft model")
        architecture = DFLASH
        if archs is not None:
            known = [a for a in archs if a in ARCHITECTURES]
            if not known:
                raise ConfigError(
                    f"draft config 'architectures' is {archs}: supported are {list(ARCHITECTURES)}"
                )
            architecture = known[0]
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
        vocab_size = int(need("vocab_size"))
        extras = _draft_extras(raw, dflash, architecture, hidden_size, vocab_size)
        return cls(
            hidden_size=hidden_size,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            vocab_size=vocab_size,
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
            architecture=architecture,
            num_target_layers_inferred=bool(dflash.get("num_target_layers_inferred", False)),
            **extras,
        )

    def to_dict(self) -> dict[str, Any]:
        """The HF layout published drafts use (so the PyTorch side reads it too)."""
        d = asdict(self)
        d["architectures"] = [d.pop("architecture")]
        d["model_type"] = "qwen3"
        d["dflash_config"] = {
            "mask_token_id": d.pop("mask_token_id"),
            "target_layer_ids": d.pop("target_layer_ids"),
            "block_size": d["block_size"],
        }
        # Where z-lab's configs keep them: dflash_config (is_causal at the top level);
        # written only when set, so DFlash 1 configs stay as they were.
        defaults = {"input_embedding_scale": 1.0, "output_multiplier": 1.0}
        for key in ("final_logit_softcapping", *defaults, *_DFLASH2_FIELDS):
            value = d.pop(key)
            if value is not None and value != defaults.get(key):
                d["dflash_config"][key] = value
        if d.pop("num_target_layers_inferred"):
            d["dflash_config"]["num_target_layers_inferred"] = True
        if d["is_causal"] is None:
            d.pop("is_causal")
        if d["quantization"] is None:
            d.pop("quantization")
        return d


def _draft_extras(
    raw: dict, dflash: dict, architecture: str, hidden_size: int, vocab_size: int
) -> dict[str, Any]:
    """The Gemma-4 and DFlash 2 fields, validated. As z-lab's loaders read them: from
    dflash_config first, then the top level; is_causal from the top level."""

    def value(key: str):
        return dflash[key] if dflash.get(key) is not None else raw.get(key)

    def number(key: str, default: float) -> float:
        v = value(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"draft config '{key}' must be a finite number, got {v!r}")
        if v <= 0:
            raise ConfigError(f"draft config '{key}' must be positive, got {v!r}")
        return float(v)

    softcap = value("final_logit_softcapping")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise ConfigError(
                f"draft config 'final_logit_softcapping' must be a number, got {softcap!r}"
            )
        if not math.isfinite(softcap) or softcap < 0:
            raise ConfigError(
                f"draft config 'final_logit_softcapping' must be >= 0 and finite, got {softcap!r}"
            )
        # z-lab applies the cap only when it is positive.
        softcap = float(softcap) if softcap > 0 else None
    is_causal = raw.get("is_causal")
    if is_causal is not None and not isinstance(is_causal, bool):
        raise ConfigError(
            f"draft config 'is_causal' must be true, false or null, got {is_causal!r}"
        )

    out: dict[str, Any] = {
        "final_logit_softcapping": softcap,
        "input_embedding_scale": number("input_embedding_scale", 1.0),
        "output_multiplier": number("output_multiplier", 1.0),
        "is_causal": is_causal,
    }
    if architecture != DFLASH2:
        return out
    for key in _DFLASH2_FIELDS:
        v = value(key)
        if v is None:
            raise ConfigError(f"DFlash 2 draft config is missing 'dflash_config.{key}'")
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ConfigError(
                f"draft config 'dflash_config.{key}' must be a positive integer, got {v!r}"
            )
        out[key] = v
    if hidden_size % out["conv_group_size"]:
        raise ConfigError(
            f"draft config 'dflash_config.conv_group_size' ({out['conv_group_size']}) "
            f"does not divide hidden_size ({hidden_size})"
        )
    if out["selector_top_k"] > vocab_size:
        raise ConfigError(
            f"draft config 'dflash_config.selector_top_k' ({out['selector_top_k']}) "
            f"exceeds vocab_size ({vocab_size})"
        )
    return out


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
