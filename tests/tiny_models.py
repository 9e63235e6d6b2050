"""Tiny random mlx-lm targets and a tiny tokenizer, written to disk as `mlx_lm.load` reads them.

Every target has hidden size 64, fp32 random weights from a seeded numpy RNG (the same
bytes on every machine and backend) and the tokenizer from `make_tokenizer` (vocab 256
by default: 128 ASCII byte-level tokens, BPE merges, then 4 special tokens last, so the
mask token is `vocab_size - 1`, the id `conftest.write_random_draft` uses).

Where mlx-lm 0.32.2 keeps things (`model` is what `mlx_lm.load` returns). `model.layers`
is the layer list of every family; `model.model.embed_tokens` is the embedding of every
family (for qwen3_5*, `model.model` is a property returning `model.language_model.model`).

| family (model_type) | layer list                        | output head                  |
|---------------------|-----------------------------------|------------------------------|
| llama               | model.model.layers                | model.lm_head                |
| mistral (llama.py)  | model.model.layers                | model.lm_head                |
| qwen2               | model.model.layers                | tied                         |
| qwen3               | model.model.layers                | tied                         |
| qwen3_moe           | model.model.layers                | model.lm_head                |
| gpt_oss             | model.model.layers                | model.lm_head                |
| gemma3_text         | model.model.layers                | tied (1)                     |
| qwen3_5 (2)         | model.language_model.model.layers | tied                         |
| qwen3_5_moe (2)     | model.language_model.model.layers | model.language_model.lm_head |
| qwen3_next          | model.model.layers                | model.lm_head                |
| gemma4_text         | model.model.layers                | tied (3)                     |
| gemma4 (4)          | model.language_model.model.layers | tied (3)                     |
| muse_glimmer        | model.model.layers                | model.lm_head (5)            |

tied: logits = embed_tokens.as_linear(h), no lm_head module. (1) Gemma 3: no lm_head.weight
is saved and mlx_lm's sanitize pops lm_head; gemma3_text also multiplies the embeddings
by sqrt(hidden_size) inside the model.
(2) config.json nests the language model's config under text_config (model_type
qwen3_5_text / qwen3_5_moe_text), as the published checkpoints do; mlx_lm also reads it flat.
(3) Gemma 4: embeddings * sqrt(hidden_size) inside the model, logits softcapped (tanh) at
30; its layers return (hidden, K/V, offset). (4) Nested under text_config (gemma4_text);
gemma4's Model has no `model` property: model.language_model.model.embed_tokens.
(5) Muse Glimmer: RMS-normed (scaleless) embeddings; logits * output_multiplier, softcapped
at 20. The Qwen3.8 family has no model type of its own: it is qwen3_5 (see QWEN3_8).

Layers and caches (`mlx_lm.models.cache.make_prompt_cache(model)`), F = full attention
(KVCache), S = sliding window 32 (RotatingKVCache), G = GatedDeltaNet (ArraysCache(2)):
- llama, mistral, qwen2 (q/k/v bias), qwen3 (q/k norm): F F F F
- qwen3_moe: F F F F, every MLP a MoE of 4 experts, top-2
- gpt_oss: S F S F (layer_types), MoE 4/top-2, attention sinks, biases
- gemma3_text: S S F S S F (sliding_window_pattern 3)
- qwen3_5: G G G F (full_attention_interval 4)
- qwen3_5_moe, qwen3_next: G G G F, every MLP a MoE 4/top-2 plus a shared expert
- gemma4_text: S S F S S F (window 8), layers 4 and 5 KV-shared (no cache: they reuse
  the K/V of layers 3 and 2), so 4 caches S S F S; per-layer input embeddings
- gemma4: S S F S S F (window 16), K = V on the full layers, a MoE 4/top-2 beside
  every MLP
- muse_glimmer: S S S F (window 12), no RoPE on the full layer
- qwen3_5 with QWEN3_8 (Qwen3.8): G G G F, untied lm_head, 3 value heads per key head

Rows of the output head for the special tokens are scaled down, so greedy decoding of a
random target does not stop on EOS (or emit a chat marker) by chance: tests that need a
stop make one explicitly (e.g. `tokenizer.add_eos_token`).
"""

