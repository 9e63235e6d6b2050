"""Read llama.cpp GGUF DFlash drafts (architecture `dflash`) with MLX's own GGUF reader.

llama.cpp's converter (`conversion/qwen.py`, `DFlashModel`, over `Qwen3Model`) writes
the draft under llama.cpp's usual names: `blk.N.attn_q`, …, `fc` for the feature
projection, `enc.output_norm` for `hidden_norm`, `output_norm` for the final norm, and
for DFlash 2 `blk.N.{attn,ffn}_conv_{base,proj}` and `selector_{hidden,predecessor,
successor}`. Norms are stored as they are (no +1 shift). Its metadata: the usual
`dflash.*` hyper-parameters, `dflash.target_layers` = HF target_layer_ids + 1 (they
index transformers' hidden_states, whose entry 0 is the embedding), the mask id as
`tokenizer.ggml.mask_token_id`, `dflash.attention.sliding_window_pattern` (true =
sliding layer), and for DFlash 2 `dflash.{conv_kernel_size, conv_group_size,
selector_rank, selector_top_k}` and `dflash.attention.causal`.

Quantization: MLX reads Q4_0, Q4_1 and Q8_0 as its own affine 4/8-bit quantization
(group 32), so those layers stay quantized; every other quantized type (K-quants,
IQ-quants, …) MLX casts to float16 on load, and this module says so (BF16 also comes
back as float16, exactly for weights in float16's range).

llama.cpp records neither the target's layer count nor, always, the vocabulary size:
the depth is inferred (the paper's default tap spread, else the least the taps allow)
and marked `num_target_layers_inferred`; the vocabulary comes from `dflash.vocab_size`,
the selector's codebooks, or the (padded) tokenizer list.
"""

from __future__ import annotations

import struct
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx

from .config import DFLASH, DFLASH2, DraftConfig, build_target_layer_ids

ARCH = "dflash"

# GGML type ids (gguf-py constants.GGMLQuantizationType) and MLX's handling of them.
GGML_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1",
    10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS",
    17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip
NATIVE_QUANTIZED = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
FLOAT_TYPES = {"F32", "F16", "BF16"}
GGUF_GROUP_SIZE = 32  # the block size of Q4_0 / Q4_1 / Q8_0

_TOP = {
    "fc": "fc",
    "enc.output_norm": "hidden_norm",
    "output_norm": "norm",
    "selector_hidden": "candidate_selector.hidden_projection",
    # The codebooks are bare tensors in our (and z-lab's) checkpoints.
    "selector_predecessor": "candidate_selector.predecessor_codebook",
    "selector_successor": "candidate_selector.successor_codebook",
}
_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_conv_proj": "attention_conv.kernel_projection",
    "ffn_conv_proj": "mlp_conv.kernel_projection",
    # Stored without a `.weight` suffix, like the checkpoints' base_kernel.
    "attn_conv_base": "attention_conv.base_kernel",
    "ffn_conv_base": "mlp_conv.base_kernel",
}
_BARE = {"candidate_selector.predecessor_codebook", "candidate_selector.successor_codebook"}
_BARE_SUFFIX = (".base_kernel",)


class GGUFError(ValueError):
    """A GGUF file that is not a DFlash draft llama.cpp's converter would write."""


def tensor_name(name: str) -> str:
    """Our (checkpoint) name for a llama.cpp tensor name; GGUFError if unknown."""
    base, _, suffix = name.rpartition(".")
    if suffix not in ("weight", "bias", "scales", "biases"):
        base, suffix = name, ""
    if base in _TOP:
        ours = _TOP[base]
    else:
        parts = base.split(".")
        if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit() or parts[2] not in _LAYER:
            raise GGUFError(f"tensor '{name}' is not part of a llama.cpp DFlash draft")
        ours = f"layers.{parts[1]}.{_LAYER[parts[2]]}"
    if ours in _BARE or ours.endswith(_BARE_SUFFIX):
        return ours if suffix in ("", "weight") else f"{ours}.{suffix}"
    return f"{ours}.{suffix or 'weight'}"