from __future__ import annotations

import copy
import importlib
import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.utils import MODEL_REMAPPING, quantize_model, save_config, save_model

FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "gpt_oss",
    "gemma3_text",
    "qwen3_5",
    "qwen3_5_moe",
    "qwen3_next",
)

# Families added for issue 14 (tests/test_new_families.py). The Qwen3.8 family is no
# model type of its own: its checkpoints say model_type qwen3_5 (the Qwen3.5/3.6
# architecture, Qwen3_5ForConditionalGeneration), so it is the qwen3_5 family with the
# QWEN3_8 overrides below.
NEW_FAMILIES = ("gemma4_text", "gemma4", "muse_glimmer")

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>")
EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"
N_BYTE_TOKENS = 128  # byte-level tokens for the ASCII bytes 0..127

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Text the BPE merges are learned from; any ASCII text would do.
_CORPUS = """\
Speculative decoding drafts a block of tokens with a small model and verifies the whole
block with the target model in one forward pass. The target keeps every token up to the
first disagreement, so the output is exactly what the target alone would have generated.
def generate(model, prompt, max_tokens=256):
    tokens = tokenize(prompt)
    for step in range(max_tokens):
        logits = model(tokens)
        tokens.append(int(logits[-1].argmax()))
    return detokenize(tokens)
The quick brown fox jumps over the lazy dog. Hello, world! What is the answer? 42.
<|im_start|>user
Write a haiku about the sea.<|im_end|>
<|im_start|>assistant
Waves fold into foam; the tide remembers nothing; salt on the wind, gone.<|im_end|>
"""

_HIDDEN = 64

_COMMON = {
    "hidden_size": _HIDDEN,
    "num_hidden_layers": 4,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "torch_dtype": "float32",
}

_MOE = {
    "num_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 64,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
}

_GATED_DELTA = {
    "full_attention_interval": 4,  # layers 0-2 GatedDeltaNet, layer 3 full attention
    "head_dim": 32,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 32,  # a multiple of 32, so Metal takes its kernel path
    "linear_value_head_dim": 32,
    "linear_conv_kernel_dim": 4,
    "partial_rotary_factor": 0.25,
}

_GEMMA4_ROPE = {
    "full_attention": {
        "partial_rotary_factor": 0.25,
        "rope_theta": 1000000.0,
        "rope_type": "proportional",
    },
    "sliding_attention": {
        "partial_rotary_factor": 1.0,
        "rope_theta": 10000.0,
        "rope_type": "default",
    },
}

_FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False},
    "mistral": {"architectures": ["MistralForCausalLM"], "tie_word_embeddings": False},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "tie_word_embeddings": True},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "tie_word_embeddings": True},
    "qwen3_moe": {
        "architectures": ["Qwen3MoeForCausalLM"],
        "tie_word_embeddings": False,
        **_MOE,
    },
    "gpt_oss": {
        "architectures": ["GptOssForCausalLM"],
        "tie_word_embeddings": False,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "intermediate_size": 64,
        "sliding_window": 32,
    },
    "gemma3_text": {
        "architectures": ["Gemma3ForCausalLM"],
        "tie_word_embeddings": True,
        "num_hidden_layers": 6,
        "sliding_window": 32,
        "sliding_window_pattern": 3,  # full attention at layers 2 and 5
        "query_pre_attn_scalar": 16,
        "rope_local_base_freq": 10000.0,
        "rope_theta": 1000000.0,
    },
    "qwen3_5": {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "tie_word_embeddings": True,
        **_GATED_DELTA,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [11, 11, 10],
            "mrope_interleaved": True,
        },
    },
    "qwen3_5_moe": {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "tie_word_embeddings": False,
        **_GATED_DELTA,
        **_MOE,
        "shared_expert_intermediate_size": 64,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [11, 11, 10],
            "mrope_interleaved": True,
        },
    },
    "qwen3_next": {
        "architectures": ["Qwen3NextForCausalLM"],
        "tie_word_embeddings": False,
        **_GATED_DELTA,
        **_MOE,
        "shared_expert_intermediate_size": 64,
    },
    # Gemma 4 E2B/E4B style: the last num_kv_shared_layers layers compute no K/V and
    # have no cache; each reuses the K/V of the last earlier layer of its kind (here
    # layer 4 those of layer 3, layer 5 those of layer 2). Per-layer input embeddings,
    # double-wide MLPs on the shared layers, a window of 8 so the rotating caches wrap.
    "gemma4_text": {
        "architectures": ["Gemma4ForCausalLM"],
        "tie_word_embeddings": True,
        "num_hidden_layers": 6,
        "global_head_dim": 32,
        "sliding_window": 8,
        "sliding_window_pattern": 3,  # S S F S S F
        "num_kv_shared_layers": 2,
        "hidden_size_per_layer_input": 16,
        "vocab_size_per_layer_input": 256,
        "use_double_wide_mlp": True,
        "final_logit_softcapping": 30.0,
        "rope_parameters": _GEMMA4_ROPE,
    },
    # Gemma 4 31B / 26B-A4B style, nested as the multimodal checkpoints are: full layers
    # with K = V (attention_k_eq_v) and their own head size / KV heads, a MoE block
    # beside every MLP, no KV sharing.
    "gemma4": {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "tie_word_embeddings": True,
        "num_hidden_layers": 6,
        "global_head_dim": 32,
        "sliding_window": 16,
        "sliding_window_pattern": 3,
        "num_kv_shared_layers": 0,
        "hidden_size_per_layer_input": 0,
        "attention_k_eq_v": True,
        "num_global_key_value_heads": 1,
        "enable_moe_block": True,
        "num_experts": 4,
        "top_k_experts": 2,
        "moe_intermediate_size": 32,
        "final_logit_softcapping": 30.0,
        "rope_parameters": _GEMMA4_ROPE,
    },
    # S S S F (RoPE on the sliding layers, none on the full one), gated attention,
    # scaleless RMSNorm on the embeddings, logits * output_multiplier then softcapped.
    "muse_glimmer": {
        "architectures": ["MuseGlimmerForCausalLM"],
        "tie_word_embeddings": False,
        "sliding_window": 12,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "qk_scale_factor": 3.87,
        "final_logit_softcapping": 20.0,
        "output_multiplier": 0.19611613513818404,
    },
}

# Qwen3.8-27B as mlx_lm reads it (model_type qwen3_5): an untied lm_head and three
# GatedDeltaNet value heads per key head (48 / 16 in the 27B), G G G F.
QWEN3_8 = {
    "tie_word_embeddings": False,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 6,
    "layer_types": ["linear_attention"] * 3 + ["full_attention"],
}

# Real Qwen3.5 checkpoints nest the language model's config under text_config.
_NESTED = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text", "gemma4": "gemma4_text"}
# Top-level fields a nested family's ModelArgs reads (gemma4's replaces the text config's
# vocab_size with its own, 262144 by default).
_TOP_LEVEL = {"gemma4": ("vocab_size",)}