def tensor_types(path: str | Path) -> dict[str, str]:
    """{tensor name: GGML type name} from the GGUF header (v2/v3)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file")
        (version,) = struct.unpack("<I", f.read(4))
        if version < 2:
            raise GGUFError(f"{path}: GGUF version {version} is too old (need 2 or later)")
        n_tensors, n_kv = struct.unpack("<QQ", f.read(16))

        def string() -> bytes:
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n)

        scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

        def skip(kind: int) -> None:
            if kind in scalar:
                f.seek(scalar[kind], 1)
            elif kind == 8:
                string()
            elif kind == 9:
                item, count = struct.unpack("<IQ", f.read(12))
                if item in scalar:
                    f.seek(scalar[item] * count, 1)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                raise GGUFError(f"{path}: unknown GGUF metadata type {kind}")

        for _ in range(n_kv):
            string()
            skip(struct.unpack("<I", f.read(4))[0])
        types = {}
        for _ in range(n_tensors):
            name = string().decode()
            (n_dims,) = struct.unpack("<I", f.read(4))
            f.seek(8 * n_dims, 1)
            kind, _offset = struct.unpack("<IQ", f.read(12))
            types[name] = GGML_TYPES.get(kind, f"type {kind}")
    return types


def _value(metadata: dict[str, Any], key: str, default: Any = None) -> Any:
    v = metadata.get(key, default)
    return v.tolist() if isinstance(v, mx.array) else v


def config_dict(metadata: dict[str, Any], weights: dict[str, mx.array]) -> dict[str, Any]:
    """The HF config.json a GGUF DFlash draft was converted from, as far as it says."""
    arch = metadata.get("general.architecture")
    if arch != ARCH:
        raise GGUFError(f"GGUF architecture is '{arch}', not '{ARCH}' (llama.cpp's DFlash draft)")

    def need(key: str) -> Any:
        v = _value(metadata, key)
        if v is None:
            raise GGUFError(f"GGUF DFlash draft is missing metadata '{key}'")
        return v

    layers = int(need(f"{ARCH}.block_count"))
    heads = int(need(f"{ARCH}.attention.head_count"))
    hidden = int(need(f"{ARCH}.embedding_length"))
    taps = need(f"{ARCH}.target_layers")
    taps = [taps] if isinstance(taps, int) else list(taps)
    layer_ids = [int(i) - 1 for i in taps]  # stored as hidden_states indices
    if any(i < 0 for i in layer_ids):
        raise GGUFError(f"GGUF '{ARCH}.target_layers' {taps} must all be >= 1")

    num_target_layers, inferred = _num_target_layers(metadata, layer_ids)
    raw: dict[str, Any] = {
        "architectures": [DFLASH],
        "model_type": "qwen3",
        "block_size": int(need(f"{ARCH}.block_size")),
        "dflash_config": {
            "mask_token_id": int(need("tokenizer.ggml.mask_token_id")),
            "target_layer_ids": layer_ids,
            "num_target_layers_inferred": inferred,
        },
        "num_target_layers": num_target_layers,
        "hidden_size": hidden,
        "intermediate_size": int(need(f"{ARCH}.feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(_value(metadata, f"{ARCH}.attention.head_count_kv", heads)),
        "head_dim": int(_value(metadata, f"{ARCH}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(_value(metadata, f"{ARCH}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(need(f"{ARCH}.rope.freq_base")),
        "max_position_embeddings": int(_value(metadata, f"{ARCH}.context_length", 40960)),
        "vocab_size": _vocab_size(metadata, weights),
        "attention_bias": any(k.endswith("self_attn.q_proj.bias") for k in weights),
    }
    pattern = _value(metadata, f"{ARCH}.attention.sliding_window_pattern")
    window = _value(metadata, f"{ARCH}.attention.sliding_window")
    if isinstance(pattern, (bool, int)):
        pattern = [bool(pattern)] * layers
    if pattern is not None and any(pattern):
        raw["layer_types"] = ["sliding_attention" if s else "full_attention" for s in pattern]
        raw["sliding_window"] = window
    if scaling := _rope_scaling(metadata):
        raw["rope_scaling"] = scaling
    if (cap := _value(metadata, f"{ARCH}.final_logit_softcapping")) is not None:
        raw["dflash_config"]["final_logit_softcapping"] = float(cap)

    dflash2 = {
        k: _value(metadata, f"{ARCH}.{k}")
        for k in ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")
    }
    if (
        any(v is not None for v in dflash2.values())
        or "candidate_selector.hidden_projection.weight" in weights
    ):
        raw["architectures"] = [DFLASH2]
        raw["dflash_config"].update({k: v for k, v in dflash2.items() if v is not None})
        # DFlash 1 converters write causal=false for every draft, whose sliding layers
        # are still causal in z-lab's runtimes; only DFlash 2 configs set is_causal.
        causal = _value(metadata, f"{ARCH}.attention.causal")
        if causal is not None:
            raw["is_causal"] = bool(causal)
    return raw


def _num_target_layers(metadata: dict[str, Any], layer_ids: list[int]) -> tuple[int, bool]:
    """(target depth, whether it was inferred)."""
    for key in (f"{ARCH}.num_target_layers", f"{ARCH}.target_block_count"):
        if (n := _value(metadata, key)) is not None:
            return int(n), False
    # Not in llama.cpp's metadata: when the taps are the paper's default spread for
    # some target depth, that depth; otherwise the least depth the taps allow.
    for n in range(max(layer_ids) + 1, max(layer_ids) + 8):
        if build_target_layer_ids(n, len(layer_ids)) == layer_ids:
            return n, True
    return max(layer_ids) + 1, True


def _vocab_size(metadata: dict[str, Any], weights: dict[str, mx.array]) -> int:
    if (v := _value(metadata, f"{ARCH}.vocab_size")) is not None:
        return int(v)
    book = weights.get("candidate_selector.predecessor_codebook")
    if book is not None:
        return int(book.shape[0])
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens)  # llama.cpp pads the token list to the model's vocab size
    raise GGUFError(
        f"GGUF DFlash draft records no vocabulary size ('{ARCH}.vocab_size' or tokenizer.ggml.tokens)"
    )


def _rope_scaling(metadata: dict[str, Any]) -> dict[str, Any] | None:
    kind = _value(metadata, f"{ARCH}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind}
    for ours, key in (
        ("factor", "factor"),
        ("original_max_position_embeddings", "original_context_length"),
        ("beta_fast", "yarn_beta_fast"),
        ("beta_slow", "yarn_beta_slow"),
    ):
        if (v := _value(metadata, f"{ARCH}.rope.scaling.{key}")) is not None:
            scaling[ours] = v
    return scaling


def read_gguf(path: str | Path) -> tuple[DraftConfig, dict[str, mx.array]]:
    """(config, weights under our names) of a llama.cpp GGUF DFlash draft.

    Q4_0/Q4_1/Q8_0 layers come back quantized (config.quantization holds group 32 and
    the bits, per layer where they differ); other quantized types dequantized to
    float16, with a warning naming them; F32 tensors (llama.cpp keeps norms in F32)
    are cast to the file's other float type so the draft computes in one dtype.
    """
    path = Path(path)
    types = tensor_types(path)
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except Exception as e:  # mlx raises RuntimeError/ValueError for bad files
        raise GGUFError(f"cannot read {path}: {e}") from e

    weights = {tensor_name(k): v for k, v in arrays.items()}
    dequantized = Counter(
        t for t in types.values() if t not in FLOAT_TYPES and t not in NATIVE_QUANTIZED
    )
    if dequantized:
        listed = ", ".join(f"{n} {t}" for t, n in sorted(dequantized.items()))
        warnings.warn(
            f"{path.name}: MLX reads these GGUF types only as float16, so they are "
            f"dequantized ({listed} tensors); Q4_0, Q4_1 and Q8_0 stay quantized",
            stacklevel=2,
        )

    # Quantized tensors that are not a Linear's weight (the codebooks) are dequantized:
    # the model keeps them as plain tables.
    bits: dict[str, int] = {}
    for name in [k for k in weights if k.endswith(".scales")]:
        base = name.removesuffix(".scales")
        key = f"{base}.weight" if f"{base}.weight" in weights else base
        w, s, b = weights[key], weights.pop(name), weights.pop(f"{base}.biases")
        n_bits = 32 * w.shape[-1] // (s.shape[-1] * GGUF_GROUP_SIZE)
        if key == base:  # a bare table
            weights[key] = mx.dequantize(w, s, b, group_size=GGUF_GROUP_SIZE, bits=n_bits)
        else:
            weights[f"{base}.scales"], weights[f"{base}.biases"] = s, b
            bits[base] = n_bits

    floats = [v.dtype for v in weights.values() if v.dtype in (mx.float16, mx.bfloat16)]
    if floats or bits:
        common = Counter(floats).most_common(1)[0][0] if floats else mx.float16
        weights = {k: v.astype(common) if v.dtype == mx.float32 else v for k, v in weights.items()}

    raw = config_dict(metadata, weights)
    if bits:
        main = Counter(bits.values()).most_common(1)[0][0]
        quant: dict[str, Any] = {"group_size": GGUF_GROUP_SIZE, "bits": main}
        for base, b in bits.items():
            if b != main:
                quant[base] = {"group_size": GGUF_GROUP_SIZE, "bits": b}
        raw["quantization"] = quant
    return DraftConfig.from_dict(raw), weights