# The random init (tuned so that greedy decoding stays varied: with these, the first 64
# greedy tokens of every family have 26+ distinct ids over seeds 0-7):
# - embeddings of std 0.5 and an output head of std 2/sqrt(H);
# - queries and keys 2x larger than fan-in init (q/k_proj weights, or q/k_norm weights
#   where the family normalizes them), so attention is peaked and picks out context
#   tokens: near-uniform attention averages the context, the hidden state then barely
#   moves from step to step and greedy output falls into runs like `a a a a`;
# - a final norm weight of random sign, so a tied head does not favour the last token.
_EMBED_STD = 0.5
_HEAD_STD = 2.0
_QK_GAIN = 2.0
_GEMMA4 = ("gemma4_text", "gemma4")
_GEMMA4_POST_NORM = 4.0
# Rows of the output head for the special tokens, scaled down.
_SPECIAL_ROW_SCALE = 0.1


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character map of byte-level BPE (as in GPT-2)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def make_tokenizer(
    path: Path,
    vocab_size: int = 256,
    *,
    generation_eos: Sequence[str] | None = None,
) -> None:
    """Write a byte-level BPE tokenizer of exactly `vocab_size` tokens to `path`.

    Ids 0..127 are the ASCII bytes, then BPE merges, then the special tokens
    <|endoftext|> (eos), <|im_start|>, <|im_end|>, <|mask|> (= vocab_size - 1).
    `generation_eos`: special tokens written as generation_config.json's eos_token_id list
    (mlx_lm.load adds them to the tokenizer's EOS set).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    n_merges = vocab_size - N_BYTE_TOKENS - len(SPECIAL_TOKENS)
    if n_merges < 0:
        raise ValueError(f"vocab_size must be >= {N_BYTE_TOKENS + len(SPECIAL_TOKENS)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    byte_chars = _bytes_to_unicode()
    alphabet = [byte_chars[b] for b in range(N_BYTE_TOKENS)]

    # Learn the merges on the corpus, then lay the vocabulary out in our own order.
    merges: list[tuple[str, str]] = []
    if n_merges:
        learner = Tokenizer(models.BPE())
        learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=N_BYTE_TOKENS + n_merges,
            initial_alphabet=alphabet,
            show_progress=False,
        )
        learner.train_from_iterator([_CORPUS], trainer=trainer)
        merges = [tuple(m) for m in json.loads(learner.to_str())["model"]["merges"]]
        merges = merges[:n_merges]
        # A vocabulary bigger than the corpus supports: add letter pairs.
        letters = "etaoinshrdlucmfwypvbgkjqxz"
        extra = ((a, b) for a in letters for b in letters)
        have = {a + b for a, b in merges} | set(alphabet)
        while len(merges) < n_merges:
            a, b = next(extra)
            if a + b not in have:
                merges.append((a, b))
                have.add(a + b)
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    if len(vocab) != N_BYTE_TOKENS + n_merges:
        raise AssertionError("BPE merges produced a duplicate token")

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    assert tokenizer.get_vocab_size() == vocab_size
    assert tokenizer.token_to_id(MASK_TOKEN) == vocab_size - 1
    tokenizer.save(str(path / "tokenizer.json"))

    special = {
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "mask_token": MASK_TOKEN,
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special_map = {k: v for k, v in special.items() if v is not None}
    special_map["additional_special_tokens"] = ["<|im_start|>", "<|im_end|>"]
    (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))
    if generation_eos:
        ids = [tokenizer.token_to_id(t) for t in generation_eos]
        if None in ids:
            raise ValueError(f"unknown token in {list(generation_eos)}")
        generation = {"eos_token_id": ids, "bos_token_id": None}
        (path / "generation_config.json").write_text(json.dumps(generation, indent=2))


def target_config(family: str, **overrides: Any) -> dict:
    """The config.json `make_target` writes for `family` (before quantization)."""
    if family not in _FAMILY_CONFIGS:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES + NEW_FAMILIES}")
    text = {"model_type": family, "vocab_size": 256, **_COMMON}
    text.update(copy.deepcopy(_FAMILY_CONFIGS[family]))
    text.update(overrides)
    if family == "gpt_oss" and "layer_types" not in overrides:
        # Sliding and full attention alternate, as in the released models.
        kinds = ("sliding_attention", "full_attention")
        text["layer_types"] = [kinds[i % 2] for i in range(text["num_hidden_layers"])]
    if family in _NESTED:
        architectures = text.pop("architectures")
        text["model_type"] = _NESTED[family]
        return {
            "architectures": architectures,
            "model_type": family,
            "tie_word_embeddings": text["tie_word_embeddings"],
            **{k: text[k] for k in _TOP_LEVEL.get(family, ())},
            "text_config": text,
        }
    return text


def _model_classes(config: dict):
    model_type = MODEL_REMAPPING.get(config["model_type"], config["model_type"])
    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    return module.Model, module.ModelArgs


def _init_weights(model, text: dict, seed: int, family: str) -> None:
    """Seeded numpy init of every parameter, in sorted-name order."""
    # The family goes into the seed so that llama and mistral are different models.
    rng = np.random.default_rng([seed, zlib.crc32(family.encode())])
    special = np.arange(text["vocab_size"] - len(SPECIAL_TOKENS), text["vocab_size"])
    params = sorted(tree_flatten(model.parameters()))
    tied = not any(name.endswith("lm_head.weight") for name, _ in params)
    # Gemma's RMSNorm scales by 1 + weight.
    norm_offset = 1.0 if family == "gemma3_text" else 0.0
    new = []
    for name, p in params:
        leaf = name.rsplit(".", 1)[-1]
        shape = p.shape
        if name.endswith("embed_tokens.weight"):
            w = rng.normal(0.0, _EMBED_STD, shape)
            if tied:
                w[special] *= _SPECIAL_ROW_SCALE
        elif name.endswith("lm_head.weight"):
            w = rng.normal(0.0, _HEAD_STD / np.sqrt(shape[-1]), shape)
            w[special] *= _SPECIAL_ROW_SCALE
        elif leaf == "A_log":
            w = np.log(rng.uniform(1.0, 16.0, shape))
        elif name.endswith("model.norm.weight"):
            w = rng.normal(0.0, 1.0, shape) - norm_offset
        elif family in _GEMMA4 and ".post_" in name and name.endswith("layernorm.weight"):
            # Gemma 4 norms each layer's output before the residual add, and the
            # embeddings come in scaled by sqrt(H): unit post-norms leave the residual
            # all embedding, and greedy output falls into loops like `a b a b`.
            w = np.full(shape, _GEMMA4_POST_NORM)
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            w = np.full(shape, _QK_GAIN) - norm_offset
        elif leaf in ("layer_scalar", "scale", "per_expert_scale"):
            continue  # Gemma 4's layer and router scales: ones, so no layer is muted
        elif leaf in ("dt_bias", "sinks") or (p.ndim == 1 and "norm" in name):
            continue  # the module's own init (ones / zeros) is the real models' too
        elif leaf == "bias":
            w = rng.normal(0.0, 0.1, shape)
        elif "conv1d" in name:  # depthwise kernel [channels, K, 1]
            w = rng.normal(0.0, 1.0 / np.sqrt(shape[1]), shape)
        else:  # [out, in] or stacked experts [E, out, in]: fan-in scaled
            qk = name.endswith(("q_proj.weight", "k_proj.weight"))
            w = rng.normal(0.0, (_QK_GAIN if qk else 1.0) / np.sqrt(shape[-1]), shape)
        new.append((name, mx.array(w.astype(np.float32))))
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())


def make_target(
    path: Path,
    family: str,
    *,
    seed: int = 0,
    quantize_bits: int | None = None,
    generation_eos: Sequence[str] | None = None,
    **overrides: Any,
) -> Path:
    """Write a tiny random `family` target (config, fp32 safetensors, tokenizer) to `path`.

    `overrides` update the (text) config, e.g. num_hidden_layers=6 or sliding_window=8.
    `quantize_bits`: quantize with mlx_lm's quantize_model (group size 32) before saving.
    Returns `path`; `mlx_lm.load(str(path))` loads it.
    """
    path = Path(path)
    config = target_config(family, **overrides)
    text = config.get("text_config", config)
    model_class, args_class = _model_classes(config)
    model = model_class(args_class.from_dict(copy.deepcopy(config)))
    if family == "gemma3_text" and text["tie_word_embeddings"]:
        # Gemma 3 checkpoints have no lm_head.weight; mlx_lm ties when it is missing.
        model.tie_word_embeddings = True
        model.pop("lm_head")
    _init_weights(model, text, seed, family)
    if quantize_bits is not None:
        model, config = quantize_model(model, config, group_size=32, bits=quantize_bits)
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model)
    save_config(config, path / "config.json")
    make_tokenizer(path, text["vocab_size"], generation_eos=generation_eos)
    return path


def load_config(path: Path) -> dict:
    """The text config of a target written by `make_target` (text_config when nested)."""
    config = json.loads((Path(path) / "config.json").read_text())
    return config.get("text_config", config)


def num_layers(path: Path) -> int:
    return load_config(path)["num_hidden_layers"]
